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

/// Renders runner events as progress lines.
pub struct Progress;

impl Progress {
    pub fn new() -> Self {
        Progress
    }
}

impl kiln::Observer for Progress {
    fn on_event(&self, e: &Event) {
        match e {
            Event::LockWaiting { holder, timeout } => {
                eprintln!("{} another kiln run holds the migration lock ({holder}); waiting up to {}s…", "wait".yellow(), timeout.as_secs())
            }
            Event::StepFinished { direction, version, name, duration } => {
                let verb = if *direction == Direction::Up { "applied " } else { "reverted" };
                println!("  {} {version} {name} {}", verb.green(), format!("({} ms)", duration.as_millis()).dimmed());
            }
            Event::Warning { message } => eprintln!("{} {message}", "warning:".yellow().bold()),
            Event::StepFailed { version, name, .. } => println!("  {} {version} {name}", "failed  ".red().bold()),
            _ => {}
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
                    kiln::Body::Code => {}
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
    static COLOUR: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
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
        "applied" => padded.green().to_string(),
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

/// Print `kiln status`.
pub fn status(rows: &[StatusRow], collections: Option<&serde_json::Value>, target: &Target, as_json: bool) {
    if as_json {
        let mut v = serde_json::json!({ "migrations": rows });
        if let Some(c) = collections {
            v["collections"] = c.clone();
        }
        json(&v);
        return;
    }
    let mut out = String::with_capacity(rows.len() * 100);
    use std::fmt::Write as _;
    let _ = writeln!(out, "{}", target.header());
    if rows.is_empty() {
        let _ = writeln!(out, "No migrations yet: `kiln create <name>` writes one.");
    } else {
        let wv = rows.iter().map(|r| r.version.len()).max().unwrap_or(7).max(7);
        let wn = rows.iter().map(|r| r.name.chars().count()).max().unwrap_or(4).clamp(4, 48);
        let ws = 8;
        let _ = writeln!(
            out,
            "{:<wv$}  {:<wn$}  {:<ws$}  {:>5}  {:<20}  {:>8}  CHECKSUM",
            "VERSION", "NAME", "STATE", "BATCH", "APPLIED AT (UTC)", "DURATION"
        );
        for r in rows {
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
            let _ = writeln!(
                out,
                "{:<wv$}  {:<wn$}  {}  {:>5}  {:<20}  {:>8}  {}",
                r.version,
                name,
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
        }
        let count = |s: &str| rows.iter().filter(|r| r.state == s).count();
        let mut summary = format!("{} applied, {} pending", count("applied") + count("baseline"), count("pending"));
        for s in ["failed", "running", "missing", "retired"] {
            let n = count(s);
            if n > 0 {
                let _ = write!(summary, ", {n} {s}");
            }
        }
        let changed = rows.iter().filter(|r| r.checksum_ok == Some(false)).count();
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
        println!("{} every migration applies, validates, and its down undoes its up", "✓".green().bold());
    } else {
        println!("{} {} problem(s)", "✗".red().bold(), r.findings.len());
    }
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
        let mut v = serde_json::json!({ "error": { "code": code_of(e), "message": e.to_string(), "exit_code": code } });
        if let CliError::Run(RunError::Plan(ps)) = e {
            v["error"]["problems"] = ps.iter().map(|p| serde_json::json!({"code": p.code(), "message": p.to_string()})).collect();
        }
        if let CliError::Run(RunError::Invalid { version, file, violations, done, outcome }) = e {
            v["error"]["version"] = serde_json::json!(version.text);
            v["error"]["file"] = serde_json::json!(file);
            v["error"]["violations"] = serde_json::json!(violations);
            v["error"]["rolled_back"] = serde_json::json!(*outcome == kiln::FailureOutcome::RolledBack);
            v["error"]["done_before_failure"] = serde_json::json!(done.iter().map(|d| d.text.clone()).collect::<Vec<_>>());
        }
        if let CliError::Run(RunError::Migration { version, error, done, outcome }) = e {
            v["error"]["version"] = serde_json::json!(version.text);
            v["error"]["file"] = serde_json::json!(error.file);
            v["error"]["statement"] = serde_json::json!(error.statement);
            v["error"]["line"] = serde_json::json!(error.line);
            v["error"]["database_code"] = serde_json::json!(error.code);
            v["error"]["rolled_back"] = serde_json::json!(*outcome == kiln::FailureOutcome::RolledBack);
            v["error"]["done_before_failure"] = serde_json::json!(done.iter().map(|d| d.text.clone()).collect::<Vec<_>>());
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
    eprintln!("{} {msg}", "error:".red().bold());
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
