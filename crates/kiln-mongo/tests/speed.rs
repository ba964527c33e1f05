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
    let (proxy, turns) = latency_proxy(server, Duration::from_millis(20)).await;
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
