//! kiln's [`HistoryStore`] on MongoDB: the history and event-log write path.
//!
//! A [`Record`] costs two round trips, whatever it holds: every history change
//! goes in **one** `update` command (a run of deletes in a `delete` command),
//! then every event in one `insert` command. The core merges a step's finish
//! with the next step's intent (`merge_finish`), so applying a migration costs
//! this commit plus its own commands; the lease costs nothing per migration
//! (the heartbeat task renews it, and writes check its in-memory flag).
//!
//! The event-log insert is sent only after the history write is acknowledged,
//! never alongside it: MongoDB without a transaction cannot make the two
//! collections commit together, so an error (or a crash) between them may
//! leave changes without their events, but never events without their changes
//! (the [`HistoryStore::commit`] contract). Sending both at once would save one
//! round trip but a failed history write — the duplicate `Insert` that tells
//! two runners apart, a lost connection — could then leave an `applied` or
//! `failed` event for a change that never happened.
//!
//! An `Insert` is an upsert whose filter can never match (`state: {$in: []}`):
//! when the version is already recorded the upsert collides with the `_id`
//! (error 11000) instead of overwriting the entry, and the statements after it
//! do not run (`ordered: true`).

use async_trait::async_trait;
use bson::oid::ObjectId;
use bson::{doc, Bson, Document};
use futures::TryStreamExt;
use kiln_core::engine::{HistoryChange, HistoryStore, Record};
use kiln_core::{AppliedMigration, EngineError, LogEntry};
use mongodb::ClientSession;

use crate::command::describe;
use crate::engine::MongoEngine;
use crate::history;

/// One write command and, per statement, the version it inserts (for the
/// "already recorded" error).
struct Batch {
    cmd: Document,
    inserts: Vec<Option<String>>,
}

/// The commands writing `changes` to collection `history`, in order: runs of
/// `Insert`/`Put` share one `update` command, runs of `Delete` one `delete`.
fn history_batches(history: &str, changes: &[HistoryChange]) -> Vec<Batch> {
    let mut out: Vec<(bool, Vec<Document>, Vec<Option<String>>)> = Vec::new();
    for change in changes {
        let (is_delete, statement, insert) = match change {
            HistoryChange::Insert(row) => (false, upsert(row, true), Some(row.version.to_string())),
            HistoryChange::Put(row) => (false, upsert(row, false), None),
            HistoryChange::Delete(v) => (true, doc! { "q": { "_id": *v as i64 }, "limit": 1 }, None),
        };
        match out.last_mut() {
            Some((d, statements, inserts)) if *d == is_delete => {
                statements.push(statement);
                inserts.push(insert);
            }
            _ => out.push((is_delete, vec![statement], vec![insert])),
        }
    }
    out.into_iter()
        .map(|(is_delete, statements, inserts)| {
            let cmd = if is_delete {
                doc! { "delete": history, "deletes": statements, "ordered": true }
            } else {
                doc! { "update": history, "updates": statements, "ordered": true }
            };
            Batch { cmd, inserts }
        })
        .collect()
}

/// The `update` statement of a `Put` (insert or replace), or of an `Insert`
/// (insert only: the filter never matches, so an existing entry makes the
/// upsert fail with 11000).
fn upsert(row: &AppliedMigration, insert_only: bool) -> Document {
    let id = row.version.number as i64;
    let q = if insert_only {
        doc! { "_id": id, "state": { "$in": [] } }
    } else {
        doc! { "_id": id }
    };
    doc! { "q": q, "u": history::to_doc(row), "upsert": true }
}

/// The write concern of kiln's own writes outside a transaction.
fn write_concern(journal: bool) -> Document {
    if journal {
        doc! { "w": "majority", "j": true }
    } else {
        doc! { "w": "majority" }
    }
}

fn first_write_error(reply: &Document) -> Option<(usize, i32, String)> {
    let first = reply.get_array("writeErrors").ok()?.first()?.as_document()?;
    let index = match first.get("index") {
        Some(Bson::Int32(n)) => *n as usize,
        Some(Bson::Int64(n)) => *n as usize,
        _ => 0,
    };
    let code = first.get_i32("code").ok().or_else(|| first.get_i64("code").ok().map(|c| c as i32)).unwrap_or(0);
    let message = describe(code, first.get_str("codeName").ok(), first.get_str("errmsg").unwrap_or("write error"));
    Some((index, code, message))
}

impl MongoEngine {
    /// Run one of kiln's own write commands (in `session` when given) and turn
    /// every kind of failure — refused, write error, write concern error —
    /// into an [`EngineError`]; `inserts` names the versions an `Insert`
    /// statement records, for the duplicate case.
    async fn write(&self, session: Option<&mut ClientSession>, cmd: Document, inserts: &[Option<String>], context: &str) -> Result<(), EngineError> {
        let action = self.conn.db.run_command(cmd);
        let reply = match session {
            Some(s) => action.session(s).await,
            None => action.await,
        }
        .map_err(|e| self.conn.engine_error(context, &e))?;
        if let Some((index, code, message)) = first_write_error(&reply) {
            let message = match inserts.get(index) {
                Some(Some(version)) if code == 11000 => format!(
                    "{} already has an entry for version {version} (code 11000): another runner recorded it; nothing more of this write was done. Run `kiln status`",
                    self.history_name
                ),
                _ => self.conn.scrub(message),
            };
            return Err(EngineError::Query { context: context.to_string(), message });
        }
        if let Ok(wce) = reply.get_document("writeConcernError") {
            let code = wce.get_i32("code").unwrap_or(64);
            let message = describe(code, wce.get_str("codeName").ok(), wce.get_str("errmsg").unwrap_or("write concern error"));
            return Err(EngineError::Query {
                context: context.to_string(),
                message: self.conn.scrub(format!("{message} (write concern error: the write may have been applied)")),
            });
        }
        Ok(())
    }

    /// Apply `changes` to the history, in order. Outside a transaction
    /// (`session` is `None`) with majority write concern, journaled when `journal`.
    pub(crate) async fn write_history(
        &self,
        mut session: Option<&mut ClientSession>,
        changes: &[HistoryChange],
        journal: bool,
    ) -> Result<(), EngineError> {
        let context = format!("writing {} to the history collection {}", plural(changes.len(), "change"), self.history_name);
        for Batch { mut cmd, inserts } in history_batches(&self.history_name, changes) {
            if session.is_none() {
                cmd.insert("writeConcern", write_concern(journal));
            }
            self.write(session.as_deref_mut(), cmd, &inserts, &context).await?;
        }
        Ok(())
    }

    /// Append `events` to the event log, in order, in one command.
    pub(crate) async fn write_events(&self, session: Option<&mut ClientSession>, events: &[LogEntry], journal: bool) -> Result<(), EngineError> {
        if events.is_empty() {
            return Ok(());
        }
        // `_id`s from the client, as the driver's insert does: increasing in
        // the order the events happened.
        let documents: Vec<Document> = events
            .iter()
            .map(|e| {
                let mut d = doc! { "_id": ObjectId::new() };
                d.extend(history::log_doc(e));
                d
            })
            .collect();
        let mut cmd = doc! { "insert": &self.log_name, "documents": documents, "ordered": true };
        if session.is_none() {
            cmd.insert("writeConcern", write_concern(journal));
        }
        let context = format!("writing {} to the event log {}", plural(events.len(), "event"), self.log_name);
        self.write(session, cmd, &[], &context).await
    }
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

#[async_trait]
impl HistoryStore for MongoEngine {
    async fn ensure(&mut self) -> Result<(), EngineError> {
        self.ensure_collections().await
    }

    async fn list(&mut self) -> Result<Option<Vec<AppliedMigration>>, EngineError> {
        if !self.conn.collection_exists(&self.history_name).await? {
            return Ok(None);
        }
        let ctx = || format!("reading the history collection {}", self.history_name);
        let docs: Vec<Document> = self
            .history
            .find(doc! {})
            .await
            .map_err(|e| self.conn.engine_error(ctx(), &e))?
            .try_collect()
            .await
            .map_err(|e| self.conn.engine_error(ctx(), &e))?;
        history::from_docs(&docs).map(Some).map_err(|e| EngineError::Query { context: ctx(), message: e.0 })
    }

    /// History changes first, then — once they are acknowledged — the events
    /// (see the module docs). Refused once the lease is lost.
    async fn commit(&mut self, record: &Record) -> Result<(), EngineError> {
        if let Some(e) = self.lease_lost("writing to the history") {
            return Err(e);
        }
        if !record.changes.is_empty() {
            // A later journaled log write makes this one durable too.
            self.write_history(None, &record.changes, record.durable && record.events.is_empty()).await?;
        }
        self.write_events(None, &record.events, record.durable).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::{Checksum, State, Version};

    fn row(v: u64, state: State) -> AppliedMigration {
        AppliedMigration {
            version: Version::from_number(v),
            description: "x".into(),
            script: "x.yaml".into(),
            group: None,
            checksum: Checksum(String::new()),
            state,
            batch: 1,
            applied_at: chrono::DateTime::from_timestamp_millis(0).unwrap(),
            duration_ms: 0,
            applied_by: "a@b".into(),
            kiln_version: "0".into(),
            error: None,
        }
    }

    #[test]
    fn a_merged_finish_and_intent_is_one_update_command() {
        let b = history_batches("h", &[HistoryChange::Put(row(1, State::Applied)), HistoryChange::Insert(row(2, State::Running))]);
        assert_eq!(b.len(), 1);
        let updates = b[0].cmd.get_array("updates").unwrap();
        assert_eq!(updates.len(), 2);
        let insert = updates[1].as_document().unwrap();
        assert_eq!(insert.get_document("q").unwrap(), &doc! { "_id": 2_i64, "state": { "$in": [] } });
        assert!(insert.get_bool("upsert").unwrap());
        assert_eq!(b[0].inserts, vec![None, Some("2".to_string())]);
        assert_eq!(updates[0].as_document().unwrap().get_document("q").unwrap(), &doc! { "_id": 1_i64 });
    }

    #[test]
    fn deletes_keep_their_place_in_the_order() {
        let b = history_batches("h", &[HistoryChange::Delete(3), HistoryChange::Put(row(2, State::Running)), HistoryChange::Delete(9)]);
        let names: Vec<&str> = b.iter().map(|b| b.cmd.keys().next().unwrap().as_str()).collect();
        assert_eq!(names, vec!["delete", "update", "delete"]);
    }
}
