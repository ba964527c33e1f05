//! Names read from a SQL database for a tenant fleet (DESIGN §5): the rows of
//! a `[tenants] query` on the public database, or the schemas and databases
//! a `[tenants] pattern` is matched against.
//!
//! Everything is read in a read-only transaction (SQLite: the statement must
//! be read-only), on a connection opened for this and closed after it.

use kiln_core::url::EngineKind;
use kiln_core::{BackendConfig, EngineError};

/// What to read.
#[derive(Clone, Copy, Debug)]
pub enum NameQuery<'a> {
    /// The first column of the rows of this SQL (`SELECT name FROM tenants WHERE active`).
    Sql(&'a str),
    /// PostgreSQL: the schemas of the database (system schemas left out).
    Schemas,
    /// The databases of the server: PostgreSQL's that accept connections and
    /// are not templates; MySQL's schemas.
    Databases,
}

const PG_SCHEMAS: &str = "SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema' ORDER BY 1";
const PG_DATABASES: &str = "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1";
const MY_DATABASES: &str = "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA ORDER BY 1";

/// Read names from the database `cfg` names: one entry per row, `None` for a NULL.
///
/// # Errors
/// What connecting returns; [`EngineError::Query`] when the query fails (its
/// text and the database's message); [`EngineError::Refused`] for a listing
/// the engine has no catalog for (SQLite's databases are files: the caller
/// lists the directory).
pub async fn read_names(cfg: &BackendConfig, what: NameQuery<'_>) -> Result<Vec<Option<String>>, EngineError> {
    let cfg = BackendConfig { read_only: true, ..cfg.clone() };
    match EngineKind::parse(&cfg.url)? {
        #[cfg(feature = "postgres")]
        EngineKind::Postgres => {
            let sql = match what {
                NameQuery::Sql(s) => s,
                NameQuery::Schemas => PG_SCHEMAS,
                NameQuery::Databases => PG_DATABASES,
            };
            // The catalog listings must not depend on the configured schema existing.
            let cfg = if matches!(what, NameQuery::Sql(_)) { cfg } else { BackendConfig { schema: None, ..cfg } };
            let e = crate::postgres::PgBackend::connect(&cfg).await?;
            let r = e.text_column(sql).await;
            let _ = kiln_core::Engine::close(Box::new(e)).await;
            r
        }
        #[cfg(feature = "mysql")]
        EngineKind::Mysql => {
            let sql = match what {
                NameQuery::Sql(s) => s,
                NameQuery::Schemas | NameQuery::Databases => MY_DATABASES,
            };
            let mut e = crate::mysql::MysqlEngine::connect(&cfg).await?;
            let r = e.text_column(sql).await;
            let _ = kiln_core::Engine::close(Box::new(e)).await;
            r
        }
        #[cfg(feature = "sqlite")]
        EngineKind::Sqlite => match what {
            NameQuery::Sql(sql) => {
                let mut e = crate::sqlite::SqliteEngine::connect(&cfg).await?;
                e.text_column(sql).await
            }
            _ => Err(EngineError::Refused("SQLite has no catalog of databases: each database is a file".into())),
        },
        #[allow(unreachable_patterns)]
        _ => Err(EngineError::BadUrl { url: cfg.url.redacted(), message: "not a SQL database of this build".into() }),
    }
}
