//! The PostgreSQL engine against a real server: every test gets a fresh
//! database from kiln-testkit, drives the engine through `kiln_core::Runner`
//! with migrations loaded from a temporary directory, and checks what is really
//! in the database afterwards.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[allow(unused_imports)]
use kiln_core::engine::{Engine as _, Locker as _};
use kiln_core::schema::{self, ColumnInfo, Contract, Severity};
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
    // stalls (at least 40 ms on every connection). This is a guard against that
    // stall, not a speed target (those live in bench/): the machine is shared,
    // so compare the best of many connects — a stall shows in every one — with
    // the stall's own size as the bound.
    async fn best_connect(url: &str) -> Duration {
        let mut best = Duration::MAX;
        for _ in 0..15 {
            let t = Instant::now();
            let b = pg(BackendConfig::new(url)).await.unwrap();
            best = best.min(t.elapsed());
            Box::new(b).close().await.unwrap();
        }
        best
    }
    let plain = best_connect(&with("sslmode=disable")).await;
    let tls = best_connect(&with("sslmode=require")).await;
    assert!(tls < plain + Duration::from_millis(40), "TLS {tls:?} vs plain {plain:?}: a Nagle/delayed-ACK stall?");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transactional_migration_costs_one_round_trip() {
    use std::sync::atomic::Ordering;
    let db = TestDb::new(Engine::Postgres).await;
    let u = url::Url::parse(&db.url).unwrap();
    let server = tokio::net::lookup_host((u.host_str().unwrap(), u.port().unwrap_or(5432))).await.unwrap().next().unwrap();
    let (proxy, turns) = kiln_testkit::proxy::latency_proxy(server, Duration::from_millis(50)).await;
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
