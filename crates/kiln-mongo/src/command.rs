//! Running migration commands exactly as `db.runCommand()` does, and telling
//! what a failure left behind.
//!
//! A command reply can fail in three ways: `ok: 0` (the server refused the
//! command: nothing happened), `writeErrors` in an `ok: 1` reply (some
//! documents may have been written before the failing one), or
//! `writeConcernError` (the write happened but was not acknowledged as asked).
//! kiln treats all three as failures, and remembers whether anything may have
//! been written so a first-command failure is only called "rolled back" when
//! it really is.

use bson::{Bson, Document};
use mongodb::{ClientSession, Database};

use crate::conn::{is_connection_error, Conn};

/// A command that cannot be sent: its Extended JSON is invalid.
#[derive(Debug)]
pub(crate) struct BadCommand(pub String);

/// A migration command converted to BSON, with the database it runs against.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    /// `true` when it must run against `admin` (`renameCollection`).
    pub admin: bool,
    /// The command, name first.
    pub doc: Document,
}

impl Prepared {
    /// The command's name (its first key).
    pub fn name(&self) -> &str {
        self.doc.keys().next().map(String::as_str).unwrap_or("")
    }
}

/// Convert one command from (Extended) JSON to BSON, keeping key order, and
/// qualify `renameCollection`'s bare collection names with `db`.
///
/// # Errors
/// [`BadCommand`] when the value is not a document or its Extended JSON is invalid
/// (`{"$oid": "zz"}`, a `$date` that is not a date).
pub(crate) fn prepare(value: &serde_json::Value, db: &str) -> Result<Prepared, BadCommand> {
    let serde_json::Value::Object(map) = value else {
        return Err(BadCommand("a command must be a document such as {createIndexes: coll, …}".into()));
    };
    let mut doc = Document::try_from(map.clone()).map_err(|e| BadCommand(format!("invalid Extended JSON: {e}")))?;
    let admin = doc.keys().next().map(|k| k == "renameCollection").unwrap_or(false);
    if admin {
        // The server wants full namespaces on `admin`; a bare name means a
        // collection of the migration's database, so one file serves every tenant.
        for key in ["renameCollection", "to"] {
            match doc.get(key) {
                Some(Bson::String(s)) if !s.contains('.') => {
                    let full = format!("{db}.{s}");
                    doc.insert(key, full);
                }
                Some(Bson::String(_)) => {}
                Some(_) => return Err(BadCommand(format!("renameCollection: `{key}` must be a collection name"))),
                None => return Err(BadCommand(format!("renameCollection: `{key}` is missing"))),
            }
        }
    }
    Ok(Prepared { admin, doc })
}

/// How bad a failed command is for the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Effect {
    /// The server refused it (`ok: 0`, or write errors with nothing written): nothing changed.
    Nothing,
    /// Some writes may have happened (write errors after some succeeded, a write concern error).
    Partial,
    /// The connection failed: unknown whether the server ran it.
    Unknown,
}

/// A failed command, as reported to the operator.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    /// The server's error code.
    pub code: Option<i32>,
    /// `code N (CodeName): message`.
    pub message: String,
    /// What it left behind.
    pub effect: Effect,
}

/// Names of codes that come without one (write errors carry only a number).
fn code_name(code: i32) -> Option<&'static str> {
    Some(match code {
        2 => "BadValue",
        9 => "FailedToParse",
        14 => "TypeMismatch",
        26 => "NamespaceNotFound",
        27 => "IndexNotFound",
        28 => "PathNotViable",
        48 => "NamespaceExists",
        52 => "DollarPrefixedFieldName",
        56 => "EmptyFieldName",
        64 => "WriteConcernFailed",
        66 => "ImmutableField",
        85 => "IndexOptionsConflict",
        86 => "IndexKeySpecsConflict",
        112 => "WriteConflict",
        121 => "DocumentValidationFailure",
        11000 => "DuplicateKey",
        _ => return None,
    })
}

/// `code N (Name): message`, the form every failure is reported in.
pub(crate) fn describe(code: i32, name: Option<&str>, message: &str) -> String {
    match name.filter(|n| !n.is_empty()).or_else(|| code_name(code)) {
        Some(n) => format!("code {code} ({n}): {message}"),
        None => format!("code {code}: {message}"),
    }
}

fn number(doc: &Document, key: &str) -> i64 {
    match doc.get(key) {
        Some(Bson::Int32(n)) => *n as i64,
        Some(Bson::Int64(n)) => *n,
        Some(Bson::Double(n)) => *n as i64,
        Some(Bson::Array(a)) => a.len() as i64,
        _ => 0,
    }
}

/// Check an `ok: 1` reply for write errors and write concern errors.
pub(crate) fn check_reply(reply: &Document) -> Result<(), Failure> {
    if let Ok(errors) = reply.get_array("writeErrors") {
        if let Some(Bson::Document(first)) = errors.first() {
            let code = first.get_i32("code").ok().or_else(|| first.get_i64("code").ok().map(|c| c as i32)).unwrap_or(0);
            let msg = first.get_str("errmsg").unwrap_or("write error");
            let index = number(first, "index");
            let more = if errors.len() > 1 { format!("; {} write errors in all", errors.len()) } else { String::new() };
            // `n` counts documents inserted/deleted/matched, `nModified` and
            // `upserted` the rest: all zero means the failing write was the only one tried.
            let written = number(reply, "n") + number(reply, "nModified") + number(reply, "upserted");
            return Err(Failure {
                code: Some(code),
                message: format!("{} (item {} of the command){more}", describe(code, first.get_str("codeName").ok(), msg), index + 1),
                effect: if written == 0 { Effect::Nothing } else { Effect::Partial },
            });
        }
    }
    if let Ok(wce) = reply.get_document("writeConcernError") {
        let code = wce.get_i32("code").unwrap_or(64);
        let msg = wce.get_str("errmsg").unwrap_or("write concern error");
        return Err(Failure {
            code: Some(code),
            message: format!("{} (write concern error: the write may have been applied)", describe(code, wce.get_str("codeName").ok(), msg)),
            effect: Effect::Partial,
        });
    }
    Ok(())
}

/// A driver error as a command failure.
pub(crate) fn failure_of(conn: &Conn, e: &mongodb::error::Error) -> Failure {
    use mongodb::error::ErrorKind;
    match &*e.kind {
        ErrorKind::Command(c) => {
            Failure { code: Some(c.code), message: conn.scrub(describe(c.code, Some(&c.code_name), &c.message)), effect: Effect::Nothing }
        }
        _ if is_connection_error(e) => Failure {
            code: None,
            message: conn.scrub(format!("lost the connection, the command may or may not have run: {}", e.kind)),
            effect: Effect::Unknown,
        },
        _ => Failure { code: crate::conn::error_code(e), message: conn.scrub(e.kind.to_string()), effect: Effect::Unknown },
    }
}

/// Run one prepared command, in `session` when given.
pub(crate) async fn run(conn: &Conn, cmd: &Prepared, session: Option<&mut ClientSession>) -> Result<Document, Failure> {
    let admin;
    let db: &Database = if cmd.admin {
        admin = conn.client.database("admin");
        &admin
    } else {
        &conn.db
    };
    let action = db.run_command(cmd.doc.clone());
    let reply = match session {
        Some(s) => action.session(s).await,
        None => action.await,
    }
    .map_err(|e| failure_of(conn, &e))?;
    check_reply(&reply)?;
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    #[test]
    fn extended_json_and_key_order() {
        let v: serde_json::Value = serde_json::from_str(
            r#"{"insert": "events", "documents": [{"_id": {"$oid": "5f1d7f0e9d3b2c0001a1b2c3"}, "at": {"$date": "2025-11-01T00:00:00Z"}, "price": {"$numberDecimal": "9.99"}, "n": 1, "big": 5000000000}], "ordered": true}"#,
        )
        .unwrap();
        let p = prepare(&v, "app").unwrap();
        assert_eq!(p.name(), "insert");
        assert!(!p.admin);
        assert_eq!(p.doc.keys().collect::<Vec<_>>(), vec!["insert", "documents", "ordered"]);
        let d = p.doc.get_array("documents").unwrap()[0].as_document().unwrap().clone();
        assert!(matches!(d.get("_id"), Some(Bson::ObjectId(_))));
        assert!(matches!(d.get("at"), Some(Bson::DateTime(_))));
        assert!(matches!(d.get("price"), Some(Bson::Decimal128(_))));
        assert!(matches!(d.get("n"), Some(Bson::Int32(1))));
        assert!(matches!(d.get("big"), Some(Bson::Int64(5000000000))));
    }

    #[test]
    fn bad_extended_json() {
        let v = serde_json::json!({"insert": "x", "documents": [{"_id": {"$oid": "zz"}}]});
        assert!(prepare(&v, "app").unwrap_err().0.contains("Extended JSON"));
    }

    #[test]
    fn rename_is_qualified() {
        let v = serde_json::json!({"renameCollection": "old", "to": "new", "dropTarget": false});
        let p = prepare(&v, "app").unwrap();
        assert!(p.admin);
        assert_eq!(p.doc, doc! {"renameCollection": "app.old", "to": "app.new", "dropTarget": false});
        let v = serde_json::json!({"renameCollection": "other.old", "to": "other.new"});
        assert_eq!(prepare(&v, "app").unwrap().doc, doc! {"renameCollection": "other.old", "to": "other.new"});
        assert!(prepare(&serde_json::json!({"renameCollection": "a"}), "app").is_err());
    }

    #[test]
    fn write_errors_are_failures() {
        let r = doc! {"n": 0, "ok": 1.0, "writeErrors": [{"index": 0, "code": 121, "errmsg": "Document failed validation"}]};
        let f = check_reply(&r).unwrap_err();
        assert_eq!(f.code, Some(121));
        assert_eq!(f.effect, Effect::Nothing);
        assert!(f.message.starts_with("code 121 (DocumentValidationFailure): "), "{}", f.message);
        let r = doc! {"n": 1, "ok": 1.0, "writeErrors": [{"index": 1, "code": 11000, "errmsg": "E11000 dup"}]};
        let f = check_reply(&r).unwrap_err();
        assert_eq!(f.effect, Effect::Partial);
        assert!(f.message.contains("item 2"), "{}", f.message);
        let r = doc! {"n": 1, "ok": 1.0, "writeConcernError": {"code": 100, "codeName": "UnsatisfiableWriteConcern", "errmsg": "no"}};
        assert_eq!(check_reply(&r).unwrap_err().effect, Effect::Partial);
        assert!(check_reply(&doc! {"n": 3, "ok": 1.0}).is_ok());
    }
}
