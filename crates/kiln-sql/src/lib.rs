//! kiln-sql: the PostgreSQL, MySQL/MariaDB and SQLite engines, one module each
//! behind a cargo feature.
//!
//! The design decision to know: each engine keeps **one connection** for its
//! whole life and does the history write in the same transaction as the
//! migration wherever the engine allows (PostgreSQL, SQLite). Where DDL commits
//! implicitly (MySQL/MariaDB), an intent row in state `running` is committed
//! first, so a crash mid-migration leaves an entry that blocks the next run
//! instead of a silent disagreement between schema and history.

#![warn(missing_docs)]

pub mod common;
pub mod jobs_common;
#[cfg(feature = "mysql")]
pub mod mysql;
pub mod names;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;
pub mod stats;

pub use stats::{table_status, StatusSession};

use kiln_core::url::EngineKind;
use kiln_core::{BackendConfig, Engine, EngineError};

/// Connect to the SQL database named by `cfg.url`.
///
/// # Errors
/// [`EngineError::BadUrl`] for a URL that names no SQL engine (or one not
/// compiled in), [`EngineError::Connect`] when the server cannot be reached.
pub async fn connect(cfg: &BackendConfig) -> Result<Box<dyn Engine>, EngineError> {
    match EngineKind::parse(&cfg.url)? {
        #[cfg(feature = "postgres")]
        EngineKind::Postgres => Ok(Box::new(postgres::PgBackend::connect(cfg).await?)),
        #[cfg(feature = "mysql")]
        EngineKind::Mysql => Ok(Box::new(mysql::MysqlEngine::connect(cfg).await?)),
        #[cfg(feature = "sqlite")]
        EngineKind::Sqlite => Ok(Box::new(sqlite::SqliteEngine::connect(cfg).await?)),
        #[allow(unreachable_patterns)]
        other => Err(EngineError::BadUrl { url: cfg.url.redacted(), message: format!("{other:?} is not a SQL engine of this build") }),
    }
}
