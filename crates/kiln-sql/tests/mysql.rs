//! The MySQL/MariaDB engine against the real server, driven through
//! `kiln_core::Runner`. Every test gets its own database (kiln-testkit) and
//! checks what is really in it from a separate connection.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[allow(unused_imports)]
use kiln_core::engine::{Engine as _, Locker as _};
use kiln_core::schema::{self, ColumnInfo, ConstraintInfo, Contract, IndexInfo, Snapshot};
use kiln_core::split::Dialect;
use kiln_core::{
    load_dir, BackendConfig, DownTarget, EngineError, FailureOutcome, LoadOptions, Migration, Policy, RecordContext, RunError, Runner,
    RunnerSettings, State, StepError, UpTarget, Version,
};
use kiln_testkit::compat::Backend;
use kiln_testkit::{Engine, TestDb};

fn write(dir: &Path, name: &str, content: &str) {
    std::fs::write(dir.join(name), content).unwrap();
}

fn load(dir: &Path) -> Vec<Migration> {
    load_dir(dir, &LoadOptions { dialect: Dialect::MYSQL, name_rule: None }).unwrap()
}

async fn backend(url: &str) -> Box<dyn Backend> {
    kiln_testkit::compat::Protocol::boxed(kiln_sql::connect(&BackendConfig::new(url)).await.unwrap())
}

fn settings() -> RunnerSettings {
    RunnerSettings { lock_timeout: Duration::from_secs(1), actor: "tester@testhost".into() }
}

async fn up(b: &mut dyn Backend, local: &[Migration]) -> Result<kiln_core::RunReport, RunError> {
    Runner::new(b, settings()).up(local, &UpTarget::Latest, &Policy::default(), false).await
}

async fn q(db: &TestDb, sql: &str) -> Vec<String> {
    db.query_strings(sql).await.unwrap()
}

/// Tables of the test database other than kiln's, sorted.
async fn tables(db: &TestDb) -> Vec<String> {
    q(
        db,
        &format!(
            "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = '{}' AND TABLE_NAME NOT LIKE 'kiln\\_%' ORDER BY TABLE_NAME",
            db.name
        ),
    )
    .await
}

fn v(s: &str) -> Version {
    Version::parse_arg(s).unwrap()
}

#[tokio::test]
async fn up_status_down_and_up_again() {
    let db = TestDb::new(Engine::Mysql).await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "0001_create_users.sql",
        "-- kiln:up\nCREATE TABLE users (id INT AUTO_INCREMENT PRIMARY KEY, email VARCHAR(100) NOT NULL);\n-- kiln:down\nDROP TABLE users;\n",
    );
    write(
        dir.path(),
        "0002_seed_users.sql",
        "-- kiln:up\nINSERT INTO users (email) VALUES ('a@x'), ('b@x');\nCREATE UNIQUE INDEX users_email ON users (email);\n-- kiln:down\nDROP INDEX users_email ON users;\nDELETE FROM users;\n",
    );
    write(
        dir.path(),
        "0003_create_posts.up.sql",
        "CREATE TABLE posts (id INT PRIMARY KEY, user_id INT, FOREIGN KEY (user_id) REFERENCES users (id));\n",
    );
    write(dir.path(), "0003_create_posts.down.sql", "DROP TABLE posts;\n");
    let local = load(dir.path());
    let mut b = backend(&db.url).await;

    let r = Runner::new(&mut *b, settings()).up(&local, &UpTarget::To(v("0002")), &Policy::default(), false).await.unwrap();
    assert_eq!((r.batch, r.steps.len()), (Some(1), 2));
    let r = up(&mut *b, &local).await.unwrap();
    assert_eq!((r.batch, r.steps.len()), (Some(2), 1));

    // Seen from another connection: everything is committed.
    assert_eq!(tables(&db).await, ["posts", "users"]);
    assert_eq!(q(&db, "SELECT COUNT(*) FROM users").await, ["2"]);
    assert_eq!(
        q(&db, "SELECT CONCAT(version, ' ', state, ' ', batch, ' ', applied_by, ' ', error IS NULL) FROM kiln_history ORDER BY version").await,
        ["1 applied 1 tester@testhost 1", "2 applied 1 tester@testhost 1", "3 applied 2 tester@testhost 1"]
    );
    assert_eq!(q(&db, "SELECT COUNT(*) FROM kiln_log WHERE event = 'applied'").await, ["3"]);
    assert_eq!(q(&db, "SELECT COUNT(*) FROM kiln_log WHERE event IN ('run-start', 'run-end')").await, ["4"]);
    // History columns are what DESIGN §3 says.
    assert_eq!(
        q(&db, &format!("SELECT DATA_TYPE FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = '{}' AND TABLE_NAME = 'kiln_history' AND COLUMN_NAME IN ('applied_at', 'version') ORDER BY COLUMN_NAME", db.name)).await,
        ["datetime", "bigint"]
    );

    let history = b.read_history().await.unwrap().unwrap();
    assert_eq!(history.len(), 3);
    assert!(history.iter().all(|a| a.state == State::Applied && a.error.is_none()));
    assert_eq!(history[2].checksum, local[2].checksum);
    assert!((chrono::Utc::now() - history[2].applied_at).num_seconds().abs() < 60, "applied_at is UTC: {}", history[2].applied_at);
    let status = Runner::new(&mut *b, settings()).status(&local).await.unwrap();
    assert_eq!(status.len(), 3);

    let r = Runner::new(&mut *b, settings()).down(&local, &DownTarget::LastBatch, false).await.unwrap();
    assert_eq!(r.steps.len(), 1);
    assert_eq!(tables(&db).await, ["users"]);
    let r = Runner::new(&mut *b, settings()).down(&local, &DownTarget::LastBatch, false).await.unwrap();
    assert_eq!(r.steps.len(), 2);
    assert!(tables(&db).await.is_empty());
    assert_eq!(q(&db, "SELECT COUNT(*) FROM kiln_history").await, ["0"]);
    assert_eq!(q(&db, "SELECT COUNT(*) FROM kiln_log WHERE event = 'reverted'").await, ["3"]);

    let r = up(&mut *b, &local).await.unwrap();
    assert_eq!(r.steps.len(), 3);
    assert_eq!(q(&db, "SELECT COUNT(*) FROM users").await, ["2"]);
    assert!(up(&mut *b, &local).await.unwrap().steps.is_empty());
    b.close().await.unwrap();
}

#[tokio::test]
async fn failing_first_ddl_statement_is_clean() {
    let db = TestDb::new(Engine::Mysql).await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_t.sql", "CREATE TABLE t (id INT);\n");
    write(dir.path(), "0002_again.sql", "-- comment\nCREATE TABLE t (id INT);\nCREATE TABLE u (id INT);\n");
    let local = load(dir.path());
    let mut b = backend(&db.url).await;
    let err = up(&mut *b, &local).await.unwrap_err();
    let RunError::Migration { version, outcome, error, done } = &err else { panic!("{err}") };
    assert_eq!(version.text, "0002");
    assert_eq!(*outcome, FailureOutcome::RolledBack);
    assert_eq!((error.statement, error.line), (1, 2));
    assert!(error.message.starts_with("1050 (42S01): Table 't' already exists"), "{}", error.message);
    assert_eq!(error.code.as_deref(), Some("1050"));
    assert_eq!(done.len(), 1);
    // No entry for 0002 (nothing of it remains), and the failure is in the log.
    assert_eq!(q(&db, "SELECT CONCAT(version, ' ', state) FROM kiln_history").await, ["1 applied"]);
    assert_eq!(tables(&db).await, ["t"]);
    let failed = q(&db, "SELECT CONCAT(version, ' ', detail) FROM kiln_log WHERE event = 'failed'").await;
    assert!(failed.len() == 1 && failed[0].starts_with("2 0002_again.sql: statement 1 (line 2) failed: 1050"), "{failed:?}");

    // Nothing blocks the next run.
    write(dir.path(), "0002_again.sql", "CREATE TABLE u (id INT);\n");
    up(&mut *b, &load(dir.path())).await.unwrap();
    assert_eq!(tables(&db).await, ["t", "u"]);
}

#[tokio::test]
async fn failing_dml_is_rolled_back_with_its_transaction() {
    let db = TestDb::new(Engine::Mysql).await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_t.sql", "CREATE TABLE t (id INT PRIMARY KEY);\n");
    write(dir.path(), "0002_rows.sql", "INSERT INTO t VALUES (1);\nUPDATE t SET id = 2;\nINSERT INTO t VALUES (2);\n");
    let local = load(dir.path());
    let mut b = backend(&db.url).await;
    let err = up(&mut *b, &local).await.unwrap_err();
    let RunError::Migration { outcome, error, .. } = &err else { panic!("{err}") };
    assert_eq!(*outcome, FailureOutcome::RolledBack);
    assert_eq!(error.statement, 3);
    assert!(error.message.starts_with("1062 (23000)"), "{}", error.message);
    // The first two statements were rolled back with the transaction.
    assert_eq!(q(&db, "SELECT COUNT(*) FROM t").await, ["0"]);
    assert_eq!(q(&db, "SELECT COUNT(*) FROM kiln_history WHERE version = 2").await, ["0"]);
}

#[tokio::test]
async fn failure_after_ddl_is_recorded_blocks_and_is_repaired() {
    let db = TestDb::new(Engine::Mysql).await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_a.sql", "CREATE TABLE a (id INT);\n");
    write(dir.path(), "0002_half.sql", "CREATE TABLE b (id INT);\n\nINSERT INTO b VALUES (1);\nINSERT INTO nope VALUES (1);\n");
    write(dir.path(), "0003_c.sql", "CREATE TABLE c (id INT);\n");
    let local = load(dir.path());
    let mut b = backend(&db.url).await;

    let err = up(&mut *b, &local).await.unwrap_err();
    let RunError::Migration { version, outcome, error, done } = &err else { panic!("{err}") };
    assert_eq!((version.text.as_str(), *outcome), ("0002", FailureOutcome::RecordedFailed));
    assert_eq!((error.statement, error.line), (3, 4));
    assert_eq!(done.len(), 1);
    let msg = &error.message;
    assert!(msg.starts_with("1146 (42S02): Table ") && msg.contains("nope' doesn't exist"), "{msg}");
    assert!(msg.contains("MySQL had already committed statement 1 (") && msg.contains("kiln repair 0002"), "{msg}");
    // What MySQL committed stays: table b. The INSERT after it ran in the
    // transaction kiln reopened after the DDL, so it was rolled back. 0003 never ran.
    assert_eq!(tables(&db).await, ["a", "b"]);
    assert_eq!(q(&db, "SELECT COUNT(*) FROM b").await, ["0"]);
    assert_eq!(q(&db, "SELECT CONCAT(state, ' ', error_statement, ' ', error_line) FROM kiln_history WHERE version = 2").await, ["failed 3 4"]);
    let recorded = q(&db, "SELECT error FROM kiln_history WHERE version = 2").await;
    assert!(recorded[0].contains("1146 (42S02)") && recorded[0].contains("committed statement 1"), "{recorded:?}");
    assert_eq!(q(&db, "SELECT COUNT(*) FROM kiln_log WHERE event = 'failed' AND version = 2").await, ["1"]);

    // The next run is refused, naming the version and `kiln repair`.
    let err = up(&mut *b, &local).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, RunError::Plan(_)), "{msg}");
    assert!(msg.contains("0002") && msg.contains("kiln repair 0002") && msg.contains("1146"), "{msg}");
    assert_eq!(tables(&db).await, ["a", "b"]);

    // The operator undoes the partial change, fixes the file and repairs.
    db.sql("DROP TABLE b").await.unwrap();
    write(dir.path(), "0002_half.sql", "CREATE TABLE b (id INT);\nINSERT INTO b VALUES (1);\n");
    let local = load(dir.path());
    let report = Runner::new(&mut *b, settings()).repair(&local, Some(&v("0002")), false, "dropped b by hand").await.unwrap();
    assert!(report.changes[0].to_string().contains("pending again"), "{:?}", report.changes);
    assert_eq!(q(&db, "SELECT COUNT(*) FROM kiln_log WHERE event = 'repair' AND reason = 'dropped b by hand'").await, ["1"]);
    let r = up(&mut *b, &local).await.unwrap();
    assert_eq!(r.steps.len(), 2);
    assert_eq!(tables(&db).await, ["a", "b", "c"]);
    assert_eq!(q(&db, "SELECT GROUP_CONCAT(state ORDER BY version) FROM kiln_history").await, ["applied,applied,applied"]);
}

#[tokio::test]
async fn ddl_after_dml_in_the_same_migration_is_not_clean() {
    // The failing CREATE TABLE commits the INSERT before it even runs.
    let db = TestDb::new(Engine::Mysql).await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_t.sql", "CREATE TABLE t (id INT);\n");
    write(dir.path(), "0002_mixed.sql", "INSERT INTO t VALUES (1);\nCREATE TABLE t (id INT);\n");
    let local = load(dir.path());
    let mut b = backend(&db.url).await;
    let err = up(&mut *b, &local).await.unwrap_err();
    let RunError::Migration { outcome, error, .. } = &err else { panic!("{err}") };
    assert_eq!(*outcome, FailureOutcome::RecordedFailed);
    assert!(error.message.contains("MySQL had already committed statement 1 (statement 2 is DDL"), "{}", error.message);
    assert_eq!(q(&db, "SELECT COUNT(*) FROM t").await, ["1"]);
    assert_eq!(q(&db, "SELECT state FROM kiln_history WHERE version = 2").await, ["failed"]);
}

#[tokio::test]
async fn procedures_without_delimiter_and_comments_with_semicolons() {
    let db = TestDb::new(Engine::Mysql).await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "0001_fill.sql",
        r#"-- kiln:up
-- a comment; with a semicolon
# and a hash comment; too
CREATE TABLE nums (n INT NOT NULL, note VARCHAR(20)); /* block; comment */
CREATE PROCEDURE fill(IN upto INT)
BEGIN
  DECLARE i INT DEFAULT 0;
  WHILE i < upto DO
    INSERT INTO nums VALUES (i, 'a;b');
    SET i = i + 1;
  END WHILE;
  IF upto > 3 THEN
    UPDATE nums SET note = 'big' WHERE n = 0;
  END IF;
END;
CALL fill(5);
-- kiln:down
DROP PROCEDURE fill;
DROP TABLE nums;
"#,
    );
    let local = load(dir.path());
    assert_eq!(local[0].up.len(), 3);
    let mut b = backend(&db.url).await;
    up(&mut *b, &local).await.unwrap();
    assert_eq!(q(&db, "SELECT COUNT(*) FROM nums").await, ["5"]);
    assert_eq!(q(&db, "SELECT note FROM nums WHERE n = 0").await, ["big"]);
    assert_eq!(q(&db, "SELECT note FROM nums WHERE n = 1").await, ["a;b"]);
    assert_eq!(q(&db, &format!("SELECT ROUTINE_NAME FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = '{}'", db.name)).await, ["fill"]);
    Runner::new(&mut *b, settings()).down(&local, &DownTarget::LastBatch, false).await.unwrap();
    assert!(tables(&db).await.is_empty());
    assert!(q(&db, &format!("SELECT ROUTINE_NAME FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = '{}'", db.name)).await.is_empty());
}

#[tokio::test]
async fn use_in_a_migration_does_not_move_kiln_tables() {
    let db = TestDb::new(Engine::Mysql).await;
    let other = format!("{}_other", db.name);
    db.sql(&format!("CREATE DATABASE `{other}`")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_elsewhere.sql", &format!("USE `{other}`;\nCREATE TABLE moved (id INT);\n"));
    write(dir.path(), "0002_here.sql", &format!("CREATE TABLE `{}`.here (id INT);\n", db.name));
    let local = load(dir.path());
    let mut b = backend(&db.url).await;
    let r = up(&mut *b, &local).await;
    let other_tables = q(&db, &format!("SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = '{other}'")).await;
    db.sql(&format!("DROP DATABASE `{other}`")).await.unwrap();
    r.unwrap();
    assert_eq!(other_tables, ["moved"]);
    assert_eq!(tables(&db).await, ["here"]);
    assert_eq!(q(&db, "SELECT GROUP_CONCAT(state ORDER BY version) FROM kiln_history").await, ["applied,applied"]);
}

#[tokio::test]
async fn failing_down_after_ddl_is_recorded_failed() {
    let db = TestDb::new(Engine::Mysql).await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "0001_two.sql",
        "-- kiln:up\nCREATE TABLE x (id INT);\nCREATE TABLE y (id INT);\n-- kiln:down\nDROP TABLE y;\nDROP TABLE nope;\n",
    );
    write(dir.path(), "0002_z.sql", "-- kiln:up\nCREATE TABLE z (id INT);\n-- kiln:down\nDROP TABLE missing_z;\n");
    let local = load(dir.path());
    let mut b = backend(&db.url).await;
    up(&mut *b, &local).await.unwrap();

    // A down failing on its first statement is clean: the entry is applied again.
    let err = Runner::new(&mut *b, settings()).down(&local, &DownTarget::Steps(1), false).await.unwrap_err();
    let RunError::Migration { outcome, .. } = &err else { panic!("{err}") };
    assert_eq!(*outcome, FailureOutcome::RolledBack);
    assert_eq!(q(&db, "SELECT state FROM kiln_history WHERE version = 2").await, ["applied"]);

    // Fix 0002's down (a change to the file, accepted by repair), revert it, then fail 0001's down halfway.
    write(dir.path(), "0002_z.sql", "-- kiln:up\nCREATE TABLE z (id INT);\n-- kiln:down\nDROP TABLE z;\n");
    let local = load(dir.path());
    Runner::new(&mut *b, settings()).repair(&local, None, false, "fixed the down").await.unwrap();
    let err = Runner::new(&mut *b, settings()).down(&local, &DownTarget::Steps(2), false).await.unwrap_err();
    let RunError::Migration { version, outcome, error, done } = &err else { panic!("{err}") };
    assert_eq!((version.text.as_str(), *outcome, done.len()), ("0001", FailureOutcome::RecordedFailed, 1));
    assert!(error.message.contains("kiln repair 0001"), "{}", error.message);
    assert_eq!(tables(&db).await, ["x"]);
    let row = q(&db, "SELECT CONCAT(state, ': ', error) FROM kiln_history WHERE version = 1").await;
    assert!(row[0].starts_with("failed: the down migration failed: 1051 (42S02)"), "{row:?}");
}

#[tokio::test]
async fn finish_is_committed_with_the_next_intent_and_a_lost_finish_blocks() {
    let db = TestDb::new(Engine::Mysql).await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_a.sql", "CREATE TABLE a (id INT);\n");
    write(dir.path(), "0002_b.sql", "CREATE TABLE b (id INT);\n");
    write(dir.path(), "0003_rows.sql", "INSERT INTO a VALUES (1);\n");
    let local = load(dir.path());
    let ctx = RecordContext { batch: 1, actor: "t@h".into() };

    let mut b = backend(&db.url).await;
    b.ensure_history().await.unwrap();
    b.apply(&local[0], &ctx).await.unwrap();
    // 0001's finish waits for the next commit; to others it is still `running`.
    assert_eq!(q(&db, "SELECT state FROM kiln_history WHERE version = 1").await, ["running"]);
    b.apply(&local[1], &ctx).await.unwrap();
    assert_eq!(q(&db, "SELECT GROUP_CONCAT(state ORDER BY version) FROM kiln_history").await, ["applied,running"]);
    // Our own connection already sees it applied.
    let own = b.read_history().await.unwrap().unwrap();
    assert!(own.iter().all(|a| a.state == State::Applied));
    b.apply(&local[2], &ctx).await.unwrap();
    // The process dies before anything commits 0003's finish: its DML body is
    // rolled back with it, and the `running` entry blocks the next run.
    drop(b);
    let mut state = Vec::new();
    for _ in 0..50 {
        state = q(&db, "SELECT GROUP_CONCAT(state ORDER BY version) FROM kiln_history").await;
        if state == ["applied,applied,running"] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(state, ["applied,applied,running"]);
    assert_eq!(q(&db, "SELECT COUNT(*) FROM a").await, ["0"]);
    let mut b = backend(&db.url).await;
    let err = up(&mut *b, &local).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("0003") && msg.contains("running") && msg.contains("interrupted") && msg.contains("kiln repair 0003"), "{msg}");
    Runner::new(&mut *b, settings()).repair(&local, Some(&v("0003")), false, "re-run").await.unwrap();
    up(&mut *b, &local).await.unwrap();
    assert_eq!(q(&db, "SELECT COUNT(*) FROM a").await, ["1"]);
    assert_eq!(q(&db, "SELECT GROUP_CONCAT(state ORDER BY version) FROM kiln_history").await, ["applied,applied,applied"]);
}

#[tokio::test]
async fn transaction_off_records_partial_failures() {
    let db = TestDb::new(Engine::Mysql).await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_t.sql", "CREATE TABLE t (id INT PRIMARY KEY);\n");
    write(dir.path(), "0002_rows.sql", "-- kiln:transaction off\n-- kiln:up\nINSERT INTO t VALUES (1);\nINSERT INTO t VALUES (1);\n");
    let local = load(dir.path());
    let mut b = backend(&db.url).await;
    let err = up(&mut *b, &local).await.unwrap_err();
    let RunError::Migration { outcome, error, .. } = &err else { panic!("{err}") };
    assert_eq!(*outcome, FailureOutcome::RecordedFailed);
    assert!(error.message.contains("transaction off"), "{}", error.message);
    assert_eq!(q(&db, "SELECT COUNT(*) FROM t").await, ["1"]);
    assert_eq!(q(&db, "SELECT state FROM kiln_history WHERE version = 2").await, ["failed"]);
}

#[tokio::test]
async fn read_history_on_a_fresh_database_creates_nothing() {
    let db = TestDb::new(Engine::Mysql).await;
    let mut b = backend(&db.url).await;
    assert!(b.read_history().await.unwrap().is_none());
    let count = format!("SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = '{}'", db.name);
    assert_eq!(q(&db, &count).await, ["0"]);
    b.ensure_history().await.unwrap();
    b.ensure_history().await.unwrap();
    assert_eq!(b.read_history().await.unwrap().unwrap().len(), 0);
    assert_eq!(q(&db, &count).await, ["3"], "history, log and snapshot tables");
    assert_eq!(q(&db, &format!("SELECT DISTINCT ENGINE FROM information_schema.TABLES WHERE TABLE_SCHEMA = '{}'", db.name)).await, ["InnoDB"]);
}

#[tokio::test]
async fn custom_table_names_upsert_and_baseline() {
    let db = TestDb::new(Engine::Mysql).await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_one.sql", "CREATE TABLE one (id INT);\n");
    write(dir.path(), "0002_two.sql", "CREATE TABLE two (id INT);\n");
    let local = load(dir.path());
    let mut cfg = BackendConfig::new(&db.url);
    cfg.history_table = "app`changelog".into();
    cfg.log_table = "app_events".into();
    let mut b = kiln_testkit::compat::Protocol::boxed(kiln_sql::connect(&cfg).await.unwrap());
    Runner::new(&mut *b, settings()).baseline(&local, &v("0001"), Some("existed before kiln")).await.unwrap();
    up(&mut *b, &local).await.unwrap();
    assert_eq!(q(&db, "SELECT CONCAT(version, ' ', state) FROM `app``changelog` ORDER BY version").await, ["1 baseline", "2 applied"]);
    assert_eq!(tables(&db).await, ["app_events", "app`changelog", "two"]);
    // Upsert replaces by version.
    let mut e = b.read_history().await.unwrap().unwrap().remove(1);
    e.description = "renamed".into();
    b.upsert_history(&[e]).await.unwrap();
    assert_eq!(q(&db, "SELECT description FROM `app``changelog` WHERE version = 2").await, ["renamed"]);
    b.delete_history(2).await.unwrap();
    assert_eq!(q(&db, "SELECT COUNT(*) FROM `app``changelog`").await, ["1"]);
}

#[tokio::test]
async fn lock_contention_names_the_holder_and_dies_with_the_session() {
    let db = TestDb::new(Engine::Mysql).await;
    let mut a = backend(&db.url).await;
    let mut b = backend(&db.url).await;
    assert!(a.try_lock().await.unwrap());
    assert!(a.try_lock().await.unwrap(), "re-taking our own lock must not block");
    assert!(!b.try_lock().await.unwrap());
    let lock = format!("kiln:{}:kiln_history", db.name);
    let holder_id = q(&db, &format!("SELECT IS_USED_LOCK('{lock}')")).await;
    match b.lock(Duration::from_millis(500)).await {
        Err(e @ EngineError::LockTimeout { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&format!("MySQL connection {} (root@", holder_id[0])), "{msg}");
        }
        other => panic!("expected a lock time-out, got {other:?}"),
    }
    // A runner on `b` waits its lock_timeout, then gives up and changes nothing.
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_t.sql", "CREATE TABLE t (id INT);\n");
    let local = load(dir.path());
    assert!(matches!(up(&mut *b, &local).await, Err(RunError::Engine(EngineError::LockTimeout { .. }))));
    assert!(tables(&db).await.is_empty());

    // The session dying (process exit) releases the lock: drop `a` …
    drop(a);
    b.lock(Duration::from_secs(5)).await.expect("the lock dies with its session");
    b.unlock().await.unwrap();
    b.unlock().await.unwrap(); // releasing twice is fine
    assert_eq!(q(&db, &format!("SELECT IS_FREE_LOCK('{lock}')")).await, ["1"]);

    // … or kill a holder's connection, as a crashed host would.
    let mut c = backend(&db.url).await;
    assert!(c.try_lock().await.unwrap());
    let id = q(&db, &format!("SELECT IS_USED_LOCK('{lock}')")).await;
    db.sql(&format!("KILL {}", id[0])).await.unwrap();
    b.lock(Duration::from_secs(5)).await.expect("a killed holder never blocks");
    drop(c);
}

#[tokio::test]
async fn urls_and_connection_errors() {
    let db = TestDb::new(Engine::Mysql).await;
    let mut u = url::Url::parse(&db.url).unwrap();

    // No database.
    let mut no_db = u.clone();
    no_db.set_path("");
    let _ = no_db.set_password(Some("s3cret"));
    match kiln_sql::connect(&BackendConfig::new(no_db.as_str())).await {
        Err(e @ EngineError::BadUrl { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("no database") && !msg.contains("s3cret"), "{msg}");
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("connected without a database"),
    }
    // Wrong password: the server's reason, never the password.
    let mut bad_pw = u.clone();
    bad_pw.set_password(Some("wrong-s3cret")).unwrap();
    match kiln_sql::connect(&BackendConfig::new(bad_pw.as_str())).await {
        Err(e @ EngineError::Connect { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("1045") && !msg.contains("wrong-s3cret") && msg.contains("***"), "{msg}");
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("connected with a wrong password"),
    }
    // Nothing listening.
    let mut closed = u.clone();
    closed.set_port(Some(1)).unwrap();
    assert!(matches!(kiln_sql::connect(&BackendConfig::new(closed.as_str())).await, Err(EngineError::Connect { .. })));
    // A database that does not exist.
    let mut missing = u.clone();
    missing.set_path("/kiln_no_such_db");
    match kiln_sql::connect(&BackendConfig::new(missing.as_str())).await {
        Err(EngineError::Connect { message, .. }) => assert!(message.contains("1049"), "{message}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("connected to a missing database"),
    }

    // mariadb:// works, and so does a Unix socket.
    u.set_scheme("mariadb").unwrap();
    let mut m = kiln_testkit::compat::Protocol::boxed(kiln_sql::connect(&BackendConfig::new(u.as_str())).await.unwrap());
    assert!(m.read_history().await.unwrap().is_none());
    assert_eq!(m.capabilities().engine, "mysql");
    assert!(!m.capabilities().transactional_ddl);
    let socket = format!("mysql://root@localhost/{}?socket=/run/mysqld/mysqld.sock", db.name);
    let mut s = kiln_testkit::compat::Protocol::boxed(kiln_sql::connect(&BackendConfig::new(&socket)).await.unwrap());
    s.ensure_history().await.unwrap();
    assert_eq!(s.read_history().await.unwrap().unwrap().len(), 0);
}

#[tokio::test]
async fn non_sql_bodies_are_unsupported() {
    let db = TestDb::new(Engine::Mysql).await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_index.yaml", "up:\n  - createIndexes: users\n    indexes: [{ key: { a: 1 }, name: a_1 }]\n");
    let local = load(dir.path());
    let mut b = backend(&db.url).await;
    b.ensure_history().await.unwrap();
    let ctx = RecordContext { batch: 1, actor: "t@h".into() };
    match b.apply(&local[0], &ctx).await {
        Err(StepError::Engine(EngineError::Refused(m))) => assert!(m.contains("0001_index.yaml"), "{m}"),
        Err(StepError::Engine(e)) => panic!("{e}"),
        Err(StepError::Body(e)) => panic!("{}", e.error),
        Err(StepError::Invalid { violations, .. }) => panic!("{violations:?}"),
        Ok(()) => panic!("a MongoDB migration ran on MySQL"),
    }
    assert_eq!(q(&db, "SELECT COUNT(*) FROM kiln_history").await, ["0"]);
}

// ---------------------------------------------------------------------------
// Schema contracts: inspection, snapshots, checked migrations, scratch databases.

fn contract(yaml: &str) -> Contract {
    Contract::parse(yaml, "schema.yaml").expect("contract parses")
}

async fn up_with(b: &mut dyn Backend, local: &[Migration], c: &Contract) -> Result<kiln_core::RunReport, RunError> {
    Runner::new(b, settings()).with_contract(Some(Arc::new(c.clone()))).up(local, &UpTarget::Latest, &Policy::default(), false).await
}

fn col(t: &str, nullable: bool) -> ColumnInfo {
    ColumnInfo { data_type: t.into(), nullable }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn constraint(kind: &str, columns: &[&str], definition: Option<&str>) -> ConstraintInfo {
    ConstraintInfo { kind: kind.into(), columns: strings(columns), definition: definition.map(str::to_string) }
}

/// `version:state` of every history entry.
async fn history(db: &TestDb) -> Vec<String> {
    q(db, "SELECT CONCAT(version, ':', state) FROM kiln_history ORDER BY version").await
}

/// `event[:version]` of every log entry, in order.
async fn events(db: &TestDb) -> Vec<String> {
    q(db, "SELECT CONCAT(event, COALESCE(CONCAT(':', version), '')) FROM kiln_log ORDER BY id").await
}

/// Column names of `table`, in order.
async fn columns(db: &TestDb, table: &str) -> Vec<String> {
    q(
        db,
        &format!(
            "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = '{}' AND TABLE_NAME = '{table}' ORDER BY ORDINAL_POSITION",
            db.name
        ),
    )
    .await
}

#[tokio::test]
async fn inspect_reports_columns_indexes_and_constraints_without_kilns_tables() {
    let db = TestDb::new(Engine::Mysql).await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "0001_schema.sql",
        "CREATE TABLE users (id BIGINT AUTO_INCREMENT PRIMARY KEY, email VARCHAR(255) NOT NULL, name TEXT, active TINYINT(1) NOT NULL DEFAULT 1,\n\
         visits INT UNSIGNED, CONSTRAINT users_email_key UNIQUE (email), CONSTRAINT users_name_len CHECK (CHAR_LENGTH(name) < 100));\n\
         CREATE TABLE posts (id BIGINT PRIMARY KEY, user_id BIGINT NOT NULL, title VARCHAR(200) NOT NULL, body TEXT, score DECIMAL(10, 2),\n\
         CONSTRAINT posts_user_fk FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE CASCADE);\n\
         CREATE INDEX posts_title_prefix ON posts (title(20), id DESC);\n\
         CREATE FULLTEXT INDEX posts_body_ft ON posts (body);\n\
         CREATE TABLE tags (post_id BIGINT NOT NULL, tag VARCHAR(50) NOT NULL, PRIMARY KEY (post_id, tag),\n\
         CONSTRAINT tags_post FOREIGN KEY (post_id) REFERENCES posts (id) ON UPDATE CASCADE ON DELETE NO ACTION, UNIQUE INDEX tags_tag (tag, post_id));\n\
         CREATE VIEW recent_posts AS SELECT * FROM posts;\n",
    );
    let local = load(dir.path());
    let mut b = backend(&db.url).await;
    up(&mut *b, &local).await.unwrap();

    let s = b.inspect().await.unwrap();
    assert_eq!(s.objects.keys().collect::<Vec<_>>(), ["posts", "tags", "users"], "no kiln tables, no views");

    let users = &s.objects["users"];
    assert_eq!(
        users.columns.iter().map(|(k, v)| (k.as_str(), v.clone())).collect::<Vec<_>>(),
        [
            ("active", col("tinyint(1)", false)),
            ("email", col("varchar(255)", false)),
            ("id", col("bigint", false)),
            ("name", col("text", true)),
            ("visits", col("int unsigned", true)),
        ],
        "integer display widths are dropped, as MySQL 8 reports them"
    );
    // The unique index behind the PRIMARY KEY and the UNIQUE constraint is reported once, as the constraint.
    assert!(users.indexes.is_empty(), "{:?}", users.indexes);
    assert_eq!(users.constraints["PRIMARY"], constraint("primary key", &["id"], None));
    assert_eq!(users.constraints["users_email_key"], constraint("unique", &["email"], None));
    let check = &users.constraints["users_name_len"];
    assert_eq!(check.kind, "check");
    assert!(check.definition.as_deref().is_some_and(|d| d.starts_with("CHECK (") && d.contains("100")), "{check:?}");
    assert_eq!(users.constraints.len(), 3, "{:?}", users.constraints);

    let posts = &s.objects["posts"];
    assert_eq!(posts.columns["score"], col("decimal(10,2)", true));
    assert_eq!(
        posts.constraints["posts_user_fk"],
        constraint("foreign key", &["user_id"], Some("references users (id) on update restrict on delete cascade"))
    );
    assert_eq!(
        posts.indexes["posts_title_prefix"],
        IndexInfo { columns: strings(&["title", "id"]), unique: false, options: Some("keys (title(20), id desc)".into()) }
    );
    assert_eq!(posts.indexes["posts_body_ft"], IndexInfo { columns: strings(&["body"]), unique: false, options: Some("using fulltext".into()) });
    // InnoDB's own index for the foreign key is an index like any other.
    assert_eq!(posts.indexes["posts_user_fk"], IndexInfo { columns: strings(&["user_id"]), unique: false, options: None });
    assert_eq!(posts.indexes.len(), 3, "{:?}", posts.indexes);

    let tags = &s.objects["tags"];
    assert_eq!(
        tags.constraints.iter().map(|(k, v)| (k.as_str(), v.clone())).collect::<Vec<_>>(),
        [
            ("PRIMARY", constraint("primary key", &["post_id", "tag"], None)),
            ("tags_post", constraint("foreign key", &["post_id"], Some("references posts (id) on update cascade on delete no action"))),
            ("tags_tag", constraint("unique", &["tag", "post_id"], None)),
        ]
    );
    assert!(tags.indexes.is_empty(), "the primary key serves the foreign key: {:?}", tags.indexes);

    // A contract can ask for constraints and indexes by name or by columns.
    let c = contract(
        "tables:\n  users:\n    required: [{name: id, type: bigint}, {name: email, type: varchar(255), nullable: false}, {name: active, type: boolean}]\n\
         \x20   unique: [users_email_key, [email]]\n\
         \x20 posts:\n    required: [id, user_id]\n    indexes: [posts_title_prefix, [user_id], PRIMARY]\n",
    );
    assert_eq!(schema::validate(&c, &s), vec![]);
    assert_eq!(schema::validate(&schema::dump(&s, false), &s), vec![]);
    // Another session reads exactly the same schema, so a stored snapshot shows no drift.
    assert_eq!(backend(&db.url).await.inspect().await.unwrap(), s);
}

#[tokio::test]
async fn snapshots_round_trip_and_keep_history() {
    let db = TestDb::new(Engine::Mysql).await;
    let mut b = backend(&db.url).await;
    // A database kiln never touched: no snapshot, and nothing gets created by asking.
    assert_eq!(b.load_snapshot().await.unwrap(), None);
    assert_eq!(b.inspect().await.unwrap(), Snapshot::default());
    let all = format!("SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = '{}' ORDER BY TABLE_NAME", db.name);
    assert!(q(&db, &all).await.is_empty());

    db.sql("CREATE TABLE items (id INT PRIMARY KEY, sku VARCHAR(40) NOT NULL)").await.unwrap();
    let first = b.inspect().await.unwrap();
    // Saved without ensure_history: the table is created on demand.
    b.save_snapshot(&first).await.unwrap();
    assert_eq!(b.load_snapshot().await.unwrap(), Some(first.clone()));
    assert_eq!(q(&db, &all).await, ["items", "kiln_snapshot"]);
    assert_eq!(b.inspect().await.unwrap(), first, "kiln_snapshot is not part of the schema");

    db.sql("CREATE INDEX items_sku ON items (sku)").await.unwrap();
    let second = b.inspect().await.unwrap();
    assert_ne!(first, second);
    b.save_snapshot(&second).await.unwrap();
    assert_eq!(b.load_snapshot().await.unwrap(), Some(second), "the newest wins");
    assert_eq!(q(&db, "SELECT COUNT(*) FROM kiln_snapshot").await, ["2"], "older snapshots are kept");

    // After a run the stored snapshot is the live schema (written with the run's
    // last commit); a hand-made change is drift.
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_users.sql", "CREATE TABLE users (id INT PRIMARY KEY, email VARCHAR(100) NOT NULL);\n");
    write(dir.path(), "0002_posts.sql", "CREATE TABLE posts (id INT PRIMARY KEY, body TEXT, title TEXT);\nINSERT INTO posts VALUES (1, 'b', 't');\n");
    up(&mut *b, &load(dir.path())).await.unwrap();
    assert_eq!(q(&db, "SELECT COUNT(*) FROM kiln_snapshot").await, ["3"]);
    let mut fresh = backend(&db.url).await;
    assert_eq!(Runner::new(&mut *fresh, settings()).diff().await.unwrap(), Some(vec![]));
    db.sql("CREATE INDEX by_hand ON users (email, id); ALTER TABLE posts DROP COLUMN body").await.unwrap();
    let drift = Runner::new(&mut *fresh, settings()).diff().await.unwrap().unwrap();
    let shown: Vec<String> = drift.iter().map(|c| c.to_string()).collect();
    assert_eq!(shown, ["- posts: column body removed (text)", "+ users: index by_hand added ((email, id))"]);
}

#[tokio::test]
async fn a_migration_dropping_a_required_column_is_recorded_failed_and_blocks() {
    let db = TestDb::new(Engine::Mysql).await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_users.sql", "CREATE TABLE users (id BIGINT PRIMARY KEY, email VARCHAR(100) NOT NULL, nickname TEXT);\n");
    write(dir.path(), "0002_cleanup.sql", "CREATE TABLE audit (id INT);\nALTER TABLE users DROP COLUMN email;\nINSERT INTO audit VALUES (1);\n");
    write(dir.path(), "0003_more.sql", "CREATE TABLE more (id INT);\n");
    let local = load(dir.path());
    let c = contract("tables:\n  users:\n    required: [id, email]\n    optional: [nickname]\n");
    let mut b = backend(&db.url).await;

    let err = up_with(&mut *b, &local, &c).await.unwrap_err();
    let text = err.to_string();
    let RunError::Invalid { version, file, outcome, violations, done } = err else { panic!("expected a contract violation, got {err:?}") };
    assert_eq!((version.number, file.as_str(), outcome), (2, "0002_cleanup.sql", FailureOutcome::RecordedFailed));
    assert_eq!(done.iter().map(|v| v.number).collect::<Vec<_>>(), [1]);
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert_eq!((violations[0].object.as_str(), violations[0].message.as_str()), ("users", "required column email is missing"));
    assert!(text.contains("0002_cleanup.sql") && text.contains("email"), "{text}");

    // MySQL committed the DDL: it stays, all of the migration ran, and it is recorded
    // `failed` — never `applied`, not even for a moment, and with no `applied` event.
    assert_eq!(columns(&db, "users").await, ["id", "nickname"]);
    assert_eq!(tables(&db).await, ["audit", "users"]);
    assert_eq!(q(&db, "SELECT COUNT(*) FROM audit").await, ["1"]);
    assert_eq!(history(&db).await, ["1:applied", "2:failed"]);
    assert_eq!(events(&db).await, ["run-start", "applied:1", "failed:2", "run-end"]);
    let error = q(&db, "SELECT error FROM kiln_history WHERE version = 2").await;
    assert!(error[0].contains("required column email is missing") && error[0].contains("kiln repair 0002"), "{error:?}");

    // The next run is refused until the operator repairs.
    let blocked = up_with(&mut *b, &local, &c).await.unwrap_err();
    assert!(matches!(blocked, RunError::Plan(_)), "{blocked:?}");
    assert!(blocked.to_string().contains("kiln repair 0002"), "{blocked}");
    assert!(!tables(&db).await.contains(&"more".to_string()));

    // Put the column back by hand, repair, and the run goes on.
    db.sql("ALTER TABLE users ADD COLUMN email VARCHAR(100) NOT NULL DEFAULT ''").await.unwrap();
    Runner::new(&mut *b, settings()).repair(&local, Some(&v("0002")), true, "email restored by hand").await.unwrap();
    let report = up_with(&mut *b, &local, &c).await.unwrap();
    assert_eq!(report.steps.len(), 1);
    assert_eq!(history(&db).await, ["1:applied", "2:applied", "3:applied"]);
}

#[tokio::test]
async fn a_dml_only_migration_that_leaves_the_contract_unmet_is_rolled_back() {
    let db = TestDb::new(Engine::Mysql).await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_users.sql", "CREATE TABLE users (id BIGINT PRIMARY KEY, email VARCHAR(100) NOT NULL);\n");
    write(dir.path(), "0002_seed.sql", "INSERT INTO users VALUES (1, 'a@x');\nINSERT INTO users VALUES (2, 'b@x');\n");
    let local = load(dir.path());
    let c = contract("tables:\n  users:\n    required: [id, email, phone]\n");
    let mut b = backend(&db.url).await;
    // 0001 makes progress towards the contract; only the last migration of a run must meet it.
    Runner::new(&mut *b, settings())
        .with_contract(Some(Arc::new(c.clone())))
        .up(&local, &UpTarget::To(v("0001")), &Policy::default(), false)
        .await
        .unwrap();

    let err = up_with(&mut *b, &local, &c).await.unwrap_err();
    let RunError::Invalid { version, outcome, violations, .. } = err else { panic!("{err:?}") };
    // Nothing of 0002 was committed by MySQL, so all of it is undone.
    assert_eq!((version.number, outcome), (2, FailureOutcome::RolledBack));
    assert!(violations[0].message.contains("phone"), "{violations:?}");
    assert_eq!(q(&db, "SELECT COUNT(*) FROM users").await, ["0"]);
    assert_eq!(history(&db).await, ["1:applied"]);
    assert_eq!(events(&db).await, ["run-start", "applied:1", "run-end", "run-start", "failed:2", "run-end"]);
}

#[tokio::test]
async fn inspect_of_a_thousand_tables_takes_milliseconds() {
    let db = TestDb::new(Engine::Mysql).await;
    // Each table: 5 columns, a primary key, a unique constraint, a foreign key
    // (with InnoDB's index for it), a check and a plain index. One statement
    // per table: MariaDB spends ~10 ms on each CREATE.
    let mut ddl = String::from("CREATE TABLE t0 (id INT PRIMARY KEY);\n");
    for i in 1..1000 {
        ddl.push_str(&format!(
            "CREATE TABLE t{i} (id BIGINT PRIMARY KEY, code VARCHAR(50) NOT NULL UNIQUE, parent_id INT, \
             amount DECIMAL(12, 2) CHECK (amount >= 0), created_at DATETIME NOT NULL, INDEX t{i}_created (created_at), \
             CONSTRAINT t{i}_parent FOREIGN KEY (parent_id) REFERENCES t0 (id));\n"
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_thousand_tables.sql", &ddl);
    let mut b = backend(&db.url).await;
    up(&mut *b, &load(dir.path())).await.unwrap();

    let t = Instant::now();
    let s = b.inspect().await.unwrap();
    let took = t.elapsed();
    println!("inspect of {} tables took {took:?}", s.objects.len());
    let t = Instant::now();
    assert_eq!(b.inspect().await.unwrap(), s);
    println!("again, warm: {:?}", t.elapsed());
    assert_eq!(s.objects.len(), 1000);
    let t500 = &s.objects["t500"];
    assert_eq!((t500.columns.len(), t500.indexes.len(), t500.constraints.len()), (5, 2, 4), "{t500:?}");
    assert_eq!(t500.constraints["t500_parent"].definition.as_deref(), Some("references t0 (id) on update restrict on delete restrict"));
    assert_eq!(t500.constraints["code"].columns, ["code"]);
    assert_eq!(t500.constraints["amount"].columns, ["amount"], "MariaDB names a column check after its column");
    assert!(took < Duration::from_secs(5), "inspect of 1,000 tables took {took:?}");
}

#[tokio::test]
async fn scratch_databases_are_created_and_dropped_by_name() {
    let db = TestDb::new(Engine::Mysql).await;
    db.sql(&format!("ALTER DATABASE `{}` CHARACTER SET latin1 COLLATE latin1_swedish_ci", db.name)).await.unwrap();
    // Over the Unix socket: the scratch URL must keep `?socket=`.
    let mut u = url::Url::parse(&db.url).unwrap();
    u.set_query(Some("socket=/run/mysqld/mysqld.sock"));
    let mut b = kiln_testkit::compat::Protocol::boxed(kiln_sql::connect(&BackendConfig::new(u.to_string())).await.unwrap());
    let name = kiln_testkit::unique_name("kiln_verify");
    let schema_of = |name: String| {
        let db = &db;
        async move {
            db.query_strings(&format!("SELECT DEFAULT_COLLATION_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = '{name}'")).await.unwrap()
        }
    };

    let url = b.create_scratch(&name).await.unwrap();
    let mut expected = u.clone();
    expected.set_path(&format!("/{name}"));
    assert_eq!(url, expected.to_string(), "same server, user and options; another database");
    assert_eq!(schema_of(name.clone()).await, ["latin1_swedish_ci"], "the configured database's character set and collation");
    // It is empty and usable.
    let mut scratch = backend(&url).await;
    assert!(scratch.inspect().await.unwrap().objects.is_empty());
    assert!(scratch.read_history().await.unwrap().is_none());
    scratch.close().await.unwrap();
    b.drop_scratch(&name).await.unwrap();
    assert!(schema_of(name.clone()).await.is_empty());
    b.drop_scratch(&name).await.unwrap(); // already gone: not an error

    // Only kiln's scratch names, never anything else.
    for other in ["mysql", db.name.as_str(), "kiln_verify_x`; DROP DATABASE mysql; --"] {
        let err = b.drop_scratch(other).await.unwrap_err();
        assert!(matches!(err, EngineError::Refused(_)) && err.to_string().contains("kiln_verify_"), "{err}");
        assert!(b.create_scratch(other).await.is_err());
    }
    assert_eq!(schema_of(db.name.clone()).await.len(), 1);
}
