//! The MySQL/MariaDB engine against the real server, driven through
//! `kiln_core::Runner`. Every test gets its own database (kiln-testkit) and
//! checks what is really in it from a separate connection.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

#[allow(unused_imports)]
use kiln_core::engine::{Engine as _, Locker as _};
use kiln_core::schema::Contract;
use kiln_core::split::Dialect;
use kiln_core::{
    load_dir, BackendConfig, DownTarget, FailureOutcome, LoadOptions, Migration, Policy, RecordContext, RunError, Runner, RunnerSettings, State,
    UpTarget, Version,
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

// ---------------------------------------------------------------------------
// Schema contracts: inspection, snapshots, checked migrations, scratch databases.

fn contract(yaml: &str) -> Contract {
    Contract::parse(yaml, "schema.yaml").expect("contract parses")
}

async fn up_with(b: &mut dyn Backend, local: &[Migration], c: &Contract) -> Result<kiln_core::RunReport, RunError> {
    Runner::new(b, settings()).with_contract(Some(Arc::new(c.clone()))).up(local, &UpTarget::Latest, &Policy::default(), false).await
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
