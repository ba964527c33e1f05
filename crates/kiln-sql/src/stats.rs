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

/// Status of every table of the database named by `cfg` (kiln's own tables
/// excluded), sorted by name. Opens its own read-only connection.
///
/// # Errors
/// [`EngineError::Connect`] when the server cannot be reached; a failing
/// catalog query or count as [`EngineError::Query`].
pub async fn table_status(cfg: &BackendConfig) -> Result<Vec<ObjectStatus>, EngineError> {
    let cfg = BackendConfig { read_only: true, ..cfg.clone() };
    match EngineKind::of(&cfg.url) {
        #[cfg(feature = "postgres")]
        Some(EngineKind::Postgres) => {
            let mut e = crate::postgres::PgBackend::connect(&cfg).await?;
            let snapshot = e.inspect().await?;
            let counts = e.row_counts(&snapshot.objects.keys().cloned().collect::<Vec<_>>()).await?;
            Ok(merge(snapshot, counts))
        }
        #[cfg(feature = "mysql")]
        Some(EngineKind::Mysql) => {
            let mut e = crate::mysql::MysqlEngine::connect(&cfg).await?;
            let snapshot = e.inspect().await?;
            let counts = e.row_counts(&snapshot.objects.keys().cloned().collect::<Vec<_>>()).await?;
            Ok(merge(snapshot, counts))
        }
        #[cfg(feature = "sqlite")]
        Some(EngineKind::Sqlite) => {
            let mut e = crate::sqlite::SqliteEngine::connect(&cfg).await?;
            let snapshot = e.inspect().await?;
            let counts = e.row_counts(&snapshot.objects.keys().cloned().collect::<Vec<_>>())?;
            Ok(merge(snapshot, counts))
        }
        Some(other) => Err(EngineError::BadUrl { url: cfg.url.redacted(), message: format!("{other:?} is not a SQL engine of this build") }),
        None => Err(EngineKind::parse(&cfg.url).expect_err("no engine")),
    }
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
