//! kiln's [`Executor`] on MongoDB: check a migration's commands before
//! anything runs, run them one at a time (the intent path), or all of them
//! with the history record in one multi-document transaction
//! (`transaction: true` on a replica set or sharded cluster).

use std::path::Path;

use async_trait::async_trait;
use bson::{doc, Bson};
use kiln_core::engine::{AtomicFailure, ExecFailure, Executor, HistoryChange, Left, Record, SchemaCheck, Step};
use kiln_core::{Command, EngineError, FailureInfo, State, StatementError, TxMode};
use mongodb::ClientSession;

use crate::code::{CodeHandle, MongoCode};
use crate::command::{self, Effect, Prepared};
use crate::engine::{MongoEngine, PreparedStep};

/// The file and commands of `step`'s body.
fn commands<'a>(step: &'a Step<'_>) -> Result<(&'a Path, &'a [Command]), StatementError> {
    step.commands("mongodb").map_err(|e| StatementError {
        file: step.migration.display_path(),
        statement: 1,
        line: 1,
        message: e.to_string(),
        code: None,
    })
}

fn statement_error(file: &Path, commands: &[Command], index: usize, message: String, code: Option<i32>) -> StatementError {
    StatementError {
        file: file.display().to_string(),
        statement: index + 1,
        line: commands.get(index).map(|c| c.line).unwrap_or(0),
        message,
        code: code.map(|c| c.to_string()),
    }
}

impl MongoEngine {
    /// Convert every command before running any, so invalid Extended JSON in
    /// command 3 does not leave commands 1 and 2 applied.
    fn prepare_all(&self, file: &Path, commands: &[Command]) -> Result<Vec<Prepared>, StatementError> {
        commands
            .iter()
            .enumerate()
            .map(|(i, c)| command::prepare(&c.doc, &self.conn.db_name).map_err(|e| statement_error(file, commands, i, e.0, None)))
            .collect()
    }

    /// The commands `prepare` converted for `step` (converted again if the
    /// caller skipped `prepare`, which the step protocol never does).
    fn prepared_for(&mut self, step: &Step<'_>) -> Result<&[Prepared], StatementError> {
        let fresh = matches!(&self.prepared, Some(p) if p.version == step.migration.version.number && p.direction == step.direction);
        if !fresh {
            let (file, cmds) = commands(step)?;
            let commands = self.prepare_all(file, cmds)?;
            self.prepared = Some(PreparedStep { version: step.migration.version.number, direction: step.direction, commands });
        }
        Ok(&self.prepared.as_ref().expect("set above").commands)
    }

    /// The lease fence inside the transaction of `session` (nothing when this
    /// runner holds no lease).
    async fn fence_in(&self, session: &mut ClientSession, what: &str) -> Result<(), EngineError> {
        if !self.lease.is_fenced() {
            return Ok(());
        }
        let sent = std::time::Instant::now();
        let (filter, update) = self.lease.fence(&self.conn);
        let cmd = doc! { "update": crate::lock::LOCK_COLLECTION, "updates": [ { "q": filter, "u": update, "upsert": true } ], "ordered": true };
        let reply = self.conn.db.run_command(cmd).session(session).await.map_err(|e| self.conn.engine_error(what, &e))?;
        let code = reply.get_array("writeErrors").ok().and_then(|w| w.first()).and_then(Bson::as_document).map(|w| w.get_i32("code").unwrap_or(0));
        match code {
            None => {
                self.lease.fence_passed(sent);
                Ok(())
            }
            Some(c) if crate::lock::is_fence_code(c) => {
                self.lease.fence_failed();
                Err(self.lease.lost_error(&self.conn, what).await)
            }
            Some(c) => {
                Err(EngineError::Query { context: what.to_string(), message: format!("renewing the migration lock lease failed with code {c}") })
            }
        }
    }

    /// The record's history changes, then its events, inside the transaction.
    async fn record_in(&self, session: &mut ClientSession, record: &Record) -> Result<(), EngineError> {
        self.write_history(Some(&mut *session), &record.changes, false).await?;
        self.write_events(Some(session), &record.events, false).await
    }

    /// MongoDB cannot list collections or indexes inside a transaction, so a
    /// schema contract is checked after the commit. Violations then turn the
    /// (committed) entry `failed`, as on the intent path, and the error says so.
    async fn check_after_commit(&mut self, step: &Step<'_>, record: &Record, check: &SchemaCheck) -> Result<(), AtomicFailure> {
        let snapshot = self.snapshot().await.map_err(AtomicFailure::Engine)?;
        let violations = check(&snapshot);
        if violations.is_empty() {
            return Ok(());
        }
        let text = violations.iter().map(|v| v.to_string()).collect::<Vec<_>>().join("; ");
        let row = record.changes.iter().find_map(|c| match c {
            HistoryChange::Put(r) | HistoryChange::Insert(r) if r.version.number == step.migration.version.number => Some(r.clone()),
            _ => None,
        });
        if let Some(mut row) = row {
            row.state = State::Failed;
            row.error = Some(FailureInfo { message: format!("schema validation failed after this migration: {text}"), statement: None, line: None });
            self.write_history(None, &[HistoryChange::Put(row)], false).await.map_err(AtomicFailure::Engine)?;
        }
        Err(AtomicFailure::Engine(EngineError::Query {
            context: format!("checking the schema contract after {}", step.migration.name()),
            message: format!(
                "schema validation failed: {text}. MongoDB cannot inspect the schema inside a transaction, so the migration was committed before the check and is now recorded as failed; fix the database, then run `kiln repair {}`",
                step.migration.version
            ),
        }))
    }
}

#[async_trait]
impl Executor for MongoEngine {
    async fn prepare(&mut self, step: &Step<'_>) -> Result<(), StatementError> {
        self.prepared = None;
        let empty: &[Command] = &[];
        let (file, cmds) = match step.code() {
            Some(_) => (step.migration.path.as_path(), empty),
            None => commands(step)?,
        };
        let commands = self.prepare_all(file, cmds)?;
        if step.migration.directives.transaction == TxMode::On && !self.conn.topology.supports_transactions() {
            return Err(statement_error(
                file,
                cmds,
                0,
                format!(
                    "{} asks for `transaction: true`, but {} is a standalone server and multi-document transactions need a replica set or a sharded cluster; nothing was run. Convert the server to a (one-node) replica set, or remove `transaction: true`",
                    step.migration.display_path(),
                    self.conn.target
                ),
                None,
            ));
        }
        self.prepared = Some(PreparedStep { version: step.migration.version.number, direction: step.direction, commands });
        Ok(())
    }

    async fn run_one(&mut self, step: &Step<'_>, index: usize) -> Result<(), ExecFailure> {
        let m = step.migration;
        let what = format!(
            "about to run command {} of the {} body of {} ({}); its history entry stays `running` and blocks later runs until `kiln repair {}`",
            index + 1,
            step.word(),
            m.name(),
            match index {
                0 => "none of its commands ran".to_string(),
                1 => "command 1 ran".to_string(),
                n => format!("commands 1–{n} ran"),
            },
            m.version
        );
        self.lease.check(&self.conn, &what).await.map_err(ExecFailure::Engine)?;
        if let Some(code) = step.code() {
            let mut ctx = MongoCode { conn: &self.conn, handle: CodeHandle { db: self.conn.db.clone(), session: None } };
            if let Err(e) = code.run(step.direction, &mut ctx).await {
                let left = Left::Committed(
                    "MongoDB cannot roll back what the code ran outside a transaction, so whatever it changed before it failed remains; check it, fix the database, then run `kiln repair`".into(),
                );
                return Err(ExecFailure::Statement { error: kiln_core::code::failure(&m.display_path(), e), left });
            }
            return Ok(());
        }
        let (file, cmds) = commands(step).map_err(|error| ExecFailure::Statement { error, left: Left::Nothing })?;
        let cmd = match self.prepared_for(step) {
            Ok(p) => p
                .get(index)
                .cloned()
                .ok_or_else(|| ExecFailure::Engine(EngineError::Refused(format!("{} has no command {}", m.name(), index + 1))))?,
            Err(error) => {
                let left = if index == 0 { Left::Nothing } else { Left::Committed(remains(index, Effect::Nothing)) };
                return Err(ExecFailure::Statement { error, left });
            }
        };
        let Err(f) = command::run(&self.conn, &cmd, None).await else { return Ok(()) };
        let error = statement_error(file, cmds, index, format!("{} failed: {}", cmd.name(), f.message), f.code);
        let left = if index == 0 && f.effect == Effect::Nothing { Left::Nothing } else { Left::Committed(remains(index, f.effect)) };
        Err(ExecFailure::Statement { error, left })
    }

    async fn run_atomic(&mut self, step: &Step<'_>, record: &Record, check: Option<&SchemaCheck>) -> Result<(), AtomicFailure> {
        let m = step.migration;
        let what = format!("about to run {} in a transaction; nothing of it was run", m.name());
        self.lease.check(&self.conn, &what).await.map_err(AtomicFailure::Engine)?;
        if let Some(code) = step.code() {
            return self.code_atomic(step, code, record, check, &what).await;
        }
        let (file, cmds) = commands(step).map_err(AtomicFailure::Body)?;
        let prepared = self.prepared_for(step).map_err(AtomicFailure::Body)?.to_vec();
        let conn = &self.conn;
        let mut session =
            conn.client.start_session().await.map_err(|e| AtomicFailure::Engine(conn.engine_error("starting a session for a transaction", &e)))?;
        session.start_transaction().await.map_err(|e| AtomicFailure::Engine(conn.engine_error("starting a transaction", &e)))?;
        // The fence is the transaction's first write: the commit then happens
        // only if the lease is still ours, and the heartbeat's renewals wait
        // for the commit instead of conflicting with it.
        if let Err(e) = self.fence_in(&mut session, &what).await {
            let _ = session.abort_transaction().await;
            return Err(AtomicFailure::Engine(e));
        }
        for (i, cmd) in prepared.iter().enumerate() {
            if let Err(f) = command::run(conn, cmd, Some(&mut session)).await {
                let _ = session.abort_transaction().await;
                let message = format!("{} failed: {}; the transaction was aborted", cmd.name(), f.message);
                return Err(AtomicFailure::Body(statement_error(file, cmds, i, message, f.code)));
            }
        }
        if let Err(e) = self.record_in(&mut session, record).await {
            let _ = session.abort_transaction().await;
            return Err(AtomicFailure::Engine(e));
        }
        if let Err(e) = commit(&mut session).await {
            let unknown = e.contains_label(mongodb::error::UNKNOWN_TRANSACTION_COMMIT_RESULT);
            let context = if unknown {
                format!("committing the transaction of {} (its outcome is unknown: commands and history entry committed together or not at all; run `kiln status`)", m.name())
            } else {
                format!("committing the transaction of {} (nothing was committed)", m.name())
            };
            return Err(AtomicFailure::Engine(self.conn.engine_error(context, &e)));
        }
        match check {
            Some(check) => self.check_after_commit(step, record, check).await,
            None => Ok(()),
        }
    }
}

impl MongoEngine {
    /// The atomic path of a code migration (`transaction: true` on a replica
    /// set): the code runs with the transaction's session in its
    /// [`CodeHandle`], then the history record, then the commit.
    async fn code_atomic(
        &mut self,
        step: &Step<'_>,
        code: &kiln_core::code::CodeRef,
        record: &Record,
        check: Option<&SchemaCheck>,
        what: &str,
    ) -> Result<(), AtomicFailure> {
        let m = step.migration;
        let conn = &self.conn;
        let mut session =
            conn.client.start_session().await.map_err(|e| AtomicFailure::Engine(conn.engine_error("starting a session for a transaction", &e)))?;
        session.start_transaction().await.map_err(|e| AtomicFailure::Engine(conn.engine_error("starting a transaction", &e)))?;
        if let Err(e) = self.fence_in(&mut session, what).await {
            let _ = session.abort_transaction().await;
            return Err(AtomicFailure::Engine(e));
        }
        let mut ctx = MongoCode { conn: &self.conn, handle: CodeHandle { db: self.conn.db.clone(), session: Some(session) } };
        let ran = code.run(step.direction, &mut ctx).await;
        let session = ctx.handle.session.take();
        drop(ctx);
        let Some(mut session) = session else {
            return Err(AtomicFailure::Engine(EngineError::Refused(format!(
                "{}: the code took the transaction's session out of its CodeHandle; nothing was committed. Leave `session` in place",
                m.display_path()
            ))));
        };
        if let Err(e) = ran {
            let _ = session.abort_transaction().await;
            return Err(AtomicFailure::Body(kiln_core::code::failure(&m.display_path(), format!("{e}; the transaction was aborted"))));
        }
        if let Err(e) = self.record_in(&mut session, record).await {
            let _ = session.abort_transaction().await;
            return Err(AtomicFailure::Engine(e));
        }
        if let Err(e) = commit(&mut session).await {
            return Err(AtomicFailure::Engine(self.conn.engine_error(format!("committing the transaction of {}", m.name()), &e)));
        }
        match check {
            Some(check) => self.check_after_commit(step, record, check).await,
            None => Ok(()),
        }
    }
}

/// What remains after command `index` (0-based) failed with `effect`.
fn remains(index: usize, effect: Effect) -> String {
    let before = match index {
        0 => String::new(),
        1 => "command 1 was committed and remains in the database".into(),
        n => format!("commands 1–{n} were committed and remain in the database"),
    };
    let failing = match effect {
        Effect::Nothing => String::new(),
        Effect::Partial => format!("command {} wrote part of its documents before it failed", index + 1),
        Effect::Unknown => format!("command {} may or may not have run (the connection failed)", index + 1),
    };
    let what = [before, failing].into_iter().filter(|s| !s.is_empty()).collect::<Vec<_>>().join(", and ");
    format!("MongoDB cannot roll back commands run outside a transaction: {what}")
}

/// Commit, retrying while the server says the outcome is unknown (the
/// transactions spec's `UnknownTransactionCommitResult`).
pub(crate) async fn commit(session: &mut ClientSession) -> Result<(), mongodb::error::Error> {
    let mut tries = 0;
    loop {
        match session.commit_transaction().await {
            Ok(()) => return Ok(()),
            Err(e) if e.contains_label(mongodb::error::UNKNOWN_TRANSACTION_COMMIT_RESULT) && tries < 3 => tries += 1,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_remains_is_said() {
        assert!(remains(0, Effect::Partial).contains("command 1 wrote part"));
        assert!(remains(1, Effect::Nothing).contains("command 1 was committed"));
        let s = remains(3, Effect::Unknown);
        assert!(s.contains("commands 1–3") && s.contains("command 4 may or may not"), "{s}");
    }
}
