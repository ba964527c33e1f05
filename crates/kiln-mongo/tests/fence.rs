//! The fenced lease: a runner whose lease expired while it was frozen and was
//! taken over by another runner writes nothing more — no history entry, no
//! log event, no command — and says so with `lock_lost`; and a lease whose
//! holder provably died on this host is taken over at once.
//!
//! "Frozen" is simulated faithfully: runner A lives on its own thread with a
//! single-threaded Tokio runtime, and the test blocks that thread (as SIGSTOP
//! would), so A's heartbeat cannot run either and its lease really expires.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{settings, Env};
use kiln_core::engine::{Executor as _, HistoryChange, HistoryStore as _, Locker as _, Record, Step};
use kiln_core::event::{Event, Observer};
use kiln_core::{Direction, EngineError, Policy, RecordContext, RunError, Runner, State, UpTarget};
use kiln_mongo::MongoEngine;
use kiln_testkit::compat::Backend as _;
use mongodb::bson::{doc, Document};

const TTL: Duration = Duration::from_secs(1);

async fn lease(env: &Env) -> Option<Document> {
    env.database().await.collection::<Document>("kiln_lock").find_one(doc! { "_id": "kiln_history" }).await.unwrap()
}

async fn events(env: &Env, event: &str) -> Vec<Document> {
    env.docs("kiln_log").await.into_iter().filter(|d| d.get_str("event").ok() == Some(event)).collect()
}

/// Freezes the thread it is called on (all of runner A) once, between
/// migrations: when the one after `after` is about to start (a step is
/// reported finished only once durable, so its own event may come later).
struct FreezeAfter {
    after: String,
    frozen: Mutex<bool>,
    unfreeze: Arc<(Mutex<bool>, std::sync::Condvar)>,
}

impl Observer for FreezeAfter {
    fn on_event(&self, event: &Event) {
        if let Event::StepStarted { index, .. } = event {
            let mut f = self.frozen.lock().unwrap();
            let next = self.after.parse::<usize>().unwrap() + 1;
            if *index == next && !*f {
                *f = true;
                let (lock, cv) = &*self.unfreeze;
                let mut go = lock.lock().unwrap();
                while !*go {
                    go = cv.wait(go).unwrap();
                }
            }
        }
    }
}

fn three_migrations(env: &Env) {
    for i in 1..=3 {
        env.write(&format!("000{i}_m{i}.yaml"), &format!("up:\n  - createIndexes: c{i}\n    indexes: [ {{ key: {{ a: 1 }}, name: a_1 }} ]\n"));
    }
}

#[test]
fn a_runner_frozen_between_migrations_stops_before_writing_anything_more() {
    let env = tokio::runtime::Runtime::new().unwrap().block_on(Env::new());
    three_migrations(&env);
    let local = env.load();
    let unfreeze = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
    let observer = Arc::new(FreezeAfter { after: "0001".into(), frozen: Mutex::new(false), unfreeze: unfreeze.clone() });
    let cfg = env.cfg.clone();
    // Runner A: a real `up`, frozen (whole thread) after 0001.
    let a = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut engine = MongoEngine::connect(&cfg).await.unwrap();
            engine.set_lease_ttl(TTL);
            Runner::new(&mut engine, settings())
                .with_observer(observer)
                .up(&local, &UpTarget::Latest, &Policy::default(), false)
                .await
                .map_err(Box::new)
        })
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Wait until A is frozen after 0001, then let its lease expire and take it (runner B).
        let mut b = env.backend().await;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !env.index_names("c1").await.contains(&"a_1".to_string()) {
            assert!(std::time::Instant::now() < deadline, "A never applied 0001");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        b.lock(Duration::from_secs(10)).await.expect("B takes the expired lease");
        assert_eq!(events(&env, "lock-takeover").await.len(), 1);
        let log_before = env.docs("kiln_log").await;
        let history_before = env.docs("kiln_history").await;

        // A resumes.
        *unfreeze.0.lock().unwrap() = true;
        unfreeze.1.notify_all();
        let err = a.join().unwrap().expect_err("A must stop");
        let RunError::Engine(e @ EngineError::LockLost { .. }) = &*err else { panic!("expected lock_lost, got {err:?}") };
        assert_eq!(err.code(), "lock_lost");
        let text = e.to_string();
        assert!(text.contains("lease epoch 2") && text.contains("ours was epoch 1"), "names the new holder and ours: {text}");
        assert!(text.contains("start of 0002_m2") && text.contains("m1 as finished, which stays recorded as running"), "says what it left: {text}");

        // A wrote nothing more and ran nothing more.
        assert_eq!(env.docs("kiln_log").await, log_before, "no event after the lease was lost");
        assert_eq!(env.docs("kiln_history").await, history_before, "no history write after the lease was lost");
        assert!(!env.collections().await.contains(&"c2".to_string()), "0002 never ran");
        assert_eq!(env.states().await, vec!["0001:running", "0002:pending", "0003:pending"]);
        assert!(events(&env, "applied").await.is_empty(), "no applied event for the unrecorded finish");
        // B still holds its lease: A did not delete it.
        assert!(lease(&env).await.unwrap().get_i64("epoch").unwrap() == 2);
        b.unlock().await.unwrap();
    });
}

#[test]
fn a_runner_frozen_between_commands_stops_before_the_next_command() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let env = rt.block_on(Env::new());
    env.write("0001_two.yaml", "up:\n  - create: first\n  - create: second\n");
    let local = env.load();
    let cfg = env.cfg.clone();
    let (to_main, from_a) = std::sync::mpsc::channel::<()>();
    let (to_a, from_main) = std::sync::mpsc::channel::<()>();
    // Runner A drives the step protocol's primitives itself, so the test can
    // freeze it between command 1 and command 2.
    let a = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let m = &local[0];
            let mut engine = MongoEngine::connect(&cfg).await.unwrap();
            engine.set_lease_ttl(TTL);
            assert!(engine.try_lock().await.unwrap());
            engine.ensure().await.unwrap();
            let step = Step { migration: m, direction: Direction::Up, body: &m.up, batch: 1, actor: "a@test" };
            engine.prepare(&step).await.unwrap();
            let intent = RecordContext { batch: 1, actor: "a@test".into() }.entry(m, State::Running, chrono::Utc::now(), 0, None);
            engine.commit(&Record { changes: vec![HistoryChange::Insert(intent)], events: vec![], durable: false }).await.unwrap();
            engine.run_one(&step, 0).await.unwrap();
            to_main.send(()).unwrap();
            // Frozen: this thread (and A's heartbeat with it) stops until told.
            from_main.recv().unwrap();
            engine.run_one(&step, 1).await.map(|_| ())
        })
    });
    rt.block_on(async {
        from_a.recv().unwrap();
        let mut b = env.backend().await;
        b.lock(Duration::from_secs(10)).await.expect("B takes the expired lease");
        to_a.send(()).unwrap();
        let err = a.join().unwrap().expect_err("A must not run command 2");
        let kiln_core::engine::ExecFailure::Engine(e @ EngineError::LockLost { .. }) = &err else { panic!("expected lock_lost, got {err:?}") };
        let text = e.to_string();
        assert!(text.contains("command 2") && text.contains("command 1 ran") && text.contains("kiln repair 0001"), "{text}");
        let names = env.collections().await;
        assert!(names.contains(&"first".to_string()) && !names.contains(&"second".to_string()), "{names:?}");
        assert_eq!(env.states().await, vec!["0001:running"]);
        b.unlock().await.unwrap();
    });
}

fn run_start() -> kiln_core::LogEntry {
    kiln_core::LogEntry {
        at: chrono::Utc::now(),
        event: kiln_core::LogEvent::RunStart,
        version: None,
        name: None,
        batch: Some(1),
        actor: "a".into(),
        reason: None,
        detail: None,
    }
}

async fn forge_takeover(env: &Env) {
    env.database()
        .await
        .collection::<Document>("kiln_lock")
        .update_one(
            doc! { "_id": "kiln_history" },
            doc! { "$set": { "token": mongodb::bson::oid::ObjectId::new(), "owner": "runner B pid 1", "epoch": 7_i64 } },
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn the_fence_travels_with_the_write() {
    let env = Env::new().await;
    let mut engine = MongoEngine::connect(&env.cfg).await.unwrap();
    assert!(engine.try_lock().await.unwrap());
    engine.ensure().await.unwrap();
    // The lease changes hands behind our back; our heartbeat (every 10 s) has
    // not seen it, and our local proof of the lease is still fresh: only the
    // fence inside the write itself can notice.
    forge_takeover(&env).await;
    let e = engine.commit(&Record { changes: vec![], events: vec![run_start()], durable: true }).await.unwrap_err();
    assert_eq!(e.code(), "lock_lost", "{e}");
    assert!(e.to_string().contains("runner B pid 1") && e.to_string().contains("lease epoch 7"), "{e}");
    assert!(env.docs("kiln_log").await.is_empty(), "nothing was logged");
    engine.unlock().await.unwrap();
    assert_eq!(lease(&env).await.unwrap().get_str("owner").unwrap(), "runner B pid 1", "B's lease stays");
}

#[tokio::test]
async fn without_bulk_write_a_lost_lease_is_found_before_the_write() {
    let env = Env::new().await;
    let mut engine = MongoEngine::connect(&env.cfg).await.unwrap();
    engine.set_bulk_write(false);
    engine.set_lease_ttl(TTL);
    assert!(engine.try_lock().await.unwrap());
    engine.ensure().await.unwrap();
    forge_takeover(&env).await;
    tokio::time::sleep(TTL).await; // the local proof (half a TTL) runs out
    let e = engine.commit(&Record { changes: vec![], events: vec![run_start()], durable: true }).await.unwrap_err();
    assert_eq!(e.code(), "lock_lost", "{e}");
    assert!(env.docs("kiln_log").await.is_empty(), "nothing was logged");
}

#[tokio::test]
async fn without_bulk_write_a_run_applies_everything() {
    let env = Env::new().await;
    three_migrations(&env);
    let local = env.load();
    let mut engine = MongoEngine::connect(&env.cfg).await.unwrap();
    engine.set_bulk_write(false);
    let r = Runner::new(&mut engine, settings()).up(&local, &UpTarget::Latest, &Policy::default(), false).await.unwrap();
    assert_eq!(r.steps.len(), 3);
    assert_eq!(env.states().await, vec!["0001:applied", "0002:applied", "0003:applied"]);
    assert_eq!(events(&env, "applied").await.len(), 3);
}

#[tokio::test]
async fn one_applied_event_per_migration() {
    let env = Env::new().await;
    three_migrations(&env);
    env.up().await.unwrap();
    let applied: Vec<i64> = events(&env, "applied").await.iter().map(|d| d.get_i64("version").unwrap()).collect();
    assert_eq!(applied, vec![1, 2, 3]);
}

/// A lease taken by this process, then made to look like it belongs to `pid`.
async fn lease_of_pid(env: &Env, pid: u32, started: Option<i64>) {
    let mut holder = env.backend().await;
    assert!(holder.try_lock().await.unwrap());
    let mut set = doc! { "pid": pid as i64, "owner": format!("ghost pid {pid}"), "expires": mongodb::bson::DateTime::from_millis(mongodb::bson::DateTime::now().timestamp_millis() + 3_600_000) };
    match started {
        Some(s) => set.insert("started", s),
        None => set.insert("started", 0_i64),
    };
    env.database().await.collection::<Document>("kiln_lock").update_one(doc! { "_id": "kiln_history" }, doc! { "$set": set }).await.unwrap();
    // Drop `holder` without releasing (a crash): its lease document stays, now naming `pid`.
    drop(holder);
}

#[tokio::test]
async fn a_lease_whose_process_is_gone_is_taken_over_at_once() {
    let env = Env::new().await;
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    lease_of_pid(&env, dead, None).await;

    let mut b = env.backend().await;
    let t = std::time::Instant::now();
    b.lock(Duration::from_secs(5)).await.expect("the dead holder's lease is taken at once");
    assert!(t.elapsed() < Duration::from_secs(1), "took {:?}", t.elapsed());
    let takeover = events(&env, "lock-takeover").await;
    assert_eq!(takeover.len(), 1, "{takeover:?}");
    let detail = takeover[0].get_str("detail").unwrap();
    assert!(detail.contains(&format!("ghost pid {dead}")) && detail.contains("no longer exists"), "{detail}");
    let now = lease(&env).await.unwrap();
    assert_eq!(now.get_i64("pid").unwrap(), std::process::id() as i64);
    assert_eq!(now.get_i64("epoch").unwrap(), 2);
    b.unlock().await.unwrap();
}

#[tokio::test]
async fn a_lease_whose_process_runs_is_not_taken_before_it_expires() {
    let env = Env::new().await;
    let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
    let started = std::fs::read_to_string(format!("/proc/{}/stat", child.id()))
        .ok()
        .and_then(|s| s[s.rfind(')').unwrap() + 1..].split_whitespace().nth(19).and_then(|v| v.parse::<i64>().ok()));
    lease_of_pid(&env, child.id(), started).await;
    let mut b = env.backend().await;
    let e = b.lock(Duration::from_millis(500)).await.unwrap_err();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(matches!(e, EngineError::LockTimeout { .. }), "{e}");
    assert!(events(&env, "lock-takeover").await.is_empty());
    // Now it is gone: taken at once.
    b.lock(Duration::from_secs(5)).await.unwrap();
    assert_eq!(events(&env, "lock-takeover").await.len(), 1);
    b.unlock().await.unwrap();
}

#[tokio::test]
async fn a_lease_from_another_host_waits_for_its_ttl() {
    let env = Env::new().await;
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    lease_of_pid(&env, dead, None).await;
    env.database()
        .await
        .collection::<Document>("kiln_lock")
        .update_one(doc! { "_id": "kiln_history" }, doc! { "$set": { "host": "another-host.example" } })
        .await
        .unwrap();
    let mut b = env.backend().await;
    assert!(!b.try_lock().await.unwrap(), "a pid on another host proves nothing");
    assert!(events(&env, "lock-takeover").await.is_empty());
}

#[tokio::test]
async fn a_version_above_i64_max_is_never_written() {
    let env = Env::new().await;
    env.write("9223372036854775808_big.yaml", "up:\n  - create: big\n");
    let err = env.up().await.unwrap_err();
    assert_eq!(err.code(), "plan_refused", "{err}");
    assert!(err.to_string().contains("9223372036854775808_big.yaml"), "{err}");
    assert!(!env.collections().await.contains(&"big".to_string()));

    // The engine itself refuses such an entry, whoever asks.
    let m = &env.load()[0];
    let mut engine = MongoEngine::connect(&env.cfg).await.unwrap();
    engine.ensure().await.unwrap();
    let row = RecordContext { batch: 1, actor: "t@h".into() }.entry(m, State::Applied, chrono::Utc::now(), 0, None);
    let e = engine.commit(&Record { changes: vec![HistoryChange::Put(row)], events: vec![], durable: false }).await.unwrap_err();
    assert_eq!(e.code(), "refused", "{e}");
    assert!(e.to_string().contains("9223372036854775808_big.yaml") && e.to_string().contains("nothing was written"), "{e}");
    assert!(env.docs("kiln_history").await.is_empty(), "no row kiln could not read back");
    // And the history still reads.
    assert!(env.status().await.iter().all(|r| r.state == "pending"));
}
