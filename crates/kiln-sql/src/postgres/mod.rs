//! The PostgreSQL engine: one `tokio-postgres` session for the whole run.
//!
//! The design decision to know: a migration in the default transaction mode is
//! sent to the server as **one pipeline** — `BEGIN` + `SET LOCAL
//! synchronous_commit TO off`, every statement of the body (each its own
//! simple-query message, so DDL and dollar-quoted functions work and a failure
//! names its statement), the step's history change, its event-log `INSERT`
//! and `COMMIT` — and the answers are read afterwards
//! ([`Executor::run_atomic`](kiln_core::engine::Executor::run_atomic)). That
//! is one network round trip per migration. It stays exact because
//! PostgreSQL aborts the transaction at the first failing statement: every
//! later message fails with `25P02` and the final `COMMIT` of an aborted
//! transaction is a `ROLLBACK`, so the first error is *the* error and nothing
//! of the migration remains. Bodies that could change the transaction state
//! themselves (`COMMIT`, `ROLLBACK TO SAVEPOINT`, …) are refused or run one
//! statement at a time, see `exec::BodyPlan`. kiln's own writes outside a
//! migration ([`HistoryStore::commit`](kiln_core::engine::HistoryStore::commit))
//! are one pipelined transaction too.
//!
//! Durability: steps commit with `synchronous_commit = off` (no WAL flush per
//! migration); a [`Record`](kiln_core::engine::Record) marked `durable` commits
//! with it `on`. Every run ends with such a commit (the `run-end` event), and
//! flushing that commit record flushes the WAL up to it, so every earlier
//! commit of the run is durable by the time `kiln up` returns. A crash before
//! that loses whole migrations only (each one is a single transaction with its
//! history row), so schema and history always agree.
//!
//! Schema contracts: [`SchemaStore::inspect`] reads the whole schema with
//! three catalog queries in one pipeline, whatever the number of tables. With
//! a contract, `run_atomic` sends the same pipeline without the `COMMIT`,
//! inspects inside the open transaction, and commits or rolls back on the
//! check's verdict — a migration that breaks the contract leaves nothing
//! behind.
//!
//! Modules: `conn` (hosts, sockets, the connection task, driver errors),
//! `tls` (`sslmode`, verifiers), `lock` ([`Locker`]), `history`
//! ([`HistoryStore`]), `exec` ([`Executor`]: pipelines, body plans, statement
//! errors), `inspect` ([`SchemaStore`]), `scratch` ([`ScratchAdmin`]), `jobs`
//! (`kiln_jobs`, the backfill job store).
//!
//! [`Locker`]: kiln_core::engine::Locker
//! [`HistoryStore`]: kiln_core::engine::HistoryStore
//! [`Executor`]: kiln_core::engine::Executor

mod code;
mod conn;
mod exec;
mod foreign;
mod history;
mod inspect;
mod jobs;
mod lock;
mod names;
mod scratch;
mod stats;
mod tls;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use kiln_core::engine::{Capabilities, Engine, SchemaStore, ScratchAdmin};
use kiln_core::jobs::JobStore;
use kiln_core::url::DbUrl;
use kiln_core::{BackendConfig, EngineError, Kind};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, Config};

use crate::common::{lock_key, quote_double};
use crate::jobs_common::jobs_table_name;
use conn::{error_text, is_connection_loss, open};
use history::RecordSql;
use tls::{split_tls_params, TlsSetup};

/// The PostgreSQL engine: one session (connection) for its whole life, so the
/// session advisory lock dies with the process. During the move off
/// `kiln_core::Backend`, wrap it in `kiln_core::backend::Protocol`.
pub struct PgBackend {
    /// Shared with [`kiln_core::engine::Locker::detached_unlock`], which holds
    /// it weakly.
    client: Arc<Client>,
    /// Drives the connection; ends when the client is dropped or the server goes away.
    conn_task: JoinHandle<()>,
    /// Why the connection ended, when it ended with an error.
    conn_error: Arc<Mutex<Option<String>>>,
    /// URL with the password redacted (plus the schema, when one is configured).
    target: String,
    /// The URL as configured, password included: only to derive the scratch
    /// database's URL from (never shown; `target` is what messages use).
    url: DbUrl,
    /// Configured schema (schema-per-tenant); `None` means the session's default.
    schema: Option<String>,
    /// The history table, quoted and schema-qualified.
    history: String,
    /// The event log table, quoted and schema-qualified.
    log_table: String,
    /// The schema snapshot table, quoted and schema-qualified.
    snapshot_table: String,
    /// Raw names, for `to_regclass`-free existence checks and messages.
    history_raw: String,
    /// The backfill jobs table (`kiln_jobs`), quoted and schema-qualified.
    jobs_table: String,
    /// Raw names of kiln's own tables, which [`SchemaStore::inspect`] leaves out.
    own_tables: Vec<String>,
    /// The schema [`SchemaStore::inspect`] reports: the configured one, else the
    /// session's current schema at connect (captured once, because a migration
    /// may move the search_path). `None` when the session had no current schema.
    inspect_schema: Option<String>,
    /// kiln's own writes.
    sql: RecordSql,
    lock_key: i64,
    /// Whether this engine took the advisory lock (cleared by a detached unlock).
    locked: Arc<AtomicBool>,
}

/// The URL parameters kiln and tokio-postgres understand (`sslcert`,
/// `sslkey` and `sslpassword` are refused later with their own reason).
const URL_PARAMETERS: &[&str] = &[
    "user",
    "password",
    "dbname",
    "options",
    "application_name",
    "sslmode",
    "sslnegotiation",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslpassword",
    "host",
    "hostaddr",
    "port",
    "connect_timeout",
    "tcp_user_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_retries",
    "target_session_attrs",
    "channel_binding",
    "load_balance_hosts",
];

impl PgBackend {
    /// Connect to the database named by `cfg.url` (`postgres://` or `postgresql://`).
    ///
    /// TLS follows the URL's `sslmode`: `disable`; `prefer` (the default: TLS when
    /// the server offers it, certificate not checked, as libpq does); `require`
    /// (TLS or fail; the certificate is checked against `sslrootcert` only when one
    /// is given); `verify-ca` (chain checked against `sslrootcert`, else
    /// `~/.postgresql/root.crt`, else the public web roots); `verify-full` (chain
    /// and host name). Unix-socket hosts (`?host=/var/run/postgresql`) never use TLS.
    ///
    /// The session's `application_name` is `kiln <user@host> pid <pid>` unless the
    /// URL sets one, so [`Locker::holder`](kiln_core::engine::Locker::holder) can name who holds the lock.
    ///
    /// # Errors
    /// [`EngineError::BadUrl`] for a URL that cannot be parsed;
    /// [`EngineError::Connect`] with the server's or the network's reason
    /// (`connection refused`, `database "x" does not exist`, a TLS failure).
    /// Messages carry the URL with its password redacted.
    pub async fn connect(cfg: &BackendConfig) -> Result<Self, EngineError> {
        let redacted = cfg.url.redacted();
        // Driver messages may quote the URL: they are scrubbed like the URL itself.
        let bad_url = |message: String| EngineError::BadUrl { url: redacted.clone(), message: cfg.url.scrub(&message) };
        kiln_core::url::EngineKind::parse(&cfg.url)?;
        cfg.url.check_params("PostgreSQL", URL_PARAMETERS)?;
        let (stripped, tls_opts) = split_tls_params(cfg.url.expose()).map_err(bad_url)?;
        let mut pg: Config = stripped.parse().map_err(|e: tokio_postgres::Error| bad_url(error_text(&e)))?;
        if pg.get_application_name().is_none() {
            pg.application_name(format!("kiln {} pid {}", kiln_core::current_actor(), std::process::id()));
        }
        let tls = TlsSetup::new(&tls_opts).map_err(bad_url)?;
        let opened = open(&pg, &tls).await.map_err(|message| EngineError::Connect { url: redacted.clone(), message: cfg.url.scrub(&message) })?;

        // kiln's own tables are always schema-qualified: a migration may change
        // the search_path, and the history INSERT that follows it in the same
        // transaction must still find the right table.
        let schema = match &cfg.schema {
            Some(s) => Some(s.clone()),
            None => {
                let row = opened
                    .client
                    .query_typed_one("SELECT current_schema()::text", &[])
                    .await
                    .map_err(|e| EngineError::Connect { url: redacted.clone(), message: cfg.url.scrub(&error_text(&e)) })?;
                row.try_get::<_, Option<String>>(0)
                    .map_err(|e| EngineError::Connect { url: redacted.clone(), message: cfg.url.scrub(&e.to_string()) })?
            }
        };
        let qualify = |t: &str| match &schema {
            Some(s) => format!("{}.{}", quote_double(s), quote_double(t)),
            None => quote_double(t),
        };
        let key_name = format!("kiln:{}.{}", schema.as_deref().unwrap_or(""), cfg.history_table);
        let target = match &cfg.schema {
            Some(s) => format!("{redacted} (schema {s})"),
            None => redacted.clone(),
        };
        let (history, log_table) = (qualify(&cfg.history_table), qualify(&cfg.log_table));
        Ok(PgBackend {
            sql: RecordSql::new(&history, &log_table),
            history,
            log_table,
            snapshot_table: qualify(&cfg.snapshot_table),
            history_raw: cfg.history_table.clone(),
            jobs_table: qualify(&jobs_table_name(&cfg.history_table)),
            own_tables: vec![cfg.history_table.clone(), cfg.log_table.clone(), cfg.snapshot_table.clone(), jobs_table_name(&cfg.history_table)],
            inspect_schema: schema.clone(),
            client: Arc::new(opened.client),
            conn_task: opened.task,
            conn_error: opened.error,
            target,
            url: cfg.url.clone(),
            schema: cfg.schema.clone(),
            lock_key: lock_key(&key_name),
            locked: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Map a driver error from one of kiln's own queries.
    fn engine_error(&self, context: &str, e: &tokio_postgres::Error) -> EngineError {
        if is_connection_loss(e) {
            let message = self.conn_error.lock().ok().and_then(|g| g.clone()).unwrap_or_else(|| error_text(e));
            EngineError::ConnectionLost { context: context.to_string(), message }
        } else {
            EngineError::Query { context: context.to_string(), message: error_text(e) }
        }
    }

    /// Resets the session's search_path at the start of every migration, so each
    /// one starts from the same place whatever the previous one `SET`.
    fn search_path_sql(&self) -> String {
        match &self.schema {
            Some(s) => format!("SET search_path TO {}", quote_double(s)),
            None => "RESET search_path".into(),
        }
    }
}

#[async_trait]
impl Engine for PgBackend {
    fn capabilities(&self) -> Capabilities {
        Capabilities { engine: "postgres", kind: Kind::Sql, transactional_ddl: true, transactions_on_request: true, merge_finish: false }
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

    async fn close(self: Box<Self>) -> Result<(), EngineError> {
        let PgBackend { client, conn_task, .. } = *self;
        // Dropping the client makes the connection send Terminate and finish
        // (a background unlock still waiting for its answer holds it until then).
        drop(client);
        let _ = conn_task.await;
        Ok(())
    }
}
