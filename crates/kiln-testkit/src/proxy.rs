//! A TCP proxy for tests that count round trips (PostgreSQL, MongoDB).

use std::sync::Arc;
use std::time::Duration;

/// A TCP proxy that adds `delay` in each direction, like a database across a
/// network, and counts round trips: the client's *turns*, each a burst of
/// client→server bytes that follows an answer from the server (a pipeline
/// sent at once is one turn, however many reads it takes). The delay makes
/// the count robust: an answer reaches the client `2 × delay` after the
/// request left it, so a pipeline is on the wire long before any answer
/// could split it into two turns.
pub async fn latency_proxy(target: std::net::SocketAddr, delay: Duration) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
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
