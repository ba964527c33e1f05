//! kiln's history table and event log: created on demand, read in one round
//! trip, and written as one pipelined transaction per [`Record`].

use std::fmt::Write as _;

use async_trait::async_trait;
use kiln_core::engine::{HistoryChange, HistoryStore, Record};
use kiln_core::{AppliedMigration, EngineError, LogEntry};
use tokio_postgres::types::{ToSql, Type};

use super::conn::{error_text, is_connection_loss};
use super::exec::{run_items, Item, Tag};
use super::inspect::SNAPSHOT_COLUMNS;
use super::PgBackend;
use crate::common::{quote_double, RawHistoryRow, HISTORY_COLUMNS, LOG_COLUMNS};

#[async_trait]
impl HistoryStore for PgBackend {
    async fn ensure(&mut self) -> Result<(), EngineError> {
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

    async fn list(&mut self) -> Result<Option<Vec<AppliedMigration>>, EngineError> {
        let context = format!("reading the history table {}", self.history);
        // Both queries go out in one round trip (tokio-postgres pipelines them);
        // on a database kiln never touched the second fails and is ignored.
        let sql = format!("SELECT {HISTORY_COLUMNS} FROM {} ORDER BY version", self.history);
        let params = [(&self.history as &(dyn tokio_postgres::types::ToSql + Sync), Type::TEXT)];
        let (exists, rows) =
            futures::join!(self.client.query_typed_one("SELECT to_regclass($1) IS NOT NULL", &params), self.client.query_typed(&sql, &[]));
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

    /// One pipeline, one round trip: `BEGIN` with `synchronous_commit` off
    /// (on when `record.durable`: that commit's WAL flush also makes every
    /// earlier asynchronous commit of the session durable), the changes, the
    /// events, `COMMIT`. PostgreSQL aborts the transaction at the first
    /// failing write, so the `COMMIT` then rolls everything back.
    async fn commit(&mut self, record: &Record) -> Result<(), EngineError> {
        let prelude = if record.durable { "BEGIN; SET LOCAL synchronous_commit TO on" } else { "BEGIN; SET LOCAL synchronous_commit TO off" };
        let vals = RecordVals::new(record);
        let mut items: Vec<(Tag, Item<'_>)> = Vec::with_capacity(record.changes.len() + record.events.len() + 3);
        items.push((Tag::Prelude, Item::Simple(prelude)));
        vals.push(&self.sql, None, &mut items);
        if record.is_empty() {
            if !record.durable {
                return Ok(());
            }
            // Nothing to write, but earlier commits must reach the disk: a
            // transaction with an xid writes a commit record, and flushing it
            // flushes the WAL before it.
            items.push((Tag::Record, Item::Simple("SELECT txid_current()")));
        }
        items.push((Tag::Commit, Item::Simple("COMMIT")));
        match run_items(&self.client, &items, true).await {
            Ok(()) => Ok(()),
            Err((Tag::Insert(version), e)) if !is_connection_loss(&e) && e.as_db_error().is_some_and(|d| d.code().code() == "23505") => {
                Err(EngineError::Query {
                    context: format!("recording version {version} in the history table {}", self.history),
                    message: format!(
                        "version {version} is already recorded (another runner recorded it); nothing of this write was committed ({})",
                        error_text(&e)
                    ),
                })
            }
            Err((_, e)) => Err(self.engine_error(&format!("writing the history table {} and the event log {}", self.history, self.log_table), &e)),
        }
    }
}

/// The SQL of kiln's own writes, built once at connect (the table names are
/// quoted and schema-qualified).
pub(super) struct RecordSql {
    /// `INSERT` of a new entry (fails on an existing version).
    insert: String,
    /// The same, `applied_at` and `duration_ms` from the server clock.
    insert_now: String,
    /// Insert or replace an entry.
    put: String,
    /// The same, `applied_at` and `duration_ms` from the server clock.
    put_now: String,
    delete: String,
    event: String,
}

impl RecordSql {
    pub(super) fn new(history: &str, log_table: &str) -> Self {
        const GIVEN: &str = "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14";
        // Duration since the transaction began: the one pipeline of an atomic
        // step is one transaction, so only the server knows when its body ended.
        const NOW: &str =
            "$1, $2, $3, $4, $5, $6, $7, clock_timestamp(), (extract(epoch FROM clock_timestamp() - now()) * 1000)::bigint, $8, $9, $10, $11, $12";
        const UPSERT: &str = " ON CONFLICT (version) DO UPDATE SET description = EXCLUDED.description, script = EXCLUDED.script, \
             migration_group = EXCLUDED.migration_group, checksum = EXCLUDED.checksum, state = EXCLUDED.state, batch = EXCLUDED.batch, \
             applied_at = EXCLUDED.applied_at, duration_ms = EXCLUDED.duration_ms, applied_by = EXCLUDED.applied_by, \
             kiln_version = EXCLUDED.kiln_version, error = EXCLUDED.error, error_statement = EXCLUDED.error_statement, error_line = EXCLUDED.error_line";
        let insert = |values: &str| format!("INSERT INTO {history} ({HISTORY_COLUMNS}) VALUES ({values})");
        RecordSql {
            insert: insert(GIVEN),
            insert_now: insert(NOW),
            put: insert(GIVEN) + UPSERT,
            put_now: insert(NOW) + UPSERT,
            delete: format!("DELETE FROM {history} WHERE version = $1"),
            event: format!("INSERT INTO {log_table} ({LOG_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"),
        }
    }
}

/// A [`Record`] with the bound values that are not its fields as they are.
pub(super) struct RecordVals<'r> {
    changes: Vec<ChangeVals<'r>>,
    /// Each event, with its version as a bigint.
    events: Vec<(&'r LogEntry, Option<i64>, &'static str)>,
}

enum ChangeVals<'r> {
    Row {
        row: &'r AppliedMigration,
        insert: bool,
        version: i64,
        state: &'static str,
        error: Option<String>,
        statement: Option<i32>,
        line: Option<i32>,
    },
    Delete(i64),
}

impl<'r> RecordVals<'r> {
    pub(super) fn new(record: &'r Record) -> Self {
        let row = |a: &'r AppliedMigration, insert: bool| ChangeVals::Row {
            row: a,
            insert,
            version: a.version.number as i64,
            state: a.state.as_str(),
            error: a.error.as_ref().map(|f| f.message.clone()),
            statement: a.error.as_ref().and_then(|f| f.statement).map(|v| v as i32),
            line: a.error.as_ref().and_then(|f| f.line).map(|v| v as i32),
        };
        let changes = record
            .changes
            .iter()
            .map(|c| match c {
                HistoryChange::Insert(a) => row(a, true),
                HistoryChange::Put(a) => row(a, false),
                HistoryChange::Delete(v) => ChangeVals::Delete(*v as i64),
            })
            .collect();
        let events = record.events.iter().map(|e| (e, e.version.map(|v| v as i64), e.event.as_str())).collect();
        RecordVals { changes, events }
    }

    /// Append the writes of the record to `items`: its changes, then its
    /// events. Rows of version `server_clock` take `applied_at` and
    /// `duration_ms` from the server clock (see [`RecordSql::new`]).
    pub(super) fn push<'a>(&'a self, sql: &'a RecordSql, server_clock: Option<u64>, items: &mut Vec<(Tag, Item<'a>)>) {
        for change in &self.changes {
            let (a, insert, version, state, error, statement, line) = match change {
                ChangeVals::Delete(v) => {
                    items.push((Tag::Record, Item::Typed(&sql.delete, vec![(v, Type::INT8)])));
                    continue;
                }
                ChangeVals::Row { row, insert, version, state, error, statement, line } => (*row, *insert, version, state, error, statement, line),
            };
            let now = server_clock == Some(a.version.number);
            let mut params: Vec<(&(dyn ToSql + Sync), Type)> = vec![
                (version, Type::INT8),
                (&a.description, Type::TEXT),
                (&a.script, Type::TEXT),
                (&a.group, Type::TEXT),
                (&a.checksum.0, Type::TEXT),
                (state, Type::TEXT),
                (&a.batch, Type::INT8),
            ];
            if !now {
                params.push((&a.applied_at, Type::TIMESTAMPTZ));
                params.push((&a.duration_ms, Type::INT8));
            }
            params.extend([
                (&a.applied_by as &(dyn ToSql + Sync), Type::TEXT),
                (&a.kiln_version, Type::TEXT),
                (error, Type::TEXT),
                (statement, Type::INT4),
                (line, Type::INT4),
            ]);
            let (tag, text) = match (insert, now) {
                (true, false) => (Tag::Insert(a.version.number), &sql.insert),
                (true, true) => (Tag::Insert(a.version.number), &sql.insert_now),
                (false, false) => (Tag::Record, &sql.put),
                (false, true) => (Tag::Record, &sql.put_now),
            };
            items.push((tag, Item::Typed(text, params)));
        }
        for (e, version, kind) in &self.events {
            let params: Vec<(&(dyn ToSql + Sync), Type)> = vec![
                (&e.at, Type::TIMESTAMPTZ),
                (kind, Type::TEXT),
                (version, Type::INT8),
                (&e.name, Type::TEXT),
                (&e.batch, Type::INT8),
                (&e.actor, Type::TEXT),
                (&e.reason, Type::TEXT),
                (&e.detail, Type::TEXT),
            ];
            items.push((Tag::Record, Item::Typed(&sql.event, params)));
        }
    }
}
