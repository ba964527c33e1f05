//! What the three SQL job stores share: the name and columns of `kiln_jobs`,
//! a row read back into a [`Job`], the SQL of a batch's key walk, and the
//! refusals of [`JobStore::plan_backfill`](kiln_core::jobs::JobStore::plan_backfill).
//!
//! Every engine runs a batch the same way, in **one transaction**: lock the
//! part's row, check the lease, find the next keys (`min`, `max`, `count` of
//! at most `batch` keys after the cursor), run the statement over them, and
//! move the cursor with an `UPDATE` fenced by the lease owner, the state and
//! the old cursor. The writes and the cursor commit together or not at all,
//! so a batch is done exactly once even when its statement is not idempotent
//! (`SET n = n + 1`).

use chrono::{DateTime, Utc};
use kiln_core::jobs::{Backfill, Job, JobState, SqlBackfill, Throttle};
use kiln_core::EngineError;

/// The jobs table's name for a history table's name: `x_history` → `x_jobs`,
/// anything else → `kiln_jobs` (an adopted `changelog` gets kiln's default).
pub fn jobs_table_name(history: &str) -> String {
    match history.strip_suffix("_history") {
        Some(prefix) if !prefix.is_empty() => format!("{prefix}_jobs"),
        _ => "kiln_jobs".to_string(),
    }
}

/// The columns of `kiln_jobs`, in the order every engine selects and inserts them.
/// `cursor` is a plain name on PostgreSQL (non-reserved) and SQLite.
pub const JOB_COLUMNS: &str = "version, part, name, parts, state, spec, batch_size, pause_ms, max_rows_per_sec, range_lo, range_hi, \
     cursor, rows_done, rows_total, batches, attempts, lease_owner, lease_until, created_at, started_at, updated_at, finished_at, error";

/// [`JOB_COLUMNS`] for MySQL/MariaDB, where `CURSOR` is a reserved word.
pub const JOB_COLUMNS_MYSQL: &str = "version, part, name, parts, state, spec, batch_size, pause_ms, max_rows_per_sec, range_lo, range_hi, \
     `cursor`, rows_done, rows_total, batches, attempts, lease_owner, lease_until, created_at, started_at, updated_at, finished_at, error";

/// The raw columns of one `kiln_jobs` row, as every SQL engine reads them
/// (timestamps already converted from the engine's representation).
#[allow(missing_docs)]
pub struct RawJobRow {
    pub version: i64,
    pub part: i64,
    pub name: String,
    pub parts: i64,
    pub state: String,
    pub spec: String,
    pub batch_size: i64,
    pub pause_ms: i64,
    pub max_rows_per_sec: Option<i64>,
    pub range_lo: Option<String>,
    pub range_hi: Option<String>,
    pub cursor: Option<String>,
    pub rows_done: i64,
    pub rows_total: Option<i64>,
    pub batches: i64,
    pub attempts: i64,
    pub lease_owner: Option<String>,
    pub lease_until: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
}

impl RawJobRow {
    /// Convert. A row whose state or spec cannot be read is an error naming
    /// it (`table`), never a skipped row.
    pub fn into_job(self, table: &str) -> Result<Job, EngineError> {
        let bad =
            |what: String| EngineError::Query { context: format!("reading part {} of job {} in {table}", self.part, self.version), message: what };
        let state = JobState::parse(&self.state).ok_or_else(|| bad(format!("unknown state {:?}", self.state)))?;
        let spec: Backfill = serde_json::from_str(&self.spec).map_err(|e| bad(format!("the backfill spec is not readable: {e}")))?;
        Ok(Job {
            version: self.version as u64,
            name: self.name,
            part: self.part as u32,
            parts: self.parts as u32,
            state,
            spec,
            throttle: Throttle {
                batch: self.batch_size.max(1) as u32,
                pause_ms: self.pause_ms.max(0) as u64,
                max_rows_per_sec: self.max_rows_per_sec.map(|m| m.max(0) as u64),
            },
            range_lo: self.range_lo,
            range_hi: self.range_hi,
            cursor: self.cursor,
            rows_done: self.rows_done,
            rows_total: self.rows_total,
            batches: self.batches,
            attempts: self.attempts as i32,
            lease_owner: self.lease_owner,
            lease_until: self.lease_until,
            created_at: self.created_at,
            started_at: self.started_at,
            updated_at: self.updated_at,
            finished_at: self.finished_at,
            error: self.error,
        })
    }
}

/// A job's `spec` as stored: the [`Backfill`] as JSON.
pub fn spec_json(job: &Job) -> String {
    // Serialising plain data with string keys cannot fail.
    serde_json::to_string(&job.spec).unwrap_or_default()
}

/// The SQL backfill of `spec`; a MongoDB backfill is refused on a SQL engine.
pub fn sql_spec<'a>(spec: &'a Backfill, engine: &str) -> Result<&'a SqlBackfill, EngineError> {
    match spec {
        Backfill::Sql(s) => Ok(s),
        Backfill::Mongo(m) => Err(EngineError::Refused(format!(
            "{}: a MongoDB backfill (collection {}) cannot run on {engine}; nothing was run",
            m.file.display(),
            m.collection
        ))),
    }
}

/// `table` or `schema.table` quoted part by part with `quote`.
pub fn quote_path(name: &str, quote: fn(&str) -> String) -> String {
    name.split('.').map(quote).collect::<Vec<_>>().join(".")
}

/// `(schema, table)` of `table` or `schema.table`.
pub fn split_path(name: &str) -> (Option<&str>, &str) {
    match name.split_once('.') {
        Some((s, t)) => (Some(s), t),
        None => (None, name),
    }
}

/// How an engine writes `CAST(x AS text)`.
pub type TextCast = fn(&str) -> String;

/// The key walk of one batch: `min`, `max` (as text) and `count` of the next
/// at most `batch` keys after the cursor (or after `range_lo` when nothing is
/// done yet), up to `range_hi`. `bind` turns a key into a placeholder or a
/// literal. The aggregates are taken over the key's own type and cast after,
/// so `min`/`max` follow the key's order, not the text's. Rows whose key is
/// NULL are never walked (a unique key may hold several NULLs).
pub fn walk_sql(table: &str, key: &str, job: &Job, cast: TextCast, bind: &mut dyn FnMut(&str) -> String) -> String {
    let mut conds = vec![format!("{key} IS NOT NULL")];
    if let Some(after) = job.cursor.as_deref().or(job.range_lo.as_deref()) {
        conds.push(format!("{key} > {}", bind(after)));
    }
    if let Some(hi) = &job.range_hi {
        conds.push(format!("{key} <= {}", bind(hi)));
    }
    format!(
        "SELECT {}, {}, count(*) FROM (SELECT {key} AS k FROM {table} WHERE {} ORDER BY {key} LIMIT {}) s",
        cast("min(k)"),
        cast("max(k)"),
        conds.join(" AND "),
        job.throttle.batch.max(1)
    )
}

/// A key as a quoted SQL string literal (`'` doubled), for PostgreSQL, which
/// resolves an untyped literal to the key column's type: right for integer
/// and text keys alike, where an unquoted number compared with a text key fails.
pub fn quoted_literal(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

/// The offsets of the `parts - 1` split keys of `total` keys (distinct,
/// below `total`; fewer when the table has fewer keys than parts).
pub fn split_offsets(total: i64, parts: u32) -> Vec<i64> {
    let parts = parts.max(1) as i64;
    let mut out: Vec<i64> = (1..parts).map(|i| total * i / parts).filter(|o| *o > 0 && *o < total).collect();
    out.dedup();
    out
}

/// The refusal of a backfill whose table is missing.
pub fn no_table(spec: &SqlBackfill) -> EngineError {
    EngineError::Refused(format!(
        "{}: the backfill walks table {}, which does not exist; check `table=` in its `-- kiln:backfill` line (and that expand created it)",
        spec.file.display(),
        spec.table
    ))
}

/// The refusal of a backfill whose key column is missing.
pub fn no_key(spec: &SqlBackfill) -> EngineError {
    EngineError::Refused(format!(
        "{}: the backfill walks table {} by key {}, but {} has no column {}; check `key=` in its `-- kiln:backfill` line",
        spec.file.display(),
        spec.table,
        spec.key,
        spec.table,
        spec.key
    ))
}

/// The refusal of a backfill whose key is not unique.
pub fn key_not_unique(spec: &SqlBackfill) -> EngineError {
    EngineError::Refused(format!(
        "{}: the backfill walks table {} by key {}, which is not unique (no PRIMARY KEY or UNIQUE index on {} alone); \
         batches by a non-unique key could skip or repeat rows. Use the primary key as `key=`, or add a unique index first",
        spec.file.display(),
        spec.table,
        spec.key,
        spec.key
    ))
}

/// The states a [`kiln_core::jobs::JobControl`] moves from, as a SQL list of literals.
pub fn state_list(states: &[JobState]) -> String {
    states.iter().map(|s| format!("'{}'", s.as_str())).collect::<Vec<_>>().join(", ")
}

/// What a save may change, as SQL: an operator's `paused` or `cancelled` is
/// never overwritten (nor the fields that go with it); the lease fields are
/// written in every case. `p(name)` is the placeholder of a bound value.
/// `state` is assigned last: MySQL evaluates `SET` left to right with the
/// new values, so every `CASE` must see the stored state first.
pub fn save_set(p: &dyn Fn(&str) -> String) -> String {
    let keep = "state IN ('paused', 'cancelled')";
    format!(
        "lease_owner = {}, lease_until = {}, error = CASE WHEN {keep} THEN error ELSE {} END, \
         attempts = CASE WHEN {keep} THEN attempts ELSE {} END, finished_at = CASE WHEN {keep} THEN finished_at ELSE {} END, \
         updated_at = {}, state = CASE WHEN {keep} THEN state ELSE {} END",
        p("lease_owner"),
        p("lease_until"),
        p("error"),
        p("attempts"),
        p("finished_at"),
        p("updated_at"),
        p("state"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_splits() {
        assert_eq!(jobs_table_name("kiln_history"), "kiln_jobs");
        assert_eq!(jobs_table_name("app_history"), "app_jobs");
        assert_eq!(jobs_table_name("changelog"), "kiln_jobs");
        assert_eq!(split_offsets(100, 4), vec![25, 50, 75]);
        assert_eq!(split_offsets(2, 4), vec![1]);
        assert_eq!(split_offsets(0, 4), Vec::<i64>::new());
        assert_eq!(split_offsets(100, 1), Vec::<i64>::new());
        assert_eq!(quoted_literal("a'b"), "'a''b'");
        assert_eq!(quote_path("s.t", crate::common::quote_double), "\"s\".\"t\"");
    }
}
