//! The documents of the jobs collection (`kiln_jobs`), and the keys of the
//! walked collection as kiln stores them.
//!
//! One document per part, `_id: "<version>:<part>"` (a string: unique, and
//! readable in mongosh), with `version` (64-bit integer) and `part` (32-bit
//! integer) beside it for sorting and for the per-version operator commands.
//! The other fields mirror [`Job`]: `name, parts, state, spec, batch_size,
//! pause_ms, max_rows_per_sec, range_lo, range_hi, cursor, rows_done,
//! rows_total, batches, attempts, lease_owner, lease_until, created_at,
//! started_at, updated_at, finished_at, error`; times are BSON dates
//! (millisecond precision), a missing value is `null`.
//!
//! `spec` is the [`Backfill`] as JSON **text**, as the schema snapshot is
//! stored: a backfill's filter and update are full of `$`-prefixed operator
//! names, which make awkward field names, and text keeps its Extended JSON
//! exactly as written.
//!
//! Keys (`range_lo`, `range_hi`, `cursor`: `_id` values of the walked
//! collection) are canonical Extended JSON text (`{"$oid":"…"}`,
//! `{"$numberInt":"7"}`, `"abc"`), so an ObjectId, an integer and a string
//! key all come back as exactly the BSON value they were.

use bson::{doc, Bson, Document};
use chrono::{DateTime, Utc};
use kiln_core::jobs::{Backfill, Job, JobState, Throttle};
use kiln_core::EngineError;

use crate::history::stored_id;

/// The jobs collection that goes with the history collection `history`:
/// `kiln_history` → `kiln_jobs`, `<x>history` → `<x>jobs`, any other name
/// `<name>_jobs` (an adopted `changelog` gets `changelog_jobs`), so several
/// kiln setups sharing one database keep their jobs apart as they keep their
/// histories apart.
pub(crate) fn jobs_collection(history: &str) -> String {
    match history.strip_suffix("history") {
        Some(stem) => format!("{stem}jobs"),
        None => format!("{history}_jobs"),
    }
}

/// The `_id` of a part.
pub(crate) fn part_id(version: u64, part: u32) -> Result<String, EngineError> {
    Ok(format!("{}:{part}", stored_id(version, None)?))
}

/// A key of the walked collection as stored: canonical Extended JSON text.
pub(crate) fn key_text(key: &Bson) -> String {
    key.clone().into_canonical_extjson().to_string()
}

/// A stored key back to its BSON value.
pub(crate) fn key_value(text: &str) -> Result<Bson, String> {
    let json: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("stored key {text:?} is not Extended JSON: {e}"))?;
    Bson::try_from(json).map_err(|e| format!("stored key {text:?} is not valid Extended JSON: {e}"))
}

/// (Extended) JSON from a migration file to a BSON document.
pub(crate) fn json_doc(value: &serde_json::Value, what: &str) -> Result<Document, String> {
    match value {
        serde_json::Value::Object(map) => Document::try_from(map.clone()).map_err(|e| format!("{what}: invalid Extended JSON: {e}")),
        serde_json::Value::Null => Ok(Document::new()),
        _ => Err(format!("{what} must be a document")),
    }
}

fn opt_str(v: &Option<String>) -> Bson {
    v.clone().map(Bson::String).unwrap_or(Bson::Null)
}

fn opt_date(v: Option<DateTime<Utc>>) -> Bson {
    v.map(|t| Bson::DateTime(bson::DateTime::from_chrono(t))).unwrap_or(Bson::Null)
}

pub(crate) fn date(t: DateTime<Utc>) -> Bson {
    Bson::DateTime(bson::DateTime::from_chrono(t))
}

/// The document of `job`.
///
/// # Errors
/// [`EngineError::Refused`] for a version above `i64::MAX`.
pub(crate) fn to_doc(job: &Job) -> Result<Document, EngineError> {
    let spec = serde_json::to_string(&job.spec)
        .map_err(|e| EngineError::Query { context: format!("serialising the backfill of version {}", job.version), message: e.to_string() })?;
    Ok(doc! {
        "_id": part_id(job.version, job.part)?,
        "version": stored_id(job.version, None)?,
        "part": job.part as i32,
        "name": &job.name,
        "parts": job.parts as i32,
        "state": job.state.as_str(),
        "spec": spec,
        "batch_size": job.throttle.batch as i64,
        "pause_ms": job.throttle.pause_ms.min(i64::MAX as u64) as i64,
        "max_rows_per_sec": job.throttle.max_rows_per_sec.map(|m| Bson::Int64(m.min(i64::MAX as u64) as i64)).unwrap_or(Bson::Null),
        "range_lo": opt_str(&job.range_lo),
        "range_hi": opt_str(&job.range_hi),
        "cursor": opt_str(&job.cursor),
        "rows_done": job.rows_done,
        "rows_total": job.rows_total.map(Bson::Int64).unwrap_or(Bson::Null),
        "batches": job.batches,
        "attempts": job.attempts,
        "lease_owner": opt_str(&job.lease_owner),
        "lease_until": opt_date(job.lease_until),
        "created_at": date(job.created_at),
        "started_at": opt_date(job.started_at),
        "updated_at": date(job.updated_at),
        "finished_at": opt_date(job.finished_at),
        "error": opt_str(&job.error),
    })
}

/// The fields [`kiln_core::jobs::JobStore::save_job`] writes (the worker's own).
pub(crate) fn worker_fields(job: &Job, now: DateTime<Utc>) -> Document {
    doc! {
        "state": job.state.as_str(),
        "lease_owner": opt_str(&job.lease_owner),
        "lease_until": opt_date(job.lease_until),
        "error": opt_str(&job.error),
        "attempts": job.attempts,
        "finished_at": opt_date(job.finished_at),
        "updated_at": date(now),
    }
}

fn num(d: &Document, key: &str) -> Option<i64> {
    match d.get(key)? {
        Bson::Int32(n) => Some(*n as i64),
        Bson::Int64(n) => Some(*n),
        Bson::Double(n) if n.fract() == 0.0 => Some(*n as i64),
        _ => None,
    }
}

fn text(d: &Document, key: &str) -> Option<String> {
    d.get_str(key).ok().map(str::to_string)
}

fn when(d: &Document, key: &str) -> Option<DateTime<Utc>> {
    d.get_datetime(key).ok().map(|t| t.to_chrono())
}

/// Read one document of the jobs collection.
pub(crate) fn from_doc(d: &Document) -> Result<Job, String> {
    let id = d.get("_id").map(|v| v.to_string()).unwrap_or_else(|| "without _id".into());
    let need = |key: &str| num(d, key).ok_or_else(|| format!("job document {id} has no numeric `{key}`"));
    let version = need("version")?;
    if version < 0 {
        return Err(format!("job document {id} has a negative version"));
    }
    let state_text = text(d, "state").unwrap_or_default();
    let state = JobState::parse(&state_text).ok_or_else(|| format!("job document {id} has an unknown state {state_text:?}"))?;
    let spec_text = text(d, "spec").ok_or_else(|| format!("job document {id} has no `spec` text"))?;
    let spec: Backfill = serde_json::from_str(&spec_text).map_err(|e| format!("job document {id}: invalid spec: {e}"))?;
    Ok(Job {
        version: version as u64,
        name: text(d, "name").unwrap_or_default(),
        part: need("part")? as u32,
        parts: num(d, "parts").unwrap_or(1) as u32,
        state,
        throttle: Throttle {
            batch: num(d, "batch_size").map(|b| b.clamp(1, u32::MAX as i64) as u32).unwrap_or_else(|| spec.batch()),
            pause_ms: num(d, "pause_ms").unwrap_or(0).max(0) as u64,
            max_rows_per_sec: num(d, "max_rows_per_sec").map(|m| m.max(0) as u64),
        },
        spec,
        range_lo: text(d, "range_lo"),
        range_hi: text(d, "range_hi"),
        cursor: text(d, "cursor"),
        rows_done: num(d, "rows_done").unwrap_or(0),
        rows_total: num(d, "rows_total"),
        batches: num(d, "batches").unwrap_or(0),
        attempts: num(d, "attempts").unwrap_or(0) as i32,
        lease_owner: text(d, "lease_owner"),
        lease_until: when(d, "lease_until"),
        created_at: when(d, "created_at").unwrap_or_default(),
        started_at: when(d, "started_at"),
        updated_at: when(d, "updated_at").unwrap_or_default(),
        finished_at: when(d, "finished_at"),
        error: text(d, "error"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::jobs::{MongoBackfill, MongoChange};

    #[test]
    fn names_follow_the_history_collection() {
        assert_eq!(jobs_collection("kiln_history"), "kiln_jobs");
        assert_eq!(jobs_collection("app_history"), "app_jobs");
        assert_eq!(jobs_collection("changelog"), "changelog_jobs");
    }

    #[test]
    fn keys_round_trip_exactly() {
        for key in [Bson::ObjectId(bson::oid::ObjectId::new()), Bson::Int32(7), Bson::Int64(7), Bson::String("a\"b".into()), Bson::Double(2.5)] {
            let t = key_text(&key);
            assert_eq!(key_value(&t).unwrap(), key, "{t}");
        }
        assert_eq!(key_text(&Bson::Int32(7)), r#"{"$numberInt":"7"}"#);
        assert!(key_value("{").is_err());
    }

    #[test]
    fn job_round_trip() {
        let spec = Backfill::Mongo(MongoBackfill {
            file: "0007_x.yaml".into(),
            collection: "users".into(),
            filter: serde_json::json!({"displayName": {"$exists": false}, "at": {"$date": "2025-01-01T00:00:00Z"}}),
            change: MongoChange::Update(serde_json::json!([{"$set": {"displayName": "$fullName"}}])),
            batch: 100,
            parts: 2,
        });
        let t = DateTime::from_timestamp_millis(1_700_000_000_123).unwrap();
        let mut j = Job::queued(7, "0007_x", &spec, 1, 2, (Some(r#"{"$numberInt":"5"}"#.into()), None), Some(10));
        (j.created_at, j.updated_at, j.lease_until, j.lease_owner) = (t, t, Some(t), Some("me@h:1".into()));
        j.throttle.max_rows_per_sec = Some(50);
        j.error = Some("$oops".into());
        let d = to_doc(&j).unwrap();
        assert_eq!(d.get_str("_id").unwrap(), "7:1");
        assert_eq!(from_doc(&d).unwrap(), j);
        let mut bad = d.clone();
        bad.insert("state", "weird");
        assert!(from_doc(&bad).is_err());
    }
}
