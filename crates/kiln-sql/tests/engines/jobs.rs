//! Backfill jobs (`kiln_jobs`, DESIGN §4) on the SQL engines, through
//! `Engine::jobs()` and the core's worker loop: every row converted exactly
//! once (the statement counts `n = n + 1`), parts shared by two workers,
//! failures with their key range, a growing table, refusals, operator
//! control between batches, and leases.
//!
//! SQL only: MongoDB's job store has its own suite in kiln-mongo.

use std::time::Duration;

use chrono::Utc;
use kiln_core::jobs::{
    parts_of, work_all, work_part, Backfill, Batch, BatchOutcome, JobControl, JobState, JobStore, PartEnd, SqlBackfill, WorkerOptions,
};
use kiln_core::{BackendConfig, EngineError, Statement};
use kiln_testkit::case::EngineCase;
use kiln_testkit::Engine;

const VERSION: u64 = 7;

/// An engine on the case's database.
async fn connect(case: &EngineCase) -> Box<dyn kiln_core::Engine> {
    kiln_sql::connect(&BackendConfig::new(case.url())).await.unwrap_or_else(|e| panic!("connect: {e}"))
}

fn jobs(e: &mut Box<dyn kiln_core::Engine>) -> &mut dyn JobStore {
    e.jobs().expect("SQL engines have a job store")
}

/// `users(id, full_name, display_name, n)` with `rows` rows (ids 1..=rows);
/// `display_name` may not be `'bad'`.
async fn users(case: &EngineCase, rows: u32) {
    let ddl = match case.engine {
        Engine::Postgres => {
            "CREATE TABLE users (id BIGINT PRIMARY KEY, full_name TEXT, display_name TEXT CHECK (display_name <> 'bad'), n INT NOT NULL DEFAULT 0)"
        }
        Engine::Mysql => {
            "CREATE TABLE users (id BIGINT PRIMARY KEY, full_name VARCHAR(100), display_name VARCHAR(100), n INT NOT NULL DEFAULT 0, \
             CONSTRAINT display_not_bad CHECK (display_name <> 'bad'))"
        }
        _ => "CREATE TABLE users (id INTEGER PRIMARY KEY, full_name TEXT, display_name TEXT CHECK (display_name <> 'bad'), n INTEGER NOT NULL DEFAULT 0)",
    };
    case.db.sql(ddl).await.expect("create users");
    add_users(case, 1, rows).await;
}

/// Insert users `from..=to`, named `user <id>`.
async fn add_users(case: &EngineCase, from: u32, to: u32) {
    if to < from {
        return;
    }
    let sql = match case.engine {
        Engine::Postgres => format!("INSERT INTO users (id, full_name) SELECT g, 'user ' || g FROM generate_series({from}, {to}) g"),
        Engine::Mysql => {
            // Digits cross-joined: recursive CTEs stop at 1,000 rows by default on MariaDB.
            let d = "(SELECT 0 d UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4 UNION ALL SELECT 5 \
                     UNION ALL SELECT 6 UNION ALL SELECT 7 UNION ALL SELECT 8 UNION ALL SELECT 9)";
            format!(
                "INSERT INTO users (id, full_name) SELECT i, CONCAT('user ', i) FROM (SELECT a.d + 10 * b.d + 100 * c.d + 1000 * e.d + 10000 * f.d AS i \
                 FROM {d} a, {d} b, {d} c, {d} e, {d} f) s WHERE i BETWEEN {from} AND {to}"
            )
        }
        _ => format!(
            "WITH RECURSIVE s(i) AS (SELECT {from} UNION ALL SELECT i + 1 FROM s WHERE i < {to}) INSERT INTO users (id, full_name) SELECT i, 'user ' || i FROM s"
        ),
    };
    case.db.sql(&sql).await.expect("insert users");
}

/// The backfill of `display_name` from `full_name`, counting every visit in `n`.
fn spec(batch: u32, parts: u32) -> Backfill {
    Backfill::Sql(SqlBackfill {
        file: "0007_display_name.sql".into(),
        table: "users".into(),
        key: "id".into(),
        batch,
        parts,
        statement: Statement { sql: "UPDATE users SET display_name = full_name, n = n + 1 WHERE id BETWEEN :lo AND :hi".into(), line: 4 },
        remaining: Statement { sql: "SELECT count(*) FROM users WHERE display_name IS NULL".into(), line: 6 },
        remaining_derived: false,
    })
}

/// Plan and queue `spec` as job [`VERSION`].
async fn enqueue(store: &mut dyn JobStore, spec: &Backfill) -> kiln_core::jobs::BackfillPlan {
    store.ensure_jobs().await.expect("ensure_jobs");
    let plan = store.plan_backfill(spec).await.expect("plan_backfill");
    store.replace_jobs(VERSION, &parts_of(VERSION, "0007_display_name", spec, &plan)).await.expect("replace_jobs");
    plan
}

fn opts(owner: &str) -> WorkerOptions {
    let mut o = WorkerOptions::new(owner);
    o.backoff = Duration::from_millis(10);
    o.max_retries = 2;
    o
}

fn quiet(_: &Batch) {}

/// `n` of the users as `n:count` groups, e.g. `["1:10000"]`.
async fn visits(case: &EngineCase) -> Vec<String> {
    let sql = match case.engine {
        Engine::Mysql => "SELECT CONCAT(n, ':', count(*)) FROM users GROUP BY n ORDER BY n",
        _ => "SELECT n || ':' || count(*) FROM users GROUP BY n ORDER BY n",
    };
    case.strings(sql).await
}

on!(backfill_converts_every_row_exactly_once: postgres, mysql, sqlite);
async fn backfill_converts_every_row_exactly_once(engine: Engine) {
    let case = EngineCase::new(engine).await;
    users(&case, 10_000).await;
    let mut e = connect(&case).await;
    let store = jobs(&mut e);
    // Reading jobs creates nothing.
    assert_eq!(store.list_jobs().await.unwrap(), vec![]);
    assert!(!case.all_objects().await.contains(&"kiln_jobs".to_string()));
    store.ensure_jobs().await.unwrap();
    let spec = spec(500, 1);
    assert_eq!(store.count_remaining(&spec).await.unwrap(), 10_000);
    let plan = enqueue(store, &spec).await;
    assert_eq!((plan.total, plan.bounds.len()), (10_000, 0));
    let queued = store.list_jobs().await.unwrap();
    assert_eq!(queued.len(), 1);
    assert_eq!((queued[0].state, queued[0].rows_total, &queued[0].spec), (JobState::Queued, Some(10_000), &spec));

    let report = work_all(store, &opts("worker-1"), Some(VERSION), &quiet).await.unwrap();
    assert_eq!((report.done.len(), report.failed.len(), report.stopped.len()), (1, 0, 0));
    let done = &report.done[0];
    assert_eq!((done.state, done.rows_done, done.batches, done.cursor.as_deref()), (JobState::Done, 10_000, 20, Some("10000")));
    assert_eq!((done.lease_owner.as_deref(), done.attempts, done.error.as_deref()), (None, 1, None));
    assert!(done.finished_at.is_some() && done.started_at.is_some());
    assert_eq!(visits(&case).await, vec!["1:10000"]);
    assert_eq!(store.count_remaining(&spec).await.unwrap(), 0);
    assert_eq!(store.list_jobs().await.unwrap(), vec![done.clone()]);
    // Nothing is left to claim.
    assert_eq!(store.claim_job("worker-2", Utc::now(), Utc::now() + chrono::Duration::seconds(30), None).await.unwrap(), None);
}

on!(two_workers_share_a_four_part_job: postgres, mysql, sqlite);
async fn two_workers_share_a_four_part_job(engine: Engine) {
    let case = EngineCase::new(engine).await;
    users(&case, 10_000).await;
    let spec = spec(250, 4);
    let mut e = connect(&case).await;
    let plan = enqueue(jobs(&mut e), &spec).await;
    assert_eq!(plan.bounds, vec!["2500", "5000", "7500"]);

    let mut workers = Vec::new();
    for w in ["worker-a", "worker-b"] {
        let mut e = connect(&case).await;
        workers.push(tokio::spawn(async move { work_all(jobs(&mut e), &opts(w), None, &quiet).await.unwrap() }));
    }
    let mut done = Vec::new();
    for w in workers {
        let report = w.await.unwrap();
        assert_eq!((report.failed.len(), report.stopped.len()), (0, 0));
        done.extend(report.done);
    }
    done.sort_by_key(|j| j.part);
    assert_eq!(done.iter().map(|j| (j.part, j.rows_done)).collect::<Vec<_>>(), vec![(0, 2500), (1, 2500), (2, 2500), (3, 2500)]);
    let all = jobs(&mut e).list_jobs().await.unwrap();
    assert!(all.iter().all(|j| j.state == JobState::Done), "{all:?}");
    assert_eq!(visits(&case).await, vec!["1:10000"]);
    assert_eq!(jobs(&mut e).count_remaining(&spec).await.unwrap(), 0);
}

on!(failing_batch_fails_the_part_with_its_key_range: postgres, mysql, sqlite);
async fn failing_batch_fails_the_part_with_its_key_range(engine: Engine) {
    let case = EngineCase::new(engine).await;
    users(&case, 1000).await;
    case.db.sql("UPDATE users SET full_name = 'bad' WHERE id = 450").await.unwrap();
    let mut e = connect(&case).await;
    let store = jobs(&mut e);
    let spec = spec(100, 1);
    enqueue(store, &spec).await;
    let report = work_all(store, &opts("worker-1"), None, &quiet).await.unwrap();
    assert_eq!((report.done.len(), report.failed.len()), (0, 1));
    let failed = &report.failed[0];
    let error = failed.error.clone().unwrap_or_default();
    assert_eq!((failed.state, failed.rows_done, failed.cursor.as_deref()), (JobState::Failed, 400, Some("400")), "{error}");
    assert!(error.contains("keys 401..500"), "{error}");
    let code = match engine {
        Engine::Postgres => "23514",
        Engine::Mysql => "4025",
        _ => "CHECK constraint failed",
    };
    assert!(error.contains(code), "{error}");
    assert!(error.contains("kiln jobs retry 7"), "{error}");
    // The failed batches left nothing: rows before the bad batch once, after it never.
    assert_eq!(visits(&case).await, vec!["0:600", "1:400"]);
    assert_eq!(store.list_jobs().await.unwrap()[0].state, JobState::Failed);

    // Fixed and retried, it continues from its cursor.
    case.db.sql("UPDATE users SET full_name = 'fixed' WHERE id = 450").await.unwrap();
    assert_eq!(store.control_job(VERSION, &JobControl::Retry).await.unwrap(), 1);
    let retried = &store.list_jobs().await.unwrap()[0];
    assert_eq!((retried.state, retried.attempts, retried.error.as_deref(), retried.finished_at), (JobState::Queued, 0, None, None));
    let report = work_all(store, &opts("worker-1"), None, &quiet).await.unwrap();
    assert_eq!(report.done.len(), 1);
    assert_eq!(visits(&case).await, vec!["1:1000"]);
}

on!(empty_table_is_done_at_once: postgres, mysql, sqlite);
async fn empty_table_is_done_at_once(engine: Engine) {
    let case = EngineCase::new(engine).await;
    users(&case, 0).await;
    let mut e = connect(&case).await;
    let store = jobs(&mut e);
    let plan = enqueue(store, &spec(100, 4)).await;
    assert_eq!((plan.total, plan.bounds.len()), (0, 0));
    let report = work_all(store, &opts("worker-1"), None, &quiet).await.unwrap();
    assert_eq!(report.done.iter().map(|j| (j.state, j.rows_done, j.batches)).collect::<Vec<_>>(), vec![(JobState::Done, 0, 0)]);
}

on!(rows_added_during_the_backfill_are_converted: postgres, mysql, sqlite);
async fn rows_added_during_the_backfill_are_converted(engine: Engine) {
    let case = EngineCase::new(engine).await;
    users(&case, 1000).await;
    let mut e = connect(&case).await;
    let store = jobs(&mut e);
    enqueue(store, &spec(100, 1)).await;
    let o = opts("worker-1");
    let until = Utc::now() + chrono::Duration::seconds(30);
    let mut job = store.claim_job(&o.owner, Utc::now(), until, None).await.unwrap().expect("a part to claim");
    for _ in 0..2 {
        match store.run_batch(&job, &o.owner, until).await.unwrap() {
            BatchOutcome::Batch(b) => job = b.job,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(job.cursor.as_deref(), Some("200"));
    // The application inserts rows while the backfill runs.
    add_users(&case, 1001, 1250).await;
    match work_part(store, job, &o, &quiet).await.unwrap() {
        PartEnd::Done(j) => assert_eq!((j.rows_done, j.cursor.as_deref()), (1250, Some("1250"))),
        other => panic!("{other:?}"),
    }
    assert_eq!(visits(&case).await, vec!["1:1250"]);
}

on!(plan_refuses_a_key_that_is_not_unique: postgres, mysql, sqlite);
async fn plan_refuses_a_key_that_is_not_unique(engine: Engine) {
    let case = EngineCase::new(engine).await;
    case.db.sql("CREATE TABLE events (k INT, v VARCHAR(10)); CREATE UNIQUE INDEX events_k_v ON events (k, v)").await.unwrap();
    let mut e = connect(&case).await;
    let store = jobs(&mut e);
    let with = |table: &str, key: &str| match spec(10, 1) {
        Backfill::Sql(s) => Backfill::Sql(SqlBackfill { table: table.into(), key: key.into(), ..s }),
        other => other,
    };
    let refusal = |r: Result<kiln_core::jobs::BackfillPlan, EngineError>| match r {
        Err(EngineError::Refused(m)) => m,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let m = refusal(store.plan_backfill(&with("events", "k")).await);
    assert!(m.contains("0007_display_name.sql") && m.contains("events") && m.contains("not unique"), "{m}");
    let m = refusal(store.plan_backfill(&with("nothing_here", "id")).await);
    assert!(m.contains("nothing_here") && m.contains("does not exist"), "{m}");
    let m = refusal(store.plan_backfill(&with("events", "missing")).await);
    assert!(m.contains("no column missing"), "{m}");
    // A unique index on the key alone makes it walkable.
    case.db.sql("CREATE UNIQUE INDEX events_k ON events (k)").await.unwrap();
    assert_eq!(store.plan_backfill(&with("events", "k")).await.unwrap().total, 0);
}

on!(pause_and_cancel_stop_a_worker_between_batches: postgres, mysql, sqlite);
async fn pause_and_cancel_stop_a_worker_between_batches(engine: Engine) {
    let case = EngineCase::new(engine).await;
    users(&case, 1000).await;
    let (mut worker, mut operator) = (connect(&case).await, connect(&case).await);
    let store = jobs(&mut worker);
    enqueue(store, &spec(100, 1)).await;
    let o = opts("worker-1");
    let until = || Utc::now() + chrono::Duration::seconds(30);
    let batch = |outcome: BatchOutcome| match outcome {
        BatchOutcome::Batch(b) => b.job,
        other => panic!("{other:?}"),
    };

    let job = store.claim_job(&o.owner, Utc::now(), until(), None).await.unwrap().unwrap();
    let job = batch(store.run_batch(&job, &o.owner, until()).await.unwrap());
    assert_eq!(jobs(&mut operator).control_job(VERSION, &JobControl::Pause).await.unwrap(), 1);
    let paused = match work_part(store, job, &o, &quiet).await.unwrap() {
        PartEnd::Stopped(j) => j,
        other => panic!("{other:?}"),
    };
    assert_eq!((paused.state, paused.rows_done, paused.lease_owner.as_deref()), (JobState::Paused, 100, None));
    assert_eq!(visits(&case).await, vec!["0:900", "1:100"]);
    // A paused part is not claimed; resumed, it is.
    assert_eq!(store.claim_job("worker-2", Utc::now(), until(), None).await.unwrap(), None);
    assert_eq!(jobs(&mut operator).control_job(VERSION, &JobControl::Resume).await.unwrap(), 1);
    assert_eq!(jobs(&mut operator).control_job(VERSION, &JobControl::Resume).await.unwrap(), 0, "resume applies to paused parts only");

    let job = store.claim_job(&o.owner, Utc::now(), until(), None).await.unwrap().unwrap();
    assert_eq!((job.cursor.as_deref(), job.attempts), (Some("100"), 2));
    let job = batch(store.run_batch(&job, &o.owner, until()).await.unwrap());
    // A throttle change applies in any state, from the next batch on.
    let throttle = JobControl::Throttle { batch: Some(50), pause_ms: None, max_rows_per_sec: Some(Some(100_000)) };
    assert_eq!(jobs(&mut operator).control_job(VERSION, &throttle).await.unwrap(), 1);
    let job = batch(store.run_batch(&job, &o.owner, until()).await.unwrap());
    assert_eq!((job.throttle.batch, job.throttle.max_rows_per_sec, job.cursor.as_deref()), (50, Some(100_000), Some("250")));
    assert_eq!(jobs(&mut operator).control_job(VERSION, &JobControl::Cancel).await.unwrap(), 1);
    let cancelled = match work_part(store, job, &o, &quiet).await.unwrap() {
        PartEnd::Stopped(j) => j,
        other => panic!("{other:?}"),
    };
    assert_eq!((cancelled.state, cancelled.rows_done, cancelled.lease_owner.as_deref()), (JobState::Cancelled, 250, None));
    assert!(cancelled.finished_at.is_some());
    assert_eq!(visits(&case).await, vec!["0:750", "1:250"]);

    // Retried after a cancel, it finishes from its cursor.
    assert_eq!(jobs(&mut operator).control_job(VERSION, &JobControl::Retry).await.unwrap(), 1);
    let report = work_all(store, &o, None, &quiet).await.unwrap();
    assert_eq!(report.done.len(), 1);
    assert_eq!(visits(&case).await, vec!["1:1000"]);
}

on!(leases_keep_parts_apart_until_they_expire: postgres, mysql, sqlite);
async fn leases_keep_parts_apart_until_they_expire(engine: Engine) {
    let case = EngineCase::new(engine).await;
    users(&case, 1000).await;
    let (mut a, mut b) = (connect(&case).await, connect(&case).await);
    enqueue(jobs(&mut a), &spec(100, 1)).await;
    let now = Utc::now();
    let secs = |s: i64| now + chrono::Duration::seconds(s);

    let mut job = jobs(&mut a).claim_job("worker-a", now, secs(30), None).await.unwrap().unwrap();
    assert_eq!((job.lease_owner.as_deref(), job.state, job.attempts), (Some("worker-a"), JobState::Running, 1));
    // A live lease is not claimed.
    assert_eq!(jobs(&mut b).claim_job("worker-b", secs(1), secs(31), None).await.unwrap(), None);
    for _ in 0..2 {
        match jobs(&mut a).run_batch(&job, "worker-a", secs(30)).await.unwrap() {
            BatchOutcome::Batch(batch) => job = batch.job,
            other => panic!("{other:?}"),
        }
    }
    // worker-a dies. Once its lease has expired, worker-b takes the part over at the cursor.
    let taken = jobs(&mut b).claim_job("worker-b", secs(60), secs(90), None).await.unwrap().expect("the expired part");
    assert_eq!((taken.lease_owner.as_deref(), taken.cursor.as_deref(), taken.rows_done, taken.attempts), (Some("worker-b"), Some("200"), 200, 2));
    // worker-a comes back: its batch commits nothing, and its save is refused.
    assert_eq!(jobs(&mut a).run_batch(&job, "worker-a", secs(30)).await.unwrap(), BatchOutcome::Lost);
    assert_eq!(jobs(&mut a).save_job(&job, "worker-a").await.unwrap(), None);
    match work_part(jobs(&mut b), taken, &opts("worker-b"), &quiet).await.unwrap() {
        PartEnd::Done(j) => assert_eq!((j.rows_done, j.batches), (1000, 10)),
        other => panic!("{other:?}"),
    }
    assert_eq!(visits(&case).await, vec!["1:1000"]);
}

on!(text_keys_walk_in_key_order: postgres, mysql, sqlite);
async fn text_keys_walk_in_key_order(engine: Engine) {
    let case = EngineCase::new(engine).await;
    let fill = match engine {
        Engine::Postgres => "INSERT INTO tags (code) SELECT 'k' || lpad(g::text, 4, '0') FROM generate_series(1, 300) g".to_string(),
        Engine::Mysql => {
            let d = "(SELECT 0 d UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4 UNION ALL SELECT 5 \
                     UNION ALL SELECT 6 UNION ALL SELECT 7 UNION ALL SELECT 8 UNION ALL SELECT 9)";
            format!(
                "INSERT INTO tags (code) SELECT CONCAT('k', LPAD(i, 4, '0')) FROM (SELECT a.d + 10 * b.d + 100 * c.d AS i FROM {d} a, {d} b, {d} c) s \
                 WHERE i BETWEEN 1 AND 300"
            )
        }
        _ => "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 300) INSERT INTO tags (code) SELECT 'k' || substr('0000' || i, -4) FROM s"
            .to_string(),
    };
    case.db
        .sql(&format!("CREATE TABLE tags (code VARCHAR(20) NOT NULL PRIMARY KEY, n INT NOT NULL DEFAULT 0); {fill}; INSERT INTO tags (code) VALUES ('o''brien')"))
        .await
        .unwrap();
    let spec = Backfill::Sql(SqlBackfill {
        file: "0009_tags.sql".into(),
        table: "tags".into(),
        key: "code".into(),
        batch: 40,
        parts: 3,
        statement: Statement { sql: "UPDATE tags SET n = n + 1 WHERE code BETWEEN :lo AND :hi".into(), line: 2 },
        remaining: Statement { sql: "SELECT count(*) FROM tags WHERE n = 0".into(), line: 3 },
        remaining_derived: false,
    });
    let (mut a, mut b) = (connect(&case).await, connect(&case).await);
    // Two processes creating the table at once both succeed.
    let (x, y) = tokio::join!(jobs(&mut a).ensure_jobs(), jobs(&mut b).ensure_jobs());
    x.unwrap();
    y.unwrap();
    let plan = enqueue(jobs(&mut a), &spec).await;
    assert_eq!((plan.total, plan.bounds.clone()), (301, vec!["k0100".to_string(), "k0200".to_string()]));
    let report = work_all(jobs(&mut a), &opts("worker-1"), None, &quiet).await.unwrap();
    let mut done: Vec<_> = report.done.iter().map(|j| (j.part, j.rows_done, j.cursor.clone())).collect();
    done.sort();
    assert_eq!(done, vec![(0, 100, Some("k0100".into())), (1, 100, Some("k0200".into())), (2, 101, Some("o'brien".into()))]);
    assert_eq!(case.strings("SELECT count(*) FROM tags WHERE n <> 1").await, vec!["0"]);
    assert_eq!(jobs(&mut a).count_remaining(&spec).await.unwrap(), 0);
}
