//! kiln's own tables on SQLite: their SQL, reading history rows back, and
//! [`HistoryStore::commit`], which writes a [`Record`] in one
//! `BEGIN IMMEDIATE … COMMIT`.
//!
//! Timestamps are stored as RFC 3339 text, UTC, milliseconds ([`ts`]): it
//! sorts as text and reads back exactly.

use async_trait::async_trait;
use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
use kiln_core::engine::{HistoryChange, HistoryStore, Record};
use kiln_core::{AppliedMigration, EngineError, LogEntry};
use rusqlite::ffi::{SQLITE_CONSTRAINT_PRIMARYKEY, SQLITE_CONSTRAINT_UNIQUE};
use rusqlite::{params, ErrorCode, OptionalExtension};

use super::SqliteEngine;
use crate::common::{quote_double, RawHistoryRow, HISTORY_COLUMNS, LOG_COLUMNS};

/// SQL text built once from the configured table names, so prepared statements
/// are found again in rusqlite's statement cache.
pub(super) struct Sql {
    create: String,
    select_history: String,
    insert_history: String,
    upsert_history: String,
    delete_history: String,
    insert_log: String,
    pub(super) create_snapshot: String,
    pub(super) insert_snapshot: String,
    pub(super) select_snapshot: String,
}

impl Sql {
    pub(super) fn new(history: &str, log: &str, snapshot: &str) -> Self {
        let h = quote_double(history);
        let l = quote_double(log);
        let sn = quote_double(snapshot);
        // Snapshots are only appended (older rows are the schema's history), so
        // `INTEGER PRIMARY KEY` numbers them in order without AUTOINCREMENT's
        // `sqlite_sequence` bookkeeping; the newest is the highest id.
        let create_snapshot = format!("CREATE TABLE IF NOT EXISTS {sn} (id INTEGER PRIMARY KEY, taken_at TEXT NOT NULL, snapshot TEXT NOT NULL);");
        let cols14 = "?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14";
        Sql {
            // `version INTEGER PRIMARY KEY` makes the version the rowid (no
            // separate index to maintain); the log's `id` likewise. The log needs
            // no AUTOINCREMENT: kiln never deletes from it, so ids are never reused.
            create: format!(
                "CREATE TABLE IF NOT EXISTS {h} (
                    version INTEGER PRIMARY KEY,
                    description TEXT NOT NULL,
                    script TEXT NOT NULL,
                    migration_group TEXT,
                    checksum TEXT NOT NULL,
                    state TEXT NOT NULL,
                    batch INTEGER NOT NULL,
                    applied_at TEXT NOT NULL,
                    duration_ms INTEGER NOT NULL,
                    applied_by TEXT NOT NULL,
                    kiln_version TEXT NOT NULL,
                    error TEXT,
                    error_statement INTEGER,
                    error_line INTEGER
                );
                CREATE TABLE IF NOT EXISTS {l} (
                    id INTEGER PRIMARY KEY,
                    at TEXT NOT NULL,
                    event TEXT NOT NULL,
                    version INTEGER,
                    name TEXT,
                    batch INTEGER,
                    actor TEXT NOT NULL,
                    reason TEXT,
                    detail TEXT
                );
                {create_snapshot}"
            ),
            select_history: format!("SELECT {HISTORY_COLUMNS} FROM {h} ORDER BY version"),
            insert_history: format!("INSERT INTO {h} ({HISTORY_COLUMNS}) VALUES ({cols14})"),
            upsert_history: format!("INSERT OR REPLACE INTO {h} ({HISTORY_COLUMNS}) VALUES ({cols14})"),
            delete_history: format!("DELETE FROM {h} WHERE version = ?1"),
            insert_log: format!("INSERT INTO {l} ({LOG_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"),
            insert_snapshot: format!("INSERT INTO {sn} (taken_at, snapshot) VALUES (?1, ?2)"),
            select_snapshot: format!("SELECT snapshot FROM {sn} ORDER BY id DESC LIMIT 1"),
            create_snapshot,
        }
    }
}

/// The finish time and duration the engine's clock gives the rows of one
/// version in a record written by [`SqliteEngine::write_record`].
pub(super) struct Clock<'a> {
    pub(super) version: u64,
    pub(super) at: &'a DateTime<Utc>,
    pub(super) ms: i64,
}

impl SqliteEngine {
    /// Inside an open transaction: apply `record`'s changes, then append its
    /// events. Rows of `clock.version` get `clock`'s finish time and duration.
    /// The caller commits, or rolls back on `Err`.
    pub(super) fn write_record(&self, record: &Record, clock: Option<&Clock<'_>>) -> Result<(), EngineError> {
        for change in &record.changes {
            match change {
                HistoryChange::Insert(row) => self.write_history(&self.sql.insert_history, row, clock).map_err(|e| {
                    let v = &row.version;
                    match e.sqlite_error() {
                        Some(f)
                            if f.code == ErrorCode::ConstraintViolation
                                && [SQLITE_CONSTRAINT_PRIMARYKEY, SQLITE_CONSTRAINT_UNIQUE].contains(&f.extended_code) =>
                        {
                            EngineError::Query {
                                context: format!("recording version {v} in {} ({})", self.history_name, self.target),
                                message: format!("version {v} is already recorded in {} (another runner recorded it): {e}", self.history_name),
                            }
                        }
                        _ => self.query_err(format!("recording version {v} in {}", self.history_name), e),
                    }
                })?,
                HistoryChange::Put(row) => self
                    .write_history(&self.sql.upsert_history, row, clock)
                    .map_err(|e| self.query_err(format!("recording version {} in {}", row.version, self.history_name), e))?,
                HistoryChange::Delete(version) => self
                    .conn
                    .prepare_cached(&self.sql.delete_history)
                    .and_then(|mut s| s.execute([*version as i64]))
                    .map(|_| ())
                    .map_err(|e| self.query_err(format!("deleting version {version} from {}", self.history_name), e))?,
            }
        }
        for event in &record.events {
            self.insert_log(event).map_err(|e| self.query_err(format!("writing the {} event to the event log", event.event), e))?;
        }
        Ok(())
    }

    fn insert_log(&self, e: &LogEntry) -> rusqlite::Result<()> {
        self.conn.prepare_cached(&self.sql.insert_log)?.execute(params![
            ts(&e.at),
            e.event.as_str(),
            e.version.map(|v| v as i64),
            e.name,
            e.batch,
            e.actor,
            e.reason,
            e.detail
        ])?;
        Ok(())
    }

    fn write_history(&self, sql: &str, a: &AppliedMigration, clock: Option<&Clock<'_>>) -> rusqlite::Result<()> {
        let (at, ms) = match clock {
            Some(c) if c.version == a.version.number => (c.at, c.ms),
            _ => (&a.applied_at, a.duration_ms),
        };
        self.conn.prepare_cached(sql)?.execute(params![
            a.version.number as i64,
            a.description,
            a.script,
            a.group,
            a.checksum.0,
            a.state.as_str(),
            a.batch,
            ts(at),
            ms,
            a.applied_by,
            a.kiln_version,
            a.error.as_ref().map(|e| e.message.as_str()),
            a.error.as_ref().and_then(|e| e.statement).map(i64::from),
            a.error.as_ref().and_then(|e| e.line).map(i64::from),
        ])?;
        Ok(())
    }

    /// Whether `name` is a table of the main database.
    pub(super) fn table_exists(&self, name: &str) -> Result<bool, EngineError> {
        self.conn
            .prepare_cached("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1")
            .and_then(|mut s| s.query_row([name], |_| Ok(())).optional())
            .map(|found| found.is_some())
            .map_err(|e| self.query_err(format!("looking for the table {name}"), e))
    }

    fn read_history(&self) -> Result<Option<Vec<AppliedMigration>>, EngineError> {
        if !self.table_exists(&self.history_name)? {
            return Ok(None);
        }
        let ctx = || format!("reading {}", self.history_name);
        let mut stmt = self.conn.prepare_cached(&self.sql.select_history).map_err(|e| self.query_err(ctx(), e))?;
        let rows = stmt
            .query_map([], |r| {
                let at: String = r.get(7)?;
                Ok((
                    at,
                    RawHistoryRow {
                        version: r.get(0)?,
                        description: r.get(1)?,
                        script: r.get(2)?,
                        group: r.get(3)?,
                        checksum: r.get(4)?,
                        state: r.get(5)?,
                        batch: r.get(6)?,
                        applied_at: DateTime::<Utc>::UNIX_EPOCH,
                        duration_ms: r.get(8)?,
                        applied_by: r.get(9)?,
                        kiln_version: r.get(10)?,
                        error: r.get(11)?,
                        error_statement: r.get(12)?,
                        error_line: r.get(13)?,
                    },
                ))
            })
            .map_err(|e| self.query_err(ctx(), e))?;
        let mut out = Vec::new();
        for row in rows {
            let (at, mut raw) = row.map_err(|e| self.query_err(ctx(), e))?;
            raw.applied_at = parse_ts(&at).ok_or_else(|| EngineError::Query {
                context: ctx(),
                message: format!("version {}: applied_at {at:?} is not an RFC 3339 timestamp", raw.version),
            })?;
            out.push(raw.into_applied());
        }
        Ok(Some(out))
    }
}

#[async_trait]
impl HistoryStore for SqliteEngine {
    async fn ensure(&mut self) -> Result<(), EngineError> {
        self.conn.execute_batch(&self.sql.create).map_err(|e| self.query_err(format!("creating {}", self.history_name), e))
    }

    async fn list(&mut self) -> Result<Option<Vec<AppliedMigration>>, EngineError> {
        self.read_history()
    }

    /// One `BEGIN IMMEDIATE … COMMIT`; on any error the transaction is rolled
    /// back and nothing of the record remains. In WAL mode a commit reaches
    /// the disk only when [`Record::durable`] is set, and then with every
    /// commit before it (see [`super::journal`]); otherwise each commit is
    /// as durable as `synchronous = FULL` makes it.
    async fn commit(&mut self, record: &Record) -> Result<(), EngineError> {
        if record.is_empty() {
            // Nothing to write, but a durable record still makes the commits
            // before it durable: a checkpoint flushes the write-ahead log.
            if record.durable && self.wal {
                self.conn
                    .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    .map_err(|e| self.query_err("flushing the write-ahead log to disk", e))?;
            }
            return Ok(());
        }
        let written = self
            .begin(record.durable)
            .map_err(|e| self.query_err(format!("starting a transaction to write {}", self.history_name), e))
            .and_then(|()| self.write_record(record, None))
            .and_then(|()| self.conn.execute_batch("COMMIT").map_err(|e| self.query_err(format!("committing to {}", self.history_name), e)));
        if written.is_err() {
            self.rollback();
        }
        self.end();
        written
    }
}

/// RFC 3339, UTC, milliseconds: sorts as text and reads back exactly.
pub(super) fn ts(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// RFC 3339, or SQLite's own `YYYY-MM-DD HH:MM:SS[.fff]` (UTC) for adopted tables.
pub(super) fn parse_ts(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .map(|d| d.with_timezone(&Utc))
        .ok()
        .or_else(|| NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f").ok().map(|n| n.and_utc()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip() {
        let t = DateTime::parse_from_rfc3339("2025-11-01T12:30:00.123Z").unwrap().with_timezone(&Utc);
        assert_eq!(ts(&t), "2025-11-01T12:30:00.123Z");
        assert_eq!(parse_ts(&ts(&t)), Some(t));
        assert!(parse_ts("2025-11-01 12:30:00").is_some());
        assert!(parse_ts("yesterday").is_none());
    }
}
