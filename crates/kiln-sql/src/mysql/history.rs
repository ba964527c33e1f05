//! kiln's history and event log: the SQL texts, the history rows, and
//! [`HistoryStore::commit`], which writes a [`Record`] in one transaction —
//! the body's own transaction when one is open (module docs of
//! [`super`]), so a body's last DML commits with its finish.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::NaiveDateTime;
use kiln_core::engine::{HistoryChange, HistoryStore, Record};
use kiln_core::{AppliedMigration, EngineError, LogEntry};
use sqlx::{AssertSqlSafe, Row};

use super::{error_number, MysqlEngine};
use crate::common::{quote_backtick, RawHistoryRow, HISTORY_COLUMNS, LOG_COLUMNS};

/// SQL built once from the configured table names; sqlx caches the prepared
/// statements by text, so each is prepared once per connection.
pub(super) struct Sql {
    pub(super) create: Arc<str>,
    select_history: Arc<str>,
    insert_history: Arc<str>,
    upsert_history: Arc<str>,
    /// [`HistoryChange::Put`] of one row followed by [`HistoryChange::Insert`]
    /// of another, in one statement (the core's merged finish and intent).
    put_and_insert: Arc<str>,
    delete_history: Arc<str>,
    /// One event; more events go in one statement built on demand ([`Sql::insert_log`]).
    insert_log: Arc<str>,
    log_table: String,
    pub(super) create_snapshot: Arc<str>,
    pub(super) insert_snapshot: Arc<str>,
    pub(super) select_snapshot: Arc<str>,
}

impl Sql {
    /// Table names are qualified with the database, so a migration's `USE other`
    /// cannot send kiln's own rows elsewhere.
    pub(super) fn new(database: &str, history: &str, log: &str, snapshot: &str) -> Self {
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
        // VALUES(col) rather than MySQL 8's row alias: MariaDB has no alias syntax.
        let updates = HISTORY_COLUMNS.split(", ").filter(|c| *c != "version").map(|c| format!("{c} = VALUES({c})")).collect::<Vec<_>>().join(", ");
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
            upsert_history: format!("INSERT INTO {h} ({HISTORY_COLUMNS}) VALUES ({q14}) ON DUPLICATE KEY UPDATE {updates}").into(),
            // Row 1 exists (`running`) and is changed: 2 affected rows; row 2 is new: 1.
            put_and_insert: format!("INSERT INTO {h} ({HISTORY_COLUMNS}) VALUES ({q14}), ({q14}) ON DUPLICATE KEY UPDATE {updates}").into(),
            delete_history: format!("DELETE FROM {h} WHERE version = ?").into(),
            insert_log: format!("INSERT INTO {l} ({LOG_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)").into(),
            log_table: l,
            insert_snapshot: format!("INSERT INTO {sn} (taken_at, snapshot) VALUES (?, ?)").into(),
            select_snapshot: format!("SELECT snapshot FROM {sn} ORDER BY id DESC LIMIT 1").into(),
            create_snapshot: create_snapshot.into(),
        }
    }

    /// The `INSERT` of `n` events in one statement.
    fn insert_log(&self, n: usize) -> Arc<str> {
        if n == 1 {
            return self.insert_log.clone();
        }
        let rows = vec!["(?, ?, ?, ?, ?, ?, ?, ?)"; n].join(", ");
        format!("INSERT INTO {} ({LOG_COLUMNS}) VALUES {rows}", self.log_table).into()
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

/// Bind the 8 event-log columns of `e`, in [`LOG_COLUMNS`] order.
fn bind_event<'q>(q: MyQuery<'q>, e: &LogEntry) -> MyQuery<'q> {
    q.bind(e.at.naive_utc())
        .bind(e.event.as_str())
        .bind(e.version.map(|v| v as i64))
        .bind(e.name.clone())
        .bind(e.batch)
        .bind(e.actor.clone())
        .bind(e.reason.clone())
        .bind(e.detail.clone())
}

impl MysqlEngine {
    /// Write `record` into the open transaction, one round trip per change
    /// (a Put followed by an Insert share one) and one for all the events.
    async fn write(&mut self, record: &Record) -> Result<(), EngineError> {
        let changes = &record.changes;
        let mut i = 0;
        while i < changes.len() {
            match (&changes[i], changes.get(i + 1)) {
                (HistoryChange::Put(done), Some(HistoryChange::Insert(next))) => {
                    let q = bind_row(bind_row(sqlx::query(AssertSqlSafe(self.sql.put_and_insert.clone())), done), next);
                    let context = format!("recording version {} and the start of version {} in {}", done.version, next.version, self.history_name);
                    let n = match q.execute(&mut self.conn).await {
                        Ok(r) => r.rows_affected(),
                        Err(e) => return Err(self.err(context, e)),
                    };
                    // An existing row of `next` would have been overwritten (and counted
                    // twice): refuse, and the caller's ROLLBACK undoes it.
                    if n != 3 {
                        return Err(EngineError::Query {
                            context: format!("{context} ({})", self.target),
                            message: format!(
                                "expected to finish version {} and add version {} (3 affected rows), the server reported {n}; is version {} already in {}? (another runner recorded it)",
                                done.version, next.version, next.version, self.history_name
                            ),
                        });
                    }
                    i += 2;
                    continue;
                }
                (HistoryChange::Insert(row), _) => {
                    let r = bind_row(sqlx::query(AssertSqlSafe(self.sql.insert_history.clone())), row).execute(&mut self.conn).await;
                    match r {
                        Ok(_) => {}
                        // ER_DUP_ENTRY
                        Err(e) if error_number(&e) == Some(1062) => {
                            return Err(EngineError::Query {
                                context: format!("recording the start of version {} in {} ({})", row.version, self.history_name, self.target),
                                message: format!("version {} is already recorded in {} (another runner recorded it)", row.version, self.history_name),
                            })
                        }
                        Err(e) => return Err(self.err(format!("writing version {} to {}", row.version, self.history_name), e)),
                    }
                }
                (HistoryChange::Put(row), _) => {
                    let r = bind_row(sqlx::query(AssertSqlSafe(self.sql.upsert_history.clone())), row).execute(&mut self.conn).await;
                    if let Err(e) = r {
                        return Err(self.err(format!("writing version {} to {}", row.version, self.history_name), e));
                    }
                }
                (HistoryChange::Delete(version), _) => {
                    let r = sqlx::query(AssertSqlSafe(self.sql.delete_history.clone())).bind(*version as i64).execute(&mut self.conn).await;
                    if let Err(e) = r {
                        return Err(self.err(format!("deleting version {version} from {}", self.history_name), e));
                    }
                }
            }
            i += 1;
        }
        if !record.events.is_empty() {
            let mut q = sqlx::query(AssertSqlSafe(self.sql.insert_log(record.events.len())));
            for e in &record.events {
                q = bind_event(q, e);
            }
            if let Err(e) = q.execute(&mut self.conn).await {
                return Err(self.err("writing the event log", e));
            }
        }
        Ok(())
    }
}

#[async_trait]
impl HistoryStore for MysqlEngine {
    async fn ensure(&mut self) -> Result<(), EngineError> {
        self.settle_lock().await?;
        // CREATE TABLE commits implicitly, ending any transaction of ours.
        self.in_tx = false;
        match sqlx::raw_sql(AssertSqlSafe(self.sql.create.clone())).execute(&mut self.conn).await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.err(format!("creating {}", self.history_name), e)),
        }
    }

    async fn list(&mut self) -> Result<Option<Vec<AppliedMigration>>, EngineError> {
        self.settle_lock().await?;
        let rows = match sqlx::query(AssertSqlSafe(self.sql.select_history.clone())).fetch_all(&mut self.conn).await {
            Ok(rows) => rows,
            // ER_NO_SUCH_TABLE: kiln never ran here.
            Err(e) if error_number(&e) == Some(1146) => return Ok(None),
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
            let version: Option<i64> = r.try_get(0).ok();
            let row = decode(r).map_err(|e| {
                let which = version.map_or_else(|| "an entry".to_string(), |v| format!("the entry of version {v}"));
                self.err(format!("reading {which} of {}", self.history_name), e)
            })?;
            out.push(row.into_applied());
        }
        Ok(Some(out))
    }

    /// One transaction: the open one (a body's, left open by `run_one`, whose
    /// last DML thereby commits with its finish), else a new one. On any error
    /// the transaction is rolled back — with the body's uncommitted DML, so a
    /// finish is never committed without what it records; its `running` entry
    /// stays and blocks the next run. `durable` needs nothing beyond `COMMIT`
    /// (InnoDB flushes its log at every commit by default).
    async fn commit(&mut self, record: &Record) -> Result<(), EngineError> {
        self.settle_lock().await?;
        if record.is_empty() {
            return Ok(());
        }
        if !self.in_tx {
            self.raw("BEGIN", "writing the history").await?;
            self.in_tx = true;
        }
        if let Err(e) = self.write(record).await {
            if let Err(rb) = self.roll_back().await {
                tracing::debug!("rolling back after a failed history write: {rb}");
            }
            return Err(e);
        }
        self.in_tx = false;
        match sqlx::raw_sql("COMMIT").execute(&mut self.conn).await {
            Ok(_) => Ok(()),
            Err(e) => {
                let err = self.err(format!("committing to {}", self.history_name), e);
                let _ = self.roll_back().await;
                Err(err)
            }
        }
    }
}
