//! What applying a migration costs on the wire: two round trips (the merged
//! finish + intent + events in one fenced `bulkWrite`, then the command).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::Env;
use kiln_core::engine::Locker as _;
use kiln_core::RecordContext;
use kiln_mongo::MongoEngine;
use kiln_testkit::compat::{Backend as _, Protocol};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_costs_two_round_trips() {
    use std::sync::atomic::Ordering;
    let env = Env::new().await;
    for i in 1..=4 {
        env.write(&format!("000{i}_m{i}.yaml"), &format!("up:\n  - createIndexes: c{i}\n    indexes: [ {{ key: {{ a: 1 }}, name: a_1 }} ]\n"));
    }
    let local = env.load();
    // mongodb://127.0.0.1:PORT/db?directConnection=true, through the proxy; no
    // monitoring chatter while we count.
    let rest = env.db.url.strip_prefix("mongodb://").unwrap();
    let (hostport, tail) = rest.split_once('/').unwrap();
    let server: std::net::SocketAddr = hostport.parse().unwrap();
    let (proxy, turns) = kiln_testkit::proxy::latency_proxy(server, Duration::from_millis(20)).await;
    let mut cfg = env.cfg.clone();
    cfg.url = format!("mongodb://{proxy}/{tail}&heartbeatFrequencyMS=60000").into();
    let mut b = Protocol::new(MongoEngine::connect(&cfg).await.unwrap());
    assert!(b.try_lock().await.unwrap());
    b.ensure_history().await.unwrap();
    let ctx = RecordContext { batch: 1, actor: "t@h".into() };
    let mut costs = Vec::new();
    for m in &local {
        let from = turns.load(Ordering::SeqCst);
        b.apply(m, &ctx).await.unwrap();
        costs.push(turns.load(Ordering::SeqCst) - from);
    }
    // Each: the previous finish, this intent and their events in one write, then the command.
    assert_eq!(costs, vec![2, 2, 2, 2], "round trips per migration");
    let from = turns.load(Ordering::SeqCst);
    b.unlock().await.unwrap(); // the last finish, then the release
    assert_eq!(turns.load(Ordering::SeqCst) - from, 2);
    assert_eq!(env.states().await, vec!["0001:applied", "0002:applied", "0003:applied", "0004:applied"]);
    let _ = Arc::strong_count(&turns);
}
