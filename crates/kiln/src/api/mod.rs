//! The HTTP API and the status dashboard (DESIGN §7): an [`axum::Router`] an
//! application mounts, and what `kiln serve` runs.
//!
//! Every endpoint goes through the same [`Kiln`] value the library and the CLI
//! use, so a run over HTTP is the same plan under the same lock as `kiln up`:
//! concurrent `POST /migrations/run` calls serialise on kiln's lock (each waits
//! up to the lock time-out) and each reports what it did. Every response is
//! one of the shared report types ([`RunReport`](kiln_core::RunReport),
//! [`StatusRow`](kiln_core::StatusRow), [`CheckReport`](kiln_core::runner::CheckReport),
//! [`ObjectStatus`](kiln_core::report::ObjectStatus)); every error is
//! `{"error": ErrorReport}` with the same stable codes as the CLI's `--json`.
//!
//! ```no_run
//! # async fn start() -> std::io::Result<()> {
//! let kiln = kiln::Kiln::new("postgres://app@localhost/app").dir("migrations");
//! let opts = kiln::api::ApiOptions::new(std::env::var("KILN_API_TOKEN").unwrap_or_default());
//! let app = axum::Router::new().nest("/kiln", kiln::api::router(kiln, opts));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, app).await
//! # }
//! ```

mod auth;
mod error;
mod handlers;
mod openapi;
mod serve;
mod status;

use std::fmt;
use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;

use crate::Kiln;

pub use error::ApiError;
pub use handlers::{Health, RunRequest, StatusResponse, Summary, TenantsResponse, TenantsRunRequest};
pub use openapi::openapi;
pub use serve::{serve, ServeArgs, ServeError};
pub use status::RECHECK_INTERVAL;

/// Requests with a larger body are refused with 413 (`payload_too_large`).
pub const DEFAULT_BODY_LIMIT: usize = 64 * 1024;

/// How the API is protected and limited.
#[derive(Clone)]
pub struct ApiOptions {
    /// The bearer token mutating endpoints require (compared in constant time,
    /// never logged). Empty: every mutating request is refused with 401.
    token: String,
    /// Require the token on read endpoints too (`/migrations/status`,
    /// `/ready`, `/openapi.json`); `/health` and the dashboard page itself
    /// stay open (the page asks for the token).
    pub protect_reads: bool,
    /// Largest request body accepted, in bytes.
    pub body_limit: usize,
    /// The tenant fleet (`[tenants]` of kiln.toml): `GET /tenants` and
    /// `POST /tenants/run` answer 404 `no_fleet` without one.
    pub tenants: Option<crate::config::Tenants>,
}

impl ApiOptions {
    /// Options with `token` for mutating endpoints, reads open, a 64 KiB body limit.
    pub fn new(token: impl Into<String>) -> Self {
        ApiOptions { token: token.into(), protect_reads: false, body_limit: DEFAULT_BODY_LIMIT, tenants: None }
    }

    /// Require the token on read endpoints too.
    pub fn protect_reads(mut self, yes: bool) -> Self {
        self.protect_reads = yes;
        self
    }

    /// Largest request body accepted, in bytes.
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// Serve this tenant fleet too (`GET /tenants`, `POST /tenants/run`).
    pub fn tenants(mut self, tenants: Option<crate::config::Tenants>) -> Self {
        self.tenants = tenants;
        self
    }
}

impl fmt::Debug for ApiOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token is never printed, not even in a debug dump.
        f.debug_struct("ApiOptions")
            .field("token", &if self.token.is_empty() { "<unset>" } else { "<redacted>" })
            .field("protect_reads", &self.protect_reads)
            .field("body_limit", &self.body_limit)
            .field("tenants", &self.tenants.as_ref().map(|t| t.source.describe()))
            .finish()
    }
}

/// What every handler shares.
pub(crate) struct AppState {
    pub(crate) kiln: Kiln,
    pub(crate) opts: ApiOptions,
    /// The cached migrations, the kept session and the last status read.
    pub(crate) status: status::StatusCache,
}

pub(crate) type Shared = Arc<AppState>;

/// The API and the dashboard over `kiln`'s database and migrations, to serve
/// as it is (`kiln serve`) or to mount in an application's router.
///
/// | method | path | |
/// |---|---|---|
/// | GET | `/migrations/status` | every migration's state, and per table/collection: exists, rows, indexes |
/// | POST | `/migrations/run` | apply every pending migration (bearer token) |
/// | POST | `/migrations/run/{group}` | apply one group's pending migrations (bearer token) |
/// | GET | `/health` | liveness: answers without touching the database |
/// | GET | `/ready` | 200 when nothing is pending or failed, else 503 |
/// | GET | `/jobs` | backfill jobs of zero-downtime migrations: state, progress, rows/s, ETA |
/// | POST | `/jobs/{id}/{action}` | pause, resume, cancel or retry a job (bearer token) |
/// | GET | `/tenants` | a `[tenants]` fleet: per database applied, pending, failed, last applied |
/// | POST | `/tenants/run` | `kiln up` over the fleet: public first, then the tenants (bearer token) |
/// | GET | `/openapi.json` | the OpenAPI 3.1 document, generated from this code |
/// | GET | `/` | the dashboard |
pub fn router(kiln: Kiln, opts: ApiOptions) -> Router {
    let limit = opts.body_limit;
    let state: Shared = Arc::new(AppState { kiln, opts, status: status::StatusCache::new() });
    let reads = Router::new()
        .route("/migrations/status", get(handlers::status))
        .route("/ready", get(handlers::ready))
        .route("/jobs", get(handlers::jobs))
        .route("/tenants", get(handlers::tenants))
        .route("/openapi.json", get(openapi::serve_document))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::reads));
    let writes = Router::new()
        .route("/migrations/run", post(handlers::run_all))
        .route("/migrations/run/{group}", post(handlers::run_group))
        .route("/jobs/{id}/{action}", post(handlers::job_action))
        .route("/tenants/run", post(handlers::run_tenants))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::writes));
    Router::new()
        .route("/", get(handlers::dashboard))
        .route("/health", get(handlers::health))
        .merge(reads)
        .merge(writes)
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(tower_http::limit::RequestBodyLimitLayer::new(limit))
        .layer(axum::middleware::from_fn(auth::no_token_in_query))
        // Outermost, so the body limit's 413 is JSON too.
        .layer(axum::middleware::map_response(error::json_errors))
        .with_state(state)
}
