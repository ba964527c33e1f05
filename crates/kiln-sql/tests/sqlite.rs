//! The SQLite engine on real database files, driven through `kiln_core::Runner`.
//! Every test gets its own file (kiln-testkit) and checks what is really in it
//! with the `sqlite3` shell, not only what kiln reports.

use std::path::Path;
use std::time::{Duration, Instant};

#[allow(unused_imports)]
use kiln_core::engine::{Engine as _, Locker as _};
use kiln_core::split::Dialect;
use kiln_core::{
    load_dir, BackendConfig, DownTarget, EngineError, FailureOutcome, LoadOptions, Migration, Policy, RunError, Runner, RunnerSettings, UpTarget,
    Version,
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

/// What the database file itself holds, ignoring the write-ahead log
/// (`immutable=1`): what is on disk without the WAL.
fn in_the_main_file(db: &TestDb, sql: &str) -> String {
    let o = std::process::Command::new("sqlite3").arg(format!("file:{}?immutable=1", db.name)).arg(sql).output().expect("sqlite3");
    format!("{}{}", String::from_utf8_lossy(&o.stdout).trim(), String::from_utf8_lossy(&o.stderr).trim())
}

#[tokio::test]
async fn a_durable_commit_flushes_the_commits_before_it_even_with_nothing_to_write() {
    use kiln_core::engine::{HistoryStore, Locker, Record};
    use kiln_core::{LogEntry, LogEvent};
    use kiln_sql::sqlite::SqliteEngine;

    let db = TestDb::new(Engine::Sqlite).await;
    let mut e = SqliteEngine::connect(&BackendConfig::new(&db.url)).await.unwrap();
    assert!(e.try_lock().await.unwrap(), "taking the lock switches the database to WAL");
    e.ensure().await.unwrap();
    let entry = LogEntry {
        at: chrono::Utc::now(),
        event: LogEvent::RunStart,
        version: None,
        name: None,
        batch: Some(1),
        actor: "t@h".into(),
        reason: None,
        detail: None,
    };
    // A step's commit is in the write-ahead log only …
    e.commit(&Record { changes: vec![], events: vec![entry.clone()], durable: false }).await.unwrap();
    assert_eq!(q(&db, "SELECT count(*) FROM kiln_log").await, ["1"]);
    assert_ne!(in_the_main_file(&db, "SELECT count(*) FROM kiln_log"), "1");
    // … until a durable commit, even one with nothing of its own to write.
    e.commit(&Record { changes: vec![], events: vec![], durable: true }).await.unwrap();
    assert_eq!(in_the_main_file(&db, "SELECT count(*) FROM kiln_log"), "1");
    // A durable commit with something to write flushes too.
    e.commit(&Record { changes: vec![], events: vec![entry], durable: true }).await.unwrap();
    assert_eq!(q(&db, "SELECT count(*) FROM kiln_log").await, ["2"]);
    e.unlock().await.unwrap();
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
