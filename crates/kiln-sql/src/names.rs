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

/// A session on a server's maintenance database, for creating and dropping
/// databases (PostgreSQL, MySQL/MariaDB).
enum Server {
    #[cfg(feature = "postgres")]
    Pg(crate::postgres::PgBackend),
    #[cfg(feature = "mysql")]
    My(crate::mysql::MysqlEngine),
}

impl Server {
    async fn connect(server: &BackendConfig) -> Result<Server, EngineError> {
        let cfg = BackendConfig { schema: None, read_only: false, ..server.clone() };
        match EngineKind::parse(&cfg.url)? {
            #[cfg(feature = "postgres")]
            EngineKind::Postgres => Ok(Server::Pg(crate::postgres::PgBackend::connect(&cfg).await?)),
            #[cfg(feature = "mysql")]
            EngineKind::Mysql => Ok(Server::My(crate::mysql::MysqlEngine::connect(&cfg).await?)),
            #[allow(unreachable_patterns)]
            _ => Err(EngineError::Refused(
                "only PostgreSQL and MySQL/MariaDB databases are created and dropped on a server (MongoDB and SQLite create theirs on first use)"
                    .into(),
            )),
        }
    }

    async fn exists(&mut self, name: &str) -> Result<bool, EngineError> {
        let names = match self {
            #[cfg(feature = "postgres")]
            Server::Pg(e) => e.text_column(PG_DATABASES).await?,
            #[cfg(feature = "mysql")]
            Server::My(e) => e.text_column(MY_DATABASES).await?,
        };
        Ok(names.iter().flatten().any(|n| n == name))
    }

    /// `verb DATABASE [if_exists] <quoted name> [suffix]`.
    async fn database_ddl(&mut self, verb: &str, if_exists: &str, name: &str, suffix: &str) -> Result<(), EngineError> {
        match self {
            #[cfg(feature = "postgres")]
            Server::Pg(e) => e.execute_plain(&format!("{verb} DATABASE {if_exists}{}{suffix}", crate::common::quote_double(name))).await,
            #[cfg(feature = "mysql")]
            Server::My(e) => e.execute_plain(&format!("{verb} DATABASE {if_exists}{}{suffix}", crate::common::quote_backtick(name))).await,
        }
    }

    async fn close(self) {
        let _ = match self {
            #[cfg(feature = "postgres")]
            Server::Pg(e) => kiln_core::Engine::close(Box::new(e)).await,
            #[cfg(feature = "mysql")]
            Server::My(e) => kiln_core::Engine::close(Box::new(e)).await,
        };
    }
}

/// Create database `name` on the server `server` names (connected to its
/// maintenance database) unless it exists: a tenant's database, when
/// `[tenants] create = true`. The name is always quoted. Returns whether it
/// was created (`false`: it existed, or another runner created it first).
///
/// # Errors
/// What connecting returns; [`EngineError::Query`] when the server refuses
/// (no privilege); [`EngineError::Refused`] on SQLite and MongoDB (a database
/// is created by its first use).
pub async fn create_database(server: &BackendConfig, name: &str) -> Result<bool, EngineError> {
    let mut s = Server::connect(server).await?;
    let r = async {
        if s.exists(name).await? {
            return Ok(false);
        }
        match s.database_ddl("CREATE", "", name, "").await {
            Ok(()) => Ok(true),
            // Another runner created it between the look and the create.
            Err(err) => match s.exists(name).await {
                Ok(true) => Ok(false),
                _ => Err(err),
            },
        }
    }
    .await;
    s.close().await;
    r
}

/// Drop database `name` on the server `server` names (connected to its
/// maintenance database), if it exists. `force` (PostgreSQL 13+) ends the
/// other sessions on it first; without it, a database in use is refused by
/// the server. Returns whether it existed.
///
/// # Errors
/// What connecting returns; [`EngineError::Query`] when the server refuses.
pub async fn drop_database(server: &BackendConfig, name: &str, force: bool) -> Result<bool, EngineError> {
    let mut s = Server::connect(server).await?;
    let r = async {
        if !s.exists(name).await? {
            return Ok(false);
        }
        let with = if force && matches!(EngineKind::of(&server.url), Some(EngineKind::Postgres)) { " WITH (FORCE)" } else { "" };
        s.database_ddl("DROP", "IF EXISTS ", name, with).await.map(|()| true)
    }
    .await;
    s.close().await;
    r
}
