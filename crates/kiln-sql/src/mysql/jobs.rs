//! [`JobStore`] on MySQL 8 / MariaDB 10.6+: `kiln_jobs` in the database of
//! the history, claimed with `SELECT … FOR UPDATE SKIP LOCKED`, one InnoDB
//! transaction per batch.
//!
//! A batch locks its part's row (`FOR UPDATE`) for its whole transaction, so
//! claimers skip a part while a batch of it runs, and an operator's pause
//! waits for the batch to commit. Keys are bound as string parameters: MySQL
//! compares an integer key with a string as a number and a text key as text,
//! where an unquoted number compared with a text key would compare both as
//! numbers (wrong order, no index). Key columns of `kiln_jobs` use
//! `utf8mb4_bin`, so a cursor compares byte for byte.
//!
//! Every method refuses to run while kiln's own transaction is open on the
//! connection (a migration's finish the core has not flushed yet): its
//! `BEGIN` would commit that migration's DML without its finish.

use async_trait::async_trait;
use chrono::{DateTime, NaiveDateTime, Utc};
use kiln_core::jobs::{bind_range, Backfill, BackfillPlan, Batch, BatchError, BatchOutcome, Job, JobControl, JobState, JobStore};
use kiln_core::EngineError;
use sqlx::mysql::{MySqlArguments, MySqlRow};
use sqlx::{AssertSqlSafe, MySql, Row};

use super::{describe, error_number, is_connection_error, MysqlEngine};
use crate::common::quote_backtick;
use crate::jobs_common::{
    key_not_unique, no_key, no_table, quote_path, save_set, spec_json, split_offsets, split_path, sql_spec, state_list, walk_sql, RawJobRow,
    JOB_COLUMNS_MYSQL,
};

type MyQuery<'q> = sqlx::query::Query<'q, MySql, MySqlArguments>;

/// Deadlock, lock wait timeout: worth a retry.
const TRANSIENT: [u16; 2] = [1213, 1205];

fn raw_row(r: &MySqlRow) -> Result<RawJobRow, sqlx::Error> {
    let ts = |i: usize| r.try_get::<NaiveDateTime, _>(i).map(|n| n.and_utc());
    let opt_ts = |i: usize| r.try_get::<Option<NaiveDateTime>, _>(i).map(|o| o.map(|n| n.and_utc()));
    Ok(RawJobRow {
        version: r.try_get(0)?,
        part: r.try_get::<i32, _>(1)?.into(),
        name: r.try_get(2)?,
        parts: r.try_get::<i32, _>(3)?.into(),
        state: r.try_get(4)?,
        spec: r.try_get(5)?,
        batch_size: r.try_get::<i32, _>(6)?.into(),
        pause_ms: r.try_get(7)?,
        max_rows_per_sec: r.try_get(8)?,
        range_lo: r.try_get(9)?,
        range_hi: r.try_get(10)?,
        cursor: r.try_get(11)?,
        rows_done: r.try_get(12)?,
        rows_total: r.try_get(13)?,
        batches: r.try_get(14)?,
        attempts: r.try_get::<i32, _>(15)?.into(),
        lease_owner: r.try_get(16)?,
        lease_until: opt_ts(17)?,
        created_at: ts(18)?,
        started_at: opt_ts(19)?,
        updated_at: ts(20)?,
        finished_at: opt_ts(21)?,
        error: r.try_get(22)?,
    })
}

/// Bind every column of `j`, in [`JOB_COLUMNS_MYSQL`] order.
fn bind_job<'q>(q: MyQuery<'q>, j: &Job) -> MyQuery<'q> {
    let naive = |t: Option<DateTime<Utc>>| t.map(|t| t.naive_utc());
    q.bind(j.version as i64)
        .bind(j.part as i32)
        .bind(j.name.clone())
        .bind(j.parts as i32)
        .bind(j.state.as_str())
        .bind(spec_json(j))
        .bind(j.throttle.batch as i32)
        .bind(j.throttle.pause_ms as i64)
        .bind(j.throttle.max_rows_per_sec.map(|m| m as i64))
        .bind(j.range_lo.clone())
        .bind(j.range_hi.clone())
        .bind(j.cursor.clone())
        .bind(j.rows_done)
        .bind(j.rows_total)
        .bind(j.batches)
        .bind(j.attempts)
        .bind(j.lease_owner.clone())
        .bind(naive(j.lease_until))
        .bind(j.created_at.naive_utc())
        .bind(naive(j.started_at))
        .bind(j.updated_at.naive_utc())
        .bind(naive(j.finished_at))
        .bind(j.error.clone())
}

fn q(sql: String) -> MyQuery<'static> {
    sqlx::query(AssertSqlSafe(sql))
}

/// How a batch transaction ends.
enum End {
    Commit(Batch),
    Rollback(BatchOutcome),
}

impl MysqlEngine {
    /// Refuse while kiln's own transaction is open (module docs), and
    /// release a lock a dropped guard left for release.
    async fn jobs_ready(&mut self, doing: &str) -> Result<(), EngineError> {
        self.settle_lock().await?;
        if self.in_tx {
            return Err(EngineError::Refused(format!(
                "cannot {doing} now: a migration's finish is still pending on this connection (kiln's own transaction is open); \
                 the core flushes it before the end of the run"
            )));
        }
        Ok(())
    }

    fn to_job(&self, r: &MySqlRow, context: &str) -> Result<Job, EngineError> {
        raw_row(r)
            .map_err(|e| self.err(format!("{context}: {} does not have the columns kiln expects", self.jobs_table), e))?
            .into_job(&self.jobs_table)
    }

    fn select_part(&self) -> String {
        format!("SELECT {JOB_COLUMNS_MYSQL} FROM {} WHERE version = ? AND part = ?", self.jobs_table)
    }

    async fn rollback_quietly(&mut self) {
        if let Err(e) = sqlx::raw_sql("ROLLBACK").execute(&mut self.conn).await {
            tracing::debug!("ROLLBACK after a failed job write: {}", describe(&e));
        }
    }

    async fn begin(&mut self, context: &str) -> Result<(), EngineError> {
        match sqlx::raw_sql("BEGIN").execute(&mut self.conn).await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.err(context, e)),
        }
    }

    async fn commit_or_rollback(&mut self, context: &str) -> Result<(), EngineError> {
        match sqlx::raw_sql("COMMIT").execute(&mut self.conn).await {
            Ok(_) => Ok(()),
            Err(e) => {
                let err = self.err(format!("committing ({context})"), e);
                self.rollback_quietly().await;
                Err(err)
            }
        }
    }

    async fn claim_once(&mut self, owner: &str, now: DateTime<Utc>, until: DateTime<Utc>, only: Option<u64>) -> Result<Option<Job>, sqlx::Error> {
        let t = &self.jobs_table;
        let pick = format!(
            "SELECT version, part FROM {t} WHERE (state = 'queued' OR (state = 'running' AND (lease_until IS NULL OR lease_until < ?))) \
             AND (? IS NULL OR version = ?) ORDER BY version, part LIMIT 1 FOR UPDATE SKIP LOCKED"
        );
        let take = format!(
            "UPDATE {t} SET state = 'running', lease_owner = ?, lease_until = ?, attempts = attempts + 1, \
             started_at = COALESCE(started_at, ?), updated_at = ? WHERE version = ? AND part = ?"
        );
        let only = only.map(|v| v as i64);
        let (now, until) = (now.naive_utc(), until.naive_utc());
        let Some(row) = q(pick).bind(now).bind(only).bind(only).fetch_optional(&mut self.conn).await? else { return Ok(None) };
        let (version, part): (i64, i32) = (row.try_get(0)?, row.try_get(1)?);
        q(take).bind(owner).bind(until).bind(now).bind(now).bind(version).bind(part).execute(&mut self.conn).await?;
        let row = q(self.select_part()).bind(version).bind(part).fetch_one(&mut self.conn).await?;
        Ok(Some(self.to_job(&row, "claiming a backfill part").map_err(|e| sqlx::Error::Decode(e.to_string().into()))?))
    }

    /// The part of a batch that runs inside its transaction.
    async fn batch_in_tx(&mut self, job: &Job, owner: &str, until: DateTime<Utc>, context: &str) -> Result<End, BatchError> {
        let spec = sql_spec(&job.spec, "MySQL")?;
        let (version, part) = (job.version as i64, job.part as i32);
        let lock = format!("{} FOR UPDATE", self.select_part());
        let row = match q(lock).bind(version).bind(part).fetch_optional(&mut self.conn).await {
            Ok(r) => r,
            Err(e) => return Err(BatchError::Engine(self.err(context, e))),
        };
        let Some(row) = row else { return Ok(End::Rollback(BatchOutcome::Lost)) };
        let stored = self.to_job(&row, context)?;
        // Not this worker's any more, or paused/cancelled by an operator: the
        // worker loop releases the lease (if still its own) and stops.
        if stored.lease_owner.as_deref() != Some(owner) || stored.cursor != job.cursor || stored.state != JobState::Running {
            return Ok(End::Rollback(BatchOutcome::Lost));
        }

        let (table, key) = (quote_path(&spec.table, quote_backtick), quote_backtick(&spec.key));
        let mut binds: Vec<String> = Vec::new();
        let walk = walk_sql(&table, &key, &stored, |x| format!("CAST({x} AS CHAR)"), &mut |v| {
            binds.push(v.to_string());
            "?".into()
        });
        let mut wq = q(walk);
        for b in binds {
            wq = wq.bind(b);
        }
        let keys = match wq.fetch_one(&mut self.conn).await {
            Ok(r) => r,
            Err(e) => return Err(BatchError::Engine(self.err(context, e))),
        };
        let decoded =
            (|| -> Result<(i64, Option<String>, Option<String>), sqlx::Error> { Ok((keys.try_get(2)?, keys.try_get(0)?, keys.try_get(1)?)) })();
        let (count, lo, hi) = decoded.map_err(|e| BatchError::Engine(self.err(context, e)))?;
        let (Some(lo), Some(hi)) = (lo, hi) else { return Ok(End::Rollback(BatchOutcome::Exhausted)) };
        if count == 0 {
            return Ok(End::Rollback(BatchOutcome::Exhausted));
        }

        let statement = bind_range(&spec.statement.sql, &lo, &hi);
        let changed = match sqlx::raw_sql(AssertSqlSafe(statement)).execute(&mut self.conn).await {
            Ok(r) => r.rows_affected() as i64,
            Err(e) if is_connection_error(&e) => return Err(BatchError::Engine(self.err(context, e))),
            Err(e) => {
                let transient = error_number(&e).is_some_and(|n| TRANSIENT.contains(&n));
                return Err(BatchError::Statement { message: describe(&e), lo, hi, transient });
            }
        };

        let advance = format!(
            "UPDATE {} SET `cursor` = ?, rows_done = rows_done + ?, batches = batches + 1, lease_until = ?, updated_at = ? \
             WHERE version = ? AND part = ? AND lease_owner = ? AND state = 'running' AND `cursor` <=> ?",
            self.jobs_table
        );
        let moved = q(advance)
            .bind(hi.clone())
            .bind(count)
            .bind(until.naive_utc())
            .bind(Utc::now().naive_utc())
            .bind(version)
            .bind(part)
            .bind(owner)
            .bind(job.cursor.clone())
            .execute(&mut self.conn)
            .await;
        match moved {
            Ok(r) if r.rows_affected() == 0 => return Ok(End::Rollback(BatchOutcome::Lost)),
            Ok(_) => {}
            Err(e) => return Err(BatchError::Engine(self.err(context, e))),
        }
        let row = match q(self.select_part()).bind(version).bind(part).fetch_one(&mut self.conn).await {
            Ok(r) => r,
            Err(e) => return Err(BatchError::Engine(self.err(context, e))),
        };
        let job = self.to_job(&row, context)?;
        Ok(End::Commit(Batch { lo, hi, keys: count, changed, job }))
    }

    /// The first value of a one-row answer as an integer.
    async fn count_of(&mut self, query: MyQuery<'static>, context: &str) -> Result<i64, EngineError> {
        match query.fetch_one(&mut self.conn).await {
            Ok(r) => r.try_get::<i64, _>(0).map_err(|e| self.err(context, e)),
            Err(e) => Err(self.err(context, e)),
        }
    }
}

#[async_trait]
impl JobStore for MysqlEngine {
    async fn ensure_jobs(&mut self) -> Result<(), EngineError> {
        self.jobs_ready("create the jobs table").await?;
        let ddl = format!(
            "CREATE TABLE IF NOT EXISTS {} (
                version BIGINT NOT NULL,
                part INT NOT NULL,
                name VARCHAR(255) NOT NULL,
                parts INT NOT NULL,
                state VARCHAR(16) NOT NULL,
                spec MEDIUMTEXT NOT NULL,
                batch_size INT NOT NULL,
                pause_ms BIGINT NOT NULL,
                max_rows_per_sec BIGINT NULL,
                range_lo TEXT COLLATE utf8mb4_bin NULL,
                range_hi TEXT COLLATE utf8mb4_bin NULL,
                `cursor` TEXT COLLATE utf8mb4_bin NULL,
                rows_done BIGINT NOT NULL,
                rows_total BIGINT NULL,
                batches BIGINT NOT NULL,
                attempts INT NOT NULL,
                lease_owner VARCHAR(255) NULL,
                lease_until DATETIME(6) NULL,
                created_at DATETIME(6) NOT NULL,
                started_at DATETIME(6) NULL,
                updated_at DATETIME(6) NOT NULL,
                finished_at DATETIME(6) NULL,
                error TEXT NULL,
                PRIMARY KEY (version, part)
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
            self.jobs_table
        );
        match sqlx::raw_sql(AssertSqlSafe(ddl)).execute(&mut self.conn).await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.err(format!("creating {}", self.jobs_table), e)),
        }
    }

    async fn list_jobs(&mut self) -> Result<Vec<Job>, EngineError> {
        self.jobs_ready("read the jobs").await?;
        let context = format!("reading {}", self.jobs_table);
        let rows = match q(format!("SELECT {JOB_COLUMNS_MYSQL} FROM {} ORDER BY version, part", self.jobs_table)).fetch_all(&mut self.conn).await {
            Ok(rows) => rows,
            // ER_NO_SUCH_TABLE: no job was ever queued here.
            Err(e) if error_number(&e) == Some(1146) => return Ok(Vec::new()),
            Err(e) => return Err(self.err(context, e)),
        };
        rows.iter().map(|r| self.to_job(r, &context)).collect()
    }

    async fn replace_jobs(&mut self, version: u64, parts: &[Job]) -> Result<(), EngineError> {
        self.jobs_ready("queue a job").await?;
        let context = format!("queueing job {version} in {}", self.jobs_table);
        let delete = format!("DELETE FROM {} WHERE version = ?", self.jobs_table);
        let placeholders = vec!["?"; 23].join(", ");
        let insert = format!("INSERT INTO {} ({JOB_COLUMNS_MYSQL}) VALUES ({placeholders})", self.jobs_table);
        self.begin(&context).await?;
        let mut written = q(delete).bind(version as i64).execute(&mut self.conn).await.map(|_| ());
        for j in parts {
            if written.is_err() {
                break;
            }
            written = bind_job(q(insert.clone()), j).execute(&mut self.conn).await.map(|_| ());
        }
        if let Err(e) = written {
            let err = self.err(&context, e);
            self.rollback_quietly().await;
            return Err(err);
        }
        self.commit_or_rollback(&context).await
    }

    async fn claim_job(&mut self, owner: &str, now: DateTime<Utc>, until: DateTime<Utc>, only: Option<u64>) -> Result<Option<Job>, EngineError> {
        self.jobs_ready("claim a backfill part").await?;
        let context = format!("claiming a backfill part in {}", self.jobs_table);
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.begin(&context).await?;
            match self.claim_once(owner, now, until, only).await {
                Ok(job) => {
                    self.commit_or_rollback(&context).await?;
                    return Ok(job);
                }
                Err(e) => {
                    self.rollback_quietly().await;
                    match error_number(&e) {
                        Some(1146) => return Ok(None),
                        // Two claimers can still deadlock on InnoDB's next-key locks: try again.
                        Some(1213) if attempt < 3 => continue,
                        _ => return Err(self.err(context, e)),
                    }
                }
            }
        }
    }

    async fn control_job(&mut self, version: u64, control: &JobControl) -> Result<u64, EngineError> {
        self.jobs_ready("change a job").await?;
        let context = format!("changing job {version} in {}", self.jobs_table);
        let t = &self.jobs_table;
        let now = Utc::now().naive_utc();
        let query = match (control, control.transition()) {
            (_, Some((from, to))) => {
                let mut set = format!("state = '{}', updated_at = ?", to.as_str());
                if matches!(control, JobControl::Retry) {
                    set.push_str(", attempts = 0, error = NULL, finished_at = NULL");
                }
                let cancel = to == JobState::Cancelled;
                if cancel {
                    set.push_str(", finished_at = ?");
                }
                let mut query = q(format!("UPDATE {t} SET {set} WHERE version = ? AND state IN ({})", state_list(from))).bind(now);
                if cancel {
                    query = query.bind(now);
                }
                query.bind(version as i64)
            }
            (JobControl::Throttle { batch, pause_ms, max_rows_per_sec }, None) => q(format!(
                "UPDATE {t} SET batch_size = COALESCE(?, batch_size), pause_ms = COALESCE(?, pause_ms), \
                 max_rows_per_sec = CASE WHEN ? THEN ? ELSE max_rows_per_sec END, updated_at = ? WHERE version = ?"
            ))
            .bind(batch.map(|b| b.max(1) as i32))
            .bind(pause_ms.map(|p| p as i64))
            .bind(max_rows_per_sec.is_some())
            .bind(max_rows_per_sec.flatten().map(|m| m as i64))
            .bind(now)
            .bind(version as i64),
            (_, None) => return Ok(0),
        };
        match query.execute(&mut self.conn).await {
            Ok(r) => Ok(r.rows_affected()),
            Err(e) if error_number(&e) == Some(1146) => Ok(0),
            Err(e) => Err(self.err(context, e)),
        }
    }

    async fn save_job(&mut self, job: &Job, owner: &str) -> Result<Option<Job>, EngineError> {
        self.jobs_ready("save a backfill part").await?;
        let context = format!("saving job {} part {} in {}", job.version, job.part, self.jobs_table);
        let sql = format!("UPDATE {} SET {} WHERE version = ? AND part = ? AND lease_owner = ?", self.jobs_table, save_set(&|_| "?".into()));
        let (version, part) = (job.version as i64, job.part as i32);
        self.begin(&context).await?;
        // sqlx asks for found rows, so `rows_affected` counts matched rows.
        let updated = q(sql)
            .bind(job.lease_owner.clone())
            .bind(job.lease_until.map(|t| t.naive_utc()))
            .bind(job.error.clone())
            .bind(job.attempts)
            .bind(job.finished_at.map(|t| t.naive_utc()))
            .bind(Utc::now().naive_utc())
            .bind(job.state.as_str())
            .bind(version)
            .bind(part)
            .bind(owner.to_string())
            .execute(&mut self.conn)
            .await;
        let row = match updated {
            Ok(r) if r.rows_affected() == 0 => None,
            Ok(_) => match q(self.select_part()).bind(version).bind(part).fetch_one(&mut self.conn).await {
                Ok(r) => Some(r),
                Err(e) => {
                    let err = self.err(&context, e);
                    self.rollback_quietly().await;
                    return Err(err);
                }
            },
            Err(e) => {
                let err = self.err(&context, e);
                self.rollback_quietly().await;
                return Err(err);
            }
        };
        self.commit_or_rollback(&context).await?;
        row.map(|r| self.to_job(&r, &context)).transpose()
    }

    async fn run_batch(&mut self, job: &Job, owner: &str, until: DateTime<Utc>) -> Result<BatchOutcome, BatchError> {
        self.jobs_ready("run a backfill batch").await?;
        let context = format!("running a batch of job {} part {}", job.version, job.part);
        self.begin(&context).await?;
        match self.batch_in_tx(job, owner, until, &context).await {
            Ok(End::Commit(batch)) => {
                self.commit_or_rollback(&context).await?;
                Ok(BatchOutcome::Batch(batch))
            }
            Ok(End::Rollback(outcome)) => {
                self.rollback_quietly().await;
                Ok(outcome)
            }
            Err(e) => {
                self.rollback_quietly().await;
                Err(e)
            }
        }
    }

    async fn count_remaining(&mut self, spec: &Backfill) -> Result<i64, EngineError> {
        self.jobs_ready("count the rows left to backfill").await?;
        let spec = sql_spec(spec, "MySQL")?;
        let context = format!("{}: counting the rows the backfill still has to do", spec.file.display());
        let row = match sqlx::raw_sql(AssertSqlSafe(spec.remaining.sql.clone())).fetch_optional(&mut self.conn).await {
            Ok(Some(r)) => r,
            Ok(None) => return Err(EngineError::Query { context, message: "the query returned no count".into() }),
            Err(e) => return Err(self.err(context, e)),
        };
        row.try_get::<i64, _>(0)
            .or_else(|_| row.try_get::<i32, _>(0).map(i64::from))
            .or_else(|_| row.try_get::<u64, _>(0).map(|v| v as i64))
            .map_err(|e| self.err(context, e))
    }

    async fn plan_backfill(&mut self, spec: &Backfill) -> Result<BackfillPlan, EngineError> {
        self.jobs_ready("check a backfill").await?;
        let spec = sql_spec(spec, "MySQL")?;
        let context = format!("{}: checking the backfill's table {}", spec.file.display(), spec.table);
        let (schema, table) = split_path(&spec.table);
        let schema = schema.unwrap_or(&self.database).to_string();
        let exists = self
            .count_of(
                q("SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?".into())
                    .bind(schema.clone())
                    .bind(table.to_string()),
                &context,
            )
            .await?;
        if exists == 0 {
            return Err(no_table(spec));
        }
        let column = self
            .count_of(
                q("SELECT COUNT(*) FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? AND COLUMN_NAME = ?".into())
                    .bind(schema.clone())
                    .bind(table.to_string())
                    .bind(spec.key.clone()),
                &context,
            )
            .await?;
        if column == 0 {
            return Err(no_key(spec));
        }
        // A unique index (the primary key included) on the key alone, not on a prefix of it.
        let unique = self
            .count_of(
                q("SELECT COUNT(*) FROM (SELECT INDEX_NAME FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? \
                   AND NON_UNIQUE = 0 GROUP BY INDEX_NAME HAVING COUNT(*) = 1 AND MAX(COLUMN_NAME) = ? AND MAX(SUB_PART) IS NULL) u"
                    .into())
                .bind(schema)
                .bind(table.to_string())
                .bind(spec.key.clone()),
                &context,
            )
            .await?;
        if unique == 0 {
            return Err(key_not_unique(spec));
        }
        let (t, key) = (quote_path(&spec.table, quote_backtick), quote_backtick(&spec.key));
        let total = self.count_of(q(format!("SELECT COUNT({key}) FROM {t}")), &context).await?;
        let at = format!("SELECT CAST(k AS CHAR) FROM (SELECT {key} AS k FROM {t} WHERE {key} IS NOT NULL ORDER BY {key} LIMIT 1 OFFSET ?) s");
        let mut bounds: Vec<String> = Vec::new();
        for offset in split_offsets(total, spec.parts) {
            // The key just before the offset ends a part (bounds are inclusive above).
            let row = match q(at.clone()).bind(offset - 1).fetch_optional(&mut self.conn).await {
                Ok(r) => r,
                Err(e) => return Err(self.err(&context, e)),
            };
            if let Some(k) = row.and_then(|r| r.try_get::<Option<String>, _>(0).ok().flatten()) {
                if bounds.last() != Some(&k) {
                    bounds.push(k);
                }
            }
        }
        Ok(BackfillPlan { total, bounds })
    }
}
