//! `kiln serve`: the router on a TCP listener until Ctrl-C.

use std::path::PathBuf;

use super::{router, ApiOptions};
use crate::config::Config;
use crate::Kiln;

/// The flags of `kiln serve`.
#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Read the API token from this file (default: the KILN_API_TOKEN variable)
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Require the token on read endpoints too (status, ready, openapi.json)
    #[arg(long)]
    pub protect_reads: bool,
}

/// Why `kiln serve` could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// No token, an unreadable token file (the CLI exits 2).
    #[error("{0}")]
    Usage(String),
    /// The address cannot be bound, or the server failed (exit 1).
    #[error("{0}")]
    Io(String),
}

/// Run `kiln serve` for the resolved configuration: read the token, bind
/// `args.listen`, say where it listens on stderr, serve until Ctrl-C.
///
/// # Errors
/// [`ServeError::Usage`] without a token, [`ServeError::Io`] when the address
/// cannot be bound.
pub async fn serve(cfg: &Config, args: &ServeArgs) -> Result<(), ServeError> {
    let token = match &args.token_file {
        Some(f) => std::fs::read_to_string(f)
            .map_err(|e| ServeError::Usage(format!("cannot read the API token file {}: {e}", f.display())))?
            .trim()
            .to_string(),
        None => std::env::var("KILN_API_TOKEN").unwrap_or_default().trim().to_string(),
    };
    if token.is_empty() {
        let from = match &args.token_file {
            Some(f) => format!("the token file {} is empty", f.display()),
            None => "KILN_API_TOKEN is not set".to_string(),
        };
        return Err(ServeError::Usage(format!(
            "{from}: `kiln serve` needs a token for its mutating endpoints; run `KILN_API_TOKEN=$(openssl rand -hex 32) kiln serve` or pass --token-file FILE"
        )));
    }
    let opts = ApiOptions::new(token).protect_reads(args.protect_reads).tenants(cfg.tenants.clone());
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| ServeError::Io(format!("cannot listen on {}: {e}; pick another address with --listen", args.listen)))?;
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| args.listen.clone());
    eprintln!(
        "kiln serve: http://{addr}/ for {} (migrations in {}); POST needs `Authorization: Bearer <token>`{}; Ctrl-C stops",
        cfg.redacted_url(),
        cfg.dir.display(),
        if args.protect_reads { ", and so do reads" } else { "" }
    );
    let app = router(Kiln::from_config(cfg), opts);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .map_err(|e| ServeError::Io(format!("the server stopped: {e}")))
}
