//! kiln's [`JobStore`] on MongoDB: backfill jobs in the jobs collection
//! (`kiln_jobs` beside `kiln_history`; documents in jobdoc.rs), claimed,
//! controlled and saved with single-document conditional updates, so any
//! number of workers on any number of machines coordinate through the
//! database alone. The batches themselves are backfill.rs.
//!
//! # How a backfill batch commits
//!
//! A batch walks the collection's `_id` in order, at most `batch` documents
//! after the part's cursor, and only documents that still match the
//! backfill's `filter`; it then applies the change to those documents
//! (`updateMany`, or the aggregation pipeline written back on `_id`) and
//! moves the cursor, fenced by the worker's lease, the part still `running`
//! and the old cursor: a pause or cancel stops the worker before the next
//! batch counts.
//!
//! - **On a replica set or sharded cluster** the change and the cursor commit
//!   in one multi-document transaction: a batch is done exactly once. If the
//!   lease was lost meanwhile, the transaction is aborted and nothing of the
//!   batch remains.
//! - **On a standalone server** (no transactions) the change is written
//!   first and the cursor after it. A worker that dies between the two
//!   leaves the change without the cursor; the next worker redoes that one
//!   batch. This is safe as long as the backfill's `filter` excludes
//!   documents already converted (`{displayName: {$exists: false}}` for a
//!   change that sets `displayName`): the redo then finds nothing left to
//!   change in those documents. Write the filter that way; `kiln contract`
//!   relies on it counting zero anyway.
//!
//! The walk itself uses the filter, so documents the application (or
//! another worker) already converted are skipped rather than counted and
//! rewritten, and a nearly finished job costs few round trips.

use async_trait::async_trait;
use bson::{doc, Bson, Document};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use kiln_core::jobs::{Backfill, BackfillPlan, BatchError, BatchOutcome, Job, JobControl, JobState, JobStore};
use kiln_core::EngineError;
use mongodb::options::ReturnDocument;

use crate::engine::MongoEngine;
use crate::jobdoc::{self, date, part_id};

/// How many times a transaction that failed with `TransientTransactionError`
/// is tried again before the error is returned.
pub(crate) const TRANSACTION_TRIES: u32 = 3;

impl MongoEngine {
    fn jobs_error(&self, what: &str, e: &mongodb::error::Error) -> EngineError {
        self.conn.engine_error(format!("{what} in the jobs collection {}", self.jobs_name), e)
    }

    fn read_job(&self, d: &Document) -> Result<Job, EngineError> {
        jobdoc::from_doc(d).map_err(|message| EngineError::Query { context: format!("reading the jobs collection {}", self.jobs_name), message })
    }

    /// One attempt at replacing the parts of `version`, in `session`'s
    /// transaction when there is one.
    async fn replace_once(&self, version: i64, docs: &[Document], transaction: bool) -> Result<(), mongodb::error::Error> {
        if !transaction {
            self.jobs.delete_many(doc! { "version": version }).await?;
            if !docs.is_empty() {
                self.jobs.insert_many(docs.to_vec()).await?;
            }
            return Ok(());
        }
        // Inside a transaction the collection must not carry its own write concern.
        let coll = self.conn.db.collection::<Document>(&self.jobs_name);
        let mut session = self.conn.client.start_session().await?;
        session.start_transaction().await?;
        let r = async {
            coll.delete_many(doc! { "version": version }).session(&mut session).await?;
            if !docs.is_empty() {
                coll.insert_many(docs.to_vec()).session(&mut session).await?;
            }
            Ok::<_, mongodb::error::Error>(())
        }
        .await;
        if let Err(e) = r {
            let _ = session.abort_transaction().await;
            return Err(e);
        }
        crate::exec::commit(&mut session).await
    }
}

#[async_trait]
impl JobStore for MongoEngine {
    async fn ensure_jobs(&mut self) -> Result<(), EngineError> {
        self.create_if_missing(&self.jobs_name.clone()).await
    }

    async fn list_jobs(&mut self) -> Result<Vec<Job>, EngineError> {
        if !self.conn.collection_exists(&self.jobs_name).await? {
            return Ok(Vec::new());
        }
        let docs: Vec<Document> = self
            .jobs
            .find(doc! {})
            .sort(doc! { "version": 1, "part": 1 })
            .await
            .map_err(|e| self.jobs_error("reading the parts", &e))?
            .try_collect()
            .await
            .map_err(|e| self.jobs_error("reading the parts", &e))?;
        docs.iter().map(|d| self.read_job(d)).collect()
    }

    /// `deleteMany {version}` then `insertMany`, in one transaction where the
    /// deployment has them (tried again on `TransientTransactionError`);
    /// on a standalone server in that order, so a failure in between leaves
    /// the job without parts (re-queued by the next `kiln up`), never with
    /// two sets of them.
    async fn replace_jobs(&mut self, version: u64, parts: &[Job]) -> Result<(), EngineError> {
        let v = crate::history::stored_id(version, None)?;
        let docs = parts.iter().map(jobdoc::to_doc).collect::<Result<Vec<_>, _>>()?;
        self.create_if_missing(&self.jobs_name.clone()).await?;
        let transaction = self.conn.topology.supports_transactions();
        let mut tries = 0;
        loop {
            tries += 1;
            match self.replace_once(v, &docs, transaction).await {
                Ok(()) => return Ok(()),
                Err(e) if transaction && tries < TRANSACTION_TRIES && e.contains_label(mongodb::error::TRANSIENT_TRANSACTION_ERROR) => continue,
                Err(e) => return Err(self.jobs_error(&format!("queueing the {} parts of version {version}", parts.len()), &e)),
            }
        }
    }

    /// One `findAndModify`: the first claimable part in (version, part)
    /// order. The update is a pipeline so that `started_at` is set only when
    /// it is still unset; values go in `$literal` so that an owner name
    /// starting with `$` stays text.
    async fn claim_job(&mut self, owner: &str, now: DateTime<Utc>, until: DateTime<Utc>, only: Option<u64>) -> Result<Option<Job>, EngineError> {
        let mut filter = doc! {
            "$or": [
                { "state": JobState::Queued.as_str() },
                { "state": JobState::Running.as_str(), "$or": [ { "lease_until": Bson::Null }, { "lease_until": { "$lt": date(now) } } ] },
            ]
        };
        if let Some(v) = only {
            filter.insert("version", crate::history::stored_id(v, None)?);
        }
        let stamp = date(Utc::now());
        let update = vec![doc! { "$set": {
            "state": JobState::Running.as_str(),
            "lease_owner": { "$literal": owner },
            "lease_until": { "$literal": date(until) },
            "updated_at": { "$literal": stamp.clone() },
            "attempts": { "$add": [ { "$ifNull": ["$attempts", 0_i32] }, 1_i32 ] },
            "started_at": { "$ifNull": [ "$started_at", { "$literal": stamp } ] },
        } }];
        let claimed = self
            .jobs
            .find_one_and_update(filter, update)
            .sort(doc! { "version": 1, "part": 1 })
            .return_document(ReturnDocument::After)
            .await
            .map_err(|e| self.jobs_error("claiming a part", &e))?;
        claimed.as_ref().map(|d| self.read_job(d)).transpose()
    }

    /// One `updateMany` per control: the state change filtered on the states
    /// it applies to (so each part changes atomically or not at all), or the
    /// throttle fields in any state. Counts the parts it matched.
    async fn control_job(&mut self, version: u64, control: &JobControl) -> Result<u64, EngineError> {
        let v = crate::history::stored_id(version, None)?;
        let now = date(Utc::now());
        let (filter, set) = match (control, control.transition()) {
            (_, Some((from, to))) => {
                let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
                let mut set = doc! { "state": to.as_str(), "updated_at": now.clone() };
                if matches!(control, JobControl::Retry) {
                    set.insert("attempts", 0_i32);
                    set.insert("error", Bson::Null);
                    set.insert("finished_at", Bson::Null);
                }
                if to == JobState::Cancelled {
                    set.insert("finished_at", now);
                }
                (doc! { "version": v, "state": { "$in": from } }, set)
            }
            (JobControl::Throttle { batch, pause_ms, max_rows_per_sec }, None) => {
                let mut set = doc! { "updated_at": now };
                if let Some(b) = batch {
                    set.insert("batch_size", *b as i64);
                }
                if let Some(p) = pause_ms {
                    set.insert("pause_ms", (*p).min(i64::MAX as u64) as i64);
                }
                if let Some(m) = max_rows_per_sec {
                    set.insert("max_rows_per_sec", m.map(|m| Bson::Int64(m.min(i64::MAX as u64) as i64)).unwrap_or(Bson::Null));
                }
                (doc! { "version": v }, set)
            }
            _ => return Ok(0),
        };
        let r = self
            .jobs
            .update_many(filter, doc! { "$set": set })
            .await
            .map_err(|e| self.jobs_error(&format!("changing the parts of version {version}"), &e))?;
        Ok(r.matched_count)
    }

    /// Two conditional `findAndModify`s: every worker field while the part
    /// is neither paused nor cancelled; otherwise (an operator stopped it
    /// since) only the lease fields. Both are fenced by `lease_owner: owner`.
    async fn save_job(&mut self, job: &Job, owner: &str) -> Result<Option<Job>, EngineError> {
        let id = part_id(job.version, job.part)?;
        let now = Utc::now();
        let stopped = [JobState::Paused.as_str(), JobState::Cancelled.as_str()];
        let what = format!("saving part {} of version {}", job.part, job.version);
        let full = self
            .jobs
            .find_one_and_update(
                doc! { "_id": &id, "lease_owner": owner, "state": { "$nin": stopped.to_vec() } },
                doc! { "$set": jobdoc::worker_fields(job, now) },
            )
            .return_document(ReturnDocument::After)
            .await
            .map_err(|e| self.jobs_error(&what, &e))?;
        let saved = match full {
            Some(d) => Some(d),
            None => self
                .jobs
                .find_one_and_update(
                    doc! { "_id": &id, "lease_owner": owner },
                    doc! { "$set": {
                        "lease_owner": job.lease_owner.clone().map(Bson::String).unwrap_or(Bson::Null),
                        "lease_until": job.lease_until.map(date).unwrap_or(Bson::Null),
                        "updated_at": date(now),
                    } },
                )
                .return_document(ReturnDocument::After)
                .await
                .map_err(|e| self.jobs_error(&what, &e))?,
        };
        saved.as_ref().map(|d| self.read_job(d)).transpose()
    }

    async fn run_batch(&mut self, job: &Job, owner: &str, until: DateTime<Utc>) -> Result<BatchOutcome, BatchError> {
        crate::backfill::run_batch(self, job, owner, until).await
    }

    async fn count_remaining(&mut self, spec: &Backfill) -> Result<i64, EngineError> {
        crate::backfill::count_remaining(self, spec).await
    }

    async fn plan_backfill(&mut self, spec: &Backfill) -> Result<BackfillPlan, EngineError> {
        crate::backfill::plan(self, spec).await
    }
}
