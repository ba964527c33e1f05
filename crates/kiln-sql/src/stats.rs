//! Per-table status for the HTTP API (`GET /migrations/status`): whether each
//! table exists, its row count and its indexes.
//!
//! Tables and index names come from [`SchemaStore::inspect`], so kiln's own
//! tables are left out exactly as drift detection leaves them out. Row counts
//! follow one rule on every engine: where the catalog keeps an estimate
//! (PostgreSQL's `pg_class.reltuples`, MySQL's `information_schema.TABLES.TABLE_ROWS`)
//! a table estimated above [`EXACT_COUNT_LIMIT`] rows keeps the estimate, marked
//! `exact: false`; every other table is counted with `count(*)` in one query
//! for all of them. SQLite keeps no estimate: its tables are always counted.

use std::collections::BTreeMap;

use kiln_core::engine::SchemaStore;
use kiln_core::report::ObjectStatus;
use kiln_core::url::EngineKind;
use kiln_core::{BackendConfig, EngineError};

/// Tables estimated above this many rows are not counted exactly: `count(*)`
/// scans the table.
pub const EXACT_COUNT_LIMIT: u64 = 10_000;

/// Row counts by table: `(rows, exact)`.
pub(crate) type Counts = BTreeMap<String, (u64, bool)>;

/// One read-only session kept open for repeated status reads (`kiln serve`):
/// the migration history through [`StatusSession::engine`] and the per-table
/// status through [`StatusSession::table_status`], on the same connection, so
/// a status read costs no connection set-up.
///
/// A session whose database went away reports it as an error
/// ([`EngineError::ConnectionLost`] on PostgreSQL and MySQL); the owner drops
/// it and connects again. On SQLite, where there is no connection to lose,
/// [`StatusSession::is_current`] says whether the file it opened is still the
/// one at the path (a read before the first `up` sees a missing file as an
/// empty in-memory database, which must not outlive the file's creation).
pub struct StatusSession {
    inner: Session,
    /// SQLite only: the database file and its identity (device, inode) when opened.
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    file: Option<(std::path::PathBuf, Option<(u64, u64)>)>,
}

enum Session {
    #[cfg(feature = "postgres")]
    Pg(crate::postgres::PgBackend),
    #[cfg(feature = "mysql")]
    My(crate::mysql::MysqlEngine),
    #[cfg(feature = "sqlite")]
    Lite(crate::sqlite::SqliteEngine),
}

/// (device, inode) of `path`, `None` when it does not exist.
#[cfg(feature = "sqlite")]
fn file_identity(path: &std::path::Path) -> Option<(u64, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Some((meta.dev(), meta.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        Some((0, 0))
    }
}

impl StatusSession {
    /// Open a read-only session on the database named by `cfg` (creating
    /// nothing, as every read does).
    ///
    /// # Errors
    /// What the engine's `connect` returns; [`EngineError::BadUrl`] for a
    /// URL that is not a SQL engine of this build.
    pub async fn connect(cfg: &BackendConfig) -> Result<Self, EngineError> {
        let cfg = BackendConfig { read_only: true, ..cfg.clone() };
        match EngineKind::of(&cfg.url) {
            #[cfg(feature = "postgres")]
            Some(EngineKind::Postgres) => Ok(StatusSession { inner: Session::Pg(crate::postgres::PgBackend::connect(&cfg).await?), file: None }),
            #[cfg(feature = "mysql")]
            Some(EngineKind::Mysql) => Ok(StatusSession { inner: Session::My(crate::mysql::MysqlEngine::connect(&cfg).await?), file: None }),
            #[cfg(feature = "sqlite")]
            Some(EngineKind::Sqlite) => {
                // The identity is taken before opening: a file created or
                // replaced meanwhile makes the session look stale, never current.
                let path = crate::sqlite::sqlite_file(&cfg)?;
                let file = path.map(|p| {
                    let identity = file_identity(&p);
                    (p, identity)
                });
                Ok(StatusSession { inner: Session::Lite(crate::sqlite::SqliteEngine::connect(&cfg).await?), file })
            }
            Some(other) => Err(EngineError::BadUrl { url: cfg.url.redacted(), message: format!("{other:?} is not a SQL engine of this build") }),
            None => Err(EngineKind::parse(&cfg.url).expect_err("no engine")),
        }
    }

    /// The engine, for the history (`Runner::status`).
    pub fn engine(&mut self) -> &mut dyn kiln_core::Engine {
        match &mut self.inner {
            #[cfg(feature = "postgres")]
            Session::Pg(e) => e,
            #[cfg(feature = "mysql")]
            Session::My(e) => e,
            #[cfg(feature = "sqlite")]
            Session::Lite(e) => e,
        }
    }

    /// Whether the session still reads the database at its URL: always on
    /// PostgreSQL and MySQL (a lost connection shows as an error instead); on
    /// SQLite, whether the file is the one that was opened (it may have been
    /// created, deleted or replaced since).
    pub fn is_current(&self) -> bool {
        match &self.file {
            #[cfg(feature = "sqlite")]
            Some((path, identity)) => file_identity(path) == *identity,
            _ => true,
        }
    }

    /// Every table with its row count and indexes, as [`table_status`] reads them.
    ///
    /// # Errors
    /// A failing catalog query or count as [`EngineError::Query`]; a lost
    /// connection as [`EngineError::ConnectionLost`].
    pub async fn table_status(&mut self) -> Result<Vec<ObjectStatus>, EngineError> {
        match &mut self.inner {
            #[cfg(feature = "postgres")]
            Session::Pg(e) => {
                let snapshot = e.inspect().await?;
                let counts = e.row_counts(&snapshot.objects.keys().cloned().collect::<Vec<_>>()).await?;
                Ok(merge(snapshot, counts))
            }
            #[cfg(feature = "mysql")]
            Session::My(e) => {
                let snapshot = e.inspect().await?;
                let counts = e.row_counts(&snapshot.objects.keys().cloned().collect::<Vec<_>>()).await?;
                Ok(merge(snapshot, counts))
            }
            #[cfg(feature = "sqlite")]
            Session::Lite(e) => {
                let snapshot = e.inspect().await?;
                let counts = e.row_counts(&snapshot.objects.keys().cloned().collect::<Vec<_>>())?;
                Ok(merge(snapshot, counts))
            }
        }
    }

    /// Close the connection.
    pub async fn close(self) {
        let engine: Box<dyn kiln_core::Engine> = match self.inner {
            #[cfg(feature = "postgres")]
            Session::Pg(e) => Box::new(e),
            #[cfg(feature = "mysql")]
            Session::My(e) => Box::new(e),
            #[cfg(feature = "sqlite")]
            Session::Lite(e) => Box::new(e),
        };
        let _ = engine.close().await;
    }
}

/// Status of every table of the database named by `cfg` (kiln's own tables
/// excluded), sorted by name. Opens its own read-only connection.
///
/// # Errors
/// [`EngineError::Connect`] when the server cannot be reached; a failing
/// catalog query or count as [`EngineError::Query`].
pub async fn table_status(cfg: &BackendConfig) -> Result<Vec<ObjectStatus>, EngineError> {
    let mut session = StatusSession::connect(cfg).await?;
    let r = session.table_status().await;
    session.close().await;
    r
}

fn merge(snapshot: kiln_core::schema::Snapshot, counts: Counts) -> Vec<ObjectStatus> {
    snapshot
        .objects
        .into_iter()
        .map(|(name, info)| {
            let (rows, exact) = counts.get(&name).copied().unwrap_or((0, false));
            let indexes: Vec<String> = info.indexes.into_keys().collect();
            ObjectStatus { name, exists: true, rows, exact, index_count: indexes.len(), indexes }
        })
        .collect()
}

/// One `SELECT name, count(*) … UNION ALL …` over `tables`, each name quoted by `quote`.
pub(crate) fn count_sql(tables: &[&String], quote: impl Fn(&str) -> String, literal: impl Fn(&str) -> String) -> String {
    tables.iter().map(|t| format!("SELECT {} AS t, count(*) AS n FROM {}", literal(t), quote(t))).collect::<Vec<_>>().join(" UNION ALL ")
}

/// A string literal with single quotes doubled (names come from the catalog).
pub(crate) fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
