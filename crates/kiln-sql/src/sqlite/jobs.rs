//! [`JobStore`] on SQLite: `kiln_jobs` in the main database, timestamps as
//! RFC 3339 text like the history's ([`super::history::ts`]).
//!
//! SQLite has one writer at a time, so the write lock does what `FOR UPDATE
//! SKIP LOCKED` does elsewhere: a claim is one `UPDATE … RETURNING` (atomic
//! on its own), and a batch is one `BEGIN IMMEDIATE … COMMIT` that takes the
//! write lock first, so workers on other connections wait (up to the busy
//! timeout) instead of interleaving. Keys are bound as text parameters: an
//! integer key column's affinity turns them back into numbers for the
//! comparison, and a text key compares as text.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use kiln_core::jobs::{bind_range, Backfill, BackfillPlan, Batch, BatchError, BatchOutcome, Job, JobControl, JobState, JobStore};
use kiln_core::EngineError;
use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, ErrorCode, OptionalExtension, Row};

use super::history::{parse_ts, ts};
use super::SqliteEngine;
use crate::common::quote_double;
use crate::jobs_common::{
    key_not_unique, no_key, no_table, quote_path, save_set, spec_json, split_offsets, split_path, sql_spec, state_list, walk_sql, RawJobRow,
    JOB_COLUMNS,
};

/// A row with its timestamps still as stored.
struct Stored {
    raw: RawJobRow,
    times: [Option<String>; 5],
}

fn read_row(r: &Row<'_>) -> rusqlite::Result<Stored> {
    let epoch = DateTime::<Utc>::UNIX_EPOCH;
    Ok(Stored {
        raw: RawJobRow {
            version: r.get(0)?,
            part: r.get(1)?,
            name: r.get(2)?,
            parts: r.get(3)?,
            state: r.get(4)?,
            spec: r.get(5)?,
            batch_size: r.get(6)?,
            pause_ms: r.get(7)?,
            max_rows_per_sec: r.get(8)?,
            range_lo: r.get(9)?,
            range_hi: r.get(10)?,
            cursor: r.get(11)?,
            rows_done: r.get(12)?,
            rows_total: r.get(13)?,
            batches: r.get(14)?,
            attempts: r.get(15)?,
            lease_owner: r.get(16)?,
            lease_until: None,
            created_at: epoch,
            started_at: None,
            updated_at: epoch,
            finished_at: None,
            error: r.get(22)?,
        },
        times: [r.get(17)?, r.get(18)?, r.get(19)?, r.get(20)?, r.get(21)?],
    })
}

/// Every column of `j` as SQLite values, in [`JOB_COLUMNS`] order.
fn job_values(j: &Job) -> Vec<Value> {
    let text = |s: &Option<String>| s.clone().map_or(Value::Null, Value::Text);
    let time = |t: &Option<DateTime<Utc>>| t.as_ref().map_or(Value::Null, |t| Value::Text(ts(t)));
    vec![
        Value::Integer(j.version as i64),
        Value::Integer(j.part.into()),
        Value::Text(j.name.clone()),
        Value::Integer(j.parts.into()),
        Value::Text(j.state.as_str().into()),
        Value::Text(spec_json(j)),
        Value::Integer(j.throttle.batch.into()),
        Value::Integer(j.throttle.pause_ms as i64),
        j.throttle.max_rows_per_sec.map_or(Value::Null, |m| Value::Integer(m as i64)),
        text(&j.range_lo),
        text(&j.range_hi),
        text(&j.cursor),
        Value::Integer(j.rows_done),
        j.rows_total.map_or(Value::Null, Value::Integer),
        Value::Integer(j.batches),
        Value::Integer(j.attempts.into()),
        text(&j.lease_owner),
        time(&j.lease_until),
        Value::Text(ts(&j.created_at)),
        time(&j.started_at),
        Value::Text(ts(&j.updated_at)),
        time(&j.finished_at),
        text(&j.error),
    ]
}

/// How a batch transaction ends.
enum End {
    Commit(Batch),
    Rollback(BatchOutcome),
}

impl SqliteEngine {
    fn to_job(&self, s: Stored, context: &str) -> Result<Job, EngineError> {
        let mut raw = s.raw;
        let bad = |v: &str| EngineError::Query {
            context: context.to_string(),
            message: format!("{v:?} in {} is not an RFC 3339 timestamp", self.jobs_table),
        };
        let parse = |v: &Option<String>| v.as_deref().map(|t| parse_ts(t).ok_or_else(|| bad(t))).transpose();
        raw.lease_until = parse(&s.times[0])?;
        raw.created_at = parse(&s.times[1])?.unwrap_or(DateTime::<Utc>::UNIX_EPOCH);
        raw.started_at = parse(&s.times[2])?;
        raw.updated_at = parse(&s.times[3])?.unwrap_or(DateTime::<Utc>::UNIX_EPOCH);
        raw.finished_at = parse(&s.times[4])?;
        raw.into_job(&self.jobs_table)
    }

    fn select_part(&self) -> String {
        format!("SELECT {JOB_COLUMNS} FROM {} WHERE version = ?1 AND part = ?2", self.jobs_table)
    }

    /// The part as stored, inside the caller's transaction.
    fn read_part(&self, version: i64, part: i64, context: &str) -> Result<Option<Job>, EngineError> {
        let stored = self
            .conn
            .prepare_cached(&self.select_part())
            .and_then(|mut s| s.query_row(params![version, part], read_row).optional())
            .map_err(|e| self.query_err(context, e))?;
        stored.map(|s| self.to_job(s, context)).transpose()
    }

    fn batch_in_tx(&self, job: &Job, owner: &str, until: DateTime<Utc>, context: &str) -> Result<End, BatchError> {
        let spec = sql_spec(&job.spec, "SQLite")?;
        let (version, part) = (job.version as i64, i64::from(job.part));
        let Some(stored) = self.read_part(version, part, context)? else { return Ok(End::Rollback(BatchOutcome::Lost)) };
        // Not this worker's any more, or paused/cancelled by an operator: the
        // worker loop releases the lease (if still its own) and stops.
        if stored.lease_owner.as_deref() != Some(owner) || stored.cursor != job.cursor || stored.state != JobState::Running {
            return Ok(End::Rollback(BatchOutcome::Lost));
        }

        let (table, key) = (quote_path(&spec.table, quote_double), quote_double(&spec.key));
        let mut binds: Vec<String> = Vec::new();
        let walk = walk_sql(&table, &key, &stored, |x| format!("CAST({x} AS TEXT)"), &mut |v| {
            binds.push(v.to_string());
            format!("?{}", binds.len())
        });
        let keys = self
            .conn
            .prepare(&walk)
            .and_then(|mut s| {
                s.query_row(params_from_iter(binds.iter()), |r| {
                    Ok((r.get::<_, i64>(2)?, r.get::<_, Option<String>>(0)?, r.get::<_, Option<String>>(1)?))
                })
            })
            .map_err(|e| self.query_err(context, e))?;
        let (count, Some(lo), Some(hi)) = keys else { return Ok(End::Rollback(BatchOutcome::Exhausted)) };
        if count == 0 {
            return Ok(End::Rollback(BatchOutcome::Exhausted));
        }

        let statement = bind_range(&spec.statement.sql, &lo, &hi);
        let changed = match self.conn.execute(&statement, []) {
            Ok(n) => n as i64,
            Err(e) => {
                let (message, transient) = match &e {
                    rusqlite::Error::SqliteFailure(f, msg) => (
                        format!("{} (SQLite error {})", msg.clone().unwrap_or_else(|| f.to_string()), f.extended_code),
                        matches!(f.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked),
                    ),
                    other => (other.to_string(), false),
                };
                return Err(BatchError::Statement { message, lo, hi, transient });
            }
        };

        let advance = format!(
            "UPDATE {} SET cursor = ?1, rows_done = rows_done + ?2, batches = batches + 1, lease_until = ?3, updated_at = ?4 \
             WHERE version = ?5 AND part = ?6 AND lease_owner = ?7 AND state = 'running' AND cursor IS ?8",
            self.jobs_table
        );
        let moved = self
            .conn
            .prepare_cached(&advance)
            .and_then(|mut s| s.execute(params![hi, count, ts(&until), ts(&Utc::now()), version, part, owner, job.cursor]))
            .map_err(|e| self.query_err(context, e))?;
        if moved == 0 {
            return Ok(End::Rollback(BatchOutcome::Lost));
        }
        let Some(job) = self.read_part(version, part, context)? else { return Ok(End::Rollback(BatchOutcome::Lost)) };
        Ok(End::Commit(Batch { lo, hi, keys: count, changed, job }))
    }

    fn count_query(&self, sql: &str, args: &[&dyn rusqlite::ToSql], context: &str) -> Result<i64, EngineError> {
        self.conn.prepare(sql).and_then(|mut s| s.query_row(args, |r| r.get::<_, i64>(0))).map_err(|e| self.query_err(context, e))
    }
}

#[async_trait]
impl JobStore for SqliteEngine {
    async fn ensure_jobs(&mut self) -> Result<(), EngineError> {
        let ddl = format!(
            "CREATE TABLE IF NOT EXISTS {} (
                version INTEGER NOT NULL,
                part INTEGER NOT NULL,
                name TEXT NOT NULL,
                parts INTEGER NOT NULL,
                state TEXT NOT NULL,
                spec TEXT NOT NULL,
                batch_size INTEGER NOT NULL,
                pause_ms INTEGER NOT NULL,
                max_rows_per_sec INTEGER,
                range_lo TEXT,
                range_hi TEXT,
                cursor TEXT,
                rows_done INTEGER NOT NULL,
                rows_total INTEGER,
                batches INTEGER NOT NULL,
                attempts INTEGER NOT NULL,
                lease_owner TEXT,
                lease_until TEXT,
                created_at TEXT NOT NULL,
                started_at TEXT,
                updated_at TEXT NOT NULL,
                finished_at TEXT,
                error TEXT,
                PRIMARY KEY (version, part)
            )",
            self.jobs_table
        );
        self.conn.execute_batch(&ddl).map_err(|e| self.query_err(format!("creating {}", self.jobs_table), e))
    }

    async fn list_jobs(&mut self) -> Result<Vec<Job>, EngineError> {
        let context = format!("reading {}", self.jobs_table);
        if !self.table_exists(&self.jobs_name)? {
            return Ok(Vec::new());
        }
        let sql = format!("SELECT {JOB_COLUMNS} FROM {} ORDER BY version, part", self.jobs_table);
        let rows = self
            .conn
            .prepare_cached(&sql)
            .and_then(|mut s| s.query_map([], read_row)?.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.query_err(&context, e))?;
        rows.into_iter().map(|s| self.to_job(s, &context)).collect()
    }

    async fn replace_jobs(&mut self, version: u64, parts: &[Job]) -> Result<(), EngineError> {
        let context = format!("queueing job {version} in {}", self.jobs_table);
        let placeholders = (1..=23).map(|i| format!("?{i}")).collect::<Vec<_>>().join(", ");
        let insert = format!("INSERT INTO {} ({JOB_COLUMNS}) VALUES ({placeholders})", self.jobs_table);
        let delete = format!("DELETE FROM {} WHERE version = ?1", self.jobs_table);
        let written = self.begin(false).and_then(|()| {
            self.conn.prepare_cached(&delete)?.execute([version as i64])?;
            let mut ins = self.conn.prepare_cached(&insert)?;
            for j in parts {
                ins.execute(params_from_iter(job_values(j)))?;
            }
            drop(ins);
            self.conn.execute_batch("COMMIT")
        });
        if written.is_err() {
            self.rollback();
        }
        self.end();
        written.map_err(|e| self.query_err(context, e))
    }

    async fn claim_job(&mut self, owner: &str, now: DateTime<Utc>, until: DateTime<Utc>, only: Option<u64>) -> Result<Option<Job>, EngineError> {
        let context = format!("claiming a backfill part in {}", self.jobs_table);
        if !self.table_exists(&self.jobs_name)? {
            return Ok(None);
        }
        let t = &self.jobs_table;
        // One statement, so one write transaction: no other claimer can take
        // the same row between the choice and the update.
        let sql = format!(
            "UPDATE {t} SET state = 'running', lease_owner = ?1, lease_until = ?3, attempts = attempts + 1, \
             started_at = COALESCE(started_at, ?2), updated_at = ?2 \
             WHERE rowid = (SELECT rowid FROM {t} WHERE (state = 'queued' OR (state = 'running' AND (lease_until IS NULL OR lease_until < ?2))) \
               AND (?4 IS NULL OR version = ?4) ORDER BY version, part LIMIT 1) \
             RETURNING {JOB_COLUMNS}"
        );
        let stored = self
            .conn
            .prepare_cached(&sql)
            .and_then(|mut s| s.query_row(params![owner, ts(&now), ts(&until), only.map(|v| v as i64)], read_row).optional())
            .map_err(|e| self.query_err(&context, e))?;
        stored.map(|s| self.to_job(s, &context)).transpose()
    }

    async fn control_job(&mut self, version: u64, control: &JobControl) -> Result<u64, EngineError> {
        let context = format!("changing job {version} in {}", self.jobs_table);
        if !self.table_exists(&self.jobs_name)? {
            return Ok(0);
        }
        let t = &self.jobs_table;
        let now = ts(&Utc::now());
        let changed = match (control, control.transition()) {
            (_, Some((from, to))) => {
                let mut set = format!("state = '{}', updated_at = ?2", to.as_str());
                if matches!(control, JobControl::Retry) {
                    set.push_str(", attempts = 0, error = NULL, finished_at = NULL");
                }
                if to == JobState::Cancelled {
                    set.push_str(", finished_at = ?2");
                }
                let sql = format!("UPDATE {t} SET {set} WHERE version = ?1 AND state IN ({})", state_list(from));
                self.conn.prepare_cached(&sql).and_then(|mut s| s.execute(params![version as i64, now]))
            }
            (JobControl::Throttle { batch, pause_ms, max_rows_per_sec }, None) => {
                let sql = format!(
                    "UPDATE {t} SET batch_size = COALESCE(?3, batch_size), pause_ms = COALESCE(?4, pause_ms), \
                     max_rows_per_sec = CASE WHEN ?5 THEN ?6 ELSE max_rows_per_sec END, updated_at = ?2 WHERE version = ?1"
                );
                self.conn.prepare_cached(&sql).and_then(|mut s| {
                    s.execute(params![
                        version as i64,
                        now,
                        batch.map(|b| b.max(1) as i64),
                        pause_ms.map(|p| p as i64),
                        max_rows_per_sec.is_some(),
                        max_rows_per_sec.flatten().map(|m| m as i64)
                    ])
                })
            }
            (_, None) => return Ok(0),
        };
        changed.map(|n| n as u64).map_err(|e| self.query_err(context, e))
    }

    async fn save_job(&mut self, job: &Job, owner: &str) -> Result<Option<Job>, EngineError> {
        let context = format!("saving job {} part {} in {}", job.version, job.part, self.jobs_table);
        let names = ["lease_owner", "lease_until", "error", "attempts", "finished_at", "updated_at", "state"];
        let set = save_set(&|n| format!("?{}", names.iter().position(|x| *x == n).map_or(0, |i| i + 1)));
        let sql = format!("UPDATE {} SET {set} WHERE version = ?8 AND part = ?9 AND lease_owner = ?10 RETURNING {JOB_COLUMNS}", self.jobs_table);
        let stored = self
            .conn
            .prepare_cached(&sql)
            .and_then(|mut s| {
                s.query_row(
                    params![
                        job.lease_owner,
                        job.lease_until.as_ref().map(ts),
                        job.error,
                        job.attempts,
                        job.finished_at.as_ref().map(ts),
                        ts(&Utc::now()),
                        job.state.as_str(),
                        job.version as i64,
                        job.part,
                        owner
                    ],
                    read_row,
                )
                .optional()
            })
            .map_err(|e| self.query_err(&context, e))?;
        stored.map(|s| self.to_job(s, &context)).transpose()
    }

    async fn run_batch(&mut self, job: &Job, owner: &str, until: DateTime<Utc>) -> Result<BatchOutcome, BatchError> {
        let context = format!("running a batch of job {} part {}", job.version, job.part);
        // A busy database (another worker's batch past the busy timeout) is
        // an engine error, which the worker loop retries.
        if let Err(e) = self.begin(false) {
            self.end();
            return Err(self.query_err(format!("starting {context}"), e).into());
        }
        let result = match self.batch_in_tx(job, owner, until, &context) {
            Ok(End::Commit(batch)) => match self.conn.execute_batch("COMMIT") {
                Ok(()) => Ok(BatchOutcome::Batch(batch)),
                Err(e) => {
                    self.rollback();
                    Err(BatchError::Engine(self.query_err(format!("committing {context}"), e)))
                }
            },
            Ok(End::Rollback(outcome)) => {
                self.rollback();
                Ok(outcome)
            }
            Err(e) => {
                self.rollback();
                Err(e)
            }
        };
        self.end();
        result
    }

    async fn count_remaining(&mut self, spec: &Backfill) -> Result<i64, EngineError> {
        let spec = sql_spec(spec, "SQLite")?;
        let context = format!("{}: counting the rows the backfill still has to do", spec.file.display());
        self.count_query(&spec.remaining.sql, &[], &context)
    }

    async fn plan_backfill(&mut self, spec: &Backfill) -> Result<BackfillPlan, EngineError> {
        let spec = sql_spec(spec, "SQLite")?;
        let context = format!("{}: checking the backfill's table {}", spec.file.display(), spec.table);
        let (schema, table) = split_path(&spec.table);
        let schema = schema.unwrap_or("main");
        let exists = self.count_query(
            "SELECT count(*) FROM pragma_table_list WHERE schema = ?1 AND name = ?2 AND type = 'table'",
            &[&schema, &table],
            &context,
        )?;
        if exists == 0 {
            return Err(no_table(spec));
        }
        // (declared type, position in the primary key, primary key columns, WITHOUT ROWID) of the key column.
        let column: Option<(String, i64, i64, i64)> = self
            .conn
            .prepare(
                "SELECT c.type, c.pk, (SELECT count(*) FROM pragma_table_info(?2, ?1) WHERE pk > 0), \
                 (SELECT wr FROM pragma_table_list WHERE schema = ?1 AND name = ?2) \
                 FROM pragma_table_info(?2, ?1) c WHERE c.name = ?3 COLLATE NOCASE",
            )
            .and_then(|mut s| s.query_row(params![schema, table, spec.key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))).optional())
            .map_err(|e| self.query_err(&context, e))?;
        let rowid_names = ["rowid", "_rowid_", "oid"];
        let unique = match column {
            // The rowid itself, when no column takes its name (and the table has one).
            None if rowid_names.contains(&spec.key.to_ascii_lowercase().as_str()) => {
                self.count_query("SELECT count(*) FROM pragma_table_list WHERE schema = ?1 AND name = ?2 AND wr = 0", &[&schema, &table], &context)?
                    > 0
            }
            None => return Err(no_key(spec)),
            // INTEGER PRIMARY KEY is the rowid: unique without an index.
            Some((ty, 1, 1, 0)) if ty.eq_ignore_ascii_case("INTEGER") => true,
            Some(_) => {
                self.count_query(
                    "SELECT count(*) FROM pragma_index_list(?2, ?1) il WHERE il.\"unique\" = 1 AND il.partial = 0 \
                     AND (SELECT count(*) FROM pragma_index_info(il.name, ?1)) = 1 \
                     AND (SELECT name FROM pragma_index_info(il.name, ?1)) = ?3 COLLATE NOCASE",
                    &[&schema, &table, &spec.key],
                    &context,
                )? > 0
            }
        };
        if !unique {
            return Err(key_not_unique(spec));
        }
        let (t, key) = (quote_path(&spec.table, quote_double), quote_double(&spec.key));
        let total = self.count_query(&format!("SELECT count({key}) FROM {t}"), &[], &context)?;
        let at = format!("SELECT CAST(k AS TEXT) FROM (SELECT {key} AS k FROM {t} WHERE {key} IS NOT NULL ORDER BY {key} LIMIT 1 OFFSET ?1) s");
        let mut bounds: Vec<String> = Vec::new();
        for offset in split_offsets(total, spec.parts) {
            // The key just before the offset ends a part (bounds are inclusive above).
            let k: Option<String> = self
                .conn
                .prepare_cached(&at)
                .and_then(|mut s| s.query_row([offset - 1], |r| r.get(0)).optional())
                .map_err(|e| self.query_err(&context, e))?
                .flatten();
            if let Some(k) = k {
                if bounds.last() != Some(&k) {
                    bounds.push(k);
                }
            }
        }
        Ok(BackfillPlan { total, bounds })
    }
}
