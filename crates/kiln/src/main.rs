//! The `kiln` command.
//!
//! Parses flags, resolves configuration, then calls the same library code an
//! application would; this file only renders events and reports. Exit codes:
//! 0 success, 1 a migration or check failed, 2 bad usage or configuration.

// `RunError` is large by design (see kiln-core).
#![allow(clippy::result_large_err)]

mod cli;
mod render;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let json = cli.global.json;
    init_logging(cli.global.log_level.as_deref());
    // One thread is enough for a migration run and starts fastest; tasks that
    // must run beside it (lock heartbeats) are cooperative.
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = match rt.block_on(cli::run(cli)) {
        Ok(code) => code,
        Err(e) => render::error(&e, json),
    };
    // Don't wait for background tasks (a driver's idle connection pool) at exit.
    rt.shutdown_background();
    ExitCode::from(code as u8)
}

fn init_logging(level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(l) => EnvFilter::new(l),
        None => EnvFilter::try_from_env("KILN_LOG").unwrap_or_else(|_| EnvFilter::new("warn")),
    };
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).try_init();
}
