//! kiln's [`HistoryStore`] on MongoDB: the history and event-log write path.
//!
//! A [`Record`] costs **one round trip** on MongoDB 8.0+: one ordered
//! `bulkWrite` holding, in this order, the lease *fence* (an update of the
//! lease document filtered on our token, see lock.rs), every history change,
//! then every event. The core merges a step's finish with the next step's
//! intent (`merge_finish`), so applying a migration costs this write plus its
//! own commands; the lease costs nothing more (the fence renews it, and the
//! check before each command is local while the lease is provably ours).
//!
//! Ordered means a failed operation stops the ones after it: a lost lease
//! writes nothing; a failed history change writes no event. MongoDB without a
//! transaction cannot make the two collections commit together, so an error
//! (or a crash) in the middle may leave changes without their events, but
//! never events without their changes (the [`HistoryStore::commit`] contract).
//!
//! Before 8.0 (no `bulkWrite`) the changes go in one `update` command (a run
//! of deletes in a `delete` command) and the events, once those are
//! acknowledged, in one `insert` command; the lease is checked before them.
//!
//! An `Insert` is an upsert whose filter can never match (`state: {$in: []}`):
//! when the version is already recorded the upsert collides with the `_id`
//! (error 11000) instead of overwriting the entry, and nothing after it runs.

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
use crate::lock::is_fence_code;

/// One write command and, per statement, the version it inserts (for the
/// "already recorded" error).
struct Batch {
    cmd: Document,
    inserts: Vec<Option<String>>,
}

/// The commands writing `changes` to collection `history`, in order: runs of
/// `Insert`/`Put` share one `update` command, runs of `Delete` one `delete`.
fn history_batches(history: &str, changes: &[HistoryChange]) -> Result<Vec<Batch>, EngineError> {
    let mut out: Vec<(bool, Vec<Document>, Vec<Option<String>>)> = Vec::new();
    for change in changes {
        let (is_delete, statement, insert) = match change {
            HistoryChange::Insert(row) => (false, upsert(row, true)?, Some(row.version.to_string())),
            HistoryChange::Put(row) => (false, upsert(row, false)?, None),
            HistoryChange::Delete(v) => (true, doc! { "q": { "_id": history::stored_id(*v, None)? }, "limit": 1 }, None),
        };
        match out.last_mut() {
            Some((d, statements, inserts)) if *d == is_delete => {
                statements.push(statement);
                inserts.push(insert);
            }
            _ => out.push((is_delete, vec![statement], vec![insert])),
        }
    }
    Ok(out
        .into_iter()
        .map(|(is_delete, statements, inserts)| {
            let cmd = if is_delete {
                doc! { "delete": history, "deletes": statements, "ordered": true }
            } else {
                doc! { "update": history, "updates": statements, "ordered": true }
            };
            Batch { cmd, inserts }
        })
        .collect())
}

/// The `bulkWrite` ops writing `changes` to the namespace at `ns` of
/// `nsInfo`, in order, with the version each `Insert` records.
fn history_ops(ns: i32, changes: &[HistoryChange]) -> Result<Vec<(Document, Option<String>)>, EngineError> {
    changes
        .iter()
        .map(|change| {
            Ok(match change {
                HistoryChange::Insert(row) | HistoryChange::Put(row) => {
                    let insert = matches!(change, HistoryChange::Insert(_));
                    let s = upsert(row, insert)?;
                    let op = doc! { "update": ns, "filter": s.get_document("q").cloned().unwrap_or_default(), "updateMods": s.get_document("u").cloned().unwrap_or_default(), "upsert": true };
                    (op, insert.then(|| row.version.to_string()))
                }
                HistoryChange::Delete(v) => (doc! { "delete": ns, "filter": { "_id": history::stored_id(*v, None)? }, "multi": false }, None),
            })
        })
        .collect()
}

/// The `update` statement of a `Put` (insert or replace), or of an `Insert`
/// (insert only: the filter never matches, so an existing entry makes the
/// upsert fail with 11000).
fn upsert(row: &AppliedMigration, insert_only: bool) -> Result<Document, EngineError> {
    let id = history::stored_id(row.version.number, Some(&row.script))?;
    let u = history::to_doc(row)?;
    let q = if insert_only {
        doc! { "_id": id, "state": { "$in": [] } }
    } else {
        doc! { "_id": id }
    };
    Ok(doc! { "q": q, "u": u, "upsert": true })
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
        self.write_concern_ok(&reply, context)
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
        for Batch { mut cmd, inserts } in history_batches(&self.history_name, changes)? {
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
        let documents = event_docs(events)?;
        let mut cmd = doc! { "insert": &self.log_name, "documents": documents, "ordered": true };
        if session.is_none() {
            cmd.insert("writeConcern", write_concern(journal));
        }
        let context = format!("writing {} to the event log {}", plural(events.len(), "event"), self.log_name);
        self.write(session, cmd, &[], &context).await
    }
}

/// The event-log documents of `events`, with `_id`s from the client, as the
/// driver's insert does: increasing in the order the events happened.
fn event_docs(events: &[LogEntry]) -> Result<Vec<Document>, EngineError> {
    events
        .iter()
        .map(|e| {
            let mut d = doc! { "_id": ObjectId::new() };
            d.extend(history::log_doc(e)?);
            Ok(d)
        })
        .collect()
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

    /// The fence, then the history changes, then the events (see the module
    /// docs). Refused once the lease is lost.
    async fn commit(&mut self, record: &Record) -> Result<(), EngineError> {
        let what = format!(
            "writing {} and {} to {}",
            plural(record.changes.len(), "history change"),
            plural(record.events.len(), "event"),
            self.history_name
        );
        if self.lease.is_lost() {
            return Err(self.lease.lost_error(&self.conn, &what).await);
        }
        if record.is_empty() {
            return Ok(());
        }
        if self.conn.bulk_write {
            return self.commit_bulk(record, &what).await;
        }
        // One command per collection: the fence is a renewal checked before them.
        self.lease.check(&self.conn, &what).await?;
        if !record.changes.is_empty() {
            // A later journaled log write makes this one durable too.
            self.write_history(None, &record.changes, record.durable && record.events.is_empty()).await?;
        }
        self.write_events(None, &record.events, record.durable).await
    }
}

/// What one op of a `bulkWrite` does, to say which one failed.
enum Op {
    Fence,
    Change(Option<String>),
    Event,
}

impl MongoEngine {
    /// `record` as one ordered `bulkWrite`: the fence (when this runner holds
    /// the lease), every history change, every event. One round trip.
    async fn commit_bulk(&mut self, record: &Record, what: &str) -> Result<(), EngineError> {
        let mut ns_info: Vec<Document> = Vec::new();
        let mut ops: Vec<Document> = Vec::new();
        let mut kinds: Vec<Op> = Vec::new();
        let fenced = self.lease.is_fenced();
        if fenced {
            ns_info.push(doc! { "ns": self.lease.namespace(&self.conn) });
            let (filter, update) = self.lease.fence(&self.conn);
            ops.push(doc! { "update": 0_i32, "filter": filter, "updateMods": update, "upsert": true });
            kinds.push(Op::Fence);
        }
        if !record.changes.is_empty() {
            ns_info.push(doc! { "ns": format!("{}.{}", self.conn.db_name, self.history_name) });
            for (op, insert) in history_ops(ns_info.len() as i32 - 1, &record.changes)? {
                ops.push(op);
                kinds.push(Op::Change(insert));
            }
        }
        if !record.events.is_empty() {
            ns_info.push(doc! { "ns": format!("{}.{}", self.conn.db_name, self.log_name) });
            let ns = ns_info.len() as i32 - 1;
            for d in event_docs(&record.events)? {
                ops.push(doc! { "insert": ns, "document": d });
                kinds.push(Op::Event);
            }
        }
        let cmd = doc! {
            "bulkWrite": 1_i32,
            "ops": ops,
            "nsInfo": ns_info,
            "ordered": true,
            "errorsOnly": true,
            "writeConcern": write_concern(record.durable),
        };
        let sent = std::time::Instant::now();
        let reply = self.conn.client.database("admin").run_command(cmd).await.map_err(|e| self.conn.engine_error(what, &e))?;
        let first_error = reply
            .get_document("cursor")
            .ok()
            .and_then(|c| c.get_array("firstBatch").ok())
            .and_then(|b| b.iter().filter_map(Bson::as_document).find(|r| !matches!(r.get("ok"), Some(Bson::Double(x)) if *x == 1.0)).cloned());
        let Some(err) = first_error else {
            if fenced {
                self.lease.fence_passed(sent);
            }
            return self.write_concern_ok(&reply, what);
        };
        let index = match err.get("idx") {
            Some(Bson::Int32(n)) => *n as usize,
            Some(Bson::Int64(n)) => *n as usize,
            _ => 0,
        };
        let code = err.get_i32("code").ok().or_else(|| err.get_i64("code").ok().map(|c| c as i32)).unwrap_or(0);
        if fenced && index > 0 {
            self.lease.fence_passed(sent);
        }
        match kinds.get(index) {
            Some(Op::Fence) if is_fence_code(code) => {
                self.lease.fence_failed();
                Err(self.lease.lost_error(&self.conn, what).await)
            }
            Some(Op::Change(Some(version))) if code == 11000 => Err(EngineError::Query {
                context: what.to_string(),
                message: format!(
                    "{} already has an entry for version {version} (code 11000): another runner recorded it; nothing more of this write was done. Run `kiln status`",
                    self.history_name
                ),
            }),
            kind => {
                let part = match kind {
                    Some(Op::Fence) => "renewing the migration lock lease",
                    Some(Op::Change(_)) => "a history change",
                    _ => "an event",
                };
                let message = describe(code, err.get_str("codeName").ok(), err.get_str("errmsg").unwrap_or("write error"));
                Err(EngineError::Query {
                    context: what.to_string(),
                    message: self.conn.scrub(format!("{part} failed: {message}; nothing after it was written")),
                })
            }
        }
    }

    /// A reply's write concern error as an [`EngineError`].
    fn write_concern_ok(&self, reply: &Document, context: &str) -> Result<(), EngineError> {
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
        let b = history_batches("h", &[HistoryChange::Put(row(1, State::Applied)), HistoryChange::Insert(row(2, State::Running))]).unwrap();
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
        let b = history_batches("h", &[HistoryChange::Delete(3), HistoryChange::Put(row(2, State::Running)), HistoryChange::Delete(9)]).unwrap();
        let names: Vec<&str> = b.iter().map(|b| b.cmd.keys().next().unwrap().as_str()).collect();
        assert_eq!(names, vec!["delete", "update", "delete"]);
    }

    #[test]
    fn bulk_ops_keep_the_order_and_refuse_unstorable_versions() {
        let ops =
            history_ops(1, &[HistoryChange::Put(row(1, State::Applied)), HistoryChange::Insert(row(2, State::Running)), HistoryChange::Delete(3)])
                .unwrap();
        assert_eq!(ops.len(), 3);
        assert_eq!(ops[0].0.get_document("filter").unwrap(), &doc! { "_id": 1_i64 });
        assert_eq!(ops[1].0.get_document("filter").unwrap(), &doc! { "_id": 2_i64, "state": { "$in": [] } });
        assert_eq!(ops[1].1.as_deref(), Some("2"));
        assert_eq!(ops[2].0.get_i32("delete").unwrap(), 1);
        assert!(history_ops(1, &[HistoryChange::Delete(u64::MAX)]).is_err());
        assert!(history_batches("h", &[HistoryChange::Put(row(1 << 63, State::Applied))]).is_err());
    }
}
