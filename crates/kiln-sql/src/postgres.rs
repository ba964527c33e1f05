//! The PostgreSQL engine: one `tokio-postgres` session for the whole run.
//!
//! The design decision to know: a migration in the default transaction mode is
//! sent to the server as **one pipeline** — `BEGIN` + `SET LOCAL
//! synchronous_commit TO off`, every statement of the body (each its own
//! simple-query message, so DDL and dollar-quoted functions work and a failure
//! names its statement), the history `INSERT`, the event-log `INSERT` and
//! `COMMIT` — and the answers are read afterwards. That is one network round
//! trip per migration. It stays exact because PostgreSQL aborts the
//! transaction at the first failing statement: every later message fails with
//! `25P02` and the final `COMMIT` of an aborted transaction is a `ROLLBACK`, so
//! the first error is *the* error and nothing of the migration remains. Bodies
//! that could change the transaction state themselves (`COMMIT`, `ROLLBACK TO
//! SAVEPOINT`, …) are refused or run one statement at a time, see
//! `BodyPlan`.
//!
//! Durability: migrations commit with `synchronous_commit = off` (no WAL flush
//! per migration), and [`Backend::log`] commits with it `on`. The runner ends
//! every run with a `run-end` event through `log`, and flushing that commit
//! record flushes the WAL up to it, so every earlier commit of the run is
//! durable by the time `kiln up` returns. A crash before that loses whole
//! migrations only (each one is a single transaction with its history row), so
//! schema and history always agree.
//!
//! Schema contracts: [`Backend::inspect`] reads the whole schema with three
//! catalog queries in one pipeline, whatever the number of tables. With a
//! contract, [`Backend::apply_checked`] sends the same pipeline without the
//! `COMMIT`, inspects inside the open transaction, and commits or rolls back
//! on the check's verdict — a migration that breaks the contract leaves
//! nothing behind.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::{maybe_done, MaybeDone};
use kiln_core::schema::{ColumnInfo, ConstraintInfo, IndexInfo, Snapshot};
use kiln_core::url::redact;
use kiln_core::{
    ApplyError, AppliedMigration, Backend, BackendConfig, Body, Capabilities, EngineError, FailureOutcome, Kind, LogEntry,
    Migration, RecordContext, SchemaCheck, Statement, StatementError, StepError, TxMode, KILN_VERSION,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_postgres::config::{Host, SslMode as PgSslMode};
use tokio_postgres::error::{DbError, ErrorPosition};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{AsyncMessage, Client, Config, Connection, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::common::{lock_key, quote_double, RawHistoryRow, HISTORY_COLUMNS, LOG_COLUMNS};

/// Time allowed for one host's TCP connect, TLS handshake and authentication
/// when the URL sets no `connect_timeout`.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The PostgreSQL backend: one session (connection) for its whole life, so the
/// session advisory lock dies with the process.
pub struct PgBackend {
    client: Client,
    /// Drives the connection; ends when the client is dropped or the server goes away.
    conn_task: JoinHandle<()>,
    /// Why the connection ended, when it ended with an error.
    conn_error: Arc<Mutex<Option<String>>>,
    /// URL with the password redacted (plus the schema, when one is configured).
    target: String,
    /// The URL as configured, password included: only to derive the scratch
    /// database's URL from (never shown; `target` is what messages use).
    url: String,
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
    /// Raw names of kiln's own tables, which [`Backend::inspect`] leaves out.
    own_tables: Vec<String>,
    /// The schema [`Backend::inspect`] reports: the configured one, else the
    /// session's current schema at connect (captured once, because a migration
    /// may move the search_path). `None` when the session had no current schema.
    inspect_schema: Option<String>,
    lock_key: i64,
    locked: bool,
}

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
    /// URL sets one, so [`Backend::lock_holder`] can name who holds the lock.
    ///
    /// # Errors
    /// [`EngineError::BadUrl`] for a URL that cannot be parsed;
    /// [`EngineError::Connect`] with the server's or the network's reason
    /// (`connection refused`, `database "x" does not exist`, a TLS failure).
    /// Messages carry the URL with its password redacted.
    pub async fn connect(cfg: &BackendConfig) -> Result<Self, EngineError> {
        let redacted = redact(&cfg.url);
        let bad_url = |message: String| EngineError::BadUrl { url: redacted.clone(), message };
        let (stripped, tls_opts) = split_tls_params(&cfg.url).map_err(bad_url)?;
        let mut pg: Config = stripped.parse().map_err(|e: tokio_postgres::Error| bad_url(error_text(&e)))?;
        if pg.get_application_name().is_none() {
            pg.application_name(format!("kiln {} pid {}", kiln_core::current_actor(), std::process::id()));
        }
        let tls = TlsSetup::new(&tls_opts).map_err(bad_url)?;
        let opened = open(&pg, &tls).await.map_err(|message| EngineError::Connect { url: redacted.clone(), message })?;

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
                    .map_err(|e| EngineError::Connect { url: redacted.clone(), message: error_text(&e) })?;
                row.try_get::<_, Option<String>>(0).map_err(|e| EngineError::Connect { url: redacted.clone(), message: e.to_string() })?
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
        Ok(PgBackend {
            history: qualify(&cfg.history_table),
            log_table: qualify(&cfg.log_table),
            snapshot_table: qualify(&cfg.snapshot_table),
            history_raw: cfg.history_table.clone(),
            own_tables: vec![cfg.history_table.clone(), cfg.log_table.clone(), cfg.snapshot_table.clone()],
            inspect_schema: schema.clone(),
            client: opened.client,
            conn_task: opened.task,
            conn_error: opened.error,
            target,
            url: cfg.url.clone(),
            schema: cfg.schema.clone(),
            lock_key: lock_key(&key_name),
            locked: false,
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

    fn insert_log_sql(&self) -> String {
        format!("INSERT INTO {} ({LOG_COLUMNS}) VALUES (clock_timestamp(), $1, $2, $3, $4, $5, NULL, $6)", self.log_table)
    }

    /// The row of the history for `m`, finished now: `state` with duration and
    /// time taken from the server clock since the transaction began.
    fn insert_history_sql(&self, state: &str) -> String {
        format!(
            "INSERT INTO {} ({HISTORY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, '{state}', $6, clock_timestamp(), \
             (extract(epoch FROM clock_timestamp() - now()) * 1000)::bigint, $7, $8, $9, NULL, NULL)",
            self.history
        )
    }

    /// Log a `failed` event after a body failure. Best effort: the body error is
    /// what the caller must see, and the runner's `run-end` follows anyway.
    async fn log_failure(&self, m: &Migration, ctx: &RecordContext, direction: &str, err: &StatementError) {
        let sql = self.insert_log_sql();
        let version = m.version.number as i64;
        let event = "failed";
        let detail = format!("{direction}: {err}");
        let r = self
            .client
            .execute_typed(
                &sql,
                &log_params(&event, &version, m, ctx, &detail),
            )
            .await;
        if let Err(e) = r {
            tracing::warn!(version = %m.version, error = %error_text(&e), "could not log the failure of a migration");
        }
    }

    /// Run `body` and record the outcome in one transaction (default mode).
    ///
    /// With `check`, the pipeline stops short of `COMMIT`: the schema is
    /// inspected inside the still-open transaction (it sees the body's
    /// uncommitted DDL), and violations roll everything back — body, history
    /// row and `applied` event alike. Without it, `COMMIT` rides in the same
    /// pipeline as the body: one round trip per migration.
    async fn run_transactional(
        &mut self,
        m: &Migration,
        body: &Body,
        ctx: &RecordContext,
        dir: Direction,
        check: Option<&SchemaCheck>,
    ) -> Result<(), StepError> {
        let (file, statements) = sql_body(m, body)?;
        let plan = match BodyPlan::transactional(statements) {
            Ok(p) => p,
            Err((index, message)) => {
                let err = statement_error(&file, statements, index, message, None);
                self.log_failure(m, ctx, dir.word(), &err).await;
                return Err(StepError::Body(ApplyError { error: err, outcome: FailureOutcome::RolledBack }));
            }
        };

        let version = m.version.number as i64;
        let script = m.display_path();
        let checksum = m.checksum.0.clone();
        let kiln_version = KILN_VERSION.to_string();
        let event = dir.event();
        let detail = format!("{}: {} statements", file, statements.len());
        let prelude = format!("BEGIN; SET LOCAL synchronous_commit TO off; {}", self.search_path_sql());
        let record_sql = match dir {
            Direction::Up => self.insert_history_sql("applied"),
            Direction::Down => format!("DELETE FROM {} WHERE version = $1", self.history),
        };
        let log_sql = self.insert_log_sql();
        let no_error: Option<String> = None;

        let mut items: Vec<(Tag, Item<'_>)> = Vec::with_capacity(statements.len() + 4);
        items.push((Tag::Prelude, Item::Simple(&prelude)));
        for &i in &plan.run {
            items.push((Tag::Statement(i), Item::Simple(&statements[i].sql)));
        }
        let record_params: Vec<(&(dyn ToSql + Sync), Type)> = match dir {
            Direction::Up => vec![
                (&version, Type::INT8),
                (&m.description, Type::TEXT),
                (&script, Type::TEXT),
                (&m.directives.group, Type::TEXT),
                (&checksum, Type::TEXT),
                (&ctx.batch, Type::INT8),
                (&ctx.actor, Type::TEXT),
                (&kiln_version, Type::TEXT),
                (&no_error, Type::TEXT),
            ],
            Direction::Down => vec![(&version, Type::INT8)],
        };
        items.push((Tag::Record, Item::Typed(&record_sql, record_params)));
        items.push((
            Tag::Record,
            Item::Typed(
                &log_sql,
                log_params(&event, &version, m, ctx, &detail),
            ),
        ));
        if check.is_none() {
            items.push((Tag::Commit, Item::Simple("COMMIT")));
        }

        let mut result = run_items(&self.client, &items, plan.pipelined).await;
        if let (Ok(()), Some(check)) = (&result, check) {
            let violations = match self.inspect_in(true).await {
                Ok(snapshot) => check(&snapshot),
                Err(e) => {
                    // The transaction is aborted (or the session gone): nothing of the migration may stay.
                    let _ = self.client.batch_execute("ROLLBACK").await;
                    return Err(StepError::Engine(e));
                }
            };
            if !violations.is_empty() {
                if let Err(e) = self.client.batch_execute("ROLLBACK").await {
                    return Err(StepError::Engine(self.engine_error(&format!("rolling back {}, which breaks the schema contract", m.name()), &e)));
                }
                // The runner logs the `failed` event with the violations (as for
                // every engine), so it is not logged here a second time.
                return Err(StepError::Invalid { violations, outcome: FailureOutcome::RolledBack });
            }
            result = self.client.batch_execute("COMMIT").await.map_err(|e| (Tag::Commit, e));
        }
        let Err((tag, e)) = result else {
            return Ok(());
        };
        if is_connection_loss(&e) {
            return Err(StepError::Engine(self.engine_error(&format!("running {} ({})", m.name(), dir.word()), &e)));
        }
        if (check.is_some() || !plan.pipelined) && tag != Tag::Commit {
            // Without COMMIT in the pipeline (sequential runs, or a check still to
            // come), a failure leaves the aborted transaction open.
            if let Err(re) = self.client.batch_execute("ROLLBACK").await {
                return Err(StepError::Engine(self.engine_error("rolling back a failed migration", &re)));
            }
        }
        let err = match (tag, e.as_db_error()) {
            (Tag::Statement(i), Some(db)) => statement_error(&file, statements, i, db_message(db), Some(db)),
            (Tag::Commit, Some(db)) => {
                // Deferred constraints and serialization failures surface at COMMIT.
                let last = statements.len().saturating_sub(1);
                statement_error(&file, statements, last, format!("at COMMIT: {}", db_message(db)), None)
            }
            _ => {
                let what = match tag {
                    Tag::Prelude => "starting the transaction of",
                    _ => "recording",
                };
                return Err(StepError::Engine(self.engine_error(&format!("{what} {} ({}); it was rolled back", m.name(), dir.word()), &e)));
            }
        };
        self.log_failure(m, ctx, dir.word(), &err).await;
        Err(StepError::Body(ApplyError { error: err, outcome: FailureOutcome::RolledBack }))
    }

    /// Run `body` outside a transaction (`-- kiln:transaction off`): commit an
    /// intent row in state `running` first, run the statements in autocommit, then
    /// record the end. A crash in between leaves `running`, which blocks the next
    /// run until `kiln repair`; a failure is recorded as `failed`.
    async fn run_autocommit(&mut self, m: &Migration, body: &Body, ctx: &RecordContext, dir: Direction) -> Result<(), StepError> {
        let (file, statements) = sql_body(m, body)?;
        let started = Instant::now();
        let version = m.version.number as i64;
        let name = m.name();
        let context = format!("running {name} ({}) outside a transaction", dir.word());
        if let Some((i, message)) = refused_anywhere(statements) {
            let err = statement_error(&file, statements, i, message, None);
            self.log_failure(m, ctx, dir.word(), &err).await;
            return Err(StepError::Body(ApplyError { error: err, outcome: FailureOutcome::RolledBack }));
        }

        // 1. Intent, committed before anything runs.
        let set_path = self.search_path_sql();
        let intent_msg = format!(
            "interrupted: kiln started {} {} outside a transaction and did not record its end; check what it did, then run `kiln repair {}`",
            if dir == Direction::Up { "applying" } else { "reverting" },
            name,
            m.version
        );
        let script = m.display_path();
        let checksum = m.checksum.0.clone();
        let kiln_version = KILN_VERSION.to_string();
        let intent_sql = match dir {
            Direction::Up => self.insert_history_sql("running"),
            Direction::Down => format!("UPDATE {} SET state = 'running', error = $2, error_statement = NULL, error_line = NULL WHERE version = $1", self.history),
        };
        let intent_err = Some(intent_msg.clone());
        let intent_params: Vec<(&(dyn ToSql + Sync), Type)> = match dir {
            Direction::Up => vec![
                (&version, Type::INT8),
                (&m.description, Type::TEXT),
                (&script, Type::TEXT),
                (&m.directives.group, Type::TEXT),
                (&checksum, Type::TEXT),
                (&ctx.batch, Type::INT8),
                (&ctx.actor, Type::TEXT),
                (&kiln_version, Type::TEXT),
                (&intent_err, Type::TEXT),
            ],
            Direction::Down => vec![(&version, Type::INT8), (&intent_msg, Type::TEXT)],
        };
        let items = [(Tag::Prelude, Item::Simple(&set_path)), (Tag::Record, Item::Typed(&intent_sql, intent_params))];
        if let Err((_, e)) = run_items(&self.client, &items, true).await {
            return Err(StepError::Engine(self.engine_error(&format!("recording the start of {name}"), &e)));
        }

        // 2. The statements, one at a time: without a transaction, nothing may run
        //    after a failure, so there is no pipelining here.
        for (i, st) in statements.iter().enumerate() {
            let Err(e) = self.client.batch_execute(&st.sql).await else { continue };
            if is_connection_loss(&e) {
                // The intent row stays `running`: we cannot know what the statement did.
                return Err(StepError::Engine(self.engine_error(&context, &e)));
            }
            let db = e.as_db_error();
            let message = db.map(db_message).unwrap_or_else(|| error_text(&e));
            let err = statement_error(&file, statements, i, message, db);
            // A body may open its own transaction; do not leave it aborted.
            let _ = self.client.batch_execute("ROLLBACK").await;
            let recorded = match dir {
                Direction::Up => err.message.clone(),
                Direction::Down => format!("the down migration failed, so {name} is only partly reverted: {}", err.message),
            };
            self.record_autocommit_failure(m, ctx, dir, &err, &recorded, started.elapsed()).await;
            return Err(StepError::Body(ApplyError { error: err, outcome: FailureOutcome::RecordedFailed }));
        }

        // 3. The end, with its event, in one transaction.
        let duration = started.elapsed().as_millis() as i64;
        let finish_sql = match dir {
            Direction::Up => format!(
                "UPDATE {} SET state = 'applied', applied_at = clock_timestamp(), duration_ms = $2, error = NULL, error_statement = NULL, error_line = NULL WHERE version = $1",
                self.history
            ),
            Direction::Down => format!("DELETE FROM {} WHERE version = $1", self.history),
        };
        let finish_params: Vec<(&(dyn ToSql + Sync), Type)> = match dir {
            Direction::Up => vec![(&version, Type::INT8), (&duration, Type::INT8)],
            Direction::Down => vec![(&version, Type::INT8)],
        };
        let log_sql = self.insert_log_sql();
        let event = dir.event();
        let detail = format!("{}: {} statements, outside a transaction", file, statements.len());
        let items = [
            (Tag::Prelude, Item::Simple("BEGIN; SET LOCAL synchronous_commit TO off")),
            (Tag::Record, Item::Typed(&finish_sql, finish_params)),
            (
                Tag::Record,
                Item::Typed(
                    &log_sql,
                    log_params(&event, &version, m, ctx, &detail),
                ),
            ),
            (Tag::Commit, Item::Simple("COMMIT")),
        ];
        if let Err((_, e)) = run_items(&self.client, &items, true).await {
            return Err(StepError::Engine(self.engine_error(&format!("recording the end of {name}; it stays recorded as running"), &e)));
        }
        Ok(())
    }

    async fn record_autocommit_failure(&self, m: &Migration, ctx: &RecordContext, dir: Direction, err: &StatementError, recorded: &str, took: Duration) {
        let version = m.version.number as i64;
        let statement = err.statement as i32;
        let line = err.line as i32;
        let duration = took.as_millis() as i64;
        let sql = format!(
            "UPDATE {} SET state = 'failed', error = $2, error_statement = $3, error_line = $4, applied_at = clock_timestamp(), duration_ms = $5 WHERE version = $1",
            self.history
        );
        let log_sql = self.insert_log_sql();
        let event = "failed";
        let detail = format!("{}: {err}", dir.word());
        let items = [
            (Tag::Prelude, Item::Simple("BEGIN")),
            (
                Tag::Record,
                Item::Typed(
                    &sql,
                    vec![(&version, Type::INT8), (&recorded, Type::TEXT), (&statement, Type::INT4), (&line, Type::INT4), (&duration, Type::INT8)],
                ),
            ),
            (
                Tag::Record,
                Item::Typed(
                    &log_sql,
                    log_params(&event, &version, m, ctx, &detail),
                ),
            ),
            (Tag::Commit, Item::Simple("COMMIT")),
        ];
        if let Err((_, e)) = run_items(&self.client, &items, true).await {
            // The intent row stays `running`, which blocks the next run just the same.
            tracing::warn!(version = %m.version, error = %error_text(&e), "could not record a failed migration; it stays recorded as running");
        }
    }

    async fn run(&mut self, m: &Migration, body: &Body, ctx: &RecordContext, dir: Direction) -> Result<(), StepError> {
        match m.directives.transaction {
            TxMode::Off => self.run_autocommit(m, body, ctx, dir).await,
            TxMode::Default | TxMode::On => self.run_transactional(m, body, ctx, dir, None).await,
        }
    }
}

impl PgBackend {
    /// The live schema of [`PgBackend::inspect_schema`] (see [`Backend::inspect`]).
    ///
    /// Three catalog queries — columns, indexes, constraints — each covering
    /// every table at once, sent as one pipeline: the cost does not grow with a
    /// round trip per table. `in_transaction` says whether a migration's
    /// transaction is open (then its uncommitted DDL is what is seen, and the
    /// transaction is left open for the caller to commit or roll back);
    /// otherwise the queries run in their own read-only repeatable-read
    /// transaction, so they agree with each other.
    ///
    /// The search_path is pinned to the inspected schema for the duration
    /// (`SET LOCAL`): `format_type`, `pg_get_expr` and `pg_get_constraintdef`
    /// qualify names that are not on the search_path, so without it the same
    /// schema would read differently depending on what the session (or the
    /// last migration) set — and `kiln diff` would report drift that is not there.
    async fn inspect_in(&self, in_transaction: bool) -> Result<Snapshot, EngineError> {
        let Some(schema) = self.inspect_schema.as_deref() else {
            // No current schema at connect: nothing can have been created "here".
            return Ok(Snapshot::default());
        };
        let context = format!("inspecting the schema {}", quote_double(schema));
        let set_path = format!("SET LOCAL search_path TO {}", quote_double(schema));
        let prelude = if in_transaction { set_path } else { format!("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; {set_path}") };
        let schema_param = schema.to_string();
        let params: [(&(dyn ToSql + Sync), Type); 2] = [(&schema_param, Type::TEXT), (&self.own_tables, Type::TEXT_ARRAY)];
        let columns_sql = format!("{INSPECT_TABLES} {INSPECT_COLUMNS}");
        let indexes_sql = format!("{INSPECT_TABLES} {INSPECT_INDEXES}");
        let constraints_sql = format!("{INSPECT_TABLES} {INSPECT_CONSTRAINTS}");
        let client = &self.client;
        // `join!` polls in order, and each request goes on the wire at its first
        // poll: one round trip for the whole inspection.
        let (begun, columns, indexes, constraints, ended) = futures::join!(
            client.batch_execute(&prelude),
            client.query_typed(&columns_sql, &params),
            client.query_typed(&indexes_sql, &params),
            client.query_typed(&constraints_sql, &params),
            async {
                if in_transaction {
                    Ok(())
                } else {
                    client.batch_execute("COMMIT").await
                }
            },
        );
        let fail = |e: tokio_postgres::Error| self.engine_error(&context, &e);
        begun.map_err(fail)?;
        let (columns, indexes, constraints) = (columns.map_err(fail)?, indexes.map_err(fail)?, constraints.map_err(fail)?);
        ended.map_err(fail)?;
        let bad_row = |e: tokio_postgres::Error| EngineError::Query { context: context.clone(), message: format!("unexpected catalog row: {e}") };

        let mut snapshot = Snapshot::default();
        // Table oid → name, and (table oid, column number) → column name, to name
        // the columns of constraints.
        let mut table_names: HashMap<u32, String> = HashMap::new();
        let mut column_names: HashMap<(u32, i16), String> = HashMap::new();
        for r in columns {
            let oid: u32 = r.try_get(0).map_err(bad_row)?;
            let table: String = r.try_get(1).map_err(bad_row)?;
            // Every table gets an entry, also one without columns (`CREATE TABLE t ()`).
            let object = snapshot.objects.entry(table.clone()).or_default();
            table_names.insert(oid, table);
            let column: Option<String> = r.try_get(3).map_err(bad_row)?;
            if let Some(column) = column {
                let number: i16 = r.try_get(2).map_err(bad_row)?;
                let data_type: String = r.try_get(4).map_err(bad_row)?;
                let nullable: bool = r.try_get(5).map_err(bad_row)?;
                column_names.insert((oid, number), column.clone());
                object.columns.insert(column, ColumnInfo { data_type, nullable });
            }
        }
        for r in indexes {
            let table: String = r.try_get(0).map_err(bad_row)?;
            let name: String = r.try_get(1).map_err(bad_row)?;
            let row = IndexRow {
                unique: r.try_get(2).map_err(bad_row)?,
                method: r.try_get(3).map_err(bad_row)?,
                keys: r.try_get(4).map_err(bad_row)?,
                decorations: r.try_get(5).map_err(bad_row)?,
                include: r.try_get(6).map_err(bad_row)?,
                nulls_not_distinct: r.try_get(7).map_err(bad_row)?,
                predicate: r.try_get(8).map_err(bad_row)?,
                valid: r.try_get(9).map_err(bad_row)?,
            };
            snapshot.objects.entry(table).or_default().indexes.insert(name, row.into_info());
        }
        for r in constraints {
            let table: String = r.try_get(0).map_err(bad_row)?;
            let name: String = r.try_get(1).map_err(bad_row)?;
            let oid: u32 = r.try_get(18).map_err(bad_row)?;
            let names = |rel: u32, numbers: &[i16]| -> Vec<String> {
                numbers.iter().map(|n| column_names.get(&(rel, *n)).cloned().unwrap_or_else(|| format!("#{n}"))).collect()
            };
            let conkey: Option<Vec<i16>> = r.try_get(3).map_err(bad_row)?;
            let ref_oid: u32 = r.try_get(4).map_err(bad_row)?;
            let confkey: Option<Vec<i16>> = r.try_get(5).map_err(bad_row)?;
            let index_key: Option<Vec<i16>> = r.try_get(13).map_err(bad_row)?;
            let index_key_count: Option<i16> = r.try_get(14).map_err(bad_row)?;
            let foreign_table: Option<String> = r.try_get(16).map_err(bad_row)?;
            let foreign_columns: Option<Vec<String>> = r.try_get(17).map_err(bad_row)?;
            let include = match (index_key, index_key_count) {
                (Some(k), Some(n)) => names(oid, k.get(n.max(0) as usize..).unwrap_or(&[])),
                _ => Vec::new(),
            };
            let (ref_table, ref_columns) = match foreign_table {
                Some(t) => (Some(t), foreign_columns.unwrap_or_default()),
                None => (table_names.get(&ref_oid).cloned(), names(ref_oid, confkey.as_deref().unwrap_or(&[]))),
            };
            let row = ConstraintRow {
                kind: r.try_get(2).map_err(bad_row)?,
                columns: names(oid, conkey.as_deref().unwrap_or(&[])),
                ref_table,
                ref_columns,
                on_update: r.try_get(6).map_err(bad_row)?,
                on_delete: r.try_get(7).map_err(bad_row)?,
                match_type: r.try_get(8).map_err(bad_row)?,
                deferrable: r.try_get(9).map_err(bad_row)?,
                deferred: r.try_get(10).map_err(bad_row)?,
                validated: r.try_get(11).map_err(bad_row)?,
                definition: r.try_get(12).map_err(bad_row)?,
                include,
                nulls_not_distinct: r.try_get(15).map_err(bad_row)?,
            };
            if let Some(info) = row.into_info() {
                snapshot.objects.entry(table).or_default().constraints.insert(name, info);
            }
        }
        Ok(snapshot)
    }

    /// `CREATE TABLE` for the snapshot table, tolerating a concurrent creator.
    async fn create_snapshot_table(&self) -> Result<(), EngineError> {
        let ddl = format!("CREATE TABLE IF NOT EXISTS {} ({SNAPSHOT_COLUMNS})", self.snapshot_table);
        match self.client.batch_execute(&ddl).await {
            // Two sessions creating it at once: the loser sees a catalog unique violation; it exists now.
            Err(e) if !e.as_db_error().is_some_and(|d| matches!(d.code().code(), "23505" | "42P07")) => {
                Err(self.engine_error(&format!("creating the snapshot table {}", self.snapshot_table), &e))
            }
            _ => Ok(()),
        }
    }
}

#[async_trait]
impl Backend for PgBackend {
    fn capabilities(&self) -> Capabilities {
        Capabilities { engine: "postgres", transactional_ddl: true, kind: Kind::Sql }
    }

    fn target(&self) -> String {
        self.target.clone()
    }

    async fn try_lock(&mut self) -> Result<bool, EngineError> {
        // A session advisory lock is re-entrant and counted; taking it once per
        // backend keeps one unlock enough to release it.
        if self.locked {
            // Already ours, as far as this backend knows; make sure the session
            // still has it (the connection may have died, or a migration may have
            // run pg_advisory_unlock_all()) rather than trusting the flag.
            let k = self.lock_key as u64;
            let (hi, lo) = ((k >> 32) as u32, (k & 0xffff_ffff) as u32);
            let held: bool = self
                .client
                .query_typed_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid() \
                     AND classid = $1 AND objid = $2 AND objsubid = 1)",
                    &[(&hi, Type::OID), (&lo, Type::OID)],
                )
                .await
                .and_then(|r| r.try_get(0))
                .map_err(|e| self.engine_error("checking the migration lock", &e))?;
            if held {
                return Ok(true);
            }
            self.locked = false;
        }
        let row = self
            .client
            .query_typed_one("SELECT pg_try_advisory_lock($1)", &[(&self.lock_key, Type::INT8)])
            .await
            .map_err(|e| self.engine_error("taking the migration lock (pg_try_advisory_lock)", &e))?;
        let got: bool = row.try_get(0).map_err(|e| self.engine_error("reading pg_try_advisory_lock", &e))?;
        self.locked = got;
        Ok(got)
    }

    async fn lock_holder(&mut self) -> Option<String> {
        // A bigint advisory key shows in pg_locks as classid = high 32 bits,
        // objid = low 32 bits, objsubid = 1.
        let k = self.lock_key as u64;
        let (hi, lo) = ((k >> 32) as u32, (k & 0xffff_ffff) as u32);
        let sql = "SELECT a.pid, a.application_name, host(a.client_addr), a.usename::text, \
                   to_char(a.backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') \
                   FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                   WHERE l.locktype = 'advisory' AND l.granted AND l.classid = $1 AND l.objid = $2 AND l.objsubid = 1 \
                   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                   AND a.pid <> pg_backend_pid() LIMIT 1";
        let row = self.client.query_typed_opt(sql, &[(&hi, Type::OID), (&lo, Type::OID)]).await.ok()??;
        let pid: i32 = row.try_get(0).ok()?;
        let app: Option<String> = row.try_get(1).ok()?;
        let addr: Option<String> = row.try_get(2).ok()?;
        let user: Option<String> = row.try_get(3).ok()?;
        let since: Option<String> = row.try_get(4).ok()?;
        let mut s = match app.filter(|a| !a.is_empty()) {
            Some(a) => format!("{a}, server pid {pid}"),
            None => format!("server pid {pid}"),
        };
        if let Some(u) = user {
            let _ = write!(s, ", user {u}");
        }
        let _ = write!(s, ", from {}", addr.as_deref().unwrap_or("a local socket"));
        if let Some(t) = since {
            let _ = write!(s, ", connected since {t} UTC");
        }
        Some(s)
    }

    async fn unlock(&mut self) -> Result<(), EngineError> {
        if !self.locked {
            return Ok(());
        }
        self.client
            .query_typed("SELECT pg_advisory_unlock($1)", &[(&self.lock_key, Type::INT8)])
            .await
            .map_err(|e| self.engine_error("releasing the migration lock (pg_advisory_unlock)", &e))?;
        self.locked = false;
        Ok(())
    }

    async fn ensure_history(&mut self) -> Result<(), EngineError> {
        let context = format!("creating the history table {}", self.history);
        let schema = self.schema.clone();
        for attempt in 0..2 {
            let row = self
                .client
                .query_typed_one(
                    "SELECT to_regclass($1) IS NOT NULL, to_regclass($2) IS NOT NULL, \
                     $3::text IS NULL OR EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $3::text), to_regclass($4) IS NOT NULL",
                    &[(&self.history, Type::TEXT), (&self.log_table, Type::TEXT), (&schema, Type::TEXT), (&self.snapshot_table, Type::TEXT)],
                )
                .await
                .map_err(|e| self.engine_error(&context, &e))?;
            let (has_history, has_log, has_schema, has_snapshot): (bool, bool, bool, bool) = (row.get(0), row.get(1), row.get(2), row.get(3));
            if has_history && has_log && has_snapshot {
                return Ok(());
            }
            let mut ddl = String::new();
            if let (Some(s), false) = (&schema, has_schema) {
                // Only when missing: CREATE SCHEMA IF NOT EXISTS still needs the
                // CREATE privilege on the database, which a tenant role may lack.
                let _ = write!(ddl, "CREATE SCHEMA IF NOT EXISTS {};", quote_double(s));
            }
            let _ = write!(
                ddl,
                "CREATE TABLE IF NOT EXISTS {} (version BIGINT PRIMARY KEY, description TEXT NOT NULL, script TEXT NOT NULL, \
                 migration_group TEXT, checksum TEXT NOT NULL, state TEXT NOT NULL, batch BIGINT NOT NULL, applied_at TIMESTAMPTZ NOT NULL, \
                 duration_ms BIGINT NOT NULL, applied_by TEXT NOT NULL, kiln_version TEXT NOT NULL, error TEXT, error_statement INTEGER, error_line INTEGER);\
                 CREATE TABLE IF NOT EXISTS {} (id BIGSERIAL PRIMARY KEY, at TIMESTAMPTZ NOT NULL, event TEXT NOT NULL, version BIGINT, \
                 name TEXT, batch BIGINT, actor TEXT NOT NULL, reason TEXT, detail TEXT);\
                 CREATE TABLE IF NOT EXISTS {} ({SNAPSHOT_COLUMNS});",
                self.history, self.log_table, self.snapshot_table
            );
            match self.client.batch_execute(&ddl).await {
                Ok(()) => return Ok(()),
                // Two sessions creating the same table at once: one of them gets a
                // unique violation on the catalog. Look again; it now exists.
                Err(e) if attempt == 0 && e.as_db_error().is_some_and(|d| matches!(d.code().code(), "23505" | "42P07" | "42P06")) => continue,
                Err(e) => return Err(self.engine_error(&context, &e)),
            }
        }
        Ok(())
    }

    async fn read_history(&mut self) -> Result<Option<Vec<AppliedMigration>>, EngineError> {
        let context = format!("reading the history table {}", self.history);
        // Both queries go out in one round trip (tokio-postgres pipelines them);
        // on a database kiln never touched the second fails and is ignored.
        let sql = format!("SELECT {HISTORY_COLUMNS} FROM {} ORDER BY version", self.history);
        let params = [(&self.history as &(dyn tokio_postgres::types::ToSql + Sync), Type::TEXT)];
        let (exists, rows) = futures::join!(
            self.client.query_typed_one("SELECT to_regclass($1) IS NOT NULL", &params),
            self.client.query_typed(&sql, &[])
        );
        let exists: bool = exists.and_then(|r| r.try_get(0)).map_err(|e| self.engine_error(&context, &e))?;
        if !exists {
            return Ok(None);
        }
        let rows = rows.map_err(|e| self.engine_error(&context, &e))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let raw = (|| -> Result<RawHistoryRow, tokio_postgres::Error> {
                Ok(RawHistoryRow {
                    version: r.try_get(0)?,
                    description: r.try_get(1)?,
                    script: r.try_get(2)?,
                    group: r.try_get(3)?,
                    checksum: r.try_get(4)?,
                    state: r.try_get(5)?,
                    batch: r.try_get(6)?,
                    applied_at: r.try_get(7)?,
                    duration_ms: r.try_get(8)?,
                    applied_by: r.try_get(9)?,
                    kiln_version: r.try_get(10)?,
                    error: r.try_get(11)?,
                    error_statement: r.try_get::<_, Option<i32>>(12)?.map(i64::from),
                    error_line: r.try_get::<_, Option<i32>>(13)?.map(i64::from),
                })
            })()
            .map_err(|e| EngineError::Query {
                context: context.clone(),
                message: format!("{} does not have the columns kiln expects: {e}", self.history_raw),
            })?;
            out.push(raw.into_applied());
        }
        Ok(Some(out))
    }

    async fn apply(&mut self, m: &Migration, ctx: &RecordContext) -> Result<(), StepError> {
        self.run(m, &m.up, ctx, Direction::Up).await
    }

    async fn revert(&mut self, m: &Migration, _applied: &AppliedMigration, ctx: &RecordContext) -> Result<(), StepError> {
        let Some(down) = &m.down else {
            return Err(StepError::Engine(EngineError::Unsupported(format!(
                "{} has no down section, so it cannot be reverted",
                m.display_path()
            ))));
        };
        self.run(m, down, ctx, Direction::Down).await
    }

    /// Inside the migration's transaction when it has one: the body and the
    /// history row run as in [`Backend::apply`] but without `COMMIT`; `check`
    /// sees the schema the transaction would commit, and its violations roll
    /// the whole migration back ([`FailureOutcome::RolledBack`]: nothing of it
    /// remains, no history row). Costs two round trips more than `apply`
    /// (inspection, then `COMMIT`/`ROLLBACK`).
    ///
    /// `-- kiln:transaction off` migrations have no transaction to roll back:
    /// they are applied, then checked, and on violations their history entry
    /// is recorded as `failed` ([`FailureOutcome::RecordedFailed`]), which
    /// blocks the next run until `kiln repair`.
    ///
    /// The `failed` event with the violations is logged by the runner.
    async fn apply_checked(&mut self, m: &Migration, ctx: &RecordContext, check: &SchemaCheck) -> Result<(), StepError> {
        if m.directives.transaction != TxMode::Off {
            return self.run_transactional(m, &m.up, ctx, Direction::Up, Some(check)).await;
        }
        self.run_autocommit(m, &m.up, ctx, Direction::Up).await?;
        let violations = check(&self.inspect_in(false).await?);
        if violations.is_empty() {
            return Ok(());
        }
        let message = format!(
            "schema validation failed after this migration, which ran outside a transaction and could not be rolled back: {}; \
             fix the schema, then run `kiln repair {}`",
            violations.iter().map(|v| v.to_string()).collect::<Vec<_>>().join("; "),
            m.version
        );
        let version = m.version.number as i64;
        let sql = format!("UPDATE {} SET state = 'failed', error = $2, error_statement = NULL, error_line = NULL WHERE version = $1", self.history);
        self.client
            .execute_typed(&sql, &[(&version, Type::INT8), (&message, Type::TEXT)])
            .await
            .map_err(|e| self.engine_error(&format!("recording {} as failed after schema validation", m.name()), &e))?;
        Err(StepError::Invalid { violations, outcome: FailureOutcome::RecordedFailed })
    }

    /// Every table of the schema — the configured `schema`, else the session's
    /// current schema at connect — except kiln's own and those an extension
    /// owns: columns (`format_type`, lower-cased), indexes, and primary key,
    /// unique, foreign key, check and exclusion constraints. One pipelined
    /// round trip of three catalog queries, whatever the number of tables.
    async fn inspect(&mut self) -> Result<Snapshot, EngineError> {
        self.inspect_in(false).await
    }

    /// Appends a row to the snapshot table (created here when a database from
    /// before snapshots lacks it); earlier snapshots are kept as history.
    async fn save_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), EngineError> {
        let context = format!("writing the schema snapshot to {}", self.snapshot_table);
        let json = serde_json::to_string(snapshot).map_err(|e| EngineError::Query { context: context.clone(), message: e.to_string() })?;
        let sql = format!("INSERT INTO {} (taken_at, snapshot) VALUES (clock_timestamp(), $1)", self.snapshot_table);
        for attempt in 0..2 {
            match self.client.execute_typed(&sql, &[(&json, Type::TEXT)]).await {
                Ok(_) => return Ok(()),
                Err(e) if attempt == 0 && e.as_db_error().is_some_and(|d| d.code().code() == "42P01") => self.create_snapshot_table().await?,
                Err(e) => return Err(self.engine_error(&context, &e)),
            }
        }
        Ok(())
    }

    /// The newest stored snapshot; `None` when there is none or no snapshot
    /// table (or schema) at all. Creates nothing.
    async fn load_snapshot(&mut self) -> Result<Option<Snapshot>, EngineError> {
        let context = format!("reading the schema snapshot from {}", self.snapshot_table);
        let sql = format!("SELECT snapshot FROM {} ORDER BY id DESC LIMIT 1", self.snapshot_table);
        // Asking first whether the table exists would cost a round trip on
        // every `kiln check`; a missing table or schema is an answer too.
        let row = match self.client.query_typed_opt(&sql, &[]).await {
            Ok(row) => row,
            Err(e) if e.as_db_error().is_some_and(|d| matches!(d.code().code(), "42P01" | "3F000")) => return Ok(None),
            Err(e) => return Err(self.engine_error(&context, &e)),
        };
        let Some(row) = row else { return Ok(None) };
        let text: String = row.try_get(0).map_err(|e| self.engine_error(&context, &e))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| EngineError::Query { context, message: format!("the stored snapshot is not a kiln snapshot: {e}") })
    }

    /// `CREATE DATABASE "<name>"` on this server; returns this backend's URL
    /// with the database replaced (everything else, password included, kept:
    /// the URL is for connecting, and is only shown redacted). Only names
    /// [`Backend::drop_scratch`] accepts are created, so kiln never makes a
    /// database it then refuses to drop.
    async fn create_scratch(&mut self, name: &str) -> Result<String, EngineError> {
        check_scratch_name(name)?;
        let url = database_url(&self.url, name).map_err(|message| EngineError::BadUrl { url: redact(&self.url), message })?;
        self.client.batch_execute(&format!("CREATE DATABASE {}", quote_double(name))).await.map_err(|e| {
            let mut err = self.engine_error(&format!("creating the scratch database {name}"), &e);
            if let EngineError::Query { message, .. } = &mut err {
                if e.as_db_error().is_some_and(|d| d.code().code() == "42501") {
                    message.push_str(" (the role needs CREATEDB; or give `kiln verify` an empty database with --scratch-url)");
                }
            }
            err
        })?;
        Ok(url)
    }

    /// `DROP DATABASE IF EXISTS "<name>" WITH (FORCE)`, ending sessions still
    /// connected to it. Refuses any name that `kiln verify` does not make
    /// (`kiln_verify_…`), so a wrong argument can never drop a real database.
    async fn drop_scratch(&mut self, name: &str) -> Result<(), EngineError> {
        check_scratch_name(name)?;
        let context = format!("dropping the scratch database {name}");
        let force = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_double(name));
        match self.client.batch_execute(&force).await {
            Ok(()) => Ok(()),
            // `WITH (FORCE)` is PostgreSQL 13+; older servers drop without it.
            Err(e) if e.as_db_error().is_some_and(|d| d.code().code() == "42601") => self
                .client
                .batch_execute(&format!("DROP DATABASE IF EXISTS {}", quote_double(name)))
                .await
                .map_err(|e| self.engine_error(&context, &e)),
            Err(e) => Err(self.engine_error(&context, &e)),
        }
    }

    async fn upsert_history(&mut self, entries: &[AppliedMigration]) -> Result<(), EngineError> {
        if entries.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "INSERT INTO {} ({HISTORY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
             ON CONFLICT (version) DO UPDATE SET description = EXCLUDED.description, script = EXCLUDED.script, \
             migration_group = EXCLUDED.migration_group, checksum = EXCLUDED.checksum, state = EXCLUDED.state, batch = EXCLUDED.batch, \
             applied_at = EXCLUDED.applied_at, duration_ms = EXCLUDED.duration_ms, applied_by = EXCLUDED.applied_by, \
             kiln_version = EXCLUDED.kiln_version, error = EXCLUDED.error, error_statement = EXCLUDED.error_statement, error_line = EXCLUDED.error_line",
            self.history
        );
        struct Vals {
            version: i64,
            state: &'static str,
            error: Option<String>,
            statement: Option<i32>,
            line: Option<i32>,
        }
        let vals: Vec<Vals> = entries
            .iter()
            .map(|a| Vals {
                version: a.version.number as i64,
                state: a.state.as_str(),
                error: a.error.as_ref().map(|f| f.message.clone()),
                statement: a.error.as_ref().and_then(|f| f.statement).map(|v| v as i32),
                line: a.error.as_ref().and_then(|f| f.line).map(|v| v as i32),
            })
            .collect();
        let mut items: Vec<(Tag, Item<'_>)> = vec![(Tag::Prelude, Item::Simple("BEGIN"))];
        for (a, v) in entries.iter().zip(&vals) {
            items.push((
                Tag::Record,
                Item::Typed(
                    &sql,
                    vec![
                        (&v.version, Type::INT8),
                        (&a.description, Type::TEXT),
                        (&a.script, Type::TEXT),
                        (&a.group, Type::TEXT),
                        (&a.checksum.0, Type::TEXT),
                        (&v.state, Type::TEXT),
                        (&a.batch, Type::INT8),
                        (&a.applied_at, Type::TIMESTAMPTZ),
                        (&a.duration_ms, Type::INT8),
                        (&a.applied_by, Type::TEXT),
                        (&a.kiln_version, Type::TEXT),
                        (&v.error, Type::TEXT),
                        (&v.statement, Type::INT4),
                        (&v.line, Type::INT4),
                    ],
                ),
            ));
        }
        items.push((Tag::Commit, Item::Simple("COMMIT")));
        run_items(&self.client, &items, true)
            .await
            .map_err(|(_, e)| self.engine_error(&format!("writing the history table {}", self.history), &e))
    }

    async fn delete_history(&mut self, version: u64) -> Result<(), EngineError> {
        let v = version as i64;
        self.client
            .execute_typed(&format!("DELETE FROM {} WHERE version = $1", self.history), &[(&v, Type::INT8)])
            .await
            .map_err(|e| self.engine_error(&format!("deleting version {version} from the history table {}", self.history), &e))?;
        Ok(())
    }

    async fn log(&mut self, entry: &LogEntry) -> Result<(), EngineError> {
        // synchronous_commit is forced on here whatever the session default: this
        // commit's WAL flush is what makes the run's earlier (asynchronous)
        // migration commits durable. See the module documentation.
        let sql = format!("INSERT INTO {} ({LOG_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)", self.log_table);
        let version = entry.version.map(|v| v as i64);
        let items = [
            (Tag::Prelude, Item::Simple("BEGIN; SET LOCAL synchronous_commit TO on")),
            (
                Tag::Record,
                Item::Typed(
                    &sql,
                    vec![
                        (&entry.at, Type::TIMESTAMPTZ),
                        (&entry.event, Type::TEXT),
                        (&version, Type::INT8),
                        (&entry.name, Type::TEXT),
                        (&entry.batch, Type::INT8),
                        (&entry.actor, Type::TEXT),
                        (&entry.reason, Type::TEXT),
                        (&entry.detail, Type::TEXT),
                    ],
                ),
            ),
            (Tag::Commit, Item::Simple("COMMIT")),
        ];
        run_items(&self.client, &items, true)
            .await
            .map_err(|(_, e)| self.engine_error(&format!("writing the event log {}", self.log_table), &e))
    }

    async fn close(self: Box<Self>) -> Result<(), EngineError> {
        let PgBackend { client, conn_task, .. } = *self;
        // Dropping the client makes the connection send Terminate and finish.
        drop(client);
        let _ = conn_task.await;
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Schema inspection, snapshots, scratch databases.

/// Columns of the snapshot table: one row per stored snapshot, the newest is
/// the reference for drift; older rows are the schema's history.
const SNAPSHOT_COLUMNS: &str = "id BIGSERIAL PRIMARY KEY, taken_at TIMESTAMPTZ NOT NULL, snapshot TEXT NOT NULL";

/// The tables [`Backend::inspect`] reports, as a CTE the three catalog queries
/// share (`$1` the schema, `$2` kiln's own table names): ordinary and
/// partitioned tables (partitions included: they are tables a migration
/// made), not views or foreign tables; not kiln's own; and not tables an
/// extension owns (`CREATE EXTENSION postgis` brings `spatial_ref_sys`, which
/// `ALTER EXTENSION … UPDATE` may change — that is not drift of the schema).
const INSPECT_TABLES: &str = "WITH t AS (\
    SELECT c.oid, c.relname::text AS name FROM pg_catalog.pg_class c \
    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
    WHERE n.nspname::text = $1 AND c.relkind IN ('r', 'p') AND c.relname::text <> ALL ($2::text[]) \
    AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d \
        WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e'))";

/// One row per column, and one with NULLs for a table without columns. The
/// table's oid and the column's number let constraints be resolved to column
/// names here instead of by a sub-query per constraint on the server.
const INSPECT_COLUMNS: &str = "SELECT t.oid, t.name, a.attnum, a.attname::text, lower(pg_catalog.format_type(a.atttypid, a.atttypmod)), NOT a.attnotnull \
    FROM t LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = t.oid AND a.attnum > 0 AND NOT a.attisdropped";

/// One row per index that backs no constraint.
///
/// Indexes behind a primary key, unique or exclusion constraint are reported
/// as the constraint only. The constraint is what the schema declares (`UNIQUE`
/// in `CREATE TABLE`, `ADD CONSTRAINT`): it is dropped with `DROP CONSTRAINT`
/// (`DROP INDEX` on it fails), foreign keys depend on it, and listing both
/// would show one change twice in `kiln diff`. A contract loses nothing:
/// `unique:` and `indexes:` are satisfied by a matching constraint as well as
/// by an index, by name or by columns. A `CREATE UNIQUE INDEX` without a
/// constraint stays an index with `unique: true`.
///
/// Key columns are the column names, or the expression text; ordering,
/// non-default operator classes, `INCLUDE` columns, `NULLS NOT DISTINCT`, the
/// access method when not btree, a partial predicate and an invalid index (a
/// failed `CREATE INDEX CONCURRENTLY`) go to `options`. `indnullsnotdistinct`
/// is read through `to_jsonb` so the query also runs on servers before 15
/// (only for unique indexes, where it means something: `to_jsonb` of a whole
/// `pg_index` row is not free).
const INSPECT_INDEXES: &str = "SELECT t.name, ic.relname::text, ix.indisunique, am.amname::text, \
    ARRAY(SELECT coalesce(CASE WHEN ix.indkey[k - 1] = 0 THEN pg_catalog.pg_get_indexdef(ix.indexrelid, k, true) \
            ELSE (SELECT a.attname::text FROM pg_catalog.pg_attribute a WHERE a.attrelid = ix.indrelid AND a.attnum = ix.indkey[k - 1]) END, '') \
        FROM generate_series(1, ix.indnkeyatts) k ORDER BY k), \
    ARRAY(SELECT concat_ws(' ', CASE WHEN o.opcdefault THEN NULL ELSE o.opcname::text END, \
            CASE ix.indoption[k - 1] & 3 WHEN 1 THEN 'desc nulls last' WHEN 2 THEN 'nulls first' WHEN 3 THEN 'desc' END) \
        FROM generate_series(1, ix.indnkeyatts) k LEFT JOIN pg_catalog.pg_opclass o ON o.oid = ix.indclass[k - 1] ORDER BY k), \
    ARRAY(SELECT a.attname::text FROM generate_series(ix.indnkeyatts + 1, ix.indnatts) k \
        JOIN pg_catalog.pg_attribute a ON a.attrelid = ix.indrelid AND a.attnum = ix.indkey[k - 1] ORDER BY k), \
    CASE WHEN ix.indisunique THEN coalesce((to_jsonb(ix) ->> 'indnullsnotdistinct')::boolean, false) ELSE false END, \
    pg_catalog.pg_get_expr(ix.indpred, ix.indrelid, true), \
    ix.indisvalid \
    FROM t JOIN pg_catalog.pg_index ix ON ix.indrelid = t.oid \
    JOIN pg_catalog.pg_class ic ON ic.oid = ix.indexrelid \
    JOIN pg_catalog.pg_am am ON am.oid = ic.relam \
    WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint con \
        WHERE con.conindid = ix.indexrelid AND con.conrelid = ix.indrelid AND con.contype IN ('p', 'u', 'x'))";

/// One row per primary key, unique, foreign key, check and exclusion
/// constraint (not the NOT NULL constraints of PostgreSQL 18: nullability is
/// on the column). Columns come as numbers (`conkey`, `confkey`, the backing
/// index's `indkey` for `INCLUDE` columns), named from [`INSPECT_COLUMNS`]'s
/// rows: a sub-query per constraint for the names doubled the time of this
/// query on 1,000 tables. Only a foreign key to a table outside the inspected
/// ones (another schema) gets that table's name and columns from the server.
/// Only checks and exclusions are deparsed (`pg_get_constraintdef`); the other
/// kinds are described from the catalog columns.
const INSPECT_CONSTRAINTS: &str = "SELECT t.name, con.conname::text, con.contype::text, con.conkey, con.confrelid, con.confkey, \
    con.confupdtype::text, con.confdeltype::text, con.confmatchtype::text, con.condeferrable, con.condeferred, con.convalidated, \
    CASE WHEN con.contype IN ('c', 'x') THEN pg_catalog.pg_get_constraintdef(con.oid, true) END, \
    i.indkey::int2[], i.indnkeyatts, CASE WHEN con.contype = 'u' THEN coalesce((to_jsonb(i) ->> 'indnullsnotdistinct')::boolean, false) ELSE false END, \
    CASE WHEN con.contype = 'f' AND con.confrelid NOT IN (SELECT oid FROM t) THEN \
        (SELECT CASE WHEN rn.nspname::text = $1 THEN rc.relname::text ELSE rn.nspname::text || '.' || rc.relname::text END \
            FROM pg_catalog.pg_class rc JOIN pg_catalog.pg_namespace rn ON rn.oid = rc.relnamespace WHERE rc.oid = con.confrelid) END, \
    CASE WHEN con.contype = 'f' AND con.confrelid NOT IN (SELECT oid FROM t) THEN \
        ARRAY(SELECT a.attname::text FROM unnest(con.confkey) WITH ORDINALITY k(num, ord) \
            JOIN pg_catalog.pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.num ORDER BY k.ord) END, \
    con.conrelid \
    FROM t JOIN pg_catalog.pg_constraint con ON con.conrelid = t.oid \
    LEFT JOIN pg_catalog.pg_index i ON i.indexrelid = con.conindid AND con.contype IN ('p', 'u') \
    WHERE con.contype IN ('p', 'u', 'f', 'c', 'x')";

/// An index as [`INSPECT_INDEXES`] returns it.
struct IndexRow {
    unique: bool,
    method: String,
    keys: Vec<String>,
    /// Per key column: operator class and ordering when not the default, or empty.
    decorations: Vec<String>,
    include: Vec<String>,
    nulls_not_distinct: bool,
    predicate: Option<String>,
    valid: bool,
}

impl IndexRow {
    fn into_info(self) -> IndexInfo {
        let mut options = Vec::new();
        if self.method != "btree" {
            options.push(format!("using {}", self.method));
        }
        if self.decorations.iter().any(|d| !d.is_empty()) {
            let keys: Vec<String> =
                self.keys.iter().zip(&self.decorations).map(|(k, d)| if d.is_empty() { k.clone() } else { format!("{k} {d}") }).collect();
            options.push(format!("keys ({})", keys.join(", ")));
        }
        if !self.include.is_empty() {
            options.push(format!("include ({})", self.include.join(", ")));
        }
        if self.nulls_not_distinct {
            options.push("nulls not distinct".into());
        }
        if let Some(p) = self.predicate {
            options.push(format!("where {p}"));
        }
        if !self.valid {
            options.push("invalid".into());
        }
        IndexInfo { columns: self.keys, unique: self.unique, options: (!options.is_empty()).then(|| options.join(" ")) }
    }
}

/// A constraint as [`INSPECT_CONSTRAINTS`] returns it.
struct ConstraintRow {
    kind: String,
    columns: Vec<String>,
    ref_table: Option<String>,
    ref_columns: Vec<String>,
    on_update: String,
    on_delete: String,
    match_type: String,
    deferrable: bool,
    deferred: bool,
    validated: bool,
    /// `pg_get_constraintdef`, for checks and exclusions only: the other kinds
    /// are described from the catalog columns, and deparsing every
    /// constraint would be most of the query's time on a large schema.
    definition: Option<String>,
    include: Vec<String>,
    nulls_not_distinct: bool,
}

impl ConstraintRow {
    /// `None` for a constraint kind the snapshot does not model.
    fn into_info(self) -> Option<ConstraintInfo> {
        let mut extra = Vec::new();
        let kind = match self.kind.as_str() {
            "p" | "u" => {
                if self.nulls_not_distinct {
                    extra.push("nulls not distinct".to_string());
                }
                if !self.include.is_empty() {
                    extra.push(format!("include ({})", self.include.join(", ")));
                }
                if self.kind == "p" {
                    "primary key"
                } else {
                    "unique"
                }
            }
            "f" => {
                extra.push(format!(
                    "references {} ({}) on update {} on delete {}",
                    self.ref_table.as_deref().unwrap_or("?"),
                    self.ref_columns.join(", "),
                    fk_action(&self.on_update),
                    fk_action(&self.on_delete)
                ));
                match self.match_type.as_str() {
                    "f" => extra.push("match full".into()),
                    "p" => extra.push("match partial".into()),
                    _ => {}
                }
                "foreign key"
            }
            // The server's own text says it all (NOT VALID, NO INHERIT, DEFERRABLE included).
            "c" => return Some(ConstraintInfo { kind: "check".into(), columns: self.columns, definition: self.definition }),
            "x" => return Some(ConstraintInfo { kind: "exclude".into(), columns: self.columns, definition: self.definition }),
            _ => return None,
        };
        match (self.deferrable, self.deferred) {
            (true, true) => extra.push("deferrable initially deferred".into()),
            (true, false) => extra.push("deferrable".into()),
            _ => {}
        }
        if !self.validated {
            extra.push("not valid".into());
        }
        Some(ConstraintInfo { kind: kind.into(), columns: self.columns, definition: (!extra.is_empty()).then(|| extra.join(" ")) })
    }
}

/// `pg_constraint.confupdtype` / `confdeltype` in words.
fn fk_action(code: &str) -> &'static str {
    match code {
        "r" => "restrict",
        "c" => "cascade",
        "n" => "set null",
        "d" => "set default",
        _ => "no action",
    }
}

/// Scratch databases are named `kiln_verify_…` by `kiln verify`. Anything else
/// is refused, so neither a typo nor a caller's bug can create or drop a real
/// database; plain ASCII and at most 63 bytes, so PostgreSQL neither needs
/// quoting rules nor silently truncates the name.
fn check_scratch_name(name: &str) -> Result<(), EngineError> {
    crate::common::check_scratch_name(name, 63)
}

/// `url` naming database `name` instead: the path replaced (and a `dbname`
/// query parameter, which would override it), everything else kept as
/// written. Works on the text, like [`split_tls_params`], because multi-host
/// URLs (`h1:5432,h2:5433`) are not URLs the `url` crate accepts.
fn database_url(url: &str, name: &str) -> Result<String, String> {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return Err("the scratch database needs a postgres:// URL".into());
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let after = &rest[authority_end..];
    let query_start = after.find(['?', '#']).unwrap_or(after.len());
    let tail = &after[query_start..];
    let (query, fragment) = match tail.find('#') {
        Some(i) => (&tail[..i], &tail[i..]),
        None => (tail, ""),
    };
    let query = match query.strip_prefix('?') {
        Some(q) => {
            let pairs: Vec<String> = q
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| if p.split('=').next() == Some("dbname") { format!("dbname={name}") } else { p.to_string() })
                .collect();
            if pairs.is_empty() {
                String::new()
            } else {
                format!("?{}", pairs.join("&"))
            }
        }
        None => String::new(),
    };
    Ok(format!("{}/{name}{query}{fragment}", &url[..scheme_end + authority_end]))
}

// ---------------------------------------------------------------------------
// Running requests: pipelined or one by one.

/// What a request of a migration's pipeline is, to interpret its error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tag {
    /// `BEGIN` and session settings.
    Prelude,
    /// Body statement (0-based index into the body).
    Statement(usize),
    /// kiln's own history / event-log writes.
    Record,
    /// The final `COMMIT`.
    Commit,
}

/// One request: simple-query text, or a statement with typed bound parameters
/// (sent as Parse/Bind/Execute/Sync at once, so it needs no prepare round trip
/// and can be pipelined).
/// The bound values of [`PgBackend::insert_log_sql`] for one migration's event.
fn log_params<'a>(
    event: &'a &'a str,
    version: &'a i64,
    m: &'a Migration,
    ctx: &'a RecordContext,
    detail: &'a String,
) -> Vec<(&'a (dyn ToSql + Sync), Type)> {
    vec![
        (event, Type::TEXT),
        (version, Type::INT8),
        (&m.description, Type::TEXT),
        (&ctx.batch, Type::INT8),
        (&ctx.actor, Type::TEXT),
        (detail, Type::TEXT),
    ]
}

enum Item<'a> {
    Simple(&'a str),
    Typed(&'a str, Vec<(&'a (dyn ToSql + Sync), Type)>),
}

async fn exec(client: &Client, item: &Item<'_>) -> Result<(), tokio_postgres::Error> {
    match item {
        Item::Simple(sql) => client.batch_execute(sql).await,
        Item::Typed(sql, params) => client.execute_typed(sql, params).await.map(|_| ()),
    }
}

/// Run `items` in order and return the first failure.
///
/// Pipelined: every request is written before any answer is awaited. A
/// tokio-postgres future hands its request to the connection task during its
/// first poll, so polling them once each, in order, puts them on the wire in
/// order; the answers are then collected in the same order.
async fn run_items(client: &Client, items: &[(Tag, Item<'_>)], pipelined: bool) -> Result<(), (Tag, tokio_postgres::Error)> {
    if !pipelined {
        for (tag, item) in items {
            exec(client, item).await.map_err(|e| (*tag, e))?;
        }
        return Ok(());
    }
    let mut futs: Vec<Pin<Box<MaybeDone<_>>>> = items.iter().map(|(_, item)| Box::pin(maybe_done(exec(client, item)))).collect();
    futures::future::poll_fn(|cx| {
        for f in futs.iter_mut() {
            let _ = f.as_mut().poll(cx);
        }
        Poll::Ready(())
    })
    .await;
    let mut first = None;
    for (f, (tag, _)) in futs.iter_mut().zip(items) {
        f.as_mut().await;
        if let Some(Err(e)) = f.as_mut().take_output() {
            if first.is_none() {
                first = Some((*tag, e));
            }
        }
    }
    first.map_or(Ok(()), Err)
}

// ---------------------------------------------------------------------------
// Bodies.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Up,
    Down,
}

impl Direction {
    fn word(self) -> &'static str {
        match self {
            Direction::Up => "up",
            Direction::Down => "down",
        }
    }
    fn event(self) -> &'static str {
        match self {
            Direction::Up => "applied",
            Direction::Down => "reverted",
        }
    }
}

fn sql_body<'b>(m: &Migration, body: &'b Body) -> Result<(String, &'b [Statement]), StepError> {
    match body {
        Body::Sql { file, statements } => Ok((file.display().to_string(), statements)),
        Body::Commands { file, .. } => Err(StepError::Engine(EngineError::Unsupported(format!(
            "{}: MongoDB commands cannot run on PostgreSQL; this migration belongs to a MongoDB database",
            file.display()
        )))),
        Body::Code => Err(StepError::Engine(EngineError::Unsupported(format!(
            "{}: a Rust code migration is run by the code registered for it through the library, not by the PostgreSQL engine",
            m.display_path()
        )))),
    }
}

/// How a body's statement changes the transaction state, if it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TxControl {
    None,
    /// `BEGIN`, `START TRANSACTION`.
    Begin,
    /// `COMMIT`, `END`.
    Commit,
    /// `ROLLBACK`, `ABORT`.
    Rollback,
    /// `SAVEPOINT`, `RELEASE`, `ROLLBACK TO`: stays inside the transaction but
    /// can revive an aborted one, so such bodies are not pipelined.
    Savepoint,
    /// Two-phase commit commands.
    Prepared,
}

/// The first few keywords of a statement, upper-cased, leading comments skipped.
fn leading_words(sql: &str, n: usize) -> Vec<String> {
    let b = sql.as_bytes();
    let mut i = 0;
    let mut words = Vec::new();
    while i < b.len() && words.len() < n {
        if b[i].is_ascii_whitespace() {
            i += 1;
        } else if b[i..].starts_with(b"--") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if b[i].is_ascii_alphabetic() || b[i] == b'_' {
            let s = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            words.push(sql[s..i].to_ascii_uppercase());
        } else {
            break;
        }
    }
    words
}

fn tx_control(sql: &str) -> TxControl {
    let w = leading_words(sql, 4);
    let w: Vec<&str> = w.iter().map(String::as_str).collect();
    match w.as_slice() {
        ["BEGIN", ..] | ["START", "TRANSACTION", ..] => TxControl::Begin,
        ["COMMIT", "PREPARED", ..] | ["ROLLBACK", "PREPARED", ..] | ["PREPARE", "TRANSACTION", ..] => TxControl::Prepared,
        ["COMMIT", ..] | ["END", ..] => TxControl::Commit,
        ["ROLLBACK", rest @ ..] if rest.iter().take(2).any(|x| *x == "TO") => TxControl::Savepoint,
        ["ROLLBACK", ..] | ["ABORT", ..] => TxControl::Rollback,
        ["SAVEPOINT", ..] | ["RELEASE", ..] => TxControl::Savepoint,
        _ => TxControl::None,
    }
}

/// `COPY … FROM STDIN` / `TO STDOUT` need a data stream a migration file does
/// not carry (psql's `\copy`), and would leave the protocol mid-copy.
fn is_copy_stream(sql: &str) -> bool {
    leading_words(sql, 1).first().is_some_and(|w| w == "COPY") && {
        let u = sql.to_ascii_uppercase();
        u.contains("STDIN") || u.contains("STDOUT")
    }
}

/// A statement no mode can run, with the reason.
fn refused_anywhere(statements: &[Statement]) -> Option<(usize, String)> {
    statements.iter().position(|s| is_copy_stream(&s.sql)).map(|i| {
        (i, "COPY … FROM STDIN / TO STDOUT needs a client data stream (psql's \\copy) and cannot run from a migration; use INSERT, or COPY from a file on the server".to_string())
    })
}

/// What to run of a body in the default (transactional) mode, and how.
#[derive(Debug)]
struct BodyPlan {
    /// Indices of the statements to send, in order.
    run: Vec<usize>,
    /// Whether the whole transaction can be sent as one pipeline.
    pipelined: bool,
}

impl BodyPlan {
    /// Plan a body that runs inside kiln's transaction.
    ///
    /// - A `BEGIN` … `COMMIT` pair wrapping the whole file (common in
    ///   golang-migrate projects) is dropped: kiln's transaction does the same job.
    /// - Any other `BEGIN`/`COMMIT`/`ROLLBACK` (or two-phase command) would end
    ///   kiln's transaction early and break "the migration and its history
    ///   row commit together", so the migration is refused before anything runs,
    ///   naming the statement (`Err((index, message))`).
    /// - `SAVEPOINT`/`ROLLBACK TO` can revive a transaction after a failed
    ///   statement, so a pipeline could run statements after a failure: such
    ///   bodies run one statement at a time instead.
    fn transactional(statements: &[Statement]) -> Result<BodyPlan, (usize, String)> {
        if let Some(refused) = refused_anywhere(statements) {
            return Err(refused);
        }
        let kinds: Vec<TxControl> = statements.iter().map(|s| tx_control(&s.sql)).collect();
        let n = kinds.len();
        let wrapped = n >= 2
            && kinds[0] == TxControl::Begin
            && kinds[n - 1] == TxControl::Commit
            && kinds[1..n - 1].iter().all(|k| matches!(k, TxControl::None | TxControl::Savepoint));
        let range = if wrapped { 1..n - 1 } else { 0..n };
        if let Some(i) = range.clone().find(|&i| !matches!(kinds[i], TxControl::None | TxControl::Savepoint)) {
            let word = leading_words(&statements[i].sql, 1).pop().unwrap_or_default();
            return Err((
                i,
                format!(
                    "{word} would end kiln's transaction: kiln runs each migration in one transaction together with its history entry, \
                     so a migration must not BEGIN, COMMIT or ROLLBACK itself (a BEGIN … COMMIT pair around the whole file is accepted). \
                     Remove it, or add `-- kiln:transaction off` to run the file statement by statement without a transaction"
                ),
            ));
        }
        let pipelined = !range.clone().any(|i| kinds[i] == TxControl::Savepoint);
        Ok(BodyPlan { run: range.collect(), pipelined })
    }
}

/// The error of body statement `index` (0-based), its line moved to the
/// server's error position within the statement when there is one.
fn statement_error(file: &str, statements: &[Statement], index: usize, message: String, db: Option<&DbError>) -> StatementError {
    let (line, code) = match statements.get(index) {
        Some(st) => {
            let line = match db.and_then(DbError::position) {
                Some(ErrorPosition::Original(pos)) => line_at(st, *pos as usize),
                _ => st.line,
            };
            (line, db.map(|d| d.code().code().to_string()))
        }
        None => (0, db.map(|d| d.code().code().to_string())),
    };
    StatementError { file: file.to_string(), statement: index + 1, line, message, code }
}

/// The file line of the 1-based character position `pos` of statement `st`
/// (PostgreSQL reports error positions in characters of the query text).
fn line_at(st: &Statement, pos: usize) -> usize {
    st.line + st.sql.chars().take(pos.saturating_sub(1)).filter(|c| *c == '\n').count()
}

// ---------------------------------------------------------------------------
// Errors.

/// `SQLSTATE: message`, with the server's detail and hint when it gave them.
fn db_message(db: &DbError) -> String {
    let mut s = format!("{}: {}", db.code().code(), db.message());
    if let Some(d) = db.detail() {
        let _ = write!(s, " DETAIL: {d}");
    }
    if let Some(h) = db.hint() {
        let _ = write!(s, " HINT: {h}");
    }
    s
}

/// The driver's message with its causes: tokio-postgres' own `Display` stops
/// at the kind ("error performing TLS handshake") and leaves out the reason.
fn error_text(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return db_message(db);
    }
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let _ = write!(s, ": {c}");
        cause = c.source();
    }
    s
}

/// Whether the session is gone (or going): closed channel, socket error, or a
/// server error of the connection-exception (08) / operator-intervention (57P)
/// classes, or any FATAL.
fn is_connection_loss(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        return code.starts_with("08") || code.starts_with("57P") || matches!(db.severity(), "FATAL" | "PANIC");
    }
    std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
}

// ---------------------------------------------------------------------------
// Connecting.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

struct TlsOptions {
    mode: SslMode,
    root_cert: Option<String>,
}

/// Take the TLS parameters tokio-postgres does not understand (`sslmode` beyond
/// disable/prefer/require, `sslrootcert`) out of the URL's query, so the rest
/// can be parsed by `tokio_postgres::Config`. Works on the raw text so that
/// multi-host URLs (`h1:5432,h2:5433`) keep working.
fn split_tls_params(url: &str) -> Result<(String, TlsOptions), String> {
    let mut opts = TlsOptions { mode: SslMode::Prefer, root_cert: None };
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), opts));
    };
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let value = || percent_decode(v);
        match k {
            "sslmode" => {
                opts.mode = match value().as_str() {
                    "disable" => SslMode::Disable,
                    "allow" | "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    other => return Err(format!("sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full")),
                }
            }
            "sslrootcert" => opts.root_cert = Some(value()),
            "sslcert" | "sslkey" | "sslpassword" => {
                return Err(format!("{k}: client certificates are not supported; use password or trust authentication"));
            }
            _ => kept.push(pair),
        }
    }
    let stripped = if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) };
    Ok((stripped, opts))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The TLS side of a connection, built once per `connect`.
struct TlsSetup {
    mode: SslMode,
    connector: Option<MakeRustlsConnect>,
}

impl TlsSetup {
    fn new(opts: &TlsOptions) -> Result<Self, String> {
        if opts.mode == SslMode::Disable {
            return Ok(TlsSetup { mode: opts.mode, connector: None });
        }
        // An explicit provider: the workspace may also enable aws-lc-rs through
        // another crate, and then rustls cannot pick a default on its own.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?;
        // libpq semantics: `require` with an explicit root certificate verifies the chain.
        let mode = match (opts.mode, &opts.root_cert) {
            (SslMode::Require, Some(_)) => SslMode::VerifyCa,
            (m, _) => m,
        };
        let config = match mode {
            SslMode::Prefer | SslMode::Require => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoCertificateCheck { algs: provider.signature_verification_algorithms }))
                .with_no_client_auth(),
            SslMode::VerifyCa | SslMode::VerifyFull => {
                let roots = Arc::new(root_store(opts.root_cert.as_deref())?);
                let inner = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(|e| format!("TLS setup: {e}"))?;
                if mode == SslMode::VerifyFull {
                    builder.with_webpki_verifier(inner).with_no_client_auth()
                } else {
                    builder.dangerous().with_custom_certificate_verifier(Arc::new(ChainOnly { inner })).with_no_client_auth()
                }
            }
            SslMode::Disable => unreachable!("handled above"),
        };
        Ok(TlsSetup { mode: opts.mode, connector: Some(MakeRustlsConnect::new(config)) })
    }

    fn pg_mode(&self) -> PgSslMode {
        match self.mode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => PgSslMode::Require,
        }
    }
}

/// Roots for verify-ca / verify-full: `sslrootcert` (a PEM file, or `system`
/// for the public web roots), else libpq's `~/.postgresql/root.crt`, else the
/// public web roots.
fn root_store(root_cert: Option<&str>) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    let default_file = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".postgresql/root.crt")).filter(|p| p.exists());
    let file = match root_cert {
        Some("system") => None,
        Some(p) => Some(PathBuf::from(p)),
        None => default_file,
    };
    match file {
        Some(path) => {
            let pem = std::fs::read(&path).map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
                store.add(cert).map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            }
            if store.is_empty() {
                return Err(format!("sslrootcert {}: no certificate found", path.display()));
            }
        }
        None => store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(store)
}

/// `sslmode=prefer/require` as libpq does them: encrypted, certificate not
/// checked. The handshake signatures are still verified, so the server does
/// hold the key of the certificate it shows.
#[derive(Debug)]
struct NoCertificateCheck {
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for NoCertificateCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }
    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain must lead to a trusted root; the host name
/// is not checked.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. })) => {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }
    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// An established session.
struct Opened {
    client: Client,
    task: JoinHandle<()>,
    error: Arc<Mutex<Option<String>>>,
}

/// Drive the connection on its own task. Server notices (`RAISE NOTICE`) go to
/// the log; the error that ends the connection is kept so that the next
/// request, which fails with "connection closed", can say why.
fn spawn_connection<S, T>(mut conn: Connection<S, T>) -> (JoinHandle<()>, Arc<Mutex<Option<String>>>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let slot = Arc::new(Mutex::new(None));
    let out = slot.clone();
    let task = tokio::spawn(async move {
        loop {
            match futures::future::poll_fn(|cx| conn.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notice(n))) => tracing::info!(target: "kiln::postgres", "{}: {}", n.severity(), n.message()),
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::debug!(target: "kiln::postgres", error = %e, "connection ended");
                    if let Ok(mut g) = out.lock() {
                        *g = Some(error_text(&e));
                    }
                    return;
                }
                None => return,
            }
        }
    });
    (task, slot)
}

/// Try every host of the configuration in order; the first session wins.
async fn open(pg: &Config, tls: &TlsSetup) -> Result<Opened, String> {
    let hosts: Vec<Host> = if pg.get_hosts().is_empty() && pg.get_hostaddrs().is_empty() { default_hosts(pg) } else { pg.get_hosts().to_vec() };
    let addrs = pg.get_hostaddrs();
    let ports = pg.get_ports();
    let n = hosts.len().max(addrs.len());
    let timeout = pg.get_connect_timeout().copied().unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let mut errors = Vec::new();
    for i in 0..n {
        let port = match ports {
            [] => 5432,
            [one] => *one,
            many => *many.get(i).unwrap_or(&5432),
        };
        let host = hosts.get(i);
        let addr = addrs.get(i).copied();
        let label = match (host, addr) {
            (Some(Host::Tcp(h)), _) => format!("{h}:{port}"),
            #[cfg(unix)]
            (Some(Host::Unix(p)), _) => p.join(format!(".s.PGSQL.{port}")).display().to_string(),
            (None, Some(a)) => SocketAddr::new(a, port).to_string(),
            (None, None) => continue,
        };
        match tokio::time::timeout(timeout, open_one(pg, tls, host, addr, port)).await {
            Ok(Ok(o)) => return Ok(o),
            Ok(Err(e)) => errors.push(format!("{label}: {e}")),
            Err(_) => errors.push(format!("{label}: timed out after {timeout:?}")),
        }
    }
    Err(errors.join("; "))
}

/// libpq's default when the URL names no host: the local Unix socket if there
/// is one, else localhost over TCP.
fn default_hosts(pg: &Config) -> Vec<Host> {
    #[cfg(unix)]
    {
        let port = pg.get_ports().first().copied().unwrap_or(5432);
        for dir in ["/var/run/postgresql", "/tmp"] {
            if Path::new(dir).join(format!(".s.PGSQL.{port}")).exists() {
                return vec![Host::Unix(PathBuf::from(dir))];
            }
        }
    }
    let _ = pg;
    vec![Host::Tcp("localhost".into())]
}

async fn open_one(pg: &Config, tls: &TlsSetup, host: Option<&Host>, addr: Option<IpAddr>, port: u16) -> Result<Opened, String> {
    let mut cfg = pg.clone();
    let tcp_name = match host {
        #[cfg(unix)]
        Some(Host::Unix(dir)) => {
            // TLS is pointless (and unsupported by the server) on a local socket.
            cfg.ssl_mode(PgSslMode::Disable);
            let stream = tokio::net::UnixStream::connect(dir.join(format!(".s.PGSQL.{port}"))).await.map_err(|e| e.to_string())?;
            let (client, conn) = cfg.connect_raw(stream, NoTls).await.map_err(|e| error_text(&e))?;
            let (task, error) = spawn_connection(conn);
            return Ok(Opened { client, task, error });
        }
        Some(Host::Tcp(h)) => h.clone(),
        None => addr.map(|a| a.to_string()).unwrap_or_default(),
    };
    let targets: Vec<SocketAddr> = match addr {
        Some(a) => vec![SocketAddr::new(a, port)],
        None => tokio::net::lookup_host((tcp_name.as_str(), port)).await.map_err(|e| format!("cannot resolve host: {e}"))?.collect(),
    };
    let mut last = format!("cannot resolve host {tcp_name}");
    let mut stream = None;
    for t in &targets {
        match connect_tcp(*t).await {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = if targets.len() > 1 { format!("{t}: {e}") } else { e.to_string() },
        }
    }
    let stream = stream.ok_or(last)?;
    // Without TCP_NODELAY the small TLS handshake and startup messages wait on
    // Nagle's algorithm against the server's delayed ACK: ~40-90 ms per connection.
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    cfg.ssl_mode(tls.pg_mode());
    match &tls.connector {
        None => {
            let (client, conn) = cfg.connect_raw(stream, NoTls).await.map_err(|e| error_text(&e))?;
            let (task, error) = spawn_connection(conn);
            Ok(Opened { client, task, error })
        }
        Some(maker) => {
            let mut maker = maker.clone();
            let tls_connect = <MakeRustlsConnect as MakeTlsConnect<TcpStream>>::make_tls_connect(&mut maker, &tcp_name)
                .map_err(|e| format!("{tcp_name} cannot be used as a TLS server name: {e}"))?;
            let (client, conn) = cfg.connect_raw(stream, tls_connect).await.map_err(|e| {
                let mut m = error_text(&e);
                if matches!(tls.mode, SslMode::VerifyCa | SslMode::VerifyFull) && m.contains("certificate") {
                    m.push_str(
                        " (the server's certificate is checked against sslrootcert=<PEM file>, else ~/.postgresql/root.crt, \
                         else the public web roots; sslmode=require encrypts without checking it)",
                    );
                }
                m
            })?;
            let (task, error) = spawn_connection(conn);
            Ok(Opened { client, task, error })
        }
    }
}

async fn connect_tcp(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    // Lets the OS notice a peer that vanished during a long migration.
    socket.set_keepalive(true)?;
    socket.connect(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(sql: &str) -> Statement {
        Statement { sql: sql.into(), line: 1 }
    }

    #[test]
    fn recognises_transaction_control() {
        assert_eq!(tx_control("begin"), TxControl::Begin);
        assert_eq!(tx_control("-- c; x\n/* y */ START TRANSACTION ISOLATION LEVEL SERIALIZABLE"), TxControl::Begin);
        assert_eq!(tx_control("COMMIT"), TxControl::Commit);
        assert_eq!(tx_control("end"), TxControl::Commit);
        assert_eq!(tx_control("rollback"), TxControl::Rollback);
        assert_eq!(tx_control("ROLLBACK TO SAVEPOINT a"), TxControl::Savepoint);
        assert_eq!(tx_control("rollback work to a"), TxControl::Savepoint);
        assert_eq!(tx_control("savepoint a"), TxControl::Savepoint);
        assert_eq!(tx_control("COMMIT PREPARED 'x'"), TxControl::Prepared);
        assert_eq!(tx_control("DO $$ BEGIN PERFORM 1; END $$"), TxControl::None);
        assert_eq!(tx_control("CREATE FUNCTION f() RETURNS int BEGIN ATOMIC SELECT 1; END"), TxControl::None);
        assert_eq!(tx_control("prepare q as select 1"), TxControl::None);
    }

    #[test]
    fn body_plans() {
        let p = BodyPlan::transactional(&[st("create table a (id int)"), st("insert into a values (1)")]).unwrap();
        assert_eq!((p.run, p.pipelined), (vec![0, 1], true));
        let p = BodyPlan::transactional(&[st("BEGIN"), st("create table a (id int)"), st("COMMIT")]).unwrap();
        assert_eq!((p.run, p.pipelined), (vec![1], true));
        let p = BodyPlan::transactional(&[st("savepoint s"), st("create table a (id int)"), st("release s")]).unwrap();
        assert_eq!((p.run, p.pipelined), (vec![0, 1, 2], false));
        let e = BodyPlan::transactional(&[st("create table a (id int)"), st("commit"), st("create table b (id int)")]).unwrap_err();
        assert_eq!(e.0, 1);
        assert!(e.1.contains("COMMIT"), "{}", e.1);
        assert_eq!(BodyPlan::transactional(&[st("BEGIN"), st("select 1"), st("ROLLBACK")]).unwrap_err().0, 0);
        assert_eq!(BodyPlan::transactional(&[st("select 1"), st("COPY t FROM stdin")]).unwrap_err().0, 1);
    }

    #[test]
    fn error_line_follows_the_position() {
        let sts = [Statement { sql: "create table t (\n  id int,\n  x nosuchtype\n)".into(), line: 10 }];
        assert_eq!(line_at(&sts[0], 1), 10);
        assert_eq!(line_at(&sts[0], 17), 10);
        assert_eq!(line_at(&sts[0], 18), 11);
        assert_eq!(line_at(&sts[0], 32), 12);
        let e = statement_error("f.sql", &sts, 0, "m".into(), None);
        assert_eq!((e.statement, e.line, e.code), (1, 10, None));
    }

    #[test]
    fn scratch_urls_keep_everything_but_the_database() {
        assert_eq!(database_url("postgres://u:pw@h:5432/app?sslmode=require", "kiln_verify_1").unwrap(), "postgres://u:pw@h:5432/kiln_verify_1?sslmode=require");
        assert_eq!(database_url("postgresql://u@h1:5432,h2:5433/app", "kiln_verify_1").unwrap(), "postgresql://u@h1:5432,h2:5433/kiln_verify_1");
        assert_eq!(database_url("postgres://h", "kiln_verify_1").unwrap(), "postgres://h/kiln_verify_1");
        assert_eq!(database_url("postgres:///app?host=/var/run/postgresql", "kiln_verify_1").unwrap(), "postgres:///kiln_verify_1?host=/var/run/postgresql");
        assert_eq!(database_url("postgres://h/?dbname=app&x=1", "kiln_verify_1").unwrap(), "postgres://h/kiln_verify_1?dbname=kiln_verify_1&x=1");
        assert!(database_url("host=h dbname=app", "kiln_verify_1").is_err());
    }

    #[test]
    fn only_kiln_scratch_names() {
        assert!(check_scratch_name("kiln_verify_123_456").is_ok());
        for bad in ["postgres", "kiln_verify_", "kiln_t_1", "kiln_verify_a\"; DROP", "kiln_verify_ä", &format!("kiln_verify_{}", "x".repeat(60))] {
            assert!(check_scratch_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tls_params_are_taken_out() {
        let (u, o) = split_tls_params("postgres://u:p@h1:5432,h2:5433/db?sslmode=verify-full&application_name=x&sslrootcert=%2Ftmp%2Fca.pem").unwrap();
        assert_eq!(u, "postgres://u:p@h1:5432,h2:5433/db?application_name=x");
        assert_eq!(o.mode, SslMode::VerifyFull);
        assert_eq!(o.root_cert.as_deref(), Some("/tmp/ca.pem"));
        let (u, o) = split_tls_params("postgres://h/db").unwrap();
        assert_eq!((u.as_str(), o.mode), ("postgres://h/db", SslMode::Prefer));
        assert!(split_tls_params("postgres://h/db?sslmode=bogus").is_err());
        assert_eq!(percent_decode("a%20b%2"), "a b%2");
    }
}
