//! Zero-downtime changes (DESIGN §4): the backfill a migration declares, the
//! durable job in `kiln_jobs` that runs it, and the worker loop that drives a
//! [`JobStore`] batch by batch.
//!
//! # The job
//!
//! `kiln up` runs a phased migration's `expand` (recorded as `expanded`) and
//! queues its backfill as one job per migration version, split into one or
//! more **parts** (key ranges) that workers claim independently. A part is a
//! row of `kiln_jobs`: its range, a **cursor** (the last key done), counters,
//! a **lease** (owner and expiry) and the throttle. Every batch commits the
//! cursor with the batch's own writes where the engine can (SQL: one
//! transaction, fenced by the lease and the old cursor), so a killed worker
//! loses at most the batch it was running and nothing is done twice.
//!
//! # The worker loop ([`work_part`])
//!
//! claim a part → batch after batch: run, report progress, sleep for the
//! throttle (pause between batches, rows/s ceiling), re-read the control
//! fields that come back with every batch (pause, cancel, new throttle) →
//! done, failed after [`WorkerOptions::max_retries`] retries with backoff, or
//! released when stopped (SIGTERM finishes the current batch first).

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::EngineError;
use crate::model::{Body, Statement};

/// The parts of a zero-downtime migration besides `expand` (stored as the
/// migration's `up`) and `rollback` (stored as its `down`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Phases {
    /// The backfill, if the migration has one.
    pub backfill: Option<Backfill>,
    /// What `kiln contract` runs; `None` when the migration has no contract part.
    pub contract: Option<Body>,
}

/// A backfill as declared in a migration file; stored with its job, so a
/// worker needs only the database.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Backfill {
    /// `-- kiln:backfill table=… key=… batch=…` followed by one statement.
    Sql(SqlBackfill),
    /// `backfill: {collection, filter, update | pipeline, batch_size}`.
    Mongo(MongoBackfill),
}

impl Backfill {
    /// Rows (documents) per batch as declared.
    pub fn batch(&self) -> u32 {
        match self {
            Backfill::Sql(s) => s.batch,
            Backfill::Mongo(m) => m.batch,
        }
    }
    /// Table or collection.
    pub fn target(&self) -> &str {
        match self {
            Backfill::Sql(s) => &s.table,
            Backfill::Mongo(m) => &m.collection,
        }
    }
    /// Parts (key ranges) the job is split into.
    pub fn parts(&self) -> u32 {
        match self {
            Backfill::Sql(s) => s.parts,
            Backfill::Mongo(m) => m.parts,
        }
    }
}

/// A SQL backfill: `statement` runs over the key range `:lo`..`:hi` (both inclusive).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SqlBackfill {
    /// The file it comes from (for messages).
    pub file: PathBuf,
    /// The table walked.
    pub table: String,
    /// Its unique key column, walked in order (keyset batches, never OFFSET).
    pub key: String,
    /// Keys per batch.
    pub batch: u32,
    /// Key ranges worked on at once by different workers.
    pub parts: u32,
    /// The batch statement, with `:lo` and `:hi`.
    pub statement: Statement,
    /// The count that must be zero before contract: `-- kiln:remaining`, or
    /// derived from the statement's own condition.
    pub remaining: Statement,
    /// True when `remaining` was derived rather than written.
    pub remaining_derived: bool,
}

/// A MongoDB backfill over `collection`, walking `_id`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MongoBackfill {
    /// The file it comes from (for messages).
    pub file: PathBuf,
    /// The collection walked.
    pub collection: String,
    /// The documents that still need the change; counting it to zero allows contract.
    pub filter: serde_json::Value,
    /// What is done to each batch.
    pub change: MongoChange,
    /// Documents per batch.
    pub batch: u32,
    /// `_id` ranges worked on at once by different workers.
    pub parts: u32,
}

/// What a MongoDB backfill does to the documents of a batch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MongoChange {
    /// An `update` document or pipeline, as `updateMany` takes it.
    Update(serde_json::Value),
    /// Aggregation stages run over the batch; kiln puts the batch's `$match`
    /// before them and a `$merge` into the same collection (on `_id`, merge,
    /// never insert) after them — for values looked up in another collection.
    Pipeline(Vec<serde_json::Value>),
}

/// Where a job part stands.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting for a worker.
    Queued,
    /// A worker holds (or held, if the lease expired) the part.
    Running,
    /// Paused by an operator; workers leave it alone until resumed.
    Paused,
    /// Every key of the part is done.
    Done,
    /// A batch failed after every retry; `error` says why and where.
    Failed,
    /// Cancelled (by an operator, or by `kiln down` rolling the migration back).
    Cancelled,
}

impl JobState {
    /// Every state.
    pub const ALL: [JobState; 6] = [JobState::Queued, JobState::Running, JobState::Paused, JobState::Done, JobState::Failed, JobState::Cancelled];
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Paused => "paused",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
    /// Parse the stored spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|j| j.as_str() == s)
    }
    /// True when no worker will touch the part again without an operator.
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Done | JobState::Failed | JobState::Cancelled)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How fast a job may go; changeable while it runs (`kiln jobs throttle`).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Throttle {
    /// Keys per batch.
    pub batch: u32,
    /// Sleep between batches, in milliseconds.
    pub pause_ms: u64,
    /// Ceiling on rows (keys) per second for one part; `None`: no ceiling.
    pub max_rows_per_sec: Option<u64>,
}

/// One part of a backfill job: a row of `kiln_jobs`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// The migration's version; the job's id.
    pub version: u64,
    /// The migration's name (`0007_rename_full_name`).
    pub name: String,
    /// This part (0-based).
    pub part: u32,
    /// How many parts the job has.
    pub parts: u32,
    /// Where the part stands.
    pub state: JobState,
    /// What the job runs.
    pub spec: Backfill,
    /// How fast it may go.
    pub throttle: Throttle,
    /// Keys strictly above this bound (`None`: from the first key).
    pub range_lo: Option<String>,
    /// Keys up to and including this bound (`None`: to the last key, including keys added later).
    pub range_hi: Option<String>,
    /// The last key done (`None`: nothing done yet).
    pub cursor: Option<String>,
    /// Keys (rows/documents) walked so far.
    pub rows_done: i64,
    /// Keys in the part when it was queued (an estimate: the table may grow).
    pub rows_total: Option<i64>,
    /// Batches committed.
    pub batches: i64,
    /// Times the part was claimed or a batch retried.
    pub attempts: i32,
    /// The worker holding the lease.
    pub lease_owner: Option<String>,
    /// When the lease expires.
    pub lease_until: Option<DateTime<Utc>>,
    /// Queued at.
    pub created_at: DateTime<Utc>,
    /// First claimed at.
    pub started_at: Option<DateTime<Utc>>,
    /// Last written at.
    pub updated_at: DateTime<Utc>,
    /// Done, failed or cancelled at.
    pub finished_at: Option<DateTime<Utc>>,
    /// The last error, with the key range of the batch.
    pub error: Option<String>,
}

impl Job {
    /// A queued part, as `kiln up` writes it.
    pub fn queued(
        version: u64,
        name: &str,
        spec: &Backfill,
        part: u32,
        parts: u32,
        range: (Option<String>, Option<String>),
        total: Option<i64>,
    ) -> Job {
        let now = Utc::now();
        Job {
            version,
            name: name.to_string(),
            part,
            parts,
            state: JobState::Queued,
            spec: spec.clone(),
            throttle: Throttle { batch: spec.batch(), pause_ms: 0, max_rows_per_sec: None },
            range_lo: range.0,
            range_hi: range.1,
            cursor: None,
            rows_done: 0,
            rows_total: total,
            batches: 0,
            attempts: 0,
            lease_owner: None,
            lease_until: None,
            created_at: now,
            started_at: None,
            updated_at: now,
            finished_at: None,
            error: None,
        }
    }

    /// True when a worker holds a lease that has not expired at `now`.
    pub fn leased(&self, now: DateTime<Utc>) -> bool {
        self.state == JobState::Running && self.lease_owner.is_some() && self.lease_until.is_some_and(|u| u > now)
    }
}

/// An operator's change to a job (every part of one version).
#[derive(Clone, Debug, PartialEq)]
pub enum JobControl {
    /// queued/running → paused.
    Pause,
    /// paused → queued (a worker picks it up).
    Resume,
    /// any state but done → cancelled.
    Cancel,
    /// failed → queued, attempts reset (after fixing the cause).
    Retry,
    /// New throttle values; `None` fields stay as they are.
    Throttle {
        /// Keys per batch.
        batch: Option<u32>,
        /// Pause between batches.
        pause_ms: Option<u64>,
        /// Rows/s ceiling; `Some(None)` removes it.
        max_rows_per_sec: Option<Option<u64>>,
    },
}

impl JobControl {
    /// The states a part may be in for this change to apply (and the state it
    /// takes); `None` for a throttle change, which applies in every state.
    pub fn transition(&self) -> Option<(&'static [JobState], JobState)> {
        match self {
            JobControl::Pause => Some((&[JobState::Queued, JobState::Running], JobState::Paused)),
            JobControl::Resume => Some((&[JobState::Paused], JobState::Queued)),
            JobControl::Cancel => Some((&[JobState::Queued, JobState::Running, JobState::Paused, JobState::Failed], JobState::Cancelled)),
            JobControl::Retry => Some((&[JobState::Failed, JobState::Cancelled], JobState::Queued)),
            JobControl::Throttle { .. } => None,
        }
    }

    /// `job` with this change applied; `None` when it does not apply to
    /// `job`'s state. Engines without conditional updates use this.
    pub fn apply(&self, job: &Job) -> Option<Job> {
        let mut j = job.clone();
        match (self, self.transition()) {
            (_, Some((from, to))) => {
                if !from.contains(&job.state) {
                    return None;
                }
                j.state = to;
                if matches!(self, JobControl::Retry) {
                    j.attempts = 0;
                    j.error = None;
                    j.finished_at = None;
                }
                if to == JobState::Cancelled {
                    j.finished_at = Some(Utc::now());
                }
            }
            (JobControl::Throttle { batch, pause_ms, max_rows_per_sec }, None) => {
                if let Some(b) = batch {
                    j.throttle.batch = *b;
                }
                if let Some(p) = pause_ms {
                    j.throttle.pause_ms = *p;
                }
                if let Some(m) = max_rows_per_sec {
                    j.throttle.max_rows_per_sec = *m;
                }
            }
            _ => return None,
        }
        j.updated_at = Utc::now();
        Some(j)
    }
}

/// What [`JobStore::plan_backfill`] found before the job is queued.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BackfillPlan {
    /// Keys in the table/collection now.
    pub total: i64,
    /// `parts - 1` keys splitting the walk into ranges of about equal size
    /// (fewer when the table is small).
    pub bounds: Vec<String>,
}

/// One batch committed by [`JobStore::run_batch`].
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// First key of the batch.
    pub lo: String,
    /// Last key of the batch (the new cursor).
    pub hi: String,
    /// Keys walked.
    pub keys: i64,
    /// Rows/documents the statement changed.
    pub changed: i64,
    /// The part as stored after the batch: progress, and the control fields
    /// (state, throttle) as an operator may have changed them.
    pub job: Job,
}

/// What [`JobStore::run_batch`] did.
#[derive(Clone, Debug, PartialEq)]
#[allow(clippy::large_enum_variant)] // one per batch; boxing buys nothing
pub enum BatchOutcome {
    /// A batch committed.
    Batch(Batch),
    /// No key is left in the part's range: nothing ran. The caller marks it done.
    Exhausted,
    /// The lease is no longer this worker's (or the cursor moved): nothing of
    /// the batch was committed (or, on engines without transactions, the
    /// batch's idempotent writes were, and its progress was not).
    Lost,
}

/// Why a batch failed.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The batch statement/update failed; nothing of it was committed (SQL),
    /// or only idempotent writes were (MongoDB).
    #[error("{message} (keys {lo}..{hi})")]
    Statement {
        /// The database's message.
        message: String,
        /// First key of the batch.
        lo: String,
        /// Last key of the batch.
        hi: String,
        /// True for errors that may pass on retry (deadlock, lock timeout,
        /// serialization failure).
        transient: bool,
    },
    /// kiln could not talk to the database (always worth a retry).
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl BatchError {
    /// True when a retry may succeed.
    pub fn transient(&self) -> bool {
        match self {
            BatchError::Statement { transient, .. } => *transient,
            BatchError::Engine(e) => !matches!(e, EngineError::Refused(_) | EngineError::BadUrl { .. }),
        }
    }
}

/// `kiln_jobs`: durable backfill jobs, reached through [`crate::engine::Engine::jobs`].
///
/// Contract, as for [`crate::engine::HistoryStore`]: every method does all it
/// says or returns an error and changes nothing. Workers coordinate only
/// through these methods, from any number of processes and machines.
#[async_trait]
pub trait JobStore: Send {
    /// Create `kiln_jobs` if it is missing. Idempotent; safe while another
    /// process does the same.
    async fn ensure_jobs(&mut self) -> Result<(), EngineError>;

    /// Every part, ordered by version then part. Empty when `kiln_jobs` does
    /// not exist; must not create it.
    async fn list_jobs(&mut self) -> Result<Vec<Job>, EngineError>;

    /// Replace every part of `version` with `parts` (queueing a job, or
    /// re-queueing it after a rollback), in one commit.
    async fn replace_jobs(&mut self, version: u64, parts: &[Job]) -> Result<(), EngineError>;

    /// Claim a part that is `queued`, or `running` with a lease expired at
    /// `now` (its worker died); `only` limits the claim to one version. The
    /// part becomes `running`, leased to `owner` until `until`, attempts + 1,
    /// `started_at` set if unset. Parts leased by others are skipped without
    /// waiting (`FOR UPDATE SKIP LOCKED`, `findOneAndUpdate`). `Ok(None)`:
    /// nothing to claim.
    async fn claim_job(&mut self, owner: &str, now: DateTime<Utc>, until: DateTime<Utc>, only: Option<u64>) -> Result<Option<Job>, EngineError>;

    /// Apply an operator's change to every part of `version` it applies to
    /// (see [`JobControl::transition`]), atomically per part. Returns how many
    /// parts changed.
    async fn control_job(&mut self, version: u64, control: &JobControl) -> Result<u64, EngineError>;

    /// Write the worker-owned fields of `job` (state, lease_owner,
    /// lease_until, error, attempts, finished_at, updated_at) if `owner` still
    /// holds its lease and an operator has not paused or cancelled it since;
    /// returns the part as stored afterwards, or `None` when the lease is no
    /// longer `owner`'s (nothing written). A part an operator paused or
    /// cancelled is returned unchanged except for the lease fields.
    async fn save_job(&mut self, job: &Job, owner: &str) -> Result<Option<Job>, EngineError>;

    /// Run the next batch of `job` (at most `job.throttle.batch` keys after
    /// the cursor, within the part's range) and commit the new cursor, rows
    /// done, batches + 1 and the lease extended to `until` — together with the
    /// batch's writes where the engine has transactions, and only if `owner`
    /// still holds the lease and the cursor is still `job.cursor`.
    async fn run_batch(&mut self, job: &Job, owner: &str, until: DateTime<Utc>) -> Result<BatchOutcome, BatchError>;

    /// Rows/documents that still need the backfill (the `remaining` count, or
    /// the filter). Contract is refused unless this is zero.
    async fn count_remaining(&mut self, spec: &Backfill) -> Result<i64, EngineError>;

    /// Check that the backfill can run (the table/collection exists; the key
    /// exists and is unique) and count its keys, with split points for
    /// `spec.parts()` parts. A refusal is [`EngineError::Refused`] with the reason.
    async fn plan_backfill(&mut self, spec: &Backfill) -> Result<BackfillPlan, EngineError>;
}

/// The parts of one job, as `kiln up` queues them from a [`BackfillPlan`].
pub fn parts_of(version: u64, name: &str, spec: &Backfill, plan: &BackfillPlan) -> Vec<Job> {
    let n = plan.bounds.len() + 1;
    let per = plan.total / n as i64;
    (0..n)
        .map(|i| {
            let lo = if i == 0 { None } else { Some(plan.bounds[i - 1].clone()) };
            let hi = plan.bounds.get(i).cloned();
            let total = if i + 1 == n { plan.total - per * (n as i64 - 1) } else { per };
            Job::queued(version, name, spec, i as u32, n as u32, (lo, hi), Some(total))
        })
        .collect()
}

/// The rows of one job summed over its parts, as `kiln jobs` and `kiln status` show it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobInfo {
    /// The migration version (the job's id).
    pub version: String,
    /// The migration's name.
    pub name: String,
    /// One state for the whole job: `failed` if any part failed, `cancelled`
    /// if any was, `paused` if any is, `running` if any runs, `done` when all
    /// are, else `queued`.
    pub state: JobState,
    /// Table or collection.
    pub target: String,
    /// Parts, and how many are done.
    pub parts: u32,
    /// Parts done.
    pub parts_done: u32,
    /// Keys walked.
    pub rows_done: i64,
    /// Keys when queued (an estimate).
    pub rows_total: Option<i64>,
    /// Batches committed.
    pub batches: i64,
    /// Rows per second since the first claim.
    pub rows_per_sec: Option<f64>,
    /// Seconds left at that rate.
    pub eta_secs: Option<u64>,
    /// Workers holding a live lease.
    pub workers: Vec<String>,
    /// The current throttle (of part 0).
    pub throttle: Throttle,
    /// The last error of any part.
    pub error: Option<String>,
    /// Queued at (RFC 3339).
    pub created_at: String,
    /// Finished at, when every part is final.
    pub finished_at: Option<String>,
}

impl JobInfo {
    /// Sum `parts` (all of one version) at `now`.
    pub fn of(parts: &[Job], now: DateTime<Utc>) -> Option<JobInfo> {
        let first = parts.first()?;
        let any = |s: JobState| parts.iter().any(|p| p.state == s);
        let state = if any(JobState::Failed) {
            JobState::Failed
        } else if any(JobState::Cancelled) {
            JobState::Cancelled
        } else if any(JobState::Paused) {
            JobState::Paused
        } else if any(JobState::Running) {
            JobState::Running
        } else if parts.iter().all(|p| p.state == JobState::Done) {
            JobState::Done
        } else {
            JobState::Queued
        };
        let rows_done: i64 = parts.iter().map(|p| p.rows_done).sum();
        let rows_total = parts.iter().map(|p| p.rows_total).sum::<Option<i64>>().map(|t| t.max(rows_done));
        let started = parts.iter().filter_map(|p| p.started_at).min();
        let all_final = parts.iter().all(|p| p.state.is_final());
        let finished = if all_final { parts.iter().filter_map(|p| p.finished_at).max() } else { None };
        let end = finished.unwrap_or(now);
        let rows_per_sec = started.and_then(|s| {
            let secs = (end - s).num_milliseconds() as f64 / 1000.0;
            (secs > 0.0 && rows_done > 0).then(|| rows_done as f64 / secs)
        });
        let eta_secs = match (rows_per_sec, rows_total, all_final) {
            (Some(r), Some(t), false) if r > 0.0 => Some(((t - rows_done).max(0) as f64 / r).ceil() as u64),
            _ => None,
        };
        // The version as written in the file name (`0007`), when the name has it.
        let version = first.name.split('_').next().filter(|t| t.parse::<u64>().ok() == Some(first.version)).map(str::to_string);
        Some(JobInfo {
            version: version.unwrap_or_else(|| first.version.to_string()),
            name: first.name.clone(),
            state,
            target: first.spec.target().to_string(),
            parts: parts.len() as u32,
            parts_done: parts.iter().filter(|p| p.state == JobState::Done).count() as u32,
            rows_done,
            rows_total,
            batches: parts.iter().map(|p| p.batches).sum(),
            rows_per_sec,
            eta_secs,
            workers: parts.iter().filter(|p| p.leased(now)).filter_map(|p| p.lease_owner.clone()).collect(),
            throttle: first.throttle,
            error: parts.iter().rev().find_map(|p| p.error.clone()),
            created_at: first.created_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            finished_at: finished.map(|f| f.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        })
    }

    /// One [`JobInfo`] per version in `jobs` (ordered by version).
    pub fn all(jobs: &[Job], now: DateTime<Utc>) -> Vec<JobInfo> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < jobs.len() {
            let v = jobs[i].version;
            let j = jobs[i..].iter().take_while(|p| p.version == v).count();
            out.extend(JobInfo::of(&jobs[i..i + j], now));
            i += j;
        }
        out
    }

    /// `12,345/100,000 rows (12%), 5,000 rows/s, ETA 18s` for people.
    pub fn progress(&self) -> String {
        let mut s = match self.rows_total {
            Some(t) if t > 0 => format!("{}/{} rows ({}%)", group(self.rows_done), group(t), (self.rows_done * 100 / t).min(100)),
            _ => format!("{} rows", group(self.rows_done)),
        };
        if let Some(r) = self.rows_per_sec {
            s.push_str(&format!(", {} rows/s", group(r.round() as i64)));
        }
        if let Some(e) = self.eta_secs {
            s.push_str(&format!(", ETA {}", human_secs(e)));
        }
        s
    }
}

fn group(n: i64) -> String {
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

fn human_secs(s: u64) -> String {
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// How a worker runs parts.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// Recorded as the lease owner (`user@host:pid`).
    pub owner: String,
    /// Lease length; renewed with every batch and during pauses.
    pub lease: Duration,
    /// Retries of a failing batch before the part fails.
    pub max_retries: u32,
    /// First retry delay; doubled per retry, at most 30 s.
    pub backoff: Duration,
    /// Set to stop after the current batch (SIGTERM), releasing the lease.
    pub stop: Arc<AtomicBool>,
}

impl WorkerOptions {
    /// Defaults: 30 s lease, 5 retries from 200 ms.
    pub fn new(owner: impl Into<String>) -> Self {
        WorkerOptions {
            owner: owner.into(),
            lease: Duration::from_secs(30),
            max_retries: 5,
            backoff: Duration::from_millis(200),
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    fn until(&self) -> DateTime<Utc> {
        Utc::now() + chrono::Duration::from_std(self.lease).unwrap_or(chrono::Duration::seconds(30))
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// How [`work_part`] ended.
#[derive(Clone, Debug, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum PartEnd {
    /// Every key of the part is done.
    Done(Job),
    /// Failed after every retry (the part is recorded `failed`).
    Failed(Job),
    /// An operator paused or cancelled it; the lease was released.
    Stopped(Job),
    /// The worker was asked to stop; the lease was released and the part is
    /// left `running` with an expired lease, for any worker to take.
    Released(Job),
    /// Another worker holds the part now (this one's lease expired).
    Lost,
}

/// Progress of a running part, after every batch.
pub trait JobProgress: Send + Sync {
    /// A batch committed.
    fn batch(&self, batch: &Batch);
}

impl<F: Fn(&Batch) + Send + Sync> JobProgress for F {
    fn batch(&self, batch: &Batch) {
        self(batch)
    }
}

/// Run a claimed part until it is done, fails, is paused/cancelled, or the
/// worker is asked to stop.
///
/// # Errors
/// Only when the store cannot record the end (the lease then expires and
/// another worker continues from the committed cursor).
pub async fn work_part(store: &mut dyn JobStore, mut job: Job, opts: &WorkerOptions, progress: &dyn JobProgress) -> Result<PartEnd, EngineError> {
    let started = Instant::now();
    let rows_at_start = job.rows_done;
    let mut retries = 0u32;
    loop {
        if job.state != JobState::Running {
            return release(store, job, opts, PartEnd::Stopped).await;
        }
        if opts.stopping() {
            return release(store, job, opts, PartEnd::Released).await;
        }
        match store.run_batch(&job, &opts.owner, opts.until()).await {
            Ok(BatchOutcome::Batch(b)) => {
                retries = 0;
                progress.batch(&b);
                // A short batch of the last part reached the end of the table
                // as it is now: done. Otherwise a job would chase rows written
                // faster than it converts them, forever; rows written in the
                // old shape after this are what the remaining count before
                // contract is for.
                let at_end = job.range_hi.is_none() && b.keys < i64::from(job.throttle.batch);
                job = b.job;
                if !at_end {
                    throttle(store, &mut job, opts, started, rows_at_start).await?;
                    continue;
                }
                if job.state != JobState::Running {
                    continue;
                }
                return finish_done(store, job, opts).await;
            }
            Ok(BatchOutcome::Exhausted) => {
                return finish_done(store, job, opts).await;
            }
            // The part is no longer running for this worker: an operator paused
            // or cancelled it (the lease is still ours: release it, so nobody
            // waits for it to expire), or another worker took it over.
            Ok(BatchOutcome::Lost) => return release(store, job, opts, PartEnd::Stopped).await,
            Err(e) => {
                retries += 1;
                let mut failing = job.clone();
                failing.error = Some(format!("batch failed (attempt {retries} of {}): {e}", opts.max_retries + 1));
                failing.attempts += 1;
                let transient = e.transient();
                if retries > opts.max_retries || !transient && retries > 1 {
                    failing.state = JobState::Failed;
                    failing.finished_at = Some(Utc::now());
                    failing.lease_owner = None;
                    failing.lease_until = None;
                    failing.error = Some(format!(
                        "batch failed {retries} time{}: {e}; fix the cause, then `kiln jobs retry {}`",
                        if retries == 1 { "" } else { "s" },
                        job.version
                    ));
                    return Ok(match store.save_job(&failing, &opts.owner).await? {
                        Some(j) => PartEnd::Failed(j),
                        None => PartEnd::Lost,
                    });
                }
                tracing::warn!(version = job.version, part = job.part, error = %e, retry = retries, "backfill batch failed; retrying");
                // Record the error for `kiln jobs show`, keep the lease.
                failing.lease_until = Some(opts.until());
                match store.save_job(&failing, &opts.owner).await {
                    Ok(Some(j)) => job = j,
                    Ok(None) => return Ok(PartEnd::Lost),
                    Err(_) => {} // the database may be restarting; the retry will tell
                }
                let delay = opts.backoff.saturating_mul(1 << (retries - 1).min(8)).min(Duration::from_secs(30));
                sleep_unless_stopped(delay, opts).await;
            }
        }
    }
}

/// Record a part done (its walk reached the end) and release its lease.
async fn finish_done(store: &mut dyn JobStore, job: Job, opts: &WorkerOptions) -> Result<PartEnd, EngineError> {
    let mut done = job;
    done.state = JobState::Done;
    done.finished_at = Some(Utc::now());
    done.lease_owner = None;
    done.lease_until = None;
    done.error = None;
    Ok(match store.save_job(&done, &opts.owner).await? {
        Some(j) if j.state == JobState::Done => PartEnd::Done(j),
        Some(j) => PartEnd::Stopped(j),
        None => PartEnd::Lost,
    })
}

/// Sleep for the throttle: the pause between batches, and long enough that
/// the part stays under its rows/s ceiling. Renews the lease during long sleeps.
async fn throttle(store: &mut dyn JobStore, job: &mut Job, opts: &WorkerOptions, started: Instant, rows_at_start: i64) -> Result<(), EngineError> {
    let mut wait = Duration::from_millis(job.throttle.pause_ms);
    if let Some(max) = job.throttle.max_rows_per_sec.filter(|m| *m > 0) {
        let rows = (job.rows_done - rows_at_start).max(0) as f64;
        let due = Duration::from_secs_f64(rows / max as f64);
        wait = wait.max(due.saturating_sub(started.elapsed()));
    }
    let renew_every = opts.lease / 3;
    while !wait.is_zero() && !opts.stopping() {
        let step = wait.min(renew_every);
        sleep_unless_stopped(step, opts).await;
        wait = wait.saturating_sub(step);
        if !wait.is_zero() {
            let mut renewed = job.clone();
            renewed.lease_until = Some(opts.until());
            match store.save_job(&renewed, &opts.owner).await? {
                Some(j) => {
                    *job = j;
                    if job.state != JobState::Running {
                        return Ok(());
                    }
                }
                None => return Ok(()),
            }
        }
    }
    Ok(())
}

async fn sleep_unless_stopped(d: Duration, opts: &WorkerOptions) {
    let end = Instant::now() + d;
    while Instant::now() < end && !opts.stopping() {
        tokio::time::sleep((end - Instant::now()).min(Duration::from_millis(100))).await;
    }
}

async fn release(store: &mut dyn JobStore, job: Job, opts: &WorkerOptions, end: fn(Job) -> PartEnd) -> Result<PartEnd, EngineError> {
    let mut released = job.clone();
    released.lease_owner = None;
    released.lease_until = None;
    Ok(match store.save_job(&released, &opts.owner).await? {
        Some(j) => end(j),
        None => PartEnd::Lost,
    })
}

/// What a worker did, for its report.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorkReport {
    /// Parts finished.
    pub done: Vec<Job>,
    /// Parts that failed.
    pub failed: Vec<Job>,
    /// Parts left because of an operator or a stop request.
    pub stopped: Vec<Job>,
}

/// Claim and run parts until none is left to claim (`only`: of one version),
/// or the worker is stopped. `kiln worker --once` and `kiln up --wait` use
/// this; `kiln worker` calls it again after an idle wait.
pub async fn work_all(
    store: &mut dyn JobStore,
    opts: &WorkerOptions,
    only: Option<u64>,
    progress: &dyn JobProgress,
) -> Result<WorkReport, EngineError> {
    let mut report = WorkReport::default();
    while !opts.stopping() {
        let Some(job) = store.claim_job(&opts.owner, Utc::now(), opts.until(), only).await? else {
            break;
        };
        tracing::info!(version = job.version, part = job.part, owner = %opts.owner, "claimed backfill part");
        match work_part(store, job, opts, progress).await? {
            PartEnd::Done(j) => report.done.push(j),
            PartEnd::Failed(j) => report.failed.push(j),
            PartEnd::Stopped(j) | PartEnd::Released(j) => report.stopped.push(j),
            PartEnd::Lost => {}
        }
    }
    Ok(report)
}

/// Replace `:lo` and `:hi` in a backfill statement with SQL literals: the
/// key as a quoted string, which every SQL engine compares as the column's
/// type (an integer key `'42'` as 42; a text key `'0010'` stays text, where an
/// unquoted 0010 would be a number). Occurrences inside string literals,
/// quoted identifiers and `::` casts are left alone.
pub fn bind_range(sql: &str, lo: &str, hi: &str) -> String {
    let lit = |v: &str| format!("'{}'", v.replace('\'', "''"));
    let (lo, hi) = (lit(lo), lit(hi));
    let b = sql.as_bytes();
    let mut out = String::with_capacity(sql.len() + 16);
    let mut i = 0;
    let mut quote: Option<u8> = None;
    while i < b.len() {
        let c = b[i];
        if let Some(q) = quote {
            if c == q {
                quote = None;
            }
            out.push(c as char);
            i += 1;
            continue;
        }
        if c == b'\'' || c == b'"' || c == b'`' {
            quote = Some(c);
        } else if c == b':' && (i == 0 || b[i - 1] != b':') {
            let rest = &sql[i + 1..];
            let word_end = |n: usize| rest.as_bytes().get(n).is_none_or(|x| !(x.is_ascii_alphanumeric() || *x == b'_'));
            if rest.len() >= 2 && rest[..2].eq_ignore_ascii_case("lo") && word_end(2) {
                out.push_str(&lo);
                i += 3;
                continue;
            }
            if rest.len() >= 2 && rest[..2].eq_ignore_ascii_case("hi") && word_end(2) {
                out.push_str(&hi);
                i += 3;
                continue;
            }
        }
        // Copy one whole UTF-8 character.
        let ch = sql[i..].chars().next().unwrap_or(' ');
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

/// True when `sql` uses both `:lo` and `:hi` outside quotes.
pub fn uses_range(sql: &str) -> bool {
    let bound = bind_range(sql, "\u{1}LO", "\u{1}HI");
    bound.contains("\u{1}LO") && bound.contains("\u{1}HI")
}

/// The `remaining` count derived from a backfill statement of the form
/// `UPDATE table SET … WHERE cond AND cond …`: the conditions that do not
/// mention `:lo`/`:hi`, counted over the whole table. `None` when the
/// statement has another form or no such condition (then the file must
/// say `-- kiln:remaining`).
pub fn derive_remaining(sql: &str, table: &str) -> Option<String> {
    let lower = sql.to_ascii_lowercase();
    let trimmed = lower.trim_start();
    if !trimmed.starts_with("update") {
        return None;
    }
    let where_at = top_level_find(&lower, " where ")?;
    let cond = &sql[where_at + 7..];
    let parts = split_top_level_and(cond);
    let kept: Vec<&str> = parts.into_iter().map(str::trim).filter(|p| !p.is_empty() && !mentions_range(p)).collect();
    if kept.is_empty() {
        return None;
    }
    Some(format!("SELECT count(*) FROM {table} WHERE {}", kept.iter().map(|p| format!("({p})")).collect::<Vec<_>>().join(" AND ")))
}

fn mentions_range(s: &str) -> bool {
    bind_range(s, "\u{1}", "\u{1}") != s
}

/// Byte offset of `needle` (lower-case) in `hay` (lower-case) outside quotes and parentheses.
fn top_level_find(hay: &str, needle: &str) -> Option<usize> {
    let b = hay.as_bytes();
    let mut depth = 0i32;
    let mut quote: Option<u8> = None;
    for i in 0..b.len() {
        let c = b[i];
        if let Some(q) = quote {
            if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            b'\'' | b'"' | b'`' => quote = Some(c),
            b'(' => depth += 1,
            b')' => depth -= 1,
            b' ' | b'\n' | b'\t' | b'\r' if depth == 0 => {
                let rest = &hay[i..];
                let norm: String = rest.chars().take(needle.len() + 8).map(|c| if c.is_whitespace() { ' ' } else { c }).collect();
                if norm.starts_with(needle) {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// Split a condition on top-level `AND` (outside quotes, parentheses and `BETWEEN … AND …`).
fn split_top_level_and(cond: &str) -> Vec<&str> {
    let lower = cond.to_ascii_lowercase();
    let b = lower.as_bytes();
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut quote: Option<u8> = None;
    let mut start = 0;
    let mut between = false;
    let mut i = 0;
    let word_at = |i: usize, w: &str| {
        lower[i..].starts_with(w)
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'))
            && b.get(i + w.len()).is_none_or(|x| !(x.is_ascii_alphanumeric() || *x == b'_'))
    };
    while i < b.len() {
        let c = b[i];
        if let Some(q) = quote {
            if c == q {
                quote = None;
            }
            i += 1;
            continue;
        }
        match c {
            b'\'' | b'"' | b'`' => quote = Some(c),
            b'(' => depth += 1,
            b')' => depth -= 1,
            _ if depth == 0 && word_at(i, "between") => between = true,
            _ if depth == 0 && word_at(i, "and") => {
                if between {
                    between = false;
                } else {
                    out.push(&cond[start..i]);
                    start = i + 3;
                }
                i += 3;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out.push(&cond[start..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_range_replaces_placeholders_outside_quotes() {
        let s = "UPDATE t SET a = ':lo', b = c::text WHERE id BETWEEN :lo AND :hi AND x = :hidden";
        assert_eq!(bind_range(s, "5", "9"), "UPDATE t SET a = ':lo', b = c::text WHERE id BETWEEN '5' AND '9' AND x = :hidden");
        assert_eq!(bind_range("k >= :lo and k <= :hi", "a'b", "0010"), "k >= 'a''b' and k <= '0010'");
        assert!(uses_range("WHERE id BETWEEN :lo AND :hi"));
        assert!(!uses_range("WHERE id > :lo"));
        assert!(!uses_range("WHERE id > ':lo' AND id < ':hi'"));
    }

    #[test]
    fn remaining_is_derived_from_the_non_range_conditions() {
        let s = "UPDATE users SET display_name = full_name WHERE id BETWEEN :lo AND :hi AND display_name IS NULL AND (full_name IS NOT NULL OR x = 'a and b')";
        assert_eq!(
            derive_remaining(s, "users").unwrap(),
            "SELECT count(*) FROM users WHERE (display_name IS NULL) AND ((full_name IS NOT NULL OR x = 'a and b'))"
        );
        assert_eq!(derive_remaining("UPDATE users SET a = b WHERE id >= :lo AND id <= :hi", "users"), None);
        assert_eq!(derive_remaining("INSERT INTO x SELECT * FROM users WHERE id BETWEEN :lo AND :hi AND a", "users"), None);
    }

    fn job(state: JobState, done: i64, total: i64) -> Job {
        let spec = Backfill::Mongo(MongoBackfill {
            file: "f".into(),
            collection: "users".into(),
            filter: serde_json::json!({}),
            change: MongoChange::Update(serde_json::json!({"$set": {"a": 1}})),
            batch: 10,
            parts: 1,
        });
        let mut j = Job::queued(7, "0007_x", &spec, 0, 1, (None, None), Some(total));
        j.state = state;
        j.rows_done = done;
        j
    }

    #[test]
    fn control_transitions() {
        let q = job(JobState::Queued, 0, 10);
        assert_eq!(JobControl::Pause.apply(&q).unwrap().state, JobState::Paused);
        assert!(JobControl::Resume.apply(&q).is_none());
        let d = job(JobState::Done, 10, 10);
        assert!(JobControl::Cancel.apply(&d).is_none(), "a done job cannot be cancelled");
        let f = job(JobState::Failed, 3, 10);
        let r = JobControl::Retry.apply(&f).unwrap();
        assert_eq!((r.state, r.attempts, r.error), (JobState::Queued, 0, None));
        let t = JobControl::Throttle { batch: Some(50), pause_ms: None, max_rows_per_sec: Some(Some(100)) }.apply(&d).unwrap();
        assert_eq!(t.throttle, Throttle { batch: 50, pause_ms: 0, max_rows_per_sec: Some(100) });
    }

    #[test]
    fn job_info_sums_parts() {
        let mut a = job(JobState::Done, 10, 10);
        a.part = 0;
        let mut b = job(JobState::Running, 5, 10);
        b.part = 1;
        let info = JobInfo::of(&[a.clone(), b], Utc::now()).unwrap();
        assert_eq!((info.state, info.rows_done, info.rows_total, info.parts, info.parts_done), (JobState::Running, 15, Some(20), 2, 1));
        let mut c = job(JobState::Failed, 1, 10);
        c.part = 1;
        c.error = Some("boom".into());
        let info = JobInfo::of(&[a, c], Utc::now()).unwrap();
        assert_eq!((info.state, info.error.as_deref()), (JobState::Failed, Some("boom")));
        assert!(info.progress().starts_with("11/20 rows (55%)"), "{}", info.progress());
    }

    #[test]
    fn parts_cover_the_key_space() {
        let spec = job(JobState::Queued, 0, 0).spec;
        let plan = BackfillPlan { total: 100, bounds: vec!["33".into(), "66".into()] };
        let parts = parts_of(7, "0007_x", &spec, &plan);
        let ranges: Vec<_> = parts.iter().map(|p| (p.range_lo.clone(), p.range_hi.clone(), p.rows_total)).collect();
        assert_eq!(
            ranges,
            vec![(None, Some("33".into()), Some(33)), (Some("33".into()), Some("66".into()), Some(33)), (Some("66".into()), None, Some(34))]
        );
    }
}
