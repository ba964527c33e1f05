//! Backfill jobs on MongoDB (`kiln_jobs`, kiln_core::jobs::JobStore): the
//! worker loop of kiln_core driving real batches against the test server,
//! each test in its own fresh database.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use common::Env;
use kiln_core::jobs::{
    parts_of, work_all, work_part, Backfill, Batch, BatchOutcome, Job, JobControl, JobState, JobStore, MongoBackfill, MongoChange, PartEnd,
    WorkerOptions,
};
use kiln_core::{BackendConfig, EngineError};
use kiln_mongo::MongoEngine;
use mongodb::bson::{doc, oid::ObjectId, Bson, Document};
use serde_json::json;

fn spec(collection: &str, filter: serde_json::Value, change: MongoChange, batch: u32, parts: u32) -> Backfill {
    Backfill::Mongo(MongoBackfill { file: "0007_backfill.yaml".into(), collection: collection.into(), filter, change, batch, parts })
}

/// `displayName` from `fullName`, with a counter that shows how often a
/// document was changed.
fn display_name(collection: &str, batch: u32, parts: u32) -> Backfill {
    spec(
        collection,
        json!({"displayName": {"$exists": false}}),
        MongoChange::Update(json!([{"$set": {"displayName": "$fullName", "touched": {"$add": [{"$ifNull": ["$touched", 0]}, 1]}}}])),
        batch,
        parts,
    )
}

fn opts(owner: &str) -> WorkerOptions {
    let mut o = WorkerOptions::new(owner);
    o.max_retries = 2;
    o.backoff = Duration::from_millis(10);
    o
}

fn no_progress(_: &Batch) {}

async fn engine(cfg: &BackendConfig) -> MongoEngine {
    MongoEngine::connect(cfg).await.unwrap()
}

/// Plan and queue `spec` as version 7; returns the parts.
async fn queue(e: &mut MongoEngine, spec: &Backfill, tweak: impl Fn(&mut Job)) -> Vec<Job> {
    e.ensure_jobs().await.unwrap();
    let plan = e.plan_backfill(spec).await.unwrap();
    let mut parts = parts_of(7, "0007_backfill", spec, &plan);
    parts.iter_mut().for_each(tweak);
    e.replace_jobs(7, &parts).await.unwrap();
    parts
}

async fn insert(db: &mongodb::Database, collection: &str, docs: Vec<Document>) {
    for chunk in docs.chunks(1000) {
        db.collection::<Document>(collection).insert_many(chunk.to_vec()).await.unwrap();
    }
}

fn users(ids: impl IntoIterator<Item = Bson>) -> Vec<Document> {
    ids.into_iter().map(|id| doc! { "_id": id.clone(), "fullName": format!("User {id}") }).collect()
}

fn ints(range: std::ops::RangeInclusive<i32>) -> impl Iterator<Item = Bson> {
    range.map(Bson::Int32)
}

async fn all(db: &mongodb::Database, collection: &str) -> Vec<Document> {
    use futures::TryStreamExt;
    db.collection::<Document>(collection).find(doc! {}).sort(doc! { "_id": 1 }).await.unwrap().try_collect().await.unwrap()
}

/// Every document has `displayName == fullName` and was changed exactly once.
async fn assert_converted_once(db: &mongodb::Database, collection: &str, expected: usize) {
    let docs = all(db, collection).await;
    assert_eq!(docs.len(), expected);
    for d in &docs {
        assert_eq!(d.get_str("displayName").ok(), d.get_str("fullName").ok(), "{d}");
        assert_eq!(d.get_i32("touched").ok(), Some(1), "changed exactly once: {d}");
    }
}

#[tokio::test]
async fn five_thousand_users_converted_by_work_all() {
    let env = Env::new().await;
    let db = env.database().await;
    // ObjectId keys, as the driver makes them.
    let docs: Vec<Document> = (0..5000).map(|i| doc! { "fullName": format!("User {i}") }).collect();
    insert(&db, "users", docs).await;
    let mut e = engine(&env.cfg).await;
    assert!(e.list_jobs().await.unwrap().is_empty(), "no jobs collection yet");
    assert!(!env.collections().await.contains(&"kiln_jobs".to_string()), "list_jobs creates nothing");
    let s = display_name("users", 500, 1);
    let parts = queue(&mut e, &s, |_| {}).await;
    assert_eq!(parts.len(), 1);
    assert_eq!(parts[0].rows_total, Some(5000));
    assert_eq!(e.count_remaining(&s).await.unwrap(), 5000);

    let batches = Arc::new(AtomicUsize::new(0));
    let b = batches.clone();
    let progress = move |batch: &Batch| {
        b.fetch_add(1, Ordering::SeqCst);
        assert_eq!(batch.keys, 500);
        assert_eq!(batch.changed, 500);
    };
    let report = work_all(&mut e, &opts("w1@test:1"), None, &progress).await.unwrap();
    assert_eq!((report.done.len(), report.failed.len(), report.stopped.len()), (1, 0, 0));
    assert_eq!(batches.load(Ordering::SeqCst), 10);
    assert_converted_once(&db, "users", 5000).await;
    assert_eq!(e.count_remaining(&s).await.unwrap(), 0);

    let jobs = e.list_jobs().await.unwrap();
    assert_eq!(jobs.len(), 1);
    let j = &jobs[0];
    assert_eq!((j.state, j.rows_done, j.batches, j.attempts), (JobState::Done, 5000, 10, 1));
    assert_eq!((j.lease_owner.as_deref(), j.lease_until, j.error.as_deref()), (None, None, None));
    assert!(j.started_at.is_some() && j.finished_at.is_some());
    // The cursor is the last `_id`, as canonical Extended JSON.
    let last = all(&db, "users").await.last().unwrap().get_object_id("_id").unwrap();
    assert_eq!(j.cursor.as_deref(), Some(format!(r#"{{"$oid":"{last}"}}"#).as_str()));
    // The stored document: `_id` "version:part", the spec as JSON text.
    let stored = env.docs("kiln_jobs").await;
    assert_eq!(stored[0].get_str("_id").unwrap(), "7:0");
    assert_eq!(stored[0].get_str("state").unwrap(), "done");
    assert!(matches!(stored[0].get("lease_until"), Some(Bson::Null)));
    // Nothing left to claim.
    assert!(e.claim_job("w2", Utc::now(), Utc::now(), None).await.unwrap().is_none());
}

#[tokio::test]
async fn lookup_pipeline_is_merged_into_the_batch() {
    let env = Env::new().await;
    let db = env.database().await;
    insert(&db, "users", users(ints(1..=50))).await;
    let projects: Vec<Document> = (1..=300).map(|i| doc! { "_id": i, "ownerId": i % 50 + 1, "title": format!("P{i}") }).collect();
    insert(&db, "projects", projects).await;
    let s = spec(
        "projects",
        json!({"ownerName": {"$exists": false}}),
        MongoChange::Pipeline(vec![
            json!({"$lookup": {"from": "users", "localField": "ownerId", "foreignField": "_id", "as": "owner"}}),
            json!({"$set": {"owner": {"$arrayElemAt": ["$owner", 0]}}}),
            json!({"$project": {"ownerName": "$owner.fullName"}}),
        ]),
        64,
        1,
    );
    let mut e = engine(&env.cfg).await;
    queue(&mut e, &s, |_| {}).await;
    let changed = Arc::new(AtomicUsize::new(0));
    let c = changed.clone();
    let progress = move |b: &Batch| {
        c.fetch_add(b.changed as usize, Ordering::SeqCst);
    };
    let report = work_all(&mut e, &opts("w1"), None, &progress).await.unwrap();
    assert_eq!(report.done.len(), 1);
    assert_eq!(changed.load(Ordering::SeqCst), 300);
    for p in all(&db, "projects").await {
        let owner = p.get_i32("ownerId").unwrap();
        assert_eq!(p.get_str("ownerName").unwrap(), format!("User {owner}"), "{p}");
        assert_eq!(p.get_str("title").unwrap(), format!("P{}", p.get_i32("_id").unwrap()), "other fields are kept: {p}");
        assert!(!p.contains_key("owner"), "only the pipeline's output fields are merged: {p}");
    }
    assert_eq!(e.count_remaining(&s).await.unwrap(), 0);
    assert_eq!(e.list_jobs().await.unwrap()[0].batches, 5);
}

#[tokio::test]
async fn two_workers_share_a_three_part_job() {
    let env = Env::new().await;
    let db = env.database().await;
    insert(&db, "users", users(ints(1..=3000))).await;
    let s = display_name("users", 100, 3);
    let mut e = engine(&env.cfg).await;
    let parts = queue(&mut e, &s, |j| j.throttle.pause_ms = 5).await;
    let ranges: Vec<_> = parts.iter().map(|p| (p.range_lo.clone(), p.range_hi.clone(), p.rows_total)).collect();
    assert_eq!(
        ranges,
        vec![
            (None, Some(r#"{"$numberInt":"1000"}"#.into()), Some(1000)),
            (Some(r#"{"$numberInt":"1000"}"#.into()), Some(r#"{"$numberInt":"2000"}"#.into()), Some(1000)),
            (Some(r#"{"$numberInt":"2000"}"#.into()), None, Some(1000)),
        ]
    );
    let mut e2 = engine(&env.cfg).await;
    let (o1, o2) = (opts("w1@a:1"), opts("w2@b:2"));
    let (r1, r2) = tokio::join!(work_all(&mut e, &o1, Some(7), &no_progress), work_all(&mut e2, &o2, Some(7), &no_progress));
    let (r1, r2) = (r1.unwrap(), r2.unwrap());
    assert!(!r1.done.is_empty() && !r2.done.is_empty(), "both workers worked: {} and {}", r1.done.len(), r2.done.len());
    let mut done: Vec<u32> = r1.done.iter().chain(&r2.done).map(|j| j.part).collect();
    done.sort();
    assert_eq!(done, vec![0, 1, 2]);
    assert_converted_once(&db, "users", 3000).await;
    let jobs = e.list_jobs().await.unwrap();
    assert!(jobs.iter().all(|j| j.state == JobState::Done && j.rows_done == 1000), "{jobs:?}");
}

#[tokio::test]
async fn objectid_int_and_string_keys_split_and_walk() {
    let env = Env::new().await;
    let db = env.database().await;
    let oids: Vec<Bson> = (0..500).map(|_| Bson::ObjectId(ObjectId::new())).collect();
    insert(&db, "by_oid", users(oids)).await;
    insert(&db, "by_int", users((1..=500).map(|i| Bson::Int64(i * 1_000_000_000_000)))).await;
    insert(&db, "by_text", users((1..=500).map(|i| Bson::String(format!("k{i:04}"))))).await;
    let mut e = engine(&env.cfg).await;
    for (version, (collection, tag)) in [("by_oid", "$oid"), ("by_int", "$numberLong"), ("by_text", "\"k0")].into_iter().enumerate() {
        let s = display_name(collection, 40, 3);
        let plan = e.plan_backfill(&s).await.unwrap();
        assert_eq!(plan.total, 500);
        assert_eq!(plan.bounds.len(), 2, "{plan:?}");
        assert!(plan.bounds.iter().all(|b| b.contains(tag)), "{collection}: {:?}", plan.bounds);
        let parts = parts_of(version as u64 + 1, collection, &s, &plan);
        e.replace_jobs(version as u64 + 1, &parts).await.unwrap();
        let report = work_all(&mut e, &opts("w"), Some(version as u64 + 1), &no_progress).await.unwrap();
        assert_eq!(report.done.len(), 3, "{collection}");
        assert_converted_once(&db, collection, 500).await;
        let rows: i64 = report.done.iter().map(|j| j.rows_done).sum();
        assert_eq!(rows, 500, "{collection}: every key walked once");
    }
    // The cursors read back as the same BSON type.
    let jobs = e.list_jobs().await.unwrap();
    assert_eq!(jobs.len(), 9);
    assert!(jobs[..3].iter().all(|j| j.cursor.as_deref().unwrap().contains("$oid")));
    assert_eq!(jobs[5].cursor.as_deref(), Some(r#"{"$numberLong":"500000000000000"}"#));
    assert_eq!(jobs[8].cursor.as_deref(), Some(r#""k0500""#));
}

#[tokio::test]
async fn empty_collection_is_done_and_missing_collection_refused() {
    let env = Env::new().await;
    let db = env.database().await;
    db.create_collection("users").await.unwrap();
    let mut e = engine(&env.cfg).await;
    let s = display_name("users", 100, 4);
    let parts = queue(&mut e, &s, |_| {}).await;
    assert_eq!(parts.len(), 1, "no split points in an empty collection");
    let report = work_all(&mut e, &opts("w"), None, &no_progress).await.unwrap();
    assert_eq!(report.done.len(), 1);
    assert_eq!((report.done[0].rows_done, report.done[0].batches, report.done[0].cursor.as_deref()), (0, 0, None));

    let missing = e.plan_backfill(&display_name("nope", 100, 1)).await.unwrap_err();
    assert!(matches!(missing, EngineError::Refused(_)), "{missing:?}");
}

#[tokio::test]
async fn documents_inserted_during_the_backfill_are_converted() {
    let env = Env::new().await;
    let db = env.database().await;
    insert(&db, "users", users(ints(1..=1000))).await;
    let s = display_name("users", 100, 1);
    let mut e = engine(&env.cfg).await;
    queue(&mut e, &s, |_| {}).await;
    let o = opts("w1");
    let job = e.claim_job(&o.owner, Utc::now(), Utc::now() + chrono::Duration::seconds(30), None).await.unwrap().unwrap();
    let BatchOutcome::Batch(b) = e.run_batch(&job, &o.owner, Utc::now() + chrono::Duration::seconds(30)).await.unwrap() else { panic!() };
    assert_eq!((b.lo.as_str(), b.hi.as_str(), b.keys), (r#"{"$numberInt":"1"}"#, r#"{"$numberInt":"100"}"#, 100));
    // The application inserts new users, and converts one itself.
    insert(&db, "users", users(ints(1001..=1150))).await;
    db.collection::<Document>("users").update_one(doc! { "_id": 500 }, doc! { "$set": { "displayName": "User 500", "touched": 1 } }).await.unwrap();
    assert_eq!(e.count_remaining(&s).await.unwrap(), 1150 - 100 - 1);
    let end = work_part(&mut e, b.job, &o, &no_progress).await.unwrap();
    let PartEnd::Done(j) = end else { panic!("{end:?}") };
    assert_eq!(j.rows_done, 1149, "the document converted by the application is skipped");
    assert_converted_once(&db, "users", 1150).await;
    assert_eq!(e.count_remaining(&s).await.unwrap(), 0);
}

#[tokio::test]
async fn pause_stops_the_worker_between_batches_and_resume_continues() {
    let env = Env::new().await;
    let db = env.database().await;
    insert(&db, "users", users(ints(1..=2000))).await;
    let s = display_name("users", 50, 1);
    let mut e = engine(&env.cfg).await;
    queue(&mut e, &s, |j| j.throttle.pause_ms = 40).await;
    let cfg = env.cfg.clone();
    let worker = tokio::spawn(async move {
        let mut w = engine(&cfg).await;
        work_all(&mut w, &opts("w1"), None, &no_progress).await.unwrap()
    });
    // Wait until a few batches are in, then pause.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while e.list_jobs().await.unwrap()[0].batches < 3 {
        assert!(std::time::Instant::now() < deadline, "the worker made no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(e.control_job(7, &JobControl::Pause).await.unwrap(), 1);
    let report = tokio::time::timeout(Duration::from_secs(30), worker).await.expect("the worker stops").unwrap();
    assert_eq!((report.done.len(), report.stopped.len()), (0, 1));
    let j = e.list_jobs().await.unwrap().remove(0);
    assert_eq!(j.state, JobState::Paused);
    assert_eq!((j.lease_owner.as_deref(), j.lease_until), (None, None), "the lease is released");
    assert!(j.rows_done > 0 && j.rows_done < 2000, "{}", j.rows_done);
    // Exactly the documents walked were converted: none in the middle of a batch.
    assert_eq!(e.count_remaining(&s).await.unwrap(), 2000 - j.rows_done);
    // Paused parts are not claimed; some controls do not apply.
    assert!(e.claim_job("w2", Utc::now(), Utc::now(), None).await.unwrap().is_none());
    assert_eq!(e.control_job(7, &JobControl::Retry).await.unwrap(), 0);
    let t = JobControl::Throttle { batch: Some(500), pause_ms: Some(0), max_rows_per_sec: Some(None) };
    assert_eq!(e.control_job(7, &t).await.unwrap(), 1);
    assert_eq!(e.control_job(7, &JobControl::Resume).await.unwrap(), 1);
    let report = work_all(&mut e, &opts("w2"), None, &no_progress).await.unwrap();
    assert_eq!(report.done.len(), 1);
    let j = &report.done[0];
    assert_eq!((j.rows_done, j.throttle.batch, j.attempts), (2000, 500, 2));
    assert_converted_once(&db, "users", 2000).await;
    assert_eq!(e.control_job(7, &JobControl::Cancel).await.unwrap(), 0, "a done job cannot be cancelled");
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_from_the_cursor() {
    let env = Env::new().await;
    let db = env.database().await;
    insert(&db, "users", users(ints(1..=600))).await;
    let s = display_name("users", 100, 1);
    let mut a = engine(&env.cfg).await;
    queue(&mut a, &s, |_| {}).await;
    let soon = || Utc::now() + chrono::Duration::milliseconds(400);
    let mut job = a.claim_job("dead", Utc::now(), soon(), None).await.unwrap().unwrap();
    for _ in 0..2 {
        let BatchOutcome::Batch(b) = a.run_batch(&job, "dead", soon()).await.unwrap() else { panic!() };
        job = b.job;
    }
    // "dead" stops here without releasing. Its lease is still live:
    let mut b = engine(&env.cfg).await;
    assert!(b.claim_job("heir", Utc::now(), Utc::now() + chrono::Duration::seconds(30), None).await.unwrap().is_none());
    tokio::time::sleep(Duration::from_millis(600)).await;
    let taken = b.claim_job("heir", Utc::now(), Utc::now() + chrono::Duration::seconds(30), None).await.unwrap().unwrap();
    assert_eq!(taken.lease_owner.as_deref(), Some("heir"));
    assert_eq!((taken.cursor.as_deref(), taken.rows_done, taken.attempts), (Some(r#"{"$numberInt":"200"}"#), 200, 2));
    assert_eq!(taken.started_at, job.started_at, "started_at is kept");
    // The old worker comes back: its batch is not committed, its save refused.
    assert_eq!(a.run_batch(&job, "dead", soon()).await.unwrap(), BatchOutcome::Lost);
    assert_eq!(a.save_job(&job, "dead").await.unwrap(), None);
    let end = work_part(&mut b, taken, &opts("heir"), &no_progress).await.unwrap();
    let PartEnd::Done(j) = end else { panic!("{end:?}") };
    assert_eq!((j.rows_done, j.batches), (600, 6));
    assert_converted_once(&db, "users", 600).await;
}

#[tokio::test]
async fn a_failing_batch_fails_the_job_with_its_range() {
    let env = Env::new().await;
    let db = env.database().await;
    db.create_collection("users").validator(doc! { "$jsonSchema": { "properties": { "displayName": { "bsonType": "string" } } } }).await.unwrap();
    let mut docs = users(ints(1..=300));
    docs[149].insert("fullName", 42); // _id 150: its displayName would be a number
    insert(&db, "users", docs).await;
    let s = display_name("users", 100, 1);
    let mut e = engine(&env.cfg).await;
    queue(&mut e, &s, |_| {}).await;
    let report = work_all(&mut e, &opts("w1"), None, &no_progress).await.unwrap();
    assert_eq!((report.done.len(), report.failed.len()), (0, 1));
    let j = e.list_jobs().await.unwrap().remove(0);
    assert_eq!(j.state, JobState::Failed);
    let error = j.error.clone().unwrap();
    assert!(error.contains("code 121"), "{error}");
    assert!(error.contains(r#"{"$numberInt":"101"}..{"$numberInt":"200"}"#), "{error}");
    assert_eq!((j.cursor.as_deref(), j.rows_done), (Some(r#"{"$numberInt":"100"}"#), 100));
    assert!(j.attempts >= 2, "retried: {}", j.attempts);
    assert!(j.finished_at.is_some() && j.lease_owner.is_none());
    // Nothing of the failing batch remains (its transaction was aborted).
    assert_eq!(e.count_remaining(&s).await.unwrap(), 200);
    // Fix the document, retry: the job finishes.
    db.collection::<Document>("users").update_one(doc! { "_id": 150 }, doc! { "$set": { "fullName": "User 150" } }).await.unwrap();
    assert_eq!(e.control_job(7, &JobControl::Retry).await.unwrap(), 1);
    let queued = e.list_jobs().await.unwrap().remove(0);
    assert_eq!((queued.state, queued.attempts, queued.error, queued.finished_at), (JobState::Queued, 0, None, None));
    let report = work_all(&mut e, &opts("w2"), None, &no_progress).await.unwrap();
    assert_eq!(report.done.len(), 1);
    assert_converted_once(&db, "users", 300).await;
}

#[tokio::test]
async fn save_job_keeps_an_operators_pause_and_cancel() {
    let env = Env::new().await;
    let db = env.database().await;
    insert(&db, "users", users(ints(1..=10))).await;
    let s = display_name("users", 100, 1);
    let mut e = engine(&env.cfg).await;
    queue(&mut e, &s, |_| {}).await;
    let until = Utc::now() + chrono::Duration::seconds(30);
    let job = e.claim_job("w1", Utc::now(), until, Some(7)).await.unwrap().unwrap();
    assert!(e.claim_job("w2", Utc::now(), until, Some(7)).await.unwrap().is_none(), "a live lease is not claimed");
    assert_eq!(e.control_job(7, &JobControl::Cancel).await.unwrap(), 1);
    // No batch lands on a cancelled part.
    assert_eq!(e.run_batch(&job, "w1", until).await.unwrap(), BatchOutcome::Lost);
    assert_eq!(e.count_remaining(&s).await.unwrap(), 10);
    let mut failing = job.clone();
    failing.state = JobState::Failed;
    failing.error = Some("$boom".into());
    failing.lease_owner = None;
    let saved = e.save_job(&failing, "w1").await.unwrap().unwrap();
    assert_eq!(saved.state, JobState::Cancelled, "the operator's cancel stays");
    assert_eq!((saved.error, saved.lease_owner), (None, None), "only the lease fields were written");
    assert_eq!(e.save_job(&failing, "w1").await.unwrap(), None, "the lease is no longer w1's");
    assert_eq!(e.control_job(8, &JobControl::Pause).await.unwrap(), 0, "another version");
}

#[tokio::test]
async fn without_transactions_update_and_merge_forms_finish() {
    let base = kiln_testkit::mongo::standalone_server_url().await;
    let name = kiln_testkit::unique_name("kiln_t");
    let url = kiln_testkit::mongo::with_db(&base, &name);
    let cfg = BackendConfig::new(url.clone());
    let mut e = engine(&cfg).await;
    assert_eq!(e.topology(), kiln_mongo::Topology::Standalone);
    let db = kiln_testkit::mongo::database(&url).await;
    insert(&db, "users", users(ints(1..=250))).await;
    let s = display_name("users", 60, 2);
    queue(&mut e, &s, |_| {}).await;
    let report = work_all(&mut e, &opts("w"), None, &no_progress).await.unwrap();
    assert_eq!(report.done.len(), 2);
    assert_converted_once(&db, "users", 250).await;
    let p = spec(
        "users",
        json!({"upper": {"$exists": false}}),
        MongoChange::Pipeline(vec![json!({"$project": {"upper": {"$toUpper": "$fullName"}}})]),
        100,
        1,
    );
    let plan = e.plan_backfill(&p).await.unwrap();
    e.replace_jobs(8, &parts_of(8, "0008_upper", &p, &plan)).await.unwrap();
    let report = work_all(&mut e, &opts("w"), Some(8), &no_progress).await.unwrap();
    assert_eq!((report.done.len(), report.done[0].rows_done), (1, 250));
    for d in all(&db, "users").await {
        assert_eq!(d.get_str("upper").unwrap(), d.get_str("fullName").unwrap().to_uppercase());
    }
    assert_eq!(e.count_remaining(&p).await.unwrap(), 0);
    kiln_testkit::mongo::drop_db(&base, &name).await;
}
