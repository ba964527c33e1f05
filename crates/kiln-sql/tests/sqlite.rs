//! The SQLite engine on real database files, driven through `kiln_core::Runner`.
//! Every test gets its own file (kiln-testkit) and checks what is really in it
//! with the `sqlite3` shell, not only what kiln reports.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[allow(unused_imports)]
use kiln_core::engine::{Engine as _, Locker as _};
use kiln_core::schema::{self, ColumnInfo, ConstraintInfo, Contract, IndexInfo, Snapshot};
use kiln_core::split::Dialect;
use kiln_core::{
    load_dir, BackendConfig, DownTarget, EngineError, FailureOutcome, LoadOptions, Migration, Policy, RecordContext, RunError, Runner,
    RunnerSettings, StepError, UpTarget, Version,
};
use kiln_testkit::compat::Backend;
use kiln_testkit::{Engine, TestDb};

fn write(dir: &Path, name: &str, content: &str) {
    std::fs::write(dir.join(name), content).unwrap();
}

fn load(dir: &Path) -> Vec<Migration> {
    load_dir(dir, &LoadOptions { dialect: Dialect::SQLITE, name_rule: None }).unwrap()
}

async fn backend(url: &str) -> Box<dyn Backend> {
    kiln_testkit::compat::Protocol::boxed(kiln_sql::connect(&BackendConfig::new(url)).await.unwrap())
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
    assert_eq!(q(&db, "SELECT count(*) FROM sqlite_master WHERE name NOT IN ('kiln_history', 'kiln_log', 'kiln_snapshot')").await, ["0"]);
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
    assert_eq!(q(&db, "SELECT state || ' ' || error_statement || ' ' || error_line FROM kiln_history WHERE version = 3").await, ["failed 2 4"]);

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
    assert_eq!(q(&db, "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name").await, ["kiln_history", "kiln_log", "kiln_snapshot"]);
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
    let mut b = kiln_testkit::compat::Protocol::boxed(kiln_sql::connect(&cfg).await.unwrap());
    Runner::new(&mut *b, settings()).baseline(&local, &v("0001"), Some("existed before kiln")).await.unwrap();
    up(&mut *b, &local).await.unwrap();
    assert_eq!(q(&db, "SELECT version || ' ' || state FROM \"app \"\"changelog\"\"\" ORDER BY version").await, ["1 baseline", "2 applied"]);
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
async fn a_lock_guard_dropped_without_release_frees_the_lock() {
    use kiln_core::engine::Locker;
    use kiln_sql::sqlite::SqliteEngine;

    let db = TestDb::new(Engine::Sqlite).await;
    let cfg = BackendConfig::new(&db.url);
    let mut a = SqliteEngine::connect(&cfg).await.unwrap();
    let mut b = SqliteEngine::connect(&cfg).await.unwrap();

    // An early return / panic: the guard is dropped, `release` never called,
    // and the engine that took the lock stays alive with its connection open.
    let guard = kiln_core::lock::acquire(&mut a, &db.url, Duration::from_millis(100), |_| {}).await.unwrap();
    assert!(!b.try_lock().await.unwrap(), "a holds the lock");
    drop(guard);
    let t = Instant::now();
    assert!(b.try_lock().await.unwrap(), "the dropped guard released a's lock");
    assert!(t.elapsed() < Duration::from_millis(100), "at once, without waiting");
    assert!(!a.try_lock().await.unwrap(), "a no longer holds it: b does");
    let holder = a.holder().await.unwrap();
    assert!(holder.contains(&format!("pid {}", std::process::id())), "{holder}");
    b.unlock().await.unwrap();

    // A cancelled future (a time-out) holding the guard releases it too.
    let held = async {
        let _guard = kiln_core::lock::acquire(&mut a, &db.url, Duration::from_millis(100), |_| {}).await.unwrap();
        std::future::pending::<()>().await
    };
    assert!(tokio::time::timeout(Duration::from_millis(50), held).await.is_err());
    assert!(b.try_lock().await.unwrap(), "the dropped future released a's lock");
    assert!(!a.try_lock().await.unwrap());
    b.unlock().await.unwrap();
    assert!(a.try_lock().await.unwrap(), "and a can take it again");
    a.unlock().await.unwrap();

    // A guard that outlives its engine: dropping the engine (its connection)
    // releases the lock, and the late guard does not touch the next holder's.
    let guard = kiln_core::lock::acquire(&mut a, &db.url, Duration::from_millis(100), |_| {}).await.unwrap();
    assert!(!b.try_lock().await.unwrap());
    drop(a);
    assert!(b.try_lock().await.unwrap(), "dropping the engine released the lock");
    drop(guard);
    let mut c = SqliteEngine::connect(&cfg).await.unwrap();
    assert!(!c.try_lock().await.unwrap(), "b still holds it");
    b.unlock().await.unwrap();
    assert!(c.try_lock().await.unwrap());
}

/// A migration that keeps SQLite busy for several seconds: 20 MB of rows (more
/// than the 512 KiB page cache, so a rollback-journal writer spills and locks
/// readers out), then a long computation inside the same transaction.
const SLOW_MIGRATION: &str = "INSERT INTO big (pad) SELECT randomblob(1000) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 20000) SELECT x FROM c);\n\
     CREATE TABLE slow AS WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 25000000) SELECT count(*) AS n FROM c;\n";

/// `up` on a thread of its own (rusqlite blocks the thread it runs on), as another process would.
fn up_on_a_thread(url: String, local: Vec<Migration>) -> std::thread::JoinHandle<Result<usize, String>> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let mut b = backend(&url).await;
            let r = up(&mut *b, &local).await.map(|r| r.steps.len()).map_err(|e| e.to_string());
            b.close().await.unwrap();
            r
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_migration_blocks_neither_status_nor_a_second_runners_lock_wait() {
    let db = TestDb::new(Engine::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_big.sql", "CREATE TABLE big (id INTEGER PRIMARY KEY, pad BLOB);\n");
    write(dir.path(), "0002_slow.sql", SLOW_MIGRATION);
    let local = load(dir.path());
    let lock_file = format!("{}-kiln.lock", db.name);

    let first = up_on_a_thread(db.url.clone(), local.clone());
    // Wait until the first runner holds the lock, then give it time to reach the slow part of 0002.
    let t = Instant::now();
    while std::fs::read_to_string(&lock_file).map(|s| s.is_empty()).unwrap_or(true) {
        assert!(t.elapsed() < Duration::from_secs(10), "the first runner never took the lock");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(700)).await;

    // `kiln status` (a read-only connection, as the CLI opens it) answers at once, from what is committed.
    let t = Instant::now();
    let mut cfg = BackendConfig::new(&db.url);
    cfg.read_only = true;
    let mut reader = kiln_testkit::compat::Protocol::boxed(kiln_sql::connect(&cfg).await.expect("connect during a migration"));
    let status = Runner::new(&mut *reader, settings()).status(&local).await.expect("status during a migration");
    let took = t.elapsed();
    assert!(took < Duration::from_secs(1), "status waited {took:?} on the running migration");
    assert_eq!(status.iter().map(|r| r.state.as_str()).collect::<Vec<_>>(), ["applied", "pending"]);
    reader.close().await.unwrap();

    // A second runner waits for kiln's lock (not SQLite's busy time-out) and names the holder.
    let t = Instant::now();
    let mut second = backend(&db.url).await;
    let short = RunnerSettings { lock_timeout: Duration::from_secs(1), actor: "second@testhost".into() };
    let err = Runner::new(&mut *second, short).up(&local, &UpTarget::Latest, &Policy::default(), false).await.unwrap_err();
    let waited = t.elapsed();
    let RunError::Engine(e @ EngineError::LockTimeout { .. }) = &err else { panic!("expected a lock time-out, got {err:?}") };
    let msg = e.to_string();
    assert!(msg.contains(&format!("pid {}", std::process::id())) && msg.contains("-kiln.lock"), "{msg}");
    assert!(waited >= Duration::from_secs(1) && waited < Duration::from_secs(3), "waited {waited:?}");
    assert!(!first.is_finished(), "the slow migration ended before the checks: make SLOW_MIGRATION slower");

    // With time enough, it waits for the first runner and finds nothing left to do.
    let patient = RunnerSettings { lock_timeout: Duration::from_secs(120), actor: "second@testhost".into() };
    let r = Runner::new(&mut *second, patient).up(&local, &UpTarget::Latest, &Policy::default(), false).await.unwrap();
    assert!(r.steps.is_empty(), "{r:?}");
    assert_eq!(first.join().unwrap(), Ok(2));
    assert_eq!(q(&db, "SELECT version || ':' || state FROM kiln_history ORDER BY version").await, ["1:applied", "2:applied"]);
}

#[tokio::test]
async fn the_first_locked_run_switches_to_wal_and_keep_leaves_the_journal_mode() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_t.sql", "CREATE TABLE t (id INTEGER);\n");
    let local = load(dir.path());
    async fn mode(db: &TestDb) -> Vec<String> {
        q(db, "PRAGMA journal_mode").await
    }

    let db = TestDb::new(Engine::Sqlite).await;
    db.sql("CREATE TABLE existing (id INTEGER)").await.unwrap();
    assert_eq!(mode(&db).await, ["delete"]);
    // Reading changes nothing.
    let mut cfg = BackendConfig::new(&db.url);
    cfg.read_only = true;
    let mut reader = kiln_testkit::compat::Protocol::boxed(kiln_sql::connect(&cfg).await.unwrap());
    Runner::new(&mut *reader, settings()).status(&local).await.unwrap();
    reader.close().await.unwrap();
    assert_eq!(mode(&db).await, ["delete"]);
    // A run switches it, and it stays.
    let mut b = backend(&db.url).await;
    up(&mut *b, &local).await.unwrap();
    assert_eq!(mode(&db).await, ["wal"]);
    b.close().await.unwrap();
    assert_eq!(mode(&db).await, ["wal"]);
    assert!(!Path::new(&format!("{}-wal", db.name)).exists(), "closing checkpoints and removes the -wal file");

    // `?journal_mode=keep` leaves it alone.
    let db = TestDb::new(Engine::Sqlite).await;
    db.sql("CREATE TABLE existing (id INTEGER)").await.unwrap();
    let mut b = backend(&format!("{}?journal_mode=keep", db.url)).await;
    up(&mut *b, &local).await.unwrap();
    b.close().await.unwrap();
    assert_eq!(mode(&db).await, ["delete"]);
    assert_eq!(q(&db, "SELECT count(*) FROM kiln_history").await, ["1"]);
    match kiln_sql::connect(&BackendConfig::new(format!("{}?journal_mode=truncate", db.url))).await {
        Err(EngineError::BadUrl { message, .. }) => assert!(message.contains("journal_mode"), "{message}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("an unknown journal_mode was accepted"),
    }
}

#[tokio::test]
async fn status_shows_the_durations_up_measured() {
    let db = TestDb::new(Engine::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    for i in 1..=20 {
        write(dir.path(), &format!("{i:04}_t{i}.sql"), &format!("CREATE TABLE t{i} (id INTEGER);\n"));
    }
    write(
        dir.path(),
        "0021_slow.sql",
        "CREATE TABLE slow AS WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 300000) SELECT count(*) AS n FROM c;\n",
    );
    // Steps commit without a disk flush (`synchronous = NORMAL`); the run's last commit flushes them all.
    write(dir.path(), "0022_sync.sql", "CREATE TABLE sync_seen AS SELECT synchronous AS level FROM pragma_synchronous;\n");
    let local = load(dir.path());
    let mut b = backend(&db.url).await;
    let report = up(&mut *b, &local).await.unwrap();
    let status = Runner::new(&mut *b, settings()).status(&local).await.unwrap();
    assert_eq!(report.steps.len(), status.len());

    // What `up` printed for each step, minus what `status` shows: the recorded
    // duration is measured inside the printed one, and leaves out only kiln's
    // own bookkeeping — not a disk flush per commit (which made it 0 ms where
    // `up` printed 20 ms).
    let diffs: Vec<i64> = report.steps.iter().zip(&status).map(|(s, r)| s.duration_ms as i64 - r.duration_ms.expect("recorded")).collect();
    assert!(diffs.iter().all(|d| *d >= 0), "printed minus recorded: {diffs:?}");
    let mut sorted = diffs.clone();
    sorted.sort();
    assert!(sorted[sorted.len() / 2] <= 1, "printed minus recorded, per step: {diffs:?}");
    let slow = status.iter().find(|r| r.version == "0021").unwrap();
    assert!(slow.duration_ms.unwrap() >= 10, "{slow:?}");
    assert_eq!(q(&db, "SELECT level FROM sync_seen").await, ["1"], "steps commit with synchronous = NORMAL");
    b.close().await.unwrap();
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
        Err(StepError::Engine(EngineError::Refused(m))) => assert!(m.contains("0001_index.yaml"), "{m}"),
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
    let mut b = kiln_testkit::compat::Protocol::boxed(kiln_sql::connect(&BackendConfig::new(format!("sqlite:{}", created.display()))).await.unwrap());
    b.ensure_history().await.unwrap();
    assert!(created.exists());
    // In-memory databases work (tests only).
    let mut m = kiln_testkit::compat::Protocol::boxed(kiln_sql::connect(&BackendConfig::new("sqlite::memory:")).await.unwrap());
    assert!(m.try_lock().await.unwrap());
    m.ensure_history().await.unwrap();
    assert_eq!(m.read_history().await.unwrap().unwrap().len(), 0);
    assert_eq!(m.capabilities().engine, "sqlite");
    assert!(m.capabilities().transactional_ddl);
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
    q(db, "SELECT version || ':' || state FROM kiln_history ORDER BY version").await
}

/// `event[:version]` of every log entry, in order.
async fn events(db: &TestDb) -> Vec<String> {
    q(db, "SELECT event || coalesce(':' || version, '') FROM kiln_log ORDER BY id").await
}

/// User tables, as the `sqlite3` shell sees them.
async fn user_tables(db: &TestDb) -> Vec<String> {
    q(db, "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite%' ORDER BY name").await
}

#[tokio::test]
async fn inspect_reports_columns_indexes_and_constraints_without_kilns_tables() {
    let db = TestDb::new(Engine::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "0001_schema.sql",
        "CREATE TABLE users (id INTEGER PRIMARY KEY, email VARCHAR(255) NOT NULL, name TEXT, CONSTRAINT users_email_uq UNIQUE (email));\n\
         CREATE TABLE posts (id BIGINT PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES users ON DELETE CASCADE, title TEXT NOT NULL,\n\
         body, published BOOLEAN, score NUMERIC(10, 2), CHECK (length(title) < 100));\n\
         CREATE INDEX posts_user_idx ON posts (user_id, id DESC);\n\
         CREATE UNIQUE INDEX posts_title_lower ON posts (lower(title)) WHERE published;\n\
         CREATE INDEX posts_title_nocase ON posts (title COLLATE NOCASE);\n\
         CREATE TABLE tags (post_id INTEGER, tag TEXT, PRIMARY KEY (post_id, tag), FOREIGN KEY (post_id) REFERENCES posts (id)) WITHOUT ROWID;\n\
         CREATE TABLE counters (id INTEGER PRIMARY KEY AUTOINCREMENT, n INT, doubled INT GENERATED ALWAYS AS (n * 2));\n\
         INSERT INTO counters (n) VALUES (1);\n\
         CREATE VIRTUAL TABLE docs USING fts5(title, body);\n\
         CREATE VIEW recent_posts AS SELECT * FROM posts;\n\
         ANALYZE;\n",
    );
    let local = load(dir.path());
    let mut b = backend(&db.url).await;
    up(&mut *b, &local).await.unwrap();

    let s = b.inspect().await.unwrap();
    // No kiln tables, no view, no sqlite_sequence / sqlite_stat1, no FTS5 shadow tables (docs_data…).
    assert_eq!(s.objects.keys().collect::<Vec<_>>(), ["counters", "docs", "posts", "tags", "users"]);

    let users = &s.objects["users"];
    assert_eq!(
        users.columns.iter().map(|(k, v)| (k.as_str(), v.clone())).collect::<Vec<_>>(),
        [("email", col("varchar(255)", false)), ("id", col("integer", false)), ("name", col("text", true))],
        "an INTEGER PRIMARY KEY is the rowid: never NULL"
    );
    // The automatic index behind UNIQUE is reported as the constraint, under the name PostgreSQL would give it.
    assert!(users.indexes.is_empty(), "{:?}", users.indexes);
    assert_eq!(
        users.constraints.iter().map(|(k, v)| (k.as_str(), v.clone())).collect::<Vec<_>>(),
        [("users_email_key", constraint("unique", &["email"], None)), ("users_pkey", constraint("primary key", &["id"], None))]
    );

    let posts = &s.objects["posts"];
    assert_eq!(posts.columns["score"], col("numeric(10, 2)", true));
    assert_eq!(posts.columns["body"], col("", true), "no declared type");
    // SQLite accepts NULL in a primary key column of a rowid table that is not the rowid; kiln reports what it enforces.
    assert_eq!(posts.columns["id"], col("bigint", true));
    assert_eq!(
        posts.constraints.iter().map(|(k, v)| (k.as_str(), v.clone())).collect::<Vec<_>>(),
        [
            ("posts_pkey", constraint("primary key", &["id"], None)),
            // `REFERENCES users` names no column: users' primary key.
            ("posts_user_id_fkey", constraint("foreign key", &["user_id"], Some("references users (id) on update no action on delete cascade"))),
        ]
    );
    assert_eq!(
        posts.indexes.iter().map(|(k, v)| (k.as_str(), v.clone())).collect::<Vec<_>>(),
        [
            ("posts_title_lower", IndexInfo { columns: strings(&["lower(title)"]), unique: true, options: Some("where published".into()) }),
            ("posts_title_nocase", IndexInfo { columns: strings(&["title"]), unique: false, options: Some("keys (title collate nocase)".into()) }),
            ("posts_user_idx", IndexInfo { columns: strings(&["user_id", "id"]), unique: false, options: Some("keys (user_id, id desc)".into()) }),
        ]
    );

    let tags = &s.objects["tags"];
    assert_eq!((&tags.columns["post_id"], &tags.columns["tag"]), (&col("integer", false), &col("text", false)), "WITHOUT ROWID keys are NOT NULL");
    assert_eq!(
        tags.constraints.iter().map(|(k, v)| (k.as_str(), v.clone())).collect::<Vec<_>>(),
        [
            ("tags_pkey", constraint("primary key", &["post_id", "tag"], None)),
            ("tags_post_id_fkey", constraint("foreign key", &["post_id"], Some("references posts (id) on update no action on delete no action"))),
        ]
    );
    assert!(tags.indexes.is_empty(), "{:?}", tags.indexes);
    assert_eq!(s.objects["counters"].columns["doubled"], col("int", true), "generated columns are columns");
    assert_eq!(s.objects["docs"].columns.keys().collect::<Vec<_>>(), ["body", "title"]);

    // A contract can ask for constraints and indexes by name or by columns.
    let c = contract(
        "tables:\n  users:\n    required: [id, {name: email, type: varchar(255), nullable: false}]\n    unique: [users_email_key, [email]]\n\
         \x20 posts:\n    required: [{name: id, type: int8}, user_id]\n    indexes: [posts_user_idx, [user_id, id], posts_pkey]\n    unique: [posts_title_lower]\n",
    );
    assert_eq!(schema::validate(&c, &s), vec![]);
    assert_eq!(schema::validate(&schema::dump(&s, false), &s), vec![]);
    // Another connection reads exactly the same schema, so a stored snapshot shows no drift.
    assert_eq!(backend(&db.url).await.inspect().await.unwrap(), s);
}

#[tokio::test]
async fn snapshots_round_trip_and_keep_history() {
    let db = TestDb::new(Engine::Sqlite).await;
    let mut b = backend(&db.url).await;
    // A database kiln never touched: no snapshot, and nothing gets created by asking.
    assert_eq!(b.load_snapshot().await.unwrap(), None);
    assert_eq!(b.inspect().await.unwrap(), Snapshot::default());
    assert_eq!(q(&db, "SELECT count(*) FROM sqlite_master").await, ["0"]);

    db.sql("CREATE TABLE items (id INTEGER PRIMARY KEY, sku TEXT NOT NULL)").await.unwrap();
    let first = b.inspect().await.unwrap();
    // Saved without ensure_history: the table is created on demand.
    b.save_snapshot(&first).await.unwrap();
    assert_eq!(b.load_snapshot().await.unwrap(), Some(first.clone()));
    assert_eq!(user_tables(&db).await, ["items", "kiln_snapshot"]);
    assert_eq!(b.inspect().await.unwrap(), first, "kiln_snapshot is not part of the schema");

    db.sql("CREATE INDEX items_sku ON items (sku)").await.unwrap();
    let second = b.inspect().await.unwrap();
    assert_ne!(first, second);
    b.save_snapshot(&second).await.unwrap();
    assert_eq!(b.load_snapshot().await.unwrap(), Some(second), "the newest wins");
    assert_eq!(q(&db, "SELECT count(*) FROM kiln_snapshot").await, ["2"], "older snapshots are kept");

    // After a run the stored snapshot is the live schema; a hand-made change is drift.
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_users.sql", "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT NOT NULL);\n");
    write(dir.path(), "0002_posts.sql", "CREATE TABLE posts (id INTEGER PRIMARY KEY, body TEXT, title TEXT);\n");
    up(&mut *b, &load(dir.path())).await.unwrap();
    assert_eq!(Runner::new(&mut *b, settings()).diff().await.unwrap(), Some(vec![]));
    db.sql("CREATE INDEX by_hand ON users (email, id); ALTER TABLE posts DROP COLUMN body").await.unwrap();
    let drift = Runner::new(&mut *b, settings()).diff().await.unwrap().unwrap();
    let shown: Vec<String> = drift.iter().map(|c| c.to_string()).collect();
    assert_eq!(shown, ["- posts: column body removed (text)", "+ users: index by_hand added ((email, id))"]);
}

#[tokio::test]
async fn a_migration_dropping_a_required_column_is_rolled_back() {
    let db = TestDb::new(Engine::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_users.sql", "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT NOT NULL, nickname TEXT);\n");
    write(
        dir.path(),
        "0002_cleanup.sql",
        "CREATE TABLE audit (id INT);\nALTER TABLE users DROP COLUMN email;\nALTER TABLE users DROP COLUMN nickname;\n",
    );
    write(dir.path(), "0003_more.sql", "CREATE TABLE more (id INT);\n");
    let local = load(dir.path());
    let c = contract("tables:\n  users:\n    required: [id, email]\n    optional: [nickname]\n");
    let mut b = backend(&db.url).await;

    let err = up_with(&mut *b, &local, &c).await.unwrap_err();
    let text = err.to_string();
    let RunError::Invalid { version, file, outcome, violations, done } = err else { panic!("expected a contract violation, got {err:?}") };
    assert_eq!((version.number, file.as_str(), outcome), (2, "0002_cleanup.sql", FailureOutcome::RolledBack));
    assert_eq!(done.iter().map(|v| v.number).collect::<Vec<_>>(), [1]);
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert_eq!((violations[0].object.as_str(), violations[0].message.as_str()), ("users", "required column email is missing"));
    assert!(text.contains("0002_cleanup.sql") && text.contains("email"), "{text}");

    // Nothing of 0002 remains: the columns, the other table, the history row, its `applied` event.
    assert_eq!(q(&db, "SELECT name FROM pragma_table_info('users') ORDER BY cid").await, ["id", "email", "nickname"]);
    assert_eq!(user_tables(&db).await, ["kiln_history", "kiln_log", "kiln_snapshot", "users"]);
    assert_eq!(history(&db).await, ["1:applied"]);
    assert_eq!(events(&db).await, ["run-start", "applied:1", "failed:2", "run-end"]);
    let detail = q(&db, "SELECT detail FROM kiln_log WHERE event = 'failed'").await;
    assert!(detail[0].contains("required column email is missing"), "{detail:?}");

    // The lock was released and the database is usable: the next run stops at the same place.
    let again = up_with(&mut *b, &local, &c).await.unwrap_err();
    assert!(matches!(again, RunError::Invalid { ref version, .. } if version.number == 2), "{again:?}");
    // Without the breaking migration, the run goes through and checks the end state.
    std::fs::remove_file(dir.path().join("0002_cleanup.sql")).unwrap();
    let report = up_with(&mut *b, &load(dir.path()), &c).await.unwrap();
    assert_eq!(report.steps.len(), 1);
    assert_eq!(history(&db).await, ["1:applied", "3:applied"]);
}

#[tokio::test]
async fn a_migration_outside_a_transaction_that_breaks_the_contract_is_recorded_failed() {
    let db = TestDb::new(Engine::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_users.sql", "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT NOT NULL);\n");
    write(dir.path(), "0002_drop_email.sql", "-- kiln:transaction off\nALTER TABLE users DROP COLUMN email;\n");
    write(dir.path(), "0003_more.sql", "CREATE TABLE more (id INT);\n");
    let local = load(dir.path());
    let c = contract("tables:\n  users:\n    required: [id, email]\n");
    let mut b = backend(&db.url).await;

    let err = up_with(&mut *b, &local, &c).await.unwrap_err();
    let RunError::Invalid { version, outcome, .. } = err else { panic!("{err:?}") };
    assert_eq!((version.number, outcome), (2, FailureOutcome::RecordedFailed));
    // There was no transaction to roll back: the column is gone, and the entry blocks the next run.
    assert_eq!(q(&db, "SELECT name FROM pragma_table_info('users')").await, ["id"]);
    assert_eq!(history(&db).await, ["1:applied", "2:failed"]);
    let error = q(&db, "SELECT error FROM kiln_history WHERE version = 2").await;
    assert!(error[0].contains("required column email is missing") && error[0].contains("kiln repair 0002"), "{error:?}");
    let blocked = up_with(&mut *b, &local, &c).await.unwrap_err();
    assert!(matches!(blocked, RunError::Plan(_)), "{blocked:?}");
    assert!(!user_tables(&db).await.contains(&"more".to_string()));
}

#[tokio::test]
async fn inspect_of_a_thousand_tables_takes_milliseconds() {
    let db = TestDb::new(Engine::Sqlite).await;
    // Each table: 5 columns, a primary key, a unique constraint, a foreign key,
    // a check and a plain index.
    let mut ddl = String::from("CREATE TABLE t0 (id INTEGER PRIMARY KEY);\n");
    for i in 1..1000 {
        ddl.push_str(&format!(
            "CREATE TABLE t{i} (id BIGINT PRIMARY KEY, code TEXT NOT NULL UNIQUE, parent_id INT REFERENCES t0 (id), \
             amount NUMERIC(12, 2) CHECK (amount >= 0), created_at TEXT NOT NULL);\nCREATE INDEX t{i}_created ON t{i} (created_at);\n"
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
    assert_eq!((t500.columns.len(), t500.indexes.len(), t500.constraints.len()), (5, 1, 3), "{t500:?}");
    assert_eq!(t500.constraints["t500_parent_id_fkey"].definition.as_deref(), Some("references t0 (id) on update no action on delete no action"));
    assert_eq!(t500.constraints["t500_code_key"].columns, ["code"]);
    assert!(took < Duration::from_secs(5), "inspect of 1,000 tables took {took:?}");
}

#[tokio::test]
async fn scratch_databases_are_files_next_to_the_database() {
    let db = TestDb::new(Engine::Sqlite).await;
    let dir = Path::new(&db.name).parent().unwrap().to_path_buf();
    let mut b = backend(&db.url).await;
    let name = kiln_testkit::unique_name("kiln_verify");
    let file = dir.join(format!("{name}.db"));

    let url = b.create_scratch(&name).await.unwrap();
    assert_eq!(url, format!("sqlite://{}", file.display()));
    assert!(file.exists());
    assert!(b.create_scratch(&name).await.is_err(), "an existing file is not an empty scratch database");
    // It is empty and usable; a run leaves its lock file behind.
    let mut scratch = backend(&url).await;
    assert!(scratch.inspect().await.unwrap().objects.is_empty());
    assert!(scratch.read_history().await.unwrap().is_none());
    let mdir = tempfile::tempdir().unwrap();
    write(mdir.path(), "0001_t.sql", "CREATE TABLE t (id INTEGER);\n");
    up(&mut *scratch, &load(mdir.path())).await.unwrap();
    scratch.close().await.unwrap();
    assert!(dir.join(format!("{name}.db-kiln.lock")).exists());
    // What a crashed process can leave next to a database.
    for companion in ["-wal", "-shm", "-journal"] {
        std::fs::write(dir.join(format!("{name}.db{companion}")), b"").unwrap();
    }
    b.drop_scratch(&name).await.unwrap();
    let left: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with(&name)).collect();
    assert!(left.is_empty(), "{left:?}");
    b.drop_scratch(&name).await.unwrap(); // already gone: not an error

    // Only kiln's scratch names, never anything else.
    for other in ["test", "kiln_verify_../test", "kiln_verify_x/../../test"] {
        let err = b.drop_scratch(other).await.unwrap_err();
        assert!(matches!(err, EngineError::Refused(_)) && err.to_string().contains("kiln_verify_"), "{err}");
        assert!(b.create_scratch(other).await.is_err());
    }
    assert!(Path::new(&db.name).exists());

    // An in-memory database has no directory: the scratch file goes to the temporary directory.
    let mut memory = backend("sqlite::memory:").await;
    let url = memory.create_scratch(&name).await.unwrap();
    let file = std::env::temp_dir().join(format!("{name}.db"));
    assert_eq!(url, format!("sqlite://{}", file.display()));
    memory.drop_scratch(&name).await.unwrap();
    assert!(!file.exists());
}
