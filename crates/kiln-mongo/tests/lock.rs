//! The lease lock: exclusive, re-entrant, renewed while held, taken over once
//! expired, released only by its owner; and many runners at once apply every
//! migration exactly once.

mod common;

use std::time::Duration;

use common::{settings, Env};
#[allow(unused_imports)]
use kiln_core::engine::{Engine as _, Locker as _};
use kiln_core::{EngineError, Policy, Runner, UpTarget};
use kiln_mongo::MongoEngine;
use kiln_testkit::compat::Backend;
use kiln_testkit::compat::Protocol;
use mongodb::bson::{doc, Document};

async fn lease(env: &Env) -> Option<Document> {
    env.database().await.collection::<Document>("kiln_lock").find_one(doc! { "_id": "kiln_history" }).await.unwrap()
}

#[tokio::test]
async fn a_held_lease_cannot_be_taken() {
    let env = Env::new().await;
    let mut a = env.backend().await;
    let mut b = env.backend().await;
    assert!(a.try_lock().await.unwrap());
    assert!(a.try_lock().await.unwrap(), "taking a lease we hold does not deadlock");
    assert!(!b.try_lock().await.unwrap());

    let doc = lease(&env).await.expect("lease document");
    for f in ["owner", "acquired", "expires", "heartbeat"] {
        assert!(doc.contains_key(f), "lease lacks {f}: {doc:?}");
    }
    assert!(doc.get_str("owner").unwrap().contains(&format!("pid {}", std::process::id())));

    let holder = b.lock_holder().await.unwrap();
    assert!(holder.contains("pid") && holder.contains("expires"), "{holder}");
    let e = b.lock(Duration::from_millis(300)).await.unwrap_err();
    assert!(matches!(e, EngineError::LockTimeout { .. }), "{e}");
    assert!(e.to_string().contains("held by"), "{e}");

    a.unlock().await.unwrap();
    assert!(lease(&env).await.is_none());
    a.unlock().await.unwrap(); // releasing a lock not held is not an error
    assert!(b.try_lock().await.unwrap());
    b.unlock().await.unwrap();
}

#[tokio::test]
async fn heartbeat_keeps_a_live_lease() {
    let env = Env::new().await;
    let mut a = env.backend_with_ttl(Duration::from_secs(1)).await;
    assert!(a.try_lock().await.unwrap());
    let first = lease(&env).await.unwrap().get_datetime("expires").unwrap().timestamp_millis();
    // Three TTLs later the lease is still live, because it is renewed.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let mut b = env.backend().await;
    assert!(!b.try_lock().await.unwrap(), "a live holder keeps its lease");
    let doc = lease(&env).await.unwrap();
    assert!(doc.get_datetime("expires").unwrap().timestamp_millis() > first + 1500, "{doc:?}");
    assert!(doc.get_datetime("heartbeat").unwrap().timestamp_millis() > doc.get_datetime("acquired").unwrap().timestamp_millis());
    a.unlock().await.unwrap();
}

#[tokio::test]
async fn a_crashed_holders_lease_expires_and_is_taken_over() {
    let env = Env::new().await;
    let mut a = env.backend_with_ttl(Duration::from_secs(1)).await;
    assert!(a.try_lock().await.unwrap());
    let old_owner = lease(&env).await.unwrap();
    drop(a); // a crash: no unlock, no more heartbeats

    let mut b = env.backend().await;
    assert!(!b.try_lock().await.unwrap(), "not expired yet");
    // The runner's bounded wait sees the lease expire and takes it.
    b.lock(Duration::from_secs(10)).await.unwrap();
    let now = lease(&env).await.unwrap();
    assert_ne!(now.get_object_id("token").unwrap(), old_owner.get_object_id("token").unwrap());
    let log = env.docs("kiln_log").await;
    assert!(log.iter().any(|d| d.get_str("event").unwrap() == "lock-takeover"), "{log:?}");
    b.unlock().await.unwrap();
}

#[tokio::test]
async fn unlock_leaves_a_lease_someone_else_took_over() {
    let env = Env::new().await;
    let mut a = env.backend().await;
    assert!(a.try_lock().await.unwrap());
    // a's lease expires (say, the process was suspended) and b takes over.
    env.database()
        .await
        .collection::<Document>("kiln_lock")
        .update_one(doc! { "_id": "kiln_history" }, doc! { "$set": { "expires": mongodb::bson::DateTime::from_millis(0) } })
        .await
        .unwrap();
    let mut b = env.backend().await;
    assert!(b.try_lock().await.unwrap());
    let taken = lease(&env).await.unwrap();
    a.unlock().await.unwrap();
    assert_eq!(lease(&env).await.unwrap(), taken, "a must not delete b's lease");
    assert!(!a.try_lock().await.unwrap(), "and a no longer holds it");
    b.unlock().await.unwrap();
}

#[tokio::test]
async fn lock_is_per_history_collection() {
    let env = Env::new().await;
    let mut a = env.backend().await;
    let mut cfg = env.cfg.clone();
    cfg.history_table = "other_history".into();
    let mut b = Protocol::new(MongoEngine::connect(&cfg).await.unwrap());
    assert!(a.try_lock().await.unwrap());
    assert!(b.try_lock().await.unwrap(), "another history collection has its own lock");
    a.unlock().await.unwrap();
    b.unlock().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_runners_at_once_apply_each_migration_once() {
    let env = Env::new().await;
    for i in 1..=5 {
        env.write(&format!("000{i}_m{i}.yaml"), &format!("up:\n  - insert: runs\n    documents: [ {{ migration: {i} }} ]\n  - createIndexes: c{i}\n    indexes: [ {{ key: {{ a: 1 }}, name: a_1 }} ]\n"));
    }
    let local = env.load();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let cfg = env.cfg.clone();
        let local = local.clone();
        tasks.push(tokio::spawn(async move {
            let mut b = Protocol::new(MongoEngine::connect(&cfg).await.unwrap());
            let r = Runner::new(&mut b, settings()).up(&local, &UpTarget::Latest, &Policy::default(), false).await;
            r.map(|r| r.steps.len())
        }));
    }
    let mut applied = 0;
    for t in tasks {
        applied += t.await.unwrap().unwrap();
    }
    assert_eq!(applied, 5, "every migration applied by exactly one runner");
    let runs = env.docs("runs").await;
    assert_eq!(runs.len(), 5, "{runs:?}");
    assert_eq!(env.states().await, vec!["0001:applied", "0002:applied", "0003:applied", "0004:applied", "0005:applied"]);
    assert!(lease(&env).await.is_none(), "every runner released the lock");
}

#[tokio::test]
async fn a_lost_lease_stops_the_runner_before_the_next_migration() {
    let env = Env::new().await;
    env.write("0001_a.yaml", "up:\n  - create: a\n");
    let mut a = env.backend_with_ttl(Duration::from_secs(1)).await;
    assert!(a.try_lock().await.unwrap());
    // Another runner took the lease over while a was stalled.
    env.database()
        .await
        .collection::<Document>("kiln_lock")
        .update_one(doc! { "_id": "kiln_history" }, doc! { "$set": { "token": mongodb::bson::oid::ObjectId::new(), "owner": "someone else" } })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await; // the heartbeat notices
    a.ensure_history().await.unwrap();
    let m = &env.load()[0];
    let ctx = kiln_core::RecordContext { batch: 1, actor: "t@h".into() };
    let e = a.apply(m, &ctx).await.expect_err("must refuse");
    let kiln_core::StepError::Engine(e) = e else { panic!("expected an engine error") };
    assert!(e.to_string().contains("lease") && e.to_string().contains("lost"), "{e}");
    assert!(!env.collections().await.contains(&"a".to_string()));
    assert!(env.docs("kiln_history").await.is_empty());
}
