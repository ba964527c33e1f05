//! The MySQL 8 / MariaDB 10.11+ engine, over one sqlx connection.
//!
//! MySQL commits implicitly around every DDL statement, so a migration cannot
//! be rolled back as a whole. kiln therefore commits an **intent row** (state
//! `running`) before a migration's body runs: a runner killed mid-migration
//! leaves that row behind and it blocks the next run until an operator checks
//! the database and runs `kiln repair` (golang-migrate's "dirty" flag). The body
//! then runs inside a transaction, so a body of plain DML still commits
//! atomically with its history row.
//!
//! Per migration, in the steady state (body = one `CREATE TABLE`):
//!
//! | round trip | what | commits |
//! |---|---|---|
//! | 1 | one bound `INSERT … ON DUPLICATE KEY UPDATE` of two rows: the previous migration's finish (`running` → `applied`) and this migration's intent row (`running`) | — |
//! | 2 | bound `INSERT` of the previous migration's `applied` event | — |
//! | 3 | `COMMIT AND CHAIN` (commits, and opens the body's transaction) | the previous finish + this intent |
//! | 4 | the body's statement over the text protocol, followed by `BEGIN` in the same round trip when it is a statement that commits implicitly | MySQL's implicit DDL commit |
//!
//! That is two commits per migration — the same as a client running the DDL and
//! committing one history row — and four round trips. A migration's finish rows
//! are written with the next migration's intent, or by the next call of any
//! other kind (`log`, which the runner always calls at the end of a run,
//! `read_history`, `unlock`, …), always inside the transaction that holds the
//! rest of the migration's own uncommitted work.
//!
//! Why merging N's finish with N+1's intent keeps the same safety — every way
//! it can fail:
//!
//! - Killed or disconnected before the merged commit: the server rolls the open
//!   transaction back. N's row is still the committed `running` intent and blocks
//!   the next run; N's DML after its last DDL (or all of it, for a DML-only body)
//!   is rolled back with it, its DDL stays — exactly the state of a process that
//!   died just before finishing N. Nothing looks applied that is not.
//! - The merged write fails (it cannot under the lock short of a lost
//!   connection, but if it does): kiln rolls back, with the same result as above,
//!   and reports the error. It must not write N's finish on its own then: the
//!   rollback may have undone N's DML.
//! - The merged `COMMIT` fails or the connection dies during it: either N's
//!   finish and N+1's intent are both committed (N+1 `running` blocks) or neither
//!   is (N `running` blocks).
//! - N+1's body fails: its `ROLLBACK` reaches only N+1's own transaction, which
//!   began at the merged commit, so N's finish is already durable.
//! - The lock is never released with N's finish unwritten: `unlock` writes and
//!   commits it first.
//!
//! The migration lock is `GET_LOCK('kiln:<database>:<history table>')`, held by
//! the session, so it dies with the process or the connection.
//!
//! Schema contracts: [`Backend::inspect`] reads `information_schema` with six
//! queries, one per table (`TABLES`, `COLUMNS`, `STATISTICS`,
//! `KEY_COLUMN_USAGE`, `REFERENTIAL_CONSTRAINTS`, `CHECK_CONSTRAINTS`), each
//! filtered by the database and joined in Rust: MariaDB fills every
//! `information_schema` table of a join by opening each table of the schema,
//! so joins there cost seconds on 1,000 tables where six single-table queries
//! cost about 100 ms. [`Backend::apply_checked`] cannot roll DDL back: it inspects
//! while the migration's finish is still pending and, on violations, writes
//! `failed` instead of `applied` in that same commit — the migration never
//! looks applied, and the next run is refused until `kiln repair`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{NaiveDateTime, SecondsFormat, Utc};
use kiln_core::schema::{ColumnInfo, ConstraintInfo, IndexInfo, Snapshot};
use kiln_core::url::redact;
use kiln_core::{
    AppliedMigration, ApplyError, Backend, BackendConfig, Body, Capabilities, EngineError, FailureOutcome, Kind, LogEntry, Migration,
    RecordContext, SchemaCheck, State, Statement, StatementError, StepError, TxMode,
};
use sqlx::mysql::{MySqlConnectOptions, MySqlDatabaseError};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, MySqlConnection, Row};

use crate::common::{lock_key, quote_backtick, RawHistoryRow, HISTORY_COLUMNS, LOG_COLUMNS};

/// MySQL's and MariaDB's limit on `GET_LOCK` names.
const MAX_LOCK_NAME: usize = 64;

/// Appended to a body statement that commits implicitly (see `run_body`).
const REOPEN: &str = "\n;BEGIN";

/// The MySQL/MariaDB engine (see the module docs for the commit protocol).
///
/// Note on [`Backend::apply`]'s contract: when `apply` returns `Ok`, the
/// migration's `applied` entry is written and committed by the *next* call on
/// this backend (the runner always ends a run with [`Backend::log`], then
/// [`Backend::unlock`]). A backend dropped right after `apply`, without any
/// further call, leaves that migration `running`, which blocks the next run —
/// exactly what a process killed at that moment leaves behind.
pub struct MysqlBackend {
    conn: MySqlConnection,
    target: String,
    lock_name: String,
    locked: bool,
    /// The finish of the last applied migration, not written yet: it goes out
    /// with the next migration's intent (module docs). While it is set, the
    /// session is inside an open transaction holding that migration's
    /// uncommitted work.
    pending: Option<Finish>,
    history_name: String,
    snapshot_name: String,
    /// The database named by the URL: what [`Backend::inspect`] reads, and where kiln's tables live.
    database: String,
    /// The URL as configured, password included: only to derive a scratch
    /// database's URL from (never shown; `target` is what messages use).
    url: String,
    /// kiln's own tables (history, log, snapshots), which [`Backend::inspect`] leaves out.
    own_tables: [String; 3],
    /// The server, asked once, on the first inspection.
    server: Option<Server>,
    sql: Sql,
}

/// What the `information_schema` of the server offers beyond the common core.
#[derive(Clone, Copy, Debug)]
struct Server {
    mariadb: bool,
    /// `STATISTICS.IGNORED` (MariaDB 10.6+) or `IS_VISIBLE`/`EXPRESSION` (MySQL 8.0.13+).
    hidden_indexes: bool,
    /// `CHECK_CONSTRAINTS` (MariaDB 10.2.22+, MySQL 8.0.16+).
    checks: bool,
}

impl Server {
    /// From `SELECT VERSION()`: `10.11.6-MariaDB-0+deb12u1`, `8.0.36`.
    fn from_version(v: &str) -> Server {
        let mut numbers = v.split(|c: char| !c.is_ascii_digit()).filter(|p| !p.is_empty()).map(|p| p.parse::<u32>().unwrap_or(0));
        let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
        if v.to_ascii_lowercase().contains("mariadb") {
            Server { mariadb: true, hidden_indexes: version >= (10, 6, 0), checks: version >= (10, 2, 22) }
        } else {
            Server { mariadb: false, hidden_indexes: version >= (8, 0, 13), checks: version >= (8, 0, 16) }
        }
    }
}

/// SQL built once from the configured table names; sqlx caches the prepared
/// statements by text, so each is prepared once per connection.
struct Sql {
    create: Arc<str>,
    select_history: Arc<str>,
    insert_history: Arc<str>,
    upsert_history: Arc<str>,
    set_state: Arc<str>,
    fail: Arc<str>,
    finish: Arc<str>,
    finish_and_intent: Arc<str>,
    delete_history: Arc<str>,
    insert_log: Arc<str>,
    create_snapshot: Arc<str>,
    insert_snapshot: Arc<str>,
    select_snapshot: Arc<str>,
}

impl Sql {
    /// Table names are qualified with the database, so a migration's `USE other`
    /// cannot send kiln's own rows elsewhere.
    fn new(database: &str, history: &str, log: &str, snapshot: &str) -> Self {
        let db = quote_backtick(database);
        let h = format!("{db}.{}", quote_backtick(history));
        let l = format!("{db}.{}", quote_backtick(log));
        let sn = format!("{db}.{}", quote_backtick(snapshot));
        // One row per stored snapshot, only ever appended: the newest is the
        // reference for drift, older rows are the schema's history.
        let create_snapshot = format!(
            "CREATE TABLE IF NOT EXISTS {sn} (
                id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
                taken_at DATETIME(6) NOT NULL,
                snapshot LONGTEXT NOT NULL
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
        );
        let q14 = "?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?";
        let updates = HISTORY_COLUMNS
            .split(", ")
            .filter(|c| *c != "version")
            .map(|c| format!("{c} = VALUES({c})"))
            .collect::<Vec<_>>()
            .join(", ");
        Sql {
            create: format!(
                "CREATE TABLE IF NOT EXISTS {h} (
                    version BIGINT NOT NULL PRIMARY KEY,
                    description VARCHAR(255) NOT NULL,
                    script TEXT NOT NULL,
                    migration_group VARCHAR(255) NULL,
                    checksum VARCHAR(255) NOT NULL,
                    state VARCHAR(32) NOT NULL,
                    batch BIGINT NOT NULL,
                    applied_at DATETIME(6) NOT NULL,
                    duration_ms BIGINT NOT NULL,
                    applied_by VARCHAR(255) NOT NULL,
                    kiln_version VARCHAR(64) NOT NULL,
                    error TEXT NULL,
                    error_statement INT NULL,
                    error_line INT NULL
                ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
                CREATE TABLE IF NOT EXISTS {l} (
                    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
                    at DATETIME(6) NOT NULL,
                    event VARCHAR(64) NOT NULL,
                    version BIGINT NULL,
                    name VARCHAR(255) NULL,
                    batch BIGINT NULL,
                    actor VARCHAR(255) NOT NULL,
                    reason TEXT NULL,
                    detail TEXT NULL
                ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
                {create_snapshot}"
            )
            .into(),
            select_history: format!("SELECT {HISTORY_COLUMNS} FROM {h} ORDER BY version").into(),
            insert_history: format!("INSERT INTO {h} ({HISTORY_COLUMNS}) VALUES ({q14})").into(),
            // VALUES(col) rather than MySQL 8's row alias: MariaDB has no alias syntax.
            upsert_history: format!("INSERT INTO {h} ({HISTORY_COLUMNS}) VALUES ({q14}) ON DUPLICATE KEY UPDATE {updates}").into(),
            set_state: format!("UPDATE {h} SET state = ?, error = ? WHERE version = ?").into(),
            fail: format!(
                "UPDATE {h} SET state = 'failed', error = ?, error_statement = ?, error_line = ?, applied_at = ?, duration_ms = ? WHERE version = ?"
            )
            .into(),
            finish: format!("UPDATE {h} SET state = 'applied', error = NULL, applied_at = ?, duration_ms = ? WHERE version = ?").into(),
            // Row 1 exists (`running`) and is updated, row 2 is new: 2 + 1 affected rows.
            finish_and_intent: format!(
                "INSERT INTO {h} ({HISTORY_COLUMNS}) VALUES ({q14}), ({q14}) ON DUPLICATE KEY UPDATE \
                 state = VALUES(state), error = VALUES(error), applied_at = VALUES(applied_at), duration_ms = VALUES(duration_ms)"
            )
            .into(),
            delete_history: format!("DELETE FROM {h} WHERE version = ?").into(),
            insert_log: format!("INSERT INTO {l} ({LOG_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)").into(),
            insert_snapshot: format!("INSERT INTO {sn} (taken_at, snapshot) VALUES (?, ?)").into(),
            select_snapshot: format!("SELECT snapshot FROM {sn} ORDER BY id DESC LIMIT 1").into(),
            create_snapshot: create_snapshot.into(),
        }
    }
}

/// Which way a body runs.
use kiln_core::Direction as Dir;

/// The deferred finish of an applied migration.
struct Finish {
    /// The history row as it must end up (`applied`).
    row: AppliedMigration,
    /// Its `applied` event.
    event: LogEntry,
}

/// A body statement failed.
struct BodyFailure {
    index: usize,
    error: sqlx::Error,
}

impl MysqlBackend {
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
        let target = redact(&cfg.url);
        let (opts, database) = parse_url(&cfg.url, &target)?;
        let connect_err = |e: sqlx::Error| EngineError::Connect { url: target.clone(), message: describe(&e) };
        let mut conn = opts.connect().await.map_err(connect_err)?;
        sqlx::raw_sql("SET autocommit = 1").execute(&mut conn).await.map_err(connect_err)?;
        let mut lock_name = format!("kiln:{database}:{}", cfg.history_table);
        if lock_name.chars().count() > MAX_LOCK_NAME {
            lock_name = format!("kiln:{:016x}", lock_key(&lock_name) as u64);
        }
        Ok(MysqlBackend {
            conn,
            target,
            lock_name,
            locked: false,
            pending: None,
            history_name: cfg.history_table.clone(),
            snapshot_name: cfg.snapshot_table.clone(),
            url: cfg.url.clone(),
            own_tables: [cfg.history_table.clone(), cfg.log_table.clone(), cfg.snapshot_table.clone()],
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

    /// Write and commit the last migration's deferred finish, if any.
    async fn flush(&mut self) -> Result<(), EngineError> {
        self.flush_with(None).await
    }

    /// [`Self::flush`], adding `extra` to the event log in the same commit (or
    /// on its own when nothing is pending).
    async fn flush_with(&mut self, extra: Option<&LogEntry>) -> Result<(), EngineError> {
        let Some(f) = self.pending.take() else {
            return match extra {
                Some(e) => self.insert_log(e).await.map_err(|err| self.err("writing the event log", err)),
                None => Ok(()),
            };
        };
        let r = async {
            sqlx::query(AssertSqlSafe(self.sql.finish.clone()))
                .bind(f.row.applied_at.naive_utc())
                .bind(f.row.duration_ms)
                .bind(f.row.version.number as i64)
                .execute(&mut self.conn)
                .await?;
            self.insert_log(&f.event).await?;
            if let Some(e) = extra {
                self.insert_log(e).await?;
            }
            sqlx::raw_sql("COMMIT").execute(&mut self.conn).await.map(|_| ())
        }
        .await;
        if let Err(e) = r {
            let _ = sqlx::raw_sql("ROLLBACK").execute(&mut self.conn).await;
            return Err(self.err(
                format!(
                    "recording {}_{} as applied (its history entry stays `running` and blocks the next run until `kiln repair {}`)",
                    f.row.version, f.row.description, f.row.version
                ),
                e,
            ));
        }
        Ok(())
    }

    async fn insert_log(&mut self, e: &LogEntry) -> Result<(), sqlx::Error> {
        sqlx::query(AssertSqlSafe(self.sql.insert_log.clone()))
            .bind(e.at.naive_utc())
            .bind(&e.event)
            .bind(e.version.map(|v| v as i64))
            .bind(&e.name)
            .bind(e.batch)
            .bind(&e.actor)
            .bind(&e.reason)
            .bind(&e.detail)
            .execute(&mut self.conn)
            .await
            .map(|_| ())
    }

    async fn write_history(&mut self, sql: Arc<str>, a: &AppliedMigration) -> Result<(), sqlx::Error> {
        bind_row(sqlx::query(AssertSqlSafe(sql)), a).execute(&mut self.conn).await.map(|_| ())
    }

    async fn set_state(&mut self, version: u64, state: State, error: Option<String>) -> Result<(), sqlx::Error> {
        sqlx::query(AssertSqlSafe(self.sql.set_state.clone()))
            .bind(state.as_str())
            .bind(error)
            .bind(version as i64)
            .execute(&mut self.conn)
            .await
            .map(|_| ())
    }

    async fn delete_row(&mut self, version: u64) -> Result<(), sqlx::Error> {
        sqlx::query(AssertSqlSafe(self.sql.delete_history.clone())).bind(version as i64).execute(&mut self.conn).await.map(|_| ())
    }

    /// Run the body statements, one round trip each, stopping at the first failure.
    ///
    /// With `tx`, a statement that commits implicitly is followed by `BEGIN` in
    /// the same round trip, so what comes after it (and kiln's finish rows) is
    /// transactional again. The newline ends a trailing `--`/`#` comment, and
    /// the server runs `BEGIN` only if the statement succeeded.
    async fn run_body(&mut self, statements: &[Statement], tx: bool) -> Result<(), BodyFailure> {
        for (index, st) in statements.iter().enumerate() {
            // Text protocol: CREATE PROCEDURE and friends cannot be prepared.
            let r = if tx && commits_implicitly(&st.sql) {
                sqlx::raw_sql(AssertSqlSafe(format!("{}{REOPEN}", st.sql))).execute(&mut self.conn).await
            } else {
                sqlx::raw_sql(AssertSqlSafe(st.sql.as_str())).execute(&mut self.conn).await
            };
            if let Err(error) = r {
                return Err(BodyFailure { index, error });
            }
        }
        Ok(())
    }

    async fn run(&mut self, m: &Migration, dir: Dir, applied: Option<&AppliedMigration>, ctx: &RecordContext) -> Result<(), StepError> {
        let body = match dir {
            Dir::Up => &m.up,
            Dir::Down => m.down.as_ref().ok_or_else(|| {
                EngineError::Unsupported(format!("{} (version {}) has no down section, so it cannot be reverted", m.display_path(), m.version))
            })?,
        };
        let (file, statements) = match body {
            Body::Sql { file, statements } => (file.display().to_string(), statements.as_slice()),
            Body::Commands { .. } => {
                return Err(EngineError::Unsupported(format!("{}: MongoDB commands cannot run on MySQL/MariaDB", m.display_path())).into())
            }
            Body::Code => {
                return Err(EngineError::Unsupported(format!(
                    "{}: code migrations are run by the library's registered code, not by the MySQL engine",
                    m.display_path()
                ))
                .into())
            }
        };
        let tx = m.directives.transaction != TxMode::Off;
        let started = Instant::now();
        let version = m.version.number;

        // 1. Intent, committed together with the previous migration's finish.
        let interrupted = interrupted_message(dir, ctx);
        match dir {
            Dir::Up => {
                let mut row = history_entry(m, ctx, State::Running, 0);
                row.error = Some(kiln_core::FailureInfo { message: interrupted, statement: None, line: None });
                let context = format!("recording the start of {}", m.name());
                let written = match self.pending.take() {
                    Some(prev) => {
                        let q = sqlx::query(AssertSqlSafe(self.sql.finish_and_intent.clone()));
                        match bind_row(bind_row(q, &prev.row), &row).execute(&mut self.conn).await {
                            Err(e) => Err(self.err(context, e)),
                            Ok(r) if r.rows_affected() != 3 => Err(EngineError::Query {
                                context: format!("{context} ({})", self.target),
                                message: format!(
                                    "expected to finish version {} and add version {} (3 affected rows), the server reported {}; is version {} already in {}?",
                                    prev.row.version,
                                    m.version,
                                    r.rows_affected(),
                                    m.version,
                                    self.history_name
                                ),
                            }),
                            Ok(_) => match self.insert_log(&prev.event).await {
                                Err(e) => Err(self.err(context, e)),
                                Ok(()) => Ok(()),
                            },
                        }
                    }
                    None => {
                        let sql = self.sql.insert_history.clone();
                        match self.write_history(sql, &row).await {
                            Err(e) => Err(self.err(context, e)),
                            Ok(()) => Ok(()),
                        }
                    }
                };
                if let Err(e) = written {
                    // Not committing what remains: the previous migration's finish
                    // must not be written on its own (module docs); it stays `running`.
                    let _ = sqlx::raw_sql("ROLLBACK").execute(&mut self.conn).await;
                    return Err(e.into());
                }
            }
            Dir::Down => {
                self.flush().await?;
                if let Err(e) = self.set_state(version, State::Running, Some(interrupted)).await {
                    return Err(self.err(format!("recording the start of reverting {}", m.name()), e).into());
                }
            }
        }
        // COMMIT AND CHAIN also opens the body's transaction, saving a round trip.
        let commit = if tx { "COMMIT AND CHAIN" } else { "COMMIT" };
        self.raw(commit, &format!("committing the start of {}", m.name())).await?;

        // 2. Body.
        match self.run_body(statements, tx).await {
            Ok(()) => {
                // 3. Finish. The session is inside a transaction here: the body's
                // own, or the one reopened after its last implicit commit.
                if !tx {
                    self.raw("BEGIN", "recording the migration").await?;
                }
                let now = Utc::now();
                let ms = started.elapsed().as_millis() as i64;
                let ev = event(dir_event(dir), m, ctx, Some(format!("{ms} ms")));
                match dir {
                    Dir::Up => {
                        // Deferred: written with the next migration's intent (module docs).
                        let mut row = history_entry(m, ctx, State::Applied, ms);
                        row.applied_at = now;
                        self.pending = Some(Finish { row, event: ev });
                    }
                    Dir::Down => {
                        let recorded = async {
                            self.delete_row(version).await?;
                            self.insert_log(&ev).await?;
                            sqlx::raw_sql("COMMIT").execute(&mut self.conn).await.map(|_| ())
                        }
                        .await;
                        if let Err(e) = recorded {
                            let err = self.err(format!("recording the revert of {} in {}", m.name(), self.history_name), e);
                            // The entry stays `running` and blocks: safe.
                            let _ = self.raw("ROLLBACK", "rolling back").await;
                            return Err(err.into());
                        }
                    }
                }
                Ok(())
            }
            Err(BodyFailure { index, error }) => {
                if is_connection_error(&error) {
                    // The intent row is committed and blocks the next run.
                    return Err(self.err(format!("running {} statement {}", file, index + 1), error).into());
                }
                self.raw("ROLLBACK", &format!("rolling back {}", m.name())).await?;
                let (message, code) = mysql_error(&error);
                // A syntax error quotes the text it was sent; show the user's statement only.
                let message = message.replace(REOPEN, "");
                let st = &statements[index];
                let mut serr = StatementError { file, statement: index + 1, line: st.line, message, code };
                // How many leading statements MySQL committed: with `transaction off`
                // all before the failing one; a failing DDL statement commits
                // everything before it as it starts; otherwise everything up to
                // the last implicitly committing statement (after which kiln
                // reopened a transaction that the ROLLBACK undid).
                let failing_commits = commits_implicitly(&st.sql);
                let committed = if !tx || failing_commits {
                    index
                } else {
                    statements[..index].iter().rposition(|s| commits_implicitly(&s.sql)).map_or(0, |k| k + 1)
                };
                let why = (committed > 0).then(|| {
                    let which = if committed == 1 { "statement 1".to_string() } else { format!("statements 1–{committed}") };
                    let cause = if !tx {
                        "the migration runs with `-- kiln:transaction off`, so every statement commits on its own".to_string()
                    } else if failing_commits {
                        format!("statement {} is DDL, and MySQL commits implicitly before running DDL, even DDL that fails", index + 1)
                    } else {
                        "DDL commits implicitly and cannot be rolled back".to_string()
                    };
                    format!("MySQL had already committed {which} ({cause})")
                });
                let now = Utc::now();
                let ms = started.elapsed().as_millis() as i64;
                let (outcome, result) = match why {
                    None => {
                        // Nothing of the body remains: undo the intent as if it never ran.
                        let r = async {
                            sqlx::raw_sql("BEGIN").execute(&mut self.conn).await?;
                            match dir {
                                Dir::Up => self.delete_row(version).await?,
                                Dir::Down => {
                                    let state = applied.map(|a| a.state).unwrap_or(State::Applied);
                                    self.set_state(version, state, None).await?
                                }
                            }
                            self.insert_log(&event("failed", m, ctx, Some(log_detail(dir, &serr)))).await?;
                            sqlx::raw_sql("COMMIT").execute(&mut self.conn).await.map(|_| ())
                        }
                        .await;
                        (FailureOutcome::RolledBack, r)
                    }
                    Some(why) => {
                        let recorded =
                            format!("{}{}; {why}", if dir == Dir::Down { "the down migration failed: " } else { "" }, serr.message);
                        serr.message = format!(
                            "{}; {why}, so {} remain in the database: fix the database by hand, then run `kiln repair {}`",
                            serr.message,
                            if dir == Dir::Down { "the down migration's earlier changes" } else { "those changes" },
                            m.version
                        );
                        let r = async {
                            sqlx::raw_sql("BEGIN").execute(&mut self.conn).await?;
                            sqlx::query(AssertSqlSafe(self.sql.fail.clone()))
                                .bind(recorded)
                                .bind((index + 1) as i64)
                                .bind(st.line as i64)
                                .bind(now.naive_utc())
                                .bind(ms)
                                .bind(version as i64)
                                .execute(&mut self.conn)
                                .await?;
                            self.insert_log(&event("failed", m, ctx, Some(log_detail(dir, &serr)))).await?;
                            sqlx::raw_sql("COMMIT").execute(&mut self.conn).await.map(|_| ())
                        }
                        .await;
                        (FailureOutcome::RecordedFailed, r)
                    }
                };
                if let Err(e) = result {
                    // The intent row (`running`) stays committed and blocks the next run.
                    let _ = self.raw("ROLLBACK", "rolling back").await;
                    return Err(self.err(format!("recording the failure of {} ({serr})", m.name()), e).into());
                }
                Err(StepError::Body(ApplyError { error: serr, outcome }))
            }
        }
    }

    async fn holder(&mut self) -> Result<Option<String>, sqlx::Error> {
        let id: Option<i64> = sqlx::query("SELECT CAST(IS_USED_LOCK(?) AS SIGNED)")
            .bind(&self.lock_name)
            .fetch_one(&mut self.conn)
            .await?
            .try_get(0)?;
        let Some(id) = id else { return Ok(None) };
        // PROCESSLIST shows other users' sessions only with the PROCESS privilege.
        let who = sqlx::query("SELECT USER, HOST FROM information_schema.PROCESSLIST WHERE ID = ?")
            .bind(id)
            .fetch_optional(&mut self.conn)
            .await?
            .map(|r| -> Result<String, sqlx::Error> { Ok(format!("{}@{}", r.try_get::<String, _>(0)?, r.try_get::<String, _>(1)?)) })
            .transpose()?;
        Ok(Some(match who {
            Some(w) => format!("MySQL connection {id} ({w}) holds lock {:?}", self.lock_name),
            None => format!("MySQL connection {id} holds lock {:?}", self.lock_name),
        }))
    }
}

// ---------------------------------------------------------------------------
// Schema inspection, snapshots, scratch databases.

/// Every table and view of the database; [`is_table`] keeps the tables.
const INSPECT_TABLES: &str = "SELECT TABLE_NAME, TABLE_TYPE FROM information_schema.TABLES WHERE TABLE_SCHEMA = ?";

/// Every column (of views too: filtered by the table list, because an
/// `information_schema` join costs a scan per row on MariaDB).
const INSPECT_COLUMNS: &str =
    "SELECT TABLE_NAME, COLUMN_NAME, COLUMN_TYPE, IS_NULLABLE FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ?";

/// Foreign key columns in key order, with the referenced table and column.
const INSPECT_FOREIGN_KEYS: &str = "SELECT TABLE_NAME, CONSTRAINT_NAME, COLUMN_NAME, REFERENCED_TABLE_SCHEMA, REFERENCED_TABLE_NAME, REFERENCED_COLUMN_NAME \
    FROM information_schema.KEY_COLUMN_USAGE WHERE TABLE_SCHEMA = ? AND REFERENCED_TABLE_NAME IS NOT NULL \
    ORDER BY TABLE_NAME, CONSTRAINT_NAME, ORDINAL_POSITION";

/// `ON UPDATE` / `ON DELETE` of every foreign key.
const INSPECT_FOREIGN_KEY_RULES: &str =
    "SELECT TABLE_NAME, CONSTRAINT_NAME, UPDATE_RULE, DELETE_RULE FROM information_schema.REFERENTIAL_CONSTRAINTS WHERE CONSTRAINT_SCHEMA = ?";

/// `information_schema.STATISTICS`: one row per key part of every index, in key
/// order. The last two columns — whether the index is hidden from the
/// optimizer, and a functional key part's expression — are spelled
/// differently by each server (or missing), see [`Server`].
fn inspect_indexes_sql(server: Server) -> String {
    let extra = match (server.mariadb, server.hidden_indexes) {
        (true, true) => "CAST(IGNORED = 'YES' AS SIGNED), NULL",
        (false, true) => "CAST(IS_VISIBLE = 'NO' AS SIGNED), EXPRESSION",
        (_, false) => "0, NULL",
    };
    format!(
        "SELECT TABLE_NAME, INDEX_NAME, CAST(NON_UNIQUE AS SIGNED), COLUMN_NAME, COLLATION, CAST(SUB_PART AS SIGNED), INDEX_TYPE, {extra} \
         FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = ? ORDER BY TABLE_NAME, INDEX_NAME, SEQ_IN_INDEX"
    )
}

/// Check constraints: table, name, clause, the column a column-level check
/// belongs to (MariaDB names those after their column), and `ENFORCED`
/// (MySQL only; MariaDB always enforces them). MariaDB's `CHECK_CONSTRAINTS`
/// names the table itself; MySQL's does not, so it is joined with
/// `TABLE_CONSTRAINTS` there (MySQL 8's `information_schema` is a set of views
/// over the data dictionary, where a join is cheap).
fn inspect_checks_sql(server: Server) -> &'static str {
    if server.mariadb {
        "SELECT TABLE_NAME, CONSTRAINT_NAME, CHECK_CLAUSE, CASE WHEN LEVEL = 'Column' THEN CONSTRAINT_NAME END, 'YES' \
         FROM information_schema.CHECK_CONSTRAINTS WHERE CONSTRAINT_SCHEMA = ?"
    } else {
        "SELECT tc.TABLE_NAME, tc.CONSTRAINT_NAME, cc.CHECK_CLAUSE, NULL, tc.ENFORCED \
         FROM information_schema.TABLE_CONSTRAINTS tc JOIN information_schema.CHECK_CONSTRAINTS cc \
         ON cc.CONSTRAINT_SCHEMA = tc.CONSTRAINT_SCHEMA AND cc.CONSTRAINT_NAME = tc.CONSTRAINT_NAME \
         WHERE tc.TABLE_SCHEMA = ? AND tc.CONSTRAINT_TYPE = 'CHECK'"
    }
}

/// Base tables, including MariaDB's system-versioned ones; not views, not
/// sequences (MariaDB lists those as tables of their own type).
fn is_table(table_type: &str) -> bool {
    matches!(table_type, "BASE TABLE" | "SYSTEM VERSIONED")
}

/// `COLUMN_TYPE`, lower-cased, with the display width of integer types
/// dropped as MySQL 8.0.19+ reports them (`int(11) unsigned` → `int
/// unsigned`), so MariaDB and MySQL describe the same column alike. The
/// width stays where it means something: `tinyint(1)` (a boolean, by
/// convention) and `zerofill` columns.
fn column_type(t: &str) -> String {
    let t = t.trim().to_lowercase();
    let Some(open) = t.find('(') else { return t };
    let base = &t[..open];
    let integer = matches!(base, "tinyint" | "smallint" | "mediumint" | "int" | "integer" | "bigint" | "year");
    if !integer || t.starts_with("tinyint(1)") || t.contains("zerofill") {
        return t;
    }
    match t[open..].find(')') {
        Some(close) => format!("{base}{}", &t[open + close + 1..]),
        None => t,
    }
}

/// One foreign key as `KEY_COLUMN_USAGE` returns it, its columns gathered in key order.
#[derive(Default)]
struct ForeignKey {
    columns: Vec<String>,
    /// `table`, or `database.table` for a table of another database.
    ref_table: String,
    ref_columns: Vec<String>,
}

/// One index as `STATISTICS` returns it, its key parts gathered.
struct IndexRow {
    table: String,
    name: String,
    unique: bool,
    index_type: String,
    hidden: bool,
    /// Column (or a functional key part's expression), ascending, prefix length.
    keys: Vec<(String, bool, Option<i64>)>,
}

impl IndexRow {
    fn columns(&self) -> Vec<String> {
        self.keys.iter().map(|(c, _, _)| c.clone()).collect()
    }

    /// What else makes two indexes on the same columns differ, normalised text
    /// in the PostgreSQL engine's words: the index type when not B-tree,
    /// descending and prefix key parts, an index hidden from the optimizer.
    fn options(&self) -> Option<String> {
        let mut options = Vec::new();
        if !self.index_type.eq_ignore_ascii_case("btree") {
            options.push(format!("using {}", self.index_type.to_lowercase()));
        }
        if self.keys.iter().any(|(_, asc, prefix)| !asc || prefix.is_some()) {
            let keys: Vec<String> = self
                .keys
                .iter()
                .map(|(c, asc, prefix)| {
                    let mut key = c.clone();
                    if let Some(n) = prefix {
                        key.push_str(&format!("({n})"));
                    }
                    if !asc {
                        key.push_str(" desc");
                    }
                    key
                })
                .collect();
            options.push(format!("keys ({})", keys.join(", ")));
        }
        if self.hidden {
            options.push("invisible".into());
        }
        (!options.is_empty()).then(|| options.join(" "))
    }
}

/// A text column of `information_schema`. Decoded without sqlx's type check:
/// some servers give a few of these columns a binary collation
/// (`utf8mb3_bin`…), which sqlx would refuse as not text.
fn text(r: &sqlx::mysql::MySqlRow, i: usize) -> Result<Option<String>, sqlx::Error> {
    r.try_get_unchecked::<Option<String>, _>(i)
}

/// [`text`] for a column that is never NULL.
fn text1(r: &sqlx::mysql::MySqlRow, i: usize) -> Result<String, sqlx::Error> {
    Ok(text(r, i)?.unwrap_or_default())
}

impl MysqlBackend {
    /// The server's `information_schema` dialect, asked once.
    async fn server(&mut self) -> Result<Server, EngineError> {
        if let Some(s) = self.server {
            return Ok(s);
        }
        let version: String = match sqlx::query("SELECT VERSION()").fetch_one(&mut self.conn).await.and_then(|r| text1(&r, 0)) {
            Ok(v) => v,
            Err(e) => return Err(self.err("asking the server's version", e)),
        };
        let server = Server::from_version(&version);
        self.server = Some(server);
        Ok(server)
    }

    /// The live schema (see [`Backend::inspect`]). Runs in whatever state the
    /// session is in — inside the open transaction of a pending finish too,
    /// which it neither commits nor ends.
    async fn inspect_schema(&mut self) -> Result<Snapshot, EngineError> {
        let server = self.server().await?;
        let context = format!("inspecting the schema of the database {}", self.database);
        let db = self.database.clone();
        let mut snapshot = Snapshot::default();

        let r: Result<(), sqlx::Error> = async {
            let mut tables: HashSet<String> = HashSet::new();
            for r in sqlx::query(INSPECT_TABLES).bind(&db).fetch_all(&mut self.conn).await? {
                let name = text1(&r, 0)?;
                if is_table(&text1(&r, 1)?) && !self.own_tables.contains(&name) {
                    tables.insert(name);
                }
            }
            for t in &tables {
                snapshot.objects.insert(t.clone(), Default::default());
            }
            for r in sqlx::query(INSPECT_COLUMNS).bind(&db).fetch_all(&mut self.conn).await? {
                let table = text1(&r, 0)?;
                let Some(object) = snapshot.objects.get_mut(&table) else { continue };
                let nullable = text1(&r, 3)? == "YES";
                object.columns.insert(text1(&r, 1)?, ColumnInfo { data_type: column_type(&text1(&r, 2)?), nullable });
            }

            let mut indexes: Vec<IndexRow> = Vec::new();
            for r in sqlx::query(AssertSqlSafe(inspect_indexes_sql(server))).bind(&db).fetch_all(&mut self.conn).await? {
                let table = text1(&r, 0)?;
                if !tables.contains(&table) {
                    continue;
                }
                let name = text1(&r, 1)?;
                let column = match text(&r, 3)? {
                    Some(c) => c,
                    None => text(&r, 8)?.unwrap_or_else(|| "?".into()),
                };
                let key = (column, text(&r, 4)?.as_deref() != Some("D"), r.try_get::<Option<i64>, _>(5)?);
                match indexes.last_mut() {
                    Some(last) if last.table == table && last.name == name => last.keys.push(key),
                    _ => indexes.push(IndexRow {
                        table,
                        name,
                        unique: r.try_get::<i64, _>(2)? == 0,
                        index_type: text1(&r, 6)?,
                        hidden: r.try_get::<i64, _>(7)? != 0,
                        keys: vec![key],
                    }),
                }
            }
            for i in indexes {
                let Some(object) = snapshot.objects.get_mut(&i.table) else { continue };
                if i.unique {
                    // Every unique index is a unique constraint to MySQL (TABLE_CONSTRAINTS
                    // lists it; DROP INDEX and DROP CONSTRAINT both remove it): reported once,
                    // as the constraint, like the PostgreSQL engine does.
                    let kind = if i.name == "PRIMARY" { "primary key" } else { "unique" };
                    object.constraints.insert(i.name.clone(), ConstraintInfo { kind: kind.into(), columns: i.columns(), definition: i.options() });
                } else {
                    let (columns, options) = (i.columns(), i.options());
                    object.indexes.insert(i.name, IndexInfo { columns, unique: false, options });
                }
            }

            let mut rules: HashMap<(String, String), (String, String)> = HashMap::new();
            for r in sqlx::query(INSPECT_FOREIGN_KEY_RULES).bind(&db).fetch_all(&mut self.conn).await? {
                rules.insert((text1(&r, 0)?, text1(&r, 1)?), (text1(&r, 2)?.to_lowercase(), text1(&r, 3)?.to_lowercase()));
            }
            let mut fks: BTreeMap<(String, String), ForeignKey> = BTreeMap::new();
            for r in sqlx::query(INSPECT_FOREIGN_KEYS).bind(&db).fetch_all(&mut self.conn).await? {
                let table = text1(&r, 0)?;
                if !tables.contains(&table) {
                    continue;
                }
                let ref_schema = text1(&r, 3)?;
                let ref_table = text1(&r, 4)?;
                let ref_table = if ref_schema == db { ref_table } else { format!("{ref_schema}.{ref_table}") };
                let fk = fks.entry((table, text1(&r, 1)?)).or_insert_with(|| ForeignKey { ref_table, ..Default::default() });
                fk.columns.push(text1(&r, 2)?);
                fk.ref_columns.push(text(&r, 5)?.unwrap_or_else(|| "?".into()));
            }
            for ((table, name), ForeignKey { columns, ref_table, ref_columns }) in fks {
                let (on_update, on_delete) = rules.remove(&(table.clone(), name.clone())).unwrap_or_else(|| ("restrict".into(), "restrict".into()));
                let definition = format!("references {ref_table} ({}) on update {on_update} on delete {on_delete}", ref_columns.join(", "));
                if let Some(object) = snapshot.objects.get_mut(&table) {
                    object.constraints.insert(name, ConstraintInfo { kind: "foreign key".into(), columns, definition: Some(definition) });
                }
            }

            if server.checks {
                for r in sqlx::query(AssertSqlSafe(inspect_checks_sql(server))).bind(&db).fetch_all(&mut self.conn).await? {
                    let Some(object) = snapshot.objects.get_mut(&text1(&r, 0)?) else { continue };
                    let mut definition = format!("CHECK ({})", text1(&r, 2)?);
                    if text(&r, 4)?.as_deref() == Some("NO") {
                        definition.push_str(" NOT ENFORCED");
                    }
                    let columns = text(&r, 3)?.into_iter().collect();
                    object.constraints.insert(text1(&r, 1)?, ConstraintInfo { kind: "check".into(), columns, definition: Some(definition) });
                }
            }
            Ok(())
        }
        .await;
        r.map_err(|e| self.err(context, e))?;
        Ok(snapshot)
    }

    /// Turn the pending finish of `m` (applied, not yet written) into a `failed`
    /// entry with `message`, committed with the rest of the migration's open
    /// transaction. No `applied` event is written: the runner logs `failed`.
    async fn record_invalid(&mut self, m: &Migration, message: String) -> Result<(), EngineError> {
        let Some(f) = self.pending.take() else {
            return Err(EngineError::Query {
                context: format!("recording {} as failed after schema validation ({})", m.name(), self.target),
                message: "no pending finish to record; this is a bug in kiln".into(),
            });
        };
        let r = async {
            sqlx::query(AssertSqlSafe(self.sql.fail.clone()))
                .bind(message)
                .bind(Option::<i64>::None)
                .bind(Option::<i64>::None)
                .bind(f.row.applied_at.naive_utc())
                .bind(f.row.duration_ms)
                .bind(f.row.version.number as i64)
                .execute(&mut self.conn)
                .await?;
            sqlx::raw_sql("COMMIT").execute(&mut self.conn).await.map(|_| ())
        }
        .await;
        if let Err(e) = r {
            let _ = sqlx::raw_sql("ROLLBACK").execute(&mut self.conn).await;
            return Err(self.err(
                format!(
                    "recording {} as failed after schema validation (its history entry stays `running` and blocks the next run until `kiln repair {}`)",
                    m.name(),
                    m.version
                ),
                e,
            ));
        }
        Ok(())
    }

    /// Undo a migration whose body committed nothing (DML only, in its
    /// transaction): roll the open transaction back and delete the intent row,
    /// as if it never ran.
    async fn roll_back_pending(&mut self, m: &Migration) -> Result<(), EngineError> {
        self.pending = None;
        let version = m.version.number;
        let r = async {
            sqlx::raw_sql("ROLLBACK").execute(&mut self.conn).await?;
            self.delete_row(version).await
        }
        .await;
        r.map_err(|e| self.err(format!("rolling back {} (its history entry stays `running` until `kiln repair {}`)", m.name(), m.version), e))
    }
}

#[async_trait]
impl Backend for MysqlBackend {
    fn capabilities(&self) -> Capabilities {
        Capabilities { engine: "mysql", transactional_ddl: false, kind: Kind::Sql }
    }

    fn target(&self) -> String {
        self.target.clone()
    }

    async fn try_lock(&mut self) -> Result<bool, EngineError> {
        // GET_LOCK is re-entrant and counted; asking twice would need two releases.
        if self.locked {
            return Ok(true);
        }
        self.flush().await?;
        let got = sqlx::query("SELECT CAST(GET_LOCK(?, 0) AS SIGNED)")
            .bind(&self.lock_name)
            .fetch_one(&mut self.conn)
            .await
            .and_then(|r| r.try_get::<Option<i64>, _>(0));
        match got {
            Ok(Some(1)) => {
                self.locked = true;
                Ok(true)
            }
            Ok(_) => Ok(false),
            Err(e) => Err(self.err("taking the migration lock", e)),
        }
    }

    async fn lock_holder(&mut self) -> Option<String> {
        match self.holder().await {
            Ok(h) => h,
            Err(e) => {
                tracing::debug!("cannot tell who holds the lock: {e}");
                None
            }
        }
    }

    /// Waits inside the server (`GET_LOCK(name, seconds)`), which hands the
    /// lock over the moment it is released instead of polling.
    async fn lock(&mut self, wait: Duration) -> Result<(), EngineError> {
        if self.locked {
            return Ok(());
        }
        self.flush().await?;
        let start = Instant::now();
        let got = sqlx::query("SELECT CAST(GET_LOCK(?, ?) AS SIGNED)")
            .bind(&self.lock_name)
            .bind(wait.as_secs_f64())
            .fetch_one(&mut self.conn)
            .await
            .and_then(|r| r.try_get::<Option<i64>, _>(0));
        match got {
            Ok(Some(1)) => {
                self.locked = true;
                Ok(())
            }
            Ok(_) => {
                let holder = self.lock_holder().await.unwrap_or_else(|| "holder unknown".into());
                Err(EngineError::LockTimeout { target: self.target.clone(), holder, waited: start.elapsed() })
            }
            Err(e) => Err(self.err("waiting for the migration lock", e)),
        }
    }

    async fn unlock(&mut self) -> Result<(), EngineError> {
        // Never let another runner in before our history rows are committed.
        self.flush().await?;
        if self.locked {
            sqlx::query("SELECT RELEASE_LOCK(?)")
                .bind(&self.lock_name)
                .execute(&mut self.conn)
                .await
                .map_err(|e| self.err("releasing the migration lock", e))?;
            self.locked = false;
        }
        Ok(())
    }

    async fn ensure_history(&mut self) -> Result<(), EngineError> {
        self.flush().await?;
        match sqlx::raw_sql(AssertSqlSafe(self.sql.create.clone())).execute(&mut self.conn).await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.err(format!("creating {}", self.history_name), e)),
        }
    }

    async fn read_history(&mut self) -> Result<Option<Vec<AppliedMigration>>, EngineError> {
        self.flush().await?;
        let rows = match sqlx::query(AssertSqlSafe(self.sql.select_history.clone())).fetch_all(&mut self.conn).await {
            Ok(rows) => rows,
            // ER_NO_SUCH_TABLE: kiln never ran here.
            Err(sqlx::Error::Database(e)) if e.try_downcast_ref::<MySqlDatabaseError>().map(|e| e.number()) == Some(1146) => return Ok(None),
            Err(e) => return Err(self.err(format!("reading {}", self.history_name), e)),
        };
        let decode = |r: &sqlx::mysql::MySqlRow| -> Result<RawHistoryRow, sqlx::Error> {
            Ok(RawHistoryRow {
                version: r.try_get(0)?,
                description: r.try_get(1)?,
                script: r.try_get(2)?,
                group: r.try_get(3)?,
                checksum: r.try_get(4)?,
                state: r.try_get(5)?,
                batch: r.try_get(6)?,
                applied_at: r.try_get::<NaiveDateTime, _>(7)?.and_utc(),
                duration_ms: r.try_get(8)?,
                applied_by: r.try_get(9)?,
                kiln_version: r.try_get(10)?,
                error: r.try_get(11)?,
                error_statement: r.try_get(12)?,
                error_line: r.try_get(13)?,
            })
        };
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            out.push(decode(r).map_err(|e| self.err(format!("reading {}", self.history_name), e))?.into_applied());
        }
        Ok(Some(out))
    }

    async fn apply(&mut self, m: &Migration, ctx: &RecordContext) -> Result<(), StepError> {
        self.run(m, Dir::Up, None, ctx).await
    }

    async fn revert(&mut self, m: &Migration, applied: &AppliedMigration, ctx: &RecordContext) -> Result<(), StepError> {
        self.run(m, Dir::Down, Some(applied), ctx).await
    }

    /// MySQL commits DDL implicitly, so a migration that breaks the contract
    /// cannot be undone. `check` runs after the body, while the migration's
    /// finish is still pending (module docs); on violations the finish is
    /// written as `failed` (with the violations and the way out, `kiln
    /// repair`) instead of `applied`, in the same commit: the migration never
    /// appears applied, and the next run is refused until repaired
    /// ([`FailureOutcome::RecordedFailed`]). A body that committed nothing —
    /// only DML, in its transaction — is rolled back instead, with its intent
    /// row ([`FailureOutcome::RolledBack`]). The `failed` event is logged by
    /// the runner.
    ///
    /// When the inspection itself fails, the migration is treated the same
    /// way (rolled back or recorded `failed`): it must not count as validated.
    async fn apply_checked(&mut self, m: &Migration, ctx: &RecordContext, check: &SchemaCheck) -> Result<(), StepError> {
        self.run(m, Dir::Up, None, ctx).await?;
        let (violations, inspect_error) = match self.inspect_schema().await {
            Ok(snapshot) => (check(&snapshot), None),
            Err(e) => (Vec::new(), Some(e)),
        };
        if violations.is_empty() && inspect_error.is_none() {
            return Ok(());
        }
        let committed = m.directives.transaction == TxMode::Off
            || matches!(&m.up, Body::Sql { statements, .. } if statements.iter().any(|s| commits_implicitly(&s.sql)));
        let what = match &inspect_error {
            Some(e) => format!("the schema could not be validated after this migration: {e}"),
            None => format!(
                "schema validation failed after this migration: {}",
                violations.iter().map(|v| v.to_string()).collect::<Vec<_>>().join("; ")
            ),
        };
        if committed {
            let message = format!(
                "{what}; MySQL commits DDL implicitly, so its changes remain in the database: fix the schema, then run `kiln repair {}`",
                m.version
            );
            self.record_invalid(m, message).await?;
        } else {
            self.roll_back_pending(m).await?;
        }
        if let Some(e) = inspect_error {
            return Err(StepError::Engine(e));
        }
        let outcome = if committed { FailureOutcome::RecordedFailed } else { FailureOutcome::RolledBack };
        Err(StepError::Invalid { violations, outcome })
    }

    /// Every base table of the database (not views or sequences, not kiln's
    /// own): columns (`COLUMN_TYPE` lower-cased, integer display widths
    /// dropped), plain indexes, and primary key (named `PRIMARY`), unique,
    /// foreign key and check constraints. Every unique index is reported as a
    /// unique constraint, once. InnoDB's automatic index for a foreign key is
    /// a plain index. Six queries, whatever the number of tables.
    async fn inspect(&mut self) -> Result<Snapshot, EngineError> {
        self.inspect_schema().await
    }

    /// Appends a row to the snapshot table (created here when a database from
    /// before snapshots lacks it); earlier snapshots are kept as history. The
    /// row joins a pending finish's transaction when there is one, committed
    /// with it by the runner's closing `log`.
    async fn save_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), EngineError> {
        let context = format!("writing the schema snapshot to {}", self.snapshot_name);
        let json = serde_json::to_string(snapshot).map_err(|e| EngineError::Query { context: context.clone(), message: e.to_string() })?;
        for attempt in 0..2 {
            let r = sqlx::query(AssertSqlSafe(self.sql.insert_snapshot.clone()))
                .bind(Utc::now().naive_utc())
                .bind(&json)
                .execute(&mut self.conn)
                .await;
            match r {
                Ok(_) => return Ok(()),
                Err(e) if attempt == 0 && error_number(&e) == Some(1146) => {
                    // CREATE TABLE commits implicitly: first commit what is pending, in order.
                    self.flush().await?;
                    if let Err(e) = sqlx::raw_sql(AssertSqlSafe(self.sql.create_snapshot.clone())).execute(&mut self.conn).await {
                        return Err(self.err(format!("creating the snapshot table {}", self.snapshot_name), e));
                    }
                }
                Err(e) => return Err(self.err(context, e)),
            }
        }
        Ok(())
    }

    /// The newest stored snapshot; `None` when there is none or no snapshot
    /// table at all. Creates nothing.
    async fn load_snapshot(&mut self) -> Result<Option<Snapshot>, EngineError> {
        let context = format!("reading the schema snapshot from {}", self.snapshot_name);
        // A missing table is an answer too; asking first would cost a round trip.
        let row = match sqlx::query(AssertSqlSafe(self.sql.select_snapshot.clone())).fetch_optional(&mut self.conn).await {
            Ok(row) => row,
            Err(e) if error_number(&e) == Some(1146) => return Ok(None),
            Err(e) => return Err(self.err(context, e)),
        };
        let Some(row) = row else { return Ok(None) };
        let text: String = row.try_get(0).map_err(|e| self.err(&context, e))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| EngineError::Query { context, message: format!("the stored snapshot is not a kiln snapshot: {e}") })
    }

    /// `CREATE DATABASE` on this server, with the character set and collation
    /// of the configured database (so `kiln verify` sees the same index-length
    /// limits and comparisons); returns this backend's URL with the database
    /// replaced, everything else (password, `?socket=`…) kept. Only names
    /// [`Backend::drop_scratch`] accepts are created.
    async fn create_scratch(&mut self, name: &str) -> Result<String, EngineError> {
        check_scratch_name(name)?;
        let url = scratch_url(&self.url, name).map_err(|message| EngineError::BadUrl { url: self.target.clone(), message })?;
        self.flush().await?;
        let context = format!("creating the scratch database {name}");
        let defaults = sqlx::query("SELECT DEFAULT_CHARACTER_SET_NAME, DEFAULT_COLLATION_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?")
            .bind(&self.database)
            .fetch_optional(&mut self.conn)
            .await
            .and_then(|r| r.map(|r| Ok::<_, sqlx::Error>((text1(&r, 0)?, text1(&r, 1)?))).transpose());
        let defaults = match defaults {
            Ok(d) => d,
            Err(e) => return Err(self.err(&context, e)),
        };
        let mut ddl = format!("CREATE DATABASE {}", quote_backtick(name));
        if let Some((charset, collation)) = defaults {
            ddl.push_str(&format!(" CHARACTER SET {} COLLATE {}", quote_backtick(&charset), quote_backtick(&collation)));
        }
        match sqlx::raw_sql(AssertSqlSafe(ddl)).execute(&mut self.conn).await {
            Ok(_) => Ok(url),
            Err(e) => {
                let denied = matches!(error_number(&e), Some(1044 | 1045 | 1227));
                let mut err = self.err(&context, e);
                if let (EngineError::Query { message, .. }, true) = (&mut err, denied) {
                    message.push_str(" (the user needs the CREATE privilege; or give `kiln verify` an empty database with --scratch-url)");
                }
                Err(err)
            }
        }
    }

    /// `DROP DATABASE IF EXISTS`. Refuses any name that `kiln verify` does not
    /// make (`kiln_verify_…`), so a wrong argument can never drop a real database.
    async fn drop_scratch(&mut self, name: &str) -> Result<(), EngineError> {
        check_scratch_name(name)?;
        self.flush().await?;
        match sqlx::raw_sql(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {}", quote_backtick(name)))).execute(&mut self.conn).await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.err(format!("dropping the scratch database {name}"), e)),
        }
    }

    async fn upsert_history(&mut self, entries: &[AppliedMigration]) -> Result<(), EngineError> {
        self.flush().await?;
        self.raw("BEGIN", "writing the history").await?;
        for e in entries {
            let sql = self.sql.upsert_history.clone();
            if let Err(err) = self.write_history(sql, e).await {
                let err = self.err(format!("writing version {} to {}", e.version, self.history_name), err);
                let _ = self.raw("ROLLBACK", "rolling back").await;
                return Err(err);
            }
        }
        self.raw("COMMIT", "writing the history").await
    }

    async fn delete_history(&mut self, version: u64) -> Result<(), EngineError> {
        self.flush().await?;
        match self.delete_row(version).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.err(format!("deleting version {version} from {}", self.history_name), e)),
        }
    }

    async fn log(&mut self, entry: &LogEntry) -> Result<(), EngineError> {
        // Shares the commit of the last migration's finish, if one is pending.
        self.flush_with(Some(entry)).await
    }

    async fn close(mut self: Box<Self>) -> Result<(), EngineError> {
        self.unlock().await?;
        let MysqlBackend { conn, target, .. } = *self;
        conn.close().await.map_err(|e| EngineError::Query { context: format!("closing {target}"), message: describe(&e) })
    }
}

type MyQuery<'q> = sqlx::query::Query<'q, sqlx::MySql, sqlx::mysql::MySqlArguments>;

/// Bind the 14 history columns of `a`, in [`HISTORY_COLUMNS`] order.
fn bind_row<'q>(q: MyQuery<'q>, a: &AppliedMigration) -> MyQuery<'q> {
    q.bind(a.version.number as i64)
        .bind(a.description.clone())
        .bind(a.script.clone())
        .bind(a.group.clone())
        .bind(a.checksum.0.clone())
        .bind(a.state.as_str())
        .bind(a.batch)
        .bind(a.applied_at.naive_utc())
        .bind(a.duration_ms)
        .bind(a.applied_by.clone())
        .bind(a.kiln_version.clone())
        .bind(a.error.as_ref().map(|e| e.message.clone()))
        .bind(a.error.as_ref().and_then(|e| e.statement).map(i64::from))
        .bind(a.error.as_ref().and_then(|e| e.line).map(i64::from))
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

/// Scratch databases are named `kiln_verify_…` by `kiln verify`. Anything else
/// is refused, so neither a typo nor a caller's bug can create or drop a real
/// database; plain ASCII and at most 64 bytes, MySQL's limit for a database name.
fn check_scratch_name(name: &str) -> Result<(), EngineError> {
    crate::common::check_scratch_name(name, 64)
}

/// `url` with its path (the database) replaced by `name`; scheme, user,
/// password, host and query (`?socket=…`, `ssl-mode`…) kept as written.
fn scratch_url(url: &str, name: &str) -> Result<String, String> {
    let mut u = url::Url::parse(url).map_err(|e| e.to_string())?;
    u.set_path(&format!("/{name}"));
    Ok(u.to_string())
}

/// Errors that mean the session is gone (so its transaction and lock are too).
fn is_connection_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => true,
        // 1053 server shutdown, 1927 connection killed, 4031 disconnected for inactivity.
        sqlx::Error::Database(d) => {
            matches!(d.try_downcast_ref::<MySqlDatabaseError>().map(|m| m.number()), Some(1053 | 1927 | 4031))
        }
        _ => false,
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

fn mysql_error(e: &sqlx::Error) -> (String, Option<String>) {
    let code = match e {
        sqlx::Error::Database(d) => d.try_downcast_ref::<MySqlDatabaseError>().map(|m| m.number().to_string()),
        _ => None,
    };
    (describe(e), code)
}

/// Whether MySQL may commit implicitly around `sql` (and so end kiln's
/// transaction): DDL, account and lock statements, transaction control, …
///
/// Decided by the leading keywords. Only statements known to be transactional
/// (DML, SELECT, SET, …) are exempt: anything unknown — `CALL`, `EXECUTE`,
/// executable `/*! … */` comments — counts as committing, because wrongly
/// reporting "nothing remains" is the dangerous mistake.
pub(crate) fn commits_implicitly(sql: &str) -> bool {
    let mut rest = sql;
    let mut words: Vec<String> = Vec::with_capacity(3);
    while words.len() < 3 {
        rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == '(');
        if rest.starts_with("/*!") || rest.starts_with("/*M!") {
            return true;
        }
        if let Some(r) = rest.strip_prefix("--").or_else(|| rest.strip_prefix('#')) {
            rest = r.find('\n').map(|i| &r[i..]).unwrap_or("");
            continue;
        }
        if let Some(r) = rest.strip_prefix("/*") {
            rest = r.find("*/").map(|i| &r[i + 2..]).unwrap_or("");
            continue;
        }
        let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '@')).unwrap_or(rest.len());
        if end == 0 {
            break;
        }
        words.push(rest[..end].to_ascii_uppercase());
        rest = &rest[end..];
    }
    let w = |i: usize| words.get(i).map(String::as_str).unwrap_or("");
    match w(0) {
        "" => false,
        "SELECT" | "INSERT" | "UPDATE" | "DELETE" | "REPLACE" | "WITH" | "VALUES" | "TABLE" | "DO" | "HANDLER" | "SAVEPOINT" | "SHOW"
        | "DESCRIBE" | "DESC" | "EXPLAIN" | "HELP" | "SIGNAL" | "RESIGNAL" | "GET" | "USE" => false,
        // ROLLBACK TO SAVEPOINT stays inside the transaction; RELEASE SAVEPOINT too.
        "ROLLBACK" => !(w(1) == "TO" || (w(1) == "WORK" && w(2) == "TO")),
        "RELEASE" => w(1) != "SAVEPOINT",
        // LOAD DATA is transactional on InnoDB; LOAD INDEX INTO CACHE commits.
        "LOAD" => w(1) != "DATA" && w(1) != "XML",
        // SET PASSWORD and SET autocommit commit; other SETs do not.
        "SET" => {
            let all = sql.to_ascii_uppercase();
            w(1) == "PASSWORD" || all.contains("AUTOCOMMIT")
        }
        // Temporary tables are not DDL in this sense (no implicit commit).
        "CREATE" | "DROP" => w(1) != "TEMPORARY",
        _ => true,
    }
}

fn history_entry(m: &Migration, ctx: &RecordContext, state: State, ms: i64) -> AppliedMigration {
    ctx.entry(m, state, Utc::now(), ms, None)
}

fn event(kind: &str, m: &Migration, ctx: &RecordContext, detail: Option<String>) -> LogEntry {
    LogEntry {
        at: Utc::now(),
        event: kind.into(),
        version: Some(m.version.number),
        name: Some(m.description.clone()),
        batch: Some(ctx.batch),
        actor: ctx.actor.clone(),
        reason: None,
        detail,
    }
}

fn log_detail(dir: Dir, e: &StatementError) -> String {
    format!("{}{e}", if dir == Dir::Down { "down: " } else { "" })
}

use crate::common::step_event as dir_event;

/// The error recorded with an intent row, shown if the runner never finishes it.
fn interrupted_message(dir: Dir, ctx: &RecordContext) -> String {
    format!(
        "{} by {} at {} was interrupted (the process died or lost its connection) before it finished; MySQL may have committed part of it",
        if dir == Dir::Up { "the run started" } else { "the revert started" },
        ctx.actor,
        Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn implicit_commit_classification() {
        for s in [
            "CREATE TABLE t (id int)",
            "-- note; with a semicolon\nALTER TABLE t ADD c int",
            "/* x */ drop table t",
            "RENAME TABLE a TO b",
            "TRUNCATE t",
            "GRANT SELECT ON *.* TO u",
            "LOCK TABLES t WRITE",
            "START TRANSACTION",
            "BEGIN",
            "COMMIT",
            "ROLLBACK",
            "CALL p()",
            "/*!40101 SET NAMES utf8 */",
            "CREATE PROCEDURE p() BEGIN SELECT 1; END",
            "SET autocommit = 0",
        ] {
            assert!(commits_implicitly(s), "{s}");
        }
        for s in [
            "INSERT INTO t VALUES (1)",
            "# hash comment\nupdate t set a = 1",
            "(SELECT 1) UNION (SELECT 2)",
            "SET @x = 1",
            "CREATE TEMPORARY TABLE t (id int)",
            "DROP TEMPORARY TABLE t",
            "ROLLBACK TO SAVEPOINT a",
            "LOAD DATA INFILE 'x' INTO TABLE t",
            "with x as (select 1) select * from x",
        ] {
            assert!(!commits_implicitly(s), "{s}");
        }
    }

    #[test]
    fn column_types_read_alike_on_mariadb_and_mysql() {
        assert_eq!(column_type("bigint(20)"), "bigint");
        assert_eq!(column_type("int(10) unsigned"), "int unsigned");
        assert_eq!(column_type("INT"), "int");
        assert_eq!(column_type("tinyint(1)"), "tinyint(1)");
        assert_eq!(column_type("int(5) unsigned zerofill"), "int(5) unsigned zerofill");
        assert_eq!(column_type("varchar(200)"), "varchar(200)");
        assert_eq!(column_type("decimal(12,2)"), "decimal(12,2)");
        assert_eq!(column_type("year(4)"), "year");
        assert_eq!(column_type("enum('a','b')"), "enum('a','b')");
    }

    #[test]
    fn servers() {
        let m = Server::from_version("10.11.6-MariaDB-0+deb12u1");
        assert!(m.mariadb && m.hidden_indexes && m.checks);
        let m = Server::from_version("10.5.2-MariaDB");
        assert!(m.mariadb && !m.hidden_indexes && m.checks);
        let m = Server::from_version("8.0.36");
        assert!(!m.mariadb && m.hidden_indexes && m.checks);
        let m = Server::from_version("8.0.12-log");
        assert!(!m.mariadb && !m.hidden_indexes && !m.checks);
    }

    #[test]
    fn scratch_names_and_urls() {
        assert!(check_scratch_name("kiln_verify_1_2").is_ok());
        for bad in ["kiln_verify_", "mysql", "kiln_verify_x`; DROP DATABASE mysql; --", &format!("kiln_verify_{}", "a".repeat(60))] {
            assert!(check_scratch_name(bad).is_err(), "{bad}");
        }
        assert_eq!(
            scratch_url("mariadb://u:p%40ss@localhost/app?socket=/run/mysqld/mysqld.sock", "kiln_verify_1").unwrap(),
            "mariadb://u:p%40ss@localhost/kiln_verify_1?socket=/run/mysqld/mysqld.sock"
        );
    }

    #[test]
    fn urls() {
        let p = |u: &str| parse_url(u, &redact(u));
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
