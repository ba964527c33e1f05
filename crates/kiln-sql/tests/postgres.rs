//! The PostgreSQL engine against a real server: every test gets a fresh
//! database from kiln-testkit, drives the engine through `kiln_core::Runner`
//! with migrations loaded from a temporary directory, and checks what is really
//! in the database afterwards.

use std::path::Path;
use std::time::{Duration, Instant};

use kiln_core::split::Dialect;
use kiln_core::{
    load_dir, Backend, BackendConfig, DownTarget, EngineError, FailureOutcome, LoadOptions, Migration, PlanError, Policy, RunError, Runner,
    RunnerSettings, State, UpTarget, Version,
};
use kiln_sql::postgres::PgBackend;
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

async fn backend(db: &TestDb) -> Box<dyn Backend> {
    kiln_sql::connect(&BackendConfig::new(db.url.clone())).await.expect("connect")
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
    assert_eq!(tables(&db).await, ["kiln_history", "kiln_log", "posts", "users"]);
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
    assert_eq!(tables(&db).await, ["kiln_history", "kiln_log"]);
    assert!(history(&db).await.is_empty());
    assert_eq!(
        events(&db).await[5..],
        ["run-start", "reverted:3", "reverted:2", "reverted:1", "run-end"]
    );

    let report = up(b.as_mut(), &local).await.unwrap();
    assert_eq!(report.steps.len(), 3);
    assert_eq!(tables(&db).await, ["kiln_history", "kiln_log", "posts", "users"]);
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
    assert_eq!(tables(&db).await, ["first", "kiln_history", "kiln_log"]);
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
    assert_eq!(tables(&db).await, ["first", "kiln_history", "kiln_log", "never", "second", "third"]);
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
    assert_eq!(tables(&db).await, ["kiln_history", "kiln_log"]);
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
    assert_eq!(
        db.query_strings("SELECT error_statement || ':' || error_line || ':' || error FROM kiln_history WHERE version = 2").await.unwrap()[0],
        "2:4:42P01: relation \"no_such_table\" does not exist"
    );
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
    assert!(repair.changes[0].contains("pending again"), "{:?}", repair.changes);
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

    let report = Runner::new(b.as_mut(), settings())
        .retire(&load(dir.path()), dir.path(), &Version::from_number(2), "superseded by 0003")
        .await
        .unwrap();
    assert!(report.changes.iter().any(|c| c.contains("retired")), "{:?}", report.changes);
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
    let mut a = PgBackend::connect(&BackendConfig::new(holder_url)).await.unwrap();
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
    assert_eq!(tables(&db).await, ["kiln_history", "kiln_log"]);
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
    let mut b = kiln_sql::connect(&BackendConfig::new(url)).await.unwrap();

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

    assert_eq!(tables(&db).await, ["fast", "kiln_history", "kiln_log"]);
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
    assert_eq!(tables(&db).await, ["kiln_history", "kiln_log", "sp", "wrapped"]);
    assert_eq!(history(&db).await, ["1:applied", "2:applied"]);
    assert_eq!(db.query_strings("SELECT count(*) FROM sp").await.unwrap(), ["1"]);

    // A savepoint body that fails is rolled back as a whole.
    write(dir.path(), "0003_split.sql", "CREATE TABLE t3 (id INT);\nSAVEPOINT s;\nINSERT INTO t3 VALUES ('x');\nROLLBACK TO SAVEPOINT s;\nCREATE TABLE t3b (id INT);\n");
    let err = up(b.as_mut(), &load(dir.path())).await.unwrap_err();
    let RunError::Migration { error, outcome, .. } = err else { panic!("{err:?}") };
    assert_eq!((error.statement, error.code.as_deref(), outcome), (3, Some("22P02"), FailureOutcome::RolledBack));
    assert_eq!(tables(&db).await, ["kiln_history", "kiln_log", "sp", "wrapped"]);
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
    assert_eq!(tables(&db).await, ["kiln_history", "kiln_log"]);
    assert!(history(&db).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_per_tenant() {
    let db = TestDb::new(Engine::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_orders.sql", "CREATE TABLE orders (id INT);\n-- A migration may move the search_path; kiln's own writes must not follow it.\nSET search_path TO public;\n");
    write(dir.path(), "0002_lines.sql", "CREATE TABLE lines (id INT);\n");
    let local = load(dir.path());
    let mut cfg = BackendConfig::new(db.url.clone());
    cfg.schema = Some("Tenant A".into());
    let mut b = kiln_sql::connect(&cfg).await.unwrap();
    assert!(b.read_history().await.unwrap().is_none());
    assert!(db.query_strings("SELECT nspname::text FROM pg_namespace WHERE nspname = 'Tenant A'").await.unwrap().is_empty());

    up(b.as_mut(), &local).await.unwrap();
    assert_eq!(
        db.query_strings("SELECT tablename::text FROM pg_tables WHERE schemaname = 'Tenant A' ORDER BY 1").await.unwrap(),
        ["kiln_history", "kiln_log", "lines", "orders"]
    );
    assert!(tables(&db).await.is_empty(), "nothing lands in public");
    assert_eq!(db.query_strings("SELECT count(*) FROM \"Tenant A\".kiln_history").await.unwrap(), ["2"]);

    // Another tenant in the same database has its own history and lock.
    let mut cfg_b = BackendConfig::new(db.url.clone());
    cfg_b.schema = Some("tenant_b".into());
    let mut other = kiln_sql::connect(&cfg_b).await.unwrap();
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
        let b = PgBackend::connect(&BackendConfig::new(format!("{}?application_name={name}&{query}", db.url))).await.unwrap();
        let ssl = db
            .query_strings(&format!("SELECT s.ssl::text FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = '{name}'"))
            .await
            .unwrap();
        assert_eq!(ssl, [expect_tls], "{query}");
        Box::new(b).close().await.unwrap();
    }

    // The server's certificate is the self-signed snakeoil one for `localhost`.
    let ca = "/etc/ssl/certs/ssl-cert-snakeoil.pem";
    let b = PgBackend::connect(&BackendConfig::new(with(&format!("sslmode=verify-ca&sslrootcert={ca}")))).await.unwrap();
    Box::new(b).close().await.unwrap();
    let err = PgBackend::connect(&BackendConfig::new(with(&format!("sslmode=verify-full&sslrootcert={ca}")))).await.err().expect("wrong name");
    assert!(err.to_string().contains("certificate not valid for name"), "{err}");
    let u = url::Url::parse(&db.url).unwrap();
    let by_name = format!("postgres://{}@localhost:{}{}?hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert={ca}", u.username(), u.port().unwrap_or(5432), u.path());
    let b = PgBackend::connect(&BackendConfig::new(by_name)).await.unwrap();
    Box::new(b).close().await.unwrap();
    let err = PgBackend::connect(&BackendConfig::new(with("sslmode=verify-full"))).await.err().expect("unknown issuer");
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");

    // With TCP_NODELAY, TLS costs a handshake (a few ms), not Nagle/delayed-ACK
    // stalls (40-90 ms on every connection). The machine is shared, so compare
    // the best of several connects: a stall would show in every one of them.
    async fn best_connect(url: &str) -> Duration {
        let mut best = Duration::MAX;
        for _ in 0..9 {
            let t = Instant::now();
            let b = PgBackend::connect(&BackendConfig::new(url)).await.unwrap();
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
    let mut b = kiln_sql::connect(&BackendConfig::new(url)).await.unwrap();
    b.ensure_history().await.unwrap();
    assert_eq!(
        db.query_strings("SELECT coalesce(client_addr::text, 'local') FROM pg_stat_activity WHERE application_name = 'socket-probe'").await.unwrap(),
        ["local"]
    );
    assert_eq!(tables(&db).await, ["kiln_history", "kiln_log"]);
}



/// A TCP proxy that adds `delay` in each direction, like a database across a
/// network: time spent then counts round trips.
async fn latency_proxy(target: std::net::SocketAddr, delay: Duration) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    async fn pipe(mut r: tokio::net::tcp::OwnedReadHalf, mut w: tokio::net::tcp::OwnedWriteHalf, delay: Duration) {
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
            if tx.send((tokio::time::Instant::now(), buf[..n].to_vec())).is_err() {
                break;
            }
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let outbound = tokio::net::TcpStream::connect(target).await.unwrap();
            inbound.set_nodelay(true).unwrap();
            outbound.set_nodelay(true).unwrap();
            let (ri, wi) = inbound.into_split();
            let (ro, wo) = outbound.into_split();
            tokio::spawn(pipe(ri, wo, delay));
            tokio::spawn(pipe(ro, wi, delay));
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transactional_migration_costs_one_round_trip() {
    let db = TestDb::new(Engine::Postgres).await;
    let u = url::Url::parse(&db.url).unwrap();
    let server = tokio::net::lookup_host((u.host_str().unwrap(), u.port().unwrap_or(5432))).await.unwrap().next().unwrap();
    let one_way = Duration::from_millis(25);
    let rtt = one_way * 2;
    let proxy = latency_proxy(server, one_way).await;
    let url = format!("postgres://{}@{}{}?sslmode=disable", u.username(), proxy, u.path());

    let dir = tempfile::tempdir().unwrap();
    let body: String = (1..=10).map(|i| format!("CREATE TABLE t{i} (id INT);\n")).collect();
    write(dir.path(), "0001_ten_tables.sql", &body);
    write(dir.path(), "0002_fails.sql", "CREATE TABLE t11 (id INT);\nCREATE TABLE t12 (id INT);\nSELECT 1/0;\nCREATE TABLE t13 (id INT);\n");
    let local = load(dir.path());
    let mut b = PgBackend::connect(&BackendConfig::new(url)).await.unwrap();
    b.ensure_history().await.unwrap();
    let ctx = kiln_core::RecordContext { batch: 1, actor: ACTOR.into() };

    // Sent one statement at a time this would be 13 round trips (BEGIN, 10
    // statements, two INSERTs and COMMIT); pipelined it is one.
    let t = Instant::now();
    b.apply(&local[0], &ctx).await.unwrap();
    let took = t.elapsed();
    assert!(took < rtt * 3, "apply of 10 statements took {took:?} with a {rtt:?} round trip");
    assert_eq!(db.query_strings("SELECT count(*) FROM pg_tables WHERE tablename ~ '^t[0-9]+$'").await.unwrap(), ["10"]);

    // A failure costs the pipeline plus the small transaction logging it.
    let t = Instant::now();
    let Err(kiln_core::StepError::Body(e)) = b.apply(&local[1], &ctx).await else { panic!("expected a body error") };
    let took = t.elapsed();
    assert_eq!((e.error.statement, e.error.code.as_deref()), (3, Some("22012")));
    assert!(took < rtt * 4, "failed apply took {took:?} with a {rtt:?} round trip");
    assert_eq!(db.query_strings("SELECT count(*) FROM pg_tables WHERE tablename ~ '^t[0-9]+$'").await.unwrap(), ["10"]);

    // The durable log write is one round trip too.
    let t = Instant::now();
    let entry = kiln_core::LogEntry {
        at: chrono::Utc::now(),
        event: "run-end".into(),
        version: None,
        name: None,
        batch: Some(1),
        actor: ACTOR.into(),
        reason: None,
        detail: None,
    };
    b.log(&entry).await.unwrap();
    assert!(t.elapsed() < rtt * 2, "log took {:?}", t.elapsed());
    assert_eq!(db.query_strings("SELECT event FROM kiln_log ORDER BY id").await.unwrap(), ["applied", "failed", "run-end"]);
}
