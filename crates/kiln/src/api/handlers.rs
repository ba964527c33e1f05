//! The endpoints. Each one is a thin layer over [`Kiln`]: the same load, plan
//! and lock as `kiln status`, `kiln up` and `kiln check`.

use std::collections::BTreeSet;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use kiln_core::report::{ObjectStatus, RunReport};
use kiln_core::runner::CheckReport;
use kiln_core::url::EngineKind;
use kiln_core::{BackendConfig, Policy, StatusRow, UpTarget};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::Shared;
use crate::{connect, Error, Kiln};

/// `GET /health`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// Always `ok`: the process answers (the database is not asked).
    pub status: String,
    /// kiln's version.
    pub version: String,
}

/// Counts over `migrations`.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct Summary {
    /// Applied (or baselined).
    pub applied: usize,
    /// Waiting to be applied.
    pub pending: usize,
    /// Failed or interrupted (`running`): they block the next run until repaired.
    pub failed: usize,
}

/// `GET /migrations/status`: every migration, and every table or collection.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatusResponse {
    /// The database, password redacted.
    pub database: String,
    /// `postgres`, `mysql`, `sqlite` or `mongodb`.
    pub engine: String,
    /// Groups the migrations declare (`POST /migrations/run/{group}`).
    pub groups: Vec<String>,
    /// Counts by state.
    pub summary: Summary,
    /// Every migration, on disk or in the history, ordered by version.
    pub migrations: Vec<StatusRow>,
    /// Every table or collection (kiln's own excluded), by name.
    pub objects: Vec<ObjectStatus>,
}

/// Optional body of `POST /migrations/run` (an empty body is `{}`).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// Plan only: report what would run and change nothing.
    #[serde(default)]
    pub dry_run: bool,
}

#[utoipa::path(get, path = "/health", tag = "kiln", responses((status = 200, description = "The process is alive", body = Health)))]
pub(crate) async fn health() -> Json<Health> {
    Json(Health { status: "ok".into(), version: env!("CARGO_PKG_VERSION").into() })
}

#[utoipa::path(get, path = "/migrations/status", tag = "kiln",
    responses(
        (status = 200, description = "Every migration and every table/collection", body = StatusResponse),
        (status = 401, description = "Missing or wrong token (when reads are protected)", body = ErrorBody),
        (status = 503, description = "The database is down", body = ErrorBody),
        (status = 500, description = "Unreadable migration files or a failing query", body = ErrorBody),
    ),
    security((), ("bearer" = [])))]
pub(crate) async fn status(State(s): State<Shared>) -> Response {
    super::status::respond(s).await
}

#[utoipa::path(post, path = "/migrations/run", tag = "kiln",
    request_body(content = Option<RunRequest>, description = "Optional; `{}` when empty", content_type = "application/json"),
    responses(
        (status = 200, description = "What this call applied (empty `steps`: nothing was pending, or another call applied it first)", body = RunReport),
        (status = 400, description = "Malformed JSON body or a token in the query string", body = ErrorBody),
        (status = 401, description = "Missing or wrong token: nothing was run", body = ErrorBody),
        (status = 409, description = "Another run held the lock past the lock time-out (`lock_timeout`, naming the holder), or the plan was refused", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 500, description = "A migration failed (`migration_failed`, with what it left)", body = ErrorBody),
        (status = 503, description = "The database is down", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn run_all(State(s): State<Shared>, body: Bytes) -> Result<Json<RunReport>, ApiError> {
    let req = parse_body(&body)?;
    Ok(Json(run(&s.kiln, None, req.dry_run).await?))
}

#[utoipa::path(post, path = "/migrations/run/{group}", tag = "kiln",
    params(("group" = String, Path, description = "A group the migrations declare (folder or `group:`)")),
    request_body(content = Option<RunRequest>, description = "Optional; `{}` when empty", content_type = "application/json"),
    responses(
        (status = 200, description = "What this call applied of the group", body = RunReport),
        (status = 400, description = "Malformed JSON body or a token in the query string", body = ErrorBody),
        (status = 401, description = "Missing or wrong token: nothing was run", body = ErrorBody),
        (status = 404, description = "No migration declares this group (`unknown_group`; the message lists the groups)", body = ErrorBody),
        (status = 409, description = "Lock held past the time-out, or the plan was refused", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 500, description = "A migration failed", body = ErrorBody),
        (status = 503, description = "The database is down", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn run_group(State(s): State<Shared>, Path(group): Path<String>, body: Bytes) -> Result<Json<RunReport>, ApiError> {
    let req = parse_body(&body)?;
    let local = s.kiln.load().map_err(Error::from)?;
    let groups: BTreeSet<&str> = local.iter().filter_map(|m| m.directives.group.as_deref()).collect();
    if !groups.contains(group.as_str()) {
        let list =
            if groups.is_empty() { "none (no migration declares a group)".to_string() } else { groups.into_iter().collect::<Vec<_>>().join(", ") };
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_group",
            format!("no migration belongs to the group {group:?}; the groups are: {list}; POST /migrations/run applies every group"),
        ));
    }
    Ok(Json(run(&s.kiln, Some(group), req.dry_run).await?))
}

#[utoipa::path(get, path = "/ready", tag = "kiln",
    responses(
        (status = 200, description = "Nothing pending or failed (the report of `kiln check`)", body = CheckReport),
        (status = 503, description = "Migrations pending or failed (the report says which), or the database is down (an error)", body = CheckReport),
    ),
    security((), ("bearer" = [])))]
pub(crate) async fn ready(State(s): State<Shared>) -> Response {
    match s.kiln.check().await {
        Ok(report) => {
            let ready = report.pending.is_empty() && report.failed.is_empty();
            let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            (status, Json(report)).into_response()
        }
        Err(e) => {
            let mut e = ApiError::from(e);
            if e.status == StatusCode::INTERNAL_SERVER_ERROR {
                // Not ready either way; the body says why.
                e.status = StatusCode::SERVICE_UNAVAILABLE;
            }
            e.into_response()
        }
    }
}

#[utoipa::path(get, path = "/", tag = "kiln", responses((status = 200, description = "The dashboard (HTML, self-contained)", content_type = "text/html", body = String)))]
pub(crate) async fn dashboard() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}

fn parse_body(body: &[u8]) -> Result<RunRequest, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(RunRequest::default());
    }
    let bad = |e: String| {
        ApiError::bad_request(format!("the request body is not valid JSON for this endpoint: {e}; send `{{}}`, `{{\"dry_run\": true}}` or nothing"))
    };
    // `null` is what an optional body may be, too; anything but an object or null is refused
    // (serde would read a struct from an array).
    match serde_json::from_slice::<serde_json::Value>(body).map_err(|e| bad(e.to_string()))? {
        serde_json::Value::Null => Ok(RunRequest::default()),
        v @ serde_json::Value::Object(_) => serde_json::from_value(v).map_err(|e| bad(e.to_string())),
        other => Err(bad(format!("expected an object, found {other}"))),
    }
}

/// `GET /jobs`.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobsResponse {
    /// Every backfill job of a zero-downtime migration, by version.
    pub jobs: Vec<kiln_core::jobs::JobInfo>,
}

#[utoipa::path(get, path = "/jobs", tag = "kiln",
    responses(
        (status = 200, description = "Every backfill job: state, progress (done/total, rows/s, ETA), workers, throttle, last error", body = JobsResponse),
        (status = 401, description = "Missing or wrong token (when reads are protected)", body = ErrorBody),
        (status = 503, description = "The database is down", body = ErrorBody),
    ),
    security((), ("bearer" = [])))]
pub(crate) async fn jobs(State(s): State<Shared>) -> Result<Json<JobsResponse>, ApiError> {
    Ok(Json(JobsResponse { jobs: s.kiln.jobs().await? }))
}

#[utoipa::path(post, path = "/jobs/{id}/{action}", tag = "kiln",
    params(
        ("id" = String, Path, description = "The job's id: its migration's version"),
        ("action" = String, Path, description = "`pause`, `resume`, `cancel` or `retry`"),
    ),
    responses(
        (status = 200, description = "The job after the change", body = kiln_core::jobs::JobInfo),
        (status = 401, description = "Missing or wrong token: nothing was changed", body = ErrorBody),
        (status = 404, description = "Unknown action (`unknown_action`)", body = ErrorBody),
        (status = 409, description = "No such job, or the change does not apply to its state", body = ErrorBody),
        (status = 503, description = "The database is down", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn job_action(
    State(s): State<Shared>,
    Path((id, action)): Path<(String, String)>,
) -> Result<Json<kiln_core::jobs::JobInfo>, ApiError> {
    use kiln_core::jobs::JobControl;
    let control = match action.as_str() {
        "pause" => JobControl::Pause,
        "resume" => JobControl::Resume,
        "cancel" => JobControl::Cancel,
        "retry" => JobControl::Retry,
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_action",
                format!("unknown job action {other:?}: pause, resume, cancel or retry"),
            ))
        }
    };
    let version = kiln_core::Version::parse_arg(&id)
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "bad_version", format!("{id:?} is not a job id (a migration version such as 0007)")))?;
    Ok(Json(s.kiln.control_job(&version, &control).await?))
}

/// `up` of every pending migration (or of one group's), as `kiln up [--group G]`.
async fn run(kiln: &Kiln, group: Option<String>, dry_run: bool) -> Result<RunReport, Error> {
    let contract = kiln.contract()?;
    let local = kiln.load()?;
    let mut b = connect(&BackendConfig { read_only: dry_run, ..kiln.backend.clone() }).await?;
    let policy = Policy { group: group.or_else(|| kiln.policy.group.clone()), ..kiln.policy.clone() };
    let r = kiln.runner(b.as_mut(), contract).up(&local, &UpTarget::Latest, &policy, dry_run).await;
    let _ = b.close().await;
    Ok(r?)
}

pub(crate) fn engine_name(url: &kiln_core::url::DbUrl) -> &'static str {
    match url.engine() {
        Some(EngineKind::Postgres) => "postgres",
        Some(EngineKind::Mysql) => "mysql",
        Some(EngineKind::Sqlite) => "sqlite",
        Some(EngineKind::Mongodb) => "mongodb",
        None => "unknown",
    }
}

/// `GET /tenants`: every database of the fleet.
#[derive(Debug, Serialize, ToSchema)]
pub struct TenantsResponse {
    /// Where the tenants come from (`list of 3`, `query "SELECT …"`, …).
    pub source: String,
    /// The public database, then every tenant: applied, pending, failed, last applied.
    pub targets: Vec<crate::fleet::TargetStatus>,
}

/// Body of `POST /tenants/run` (an empty body is `{}`).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantsRunRequest {
    /// Plan only: every database reports what would run and nothing changes.
    #[serde(default)]
    pub dry_run: bool,
    /// Only these tenants (not the public database); absent or empty: the public database, then every tenant.
    #[serde(default)]
    pub tenants: Vec<String>,
}

fn fleet_of(s: &Shared) -> Result<&crate::config::Tenants, ApiError> {
    s.opts.tenants.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "no_fleet",
            "no tenant fleet is configured (`[tenants]` in kiln.toml); /migrations/status shows the one database",
        )
    })
}

#[utoipa::path(get, path = "/tenants", tag = "kiln",
    responses(
        (status = 200, description = "Every database of the fleet, read without locks", body = TenantsResponse),
        (status = 401, description = "Missing or wrong token (when reads are protected)", body = ErrorBody),
        (status = 404, description = "No fleet is configured (`no_fleet`)", body = ErrorBody),
        (status = 500, description = "The tenants cannot be read from their source, or the files are bad", body = ErrorBody),
    ),
    security((), ("bearer" = [])))]
pub(crate) async fn tenants(State(s): State<Shared>) -> Result<Json<TenantsResponse>, ApiError> {
    let t = fleet_of(&s)?;
    let fleet = crate::fleet::Fleet::new(&s.kiln, t);
    let targets = fleet.status(&crate::fleet::Selection::default()).await?;
    Ok(Json(TenantsResponse { source: t.source.describe(), targets }))
}

#[utoipa::path(post, path = "/tenants/run", tag = "kiln",
    request_body(content = Option<TenantsRunRequest>, description = "Optional; `{}` when empty", content_type = "application/json"),
    responses(
        (status = 200, description = "Every database's outcome (one failed tenant does not stop the others; `status` says how each ended)", body = kiln_core::report::FleetReport),
        (status = 400, description = "Malformed JSON body, an unknown tenant, or a token in the query string", body = ErrorBody),
        (status = 401, description = "Missing or wrong token: nothing was run", body = ErrorBody),
        (status = 404, description = "No fleet is configured (`no_fleet`)", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 500, description = "The tenants cannot be read from their source, or the files are bad", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn run_tenants(State(s): State<Shared>, body: Bytes) -> Result<Json<kiln_core::report::FleetReport>, ApiError> {
    let t = fleet_of(&s)?;
    let req: TenantsRunRequest = parse_object(&body)?;
    let fleet = crate::fleet::Fleet::new(&s.kiln, t);
    if !req.tenants.is_empty() {
        let list = fleet.tenant_list().await?;
        let unknown: Vec<&String> = req.tenants.iter().filter(|n| !list.names.contains(n)).collect();
        if !unknown.is_empty() {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "unknown_tenant",
                format!("unknown tenant(s) {unknown:?}; the fleet has: {}; nothing was run", list.names.join(", ")),
            ));
        }
    }
    let opts = crate::fleet::FleetOptions {
        selection: crate::fleet::Selection { tenants: req.tenants, ..Default::default() },
        dry_run: req.dry_run,
        ..Default::default()
    };
    Ok(Json(fleet.up(&opts, &|_| {}).await?))
}

/// A JSON object body (or nothing, or `null`) as `T`.
fn parse_object<T: Default + serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    let bad = |e: String| ApiError::bad_request(format!("the request body is not valid JSON for this endpoint: {e}"));
    match serde_json::from_slice::<serde_json::Value>(body).map_err(|e| bad(e.to_string()))? {
        serde_json::Value::Null => Ok(T::default()),
        v @ serde_json::Value::Object(_) => serde_json::from_value(v).map_err(|e| bad(e.to_string())),
        other => Err(bad(format!("expected an object, found {other}"))),
    }
}
