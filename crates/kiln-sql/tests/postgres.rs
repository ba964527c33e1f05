//! The PostgreSQL engine against a real server: every test gets a fresh
//! database from kiln-testkit, drives the engine through `kiln_core::Runner`
//! with migrations loaded from a temporary directory, and checks what is really
//! in the database afterwards.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[allow(unused_imports)]
use kiln_core::engine::{Engine as _, Locker as _};
use kiln_core::schema::{self, ColumnInfo, ConstraintInfo, Contract, IndexInfo, Severity, Snapshot};
use kiln_core::split::Dialect;
use kiln_core::{
    load_dir, BackendConfig, DownTarget, EngineError, FailureOutcome, LoadOptions, Migration, PlanError, Policy, RunError, Runner, RunnerSettings,
    State, UpTarget, Version,
};
use kiln_sql::postgres::PgBackend;
use kiln_testkit::compat::Backend;
use kiln_testkit::compat::Protocol;
use kiln_testkit::{Engine, TestDb};

const ACTOR: &str = "tester@kiln-tests";

fn write(dir: &Path, name: &str, content: &str) {
    let p = dir.join(name);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(p, content).unwrap();
}

fn load(dir: &Path) -> Vec<Migration> {
    load_dir(dir, &LoadOptions { dialect: Dialect::POSTGRES, name_rule: None }).expect("migrations load")
}

fn settings() -> RunnerSettings {
    RunnerSettings { lock_timeout: Duration::from_secs(5), actor: ACTOR.into() }
}

/// The engine itself, behind the `Backend` adapter the runner takes.
async fn pg(cfg: BackendConfig) -> Result<Protocol, EngineError> {
    PgBackend::connect(&cfg).await.map(Protocol::new)
}

async fn backend(db: &TestDb) -> Box<dyn Backend> {
    kiln_testkit::compat::Protocol::boxed(kiln_sql::connect(&BackendConfig::new(db.url.clone())).await.expect("connect"))
}

async fn up(b: &mut dyn Backend, local: &[Migration]) -> Result<kiln_core::RunReport, RunError> {
    Runner::new(b, settings()).up(local, &UpTarget::Latest, &Policy::default(), false).await
}

async fn tables(db: &TestDb) -> Vec<String> {
    db.query_strings("SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1").await.unwrap()
}

async fn history(db: &TestDb) -> Vec<String> {
    db.query_strings("SELECT version || ':' || state FROM kiln_history ORDER BY version").await.unwrap()
}

async fn events(db: &TestDb) -> Vec<String> {
    db.query_strings("SELECT event || coalesce(':' || version, '') FROM kiln_log ORDER BY id").await.unwrap()
}

fn three_migrations(dir: &Path) {
    write(
        dir,
        "0001_create_users.sql",
        "-- kiln:up\nCREATE TABLE users (id BIGSERIAL PRIMARY KEY, email TEXT NOT NULL UNIQUE);\n-- kiln:down\nDROP TABLE users;\n",
    );
    write(
        dir,
        "0002_create_posts.up.sql",
        "CREATE TABLE posts (id BIGSERIAL PRIMARY KEY, user_id BIGINT NOT NULL REFERENCES users (id), body TEXT);\nCREATE INDEX posts_user_idx ON posts (user_id);\n",
    );
    write(dir, "0002_create_posts.down.sql", "DROP TABLE posts;\n");
    write(
        dir,
        "0003_seed_users.sql",
        "-- kiln:up\nINSERT INTO users (email) VALUES ('a@example.com'), ('b@example.com');\n-- kiln:down\nDELETE FROM users;\n",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_status_down_up_again() {
    let db = TestDb::new(Engine::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    three_migrations(dir.path());
    let local = load(dir.path());
    let mut b = backend(&db).await;

    let report = up(b.as_mut(), &local).await.unwrap();
    assert_eq!(report.batch, Some(1));
    assert_eq!(report.steps.iter().map(|s| s.version.as_str()).collect::<Vec<_>>(), ["0001", "0002", "0003"]);
    assert_eq!(tables(&db).await, ["kiln_history", "kiln_log", "kiln_snapshot", "posts", "users"]);
    assert_eq!(db.query_strings("SELECT count(*) FROM users").await.unwrap(), ["2"]);
    assert_eq!(history(&db).await, ["1:applied", "2:applied", "3:applied"]);
    assert_eq!(events(&db).await, ["run-start", "applied:1", "applied:2", "applied:3", "run-end"]);

    let status = Runner::new(b.as_mut(), settings()).status(&local).await.unwrap();
    assert_eq!(status.iter().map(|r| r.state.as_str()).collect::<Vec<_>>(), ["applied", "applied", "applied"]);
    assert!(status.iter().all(|r| r.checksum_ok == Some(true)));

    // A second `up` finds nothing to do and records nothing.
    let again = up(b.as_mut(), &local).await.unwrap();
    assert!(again.steps.is_empty());
    assert_eq!(events(&db).await.len(), 5);

    let down = Runner::new(b.as_mut(), settings()).down(&local, &DownTarget::LastBatch, false).await.unwrap();
    assert_eq!(down.steps.iter().map(|s| s.version.as_str()).collect::<Vec<_>>(), ["0003", "0002", "0001"]);
    assert_eq!(tables(&db).await, ["kiln_history", "kiln_log", "kiln_snapshot"]);
    assert!(history(&db).await.is_empty());
    assert_eq!(events(&db).await[5..], ["run-start", "reverted:3", "reverted:2", "reverted:1", "run-end"]);

    let report = up(b.as_mut(), &local).await.unwrap();
    assert_eq!(report.steps.len(), 3);
    assert_eq!(tables(&db).await, ["kiln_history", "kiln_log", "kiln_snapshot", "posts", "users"]);
    assert_eq!(db.query_strings("SELECT DISTINCT batch FROM kiln_history").await.unwrap(), ["1"]);
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_in_the_middle_rolls_back_only_the_failed_migration() {
    let db = TestDb::new(Engine::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_first.sql", "CREATE TABLE first (id INT);\n");
    // The failing statement is the second one; the error sits on its third line.
    write(
        dir.path(),
        "0002_second.sql",
        "CREATE TABLE second (id INT);\n\nINSERT INTO second (id)\nSELECT id\nFROM no_such_table;\nCREATE TABLE never (id INT);\n",
    );
    write(dir.path(), "0003_third.sql", "CREATE TABLE third (id INT);\n");
    let local = load(dir.path());
    let mut b = backend(&db).await;

    let err = up(b.as_mut(), &local).await.unwrap_err();
    let RunError::Migration { version, outcome, error, done } = err else { panic!("expected a migration error, got {err:?}") };
    assert_eq!(version.number, 2);
    assert_eq!(outcome, FailureOutcome::RolledBack);
    assert_eq!(done.iter().map(|v| v.number).collect::<Vec<_>>(), [1]);
    assert_eq!(error.file, "0002_second.sql");
    assert_eq!(error.statement, 2);
    assert_eq!(error.line, 5, "line of `FROM no_such_table`: {error:?}");
    assert_eq!(error.code.as_deref(), Some("42P01"));
    assert!(error.message.starts_with("42P01: relation \"no_such_table\" does not exist"), "{}", error.message);

    // Nothing of 0002 remains; 0001 stays; 0003 never ran.
    assert_eq!(tables(&db).await, ["first", "kiln_history", "kiln_log", "kiln_snapshot"]);
    assert_eq!(history(&db).await, ["1:applied"]);
    let ev = events(&db).await;
    assert_eq!(ev, ["run-start", "applied:1", "failed:2", "run-end"]);
    let detail = db.query_strings("SELECT detail FROM kiln_log WHERE event = 'failed'").await.unwrap();
    assert!(detail[0].contains("statement 2") && detail[0].contains("no_such_table"), "{detail:?}");

    // Rolled back means not blocking: fix the file and run again.
    write(dir.path(), "0002_second.sql", "CREATE TABLE second (id INT);\nCREATE TABLE never (id INT);\n");
    let local = load(dir.path());
    let report = up(b.as_mut(), &local).await.unwrap();
    assert_eq!(report.steps.len(), 2);
    assert_eq!(tables(&db).await, ["first", "kiln_history", "kiln_log", "kiln_snapshot", "never", "second", "third"]);
    assert_eq!(history(&db).await, ["1:applied", "2:applied", "3:applied"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plpgsql_function_trigger_and_comments_with_semicolons() {
    let db = TestDb::new(Engine::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "0001_audit.sql",
        r#"-- kiln:up
-- A comment; with semicolons; everywhere;
CREATE TABLE items (
    id SERIAL PRIMARY KEY, -- key; not null
    name TEXT NOT NULL,    /* block; comment */
    updated_at TIMESTAMPTZ,
    note TEXT DEFAULT 'a;b'
);

/* a block comment; before a function */
CREATE FUNCTION touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $body$
BEGIN
    -- inside the body; still one statement
    NEW.updated_at := now();
    IF NEW.name = '' THEN
        RAISE EXCEPTION 'empty name; refused';
    END IF;
    RETURN NEW;
END;
$body$;

CREATE TRIGGER items_touch BEFORE INSERT OR UPDATE ON items
FOR EACH ROW EXECUTE FUNCTION touch_updated_at();

DO $$ BEGIN INSERT INTO items (name) VALUES ('first; item'); END $$;

-- kiln:down
DROP TABLE items;
DROP FUNCTION touch_updated_at();
"#,
    );
    let local = load(dir.path());
    let mut b = backend(&db).await;
    up(b.as_mut(), &local).await.unwrap();

    assert_eq!(db.query_strings("SELECT name || '|' || note || '|' || (updated_at IS NOT NULL) FROM items").await.unwrap(), ["first; item|a;b|true"]);
    db.sql("INSERT INTO items (name) VALUES ('second')").await.unwrap();
    assert_eq!(db.query_strings("SELECT count(*) FROM items WHERE updated_at IS NOT NULL").await.unwrap(), ["2"]);
    let refused = db.sql("INSERT INTO items (name) VALUES ('')").await.unwrap_err();
    assert!(format!("{refused:?}").contains("empty name; refused"), "{refused:?}");
    assert_eq!(db.query_strings("SELECT tgname::text FROM pg_trigger WHERE NOT tgisinternal").await.unwrap(), ["items_touch"]);

    Runner::new(b.as_mut(), settings()).down(&local, &DownTarget::LastBatch, false).await.unwrap();
    assert_eq!(tables(&db).await, ["kiln_history", "kiln_log", "kiln_snapshot"]);
    assert!(db.query_strings("SELECT proname::text FROM pg_proc WHERE proname = 'touch_updated_at'").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_off_failure_is_recorded_and_blocks_until_repair() {
    let db = TestDb::new(Engine::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_accounts.sql", "CREATE TABLE accounts (id INT, email TEXT);\n");
    // CREATE INDEX CONCURRENTLY cannot run in a transaction: this proves the mode.
    write(
        dir.path(),
        "0002_indexes.sql",
        "-- kiln:transaction off\n-- kiln:up\nCREATE INDEX CONCURRENTLY accounts_email_idx ON accounts (email);\nCREATE INDEX CONCURRENTLY bad_idx ON no_such_table (x);\n-- kiln:down\nDROP INDEX CONCURRENTLY accounts_email_idx;\n",
    );
    write(dir.path(), "0003_later.sql", "-- kiln:up\nCREATE TABLE later (id INT);\n-- kiln:down\nDROP TABLE later;\n");
    let local = load(dir.path());
    let mut b = backend(&db).await;

    let err = up(b.as_mut(), &local).await.unwrap_err();
    let RunError::Migration { version, outcome, error, .. } = err else { panic!("expected a migration error, got {err:?}") };
    assert_eq!((version.number, outcome), (2, FailureOutcome::RecordedFailed));
    assert_eq!((error.statement, error.line), (2, 4));
    // The first statement stayed (no transaction), and the entry says so.
    assert_eq!(db.query_strings("SELECT indexname::text FROM pg_indexes WHERE tablename = 'accounts'").await.unwrap(), ["accounts_email_idx"]);
    assert_eq!(history(&db).await, ["1:applied", "2:failed"]);
    // kiln_core::step appends what the failure left behind (statement 1 stays committed).
    let recorded = db.query_strings("SELECT error_statement || ':' || error_line || ':' || error FROM kiln_history WHERE version = 2").await.unwrap();
    assert!(recorded[0].starts_with("2:4:42P01: relation \"no_such_table\" does not exist"), "{recorded:?}");
    assert!(!tables(&db).await.contains(&"later".to_string()));

    // The next run is refused, naming the failure, and changes nothing.
    let err = up(b.as_mut(), &local).await.unwrap_err();
    let RunError::Plan(problems) = &err else { panic!("expected a refused plan, got {err:?}") };
    assert!(matches!(&problems[0], PlanError::Blocked { version, state, .. } if version.number == 2 && state == "failed"), "{problems:?}");
    assert!(err.to_string().contains("kiln repair"), "{err}");
    assert!(!tables(&db).await.contains(&"later".to_string()));

    // The operator fixes the database and the file, then repairs.
    db.sql("DROP INDEX accounts_email_idx").await.unwrap();
    write(
        dir.path(),
        "0002_indexes.sql",
        "-- kiln:transaction off\n-- kiln:up\nCREATE INDEX CONCURRENTLY accounts_email_idx ON accounts (email);\n-- kiln:down\nDROP INDEX CONCURRENTLY accounts_email_idx;\n",
    );
    let local = load(dir.path());
    let repair = Runner::new(b.as_mut(), settings()).repair(&local, Some(&Version::from_number(2)), false, "fixed by hand").await.unwrap();
    assert!(repair.changes[0].to_string().contains("pending again"), "{:?}", repair.changes);
    assert_eq!(history(&db).await, ["1:applied"]);

    let report = up(b.as_mut(), &local).await.unwrap();
    assert_eq!(report.steps.len(), 2);
    assert_eq!(history(&db).await, ["1:applied", "2:applied", "3:applied"]);
    assert_eq!(db.query_strings("SELECT indexname::text FROM pg_indexes WHERE tablename = 'accounts'").await.unwrap(), ["accounts_email_idx"]);
    let ev = events(&db).await;
    assert!(ev.contains(&"failed:2".to_string()) && ev.contains(&"repair:2".to_string()) && ev.contains(&"applied:2".to_string()), "{ev:?}");

    // Reverting a transaction-off migration uses the same intent pattern.
    Runner::new(b.as_mut(), settings()).down(&local, &DownTarget::Steps(2), false).await.unwrap();
    assert_eq!(history(&db).await, ["1:applied"]);
    assert!(db.query_strings("SELECT indexname::text FROM pg_indexes WHERE tablename = 'accounts'").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baseline_records_without_running() {
    let db = TestDb::new(Engine::Postgres).await;
    // The database existed before kiln.
    db.sql("CREATE TABLE users (id BIGSERIAL PRIMARY KEY, email TEXT NOT NULL UNIQUE); CREATE TABLE posts (id BIGSERIAL PRIMARY KEY, user_id BIGINT, body TEXT)").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    three_migrations(dir.path());
    let local = load(dir.path());
    let mut b = backend(&db).await;

    let report = Runner::new(b.as_mut(), settings()).baseline(&local, &Version::from_number(2), Some("adopting kiln")).await.unwrap();
    assert_eq!(report.changes.len(), 2);
    assert_eq!(history(&db).await, ["1:baseline", "2:baseline"]);
    assert_eq!(db.query_strings("SELECT reason FROM kiln_log WHERE event = 'baseline'").await.unwrap(), ["adopting kiln"]);
    assert_eq!(
        db.query_strings("SELECT checksum FROM kiln_history ORDER BY version").await.unwrap(),
        [local[0].checksum.0.clone(), local[1].checksum.0.clone()]
    );

    // Only 0003 runs (0001/0002 would fail: their tables exist).
    let report = up(b.as_mut(), &local).await.unwrap();
    assert_eq!(report.steps.iter().map(|s| s.version.as_str()).collect::<Vec<_>>(), ["0003"]);
    assert_eq!(history(&db).await, ["1:baseline", "2:baseline", "3:applied"]);
    assert_eq!(db.query_strings("SELECT count(*) FROM users").await.unwrap(), ["2"]);

    // A second baseline is refused.
    let err = Runner::new(b.as_mut(), settings()).baseline(&local, &Version::from_number(3), None).await.unwrap_err();
    assert!(err.to_string().contains("already records"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retire_removes_a_migration_from_every_plan() {
    let db = TestDb::new(Engine::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_one.sql", "CREATE TABLE one (id INT);\n");
    write(dir.path(), "0002_two.sql", "CREATE TABLE two (id INT);\n");
    let mut b = backend(&db).await;
    up(b.as_mut(), &load(dir.path())).await.unwrap();

    let report =
        Runner::new(b.as_mut(), settings()).retire(&load(dir.path()), dir.path(), &Version::from_number(2), "superseded by 0003").await.unwrap();
    assert!(report.changes.iter().any(|c| c.to_string().contains("retired")), "{:?}", report.changes);
    assert!(dir.path().join("0002_two.sql.retired").exists());
    assert!(!dir.path().join("0002_two.sql").exists());
    assert_eq!(history(&db).await, ["1:applied", "2:retired"]);
    assert_eq!(db.query_strings("SELECT reason FROM kiln_log WHERE event = 'retire'").await.unwrap(), ["superseded by 0003"]);

    write(dir.path(), "0003_three.sql", "CREATE TABLE three (id INT);\n");
    let local = load(dir.path());
    assert_eq!(local.len(), 2, "the retired file is not loaded");
    let report = up(b.as_mut(), &local).await.unwrap();
    assert_eq!(report.steps.iter().map(|s| s.version.as_str()).collect::<Vec<_>>(), ["0003"]);
    let status = Runner::new(b.as_mut(), settings()).status(&local).await.unwrap();
    assert_eq!(status.iter().map(|r| r.state.as_str()).collect::<Vec<_>>(), ["applied", "retired", "applied"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_held_by_another_session() {
    let db = TestDb::new(Engine::Postgres).await;
    let holder_url = format!("{}?application_name=holder-runner", db.url);
    let mut a = pg(BackendConfig::new(holder_url)).await.unwrap();
    let mut b = backend(&db).await;

    assert!(a.try_lock().await.unwrap());
    assert!(a.try_lock().await.unwrap(), "taking a held lock again must not deadlock");
    assert!(!b.try_lock().await.unwrap());
    let holder = b.lock_holder().await.expect("holder named");
    assert!(holder.contains("holder-runner") && holder.contains("server pid"), "{holder}");

    let t = Instant::now();
    let err = b.lock(Duration::from_millis(300)).await.unwrap_err();
    assert!(t.elapsed() >= Duration::from_millis(300) && t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(matches!(err, EngineError::LockTimeout { .. }), "{err:?}");
    assert!(err.to_string().contains("holder-runner"), "{err}");

    // A runner waiting on the lock fails with the same clear message, and changes nothing.
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_one.sql", "CREATE TABLE one (id INT);\n");
    let short = RunnerSettings { lock_timeout: Duration::from_millis(200), actor: ACTOR.into() };
    let err = Runner::new(b.as_mut(), short).up(&load(dir.path()), &UpTarget::Latest, &Policy::default(), false).await.unwrap_err();
    assert!(err.to_string().contains("holder-runner"), "{err}");
    assert!(tables(&db).await.is_empty());

    // One unlock releases it, even though it was "taken" twice.
    a.unlock().await.unwrap();
    a.unlock().await.unwrap();
    assert!(b.try_lock().await.unwrap());
    assert!(!a.try_lock().await.unwrap());
    b.unlock().await.unwrap();

    // A holder whose session dies releases the lock.
    assert!(a.try_lock().await.unwrap());
    db.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'holder-runner'").await.unwrap();
    b.lock(Duration::from_secs(5)).await.unwrap();
    let err = a.try_lock().await.unwrap_err();
    assert!(matches!(err, EngineError::ConnectionLost { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_history_on_a_fresh_database_is_none_and_creates_nothing() {
    let db = TestDb::new(Engine::Postgres).await;
    let mut b = backend(&db).await;
    assert!(b.read_history().await.unwrap().is_none());
    assert!(tables(&db).await.is_empty());
    // Status of a database kiln never touched: everything pending, still nothing created.
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_one.sql", "CREATE TABLE one (id INT);\n");
    let status = Runner::new(b.as_mut(), settings()).status(&load(dir.path())).await.unwrap();
    assert_eq!(status[0].state, "pending");
    assert!(tables(&db).await.is_empty());

    b.ensure_history().await.unwrap();
    b.ensure_history().await.unwrap();
    assert_eq!(b.read_history().await.unwrap().unwrap().len(), 0);
    assert_eq!(tables(&db).await, ["kiln_history", "kiln_log", "kiln_snapshot"]);
    let columns = db
        .query_strings("SELECT string_agg(column_name || ' ' || data_type, ', ' ORDER BY ordinal_position) FROM information_schema.columns WHERE table_name = 'kiln_history'")
        .await
        .unwrap();
    assert_eq!(
        columns[0],
        "version bigint, description text, script text, migration_group text, checksum text, state text, batch bigint, \
         applied_at timestamp with time zone, duration_ms bigint, applied_by text, kiln_version text, error text, error_statement integer, error_line integer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_errors_are_clear_and_never_show_the_password() {
    let db = TestDb::new(Engine::Postgres).await;

    let err = kiln_sql::connect(&BackendConfig::new("postgres://kiln:hunter2secret@127.0.0.1:1/db")).await.err().expect("refused");
    let text = err.to_string();
    assert!(matches!(err, EngineError::Connect { .. }), "{err:?}");
    assert!(text.to_lowercase().contains("connection refused"), "{text}");
    assert!(!text.contains("hunter2secret") && text.contains("***"), "{text}");

    let mut u = url::Url::parse(&db.url).unwrap();
    u.set_password(Some("hunter2secret")).unwrap();
    u.set_path("/kiln_no_such_database");
    let err = kiln_sql::connect(&BackendConfig::new(u.to_string())).await.err().expect("unknown database");
    let text = err.to_string();
    assert!(text.contains("database \"kiln_no_such_database\" does not exist"), "{text}");
    assert!(!text.contains("hunter2secret"), "{text}");

    for bad in ["postgres://kiln:hunter2secret@127.0.0.1:notaport/db", "postgres://kiln:hunter2secret@127.0.0.1/db?sslmode=sometimes"] {
        let err = kiln_sql::connect(&BackendConfig::new(bad)).await.err().expect("bad url");
        assert!(matches!(err, EngineError::BadUrl { .. }), "{err:?}");
        assert!(!err.to_string().contains("hunter2secret"), "{err}");
    }
    let err = kiln_sql::connect(&BackendConfig::new("postgres://kiln:hunter2secret@127.0.0.1/db?sslmode=sometimes")).await.err().unwrap();
    assert!(err.to_string().contains("sslmode"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_rows_are_complete_and_consistent_after_a_run() {
    let db = TestDb::new(Engine::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "users/0001_create_users.sql",
        "-- kiln:group users\n-- kiln:up\nCREATE TABLE users (id INT);\nCREATE TABLE settings_seen (value TEXT);\n\
         INSERT INTO settings_seen SELECT current_setting('synchronous_commit');\n-- kiln:down\nDROP TABLE settings_seen;\nDROP TABLE users;\n",
    );
    let local = load(dir.path());
    let before = chrono::Utc::now();
    let mut b = backend(&db).await;
    up(b.as_mut(), &local).await.unwrap();
    let after = chrono::Utc::now();

    // Each migration commits with synchronous_commit off (the run-end event flushes them).
    assert_eq!(db.query_strings("SELECT value FROM settings_seen").await.unwrap(), ["off"]);

    // Read back through a second, independent session.
    let mut other = backend(&db).await;
    let h = other.read_history().await.unwrap().unwrap();
    assert_eq!(h.len(), 1);
    let a = &h[0];
    assert_eq!(a.version.number, 1);
    assert_eq!(a.description, "create_users");
    assert_eq!(a.script, local[0].display_path());
    assert_eq!(a.group.as_deref(), Some("users"));
    assert_eq!(a.checksum, local[0].checksum);
    assert_eq!(a.state, State::Applied);
    assert_eq!(a.batch, 1);
    assert!(a.applied_at >= before - chrono::Duration::seconds(2) && a.applied_at <= after + chrono::Duration::seconds(2), "{}", a.applied_at);
    assert!(a.duration_ms >= 0 && a.duration_ms < 60_000);
    assert_eq!(a.applied_by, ACTOR);
    assert_eq!(a.kiln_version, kiln_core::KILN_VERSION);
    assert!(a.error.is_none());
    // The event log agrees with the history, and the run-end that made it durable is there.
    assert_eq!(
        db.query_strings("SELECT event || ':' || coalesce(version::text, '-') || ':' || coalesce(name, '-') || ':' || batch || ':' || actor FROM kiln_log ORDER BY id")
            .await
            .unwrap(),
        ["run-start:-:-:1:tester@kiln-tests", "applied:1:create_users:1:tester@kiln-tests", "run-end:-:-:1:tester@kiln-tests"]
    );
    // upsert_history round-trips every field, failures included.
    let mut failed = a.clone();
    failed.state = State::Failed;
    failed.error = Some(kiln_core::FailureInfo { message: "boom".into(), statement: Some(3), line: Some(7) });
    other.upsert_history(std::slice::from_ref(&failed)).await.unwrap();
    let back = other.read_history().await.unwrap().unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].state, State::Failed);
    assert_eq!(back[0].error, failed.error);
    assert_eq!(back[0].applied_at.timestamp_micros(), a.applied_at.timestamp_micros());
    other.delete_history(1).await.unwrap();
    assert!(other.read_history().await.unwrap().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_connection_mid_run_is_reported_and_leaves_no_half_migration() {
    let db = TestDb::new(Engine::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_fast.sql", "CREATE TABLE fast (id INT);\n");
    write(dir.path(), "0002_slow.sql", "CREATE TABLE slow (id INT);\nSELECT pg_sleep(30);\n");
    let local = load(dir.path());
    let url = format!("{}?application_name=victim-runner", db.url);
    let mut b = kiln_testkit::compat::Protocol::boxed(kiln_sql::connect(&BackendConfig::new(url)).await.unwrap());

    let killer = async {
        for _ in 0..300 {
            let n = db
                .query_strings("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'victim-runner' AND query LIKE '%pg_sleep%' AND state = 'active'")
                .await
                .unwrap();
            if n[0] == "1" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the slow migration never started");
    };
    let t = Instant::now();
    let (result, ()) = tokio::join!(up(b.as_mut(), &local), killer);
    assert!(t.elapsed() < Duration::from_secs(20), "must not wait for the sleep: {:?}", t.elapsed());
    let err = result.unwrap_err();
    assert!(matches!(err, RunError::Engine(EngineError::ConnectionLost { .. })), "{err:?}");
    assert!(err.to_string().contains("0002_slow"), "{err}");

    assert_eq!(tables(&db).await, ["fast", "kiln_history", "kiln_log", "kiln_snapshot"]);
    assert_eq!(history(&db).await, ["1:applied"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_control_in_a_body() {
    let db = TestDb::new(Engine::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    // golang-migrate style: the whole file wrapped in BEGIN/COMMIT is accepted.
    write(dir.path(), "0001_wrapped.up.sql", "BEGIN;\nCREATE TABLE wrapped (id INT);\nCOMMIT;\n");
    // A savepoint body runs one statement at a time, still in one transaction.
    write(dir.path(), "0002_savepoints.sql", "CREATE TABLE sp (id INT);\nSAVEPOINT s;\nINSERT INTO sp VALUES (1);\nRELEASE SAVEPOINT s;\n");
    // A COMMIT in the middle would split the migration: refused before anything runs.
    write(dir.path(), "0003_split.sql", "CREATE TABLE split_a (id INT);\nCOMMIT;\nCREATE TABLE split_b (id INT);\n");
    let local = load(dir.path());
    let mut b = backend(&db).await;
    let err = up(b.as_mut(), &local).await.unwrap_err();
    let RunError::Migration { version, outcome, error, .. } = err else { panic!("{err:?}") };
    assert_eq!((version.number, outcome, error.statement, error.line), (3, FailureOutcome::RolledBack, 2, 2));
    assert!(error.message.contains("kiln:transaction off"), "{}", error.message);
    assert_eq!(tables(&db).await, ["kiln_history", "kiln_log", "kiln_snapshot", "sp", "wrapped"]);
    assert_eq!(history(&db).await, ["1:applied", "2:applied"]);
    assert_eq!(db.query_strings("SELECT count(*) FROM sp").await.unwrap(), ["1"]);

    // A savepoint body that fails is rolled back as a whole.
    write(
        dir.path(),
        "0003_split.sql",
        "CREATE TABLE t3 (id INT);\nSAVEPOINT s;\nINSERT INTO t3 VALUES ('x');\nROLLBACK TO SAVEPOINT s;\nCREATE TABLE t3b (id INT);\n",
    );
    let err = up(b.as_mut(), &load(dir.path())).await.unwrap_err();
    let RunError::Migration { error, outcome, .. } = err else { panic!("{err:?}") };
    assert_eq!((error.statement, error.code.as_deref(), outcome), (3, Some("22P02"), FailureOutcome::RolledBack));
    assert_eq!(tables(&db).await, ["kiln_history", "kiln_log", "kiln_snapshot", "sp", "wrapped"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_constraint_failing_at_commit_rolls_back() {
    let db = TestDb::new(Engine::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "0001_deferred.sql",
        "CREATE TABLE parent (id INT PRIMARY KEY);\n\
         CREATE TABLE child (parent_id INT REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED);\n\
         INSERT INTO child VALUES (42);\n",
    );
    let mut b = backend(&db).await;
    let err = up(b.as_mut(), &load(dir.path())).await.unwrap_err();
    let RunError::Migration { error, outcome, .. } = err else { panic!("{err:?}") };
    assert_eq!(outcome, FailureOutcome::RolledBack);
    assert!(error.message.starts_with("at COMMIT: 23503"), "{}", error.message);
    assert_eq!(tables(&db).await, ["kiln_history", "kiln_log", "kiln_snapshot"]);
    assert!(history(&db).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_per_tenant() {
    let db = TestDb::new(Engine::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "0001_orders.sql",
        "CREATE TABLE orders (id INT);\n-- A migration may move the search_path; kiln's own writes must not follow it.\nSET search_path TO public;\n",
    );
    write(dir.path(), "0002_lines.sql", "CREATE TABLE lines (id INT);\n");
    let local = load(dir.path());
    let mut cfg = BackendConfig::new(db.url.clone());
    cfg.schema = Some("Tenant A".into());
    let mut b = kiln_testkit::compat::Protocol::boxed(kiln_sql::connect(&cfg).await.unwrap());
    assert!(b.read_history().await.unwrap().is_none());
    assert!(db.query_strings("SELECT nspname::text FROM pg_namespace WHERE nspname = 'Tenant A'").await.unwrap().is_empty());

    up(b.as_mut(), &local).await.unwrap();
    assert_eq!(
        db.query_strings("SELECT tablename::text FROM pg_tables WHERE schemaname = 'Tenant A' ORDER BY 1").await.unwrap(),
        ["kiln_history", "kiln_log", "kiln_snapshot", "lines", "orders"]
    );
    assert!(tables(&db).await.is_empty(), "nothing lands in public");
    assert_eq!(db.query_strings("SELECT count(*) FROM \"Tenant A\".kiln_history").await.unwrap(), ["2"]);

    // Another tenant in the same database has its own history and lock.
    let mut cfg_b = BackendConfig::new(db.url.clone());
    cfg_b.schema = Some("tenant_b".into());
    let mut other = kiln_testkit::compat::Protocol::boxed(kiln_sql::connect(&cfg_b).await.unwrap());
    assert!(b.try_lock().await.unwrap());
    assert!(other.try_lock().await.unwrap(), "tenants do not share a lock");
    assert!(other.read_history().await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_modes_and_connect_speed() {
    let db = TestDb::new(Engine::Postgres).await;
    let with = |q: &str| format!("{}?application_name=tls-probe&{q}", db.url);

    for (i, (query, expect_tls)) in [("sslmode=disable", "false"), ("sslmode=prefer", "true"), ("sslmode=require", "true")].into_iter().enumerate() {
        let name = format!("tls-probe-{i}");
        let b = pg(BackendConfig::new(format!("{}?application_name={name}&{query}", db.url))).await.unwrap();
        let ssl = db
            .query_strings(&format!("SELECT s.ssl::text FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = '{name}'"))
            .await
            .unwrap();
        assert_eq!(ssl, [expect_tls], "{query}");
        Box::new(b).close().await.unwrap();
    }

    // The server's certificate is the self-signed snakeoil one for `localhost`.
    let ca = "/etc/ssl/certs/ssl-cert-snakeoil.pem";
    let b = pg(BackendConfig::new(with(&format!("sslmode=verify-ca&sslrootcert={ca}")))).await.unwrap();
    Box::new(b).close().await.unwrap();
    let err = pg(BackendConfig::new(with(&format!("sslmode=verify-full&sslrootcert={ca}")))).await.err().expect("wrong name");
    assert!(err.to_string().contains("certificate not valid for name"), "{err}");
    let u = url::Url::parse(&db.url).unwrap();
    let by_name = format!(
        "postgres://{}@localhost:{}{}?hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert={ca}",
        u.username(),
        u.port().unwrap_or(5432),
        u.path()
    );
    let b = pg(BackendConfig::new(by_name)).await.unwrap();
    Box::new(b).close().await.unwrap();
    let err = pg(BackendConfig::new(with("sslmode=verify-full"))).await.err().expect("unknown issuer");
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");

    // With TCP_NODELAY, TLS costs a handshake (a few ms), not Nagle/delayed-ACK
    // stalls (40-90 ms on every connection). The machine is shared, so compare
    // the best of several connects: a stall would show in every one of them.
    async fn best_connect(url: &str) -> Duration {
        let mut best = Duration::MAX;
        for _ in 0..9 {
            let t = Instant::now();
            let b = pg(BackendConfig::new(url)).await.unwrap();
            best = best.min(t.elapsed());
            Box::new(b).close().await.unwrap();
        }
        best
    }
    let plain = best_connect(&with("sslmode=disable")).await;
    let tls = best_connect(&with("sslmode=require")).await;
    assert!(tls < plain + Duration::from_millis(15), "TLS {tls:?} vs plain {plain:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_host() {
    let db = TestDb::new(Engine::Postgres).await;
    let u = url::Url::parse(&db.url).unwrap();
    let url = format!("postgres://{}@{}?host=/var/run/postgresql&application_name=socket-probe", u.username(), u.path());
    let mut b = kiln_testkit::compat::Protocol::boxed(kiln_sql::connect(&BackendConfig::new(url)).await.unwrap());
    b.ensure_history().await.unwrap();
    assert_eq!(
        db.query_strings("SELECT coalesce(client_addr::text, 'local') FROM pg_stat_activity WHERE application_name = 'socket-probe'").await.unwrap(),
        ["local"]
    );
    assert_eq!(tables(&db).await, ["kiln_history", "kiln_log", "kiln_snapshot"]);
}

/// A TCP proxy that adds `delay` in each direction, like a database across a
/// network, and counts round trips: the client's *turns*, each a burst of
/// client→server bytes that follows an answer from the server (a pipeline
/// sent at once is one turn, however many reads it takes). The delay makes
/// the count robust: an answer reaches the client `2 × delay` after the
/// request left it, so a pipeline is on the wire long before any answer
/// could split it into two turns.
async fn latency_proxy(target: std::net::SocketAddr, delay: Duration) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    /// Which side sent last: `true` for the client.
    type LastSender = Arc<Mutex<Option<bool>>>;
    async fn pipe(
        mut r: tokio::net::tcp::OwnedReadHalf,
        mut w: tokio::net::tcp::OwnedWriteHalf,
        delay: Duration,
        from_client: bool,
        last: LastSender,
        turns: Arc<AtomicUsize>,
    ) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
        tokio::spawn(async move {
            while let Some((at, bytes)) = rx.recv().await {
                tokio::time::sleep_until(at + delay).await;
                if w.write_all(&bytes).await.is_err() {
                    break;
                }
            }
        });
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = r.read(&mut buf).await {
            {
                let mut last = last.lock().unwrap();
                if from_client && *last != Some(true) {
                    turns.fetch_add(1, Ordering::SeqCst);
                }
                *last = Some(from_client);
            }
            if tx.send((tokio::time::Instant::now(), buf[..n].to_vec())).is_err() {
                break;
            }
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let turns = Arc::new(AtomicUsize::new(0));
    let counted = turns.clone();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let outbound = tokio::net::TcpStream::connect(target).await.unwrap();
            inbound.set_nodelay(true).unwrap();
            outbound.set_nodelay(true).unwrap();
            let (ri, wi) = inbound.into_split();
            let (ro, wo) = outbound.into_split();
            let last: LastSender = Arc::new(Mutex::new(None));
            tokio::spawn(pipe(ri, wo, delay, true, last.clone(), counted.clone()));
            tokio::spawn(pipe(ro, wi, delay, false, last, counted.clone()));
        }
    });
    (addr, turns)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transactional_migration_costs_one_round_trip() {
    use std::sync::atomic::Ordering;
    let db = TestDb::new(Engine::Postgres).await;
    let u = url::Url::parse(&db.url).unwrap();
    let server = tokio::net::lookup_host((u.host_str().unwrap(), u.port().unwrap_or(5432))).await.unwrap().next().unwrap();
    let (proxy, turns) = latency_proxy(server, Duration::from_millis(50)).await;
    let url = format!("postgres://{}@{}{}?sslmode=disable", u.username(), proxy, u.path());

    let dir = tempfile::tempdir().unwrap();
    let body: String = (1..=10).map(|i| format!("CREATE TABLE t{i} (id INT);\n")).collect();
    write(dir.path(), "0001_ten_tables.sql", &body);
    write(dir.path(), "0002_fails.sql", "CREATE TABLE t11 (id INT);\nCREATE TABLE t12 (id INT);\nSELECT 1/0;\nCREATE TABLE t13 (id INT);\n");
    let local = load(dir.path());
    let mut b = pg(BackendConfig::new(url)).await.unwrap();
    b.ensure_history().await.unwrap();
    let ctx = kiln_core::RecordContext { batch: 1, actor: ACTOR.into() };
    let round_trips = |f: usize| turns.load(Ordering::SeqCst) - f;

    // Sent one statement at a time this would be 13 round trips (BEGIN, 10
    // statements, two INSERTs and COMMIT); pipelined it is one.
    let from = turns.load(Ordering::SeqCst);
    b.apply(&local[0], &ctx).await.unwrap();
    assert_eq!(round_trips(from), 1, "round trips to apply a migration of 10 statements");
    assert_eq!(db.query_strings("SELECT count(*) FROM pg_tables WHERE tablename ~ '^t[0-9]+$'").await.unwrap(), ["10"]);

    // A failure costs the pipeline plus the small transaction logging it.
    let from = turns.load(Ordering::SeqCst);
    let Err(kiln_core::StepError::Body(e)) = b.apply(&local[1], &ctx).await else { panic!("expected a body error") };
    assert_eq!((e.error.statement, e.error.code.as_deref()), (3, Some("22012")));
    assert_eq!(round_trips(from), 2, "round trips of a failed migration");
    assert_eq!(db.query_strings("SELECT count(*) FROM pg_tables WHERE tablename ~ '^t[0-9]+$'").await.unwrap(), ["10"]);

    // The durable log write is one round trip too.
    let from = turns.load(Ordering::SeqCst);
    let entry = kiln_core::LogEntry {
        at: chrono::Utc::now(),
        event: kiln_core::LogEvent::RunEnd,
        version: None,
        name: None,
        batch: Some(1),
        actor: ACTOR.into(),
        reason: None,
        detail: None,
    };
    b.log(&entry).await.unwrap();
    assert_eq!(round_trips(from), 1, "round trips of a durable log write");
    assert_eq!(db.query_strings("SELECT event FROM kiln_log ORDER BY id").await.unwrap(), ["applied", "failed", "run-end"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_lock_guard_releases_the_lock_before_the_next_request() {
    use kiln_core::engine::Locker;
    let db = TestDb::new(Engine::Postgres).await;
    let mut a = PgBackend::connect(&BackendConfig::new(db.url.clone())).await.unwrap();
    let mut b = backend(&db).await;

    let guard = kiln_core::lock::acquire(&mut a, "test", Duration::from_secs(1), |_| {}).await.unwrap();
    assert!(!b.try_lock().await.unwrap());
    // Dropped without release (a cancelled future, an early `?`): the unlock
    // is queued on a's session at once, so a's next request comes after it.
    drop(guard);
    assert!(a.try_lock().await.unwrap());
    assert!(!b.try_lock().await.unwrap(), "a took the lock again after the background unlock, so it must hold it");
    a.unlock().await.unwrap();
    assert!(b.try_lock().await.unwrap(), "one unlock releases it");

    // A guard dropped after its engine is gone does nothing (the session ended, and the lock with it).
    b.unlock().await.unwrap();
    let guard = kiln_core::lock::acquire(&mut a, "test", Duration::from_secs(1), |_| {}).await.unwrap();
    kiln_core::engine::Engine::close(Box::new(a)).await.unwrap();
    drop(guard);
    b.lock(Duration::from_secs(5)).await.unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_reports_columns_indexes_and_constraints_without_kilns_tables() {
    let db = TestDb::new(Engine::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "0001_schema.sql",
        "CREATE TABLE users (id BIGSERIAL PRIMARY KEY, email VARCHAR(255) NOT NULL, name TEXT, tenant_id INT NOT NULL,\n\
         created_at TIMESTAMPTZ NOT NULL DEFAULT now(), CONSTRAINT users_email_key UNIQUE (email),\n\
         CONSTRAINT users_name_len CHECK (length(name) < 100));\n\
         ALTER TABLE users DROP COLUMN tenant_id;\n\
         CREATE TABLE posts (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, user_id BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,\n\
         title TEXT NOT NULL, body TEXT, published BOOLEAN, score NUMERIC(10, 2));\n\
         CREATE INDEX posts_user_idx ON posts (user_id, id DESC);\n\
         CREATE UNIQUE INDEX posts_title_lower ON posts (lower(title)) WHERE published;\n\
         CREATE INDEX posts_body_gin ON posts USING gin (to_tsvector('english', body));\n\
         CREATE TABLE empty ();\n\
         CREATE VIEW recent_posts AS SELECT * FROM posts;\n\
         CREATE SCHEMA geo;\n\
         CREATE TABLE geo.countries (code TEXT PRIMARY KEY);\n\
         CREATE TABLE addresses (user_id BIGINT, kind TEXT, country TEXT REFERENCES geo.countries (code) ON UPDATE CASCADE DEFERRABLE INITIALLY DEFERRED,\n\
         PRIMARY KEY (user_id, kind), CONSTRAINT addresses_one UNIQUE NULLS NOT DISTINCT (kind, country) INCLUDE (user_id),\n\
         CONSTRAINT addresses_user FOREIGN KEY (user_id) REFERENCES users (id) MATCH FULL);\n",
    );
    let local = load(dir.path());
    let mut b = backend(&db).await;
    up(b.as_mut(), &local).await.unwrap();

    let s = b.inspect().await.unwrap();
    assert_eq!(s.objects.keys().collect::<Vec<_>>(), ["addresses", "empty", "posts", "users"], "no kiln tables, no views, no other schema");
    assert!(s.objects["empty"].columns.is_empty());

    let users = &s.objects["users"];
    assert_eq!(
        users.columns.iter().map(|(k, v)| (k.as_str(), v.clone())).collect::<Vec<_>>(),
        [
            ("created_at", col("timestamp with time zone", false)),
            ("email", col("character varying(255)", false)),
            ("id", col("bigint", false)),
            ("name", col("text", true)),
        ],
        "the dropped column is gone"
    );
    // The indexes behind the primary key and the unique constraint are reported as the constraints.
    assert!(users.indexes.is_empty(), "{:?}", users.indexes);
    assert_eq!(users.constraints["users_pkey"], ConstraintInfo { kind: "primary key".into(), columns: strings(&["id"]), definition: None });
    assert_eq!(users.constraints["users_email_key"], ConstraintInfo { kind: "unique".into(), columns: strings(&["email"]), definition: None });
    assert_eq!(
        users.constraints["users_name_len"],
        ConstraintInfo { kind: "check".into(), columns: strings(&["name"]), definition: Some("CHECK (length(name) < 100)".into()) }
    );

    let posts = &s.objects["posts"];
    assert_eq!(posts.columns["score"], col("numeric(10,2)", true));
    assert_eq!(
        posts.constraints["posts_user_id_fkey"],
        ConstraintInfo {
            kind: "foreign key".into(),
            columns: strings(&["user_id"]),
            definition: Some("references users (id) on update no action on delete cascade".into())
        }
    );
    assert_eq!(posts.constraints.len(), 2, "{:?}", posts.constraints);
    assert_eq!(
        posts.indexes["posts_user_idx"],
        IndexInfo { columns: strings(&["user_id", "id"]), unique: false, options: Some("keys (user_id, id desc)".into()) }
    );
    assert_eq!(
        posts.indexes["posts_title_lower"],
        IndexInfo { columns: strings(&["lower(title)"]), unique: true, options: Some("where published".into()) }
    );
    assert_eq!(
        posts.indexes["posts_body_gin"],
        IndexInfo { columns: strings(&["to_tsvector('english'::regconfig, body)"]), unique: false, options: Some("using gin".into()) }
    );
    assert_eq!(posts.indexes.len(), 3, "{:?}", posts.indexes);

    let addresses = &s.objects["addresses"];
    let constraint = |kind: &str, columns: &[&str], definition: Option<&str>| ConstraintInfo {
        kind: kind.into(),
        columns: strings(columns),
        definition: definition.map(str::to_string),
    };
    assert_eq!(
        addresses.constraints.iter().map(|(k, v)| (k.as_str(), v.clone())).collect::<Vec<_>>(),
        [
            (
                "addresses_country_fkey",
                constraint(
                    "foreign key",
                    &["country"],
                    Some("references geo.countries (code) on update cascade on delete no action deferrable initially deferred")
                )
            ),
            ("addresses_one", constraint("unique", &["kind", "country"], Some("nulls not distinct include (user_id)"))),
            ("addresses_pkey", constraint("primary key", &["user_id", "kind"], None)),
            (
                "addresses_user",
                constraint("foreign key", &["user_id"], Some("references users (id) on update no action on delete no action match full"))
            ),
        ]
    );
    assert!(addresses.indexes.is_empty(), "{:?}", addresses.indexes);

    // A contract can ask for the unique constraint by name or by columns, and for indexes by name or columns.
    let c = contract(
        "tables:\n  users:\n    required: [id, {name: email, type: varchar(255), nullable: false}, {name: created_at, type: timestamptz}]\n\
         \x20   unique: [users_email_key, [email]]\n    indexes: [users_pkey]\n\
         \x20 posts:\n    required: [{name: id, type: int8}, user_id]\n    indexes: [posts_user_idx, [user_id, id]]\n    unique: [posts_title_lower]\n",
    );
    assert_eq!(schema::validate(&c, &s), vec![]);
    // The dump of the live schema is a contract the live schema satisfies.
    assert_eq!(schema::validate(&schema::dump(&s, false), &s), vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_is_the_same_from_any_session_in_a_tenant_schema() {
    let db = TestDb::new(Engine::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "0001_orders.sql",
        "CREATE TYPE status AS ENUM ('new', 'paid');\n\
         CREATE TABLE customers (id INT PRIMARY KEY);\n\
         CREATE TABLE orders (id INT PRIMARY KEY, customer_id INT REFERENCES customers (id), state status NOT NULL DEFAULT 'new',\n\
         CHECK (state <> 'paid' OR customer_id IS NOT NULL));\n\
         CREATE INDEX orders_new ON orders (customer_id) WHERE state = 'new';\n\
         SET search_path TO public;\n",
    );
    let local = load(dir.path());
    let mut cfg = BackendConfig::new(db.url.clone());
    cfg.schema = Some("Tenant A".into());
    let mut b = kiln_testkit::compat::Protocol::boxed(kiln_sql::connect(&cfg).await.unwrap());
    up(b.as_mut(), &local).await.unwrap();
    let s = b.inspect().await.unwrap();
    let orders = &s.objects["orders"];
    // Names in the inspected schema are not qualified, whatever the session's search_path.
    assert_eq!(orders.columns["state"], col("status", false));
    assert_eq!(orders.indexes["orders_new"].options.as_deref(), Some("where state = 'new'::status"));
    assert_eq!(
        orders.constraints["orders_customer_id_fkey"].definition.as_deref(),
        Some("references customers (id) on update no action on delete no action")
    );

    // A new session (search_path "$user", public) sees the same schema, so the
    // snapshot stored by the run shows no drift.
    let mut fresh = kiln_testkit::compat::Protocol::boxed(kiln_sql::connect(&cfg).await.unwrap());
    assert_eq!(fresh.inspect().await.unwrap(), s);
    assert_eq!(Runner::new(fresh.as_mut(), settings()).diff().await.unwrap(), Some(vec![]));
    // The default schema of the same database holds nothing.
    assert!(backend(&db).await.inspect().await.unwrap().objects.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_round_trip_and_keep_history() {
    let db = TestDb::new(Engine::Postgres).await;
    let mut b = backend(&db).await;
    // A database kiln never touched: no snapshot, and nothing gets created by asking.
    assert_eq!(b.load_snapshot().await.unwrap(), None);
    assert!(tables(&db).await.is_empty());
    assert_eq!(b.inspect().await.unwrap(), Snapshot::default());

    db.sql("CREATE TABLE items (id INT PRIMARY KEY, sku TEXT NOT NULL)").await.unwrap();
    let first = b.inspect().await.unwrap();
    // Saved without ensure_history: the table is created on demand.
    b.save_snapshot(&first).await.unwrap();
    assert_eq!(b.load_snapshot().await.unwrap(), Some(first.clone()));
    assert_eq!(tables(&db).await, ["items", "kiln_snapshot"]);
    assert_eq!(b.inspect().await.unwrap(), first, "kiln_snapshot is not part of the schema");

    db.sql("CREATE INDEX items_sku ON items (sku)").await.unwrap();
    let second = b.inspect().await.unwrap();
    assert_ne!(first, second);
    b.save_snapshot(&second).await.unwrap();
    assert_eq!(b.load_snapshot().await.unwrap(), Some(second), "the newest wins");
    assert_eq!(db.query_strings("SELECT count(*) FROM kiln_snapshot").await.unwrap(), ["2"], "older snapshots are kept");

    // After a run the stored snapshot is the live schema; a hand-made change is drift.
    let dir = tempfile::tempdir().unwrap();
    three_migrations(dir.path());
    up(b.as_mut(), &load(dir.path())).await.unwrap();
    assert_eq!(Runner::new(b.as_mut(), settings()).diff().await.unwrap(), Some(vec![]));
    db.sql("CREATE INDEX by_hand ON users (email, id); ALTER TABLE posts DROP COLUMN body").await.unwrap();
    let drift = Runner::new(b.as_mut(), settings()).diff().await.unwrap().unwrap();
    let shown: Vec<String> = drift.iter().map(|c| c.to_string()).collect();
    assert_eq!(shown, ["- posts: column body removed (text)", "+ users: index by_hand added ((email, id))"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_dropping_a_required_column_is_rolled_back() {
    let db = TestDb::new(Engine::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_users.sql", "CREATE TABLE users (id BIGINT PRIMARY KEY, email TEXT NOT NULL, nickname TEXT);\n");
    write(
        dir.path(),
        "0002_cleanup.sql",
        "CREATE TABLE audit (id INT);\nALTER TABLE users DROP COLUMN email;\nALTER TABLE users DROP COLUMN nickname;\n",
    );
    write(dir.path(), "0003_more.sql", "CREATE TABLE more (id INT);\n");
    let local = load(dir.path());
    let c = contract("tables:\n  users:\n    required: [id, email]\n    optional: [nickname]\n");
    let mut b = backend(&db).await;

    let err = up_with(b.as_mut(), &local, &c).await.unwrap_err();
    let text = err.to_string();
    let RunError::Invalid { version, file, outcome, violations, done } = err else { panic!("expected a contract violation, got {err:?}") };
    assert_eq!((version.number, file.as_str(), outcome), (2, "0002_cleanup.sql", FailureOutcome::RolledBack));
    assert_eq!(done.iter().map(|v| v.number).collect::<Vec<_>>(), [1]);
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert_eq!((violations[0].object.as_str(), violations[0].message.as_str()), ("users", "required column email is missing"));
    assert!(text.contains("0002_cleanup.sql") && text.contains("email"), "{text}");

    // Nothing of 0002 remains: the columns, the other table, the history row, its `applied` event.
    assert_eq!(
        db.query_strings("SELECT column_name::text FROM information_schema.columns WHERE table_name = 'users' ORDER BY ordinal_position")
            .await
            .unwrap(),
        ["id", "email", "nickname"]
    );
    assert_eq!(tables(&db).await, ["kiln_history", "kiln_log", "kiln_snapshot", "users"]);
    assert_eq!(history(&db).await, ["1:applied"]);
    assert_eq!(events(&db).await, ["run-start", "applied:1", "failed:2", "run-end"]);
    let detail = db.query_strings("SELECT detail FROM kiln_log WHERE event = 'failed'").await.unwrap();
    assert!(detail[0].contains("required column email is missing"), "{detail:?}");

    // The lock was released and the database is usable: the next run stops at the same place.
    let again = up_with(b.as_mut(), &local, &c).await.unwrap_err();
    assert!(matches!(again, RunError::Invalid { ref version, .. } if version.number == 2), "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_optional_column_only_warns() {
    let db = TestDb::new(Engine::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_users.sql", "CREATE TABLE users (id BIGINT PRIMARY KEY, email TEXT NOT NULL);\n");
    let local = load(dir.path());
    let c = contract("tables:\n  users:\n    required: [id, email]\n    optional: [avatar_url]\n");
    let mut b = backend(&db).await;

    let report = up_with(b.as_mut(), &local, &c).await.unwrap();
    assert_eq!(report.steps.len(), 1);
    assert_eq!(history(&db).await, ["1:applied"]);
    let v = schema::validate(&c, &b.inspect().await.unwrap());
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!((v[0].severity, v[0].message.as_str()), (Severity::Warning, "optional column avatar_url is missing"));
    let check = Runner::new(b.as_mut(), settings()).check(&local, Some(&c)).await.unwrap();
    assert!(check.ok, "{check:?}");
    assert_eq!(check.violations, v);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_completed_by_later_migrations_is_fine_but_the_last_must_satisfy_the_contract() {
    let c = contract("tables:\n  users:\n    required: [id, email, {name: created_at, nullable: false}]\n    unique: [[email]]\n");

    // Built up over three migrations: only the end state must satisfy the contract.
    let db = TestDb::new(Engine::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_users.sql", "CREATE TABLE users (id BIGINT PRIMARY KEY);\n");
    write(dir.path(), "0002_email.sql", "ALTER TABLE users ADD COLUMN email TEXT NOT NULL;\nCREATE UNIQUE INDEX users_email ON users (email);\n");
    write(dir.path(), "0003_created_at.sql", "ALTER TABLE users ADD COLUMN created_at TIMESTAMPTZ NOT NULL DEFAULT now();\n");
    let mut b = backend(&db).await;
    let report = up_with(b.as_mut(), &load(dir.path()), &c).await.unwrap();
    assert_eq!(report.steps.len(), 3);
    assert_eq!(history(&db).await, ["1:applied", "2:applied", "3:applied"]);
    assert_eq!(schema::validate(&c, &b.inspect().await.unwrap()), vec![]);

    // The same contract, but the run ends short of it: the last migration fails and is rolled back.
    let db = TestDb::new(Engine::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_users.sql", "CREATE TABLE users (id BIGINT PRIMARY KEY);\n");
    write(dir.path(), "0002_email.sql", "ALTER TABLE users ADD COLUMN email TEXT NOT NULL UNIQUE;\n");
    let mut b = backend(&db).await;
    let err = up_with(b.as_mut(), &load(dir.path()), &c).await.unwrap_err();
    let RunError::Invalid { version, outcome, violations, .. } = err else { panic!("{err:?}") };
    assert_eq!((version.number, outcome), (2, FailureOutcome::RolledBack));
    assert!(violations.iter().all(|v| v.severity == Severity::Error), "{violations:?}");
    assert_eq!(violations.iter().map(|v| v.message.as_str()).collect::<Vec<_>>(), ["required column created_at is missing"]);
    assert_eq!(history(&db).await, ["1:applied"]);
    assert_eq!(db.query_strings("SELECT count(*) FROM information_schema.columns WHERE table_name = 'users'").await.unwrap(), ["1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_outside_a_transaction_that_breaks_the_contract_is_recorded_failed() {
    let db = TestDb::new(Engine::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_users.sql", "CREATE TABLE users (id BIGINT PRIMARY KEY, email TEXT NOT NULL);\n");
    write(dir.path(), "0002_drop_email.sql", "-- kiln:transaction off\nALTER TABLE users DROP COLUMN email;\n");
    write(dir.path(), "0003_more.sql", "CREATE TABLE more (id INT);\n");
    let local = load(dir.path());
    let c = contract("tables:\n  users:\n    required: [id, email]\n");
    let mut b = backend(&db).await;

    let err = up_with(b.as_mut(), &local, &c).await.unwrap_err();
    let RunError::Invalid { version, outcome, .. } = err else { panic!("{err:?}") };
    assert_eq!((version.number, outcome), (2, FailureOutcome::RecordedFailed));
    // There was no transaction to roll back: the column is gone, and the entry blocks the next run.
    assert_eq!(db.query_strings("SELECT count(*) FROM information_schema.columns WHERE table_name = 'users'").await.unwrap(), ["1"]);
    assert_eq!(history(&db).await, ["1:applied", "2:failed"]);
    let error = db.query_strings("SELECT error FROM kiln_history WHERE version = 2").await.unwrap();
    assert!(error[0].contains("required column email is missing"), "{error:?}");
    // The next run is refused and tells the operator to repair (kiln_core::step
    // no longer puts the `kiln repair` hint into the recorded error itself).
    let blocked = up_with(b.as_mut(), &local, &c).await.unwrap_err();
    assert!(matches!(blocked, RunError::Plan(_)), "{blocked:?}");
    assert!(blocked.to_string().contains("kiln repair 0002"), "{blocked}");
    assert!(!tables(&db).await.contains(&"more".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_of_a_thousand_tables_takes_milliseconds() {
    let db = TestDb::new(Engine::Postgres).await;
    // Each table: 5 columns, a primary key, a unique constraint, a foreign key,
    // a check and a plain index.
    db.sql(
        "CREATE TABLE t0 (id INT PRIMARY KEY);\n\
         DO $$ BEGIN FOR i IN 1..999 LOOP EXECUTE format(\
         'CREATE TABLE t%s (id BIGINT PRIMARY KEY, code TEXT NOT NULL UNIQUE, parent_id INT REFERENCES t0 (id), \
          amount NUMERIC(12, 2) CHECK (amount >= 0), created_at TIMESTAMPTZ NOT NULL); CREATE INDEX t%s_created ON t%s (created_at)', i, i, i);\
         END LOOP; END $$;",
    )
    .await
    .unwrap();
    let mut b = backend(&db).await;
    let t = Instant::now();
    let s = b.inspect().await.unwrap();
    let took = t.elapsed();
    println!("inspect of {} tables took {took:?}", s.objects.len());
    let t = Instant::now();
    assert_eq!(b.inspect().await.unwrap(), s);
    println!("again, warm: {:?}", t.elapsed());
    assert_eq!(s.objects.len(), 1000);
    let t500 = &s.objects["t500"];
    assert_eq!((t500.columns.len(), t500.indexes.len(), t500.constraints.len()), (5, 1, 4), "{t500:?}");
    assert_eq!(t500.constraints["t500_parent_id_fkey"].definition.as_deref(), Some("references t0 (id) on update no action on delete no action"));
    assert_eq!(t500.constraints["t500_code_key"].columns, ["code"]);
    assert!(took < Duration::from_secs(5), "inspect of 1,000 tables took {took:?}: a query per table?");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scratch_databases_are_created_and_dropped_by_name() {
    let db = TestDb::new(Engine::Postgres).await;
    // Trust authentication ignores the password, which lets the test see that it is kept.
    let mut u = url::Url::parse(&db.url).unwrap();
    u.set_password(Some("s3cret")).unwrap();
    let mut b = kiln_testkit::compat::Protocol::boxed(kiln_sql::connect(&BackendConfig::new(u.to_string())).await.unwrap());
    let name = kiln_testkit::unique_name("kiln_verify");
    let exists = |name: String| {
        let db = &db;
        async move { db.query_strings(&format!("SELECT count(*) FROM pg_database WHERE datname = '{name}'")).await.unwrap() == ["1"] }
    };

    let url = b.create_scratch(&name).await.unwrap();
    assert!(exists(name.clone()).await);
    let mut expected = u.clone();
    expected.set_path(&format!("/{name}"));
    assert_eq!(url, expected.to_string(), "same server, user and password; another database");
    // It is empty, and usable; a session still connected does not stop the drop.
    let mut scratch = kiln_testkit::compat::Protocol::boxed(kiln_sql::connect(&BackendConfig::new(url)).await.unwrap());
    assert!(scratch.inspect().await.unwrap().objects.is_empty());
    assert!(scratch.read_history().await.unwrap().is_none());
    b.drop_scratch(&name).await.unwrap();
    assert!(!exists(name.clone()).await);
    b.drop_scratch(&name).await.unwrap(); // already gone: not an error

    // Only kiln's scratch names, never anything else.
    for other in ["postgres", db.name.as_str(), "kiln_verify_x\"; DROP DATABASE postgres; --"] {
        let err = b.drop_scratch(other).await.unwrap_err();
        assert!(matches!(err, EngineError::Refused(_)) && err.to_string().contains("kiln_verify_"), "{err}");
        assert!(b.create_scratch(other).await.is_err());
    }
    assert!(exists(db.name.clone()).await);
}
