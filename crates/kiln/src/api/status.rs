//! `GET /migrations/status` without the per-request costs (issue #12).
//!
//! A status read used to load and checksum every migration file, open two
//! connections (history, then table stats), inspect the schema and count the
//! rows — per request, on the CLI's one-thread runtime. Now:
//!
//! - **The loaded migrations are cached.** The directory is re-checked (a walk
//!   of names, sizes and modification times, no file read) at most every
//!   [`RECHECK_INTERVAL`]; the files are read and checksummed again only when
//!   that fingerprint changed. A file added, edited or removed shows within
//!   the interval.
//! - **One session is kept open** ([`kiln_sql::StatusSession`], or the engine
//!   for MongoDB) and reused; a read that finds it broken (the database
//!   restarted, the connection was killed) drops it, connects again and
//!   retries once. On SQLite a file created or replaced since it was opened
//!   makes it reopen.
//! - **Concurrent requests share a read.** One read runs at a time; a request
//!   takes the result of the first read that *started after it arrived*, so it
//!   never sees a state older than its own arrival (a `GET` after a finished
//!   `POST /migrations/run` sees the run), and under load most requests are
//!   answered by a read another request started. The response is serialised
//!   once per read.
//! - **Nothing blocks an async worker**: the read (file walk, file loading,
//!   SQLite's synchronous calls) runs on the blocking pool.

use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use kiln_core::report::ObjectStatus;
use kiln_core::url::EngineKind;
use kiln_core::{BackendConfig, Engine, Migration, StatusRow};
use tokio::sync::Mutex;

use super::error::ApiError;
use super::handlers::{engine_name, StatusResponse, Summary};
use super::AppState;
use crate::{Error, Kiln};

/// How often, at most, the migrations directory is checked for changes.
pub const RECHECK_INTERVAL: Duration = Duration::from_millis(500);

/// A status read taking longer than this (a database that stopped answering
/// without closing the connection) is abandoned with a 503, and its session
/// dropped, so the requests queued behind it are not held forever.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The shared state of status reads (one per router).
pub(crate) struct StatusCache {
    /// Requests seen so far: a request's ticket is its arrival number.
    arrivals: AtomicU64,
    read: Arc<Mutex<Reader>>,
}

/// What one read at a time owns.
#[derive(Default)]
struct Reader {
    session: Option<Session>,
    loaded: Option<Loaded>,
    /// The last read: how many requests had arrived when it started, and its answer.
    last: Option<(u64, Answer)>,
}

/// A status answer: the serialised body, or the error.
type Answer = Result<Bytes, ApiError>;

enum Session {
    Sql(Box<kiln_sql::StatusSession>),
    /// MongoDB: the engine for the history; collections are read by `kiln_mongo`.
    #[cfg_attr(not(feature = "mongodb"), allow(dead_code))]
    Other(Box<dyn Engine>),
}

impl Session {
    fn engine(&mut self) -> &mut dyn Engine {
        match self {
            Session::Sql(s) => s.engine(),
            Session::Other(e) => e.as_mut(),
        }
    }

    fn is_current(&self) -> bool {
        match self {
            Session::Sql(s) => s.is_current(),
            Session::Other(_) => true,
        }
    }

    async fn close(self) {
        match self {
            Session::Sql(s) => s.close().await,
            Session::Other(e) => {
                let _ = e.close().await;
            }
        }
    }
}

/// The migrations as last loaded, and the directory fingerprint they were loaded at.
struct Loaded {
    fingerprint: u64,
    checked: Instant,
    migrations: Arc<Vec<Migration>>,
}

impl StatusCache {
    pub(crate) fn new() -> Self {
        StatusCache { arrivals: AtomicU64::new(0), read: Arc::new(Mutex::new(Reader::default())) }
    }
}

/// The status response: the shared read's answer (see the module docs).
pub(crate) async fn respond(state: Arc<AppState>) -> Response {
    let cache = &state.status;
    let ticket = cache.arrivals.fetch_add(1, Ordering::SeqCst) + 1;
    let mut reader = cache.read.clone().lock_owned().await;
    // A read that started after this request arrived answers it too.
    let shared = match &reader.last {
        Some((started, answer)) if *started >= ticket => Some(answer.clone()),
        _ => None,
    };
    let answer = match shared {
        Some(answer) => answer,
        None => {
            let started = cache.arrivals.load(Ordering::SeqCst);
            let handle = tokio::runtime::Handle::current();
            let st = state.clone();
            let joined = tokio::task::spawn_blocking(move || {
                let answer = handle.block_on(async {
                    let timed = tokio::time::timeout(READ_TIMEOUT, read(&st.kiln, &mut reader)).await;
                    match timed {
                        Ok(answer) => answer,
                        Err(_) => {
                            // Mid-query: the session cannot be trusted any more.
                            reader.session = None;
                            Err(ApiError::new(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "connection_lost",
                                format!("the database is down or unreachable: no answer to the status read within {READ_TIMEOUT:?}"),
                            ))
                        }
                    }
                });
                reader.last = Some((started, answer.clone()));
                answer
            })
            .await;
            joined.unwrap_or_else(|e| Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("the status read failed: {e}"))))
        }
    };
    match answer {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => e.into_response(),
    }
}

/// One status read on the kept session, reconnecting once if it broke.
async fn read(kiln: &Kiln, reader: &mut Reader) -> Answer {
    let migrations = current_migrations(kiln, &mut reader.loaded).map_err(ApiError::from)?;
    for attempt in 0..2 {
        if reader.session.as_ref().is_some_and(|s| !s.is_current()) {
            if let Some(s) = reader.session.take() {
                s.close().await;
            }
        }
        let session = match &mut reader.session {
            Some(s) => s,
            None => reader.session.insert(connect(kiln).await.map_err(ApiError::from)?),
        };
        match read_on(kiln, session, &migrations).await {
            Ok(body) => return Ok(body),
            Err(e) => {
                // Whatever failed, the next read starts on a fresh session.
                if let Some(s) = reader.session.take() {
                    s.close().await;
                }
                let e = ApiError::from(e);
                let lost = matches!(e.report.code.as_str(), "connection_lost" | "connect_failed");
                if !(lost && attempt == 0) {
                    return Err(e);
                }
                tracing::debug!(code = %e.report.code, "status: the kept session broke; connecting again");
            }
        }
    }
    unreachable!("the second attempt returns")
}

async fn connect(kiln: &Kiln) -> Result<Session, Error> {
    let cfg = BackendConfig { read_only: true, ..kiln.backend.clone() };
    match EngineKind::of(&cfg.url) {
        #[cfg(feature = "mongodb")]
        Some(EngineKind::Mongodb) => Ok(Session::Other(crate::connect(&cfg).await.map_err(Error::from)?)),
        _ => Ok(Session::Sql(Box::new(kiln_sql::StatusSession::connect(&cfg).await.map_err(Error::from)?))),
    }
}

/// The history and the objects on `session`, serialised.
async fn read_on(kiln: &Kiln, session: &mut Session, migrations: &[Migration]) -> Result<Bytes, Error> {
    let rows = kiln.runner(session.engine(), None).status(migrations).await?;
    let objects = objects(kiln, session).await?;
    let body = response(kiln, rows, objects);
    serde_json::to_vec(&body)
        .map(Bytes::from)
        .map_err(|e| Error::from(kiln_core::EngineError::Query { context: "serialising the status".into(), message: e.to_string() }))
}

async fn objects(kiln: &Kiln, session: &mut Session) -> Result<Vec<ObjectStatus>, Error> {
    match session {
        Session::Sql(s) => Ok(s.table_status().await.map_err(Error::from)?),
        #[cfg(feature = "mongodb")]
        Session::Other(_) => {
            let cols = kiln_mongo::collection_status(&kiln.backend, &[], false).await.map_err(Error::from)?;
            Ok(cols
                .into_iter()
                .map(|c| ObjectStatus {
                    name: c.name,
                    exists: c.exists,
                    rows: c.documents,
                    exact: c.exact,
                    index_count: c.indexes.len(),
                    indexes: c.indexes,
                })
                .collect())
        }
        #[cfg(not(feature = "mongodb"))]
        Session::Other(_) => {
            let _ = kiln;
            Ok(Vec::new())
        }
    }
}

fn response(kiln: &Kiln, rows: Vec<StatusRow>, objects: Vec<ObjectStatus>) -> StatusResponse {
    let mut summary = Summary::default();
    for r in &rows {
        match r.state.as_str() {
            "applied" | "baseline" => summary.applied += 1,
            "pending" => summary.pending += 1,
            "failed" | "running" => summary.failed += 1,
            _ => {}
        }
    }
    let groups: BTreeSet<String> = rows.iter().filter_map(|r| r.group.clone()).collect();
    StatusResponse {
        database: kiln.backend.url.redacted(),
        engine: engine_name(&kiln.backend.url).into(),
        groups: groups.into_iter().collect(),
        summary,
        migrations: rows,
        objects,
    }
}

/// The cached migrations, reloaded when the directory's fingerprint changed
/// (checked at most every [`RECHECK_INTERVAL`]). A load error is not cached.
fn current_migrations(kiln: &Kiln, loaded: &mut Option<Loaded>) -> Result<Arc<Vec<Migration>>, Error> {
    if let Some(l) = loaded.as_mut() {
        if l.checked.elapsed() < RECHECK_INTERVAL {
            return Ok(l.migrations.clone());
        }
        let fingerprint = fingerprint(&kiln.dir);
        if fingerprint == l.fingerprint {
            l.checked = Instant::now();
            return Ok(l.migrations.clone());
        }
    }
    // Fingerprint first: a file changed while loading shows as a change next time.
    let fingerprint = fingerprint(&kiln.dir);
    let migrations = Arc::new(kiln.load().map_err(Error::from)?);
    *loaded = Some(Loaded { fingerprint, checked: Instant::now(), migrations: migrations.clone() });
    Ok(migrations)
}

/// A hash of every entry under `dir` (path, kind, size, modification time),
/// in name order; unreadable entries count by their name only.
fn fingerprint(dir: &Path) -> u64 {
    fn walk(dir: &Path, h: &mut std::collections::hash_map::DefaultHasher) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            "<unreadable>".hash(h);
            return;
        };
        let mut entries: Vec<_> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        entries.sort();
        for p in entries {
            p.hash(h);
            // Follows symbolic links, as loading does.
            match std::fs::metadata(&p) {
                Ok(m) => {
                    m.len().hash(h);
                    m.modified().ok().hash(h);
                    if m.is_dir() {
                        walk(&p, h);
                    }
                }
                Err(_) => "<gone>".hash(h),
            }
        }
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    walk(dir, &mut h);
    h.finish()
}
