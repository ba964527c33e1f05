//! The worked example of docs/zero-downtime.md, through the binary, on every
//! engine: rename `users.full_name` → `display_name` (MongoDB: `fullName` →
//! `displayName`) while three versions of an application write:
//!
//! - V1 reads and writes only the old field;
//! - V2 writes both, reads new-or-old;
//! - V3 reads and writes only the new field.
//!
//! Phases: V1 serves while `kiln up` expands; V2 is deployed while a V1
//! straggler still inserts old-shape rows; the backfill runs in `kiln worker`
//! alongside them; contract is refused (rows remain); the straggler stops, the
//! job is retried, V3 is deployed, contract succeeds, V3 keeps writing. At the
//! end every row holds the name its last writer gave it: nothing lost, nothing
//! left unconverted, nothing converted wrongly.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;

const SEED: u64 = 2_000;

#[derive(Clone, Copy, Debug, PartialEq)]
enum App {
    V1,
    V2,
    V3,
}

/// The application's writes, on one engine.
#[derive(Clone)]
struct Db {
    engine: Engine,
    url: String,
    /// One MongoDB client for every write (it pools its connections).
    client: Arc<tokio::sync::OnceCell<mongodb::Client>>,
}

impl Db {
    fn sql_path(&self) -> String {
        self.url.trim_start_matches("sqlite://").to_string()
    }

    async fn exec(&self, sql: String) {
        match self.engine {
            Engine::Sqlite => {
                let path = self.sql_path();
                tokio::task::spawn_blocking(move || {
                    let c = rusqlite::Connection::open(path).unwrap();
                    c.busy_timeout(Duration::from_secs(30)).unwrap();
                    c.execute_batch(&sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
                })
                .await
                .unwrap();
            }
            _ => db_stub(self).sql(&sql).await.unwrap_or_else(|e| panic!("{sql}: {e}")),
        }
    }

    fn new(engine: Engine, url: &str) -> Db {
        Db { engine, url: url.to_string(), client: Default::default() }
    }

    async fn mongo(&self) -> mongodb::Collection<mongodb::bson::Document> {
        let client = self.client.get_or_init(|| async { mongodb::Client::with_uri_str(&self.url).await.unwrap() }).await;
        client.default_database().unwrap().collection("users")
    }

    async fn seed(&self) {
        if self.engine == Engine::Mongodb {
            let docs: Vec<_> = (1..=SEED).map(|i| mongodb::bson::doc! { "_id": i as i64, "fullName": format!("seed{i}") }).collect();
            self.mongo().await.insert_many(docs).await.unwrap();
            return;
        }
        let values: Vec<String> = (1..=SEED).map(|i| format!("({i}, 'seed{i}')")).collect();
        self.exec(format!("INSERT INTO users (id, full_name) VALUES {}", values.join(", "))).await;
    }

    async fn insert(&self, app: App, id: u64, name: &str) {
        if self.engine == Engine::Mongodb {
            let doc = match app {
                App::V1 => mongodb::bson::doc! { "_id": id as i64, "fullName": name },
                App::V2 => mongodb::bson::doc! { "_id": id as i64, "fullName": name, "displayName": name },
                App::V3 => mongodb::bson::doc! { "_id": id as i64, "displayName": name },
            };
            self.mongo().await.insert_one(doc).await.unwrap();
            return;
        }
        self.exec(match app {
            App::V1 => format!("INSERT INTO users (id, full_name) VALUES ({id}, '{name}')"),
            App::V2 => format!("INSERT INTO users (id, full_name, display_name) VALUES ({id}, '{name}', '{name}')"),
            App::V3 => format!("INSERT INTO users (id, display_name) VALUES ({id}, '{name}')"),
        })
        .await;
    }

    async fn update(&self, app: App, id: u64, name: &str) {
        if self.engine == Engine::Mongodb {
            let set = match app {
                App::V1 => mongodb::bson::doc! { "fullName": name },
                App::V2 => mongodb::bson::doc! { "fullName": name, "displayName": name },
                App::V3 => mongodb::bson::doc! { "displayName": name },
            };
            self.mongo().await.update_one(mongodb::bson::doc! { "_id": id as i64 }, mongodb::bson::doc! { "$set": set }).await.unwrap();
            return;
        }
        self.exec(match app {
            App::V1 => format!("UPDATE users SET full_name = '{name}' WHERE id = {id}"),
            App::V2 => format!("UPDATE users SET full_name = '{name}', display_name = '{name}' WHERE id = {id}"),
            App::V3 => format!("UPDATE users SET display_name = '{name}' WHERE id = {id}"),
        })
        .await;
    }

    /// id → display name as the new application reads it (V2: new or old).
    async fn read_all(&self, field: &str) -> BTreeMap<u64, Option<String>> {
        if self.engine == Engine::Mongodb {
            use futures::TryStreamExt;
            let key = if field == "display_name" { "displayName" } else { "fullName" };
            let mut out = BTreeMap::new();
            let mut cur = self.mongo().await.find(mongodb::bson::doc! {}).await.unwrap();
            while let Some(d) = cur.try_next().await.unwrap() {
                out.insert(d.get_i64("_id").unwrap() as u64, d.get_str(key).ok().map(str::to_string));
            }
            return out;
        }
        let sql = format!("SELECT id, {field} FROM users ORDER BY id");
        match self.engine {
            Engine::Sqlite => {
                let path = self.sql_path();
                tokio::task::spawn_blocking(move || {
                    let c = rusqlite::Connection::open(path).unwrap();
                    c.busy_timeout(Duration::from_secs(30)).unwrap();
                    let mut st = c.prepare(&sql).unwrap();
                    st.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Option<String>>(1)?))).unwrap().map(Result::unwrap).collect()
                })
                .await
                .unwrap()
            }
            _ => {
                let concat = match self.engine {
                    Engine::Mysql => format!("SELECT CONCAT(id, '|', COALESCE({field}, '<null>')) FROM users ORDER BY id"),
                    _ => format!("SELECT id || '|' || COALESCE({field}, '<null>') FROM users ORDER BY id"),
                };
                db_stub(self)
                    .query_strings(&concat)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|s| {
                        let (id, name) = s.split_once('|').unwrap();
                        (id.parse().unwrap(), (name != "<null>").then(|| name.to_string()))
                    })
                    .collect()
            }
        }
    }
}

fn db_stub(d: &Db) -> TestDb {
    TestDb::attach(d.engine, &d.url)
}

/// One application instance writing until stopped: inserts new users and
/// renames existing ones, recording what it wrote last for every id.
struct Writer {
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<u64>,
}

impl Writer {
    fn start(db: &Db, app: App, inserts_only: bool, next_id: Arc<AtomicU64>, expected: Arc<Mutex<BTreeMap<u64, String>>>) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let writes = Arc::new(AtomicU64::new(0));
        let w = writes.clone();
        let db = db.clone();
        let task = tokio::spawn(async move {
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                n += 1;
                let tag = format!("{app:?}").to_lowercase();
                if inserts_only || n.is_multiple_of(2) {
                    let id = next_id.fetch_add(1, Ordering::SeqCst);
                    let name = format!("{tag}-new{id}");
                    db.insert(app, id, &name).await;
                    expected.lock().unwrap().insert(id, name);
                } else {
                    // Rename a seeded user (ids 1..=SEED always exist).
                    let id = 1 + (n * 7919) % SEED;
                    let name = format!("{tag}-ren{n}");
                    db.update(app, id, &name).await;
                    expected.lock().unwrap().insert(id, name);
                }
                w.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            n
        });
        Writer { stop, writes, task }
    }

    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

fn migrations(p: &Project) {
    if p.is_mongo() {
        p.write("0001_users.yaml", "up:\n  - create: users\ndown:\n  - drop: users\n");
        p.write(
            "0002_rename_full_name.yaml",
            "expand: []\n\
             backfill:\n  collection: users\n  filter: { displayName: { $exists: false }, fullName: { $exists: true } }\n  update: [ { $set: { displayName: \"$fullName\" } } ]\n  batch_size: 100\n\
             contract:\n  - update: users\n    updates: [ { q: {}, u: { $unset: { fullName: \"\" } }, multi: true } ]\n\
             rollback:\n  - update: users\n    updates: [ { q: {}, u: { $unset: { displayName: \"\" } }, multi: true } ]\n",
        );
        return;
    }
    p.write("0001_users.sql", "-- kiln:up\nCREATE TABLE users (id BIGINT PRIMARY KEY, full_name VARCHAR(100));\n-- kiln:down\nDROP TABLE users;\n");
    p.write(
        "0002_rename_full_name.sql",
        "-- kiln:expand\n\
         ALTER TABLE users ADD COLUMN display_name VARCHAR(100);\n\
         -- kiln:backfill table=users key=id batch=100\n\
         UPDATE users SET display_name = full_name\n WHERE id BETWEEN :lo AND :hi AND display_name IS NULL AND full_name IS NOT NULL;\n\
         -- kiln:contract\n\
         ALTER TABLE users DROP COLUMN full_name;\n\
         -- kiln:rollback\n\
         ALTER TABLE users DROP COLUMN display_name;\n",
    );
}

async fn worked_example(engine: Engine) {
    let p = Project::new(engine).await;
    migrations(&p);
    let db = Db::new(engine, &p.db.url);
    p.kiln(&["up", "--to", "0001"]).ok();
    db.seed().await;
    let next_id = Arc::new(AtomicU64::new(SEED + 1));
    let expected: Arc<Mutex<BTreeMap<u64, String>>> = Arc::new(Mutex::new((1..=SEED).map(|i| (i, format!("seed{i}"))).collect()));

    // Phase 1: V1 serves; expand runs and the backfill is queued, not run.
    let v1 = Writer::start(&db, App::V1, false, next_id.clone(), expected.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;
    p.kiln(&["up"]).ok();
    assert_eq!(p.state_of("0002"), "expanded");
    let jobs = p.kiln(&["jobs", "--json"]);
    jobs.ok();
    assert_eq!(jobs.json()["jobs"][0]["state"], "queued", "{}", jobs.stdout);
    tokio::time::sleep(Duration::from_millis(200)).await;
    v1.stop().await;

    // Phase 2: V2 is deployed, but one V1 instance still serves sign-ups; the
    // backfill runs alongside both.
    let v2 = Writer::start(&db, App::V2, false, next_id.clone(), expected.clone());
    let straggler = Writer::start(&db, App::V1, true, next_id.clone(), expected.clone());
    p.kiln(&["worker", "--once"]).ok();
    let status = p.kiln(&["status", "--json"]);
    let row = status.json()["migrations"].as_array().unwrap().iter().find(|m| m["version"] == "0002").unwrap().clone();
    assert_eq!(row["state"], "backfilled", "{row}");
    assert_eq!(row["job"]["state"], "done", "{row}");
    // Make sure the straggler wrote after the job finished.
    let before = straggler.writes.load(Ordering::SeqCst);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while straggler.writes.load(Ordering::SeqCst) < before + 3 {
        assert!(!straggler.task.is_finished(), "the V1 straggler stopped writing (it panicked)");
        assert!(std::time::Instant::now() < deadline, "the V1 straggler wrote nothing for 120 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = p.kiln(&["contract", "0002"]);
    assert_ne!(refused.code, 0, "contract must be refused while old-shape rows appear: {}", refused.text());
    assert!(refused.stderr.contains("still need") && refused.stderr.contains("kiln jobs retry 0002"), "{}", refused.stderr);
    assert_eq!(p.state_of("0002"), "backfilled", "a refused contract changes nothing");

    // Phase 3: the straggler is gone; the job walks the table again; V3 is deployed.
    straggler.stop().await;
    p.kiln(&["jobs", "retry", "0002"]).ok();
    p.kiln(&["worker", "--once"]).ok();
    v2.stop().await;
    let v3 = Writer::start(&db, App::V3, false, next_id.clone(), expected.clone());
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Phase 4: contract, while V3 keeps writing.
    p.kiln(&["contract", "0002"]).ok();
    assert_eq!(p.state_of("0002"), "contracted");
    tokio::time::sleep(Duration::from_millis(200)).await;
    v3.stop().await;

    let got = db.read_all("display_name").await;
    let want = expected.lock().unwrap().clone();
    assert_eq!(got.len(), want.len(), "no row lost or added");
    let wrong: Vec<_> = want.iter().filter(|(id, name)| got.get(id).and_then(|g| g.as_deref()) != Some(name.as_str())).take(10).collect();
    assert!(
        wrong.is_empty(),
        "rows not converted, or converted wrongly (id, expected): {wrong:?}; got {:?}",
        wrong.iter().map(|(id, _)| got.get(id)).collect::<Vec<_>>()
    );
    // The old field is gone, and down refuses to pretend it can bring it back.
    let down = p.kiln(&["down"]);
    assert_ne!(down.code, 0, "{}", down.text());
    assert!(down.stderr.contains("was contracted"), "{}", down.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worked_example_postgres() {
    worked_example(Engine::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worked_example_mysql() {
    worked_example(Engine::Mysql).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worked_example_sqlite() {
    worked_example(Engine::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worked_example_mongodb() {
    worked_example(Engine::Mongodb).await;
}

/// `kiln down` before contract runs the rollback and cancels the job; `up`
/// expands again and queues a fresh job; `up --wait --contract` does every
/// phase in one command.
#[tokio::test]
async fn rollback_before_contract_and_the_one_command_path() {
    let p = Project::new(Engine::Postgres).await;
    migrations(&p);
    let db = Db::new(Engine::Postgres, &p.db.url);
    p.kiln(&["up", "--to", "0001"]).ok();
    db.seed().await;
    p.kiln(&["up"]).ok();
    p.kiln(&["down"]).ok();
    assert_eq!(p.state_of("0002"), "pending");
    let jobs = p.kiln(&["jobs", "--json"]).json();
    assert_eq!(jobs["jobs"][0]["state"], "cancelled", "{jobs}");
    let cols = db_stub(&db).query_strings("SELECT column_name FROM information_schema.columns WHERE table_name = 'users' ORDER BY 1").await.unwrap();
    assert_eq!(cols, ["full_name", "id"], "rollback dropped the new column");
    let r = p.kiln(&["up", "--wait", "--contract", "--json"]);
    r.ok();
    let v = r.json();
    assert_eq!(v["contract"]["contracted"][0]["version"], "0002", "{v}");
    assert_eq!(p.state_of("0002"), "contracted");
    let got = db.read_all("display_name").await;
    assert!(got.iter().all(|(id, n)| n.as_deref() == Some(format!("seed{id}").as_str())), "every seeded row converted");
}

/// Bad input: a backfill whose key is not unique is refused when it is
/// queued, with the reason; the expand is applied and `kiln up` queues it
/// again once the key is fixed.
#[tokio::test]
async fn a_backfill_over_a_key_that_is_not_unique_is_refused() {
    let p = Project::new(Engine::Postgres).await;
    p.write("0001_t.sql", "CREATE TABLE t (k INT, a TEXT, b TEXT);\nINSERT INTO t VALUES (1, 'x', NULL), (1, 'y', NULL);\n");
    p.write(
        "0002_copy.sql",
        "-- kiln:expand\nSELECT 1;\n-- kiln:backfill table=t key=k\nUPDATE t SET b = a WHERE k BETWEEN :lo AND :hi AND b IS NULL;\n-- kiln:rollback\nSELECT 1;\n",
    );
    let r = p.kiln(&["up"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("0002_copy.sql") && r.stderr.contains("unique"), "{}", r.stderr);
    assert_eq!(p.state_of("0002"), "expanded");
    p.db.sql("DELETE FROM t WHERE a = 'y'; ALTER TABLE t ADD PRIMARY KEY (k);").await.unwrap();
    p.kiln(&["up"]).ok();
    let jobs = p.kiln(&["jobs", "--json"]).json();
    assert_eq!(jobs["jobs"][0]["state"], "queued", "{jobs}");
    // A broken file deployed later does not stop the backfill: a job carries
    // its own spec. `up` still refuses it.
    p.write("0003_broken.sql", "-- kiln:expand\nSELECT 1;\n-- kiln:backfill table=t\nUPDATE t SET b = a WHERE k BETWEEN :lo AND :hi;\n");
    p.kiln(&["up"]).fails_with(2);
    p.kiln(&["worker", "--once"]).ok();
    assert_eq!(p.kiln(&["jobs", "--json"]).json()["jobs"][0]["state"], "done");
}

/// A zero-downtime migration whose expand failed half-way (MySQL: DDL
/// commits at once) and was completed by hand: `repair --mark-applied`
/// records it `expanded`, not `applied`, and queues its backfill, so the
/// worker and contract go on as after a normal expand. (Before the fix it
/// was recorded `applied` with no job, and contract could never run.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_mark_applied_of_a_zero_downtime_migration_leaves_it_expanded() {
    let p = Project::new(Engine::Mysql).await;
    p.write("0001_t.sql", "CREATE TABLE t (k INT PRIMARY KEY, a TEXT, b TEXT);\nINSERT INTO t VALUES (1, 'x', NULL), (2, 'y', NULL);\n");
    p.write(
        "0002_copy.sql",
        "-- kiln:expand\nALTER TABLE t ADD COLUMN c INT;\nALTER TABLE no_such_table ADD COLUMN d INT;\n-- kiln:backfill table=t key=k\nUPDATE t SET b = a WHERE k BETWEEN :lo AND :hi AND b IS NULL;\n-- kiln:contract\nALTER TABLE t DROP COLUMN a;\n-- kiln:rollback\nALTER TABLE t DROP COLUMN c;\n",
    );
    p.kiln(&["up"]).fails_with(1);
    assert_eq!(p.state_of("0002"), "failed");
    // Completed by hand: the second statement's intent does not apply.
    let r = p.kiln(&["repair", "0002", "--mark-applied", "--reason", "completed the expand by hand"]);
    r.ok();
    assert!(r.stdout.contains("failed -> expanded"), "{}", r.stdout);
    assert_eq!(p.state_of("0002"), "expanded");
    let jobs = p.kiln(&["jobs", "--json"]).json();
    assert_eq!(jobs["jobs"][0]["state"], "queued", "{jobs}");
    p.kiln(&["worker", "--once"]).ok();
    p.kiln(&["contract", "0002"]).ok();
    assert_eq!(p.state_of("0002"), "contracted");
    assert_eq!(p.db.query_strings("SELECT b FROM t ORDER BY k").await.unwrap(), ["x", "y"]);
}

/// kill -9 of workers, 50 times during one backfill: the final data is exact.
/// The batch statement is deliberately *not* idempotent (`n = n + 1`): each
/// row ends at exactly 1 only if no batch is lost or committed twice.
async fn killed_workers(engine: Engine) {
    let p = Project::new(engine).await;
    let rows = 20_000;
    let values: Vec<String> = (1..=rows).map(|i| format!("({i}, 0)")).collect();
    p.write(
        "0001_t.sql",
        &format!("CREATE TABLE counters (id BIGINT PRIMARY KEY, n INT NOT NULL);\nINSERT INTO counters (id, n) VALUES {};\n", values.join(", ")),
    );
    p.write(
        "0002_bump.sql",
        "-- kiln:expand\nSELECT 1;\n-- kiln:backfill table=counters key=id batch=100 parts=4\nUPDATE counters SET n = n + 1 WHERE id BETWEEN :lo AND :hi;\n-- kiln:remaining\nSELECT count(*) FROM counters WHERE n = 0;\n-- kiln:rollback\nSELECT 1;\n",
    );
    p.kiln(&["up"]).ok();
    let mut kills = 0;
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    while kills < 50 {
        let mut child = kiln_cmd(p.root.path())
            .args(["worker", "--lease", "1s", "--url", &p.db.url, "--dir"])
            .arg(p.dir())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        tokio::time::sleep(Duration::from_millis(60 + seed % 250)).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
    }
    // Leases of the killed workers expire; one worker finishes the job.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    p.kiln(&["worker", "--once"]).ok();
    let jobs = p.kiln(&["jobs", "--json"]).json();
    assert_eq!(jobs["jobs"][0]["state"], "done", "{jobs}");
    assert!(jobs["jobs"][0]["batches"].as_i64().unwrap() >= 200, "{jobs}");
    let counts = match engine {
        Engine::Sqlite => {
            let c = rusqlite::Connection::open(p.db.url.trim_start_matches("sqlite://")).unwrap();
            let mut st = c.prepare("SELECT n, count(*) FROM counters GROUP BY n ORDER BY n").unwrap();
            st.query_map([], |r| Ok(format!("{}:{}", r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))).unwrap().map(Result::unwrap).collect::<Vec<_>>()
        }
        Engine::Mysql => p.db.query_strings("SELECT CONCAT(n, ':', count(*)) FROM counters GROUP BY n ORDER BY n").await.unwrap(),
        _ => p.db.query_strings("SELECT n || ':' || count(*) FROM counters GROUP BY n ORDER BY n").await.unwrap(),
    };
    assert_eq!(counts, [format!("1:{rows}")], "every row converted exactly once after 50 kill -9s");
    p.kiln(&["contract", "0002"]).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_killed_workers_postgres() {
    killed_workers(Engine::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_killed_workers_mysql() {
    killed_workers(Engine::Mysql).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_killed_workers_sqlite() {
    killed_workers(Engine::Sqlite).await;
}
