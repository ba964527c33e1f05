//! The `kiln` command.
//!
//! Parses flags, resolves configuration, then calls the same library code an
//! application would; this file only renders events and reports. Exit codes:
//! 0 success, 1 a migration or check failed, 2 bad usage or configuration.

// `RunError` is large by design (see kiln-core).
#![allow(clippy::result_large_err)]

mod cli;
mod db_cmd;
mod jobs_cli;
mod render;
mod scaffold;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let json = cli.global.json;
    let down = matches!(cli.cmd, cli::Cmd::Down { .. });
    render::init_color(cli.global.color);
    init_logging(cli.global.log_level.as_deref());
    // One thread is enough for a migration run and starts fastest; tasks that
    // must run beside it (lock heartbeats) are cooperative. `kiln serve`
    // answers many clients at once: it gets a worker per core.
    let serve = matches!(cli.cmd, cli::Cmd::Serve(_));
    let built = if serve {
        tokio::runtime::Builder::new_multi_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    };
    let rt = match built {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = match rt.block_on(cli::run(cli)) {
        Ok(code) => code,
        Err(e) => render::error(&e, json, down),
    };
    // Don't wait for background tasks (a driver's idle connection pool) at exit.
    rt.shutdown_background();
    ExitCode::from(code as u8)
}

/// A command line clap rejects: clap's own text for people (and for `--help`
/// and `--version`, which are not errors), one JSON error document with code
/// `usage` on stdout when `--json` is among the arguments. Exit 2.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let wants_json = std::env::args_os().any(|a| a == "--json");
    if !wants_json || matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand) {
        e.exit();
    }
    let message = e.render().to_string();
    let message = message.trim().trim_start_matches("error: ").lines().next().unwrap_or("").to_string();
    render::json(&serde_json::json!({ "error": { "code": "usage", "message": message, "exit_code": 2 } }));
    ExitCode::from(2)
}

/// `--log-level debug` (or `KILN_LOG=debug`) turns on kiln's own diagnostics
/// (configuration, lock, plan, each migration's timing) and leaves the drivers'
/// logs at `warn`; a full filter (`sqlx=debug,kiln=trace`) is used as given.
/// Without either, only kiln's own warnings are shown: drivers log on their own
/// (sqlx's `WARN slow statement` for a `GET_LOCK` that waits as intended),
/// which is noise for the user, and a driver's log line may quote a
/// connection string. Colour only on a terminal.
fn init_logging(level: Option<&str>) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let asked = level.map(str::to_string).or_else(|| std::env::var("KILN_LOG").ok());
    let drivers = if asked.is_some() { "warn" } else { "off" };
    let given = asked.unwrap_or_else(|| "warn".into());
    let spec = if given.contains('=') || given.contains(',') {
        given
    } else {
        format!("{drivers},kiln={given},kiln_core={given},kiln_sql={given},kiln_mongo={given}")
    };
    let filter = EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_target(false)
        .try_init();
}
