//! The zero-downtime commands (DESIGN §4): `kiln worker`, `kiln jobs …`,
//! `kiln contract VERSION`, and the `--wait` / `--contract` tails of `kiln up`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Subcommand;
use kiln::jobs::{Batch, Job, JobControl, JobInfo, JobState, WorkReport, WorkerOptions};
use kiln::{ContractReport, Migration, Runner, Version};

use crate::cli::CliError;
use crate::render;

/// `kiln jobs` subcommands.
#[derive(Subcommand, Debug)]
pub enum JobsCmd {
    /// Progress of one job: done/total, rows/s, ETA, workers, throttle, last error
    Show {
        /// The job's id: its migration's version
        #[arg(value_name = "ID|VERSION")]
        id: String,
    },
    /// Pause a job: workers stop after their current batch
    Pause {
        /// The job's id: its migration's version
        #[arg(value_name = "ID|VERSION")]
        id: String,
    },
    /// Resume a paused job
    Resume {
        /// The job's id: its migration's version
        #[arg(value_name = "ID|VERSION")]
        id: String,
    },
    /// Cancel a job (contract stays refused; `kiln jobs retry` queues it again)
    Cancel {
        /// The job's id: its migration's version
        #[arg(value_name = "ID|VERSION")]
        id: String,
    },
    /// Queue a failed or cancelled job again (it continues from its cursor); a done job walks the whole table again
    Retry {
        /// The job's id: its migration's version
        #[arg(value_name = "ID|VERSION")]
        id: String,
    },
    /// Change a job's throttle while it runs
    Throttle {
        /// The job's id: its migration's version
        #[arg(value_name = "ID|VERSION")]
        id: String,
        /// Rows (keys) per batch
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        batch: Option<u32>,
        /// Sleep between batches, e.g. 200ms or 1s
        #[arg(long, value_name = "DURATION")]
        pause: Option<String>,
        /// Ceiling on rows per second per part (0 removes it)
        #[arg(long, value_name = "ROWS")]
        max_rate: Option<u64>,
    },
}

fn version(id: &str) -> Result<Version, CliError> {
    Version::parse_arg(id).ok_or_else(|| CliError::Usage(format!("{id:?} is not a job id: a job's id is its migration's version, e.g. 0007")))
}

fn owner() -> String {
    format!("{}:{}", kiln::current_actor(), std::process::id())
}

/// `kiln jobs` and its subcommands.
pub async fn jobs(runner: &mut Runner<'_>, cmd: Option<&JobsCmd>, json: bool) -> Result<i32, CliError> {
    let now = chrono::Utc::now();
    let control = |c: JobControl| Some(c);
    let (id, change) = match cmd {
        None => {
            let all = JobInfo::all(&runner.jobs().await?, now);
            print_list(&all, json);
            return Ok(0);
        }
        Some(JobsCmd::Show { id }) => {
            let v = version(id)?;
            let parts: Vec<Job> = runner.jobs().await?.into_iter().filter(|j| j.version == v.number).collect();
            let Some(info) = JobInfo::of(&parts, now) else {
                return Err(CliError::Usage(format!("there is no backfill job for version {v}; `kiln jobs` lists them")));
            };
            print_show(&info, &parts, json);
            return Ok(0);
        }
        Some(JobsCmd::Pause { id }) => (id, control(JobControl::Pause)),
        Some(JobsCmd::Resume { id }) => (id, control(JobControl::Resume)),
        Some(JobsCmd::Cancel { id }) => (id, control(JobControl::Cancel)),
        Some(JobsCmd::Retry { id }) => (id, control(JobControl::Retry)),
        Some(JobsCmd::Throttle { id, batch, pause, max_rate }) => {
            let pause_ms = match pause {
                Some(p) => Some(kiln::config::parse_duration_text(p).map_err(|m| CliError::Usage(format!("--pause: {m}")))?.as_millis() as u64),
                None => None,
            };
            if batch.is_none() && pause_ms.is_none() && max_rate.is_none() {
                return Err(CliError::Usage("`kiln jobs throttle` needs --batch, --pause or --max-rate".into()));
            }
            let max_rows_per_sec = max_rate.map(|r| (r > 0).then_some(r));
            (id, control(JobControl::Throttle { batch: *batch, pause_ms, max_rows_per_sec }))
        }
    };
    let v = version(id)?;
    let info = runner.control_job(&v, &change.expect("set above")).await?;
    if json {
        render::json(&info);
    } else {
        println!("{}: {} — {}", info.name, info.state, info.progress());
    }
    Ok(0)
}

fn print_list(all: &[JobInfo], json: bool) {
    if json {
        render::json(&serde_json::json!({ "jobs": all }));
        return;
    }
    if all.is_empty() {
        println!("No backfill jobs. `kiln up` queues one for every zero-downtime migration it expands.");
        return;
    }
    println!("{:<16}  {:<32}  {:<10}  {:<16}  PROGRESS", "ID", "MIGRATION", "STATE", "TABLE");
    for j in all {
        println!("{:<16}  {:<32}  {:<10}  {:<16}  {}", j.version, j.name, j.state.as_str(), j.target, j.progress());
        if let Some(e) = &j.error {
            println!("{:<16}  ↳ {e}", "");
        }
    }
}

fn print_show(info: &JobInfo, parts: &[Job], json: bool) {
    if json {
        render::json(&serde_json::json!({ "job": info, "parts": parts }));
        return;
    }
    println!("job {} ({}) on {}: {}", info.version, info.name, info.target, info.state);
    println!("  progress   {}", info.progress());
    println!("  batches    {}", info.batches);
    println!("  parts      {} ({} done)", info.parts, info.parts_done);
    let t = info.throttle;
    println!(
        "  throttle   batch {}, pause {} ms, {}",
        t.batch,
        t.pause_ms,
        t.max_rows_per_sec.map(|m| format!("at most {m} rows/s per part")).unwrap_or_else(|| "no rate ceiling".into())
    );
    println!("  workers    {}", if info.workers.is_empty() { "none".to_string() } else { info.workers.join(", ") });
    println!("  queued at  {}", info.created_at);
    if let Some(f) = &info.finished_at {
        println!("  finished   {f}");
    }
    if let Some(e) = &info.error {
        println!("  error      {e}");
    }
    if parts.len() > 1 {
        for p in parts {
            println!(
                "  part {:<3}  {:<10}  keys ({} .. {}]  cursor {}  {} rows",
                p.part,
                p.state.as_str(),
                p.range_lo.as_deref().unwrap_or("start"),
                p.range_hi.as_deref().unwrap_or("end"),
                p.cursor.as_deref().unwrap_or("-"),
                p.rows_done
            );
        }
    }
}

/// Prints a line per part at most every `every`, and the last batch always.
struct Reporter {
    json: bool,
    every: Duration,
    last: std::sync::Mutex<Option<Instant>>,
}

impl kiln::jobs::JobProgress for Reporter {
    fn batch(&self, b: &Batch) {
        if self.json {
            // One line per batch (JSON Lines), for `kiln worker --json`.
            println!(
                "{}",
                serde_json::json!({
                    "event": "batch", "version": b.job.version, "part": b.job.part, "lo": b.lo, "hi": b.hi,
                    "keys": b.keys, "changed": b.changed, "rows_done": b.job.rows_done, "rows_total": b.job.rows_total,
                })
            );
            return;
        }
        let mut last = self.last.lock().expect("not poisoned");
        if last.is_some_and(|l| l.elapsed() < self.every) {
            return;
        }
        *last = Some(Instant::now());
        let info = JobInfo::of(std::slice::from_ref(&b.job), chrono::Utc::now());
        if let Some(i) = info {
            eprintln!("  backfill {} part {}: {}", i.name, b.job.part, i.progress());
        }
    }
}

fn stop_on_signals(stop: Arc<std::sync::atomic::AtomicBool>) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
                return;
            };
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        eprintln!("kiln worker: stopping after the current batch (the lease is released; another worker continues from the cursor)");
        stop.store(true, Ordering::Relaxed);
    });
}

fn report_end(r: &WorkReport, json: bool) {
    for j in &r.done {
        if !json {
            eprintln!("  backfill {} part {}: done, {} rows in {} batches", j.name, j.part, j.rows_done, j.batches);
        }
    }
    for j in &r.failed {
        if !json {
            eprintln!("  backfill {} part {}: FAILED: {}", j.name, j.part, j.error.as_deref().unwrap_or("?"));
        }
    }
}

/// Worker settings from the command line.
pub struct WorkerArgs {
    /// Exit when no job is left instead of waiting for more.
    pub once: bool,
    /// Lease length.
    pub lease: Duration,
    /// Only this job.
    pub only: Option<Version>,
    /// Poll interval when idle.
    pub idle: Duration,
}

/// True for errors after which a new connection may succeed (the database
/// restarted, a network blip): the worker reconnects instead of exiting.
fn connection_lost(e: &kiln::RunError) -> bool {
    matches!(e, kiln::RunError::Engine(kiln::EngineError::ConnectionLost { .. } | kiln::EngineError::Connect { .. }))
}

/// Connect again, backing off from 1 s to 10 s, until it works or the worker
/// is stopped (`None`).
async fn reconnect(lib: &kiln::Kiln, opts: &WorkerOptions) -> Option<Box<dyn kiln::Engine>> {
    let mut delay = Duration::from_secs(1);
    while !opts.stop.load(Ordering::Relaxed) {
        match kiln::connect(lib.backend_config()).await {
            Ok(e) => {
                eprintln!("kiln worker: reconnected");
                return Some(e);
            }
            Err(e) => {
                tracing::warn!(error = %e, "kiln worker: still cannot reach the database");
                let end = Instant::now() + delay;
                while Instant::now() < end && !opts.stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
    None
}

/// `kiln worker`: claim and run backfill parts until stopped (SIGTERM/SIGINT
/// finish the current batch and release the lease), or with `--once` until
/// nothing is left to claim. A lost connection (the database restarted) is
/// re-established with back-off; a part this worker held is continued from
/// its cursor once its lease expires.
pub async fn worker(lib: &kiln::Kiln, first: &mut dyn kiln::Engine, args: WorkerArgs, json: bool) -> Result<i32, CliError> {
    let mut opts = WorkerOptions::new(owner());
    opts.lease = args.lease;
    stop_on_signals(opts.stop.clone());
    let progress = Reporter { json, every: Duration::from_secs(2), last: std::sync::Mutex::new(None) };
    let only = args.only.as_ref().map(|v| v.number);
    if !json {
        eprintln!(
            "kiln worker {}: processing backfill jobs{}",
            opts.owner,
            if args.once { " until none is left" } else { " (SIGTERM stops after the current batch)" }
        );
    }
    let mut failed = 0;
    let mut owned: Option<Box<dyn kiln::Engine>> = None;
    loop {
        let engine: &mut dyn kiln::Engine = match owned.as_mut() {
            Some(e) => e.as_mut(),
            None => &mut *first,
        };
        let r = lib.runner(engine, None).work(&opts, only, &progress).await;
        match r {
            Ok(r) => {
                report_end(&r, json);
                failed += r.failed.len();
            }
            Err(e) if connection_lost(&e) => {
                eprintln!("kiln worker: lost the database ({e}); reconnecting");
                match reconnect(lib, &opts).await {
                    Some(e) => owned = Some(e),
                    None => break,
                }
                continue;
            }
            Err(e) => return Err(e.into()),
        }
        if args.once || opts.stop.load(Ordering::Relaxed) {
            break;
        }
        let end = Instant::now() + args.idle;
        while Instant::now() < end && !opts.stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if opts.stop.load(Ordering::Relaxed) {
            break;
        }
    }
    if let Some(e) = owned {
        let _ = e.close().await;
    }
    Ok(if failed > 0 { 1 } else { 0 })
}

/// `kiln up --wait`: run every queued backfill inline, then wait until no
/// part is left running elsewhere. Returns the jobs that did not finish `done`.
pub async fn wait_for_backfills(runner: &mut Runner<'_>) -> Result<Vec<JobInfo>, CliError> {
    let opts = WorkerOptions::new(owner());
    stop_on_signals(opts.stop.clone());
    // Progress goes to stderr, also with --json (stdout holds the one report).
    let progress = Reporter { json: false, every: Duration::from_secs(2), last: std::sync::Mutex::new(None) };
    loop {
        let r = runner.work(&opts, None, &progress).await?;
        report_end(&r, false);
        let jobs = runner.jobs().await?;
        let infos = JobInfo::all(&jobs, chrono::Utc::now());
        let busy = infos.iter().any(|i| matches!(i.state, JobState::Queued | JobState::Running));
        if !busy || opts.stop.load(Ordering::Relaxed) {
            return Ok(infos.into_iter().filter(|i| i.state != JobState::Done).collect());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Print what `kiln contract` (or `up --contract`) did.
pub fn contract_report(r: &ContractReport, json: bool) {
    if json {
        render::json(r);
        return;
    }
    for s in &r.contracted {
        println!(
            "contracted {}_{} ({} statement{}, {} ms)",
            s.version,
            s.name,
            s.statements,
            if s.statements == 1 { "" } else { "s" },
            s.duration_ms
        );
    }
    for w in &r.waiting {
        println!("not contracted {}_{}: {}", w.version, w.name, w.reason);
    }
    if r.contracted.is_empty() && r.waiting.is_empty() {
        println!("Nothing to contract: no migration is expanded.");
    }
}

/// `kiln contract VERSION`.
pub async fn contract(runner: &mut Runner<'_>, local: &[Migration], id: &str, json: bool) -> Result<i32, CliError> {
    let v = version(id)?;
    let r = runner.contract(local, Some(&v)).await?;
    contract_report(&r, json);
    Ok(0)
}
