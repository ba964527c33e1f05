//! One backfill batch on MongoDB, the remaining count and the plan of a
//! backfill (see the jobs module for how a batch commits, with and without
//! transactions).
//!
//! The two forms of change:
//!
//! - `update` (a document or a pipeline): `updateMany({$and: [filter,
//!   {_id: {$gte: lo, $lte: hi}}]}, update)`; `changed` is its `nModified`.
//! - `pipeline` (stages that may `$lookup` other collections): the stages run
//!   after `{$match: {$and: [filter, {_id: {$gte: lo, $lte: hi}}]}}`. With
//!   transactions, their output is read and written back inside the batch's
//!   transaction with one `update` command of `{q: {_id}, u: {$set:
//!   <output without _id>}}` statements, because `$merge` cannot run in a
//!   transaction (code 263, on MongoDB as on SecantusDB); `changed` is its
//!   `nModified`. Without transactions a `$merge` (into the same collection,
//!   on `_id`, `whenMatched: merge`, `whenNotMatched: discard`) ends the
//!   pipeline, which keeps the documents on the server; `$merge` reports no
//!   counts, so `changed` is then the number of documents the batch matched.
//!   Both merge the output's top-level fields into the document: a field the
//!   stages remove is not removed from the stored document.
//!
//! Errors of the change carry the server's code (`code 121
//! (DocumentValidationFailure): …`) and are transient for write conflicts,
//! aborted transactions, primary changes, network errors and anything
//! labelled `TransientTransactionError`.

use bson::{doc, Bson, Document};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use kiln_core::jobs::{Backfill, BackfillPlan, Batch, BatchError, BatchOutcome, Job, JobState, MongoBackfill, MongoChange};
use kiln_core::EngineError;
use mongodb::options::ReturnDocument;
use mongodb::{ClientSession, Collection};

use crate::command::{check_reply, describe};
use crate::conn::{error_code, is_connection_error};
use crate::engine::MongoEngine;
use crate::jobdoc::{self, date, json_doc, key_text, key_value, part_id};

/// Server codes worth a retry: write conflict, no such transaction, the
/// primary changed or is shutting down, network trouble.
fn transient_code(code: i32) -> bool {
    matches!(code, 6 | 7 | 89 | 91 | 112 | 189 | 251 | 9001 | 10107 | 11600 | 11602 | 13435 | 13436)
}

fn is_transient(e: &mongodb::error::Error) -> bool {
    e.contains_label(mongodb::error::TRANSIENT_TRANSACTION_ERROR) || is_connection_error(e) || error_code(e).is_some_and(transient_code)
}

/// A driver error as `code N (Name): message`.
fn server_message(engine: &MongoEngine, e: &mongodb::error::Error) -> String {
    use mongodb::error::{ErrorKind, WriteFailure};
    let m = match &*e.kind {
        ErrorKind::Command(c) => describe(c.code, Some(&c.code_name), &c.message),
        ErrorKind::Write(WriteFailure::WriteError(w)) => describe(w.code, w.code_name.as_deref(), &w.message),
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => {
            format!("{} (write concern error: the write may have been applied)", describe(w.code, Some(&w.code_name), &w.message))
        }
        _ => e.kind.to_string(),
    };
    engine.conn.scrub(m)
}

/// The spec of a MongoDB job, or a refusal.
fn mongo_spec(spec: &Backfill) -> Result<&MongoBackfill, EngineError> {
    match spec {
        Backfill::Mongo(m) => Ok(m),
        Backfill::Sql(s) => Err(EngineError::Refused(format!("{}: a SQL backfill cannot run on MongoDB", s.file.display()))),
    }
}

fn filter_of(spec: &MongoBackfill) -> Result<Document, EngineError> {
    json_doc(&spec.filter, &format!("{}: backfill filter", spec.file.display())).map_err(EngineError::Refused)
}

/// `{$and: [filter, {_id: range}]}`, or just the range when the filter is empty.
fn within(filter: &Document, range: Document) -> Document {
    if range.is_empty() {
        return filter.clone();
    }
    if filter.is_empty() {
        return doc! { "_id": range };
    }
    doc! { "$and": [ filter.clone(), { "_id": range } ] }
}

fn key(text: &str) -> Result<Bson, EngineError> {
    key_value(text).map_err(|message| EngineError::Query { context: "reading a backfill cursor".into(), message })
}

/// What the change of one batch did.
enum Changed {
    Ok(i64),
    Failed { message: String, transient: bool },
}

fn failed(engine: &MongoEngine, e: &mongodb::error::Error) -> Changed {
    Changed::Failed { message: server_message(engine, e), transient: is_transient(e) }
}

/// Apply `spec`'s change to the documents matching `batch_filter`, in
/// `session`'s transaction when given.
async fn change(engine: &MongoEngine, spec: &MongoBackfill, batch_filter: Document, keys: i64, session: Option<&mut ClientSession>) -> Changed {
    let coll: Collection<Document> = engine.conn.db.collection(&spec.collection);
    let bad = |m: String| Changed::Failed { message: m, transient: false };
    match &spec.change {
        MongoChange::Update(u) => {
            let action = match u {
                serde_json::Value::Array(stages) => {
                    let mut pipeline = Vec::with_capacity(stages.len());
                    for s in stages {
                        match json_doc(s, "backfill update stage") {
                            Ok(d) => pipeline.push(d),
                            Err(m) => return bad(m),
                        }
                    }
                    coll.update_many(batch_filter, pipeline)
                }
                other => match json_doc(other, "backfill update") {
                    Ok(d) => coll.update_many(batch_filter, d),
                    Err(m) => return bad(m),
                },
            };
            let r = match session {
                Some(s) => action.session(s).await,
                None => action.await,
            };
            match r {
                Ok(r) => Changed::Ok(r.modified_count as i64),
                Err(e) => failed(engine, &e),
            }
        }
        MongoChange::Pipeline(stages) => {
            let mut pipeline = vec![doc! { "$match": batch_filter }];
            for s in stages {
                match json_doc(s, "backfill pipeline stage") {
                    Ok(d) => pipeline.push(d),
                    Err(m) => return bad(m),
                }
            }
            match session {
                None => {
                    pipeline.push(doc! { "$merge": { "into": &spec.collection, "on": "_id", "whenMatched": "merge", "whenNotMatched": "discard" } });
                    match coll.aggregate(pipeline).await {
                        Ok(mut c) => match c.try_next().await {
                            Ok(_) => Changed::Ok(keys),
                            Err(e) => failed(engine, &e),
                        },
                        Err(e) => failed(engine, &e),
                    }
                }
                Some(s) => {
                    let out: Vec<Document> = match coll.aggregate(pipeline).session(&mut *s).await {
                        Ok(mut c) => match c.stream(&mut *s).try_collect().await {
                            Ok(v) => v,
                            Err(e) => return failed(engine, &e),
                        },
                        Err(e) => return failed(engine, &e),
                    };
                    let updates: Vec<Document> = out
                        .into_iter()
                        .filter_map(|mut d| {
                            let id = d.remove("_id")?;
                            (!d.is_empty()).then(|| doc! { "q": { "_id": id }, "u": { "$set": d } })
                        })
                        .collect();
                    if updates.is_empty() {
                        return Changed::Ok(0);
                    }
                    let cmd = doc! { "update": &spec.collection, "updates": updates, "ordered": true };
                    match engine.conn.db.run_command(cmd).session(&mut *s).await {
                        Ok(reply) => match check_reply(&reply) {
                            Ok(()) => Changed::Ok(reply.get_i32("nModified").map(i64::from).or_else(|_| reply.get_i64("nModified")).unwrap_or(0)),
                            Err(f) => Changed::Failed { message: f.message, transient: f.code.is_some_and(transient_code) },
                        },
                        Err(e) => failed(engine, &e),
                    }
                }
            }
        }
    }
}

/// The batch: walk, change, progress. See the jobs module docs.
pub(crate) async fn run_batch(engine: &mut MongoEngine, job: &Job, owner: &str, until: DateTime<Utc>) -> Result<BatchOutcome, BatchError> {
    let spec = mongo_spec(&job.spec)?;
    let filter = filter_of(spec)?;
    let coll: Collection<Document> = engine.conn.db.collection(&spec.collection);
    let after = job.cursor.as_deref().or(job.range_lo.as_deref());
    let mut walk_range = Document::new();
    if let Some(a) = after {
        walk_range.insert("$gt", key(a)?);
    }
    if let Some(h) = &job.range_hi {
        walk_range.insert("$lte", key(h)?);
    }
    // 1. The next keys that still need the change.
    let limit = i64::from(job.throttle.batch.max(1));
    let walked: Result<Vec<Document>, mongodb::error::Error> =
        match coll.find(within(&filter, walk_range)).sort(doc! { "_id": 1 }).limit(limit).projection(doc! { "_id": 1 }).await {
            Ok(c) => c.try_collect().await,
            Err(e) => Err(e),
        };
    let walked = walked.map_err(|e| BatchError::Statement {
        message: format!("finding the next batch of {}: {}", spec.collection, server_message(engine, &e)),
        lo: after.unwrap_or("(start)").to_string(),
        hi: job.range_hi.clone().unwrap_or_else(|| "(end)".into()),
        transient: is_transient(&e),
    })?;
    let ids: Vec<Bson> = walked.into_iter().filter_map(|mut d| d.remove("_id")).collect();
    let (Some(first), Some(last)) = (ids.first(), ids.last()) else {
        return Ok(BatchOutcome::Exhausted);
    };
    let (lo, hi) = (key_text(first), key_text(last));
    let keys = ids.len() as i64;
    let batch_filter = within(&filter, doc! { "$gte": first.clone(), "$lte": last.clone() });
    let statement_error = |message: String, transient: bool| BatchError::Statement { message, lo: lo.clone(), hi: hi.clone(), transient };

    // 3. The progress, fenced by the lease, the state and the old cursor: on
    // a part an operator paused or cancelled since the batch began, the
    // batch does not count (with transactions nothing of it is written;
    // without, only its change) and the worker stops.
    let id = part_id(job.version, job.part)?;
    let fence = doc! {
        "_id": &id,
        "lease_owner": owner,
        "state": JobState::Running.as_str(),
        "cursor": job.cursor.clone().map(Bson::String).unwrap_or(Bson::Null),
    };
    let progress = doc! {
        "$set": { "cursor": &hi, "lease_until": date(until), "updated_at": date(Utc::now()) },
        "$inc": { "rows_done": keys, "batches": 1_i64 },
    };
    let jobs: Collection<Document> = engine.conn.db.collection(&engine.jobs_name);
    let progress_context = format!("recording the progress of part {} of version {}", job.part, job.version);

    if !engine.conn.topology.supports_transactions() {
        // 2. then 3., each on its own (see the module docs).
        let changed = match change(engine, spec, batch_filter, keys, None).await {
            Changed::Ok(n) => n,
            Changed::Failed { message, transient } => return Err(statement_error(message, transient)),
        };
        let after = engine
            .jobs
            .find_one_and_update(fence, progress)
            .return_document(ReturnDocument::After)
            .await
            .map_err(|e| engine.conn.engine_error(&progress_context, &e))?;
        return finish(engine, after, lo, hi, keys, changed);
    }

    // 2. and 3. in one transaction.
    let mut session =
        engine.conn.client.start_session().await.map_err(|e| engine.conn.engine_error("starting a session for a backfill batch", &e))?;
    session.start_transaction().await.map_err(|e| engine.conn.engine_error("starting the transaction of a backfill batch", &e))?;
    let changed = match change(engine, spec, batch_filter, keys, Some(&mut session)).await {
        Changed::Ok(n) => n,
        Changed::Failed { message, transient } => {
            let _ = session.abort_transaction().await;
            return Err(statement_error(format!("{message}; the batch's transaction was aborted"), transient));
        }
    };
    let after = match jobs.find_one_and_update(fence, progress).return_document(ReturnDocument::After).session(&mut session).await {
        Ok(Some(d)) => d,
        Ok(None) => {
            let _ = session.abort_transaction().await;
            return Ok(BatchOutcome::Lost);
        }
        Err(e) => {
            let _ = session.abort_transaction().await;
            return Err(statement_error(
                format!("{progress_context}: {}; the batch's transaction was aborted", server_message(engine, &e)),
                is_transient(&e),
            ));
        }
    };
    if let Err(e) = crate::exec::commit(&mut session).await {
        let unknown = e.contains_label(mongodb::error::UNKNOWN_TRANSACTION_COMMIT_RESULT);
        let outcome = if unknown { "its outcome is unknown; the cursor tells" } else { "nothing of it was committed" };
        return Err(statement_error(format!("committing the batch: {} ({outcome})", server_message(engine, &e)), is_transient(&e) || unknown));
    }
    finish(engine, Some(after), lo, hi, keys, changed)
}

fn finish(engine: &MongoEngine, after: Option<Document>, lo: String, hi: String, keys: i64, changed: i64) -> Result<BatchOutcome, BatchError> {
    let Some(d) = after else { return Ok(BatchOutcome::Lost) };
    let job = jobdoc::from_doc(&d)
        .map_err(|message| EngineError::Query { context: format!("reading the jobs collection {}", engine.jobs_name), message })?;
    Ok(BatchOutcome::Batch(Batch { lo, hi, keys, changed, job }))
}

/// `countDocuments(filter)` over the whole collection.
pub(crate) async fn count_remaining(engine: &MongoEngine, spec: &Backfill) -> Result<i64, EngineError> {
    let spec = mongo_spec(spec)?;
    let filter = filter_of(spec)?;
    let coll: Collection<Document> = engine.conn.db.collection(&spec.collection);
    coll.count_documents(filter)
        .await
        .map(|n| n as i64)
        .map_err(|e| engine.conn.engine_error(format!("counting the documents of {} that still need the backfill", spec.collection), &e))
}

/// Refuse a missing collection; count the documents matching the filter
/// and split them into parts of about equal size.
pub(crate) async fn plan(engine: &MongoEngine, spec: &Backfill) -> Result<BackfillPlan, EngineError> {
    let m = mongo_spec(spec)?;
    if !engine.conn.collection_exists(&m.collection).await? {
        return Err(EngineError::Refused(format!(
            "{}: the backfill walks collection {}, which does not exist in database {}; create it in the migration's expand, or fix the name",
            m.file.display(),
            m.collection,
            engine.conn.db_name
        )));
    }
    let filter = filter_of(m)?;
    // The work left, not the collection's size: documents already converted
    // are neither walked nor counted, so progress reads 100% when done.
    let total = count_remaining(engine, spec).await?;
    let parts = i64::from(m.parts.max(1));
    let coll: Collection<Document> = engine.conn.db.collection(&m.collection);
    let mut bounds: Vec<String> = Vec::new();
    // Bound i is the last key of part i: the key at position total*i/parts - 1
    // of the filtered set in `_id` order (parts take keys above the previous bound).
    for i in 1..parts {
        let at = total * i / parts - 1;
        if at < 0 {
            continue;
        }
        let found = coll
            .find_one(filter.clone())
            .sort(doc! { "_id": 1 })
            .skip(at as u64)
            .projection(doc! { "_id": 1 })
            .await
            .map_err(|e| engine.conn.engine_error(format!("splitting {} into {parts} parts", m.collection), &e))?;
        if let Some(k) = found.and_then(|mut d| d.remove("_id")) {
            let t = key_text(&k);
            if bounds.last() != Some(&t) {
                bounds.push(t);
            }
        }
    }
    Ok(BackfillPlan { total, bounds })
}
