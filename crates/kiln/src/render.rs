//! Human and JSON output. Human output goes to stdout (errors and lock waits
//! to stderr), coloured when the stream is a terminal (and NO_COLOR is unset).

use std::io::Write;

use anstream::{eprintln, print, println};
use kiln::{AdminReport, Direction, Event, RunError, RunReport, StatusRow};
use owo_colors::OwoColorize;
use serde::Serialize;

use crate::cli::CliError;

/// Print a value as pretty JSON on stdout.
pub fn json<T: Serialize + ?Sized>(v: &T) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer_pretty(&mut out, v);
    let _ = writeln!(out);
}

/// Renders runner events as progress lines. On a terminal, a running
/// migration shows a spinner with its name, its place in the plan (n/N) and
/// the time it has taken so far, replaced by the result line when it ends; in
/// a pipe only the result lines are printed.
pub struct Progress {
    spinner: std::sync::Mutex<Option<indicatif::ProgressBar>>,
    live: bool,
    total: std::sync::atomic::AtomicUsize,
}

impl Progress {
    pub fn new() -> Self {
        use std::io::IsTerminal;
        Progress { spinner: std::sync::Mutex::new(None), live: std::io::stdout().is_terminal(), total: Default::default() }
    }

    fn clear(&self) {
        if let Some(bar) = self.spinner.lock().unwrap_or_else(|p| p.into_inner()).take() {
            bar.finish_and_clear();
        }
    }
}

impl kiln::Observer for Progress {
    fn on_event(&self, e: &Event) {
        use std::sync::atomic::Ordering;
        match e {
            Event::LockWaiting { holder, timeout } => {
                eprintln!("{} another kiln run holds the migration lock ({holder}); waiting up to {}s…", "wait".yellow(), timeout.as_secs())
            }
            Event::StepStarted { direction, version, name, index, total } => {
                self.total.store(*total, Ordering::Relaxed);
                if self.live {
                    let verb = if *direction == Direction::Up { "applying" } else { "reverting" };
                    let bar = indicatif::ProgressBar::new_spinner();
                    let style = indicatif::ProgressStyle::with_template("  {spinner} {msg} {elapsed}")
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
                    bar.set_style(style);
                    bar.set_message(format!("[{index}/{total}] {verb} {version} {name}"));
                    bar.enable_steady_tick(std::time::Duration::from_millis(120));
                    *self.spinner.lock().unwrap_or_else(|p| p.into_inner()) = Some(bar);
                }
            }
            Event::StepFinished { direction, version, name, duration } => {
                let verb = if *direction == Direction::Up { "applied " } else { "reverted" };
                let line = format!("  {} {version} {name} {}", verb.green(), format!("({} ms)", duration.as_millis()).dimmed());
                // A step is reported once it is durable, possibly while the next
                // one runs: print above that one's spinner, keeping it.
                let guard = self.spinner.lock().unwrap_or_else(|p| p.into_inner());
                match guard.as_ref() {
                    Some(bar) if !bar.message().contains(&format!(" {version} {name}")) => bar.println(line),
                    _ => {
                        drop(guard);
                        self.clear();
                        println!("{line}");
                    }
                }
            }
            Event::Warning { message } => {
                self.clear();
                eprintln!("{} {message}", "warning:".yellow().bold())
            }
            Event::StepFailed { version, name, .. } => {
                self.clear();
                println!("  {} {version} {name}", "failed  ".red().bold())
            }
            _ => {}
        }
    }
}

/// `--color`: auto (a terminal without NO_COLOR), always, never.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorMode {
    /// Colour on a terminal unless NO_COLOR is set.
    Auto,
    /// Always (also in a pipe).
    Always,
    /// Never.
    Never,
}

/// Apply `--color` before anything is printed.
pub fn init_color(mode: ColorMode) {
    let on = match mode {
        ColorMode::Always => true,
        ColorMode::Never => false,
        ColorMode::Auto => {
            use std::io::IsTerminal;
            std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
        }
    };
    let _ = COLOUR.set(on);
    anstream::ColorChoice::write_global(match mode {
        ColorMode::Always => anstream::ColorChoice::Always,
        ColorMode::Never => anstream::ColorChoice::Never,
        ColorMode::Auto => anstream::ColorChoice::Auto,
    });
}

static COLOUR: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// Live output of a fleet run: one line per target as it ends (plain lines,
/// also in a pipe; nothing with `--json`).
pub struct FleetProgress {
    quiet: bool,
    live: std::sync::Mutex<Live>,
}

/// The counts behind the live line of a fleet `up`.
#[derive(Default)]
struct Live {
    total: usize,
    ended: usize,
    failed: usize,
    running: usize,
    tenants_started: Option<std::time::Instant>,
    /// On a terminal: the line at the bottom (done / failed / running / left, rate, ETA).
    bar: Option<indicatif::ProgressBar>,
}

impl Live {
    fn line(&self) -> String {
        let left = self.total.saturating_sub(self.ended + self.running);
        let mut s = format!("{}/{} done · {} failed · {} running · {} left", self.ended, self.total, self.failed, self.running, left);
        if let Some(t0) = self.tenants_started {
            let secs = t0.elapsed().as_secs_f64();
            if self.ended > 0 && secs > 0.0 {
                let rate = self.ended as f64 / secs;
                let eta = (self.total - self.ended) as f64 / rate;
                s.push_str(&format!(" · {rate:.1}/s · ETA {}s", eta.ceil() as u64));
            }
        }
        s
    }
}

impl FleetProgress {
    pub fn new(json: bool) -> Self {
        FleetProgress { quiet: json, live: Default::default() }
    }

    /// Something happened in the fleet run.
    pub fn event(&self, e: kiln::fleet::FleetEvent<'_>) {
        use kiln::fleet::FleetEvent;
        use kiln::report::{TargetName, TargetResult};
        if self.quiet {
            return;
        }
        let mut live = self.live.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match e {
            FleetEvent::Tenants { count } => {
                live.total = count;
                live.tenants_started = Some(std::time::Instant::now());
                if count > 1 && std::io::IsTerminal::is_terminal(&std::io::stdout()) && colour() {
                    let bar = indicatif::ProgressBar::new_spinner();
                    bar.set_style(
                        indicatif::ProgressStyle::with_template("  {spinner} {msg}").unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
                    );
                    bar.enable_steady_tick(std::time::Duration::from_millis(120));
                    bar.set_message(live.line());
                    live.bar = Some(bar);
                }
            }
            FleetEvent::Started(t) => {
                if matches!(t, TargetName::Tenant(_)) {
                    live.running += 1;
                }
            }
            FleetEvent::Done(o) => {
                let tenant = matches!(o.target, TargetName::Tenant(_));
                let n = if tenant {
                    live.ended += 1;
                    if matches!(o.result, TargetResult::Failed { .. }) {
                        live.failed += 1;
                    }
                    format!("[{}/{}] ", live.ended, live.total)
                } else {
                    String::new()
                };
                // A skipped tenant (fail-fast, the public database failed) never started.
                let started = match &o.result {
                    TargetResult::Skipped { reason } => reason.starts_with("running elsewhere"),
                    _ => true,
                };
                if tenant && started {
                    live.running = live.running.saturating_sub(1);
                }
                let line = match &o.result {
                    TargetResult::Done { report } if report.steps.is_empty() => {
                        format!("  {} {n}{}: up to date ({} ms)", "✓".green(), o.target, o.duration_ms)
                    }
                    TargetResult::Done { report } => format!(
                        "  {} {n}{}: {} {} migration(s) ({} ms)",
                        "✓".green(),
                        o.target,
                        if report.dry_run { "would apply" } else { "applied" },
                        report.steps.len(),
                        o.duration_ms
                    ),
                    TargetResult::Failed { error } => format!("  {} {n}{}: {}", "✗".red().bold(), o.target, first_line(&error.message)),
                    TargetResult::Skipped { reason } => format!("  {} {n}{}: skipped, {reason}", "-".yellow(), o.target),
                };
                match &live.bar {
                    Some(bar) => bar.println(line),
                    None => println!("{line}"),
                }
            }
        }
        if let Some(bar) = &live.bar {
            bar.set_message(live.line());
            if live.ended >= live.total {
                bar.finish_and_clear();
            }
        }
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

/// The end of a fleet `up`: counts, and every failed target with its error.
pub fn fleet_report(r: &kiln::report::FleetReport, as_json: bool) {
    use kiln::report::TargetResult;
    if as_json {
        json(&serde_json::json!({ "ok": r.ok(), "targets": r.targets, "duration_ms": r.duration_ms }));
        return;
    }
    let count = |f: &dyn Fn(&TargetResult) -> bool| r.targets.iter().filter(|t| f(&t.result)).count();
    let done = count(&|t| matches!(t, TargetResult::Done { .. }));
    let failed = count(&|t| matches!(t, TargetResult::Failed { .. }));
    let skipped = count(&|t| matches!(t, TargetResult::Skipped { .. }));
    let steps: usize = r.targets.iter().map(|t| if let TargetResult::Done { report } = &t.result { report.steps.len() } else { 0 }).sum();
    println!(
        "{} {done} database(s) done ({steps} migration(s)), {failed} failed, {skipped} skipped in {} ms.",
        if failed == 0 { "Fleet:".green().bold().to_string() } else { "Fleet:".red().bold().to_string() },
        r.duration_ms
    );
    for t in r.failed() {
        if let TargetResult::Failed { error } = &t.result {
            eprintln!("{} {}: {}", "error:".red().bold(), t.target, error.message);
        }
    }
}

/// `kiln check` over a fleet: one line per database, then what is wrong.
pub fn fleet_check(rows: &[kiln::fleet::TargetCheck], as_json: bool) {
    if as_json {
        json(&serde_json::json!({ "ok": rows.iter().all(|r| r.ok()), "targets": rows }));
        return;
    }
    for r in rows {
        match (&r.report, &r.error) {
            (Some(c), _) if c.ok => println!("  {} {}", "✓".green(), r.target),
            (Some(c), _) => {
                let mut what = Vec::new();
                if !c.pending.is_empty() {
                    what.push(format!("{} pending", c.pending.len()));
                }
                if !c.failed.is_empty() {
                    what.push(format!("{} failed", c.failed.len()));
                }
                if !c.changed.is_empty() {
                    what.push(format!("{} changed", c.changed.len()));
                }
                if !c.problems.is_empty() {
                    what.push(format!("{} plan problem(s)", c.problems.len()));
                }
                if kiln::schema::has_errors(&c.violations) {
                    what.push("schema contract violated".into());
                }
                if !c.drift.is_empty() {
                    what.push(format!("{} drift change(s)", c.drift.len()));
                }
                println!("  {} {}: {}", "✗".red().bold(), r.target, what.join(", "));
            }
            (None, Some(e)) => println!("  {} {}: cannot read: {}", "✗".red().bold(), r.target, first_line(&e.message)),
            (None, None) => {}
        }
    }
    let bad = rows.iter().filter(|r| !r.ok()).count();
    if bad == 0 {
        println!("{} {} database(s) up to date", "✓".green().bold(), rows.len());
    } else {
        println!("{} {bad} of {} database(s) need attention (`kiln status --tenants`, `kiln check --json`)", "✗".red().bold(), rows.len());
    }
}

/// `kiln status --tenants`.
pub fn fleet_status(rows: &[kiln::fleet::TargetStatus], as_json: bool) {
    if as_json {
        json(&serde_json::json!({ "targets": rows }));
        return;
    }
    let w = rows.iter().map(|r| r.target.to_string().chars().count()).max().unwrap_or(8).max(8);
    println!("{:<w$}  {:>7}  {:>7}  {:>6}  LAST APPLIED (UTC)", "DATABASE", "APPLIED", "PENDING", "FAILED");
    for r in rows {
        match &r.error {
            Some(e) => println!("{:<w$}  {}", r.target.to_string(), format!("cannot read: {}", first_line(&e.message)).red()),
            None => println!(
                "{:<w$}  {:>7}  {:>7}  {:>6}  {}",
                r.target.to_string(),
                r.applied,
                r.pending,
                r.failed,
                r.last_applied_at.map(timestamp).unwrap_or_else(|| "-".into())
            ),
        }
    }
}

/// What a command ran against, for the headers of human output.
pub struct Target {
    /// The database URL, password redacted.
    pub url: String,
    /// Migrations found.
    pub migrations: usize,
    /// The migrations directory.
    pub dir: String,
    /// The kiln.toml used, if any.
    pub config: Option<String>,
}

impl Target {
    /// `sqlite://kiln.db · 3 migrations in migrations · config kiln.toml`
    pub fn header(&self) -> String {
        let config = match &self.config {
            Some(c) => format!(" · config {c}"),
            None => " · no kiln.toml".to_string(),
        };
        let n = if self.migrations == 1 { "1 migration".to_string() } else { format!("{} migrations", self.migrations) };
        format!("{} · {n} in {}{config}", self.url, self.dir)
    }
}

/// Print the result of `up` / `down`.
pub fn run_report(r: &RunReport, target: &Target, as_json: bool) {
    if as_json {
        json(r);
        return;
    }
    let up = r.direction == Direction::Up;
    if r.dry_run {
        if r.steps.is_empty() {
            println!("Dry run: nothing to {} on {}.", if up { "apply" } else { "revert" }, target.url);
            return;
        }
        let batch = r.batch.map(|b| format!(" as batch {b}")).unwrap_or_default();
        println!(
            "Dry run: would {} {} migration(s){batch} on {}; nothing was changed.",
            if up { "apply" } else { "revert" },
            r.steps.len(),
            target.url
        );
        for s in &r.steps {
            let tx = match s.transaction {
                kiln::TxMode::Off => ", no transaction",
                kiln::TxMode::On => ", transaction",
                kiln::TxMode::Default => "",
            };
            let unit = if matches!(s.body, Some(kiln::Body::Commands { .. })) { "command(s)" } else { "statement(s)" };
            println!("  {} {} {} ({}, {} {unit}{tx})", "•".cyan(), s.version, s.name, s.file, s.statements);
            if let Some(body) = &s.body {
                match body {
                    kiln::Body::Sql { statements, .. } => {
                        for st in statements {
                            for (i, l) in st.sql.lines().enumerate() {
                                println!("      {}{}", if i == 0 { "" } else { "  " }, l.dimmed());
                            }
                        }
                    }
                    kiln::Body::Commands { commands, .. } => {
                        for c in commands {
                            println!("      {}", c.doc.to_string().dimmed());
                        }
                    }
                    kiln::Body::Code { .. } => {}
                }
            }
        }
        return;
    }
    if r.steps.is_empty() {
        if up {
            println!("Nothing to apply: {} is up to date ({} migrations in {}).", target.url, target.migrations, target.dir);
        } else {
            println!("Nothing to revert: no migration is applied on {}.", target.url);
        }
        return;
    }
    let batch = r.batch.map(|b| format!(" (batch {b})")).unwrap_or_default();
    println!("{} {} migration(s){batch} in {} ms.", if up { "Applied" } else { "Reverted" }.green().bold(), r.steps.len(), r.duration_ms);
}

/// Colour only for a terminal (and not with NO_COLOR): building and then
/// stripping escape codes for a 1,000-row table piped elsewhere costs more than
/// the table itself.
fn colour() -> bool {
    *COLOUR.get_or_init(|| {
        use std::io::IsTerminal;
        std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
    })
}

fn state_cell(state: &str, width: usize) -> String {
    let padded = format!("{state:<width$}");
    if !colour() {
        return padded;
    }
    match state {
        "applied" | "contracted" => padded.green().to_string(),
        "expanded" | "backfilling" | "backfilled" | "backfill-paused" => padded.cyan().to_string(),
        "backfill-failed" | "backfill-cancelled" => padded.red().bold().to_string(),
        "baseline" => padded.cyan().to_string(),
        "pending" => padded.yellow().to_string(),
        "failed" | "running" | "missing" => padded.red().bold().to_string(),
        "retired" => padded.dimmed().to_string(),
        _ => padded,
    }
}

/// `2026-11-22 03:04:05` (UTC). Written by hand: chrono's `format` parses its
/// pattern again for every one of a thousand rows.
fn timestamp(t: chrono::DateTime<chrono::Utc>) -> String {
    use chrono::{Datelike, Timelike};
    format!("{:04}-{:02}-{:02} {:02}:{:02}:{:02}", t.year(), t.month(), t.day(), t.hour(), t.minute(), t.second())
}

/// Which rows `kiln status` shows.
pub struct StatusView {
    /// Only pending.
    pub pending: bool,
    /// Only failed, running or missing.
    pub failed: bool,
    /// Only the last N.
    pub last: Option<usize>,
    /// Everything, also on a terminal.
    pub all: bool,
    /// Only this group.
    pub group: Option<String>,
}

/// Rows to show: the filters, then (on a terminal, without `--all` or
/// `--last`) the last 20 applied rows and every row not applied. Returns the
/// rows and how many applied rows the terminal view hid.
fn select<'a>(rows: &'a [StatusRow], view: &StatusView, terminal: bool) -> (Vec<&'a StatusRow>, usize) {
    let problem = |r: &StatusRow| matches!(r.state.as_str(), "failed" | "running" | "missing");
    let mut out: Vec<&StatusRow> = rows
        .iter()
        .filter(|r| view.group.as_ref().is_none_or(|g| r.group.as_ref() == Some(g)))
        .filter(|r| !(view.pending || view.failed) || (view.pending && r.state == "pending") || (view.failed && problem(r)))
        .collect();
    if let Some(n) = view.last {
        let skip = out.len().saturating_sub(n);
        out.drain(..skip);
        return (out, 0);
    }
    if !terminal || view.all || view.pending || view.failed {
        return (out, 0);
    }
    const KEEP: usize = 20;
    let settled = |r: &StatusRow| matches!(r.state.as_str(), "applied" | "baseline" | "retired");
    let total_settled = out.iter().filter(|r| settled(r)).count();
    let hide = total_settled.saturating_sub(KEEP);
    let mut seen = 0;
    out.retain(|r| {
        if !settled(r) {
            return true;
        }
        seen += 1;
        seen > hide
    });
    (out, hide)
}

/// Print `kiln status`.
pub fn status(
    all_rows: &[StatusRow],
    problems: &[kiln::SourceError],
    view: &StatusView,
    collections: Option<&serde_json::Value>,
    target: &Target,
    as_json: bool,
) {
    use std::io::IsTerminal;
    let (rows, hidden) = select(all_rows, view, !as_json && std::io::stdout().is_terminal());
    if as_json {
        let mut v = serde_json::json!({ "migrations": rows });
        if !problems.is_empty() {
            v["problems"] = problems.iter().map(|p| serde_json::json!({ "code": p.code(), "file": p.path(), "message": p.to_string() })).collect();
        }
        if let Some(c) = collections {
            v["collections"] = c.clone();
        }
        json(&v);
        return;
    }
    let mut out = String::with_capacity(rows.len() * 100);
    use std::fmt::Write as _;
    let _ = writeln!(out, "{}", target.header());
    if !problems.is_empty() {
        let mark = if colour() { "✗".red().bold().to_string() } else { "✗".to_string() };
        let _ = writeln!(out, "{mark} {} bad file(s): `kiln up` refuses to run until they are fixed", problems.len());
        for p in problems {
            let _ = writeln!(out, "    {p}");
        }
    }
    if all_rows.is_empty() {
        let _ = writeln!(out, "No migrations yet: `kiln create <name>` writes one.");
    } else if rows.is_empty() {
        let _ = writeln!(out, "No migration matches (of {}).", all_rows.len());
    } else {
        let wv = rows.iter().map(|r| r.version.len()).max().unwrap_or(7).max(7);
        let wn = rows.iter().map(|r| r.name.chars().count()).max().unwrap_or(4).clamp(4, 48);
        let ws = rows.iter().map(|r| r.state.len() + 1).max().unwrap_or(8).max(8);
        // A GROUP column only when groups exist.
        let wg = rows.iter().filter_map(|r| r.group.as_ref()).map(|g| g.chars().count()).max().map(|w| w.clamp(5, 24));
        let group_cell = |g: Option<&str>| match wg {
            Some(w) => format!("{:<w$}  ", g.unwrap_or("-").chars().take(w).collect::<String>()),
            None => String::new(),
        };
        if hidden > 0 {
            let _ = writeln!(out, "… {hidden} earlier applied migrations not shown (--all shows every one)");
        }
        let _ = writeln!(
            out,
            "{:<wv$}  {:<wn$}  {}{:<ws$}  {:>5}  {:<20}  {:>8}  {:<4}  CHECKSUM",
            "VERSION",
            "NAME",
            group_cell(Some("GROUP")),
            "STATE",
            "BATCH",
            "APPLIED AT (UTC)",
            "DURATION",
            "DOWN"
        );
        for r in rows.iter().copied() {
            let mut name: String = r.name.chars().take(wn).collect();
            if r.name.chars().count() > wn {
                name.pop();
                name.push('…');
            }
            let state = if r.state == "pending" && r.out_of_order { "pending*" } else { r.state.as_str() };
            let checksum = match (r.checksum_ok, &r.checksum, colour()) {
                (Some(true), _, true) => "ok".green().to_string(),
                (Some(true), _, false) => "ok".to_string(),
                (Some(false), _, true) => "CHANGED".red().bold().to_string(),
                (Some(false), _, false) => "CHANGED".to_string(),
                (None, Some(c), true) if r.state == "pending" => (&c[..12.min(c.len())]).dimmed().to_string(),
                (None, Some(c), false) if r.state == "pending" => c[..12.min(c.len())].to_string(),
                _ => "-".to_string(),
            };
            // Irreversible migrations are marked (a baseline or missing file has no down to run either).
            let down = if r.file.is_none() {
                "-"
            } else if r.reversible {
                "yes"
            } else {
                "no"
            };
            let _ = writeln!(
                out,
                "{:<wv$}  {:<wn$}  {}{}  {:>5}  {:<20}  {:>8}  {down:<4}  {}",
                r.version,
                name,
                group_cell(r.group.as_deref()),
                state_cell(state, ws),
                r.batch.map(|b| b.to_string()).unwrap_or_else(|| "-".into()),
                r.applied_at.map(timestamp).unwrap_or_else(|| "-".into()),
                r.duration_ms.map(|d| format!("{d} ms")).unwrap_or_else(|| "-".into()),
                checksum
            );
            if let Some(e) = &r.error {
                if r.state == "failed" || r.state == "running" {
                    let at = e
                        .statement
                        .map(|s| format!("statement {s}{}: ", e.line.map(|l| format!(", line {l}")).unwrap_or_default()))
                        .unwrap_or_default();
                    let arrow = if colour() { "↳".red().to_string() } else { "↳".to_string() };
                    let _ = writeln!(out, "{:wv$}  {arrow} {at}{}", "", e.message);
                }
            }
            if let Some(j) = &r.job {
                let _ = writeln!(
                    out,
                    "{:wv$}  ↳ backfill of {}: {}, {}{}",
                    "",
                    j.target,
                    j.state,
                    j.progress(),
                    j.error.as_deref().map(|e| format!("; {e}")).unwrap_or_default()
                );
            }
        }
        let count = |s: &str| all_rows.iter().filter(|r| r.state == s).count();
        let mut summary = format!("{} applied, {} pending", count("applied") + count("baseline") + count("contracted"), count("pending"));
        let phased = all_rows.iter().filter(|r| r.job.is_some() || r.state == "expanded").count();
        if phased > 0 {
            let _ = write!(summary, ", {phased} expanded (not contracted yet)");
        }
        for s in ["failed", "running", "missing", "retired"] {
            let n = count(s);
            if n > 0 {
                let _ = write!(summary, ", {n} {s}");
            }
        }
        let changed = all_rows.iter().filter(|r| r.checksum_ok == Some(false)).count();
        if changed > 0 {
            let _ = write!(summary, ", {changed} changed since applied");
        }
        let _ = writeln!(out, "{summary}");
        if rows.iter().any(|r| r.state == "pending" && r.out_of_order) {
            let _ = writeln!(out, "* pending but older than the newest applied migration (needs --allow-out-of-order)");
        }
    }
    if colour() {
        print!("{out}");
    } else {
        // Nothing to strip: write straight to stdout.
        let _ = std::io::stdout().lock().write_all(out.as_bytes());
    }
    if let Some(serde_json::Value::Array(cols)) = collections {
        println!();
        println!("{:<32}  {:>6}  {:>12}  {:>7}  {:<9}  INDEX NAMES", "COLLECTION", "EXISTS", "DOCUMENTS", "INDEXES", "VALIDATOR");
        for c in cols {
            let idx: Vec<String> =
                c["indexes"].as_array().map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect()).unwrap_or_default();
            let docs = c["documents"].as_u64().unwrap_or(0);
            let docs = if c["exact"].as_bool().unwrap_or(true) { docs.to_string() } else { format!("~{docs}") };
            println!(
                "{:<32}  {:>6}  {:>12}  {:>7}  {:<9}  {}",
                c["name"].as_str().unwrap_or("?"),
                if c["exists"].as_bool().unwrap_or(false) { "yes" } else { "no" },
                docs,
                idx.len(),
                if c["validator"].as_bool().unwrap_or(false) { "yes" } else { "no" },
                idx.join(", ")
            );
        }
    }
}

/// Print `kiln check`.
pub fn check(r: &kiln::runner::CheckReport, target: &Target, as_json: bool) {
    if as_json {
        json(r);
        return;
    }
    println!("{}", target.header());
    fn strings<T: ToString>(v: &[T]) -> Vec<String> {
        v.iter().map(ToString::to_string).collect()
    }
    let section = |title: &str, items: &[String]| {
        if !items.is_empty() {
            println!("{} {title}:", "✗".red().bold());
            for i in items {
                println!("    {i}");
            }
        }
    };
    section("pending migrations", &strings(&r.pending));
    section("failed migrations (fix the database, then `kiln repair --reason \"fixed by hand\"`)", &strings(&r.failed));
    section("applied migrations changed or missing", &strings(&r.changed));
    section("plan problems", &r.problems.iter().map(|p| p.message.clone()).collect::<Vec<_>>());
    let errors: Vec<String> =
        r.violations.iter().filter(|v| v.severity == kiln::schema::Severity::Error).map(|v| format!("{}: {}", v.object, v.message)).collect();
    section("schema contract violations", &errors);
    let warnings: Vec<String> =
        r.violations.iter().filter(|v| v.severity == kiln::schema::Severity::Warning).map(|v| format!("{}: {}", v.object, v.message)).collect();
    if !warnings.is_empty() {
        println!("{} schema warnings:", "!".yellow().bold());
        for w in &warnings {
            println!("    {w}");
        }
    }
    let drift: Vec<String> = r.drift.iter().map(|c| c.to_string()).collect();
    section("drift since the last kiln run (changed by hand?)", &drift);
    if r.ok {
        let mut what = vec!["migrations up to date"];
        if r.contract_checked {
            what.push("schema valid");
        }
        if r.snapshot_found {
            what.push("no drift");
        }
        println!("{} {}", "✓".green().bold(), what.join(", "));
    }
}

/// Print `kiln diff`.
pub fn diff(d: Option<&[kiln::schema::Change]>, as_json: bool) {
    if as_json {
        json(&serde_json::json!({ "snapshot_found": d.is_some(), "changes": d.unwrap_or(&[]) }));
        return;
    }
    match d {
        None => println!("No schema snapshot stored yet: kiln stores one after every run that changes something."),
        Some([]) => println!("No changes since the last kiln run."),
        Some(changes) => {
            println!("{} change(s) since the last kiln run:", changes.len());
            for c in changes {
                let line = c.to_string();
                let colored = match c.kind.as_str() {
                    "added" => line.green().to_string(),
                    "removed" => line.red().to_string(),
                    _ => line.yellow().to_string(),
                };
                println!("  {colored}");
            }
        }
    }
}

/// Print `kiln verify`.
pub fn verify(r: &kiln::verify::VerifyReport, as_json: bool) {
    if as_json {
        json(r);
        return;
    }
    println!("Verified {} migration(s) on scratch database {}", r.migrations, r.scratch);
    for f in &r.findings {
        println!("{} {}: {}", "✗".red().bold(), f.migration, f.problem);
        for d in &f.differences {
            println!("      {d}");
        }
        for v in &f.violations {
            println!("      {v}");
        }
    }
    for n in &r.notes {
        println!("{} {n}", "note:".dimmed());
    }
    if !r.irreversible.is_empty() {
        println!("{} irreversible (down not checked): {}", "note:".dimmed(), r.irreversible.join(", "));
    }
    if r.ok {
        println!("{} {}", "✓".green().bold(), verify_summary(r));
    } else {
        println!("{} {} problem(s)", "✗".red().bold(), r.findings.len());
    }
}

/// What a passing `kiln verify` checked, and no more (issue 13: with every
/// migration irreversible it claimed that every down undoes its up).
fn verify_summary(r: &kiln::verify::VerifyReport) -> String {
    let applies = if r.contract_checked {
        "every migration applies and keeps the schema contract"
    } else {
        "every migration applies (no schema.yaml: the schema was not validated)"
    };
    let skipped = r.irreversible.len();
    let checked = r.migrations.saturating_sub(skipped);
    let downs = match (checked, skipped) {
        (_, 0) => "every down undoes its up".to_string(),
        (0, n) => format!("no down was checked: {} irreversible", if n == 1 { "the migration is".to_string() } else { format!("all {n} are") }),
        (c, n) => format!("{c} of {} downs undo their ups; {n} irreversible, not checked", c + n),
    };
    format!("{applies}; {downs}")
}

/// Print the result of baseline / retire / repair.
pub fn admin(r: &AdminReport, as_json: bool) {
    if as_json {
        json(r);
        return;
    }
    if r.changes.is_empty() {
        println!("kiln {0}: nothing to {0}", r.action);
    }
    for c in &r.changes {
        println!("  {} {c}", r.action.to_string().green());
    }
}

/// A hint on stderr (stdout stays the command's output, JSON included).
pub fn hint(message: &str) {
    eprintln!("{} {message}", "hint:".yellow().bold());
}

pub fn adopt(r: &kiln::adopt::AdoptReport, as_json: bool) {
    if as_json {
        json(r);
        return;
    }
    let tool = r.tool.name();
    let verb = if r.dry_run { "would adopt" } else { "adopted" };
    if r.adopted.is_empty() {
        println!("kiln adopt: nothing to adopt from {tool} ({}): {} already in kiln's history", r.table, r.already);
    } else {
        println!("kiln adopt: {verb} {} migrations {tool} applied ({}) as baseline:", r.adopted.len(), r.table);
        for a in &r.adopted {
            println!("  {} {}_{}  {}", "baseline".green(), a.version, a.name, a.file);
        }
        if r.already > 0 {
            println!("  ({} already in kiln's history)", r.already);
        }
    }
    for c in &r.changed {
        println!(
            "  {} {} changed since {tool} applied it: its checksum in {} differs from today's file; kiln recorded today's, check the change is one you want",
            "warning:".yellow(),
            c.file,
            r.table
        );
    }
    for m in &r.missing {
        println!("  {} {tool} applied {m}, which has no file in the migrations directory; kiln did not record it", "warning:".yellow());
    }
    if !r.adopted.is_empty() && !r.dry_run {
        println!("{} is left as it was; `kiln status` shows the baseline, `kiln up` runs only the rest", r.table);
    }
}

#[cfg(feature = "mongodb")]
pub fn sync_report(r: &kiln_mongo::SyncReport, as_json: bool) {
    if as_json {
        json(r);
    } else {
        let text = r.to_string();
        print!("{text}");
        if !text.ends_with('\n') {
            println!();
        }
    }
}

/// A stable machine code for an error (the library's, for run errors).
fn code_of(e: &CliError) -> &'static str {
    match e {
        CliError::Config(_) => "config",
        CliError::Usage(_) => "usage",
        CliError::Failed(_) => "failed",
        CliError::Run(r) => r.code(),
    }
}

/// Print an error (stderr for humans, stdout JSON for machines) and return the
/// exit code. `down`: the failed command was `kiln down`, so the migrations
/// done before the failure were reverted, not applied.
pub fn error(e: &CliError, as_json: bool, down: bool) -> i32 {
    let code = e.exit_code();
    if as_json {
        let mut report = match e {
            CliError::Run(r) => kiln::report::ErrorReport::from(r),
            other => kiln::report::ErrorReport {
                code: code_of(other).to_string(),
                message: other.to_string(),
                exit_code: code,
                problems: vec![],
                failure: None,
            },
        };
        report.exit_code = code;
        // Last line of defence for secrets: third-party text in an error may quote a URL.
        report.message = kiln::url::scrub_text(&report.message);
        let mut v = serde_json::json!({ "error": report });
        if report.failure.is_some() {
            v["error"]["direction"] = serde_json::json!(if down { "down" } else { "up" });
        }
        json(&v);
        return code;
    }
    let mut msg = e.to_string();
    // Show the cause chain of wrapped errors.
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        let t = s.to_string();
        if !msg.contains(&t) {
            msg.push_str(": ");
            msg.push_str(&t);
        }
        src = s.source();
    }
    eprintln!("{} {}", "error:".red().bold(), kiln::url::scrub_text(&msg));
    if let CliError::Run(r @ (RunError::Migration { .. } | RunError::Invalid { .. })) = e {
        let done = r.done();
        let list: Vec<&str> = done.iter().map(|v| v.text.as_str()).collect();
        match (down, done.is_empty()) {
            (false, true) => eprintln!("nothing was applied in this run before the failure"),
            (false, false) => eprintln!("applied in this run before the failure (still applied): {}", list.join(", ")),
            (true, true) => eprintln!("nothing was reverted in this run before the failure"),
            (true, false) => eprintln!("reverted in this run before the failure (now pending): {}", list.join(", ")),
        }
    }
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(v: u64, state: &str) -> StatusRow {
        StatusRow {
            version: format!("{v:04}"),
            version_number: v,
            name: format!("m{v}"),
            file: Some(format!("{v:04}_m{v}.sql")),
            group: None,
            state: state.into(),
            batch: None,
            applied_at: None,
            duration_ms: None,
            applied_by: None,
            checksum: None,
            checksum_ok: None,
            out_of_order: false,
            reversible: true,
            error: None,
            job: None,
        }
    }

    #[test]
    fn the_terminal_view_keeps_the_last_20_applied_and_everything_else() {
        let mut rows: Vec<StatusRow> = (1..=1000).map(|v| row(v, "applied")).collect();
        rows[10].state = "failed".into();
        rows.push(row(1001, "pending"));
        let all = StatusView { pending: false, failed: false, last: None, all: false, group: None };
        let (shown, hidden) = select(&rows, &all, true);
        assert_eq!(hidden, 979);
        assert_eq!(shown.len(), 22, "the failed one, the last 20 applied, the pending one");
        assert_eq!(shown[0].version, "0011");
        assert_eq!(shown[1].version, "0981");
        assert_eq!(shown.last().unwrap().version, "1001");
        // In a pipe, and with --all, every row.
        assert_eq!(select(&rows, &all, false).0.len(), 1001);
        let every = StatusView { all: true, ..all };
        assert_eq!(select(&rows, &every, true).0.len(), 1001);
    }
}
