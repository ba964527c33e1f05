//! A small live-traffic generator for the zero-downtime benchmark
//! (bench/zdt-bench.sh): single-row updates of `users` at a fixed rate,
//! open-loop (each request has a scheduled start, and its latency is measured
//! from that start, so a stalled server is not hidden by fewer requests).
//!
//! ```text
//! pgload URL --rate 200 --clients 4 --max-id 1000000 --stop-file /tmp/stop
//! ```
//! Runs until the stop file exists (or SIGTERM/SIGINT), then prints
//! `{"requests", "p50_ms", "p99_ms", "max_ms", "errors"}` as one JSON line.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let url = args.get(1).cloned().unwrap_or_else(|| {
        eprintln!("usage: pgload URL [--rate N] [--clients N] [--max-id N] [--stop-file PATH]");
        std::process::exit(2)
    });
    let rate: f64 = arg(&args, "--rate", "200").parse().expect("--rate");
    let clients: usize = arg(&args, "--clients", "4").parse().expect("--clients");
    let max_id: i64 = arg(&args, "--max-id", "1000").parse().expect("--max-id");
    let stop_file = arg(&args, "--stop-file", "/tmp/pgload.stop");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
    }
    let lat: Arc<Mutex<Vec<f64>>> = Arc::default();
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let interval = Duration::from_secs_f64(clients as f64 / rate);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect");
        tokio::spawn(conn);
        let (stop, lat, errors, stop_file) = (stop.clone(), lat.clone(), errors.clone(), stop_file.clone());
        tasks.push(tokio::spawn(async move {
            let st = client.prepare("UPDATE users SET email = $1 WHERE id = $2").await.expect("prepare");
            let offset = interval.mul_f64(c as f64 / clients as f64);
            let mut n: u64 = 0;
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ c as u64;
            loop {
                let due = start + offset + interval.mul_f64(n as f64);
                let now = Instant::now();
                if due > now {
                    tokio::time::sleep(due - now).await;
                }
                if stop.load(std::sync::atomic::Ordering::Relaxed) || (n.is_multiple_of(16) && std::path::Path::new(&stop_file).exists()) {
                    break;
                }
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let id = 1 + (x % max_id as u64) as i64;
                match client.execute(&st, &[&format!("u{id}@example.com"), &id]).await {
                    Ok(_) => lat.lock().unwrap().push(due.elapsed().as_secs_f64() * 1000.0),
                    Err(_) => {
                        errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                n += 1;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut v = lat.lock().unwrap().clone();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| if v.is_empty() { 0.0 } else { v[((v.len() - 1) as f64 * p).round() as usize] };
    println!(
        "{{\"requests\": {}, \"p50_ms\": {:.2}, \"p99_ms\": {:.2}, \"max_ms\": {:.2}, \"errors\": {}}}",
        v.len(),
        pct(0.50),
        pct(0.99),
        v.last().copied().unwrap_or(0.0),
        errors.load(std::sync::atomic::Ordering::Relaxed)
    );
}
