//! History and event-log documents, and reading a migrate-mongo `changelog`.
//!
//! A kiln history document is keyed by `_id: <version>` (a 64-bit integer) and
//! has the fields of the SQL history table: `description, script,
//! migration_group, checksum, state, batch, applied_at, duration_ms,
//! applied_by, kiln_version, error, error_statement, error_line`.
//!
//! A migrate-mongo document (`{_id: ObjectId, fileName, appliedAt}`) in the
//! same collection is read as a **baseline** entry of the version its file name
//! starts with, with an empty script and checksum: kiln cannot run (or revert)
//! migrate-mongo's JavaScript, so those migrations count as "existed before
//! kiln", exactly as `kiln baseline` records them. New kiln migrations must
//! then have later versions. migrate-mongo documents are never modified; a kiln
//! entry of the same version takes precedence over them.

use std::collections::BTreeMap;

use bson::{doc, Bson, Document};
use chrono::{DateTime, Utc};
use kiln_core::{AppliedMigration, Checksum, EngineError, FailureInfo, LogEntry, State, Version};

/// Who recorded a migrate-mongo entry, as shown by `kiln status`.
pub const MIGRATE_MONGO_ACTOR: &str = "migrate-mongo";

/// The `_id` of version `v`: MongoDB integers are signed 64-bit, so a version
/// above `i64::MAX` is refused rather than stored as a negative number that
/// no later run could read back (`script` names the file, when known).
pub(crate) fn stored_id(v: u64, script: Option<&str>) -> Result<i64, EngineError> {
    i64::try_from(v).map_err(|_| {
        EngineError::Refused(format!(
            "{}version {v} is larger than {}, the largest version kiln can record in MongoDB (`_id` is a signed 64-bit integer); nothing was written. Give the migration a smaller version (rename the file)",
            script.map(|s| format!("{s}: ")).unwrap_or_default(),
            i64::MAX
        ))
    })
}

/// The history document of `a`.
///
/// # Errors
/// [`EngineError::Refused`] for a version above `i64::MAX` (see [`stored_id`]).
pub(crate) fn to_doc(a: &AppliedMigration) -> Result<Document, EngineError> {
    let id = stored_id(a.version.number, Some(&a.script))?;
    let (error, statement, line) = match &a.error {
        Some(f) => (Bson::String(f.message.clone()), opt_i64(f.statement.map(i64::from)), opt_i64(f.line.map(i64::from))),
        None => (Bson::Null, Bson::Null, Bson::Null),
    };
    Ok(doc! {
        "_id": id,
        "description": &a.description,
        "script": &a.script,
        "migration_group": a.group.clone().map(Bson::String).unwrap_or(Bson::Null),
        "checksum": &a.checksum.0,
        "state": a.state.as_str(),
        "batch": a.batch,
        "applied_at": bson::DateTime::from_chrono(a.applied_at),
        "duration_ms": a.duration_ms,
        "applied_by": &a.applied_by,
        "kiln_version": &a.kiln_version,
        "error": error,
        "error_statement": statement,
        "error_line": line,
    })
}

fn opt_i64(v: Option<i64>) -> Bson {
    v.map(Bson::Int64).unwrap_or(Bson::Null)
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

fn date(d: &Document, key: &str) -> Option<DateTime<Utc>> {
    d.get_datetime(key).ok().map(|t| t.to_chrono())
}

/// Why a history document cannot be read.
#[derive(Debug)]
pub(crate) struct BadEntry(pub String);

/// Read one document of the history collection.
pub(crate) fn from_doc(d: &Document) -> Result<AppliedMigration, BadEntry> {
    if let Some(version) = num(d, "_id") {
        if version < 0 {
            let meant = version as u64;
            return Err(BadEntry(format!(
                "the entry with _id {version} has a negative version: an older kiln wrote versions above {} this way (this one was probably {meant}, {}); such a version cannot be recorded in MongoDB. Delete the entry (mongosh: db.getCollection(\"<history>\").deleteOne({{_id: NumberLong(\"{version}\")}})), check by hand what that migration did, and rename its file to a smaller version",
                i64::MAX,
                text(d, "script").unwrap_or_else(|| "file unknown".into())
            )));
        }
        let state_text = text(d, "state").unwrap_or_default();
        // An unknown state blocks runs rather than being silently ignored.
        let state = State::parse(&state_text).unwrap_or(State::Failed);
        let message = text(d, "error");
        let error = match (message, state) {
            (Some(m), _) => {
                Some(FailureInfo { message: m, statement: num(d, "error_statement").map(|n| n as u32), line: num(d, "error_line").map(|n| n as u32) })
            }
            (None, State::Failed) if State::parse(&state_text).is_none() => {
                Some(FailureInfo { message: format!("unknown state {state_text:?}"), statement: None, line: None })
            }
            (None, _) => None,
        };
        return Ok(AppliedMigration {
            version: Version::from_number(version as u64),
            description: text(d, "description").unwrap_or_default(),
            script: text(d, "script").unwrap_or_default(),
            group: text(d, "migration_group"),
            checksum: Checksum(text(d, "checksum").unwrap_or_default()),
            state,
            batch: num(d, "batch").unwrap_or(0),
            applied_at: date(d, "applied_at").unwrap_or_default(),
            duration_ms: num(d, "duration_ms").unwrap_or(0),
            applied_by: text(d, "applied_by").unwrap_or_default(),
            kiln_version: text(d, "kiln_version").unwrap_or_default(),
            error,
        });
    }
    if let Some(file) = text(d, "fileName") {
        return from_migrate_mongo(d, &file);
    }
    Err(BadEntry(format!(
        "document {} is neither a kiln entry (numeric _id) nor a migrate-mongo entry (fileName)",
        d.get("_id").map(|v| v.to_string()).unwrap_or_else(|| "without _id".into())
    )))
}

/// The version a migrate-mongo file name starts with (`20240101120000-add-index.js`).
pub(crate) fn migrate_mongo_version(file: &str) -> Option<Version> {
    let digits: String = file.chars().take_while(|c| c.is_ascii_digit()).collect();
    if digits.is_empty() {
        return None;
    }
    Some(Version::new(digits.parse().ok()?, digits))
}

fn from_migrate_mongo(d: &Document, file: &str) -> Result<AppliedMigration, BadEntry> {
    let version = migrate_mongo_version(file).ok_or_else(|| {
        BadEntry(format!(
            "migrate-mongo entry {file:?} has no version number at the start of its name; kiln needs one (e.g. 20240101120000-{file}). Rename it in the changelog or delete the entry"
        ))
    })?;
    Ok(AppliedMigration {
        version,
        description: file.to_string(),
        script: String::new(),
        group: None,
        checksum: Checksum(String::new()),
        state: State::Baseline,
        batch: num(d, "migrationBlock").unwrap_or(0),
        applied_at: date(d, "appliedAt").unwrap_or_default(),
        duration_ms: 0,
        applied_by: MIGRATE_MONGO_ACTOR.into(),
        kiln_version: String::new(),
        error: None,
    })
}

/// Read a whole history collection: kiln entries win over migrate-mongo entries
/// of the same version; ordered by version.
pub(crate) fn from_docs(docs: &[Document]) -> Result<Vec<AppliedMigration>, BadEntry> {
    let mut kiln: BTreeMap<u64, AppliedMigration> = BTreeMap::new();
    let mut foreign: BTreeMap<u64, AppliedMigration> = BTreeMap::new();
    for d in docs {
        let a = from_doc(d)?;
        if num(d, "_id").is_some() {
            kiln.insert(a.version.number, a);
        } else {
            foreign.entry(a.version.number).or_insert(a);
        }
    }
    for (v, a) in foreign {
        kiln.entry(v).or_insert(a);
    }
    Ok(kiln.into_values().collect())
}

/// The event-log document of `e`.
///
/// # Errors
/// [`EngineError::Refused`] for a version above `i64::MAX` (see [`stored_id`]).
pub(crate) fn log_doc(e: &LogEntry) -> Result<Document, EngineError> {
    let version = match e.version {
        Some(v) => Bson::Int64(stored_id(v, None)?),
        None => Bson::Null,
    };
    Ok(doc! {
        "at": bson::DateTime::from_chrono(e.at),
        "event": e.event.as_str(),
        "version": version,
        "name": e.name.clone().map(Bson::String).unwrap_or(Bson::Null),
        "batch": e.batch.map(Bson::Int64).unwrap_or(Bson::Null),
        "actor": &e.actor,
        "reason": e.reason.clone().map(Bson::String).unwrap_or(Bson::Null),
        "detail": e.detail.clone().map(Bson::String).unwrap_or(Bson::Null),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_above_i64_max_are_refused_not_wrapped() {
        let big = AppliedMigration { version: Version::from_number(1 << 63), script: "9223372036854775808_x.yaml".into(), ..entry() };
        let e = to_doc(&big).unwrap_err();
        assert!(matches!(e, EngineError::Refused(_)), "{e:?}");
        assert!(e.to_string().contains("9223372036854775808_x.yaml") && e.to_string().contains("nothing was written"), "{e}");
        let max = AppliedMigration { version: Version::from_number(i64::MAX as u64), ..entry() };
        assert_eq!(from_doc(&to_doc(&max).unwrap()).unwrap().version.number, i64::MAX as u64);
        let ev = LogEntry {
            at: Utc::now(),
            event: kiln_core::LogEvent::Applied,
            version: Some(u64::MAX),
            name: None,
            batch: None,
            actor: "a".into(),
            reason: None,
            detail: None,
        };
        assert!(log_doc(&ev).is_err());
    }

    #[test]
    fn an_entry_an_older_kiln_wrapped_says_how_to_fix_it() {
        let mut d = to_doc(&entry()).unwrap();
        d.insert("_id", i64::MIN);
        let BadEntry(m) = from_doc(&d).unwrap_err();
        assert!(m.contains("9223372036854775808") && m.contains("deleteOne") && m.contains(&entry().script), "{m}");
    }

    fn entry() -> AppliedMigration {
        AppliedMigration {
            version: Version::from_number(20251101000000),
            description: "add_index".into(),
            script: "20251101000000_add_index.yaml".into(),
            group: Some("users".into()),
            checksum: Checksum("ab".repeat(32)),
            state: State::Failed,
            batch: 3,
            applied_at: DateTime::from_timestamp_millis(1_700_000_000_123).unwrap(),
            duration_ms: 12,
            applied_by: "me@host".into(),
            kiln_version: "0.1.0".into(),
            error: Some(FailureInfo { message: "code 11000 (DuplicateKey): dup".into(), statement: Some(2), line: Some(7) }),
        }
    }

    #[test]
    fn round_trip() {
        let a = entry();
        let d = to_doc(&a).unwrap();
        assert_eq!(d.keys().next().map(String::as_str), Some("_id"));
        assert_eq!(from_doc(&d).unwrap(), a);
    }

    #[test]
    fn migrate_mongo_entries_are_baselines() {
        let docs = vec![
            doc! {"_id": bson::oid::ObjectId::new(), "fileName": "20240101120000-add-index.js", "appliedAt": bson::DateTime::now(), "migrationBlock": 4},
            doc! {"_id": bson::oid::ObjectId::new(), "fileName": "20240201120000-more.js", "appliedAt": bson::DateTime::now()},
            to_doc(&AppliedMigration { version: Version::from_number(20240201120000), state: State::Retired, error: None, ..entry() }).unwrap(),
        ];
        let h = from_docs(&docs).unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].version.number, 20240101120000);
        assert_eq!(h[0].state, State::Baseline);
        assert_eq!(h[0].batch, 4);
        assert!(h[0].script.is_empty() && h[0].checksum.0.is_empty());
        assert_eq!(h[1].state, State::Retired, "a kiln entry wins over migrate-mongo's");
        assert!(from_docs(&[doc! {"_id": "x", "fileName": "init.js"}]).is_err());
        assert!(from_docs(&[doc! {"_id": "x"}]).is_err());
    }

    #[test]
    fn unknown_state_blocks() {
        let mut d = to_doc(&AppliedMigration { error: None, state: State::Applied, ..entry() }).unwrap();
        d.insert("state", "weird");
        let a = from_doc(&d).unwrap();
        assert_eq!(a.state, State::Failed);
        assert!(a.error.unwrap().message.contains("weird"));
    }
}
