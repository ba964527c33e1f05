//! The MySQL 8 / MariaDB 10.11+ engine, over one sqlx connection.
//!
//! The engine supplies primitives only ([`kiln_core::engine`]); the order in
//! which they are called is the core's ([`kiln_core::step`]).
//!
//! MySQL commits implicitly around every DDL statement, so a migration cannot
//! be rolled back as a whole: [`MysqlEngine`] declares no transactional DDL and
//! every migration takes the core's **intent path**. An entry in state
//! `running` is committed before the body runs; a runner killed mid-migration
//! leaves it behind and it blocks the next run until an operator checks the
//! database and runs `kiln repair` (golang-migrate's "dirty" flag). The body
//! runs inside a transaction of the engine's own ([`exec`]), so a body of plain
//! DML still commits atomically with its finish.
//!
//! The engine declares `merge_finish`: the core keeps migration N's finish and
//! hands it to [`HistoryStore::commit`] together with N+1's intent. Per
//! migration, in the steady state (body = one `CREATE TABLE`):
//!
//! | round trip | what | commits |
//! |---|---|---|
//! | 1 | one bound `INSERT … ON DUPLICATE KEY UPDATE` of two rows: N's finish (`running` → `applied`) and N+1's intent (`running`), its affected rows checked | — |
//! | 2 | bound `INSERT` of N's `applied` event | — |
//! | 3 | `COMMIT` | N's finish + N+1's intent, and N's DML after its last DDL |
//! | 4 | N+1's statement over the text protocol, followed by `BEGIN` in the same round trip when it commits implicitly (or preceded by `BEGIN` when it is the first DML of a transactional body) | MySQL's implicit DDL commit |
//!
//! That is two commits per migration — the same as a client running the DDL and
//! committing one history row — and four round trips.
//!
//! Why merging N's finish with N+1's intent keeps the same safety — every way
//! it can fail:
//!
//! - Killed or disconnected before the merged commit: the server rolls the open
//!   transaction back. N's entry is still the committed `running` intent and
//!   blocks the next run; N's DML after its last DDL (or all of it, for a
//!   DML-only body) is rolled back with it, its DDL stays — exactly the state
//!   of a process that died just before finishing N. Nothing looks applied
//!   that is not.
//! - The merged write fails (N+1 already recorded by someone else, a lost
//!   connection): [`HistoryStore::commit`] rolls back, with the same result as
//!   above, and reports the error. N's finish is never written on its own then:
//!   the rollback may have undone N's DML.
//! - The merged `COMMIT` fails or the connection dies during it: either N's
//!   finish and N+1's intent are both committed (N+1 `running` blocks) or
//!   neither is (N `running` blocks).
//! - N+1's body fails: its `ROLLBACK` reaches only N+1's own transaction, which
//!   began after the merged commit, so N's finish is already committed.
//! - The lock is never released with N's finish unwritten: the core writes a
//!   kept finish before anything else touches the database
//!   ([`kiln_core::step::Stepper::flush`]).
//!
//! Modules: [`history`] (kiln's tables and [`HistoryStore::commit`]), [`lock`]
//! (`GET_LOCK`), [`exec`] (body statements, implicit commits, error mapping),
//! [`inspect`] (schema inspection and snapshots), [`scratch`] (`kiln verify`'s
//! throw-away databases), [`jobs`] (`kiln_jobs`, the backfill job store).

mod code;
mod exec;
mod foreign;
mod history;
mod inspect;
mod jobs;
mod lock;
mod names;
mod scratch;
mod stats;

use std::str::FromStr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use async_trait::async_trait;
use kiln_core::engine::{Capabilities, Engine, SchemaStore, ScratchAdmin};
use kiln_core::jobs::JobStore;
use kiln_core::url::DbUrl;
use kiln_core::{BackendConfig, EngineError, Kind};
use sqlx::mysql::{MySqlConnectOptions, MySqlDatabaseError};
use sqlx::{ConnectOptions, Connection, MySqlConnection};

use crate::common::{lock_key, quote_backtick};
use crate::jobs_common::jobs_table_name;
use history::Sql;
use inspect::Server;

/// The URL parameters sqlx understands.
const URL_PARAMETERS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslca",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "charset",
    "collation",
    "statement-cache-capacity",
    "socket",
    "timezone",
    "time-zone",
];

/// MySQL's and MariaDB's limit on `GET_LOCK` names.
const MAX_LOCK_NAME: usize = 64;

/// The MySQL/MariaDB engine (see the module docs for the commit protocol).
///
/// Run it through [`kiln_core::backend::Protocol`] (or the core's
/// [`kiln_core::step::Stepper`]): when the core keeps a finish for the next
/// commit, the session is inside an open transaction holding that migration's
/// uncommitted DML. An engine dropped then, without the core's `flush`,
/// leaves that migration `running`, which blocks the next run — exactly what a
/// process killed at that moment leaves behind.
pub struct MysqlEngine {
    conn: MySqlConnection,
    target: String,
    lock_name: String,
    /// `GET_LOCK` succeeded and was not released. `GET_LOCK` is re-entrant and
    /// counted, so it is asked once.
    locked: bool,
    /// Set by [`kiln_core::engine::Locker::detached_unlock`] (a lock guard
    /// dropped without release): the lock is released at the next use of the
    /// engine. Dropping the engine closes the connection, which releases it too.
    release_lock: Arc<AtomicBool>,
    /// The session is inside a transaction kiln opened (a body's, or one
    /// reopened after an implicit commit): the next [`HistoryStore::commit`]
    /// writes into it and commits it.
    ///
    /// [`HistoryStore::commit`]: kiln_core::engine::HistoryStore::commit
    in_tx: bool,
    history_name: String,
    snapshot_name: String,
    /// The database named by the URL: what `inspect` reads, and where kiln's tables live.
    database: String,
    /// The URL as configured, password included: only to derive a scratch
    /// database's URL from (never shown; `target` is what messages use).
    url: DbUrl,
    /// kiln's own tables (history, log, snapshots), which `inspect` leaves out.
    own_tables: [String; 4],
    /// The server, asked once, on the first inspection.
    server: Option<Server>,
    sql: Sql,
    /// The backfill jobs table, quoted and qualified with the database.
    jobs_table: String,
}

impl MysqlEngine {
    /// Connect to `mysql://user:pass@host:port/db` or `mariadb://…`
    /// (`?socket=/run/mysqld/mysqld.sock` for a Unix socket; sqlx's other
    /// parameters such as `ssl-mode` apply). The database must be named.
    ///
    /// The session keeps the server's `sql_mode` and `time_zone` (sqlx would
    /// otherwise add `PIPES_AS_CONCAT` and force UTC), so migrations behave as
    /// they do in the `mysql` client; `autocommit` is set on, which kiln's
    /// commit protocol relies on.
    ///
    /// # Errors
    /// [`EngineError::BadUrl`] for an unusable URL or one without a database,
    /// [`EngineError::Connect`] with the server's reason when connecting fails.
    pub async fn connect(cfg: &BackendConfig) -> Result<Self, EngineError> {
        let target = cfg.url.redacted();
        kiln_core::url::EngineKind::parse(&cfg.url)?;
        // sqlx ignores parameters it does not know; kiln refuses them, as on PostgreSQL.
        cfg.url.check_params("MySQL/MariaDB", URL_PARAMETERS)?;
        let (opts, database) = parse_url(cfg.url.expose(), &target).map_err(|e| match e {
            EngineError::BadUrl { url, message } => EngineError::BadUrl { url, message: cfg.url.scrub(&message) },
            other => other,
        })?;
        // Driver messages may quote the URL: they are scrubbed like the URL itself.
        let connect_err = |e: sqlx::Error| EngineError::Connect { url: target.clone(), message: cfg.url.scrub(&describe(&e)) };
        let mut conn = opts.connect().await.map_err(connect_err)?;
        sqlx::raw_sql("SET autocommit = 1").execute(&mut conn).await.map_err(connect_err)?;
        let mut lock_name = format!("kiln:{database}:{}", cfg.history_table);
        if lock_name.chars().count() > MAX_LOCK_NAME {
            lock_name = format!("kiln:{:016x}", lock_key(&lock_name) as u64);
        }
        Ok(MysqlEngine {
            conn,
            target,
            lock_name,
            locked: false,
            release_lock: Arc::new(AtomicBool::new(false)),
            in_tx: false,
            history_name: cfg.history_table.clone(),
            snapshot_name: cfg.snapshot_table.clone(),
            url: cfg.url.clone(),
            own_tables: [cfg.history_table.clone(), cfg.log_table.clone(), cfg.snapshot_table.clone(), jobs_table_name(&cfg.history_table)],
            jobs_table: format!("{}.{}", quote_backtick(&database), quote_backtick(&jobs_table_name(&cfg.history_table))),
            server: None,
            sql: Sql::new(&database, &cfg.history_table, &cfg.log_table, &cfg.snapshot_table),
            database,
        })
    }

    fn err(&self, context: impl Into<String>, e: sqlx::Error) -> EngineError {
        let context = format!("{} ({})", context.into(), self.target);
        if is_connection_error(&e) {
            EngineError::ConnectionLost { context, message: describe(&e) }
        } else {
            EngineError::Query { context, message: describe(&e) }
        }
    }

    /// Run a fixed statement of kiln's own over the text protocol.
    async fn raw(&mut self, sql: &'static str, context: &str) -> Result<(), EngineError> {
        match sqlx::raw_sql(sql).execute(&mut self.conn).await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.err(context, e)),
        }
    }

    /// End kiln's open transaction, if any, without committing it.
    async fn roll_back(&mut self) -> Result<(), sqlx::Error> {
        self.in_tx = false;
        sqlx::raw_sql("ROLLBACK").execute(&mut self.conn).await.map(|_| ())
    }
}

#[async_trait]
impl Engine for MysqlEngine {
    /// No transactional DDL and no transactions on request: every migration
    /// takes the intent path, and the core never calls `run_atomic`.
    fn capabilities(&self) -> Capabilities {
        Capabilities { engine: "mysql", kind: Kind::Sql, transactional_ddl: false, transactions_on_request: false, merge_finish: true }
    }

    fn target(&self) -> String {
        self.target.clone()
    }

    fn schema(&mut self) -> Option<&mut dyn SchemaStore> {
        Some(self)
    }

    fn scratch(&mut self) -> Option<&mut dyn ScratchAdmin> {
        Some(self)
    }

    fn jobs(&mut self) -> Option<&mut dyn JobStore> {
        Some(self)
    }

    fn foreign(&mut self) -> Option<&mut dyn kiln_core::adopt::ForeignReader> {
        Some(self)
    }

    /// Releases the lock, then closes the session. A transaction still open
    /// (a finish the core never flushed) is rolled back by the server.
    async fn close(mut self: Box<Self>) -> Result<(), EngineError> {
        kiln_core::engine::Locker::unlock(&mut *self).await?;
        let MysqlEngine { conn, target, .. } = *self;
        conn.close().await.map_err(|e| EngineError::Query { context: format!("closing {target}"), message: describe(&e) })
    }
}

/// Parse a `mysql://` / `mariadb://` URL into sqlx options and the database name.
fn parse_url(url: &str, shown: &str) -> Result<(MySqlConnectOptions, String), EngineError> {
    let bad = |message: String| EngineError::BadUrl { url: shown.to_string(), message };
    let mut u = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
    match u.scheme().to_ascii_lowercase().as_str() {
        "mysql" => {}
        // sqlx only knows `mysql://`; the protocol is the same.
        "mariadb" => u.set_scheme("mysql").map_err(|_| bad("cannot use the mariadb:// scheme".into()))?,
        other => return Err(bad(format!("{other}:// is not a MySQL/MariaDB URL; use mysql:// or mariadb://"))),
    }
    let path = u.path().trim_matches('/');
    if path.is_empty() {
        return Err(bad("no database named; add it as the path, e.g. mysql://user@localhost:3306/mydb".into()));
    }
    if path.contains('/') {
        return Err(bad(format!("the path must be just the database name, not {path:?}")));
    }
    let has_tz = u.query_pairs().any(|(k, _)| k == "timezone" || k == "time-zone");
    let mut opts = MySqlConnectOptions::from_str(u.as_str()).map_err(|e| bad(describe(&e)))?;
    opts = opts.pipes_as_concat(false).no_engine_substitution(false);
    if !has_tz {
        // kiln stores DATETIME(6) values in UTC itself; the session time zone is the user's.
        opts = opts.timezone(None);
    }
    let database = opts.get_database().unwrap_or(path).to_string();
    Ok((opts, database))
}

/// The server's error number (`1146` for a missing table), if `e` is one.
fn error_number(e: &sqlx::Error) -> Option<u16> {
    match e {
        sqlx::Error::Database(d) => d.try_downcast_ref::<MySqlDatabaseError>().map(|m| m.number()),
        _ => None,
    }
}

/// Errors that mean the session is gone (so its transaction and lock are too).
fn is_connection_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => true,
        // 1053 server shutdown, 1927 connection killed, 4031 disconnected for inactivity.
        _ => matches!(error_number(e), Some(1053 | 1927 | 4031)),
    }
}

/// The database's own message (`1050 (42S01): Table 't' already exists`) when
/// there is one, else sqlx's.
fn describe(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(d) => match d.try_downcast_ref::<MySqlDatabaseError>() {
            Some(m) => m.to_string(),
            None => d.to_string(),
        },
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let p = |u: &str| parse_url(u, &kiln_core::url::redact(u));
        let (o, db) = p("mysql://root@localhost/migbench?socket=/run/mysqld/mysqld.sock").unwrap();
        assert_eq!(db, "migbench");
        assert_eq!(o.get_socket().map(|s| s.display().to_string()).as_deref(), Some("/run/mysqld/mysqld.sock"));
        let (o, db) = p("mariadb://u:p%40ss@db.example:3307/app").unwrap();
        assert_eq!((db.as_str(), o.get_port(), o.get_host()), ("app", 3307, "db.example"));
        match p("mysql://u:secret@localhost:3306") {
            Err(EngineError::BadUrl { url, message }) => {
                assert!(!url.contains("secret"), "{url}");
                assert!(message.contains("database"), "{message}");
            }
            other => panic!("{:?}", other.map(|(_, d)| d)),
        }
        assert!(matches!(p("mysql://u@h/a/b"), Err(EngineError::BadUrl { .. })));
    }
}
