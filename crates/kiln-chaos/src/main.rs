//! `kiln-chaos`: fuzz one of kiln's parsers on stable Rust.
//!
//! ```text
//! kiln-chaos --parser sql-file --execs 1000000 --seed 7 --time-limit-ms 2000 --out target/chaos/fuzz
//! kiln-chaos --list
//! kiln-chaos --parser url --replay target/chaos/fuzz/panic-url-7-123.bin
//! kiln-chaos --parser commands-yaml --execs 1000000 --max-seconds 600   # at most 10 minutes
//! ```
//!
//! Inputs come from a seeded generator (`gen`): the same seed replays the same
//! inputs. Every input runs under `catch_unwind` (a panic is a failure) and a
//! watchdog (an input slower than the time limit is a hang; one still running
//! after 60 s ends the process). Failing inputs are written to `--out`.
//! Output: one `panic …` / `hang …` line per distinct failure, then
//! `summary parser=… execs=… panics=… hangs=… seconds=… slowest_ms=…`.
//! Exit 0 with no failure, 1 with failures, 2 on bad usage.

mod gen;
mod parsers;

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use parsers::{Scratch, Subject, SUBJECTS};

/// After this long one input is not slow but stuck: report it and stop.
const HARD_LIMIT: Duration = Duration::from_secs(60);

struct Args {
    parser: String,
    execs: u64,
    seed: u64,
    limit: Duration,
    out: PathBuf,
    replay: Option<PathBuf>,
    /// Stop after this long even if fewer than `execs` ran (the summary says how many did).
    max_time: Option<Duration>,
}

fn usage(msg: &str) -> ! {
    eprintln!("error: {msg}\nusage: kiln-chaos --parser NAME [--execs N] [--seed S] [--time-limit-ms MS] [--out DIR] [--replay FILE] [--max-seconds S] | --list");
    std::process::exit(2)
}

fn args() -> Args {
    let mut a = Args {
        parser: String::new(),
        execs: 10_000,
        seed: 1,
        limit: Duration::from_millis(2000),
        out: PathBuf::from("target/chaos/fuzz"),
        replay: None,
        max_time: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "--list" {
            for s in SUBJECTS {
                println!("{}", s.name);
            }
            std::process::exit(0);
        }
        let v = it.next().unwrap_or_else(|| usage(&format!("{k} needs a value")));
        let num = |v: &str| v.parse::<u64>().unwrap_or_else(|_| usage(&format!("{k}: {v:?} is not a number")));
        match k.as_str() {
            "--parser" => a.parser = v,
            "--execs" => a.execs = num(&v),
            "--seed" => a.seed = num(&v),
            "--time-limit-ms" => a.limit = Duration::from_millis(num(&v)),
            "--out" => a.out = PathBuf::from(v),
            "--replay" => a.replay = Some(PathBuf::from(v)),
            "--max-seconds" => a.max_time = Some(Duration::from_secs(num(&v))),
            _ => usage(&format!("unknown option {k}")),
        }
    }
    a
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_else(|| "(non-string panic)".into())
}

fn save(out: &std::path::Path, kind: &str, parser: &str, seed: u64, n: u64, input: &[u8]) -> String {
    let _ = std::fs::create_dir_all(out);
    let path = out.join(format!("{kind}-{parser}-{seed}-{n}.bin"));
    let _ = std::fs::write(&path, input);
    path.display().to_string()
}

fn main() {
    let a = args();
    let subject: &'static Subject =
        SUBJECTS.iter().find(|s| s.name == a.parser).unwrap_or_else(|| usage(&format!("unknown parser {:?} (see --list)", a.parser)));
    let scratch = Scratch::new(subject.name).unwrap_or_else(|e| usage(&format!("cannot create a scratch directory: {e}")));
    // Silence the default panic printing; panics are reported by the loop.
    std::panic::set_hook(Box::new(|_| {}));

    // The watchdog: `started` is the start of the running input in ms since
    // `epoch` (0 when idle); an input running past HARD_LIMIT is saved and the
    // process ends, since a stuck thread cannot be stopped.
    let epoch = Instant::now();
    let started = Arc::new(AtomicU64::new(0));
    let current: Arc<Mutex<(u64, Vec<u8>)>> = Arc::new(Mutex::new((0, Vec::new())));
    {
        let (started, current, out, name, seed) = (started.clone(), current.clone(), a.out.clone(), subject.name, a.seed);
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(100));
            let s = started.load(Ordering::Relaxed);
            if s != 0 && epoch.elapsed().as_millis() as u64 - s > HARD_LIMIT.as_millis() as u64 {
                let cur = current.lock().unwrap_or_else(|e| e.into_inner());
                let file = save(&out, "hang", name, seed, cur.0, &cur.1);
                println!("hang parser={name} exec={} ms=>{} stuck=true file={file}", cur.0, HARD_LIMIT.as_millis());
                println!(
                    "summary parser={name} execs={} panics=0 hangs=1 seconds={:.1} slowest_ms={}",
                    cur.0,
                    epoch.elapsed().as_secs_f64(),
                    HARD_LIMIT.as_millis()
                );
                std::process::exit(1);
            }
        });
    }

    let inputs: Box<dyn Iterator<Item = Vec<u8>>> = match &a.replay {
        Some(p) => Box::new(std::iter::once(std::fs::read(p).unwrap_or_else(|e| usage(&format!("{}: {e}", p.display()))))),
        None => {
            let mut rng = gen::Rng::new(a.seed ^ fxhash(subject.name));
            let edges = subject.edges();
            let n = a.execs.saturating_sub(edges.len() as u64);
            Box::new(edges.into_iter().chain((0..n).map(move |_| subject.generate(&mut rng))))
        }
    };

    let (mut execs, mut panics, mut hangs, mut slowest) = (0u64, 0u64, 0u64, Duration::ZERO);
    let mut seen: HashSet<String> = HashSet::new();
    for input in inputs {
        if a.max_time.is_some_and(|m| epoch.elapsed() > m) {
            break;
        }
        execs += 1;
        {
            let mut cur = current.lock().unwrap_or_else(|e| e.into_inner());
            cur.0 = execs;
            cur.1.clear();
            cur.1.extend_from_slice(&input);
        }
        started.store((epoch.elapsed().as_millis() as u64).max(1), Ordering::Relaxed);
        let t = Instant::now();
        let r = catch_unwind(AssertUnwindSafe(|| subject.run(&scratch, &input)));
        let took = t.elapsed();
        started.store(0, Ordering::Relaxed);
        slowest = slowest.max(took);
        let failure = match r {
            Err(p) => Some(("panic", panic_message(&*p))),
            Ok(Err(msg)) => Some(("panic", format!("property: {msg}"))),
            Ok(Ok(())) if took > a.limit => {
                Some(("hang", format!("took {} ms (limit {} ms), {} bytes", took.as_millis(), a.limit.as_millis(), input.len())))
            }
            Ok(Ok(())) => None,
        };
        if let Some((kind, msg)) = failure {
            if kind == "panic" {
                panics += 1;
            } else {
                hangs += 1;
            }
            let key = format!("{kind}:{}", msg.chars().take(80).collect::<String>());
            if seen.insert(key) && seen.len() <= 20 {
                let file = save(&a.out, kind, subject.name, a.seed, execs, &input);
                println!(
                    "{kind} parser={} exec={execs} file={file} msg={}",
                    subject.name,
                    msg.replace('\n', " ").chars().take(300).collect::<String>()
                );
            }
        }
    }
    println!(
        "summary parser={} execs={execs} panics={panics} hangs={hangs} seconds={:.1} slowest_ms={}",
        subject.name,
        epoch.elapsed().as_secs_f64(),
        slowest.as_millis()
    );
    std::process::exit(if panics + hangs > 0 { 1 } else { 0 });
}

/// A stable hash of the parser name, so each parser gets its own stream for one seed.
fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}
