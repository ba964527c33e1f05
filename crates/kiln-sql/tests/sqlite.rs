//! The SQLite engine on real database files, driven through `kiln_core::Runner`.
//! Every test gets its own file (kiln-testkit) and checks what is really in it
//! with the `sqlite3` shell, not only what kiln reports.

use std::path::Path;
use std::time::Duration;

use kiln_core::split::Dialect;
use kiln_core::{
    load_dir, Backend, BackendConfig, DownTarget, EngineError, FailureOutcome, LoadOptions, Migration, Policy, RecordContext, RunError,
    Runner, RunnerSettings, StepError, UpTarget, Version,
};
use kiln_testkit::{Engine, TestDb};

fn write(dir: &Path, name: &str, content: &str) {
    std::fs::write(dir.join(name), content).unwrap();
}

fn load(dir: &Path) -> Vec<Migration> {
    load_dir(dir, &LoadOptions { dialect: Dialect::SQLITE, name_rule: None }).unwrap()
}

async fn backend(url: &str) -> Box<dyn Backend> {
    kiln_sql::connect(&BackendConfig::new(url)).await.unwrap()
}

fn settings() -> RunnerSettings {
    RunnerSettings { lock_timeout: Duration::from_millis(500), actor: "tester@testhost".into() }
}

async fn up(b: &mut dyn Backend, local: &[Migration]) -> Result<kiln_core::RunReport, RunError> {
    Runner::new(b, settings()).up(local, &UpTarget::Latest, &Policy::default(), false).await
}

async fn q(db: &TestDb, sql: &str) -> Vec<String> {
    db.query_strings(sql).await.unwrap()
}

fn v(s: &str) -> Version {
    Version::parse_arg(s).unwrap()
}

#[tokio::test]
async fn up_status_down_and_up_again() {
    let db = TestDb::new(Engine::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "0001_create_users.sql",
        "-- kiln:up\nCREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT NOT NULL);\n-- kiln:down\nDROP TABLE users;\n",
    );
    write(
        dir.path(),
        "0002_seed_users.sql",
        "-- kiln:up\nINSERT INTO users (email) VALUES ('a@x');\nINSERT INTO users (email) VALUES ('b@x');\nCREATE UNIQUE INDEX users_email ON users (email);\n-- kiln:down\nDROP INDEX users_email;\nDELETE FROM users;\n",
    );
    write(dir.path(), "0003_create_posts.up.sql", "CREATE TABLE posts (id INTEGER PRIMARY KEY, user_id INTEGER REFERENCES users (id));\n");
    write(dir.path(), "0003_create_posts.down.sql", "DROP TABLE posts;\n");
    let local = load(dir.path());
    let mut b = backend(&db.url).await;

    // First batch: up to 0002.
    let r = Runner::new(&mut *b, settings()).up(&local, &UpTarget::To(v("0002")), &Policy::default(), false).await.unwrap();
    assert_eq!(r.batch, Some(1));
    assert_eq!(r.steps.len(), 2);
    // Second batch: the rest.
    let r = up(&mut *b, &local).await.unwrap();
    assert_eq!((r.batch, r.steps.len()), (Some(2), 1));

    assert_eq!(q(&db, "SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ('users', 'posts') ORDER BY name").await, ["posts", "users"]);
    assert_eq!(q(&db, "SELECT count(*) FROM users").await, ["2"]);
    assert_eq!(
        q(&db, "SELECT version || ' ' || state || ' ' || batch || ' ' || applied_by FROM kiln_history ORDER BY version").await,
        ["1 applied 1 tester@testhost", "2 applied 1 tester@testhost", "3 applied 2 tester@testhost"]
    );
    // RFC 3339, UTC, milliseconds.
    let at = q(&db, "SELECT applied_at FROM kiln_history WHERE version = 3").await;
    assert!(at[0].len() == 24 && at[0].ends_with('Z') && at[0].as_bytes()[19] == b'.', "{at:?}");
    assert_eq!(q(&db, "SELECT count(*) FROM kiln_log WHERE event = 'applied'").await, ["3"]);
    assert_eq!(q(&db, "SELECT count(*) FROM kiln_log WHERE event IN ('run-start', 'run-end')").await, ["4"]);

    let status = Runner::new(&mut *b, settings()).status(&local).await.unwrap();
    assert_eq!(status.len(), 3);
    let history = b.read_history().await.unwrap().unwrap();
    assert_eq!(history.len(), 3);
    assert!(history.iter().all(|a| a.state == kiln_core::State::Applied && a.error.is_none()));
    assert_eq!(history[1].checksum, local[1].checksum);

    // down reverts the last batch only.
    let r = Runner::new(&mut *b, settings()).down(&local, &DownTarget::LastBatch, false).await.unwrap();
    assert_eq!(r.steps.len(), 1);
    assert_eq!(q(&db, "SELECT name FROM sqlite_master WHERE name = 'posts'").await, Vec::<String>::new());
    assert_eq!(q(&db, "SELECT group_concat(version) FROM kiln_history").await, ["1,2"]);
    // … and the batch before it.
    let r = Runner::new(&mut *b, settings()).down(&local, &DownTarget::LastBatch, false).await.unwrap();
    assert_eq!(r.steps.len(), 2);
    assert_eq!(r.steps[0].version, "0002", "newest first");
    assert_eq!(q(&db, "SELECT count(*) FROM sqlite_master WHERE name IN ('users', 'posts', 'users_email')").await, ["0"]);
    assert_eq!(q(&db, "SELECT count(*) FROM kiln_history").await, ["0"]);
    assert_eq!(q(&db, "SELECT count(*) FROM kiln_log WHERE event = 'reverted'").await, ["3"]);

    // Up again from nothing.
    let r = up(&mut *b, &local).await.unwrap();
    assert_eq!(r.steps.len(), 3);
    assert_eq!(q(&db, "SELECT count(*) FROM users").await, ["2"]);
    assert_eq!(q(&db, "SELECT count(*) FROM kiln_history WHERE state = 'applied'").await, ["3"]);
    // Nothing pending: a no-op.
    assert!(up(&mut *b, &local).await.unwrap().steps.is_empty());
    b.close().await.unwrap();
}

#[tokio::test]
async fn failure_mid_batch_rolls_back_the_migration_and_keeps_earlier_ones() {
    let db = TestDb::new(Engine::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_create_a.sql", "CREATE TABLE a (id INTEGER);\n");
    write(dir.path(), "0002_broken.sql", "CREATE TABLE b (id INTEGER);\nINSERT INTO b VALUES (1);\n\nINSERT INTO nope VALUES (1);\n");
    write(dir.path(), "0003_after.sql", "CREATE TABLE c (id INTEGER);\n");
    let local = load(dir.path());
    let mut b = backend(&db.url).await;

    let err = up(&mut *b, &local).await.unwrap_err();
    match &err {
        RunError::Migration { version, outcome, error, done } => {
            assert_eq!(version.text, "0002");
            assert_eq!(*outcome, FailureOutcome::RolledBack);
            assert_eq!((error.statement, error.line), (3, 4));
            assert_eq!(error.file, "0002_broken.sql");
            assert!(error.message.contains("no such table: nope"), "{}", error.message);
            assert_eq!(error.code.as_deref(), Some("1"));
            assert_eq!(done.iter().map(|v| v.number).collect::<Vec<_>>(), [1]);
        }
        other => panic!("expected a migration failure, got {other}"),
    }
    // Nothing of 0002 remains, 0001 is applied, 0003 never ran.
    assert_eq!(q(&db, "SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ('a', 'b', 'c')").await, ["a"]);
    assert_eq!(q(&db, "SELECT version || ' ' || state FROM kiln_history").await, ["1 applied"]);
    let failed = q(&db, "SELECT version || ' ' || detail FROM kiln_log WHERE event = 'failed'").await;
    assert_eq!(failed.len(), 1);
    assert!(failed[0].starts_with("2 0002_broken.sql: statement 3 (line 4) failed: no such table: nope"), "{failed:?}");

    // Nothing blocks: fix the file and run again.
    write(dir.path(), "0002_broken.sql", "CREATE TABLE b (id INTEGER);\nINSERT INTO b VALUES (1);\n");
    let local = load(dir.path());
    let r = up(&mut *b, &local).await.unwrap();
    assert_eq!(r.steps.len(), 2);
    assert_eq!(q(&db, "SELECT count(*) FROM b").await, ["1"]);
}

#[tokio::test]
async fn triggers_and_comments_with_semicolons() {
    let db = TestDb::new(Engine::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "0001_audit.sql",
        r#"-- kiln:up
-- a comment; with a semicolon
CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT); /* and here ; too */
CREATE TABLE audit (item_id INTEGER, note TEXT);
CREATE TRIGGER items_audit AFTER INSERT ON items
BEGIN
  INSERT INTO audit VALUES (new.id, 'created; ok');
  UPDATE audit SET note = note || '!' WHERE item_id = new.id;
END;
INSERT INTO items (name) VALUES ('x;y');
-- kiln:down
DROP TRIGGER items_audit;
DROP TABLE audit;
DROP TABLE items;
"#,
    );
    let local = load(dir.path());
    assert_eq!(local[0].up.len(), 4);
    let mut b = backend(&db.url).await;
    up(&mut *b, &local).await.unwrap();
    assert_eq!(q(&db, "SELECT note FROM audit").await, ["created; ok!"]);
    assert_eq!(q(&db, "SELECT name FROM items").await, ["x;y"]);
    Runner::new(&mut *b, settings()).down(&local, &DownTarget::LastBatch, false).await.unwrap();
    assert_eq!(q(&db, "SELECT count(*) FROM sqlite_master WHERE name <> 'kiln_history' AND name <> 'kiln_log'").await, ["0"]);
}

#[tokio::test]
async fn transaction_control_in_a_body_is_refused_before_anything_runs() {
    let db = TestDb::new(Engine::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_manual_tx.sql", "CREATE TABLE a (id INTEGER);\nCOMMIT;\nCREATE TABLE b (id INTEGER);\n");
    let local = load(dir.path());
    let mut b = backend(&db.url).await;
    match up(&mut *b, &local).await.unwrap_err() {
        RunError::Migration { outcome, error, .. } => {
            assert_eq!(outcome, FailureOutcome::RolledBack);
            assert_eq!(error.statement, 2);
            assert!(error.message.contains("kiln:transaction off"), "{}", error.message);
        }
        other => panic!("{other}"),
    }
    assert_eq!(q(&db, "SELECT count(*) FROM sqlite_master WHERE name IN ('a', 'b')").await, ["0"]);
    assert_eq!(q(&db, "SELECT count(*) FROM kiln_history").await, ["0"]);
}

#[tokio::test]
async fn transaction_off_runs_outside_a_transaction_and_records_partial_failures() {
    let db = TestDb::new(Engine::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_table.sql", "CREATE TABLE t (id INTEGER);\n");
    // VACUUM cannot run inside a transaction.
    write(dir.path(), "0002_vacuum.sql", "-- kiln:transaction off\n-- kiln:up\nINSERT INTO t VALUES (1);\nVACUUM;\n");
    write(dir.path(), "0003_partial.sql", "-- kiln:transaction off\n-- kiln:up\nINSERT INTO t VALUES (2);\nINSERT INTO missing VALUES (3);\n");
    let local = load(dir.path());
    let mut b = backend(&db.url).await;
    let err = up(&mut *b, &local).await.unwrap_err();
    let RunError::Migration { version, outcome, error, done } = &err else { panic!("{err}") };
    assert_eq!((version.text.as_str(), *outcome), ("0003", FailureOutcome::RecordedFailed));
    assert_eq!(done.len(), 2);
    assert!(error.message.contains("kiln repair 0003"), "{}", error.message);
    // Statement 1 of 0003 committed on its own; the entry records the failure.
    assert_eq!(q(&db, "SELECT group_concat(id) FROM t").await, ["1,2"]);
    assert_eq!(
        q(&db, "SELECT state || ' ' || error_statement || ' ' || error_line FROM kiln_history WHERE version = 3").await,
        ["failed 2 4"]
    );

    // The next run is refused, naming the version and `kiln repair`.
    let err = up(&mut *b, &local).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, RunError::Plan(_)), "{msg}");
    assert!(msg.contains("0003") && msg.contains("kiln repair 0003"), "{msg}");

    // The operator fixes the database and the file, then repairs.
    db.sql("DELETE FROM t WHERE id = 2").await.unwrap();
    write(dir.path(), "0003_partial.sql", "-- kiln:transaction off\n-- kiln:up\nINSERT INTO t VALUES (2);\n");
    let local = load(dir.path());
    Runner::new(&mut *b, settings()).repair(&local, Some(&v("0003")), false, "fixed by hand").await.unwrap();
    assert_eq!(q(&db, "SELECT count(*) FROM kiln_log WHERE event = 'repair' AND reason = 'fixed by hand'").await, ["1"]);
    up(&mut *b, &local).await.unwrap();
    assert_eq!(q(&db, "SELECT group_concat(state) FROM kiln_history").await, ["applied,applied,applied"]);
}

#[tokio::test]
async fn read_history_on_a_fresh_database_creates_nothing() {
    let db = TestDb::new(Engine::Sqlite).await;
    let mut b = backend(&db.url).await;
    assert!(b.read_history().await.unwrap().is_none());
    assert_eq!(q(&db, "SELECT count(*) FROM sqlite_master").await, ["0"]);
    b.ensure_history().await.unwrap();
    b.ensure_history().await.unwrap(); // idempotent
    assert_eq!(b.read_history().await.unwrap().unwrap().len(), 0);
    assert_eq!(q(&db, "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name").await, ["kiln_history", "kiln_log"]);
}

#[tokio::test]
async fn custom_table_names_and_baseline() {
    let db = TestDb::new(Engine::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_one.sql", "CREATE TABLE one (id INTEGER);\n");
    write(dir.path(), "0002_two.sql", "CREATE TABLE two (id INTEGER);\n");
    let local = load(dir.path());
    let mut cfg = BackendConfig::new(&db.url);
    cfg.history_table = "app \"changelog\"".into();
    cfg.log_table = "app_events".into();
    let mut b = kiln_sql::connect(&cfg).await.unwrap();
    Runner::new(&mut *b, settings()).baseline(&local, &v("0001"), Some("existed before kiln")).await.unwrap();
    up(&mut *b, &local).await.unwrap();
    assert_eq!(
        q(&db, "SELECT version || ' ' || state FROM \"app \"\"changelog\"\"\" ORDER BY version").await,
        ["1 baseline", "2 applied"]
    );
    // The baseline did not run 0001.
    assert_eq!(q(&db, "SELECT group_concat(name) FROM sqlite_master WHERE name IN ('one', 'two')").await, ["two"]);
    assert_eq!(q(&db, "SELECT count(*) FROM app_events WHERE event = 'baseline'").await, ["1"]);
}

#[tokio::test]
async fn lock_contention_names_the_holder_and_dies_with_the_holder() {
    let db = TestDb::new(Engine::Sqlite).await;
    let mut a = backend(&db.url).await;
    let mut b = backend(&db.url).await;
    assert!(a.try_lock().await.unwrap());
    assert!(a.try_lock().await.unwrap(), "re-taking our own lock must not block");
    assert!(!b.try_lock().await.unwrap());
    let holder = b.lock_holder().await.unwrap();
    assert!(holder.contains(&format!("pid {}", std::process::id())), "{holder}");
    match b.lock(Duration::from_millis(300)).await {
        Err(e @ EngineError::LockTimeout { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&format!("pid {}", std::process::id())) && msg.contains("-kiln.lock"), "{msg}");
        }
        other => panic!("expected a lock time-out, got {other:?}"),
    }
    // A runner on `b` gives up with the same error and changes nothing.
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_t.sql", "CREATE TABLE t (id INTEGER);\n");
    let local = load(dir.path());
    assert!(matches!(up(&mut *b, &local).await, Err(RunError::Engine(EngineError::LockTimeout { .. }))));
    assert_eq!(q(&db, "SELECT count(*) FROM sqlite_master").await, ["0"]);

    // Dropping the holder (as a process exit would) releases the lock.
    drop(a);
    assert!(b.try_lock().await.unwrap());
    b.unlock().await.unwrap();
    b.unlock().await.unwrap(); // releasing twice is fine
    let mut c = backend(&db.url).await;
    assert!(c.try_lock().await.unwrap());
    c.unlock().await.unwrap();
}

#[tokio::test]
async fn a_killed_process_never_keeps_the_lock() {
    let db = TestDb::new(Engine::Sqlite).await;
    let mut b = backend(&db.url).await;
    let lock_file = format!("{}-kiln.lock", db.name);
    // Another process takes the same OS lock (flock(1) uses flock(2), as std's
    // File::try_lock does on Linux) and keeps it in a single process (the shell
    // execs into sleep holding fd 9), so killing that process is a crash.
    let mut child = std::process::Command::new("sh")
        .args(["-c", r#"exec 9>>"$0" && flock 9 && exec sleep 30"#, &lock_file])
        .spawn()
        .expect("sh and flock(1) from util-linux");
    let mut held = false;
    for _ in 0..100 {
        if !b.try_lock().await.unwrap() {
            held = true;
            break;
        }
        b.unlock().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(held, "the other process never took the lock");
    child.kill().unwrap();
    child.wait().unwrap();
    b.lock(Duration::from_secs(5)).await.expect("the lock dies with its process");
}

#[tokio::test]
async fn non_sql_bodies_are_unsupported() {
    let db = TestDb::new(Engine::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_index.yaml", "up:\n  - createIndexes: users\n    indexes: [{ key: { a: 1 }, name: a_1 }]\n");
    let local = load(dir.path());
    let mut b = backend(&db.url).await;
    b.ensure_history().await.unwrap();
    let ctx = RecordContext { batch: 1, actor: "t@h".into() };
    match b.apply(&local[0], &ctx).await {
        Err(StepError::Engine(EngineError::Unsupported(m))) => assert!(m.contains("0001_index.yaml"), "{m}"),
        Err(StepError::Engine(e)) => panic!("{e}"),
        Err(StepError::Body(e)) => panic!("{}", e.error),
        Err(StepError::Invalid { violations, .. }) => panic!("{violations:?}"),
        Ok(()) => panic!("a MongoDB migration ran on SQLite"),
    }
    // The runner refuses the plan before it reaches the engine.
    assert!(matches!(up(&mut *b, &local).await, Err(RunError::Plan(_))));
}

#[tokio::test]
async fn urls_and_connection_errors() {
    // Bad URLs.
    for url in ["sqlite://", "sqlite:"] {
        match kiln_sql::connect(&BackendConfig::new(url)).await {
            Err(EngineError::BadUrl { .. }) => {}
            Err(e) => panic!("{url}: {e}"),
            Ok(_) => panic!("{url} connected"),
        }
    }
    // A directory that does not exist.
    match kiln_sql::connect(&BackendConfig::new("sqlite:///nonexistent-kiln-dir/x.db")).await {
        Err(EngineError::Connect { message, .. }) => assert!(message.contains("/nonexistent-kiln-dir"), "{message}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("connected"),
    }
    // A file that is not a database.
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, vec![b'x'; 4096]).unwrap();
    match kiln_sql::connect(&BackendConfig::new(format!("sqlite://{}", junk.display()))).await {
        Err(EngineError::Connect { message, .. }) => assert!(message.contains("not a database"), "{message}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("connected"),
    }
    // `sqlite:relative.db` creates the file relative to the working directory; use an absolute path here.
    let created = dir.path().join("new.db");
    let mut b = kiln_sql::connect(&BackendConfig::new(format!("sqlite:{}", created.display()))).await.unwrap();
    b.ensure_history().await.unwrap();
    assert!(created.exists());
    // In-memory databases work (tests only).
    let mut m = kiln_sql::connect(&BackendConfig::new("sqlite::memory:")).await.unwrap();
    assert!(m.try_lock().await.unwrap());
    m.ensure_history().await.unwrap();
    assert_eq!(m.read_history().await.unwrap().unwrap().len(), 0);
    assert_eq!(m.capabilities().engine, "sqlite");
    assert!(m.capabilities().transactional_ddl);
}
