//! The database side of a script: run one command (Extended JSON in,
//! canonical Extended JSON out) on the caller's tokio runtime, and sessions.
//!
//! Commands run in one session of kiln's unless the script passes its own
//! (`{ session }`), so a cursor's `getMore` is in the session that opened it
//! and a script reads its own writes.

use std::collections::HashMap;
use std::time::Instant;

use bson::{Bson, Document};
use mongodb::{Client, ClientSession};
use tokio::runtime::Handle;

/// Commands that change the database (for "what did the script leave").
const WRITES: &[&str] = &[
    "insert",
    "update",
    "delete",
    "findAndModify",
    "findandmodify",
    "create",
    "createIndexes",
    "drop",
    "dropIndexes",
    "deleteIndexes",
    "renameCollection",
    "collMod",
    "dropDatabase",
    "bulkWrite",
    "convertToCapped",
    "cloneCollectionAsCapped",
    "createView",
    "applyOps",
    "mapReduce",
];

/// The database connection of one script run.
pub(crate) struct Mongo {
    pub handle: Handle,
    pub client: Client,
    sessions: HashMap<u32, ClientSession>,
    default_session: Option<ClientSession>,
    next: u32,
    pub commands: u64,
    pub writes: u64,
}

fn error_json(code: i32, code_name: &str, message: &str, labels: Vec<String>) -> String {
    serde_json::json!({ "$kilnError": { "code": code, "codeName": code_name, "message": message, "labels": labels } }).to_string()
}

fn driver_error(e: &mongodb::error::Error) -> String {
    let labels: Vec<String> = e.labels().iter().cloned().collect();
    match e.kind.as_ref() {
        mongodb::error::ErrorKind::Command(c) => error_json(c.code, &c.code_name, &c.message, labels),
        _ => error_json(0, "", &kiln_scrub(&e.to_string()), labels),
    }
}

/// Driver messages may quote a URL; never show its password.
fn kiln_scrub(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for word in text.split_inclusive(' ') {
        match (word.find("://"), word.find('@')) {
            (Some(s), Some(at)) if at > s => {
                out.push_str(&word[..s + 3]);
                out.push_str("***");
                out.push_str(&word[at..]);
            }
            _ => out.push_str(word),
        }
    }
    out
}

impl Mongo {
    pub fn new(handle: Handle, client: Client) -> Self {
        Mongo { handle, client, sessions: HashMap::new(), default_session: None, next: 1, commands: 0, writes: 0 }
    }

    fn is_write(cmd: &Document) -> bool {
        let Some((name, _)) = cmd.iter().next() else { return false };
        if WRITES.contains(&name.as_str()) {
            return true;
        }
        name == "aggregate"
            && cmd
                .get_array("pipeline")
                .is_ok_and(|p| p.iter().any(|s| s.as_document().is_some_and(|d| d.contains_key("$out") || d.contains_key("$merge"))))
    }

    /// Run `cmd_json` (canonical Extended JSON of a command document) on
    /// `db`; the reply as canonical Extended JSON, or `{"$kilnError": …}`.
    pub fn command(&mut self, db: &str, cmd_json: &str, session: u32, deadline: Instant) -> String {
        let value: serde_json::Value = match serde_json::from_str(cmd_json) {
            Ok(v) => v,
            Err(e) => return error_json(0, "BadValue", &format!("kiln could not read the command: {e}"), vec![]),
        };
        let cmd = match Bson::try_from(value) {
            Ok(Bson::Document(d)) => d,
            Ok(_) => return error_json(0, "BadValue", "a command must be a document", vec![]),
            Err(e) => return error_json(0, "BadValue", &format!("invalid Extended JSON in the command: {e}"), vec![]),
        };
        self.commands += 1;
        if Self::is_write(&cmd) {
            self.writes += 1;
        }
        let database = self.client.database(db);
        let remaining = deadline.saturating_duration_since(Instant::now());
        let handle = self.handle.clone();
        let result = if session != 0 {
            let Some(s) = self.sessions.get_mut(&session) else {
                return error_json(0, "NoSuchSession", "the session has ended", vec![]);
            };
            handle.block_on(async { tokio::time::timeout(remaining, database.run_command(cmd).session(s)).await })
        } else {
            if self.default_session.is_none() {
                match handle.block_on(async { self.client.start_session().await }) {
                    Ok(s) => self.default_session = Some(s),
                    Err(e) => return driver_error(&e),
                }
            }
            let s = self.default_session.as_mut().expect("started above");
            handle.block_on(async { tokio::time::timeout(remaining, database.run_command(cmd).session(s)).await })
        };
        match result {
            // Canonical: a 64-bit integer (a cursor id) keeps its type and every digit.
            Ok(Ok(reply)) => Bson::Document(reply).into_canonical_extjson().to_string(),
            Ok(Err(e)) => driver_error(&e),
            Err(_) => error_json(
                50,
                "MaxTimeMSExpired",
                "the migration's time-out was reached while this command ran (raise [javascript] timeout in kiln.toml)",
                vec![],
            ),
        }
    }

    /// Session operations: `start` (returns the id), `start_transaction`, `commit`, `abort`, `end`.
    pub fn session(&mut self, op: &str, id: u32, _opts: &str) -> String {
        let handle = self.handle.clone();
        match op {
            "start" => match handle.block_on(async { self.client.start_session().await }) {
                Ok(s) => {
                    let id = self.next;
                    self.next += 1;
                    self.sessions.insert(id, s);
                    id.to_string()
                }
                Err(e) => driver_error(&e),
            },
            "end" => {
                self.sessions.remove(&id);
                "null".into()
            }
            _ => {
                let Some(s) = self.sessions.get_mut(&id) else {
                    return error_json(0, "NoSuchSession", "the session has ended", vec![]);
                };
                let r = match op {
                    "start_transaction" => handle.block_on(async { s.start_transaction().await }),
                    "commit" => {
                        self.writes += 1;
                        handle.block_on(async { s.commit_transaction().await })
                    }
                    "abort" => handle.block_on(async { s.abort_transaction().await }),
                    other => return error_json(0, "BadValue", &format!("unknown session operation {other}"), vec![]),
                };
                match r {
                    Ok(()) => "null".into(),
                    Err(e) => driver_error(&e),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_driver_messages_are_hidden() {
        assert_eq!(kiln_scrub("cannot reach mongodb://u:secret@h:1/db now"), "cannot reach mongodb://***@h:1/db now");
    }

    #[test]
    fn writes_are_told_apart() {
        assert!(Mongo::is_write(&bson::doc! {"update": "c", "updates": []}));
        assert!(!Mongo::is_write(&bson::doc! {"find": "c"}));
        assert!(Mongo::is_write(&bson::doc! {"aggregate": "c", "pipeline": [{"$match": {}}, {"$out": "d"}]}));
        assert!(!Mongo::is_write(&bson::doc! {"aggregate": "c", "pipeline": [{"$match": {}}]}));
    }
}
