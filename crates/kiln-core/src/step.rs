//! The step protocol: what happens, in order, when one migration is applied
//! or reverted — on every engine. Engines supply primitives ([`Executor`],
//! [`HistoryStore`]); this file decides when each one is called.
//!
//! # Choosing the path
//!
//! [`path`] picks one of two paths from the engine's [`Capabilities`] and the
//! migration's transaction directive:
//!
//! | directive | `transactional_ddl` | `transactions_on_request` | path |
//! |---|---|---|---|
//! | `transaction off` | any | any | intent |
//! | default | yes | any | atomic |
//! | default | no | any | intent |
//! | `transaction on` | yes | any | atomic |
//! | `transaction on` | no | yes | atomic |
//! | `transaction on` | no | no | intent |
//!
//! PostgreSQL and SQLite take the atomic path by default; MySQL/MariaDB always
//! takes the intent path (its DDL commits implicitly); MongoDB takes the intent
//! path unless a migration asks for `transaction: true` on a replica set.
//!
//! # The atomic path
//!
//! 1. [`Executor::prepare`] checks the body; a refusal is logged as `failed`
//!    and nothing runs.
//! 2. [`Executor::run_atomic`] runs the body and, in the same transaction, the
//!    finished history entry and its `applied`/`reverted` event. With a schema
//!    contract, the check runs inside that transaction before the commit.
//! 3. On a body failure the transaction is gone; a `failed` event is logged
//!    (best effort: the body's error is what the caller must see).
//!
//! A process killed at any point leaves both body and record, or neither.
//!
//! # The intent path
//!
//! 1. [`Executor::prepare`], as above.
//! 2. The **intent** — the entry in state `running` (for a revert: the applied
//!    entry switched to `running`) — is committed, together with the previous
//!    step's finish when the engine merges them ([`Capabilities::merge_finish`]).
//! 3. The body runs one statement at a time ([`Executor::run_one`]).
//!    - A failing statement that left [`Left::Nothing`]: the intent is undone
//!      (up: entry deleted; down: entry restored) and a `failed` event logged,
//!      in one commit. Outcome: rolled back.
//!    - A failing statement that left [`Left::Committed`]: the entry becomes
//!      `failed` with the error, statement and line, plus a `failed` event, in
//!      one commit. Every later run refuses until `kiln repair`.
//!    - A lost connection or lock: nothing more is written. The `running`
//!      entry stays and blocks every later run until `kiln repair`.
//! 4. The **finish** — the entry in its final state, or deleted for a revert,
//!    with its event — is committed now, or kept for the next intent when the
//!    engine merges them. [`Stepper::flush`] writes a kept finish; the runner
//!    calls it before anything else touches the database and at the end of
//!    every run.
//! 5. With a schema contract, the schema is inspected after the finish; a
//!    violation turns the entry `failed` (the change cannot be rolled back).
//!
//! A process killed at any point of the intent path leaves the `running` entry,
//! which blocks the next run: schema and history never silently disagree.
//!
//! # States
//!
//! The state a successful step records is the caller's ([`Outcome`]): `applied`
//! for `up`, and the phases of a zero-downtime change (`expanded`, …) use the
//! same protocol with their own states. Engines store states as given.

use std::time::Instant;

use chrono::{SecondsFormat, Utc};

use crate::backend::{ApplyError, RecordContext, StepError};
use crate::engine::{AtomicFailure, Capabilities, Engine, ExecFailure, HistoryChange, Left, Record, SchemaCheck, Step};
use crate::error::{EngineError, FailureOutcome, StatementError};
use crate::event::Direction;
use crate::model::{AppliedMigration, Body, FailureInfo, Kind, LogEntry, LogEvent, Migration, State, TxMode};

/// Which of the two paths a step takes (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// Body and record commit together.
    Atomic,
    /// Intent committed first, body statement by statement, then the finish.
    Intent,
}

/// The path `m` takes on an engine with `caps` (the table in the module docs).
pub fn path(caps: &Capabilities, m: &Migration) -> Path {
    match m.directives.transaction {
        TxMode::Off => Path::Intent,
        TxMode::Default if caps.transactional_ddl => Path::Atomic,
        TxMode::Default => Path::Intent,
        TxMode::On if caps.transactional_ddl || caps.transactions_on_request => Path::Atomic,
        TxMode::On => Path::Intent,
    }
}

/// What a successful step leaves in the history.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// The entry is recorded in this state (`applied`, or a phase's state).
    Record(State),
    /// The entry is removed (a full revert).
    Remove,
}

/// How often a step's commit is made durable (PostgreSQL: a WAL flush) so
/// that the steps before it can be reported as applied: a group commit by
/// time, at most this long after a step finished.
pub const DURABLE_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// Runs steps over one engine, keeping a finish that the engine merges with
/// the next intent ([`Capabilities::merge_finish`]).
///
/// It also counts how many successful steps are **durable** — their finish
/// is in a commit marked [`Record::durable`] or in an earlier one — so the
/// runner reports a migration as applied only once a crash of the database
/// server can no longer undo it ([`Stepper::durable_steps`]).
pub struct Stepper<'e> {
    engine: &'e mut dyn Engine,
    caps: Capabilities,
    /// A finish not yet committed (merge_finish engines only).
    pending: Option<Record>,
    /// Steps that succeeded.
    finished: u64,
    /// Steps whose finish is covered by a durable commit.
    durable: u64,
    /// When the last durable commit returned.
    last_durable: Instant,
}

impl<'e> Stepper<'e> {
    /// A stepper over `engine`.
    pub fn new(engine: &'e mut dyn Engine) -> Self {
        let caps = engine.capabilities();
        Stepper { engine, caps, pending: None, finished: 0, durable: 0, last_durable: Instant::now() }
    }

    /// Successful steps (of this stepper's life) whose finish is durable:
    /// committed in a durable commit or before one. Grows monotonically; the
    /// runner reports steps as applied up to this count.
    pub fn durable_steps(&self) -> u64 {
        self.durable
    }

    /// Successful steps (of this stepper's life).
    pub fn finished_steps(&self) -> u64 {
        self.finished
    }

    /// True when the next step's commit should be durable ([`DURABLE_EVERY`]).
    fn durable_due(&self) -> bool {
        self.last_durable.elapsed() >= DURABLE_EVERY
    }

    /// A commit covering the first `covers` finished steps returned.
    fn committed(&mut self, durable: bool, covers: u64) {
        if durable {
            self.durable = self.durable.max(covers);
            self.last_durable = Instant::now();
        }
    }

    /// The engine, for everything that is not a step. Call [`Stepper::flush`]
    /// first when a finish may be pending.
    pub fn engine(&mut self) -> &mut dyn Engine {
        &mut *self.engine
    }

    /// Hand over a kept finish (to carry it from one stepper to the next).
    pub fn take_pending(&mut self) -> Option<Record> {
        self.pending.take()
    }

    /// Take back a finish handed over by [`Stepper::take_pending`].
    pub fn restore_pending(&mut self, pending: Option<Record>) {
        self.pending = pending;
    }

    /// True when a step's finish is kept for the next commit.
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Commit the kept finish, if any, with `extra` (e.g. the `run-end` event).
    ///
    /// # Errors
    /// The engine's; the kept step then stays recorded as `running`, which
    /// blocks the next run until `kiln repair`, and the error says so.
    pub async fn flush(&mut self, extra: Record) -> Result<(), EngineError> {
        let mut record = self.pending.take().unwrap_or_default();
        let finished = finished_names(&record);
        record.extend(extra);
        if record.is_empty() {
            return Ok(());
        }
        let covers = self.finished;
        let durable = record.durable;
        self.engine.commit(&record).await.map(|()| self.committed(durable, covers)).map_err(|e| match finished {
            Some(names) => {
                annotate(e, &format!("recording {names} as finished (it stays recorded as running and blocks the next run until `kiln repair`)"))
            }
            None => e,
        })
    }

    /// Apply (`Direction::Up`) or revert one migration: the whole protocol of
    /// the module docs. `recorded` is the history entry before the step (the
    /// applied entry, for a revert). `check`, when given, fails the step if the
    /// schema it leaves breaks the contract.
    ///
    /// # Errors
    /// [`StepError::Body`] with what the failure left behind,
    /// [`StepError::Invalid`] for contract violations, [`StepError::Engine`]
    /// when kiln could not talk to the database.
    pub async fn run(
        &mut self,
        step: &Step<'_>,
        recorded: Option<&AppliedMigration>,
        outcome: &Outcome,
        check: Option<&SchemaCheck>,
    ) -> Result<(), StepError> {
        let m = step.migration;
        let kind = match step.body {
            Body::Sql { .. } => Kind::Sql,
            Body::Commands { .. } => Kind::Commands,
            Body::Code { .. } => Kind::Code,
        };
        // Code runs on every engine (through the engine's `CodeContext`).
        if kind != self.caps.kind && kind != Kind::Code {
            return Err(StepError::Engine(step.wrong_body(self.caps.engine)));
        }
        if let Err(error) = self.engine.prepare(step).await {
            self.flush(Record::default()).await?;
            self.log_failure(step, &error, "nothing was run").await;
            return Err(body_error(error, FailureOutcome::RolledBack));
        }
        match path(&self.caps, m) {
            Path::Atomic => {
                self.flush(Record::default()).await?;
                let durable = self.durable_due();
                let record = Record { changes: vec![finish_change(step, recorded, outcome, 0)], events: vec![finish_event(step, outcome)], durable };
                match self.engine.run_atomic(step, &record, check).await {
                    Ok(()) => {
                        self.finished += 1;
                        self.committed(durable, self.finished);
                        Ok(())
                    }
                    Err(AtomicFailure::Body(error)) => {
                        self.log_failure(step, &error, "rolled back").await;
                        Err(body_error(error, FailureOutcome::RolledBack))
                    }
                    // The runner logs violations (with the same words on every engine).
                    Err(AtomicFailure::Invalid(violations)) => Err(StepError::Invalid { violations, outcome: FailureOutcome::RolledBack }),
                    Err(AtomicFailure::Engine(e)) => Err(StepError::Engine(e)),
                }
            }
            Path::Intent => self.run_intent(step, recorded, outcome, check).await,
        }
    }

    async fn run_intent(
        &mut self,
        step: &Step<'_>,
        recorded: Option<&AppliedMigration>,
        outcome: &Outcome,
        check: Option<&SchemaCheck>,
    ) -> Result<(), StepError> {
        let m = step.migration;
        let started = Instant::now();

        // 1. The intent, with the previous step's finish when kept.
        let intent = intent_change(step, recorded);
        let mut record = self.pending.take().unwrap_or_default();
        let finished = finished_names(&record);
        record.changes.push(intent);
        record.durable = self.durable_due();
        let covers = self.finished;
        if let Err(e) = self.engine.commit(&record).await {
            let what = match finished {
                Some(names) => format!("recording the start of {} (and {names} as finished, which stays recorded as running)", m.name()),
                None => format!("recording the start of {}", m.name()),
            };
            return Err(StepError::Engine(annotate(e, &what)));
        }
        self.committed(record.durable, covers);

        // 2. The body, one statement at a time.
        for index in 0..step.body.len() {
            match self.engine.run_one(step, index).await {
                Ok(()) => {}
                Err(ExecFailure::Engine(e)) => return Err(StepError::Engine(e)),
                Err(ExecFailure::Statement { error, left }) => return Err(self.intent_failed(step, recorded, error, left, started).await),
            }
        }

        // 3. The contract, before the finish: a violation gives the step up.
        let ms = started.elapsed().as_millis() as i64;
        if let Some(check) = check {
            if let Some(schema) = self.engine.schema() {
                let snapshot = schema.inspect().await?;
                let violations = check(&snapshot);
                if !violations.is_empty() {
                    return Err(self.intent_invalid(step, recorded, violations, ms).await);
                }
            }
        }

        // 4. The finish: now, or with the next intent.
        let durable = self.durable_due();
        let finish = Record { changes: vec![finish_change(step, recorded, outcome, ms)], events: vec![finish_event(step, outcome)], durable };
        if self.caps.merge_finish {
            self.finished += 1;
            self.pending = Some(finish);
        } else {
            self.engine.commit(&finish).await.map_err(|e| {
                annotate(
                    e,
                    &format!(
                        "recording the end of {} (it stays recorded as running and blocks the next run until `{}`)",
                        m.name(),
                        crate::suggest::repair(&m.version)
                    ),
                )
            })?;
            self.finished += 1;
            self.committed(durable, self.finished);
        }
        Ok(())
    }

    /// The body of an intent-path step ran but breaks the contract: roll back
    /// what the engine can, then undo the intent (nothing remains) or record
    /// the step `failed` (something does). The runner logs the violations.
    async fn intent_invalid(
        &mut self,
        step: &Step<'_>,
        recorded: Option<&AppliedMigration>,
        violations: Vec<crate::schema::Violation>,
        ms: i64,
    ) -> StepError {
        let m = step.migration;
        let left = match self.engine.abandon(step).await {
            Ok(left) => left,
            Err(e) => {
                return StepError::Engine(annotate(
                    e,
                    &format!("rolling back {}, which breaks the schema contract (it stays recorded as running)", m.name()),
                ))
            }
        };
        let (change, outcome) = match left {
            Left::Nothing => (undo_intent(step, recorded), FailureOutcome::RolledBack),
            Left::Committed(why) => {
                let mut row = entry(step, recorded, State::Failed, ms);
                row.error = Some(FailureInfo {
                    message: format!(
                        "schema validation failed after this migration: {}; {why}: fix the database by hand, then run `{}`",
                        violations.iter().map(|v| v.to_string()).collect::<Vec<_>>().join("; "),
                        crate::suggest::repair(&m.version)
                    ),
                    statement: None,
                    line: None,
                });
                (HistoryChange::Put(row), FailureOutcome::RecordedFailed)
            }
        };
        match self.engine.commit(&Record { changes: vec![change], events: vec![], durable: false }).await {
            Ok(()) => StepError::Invalid { violations, outcome },
            Err(e) => {
                StepError::Engine(annotate(e, &format!("recording that {} breaks the schema contract (it stays recorded as running)", m.name())))
            }
        }
    }

    /// Record a failed statement of the intent path (see the module docs, step 3).
    async fn intent_failed(
        &mut self,
        step: &Step<'_>,
        recorded: Option<&AppliedMigration>,
        mut error: StatementError,
        left: Left,
        started: Instant,
    ) -> StepError {
        let m = step.migration;
        let ms = started.elapsed().as_millis() as i64;
        let (change, outcome, note) = match left {
            Left::Nothing => (undo_intent(step, recorded), FailureOutcome::RolledBack, "nothing was changed"),
            Left::Committed(why) => {
                let prefix = if step.direction == Direction::Down { "the down migration failed: " } else { "" };
                let mut row = entry(step, recorded, State::Failed, ms);
                row.error = Some(FailureInfo {
                    message: format!("{prefix}{}; {why}", error.message),
                    statement: Some(error.statement as u32),
                    line: Some(error.line as u32),
                });
                error.message = format!(
                    "{}; {why}: fix the database by hand, then run `{}` (or `{}` if you completed it)",
                    error.message,
                    crate::suggest::repair(&m.version),
                    crate::suggest::repair_mark_applied(&m.version)
                );
                (HistoryChange::Put(row), FailureOutcome::RecordedFailed, "recorded as failed")
            }
        };
        let record = Record { changes: vec![change], events: vec![failure_event(step, &error, note)], durable: false };
        if let Err(e) = self.engine.commit(&record).await {
            // The `running` entry stays and blocks the next run, which is right:
            // nobody knows what the database holds now.
            return StepError::Engine(annotate(e, &format!("recording the failure of {} ({error})", m.name())));
        }
        body_error(error, outcome)
    }

    /// Log a `failed` event on its own. Best effort: the body's error is what
    /// the caller must see, and the run's `run-end` follows anyway.
    async fn log_failure(&mut self, step: &Step<'_>, error: &StatementError, note: &str) {
        let record = Record { changes: vec![], events: vec![failure_event(step, error, note)], durable: false };
        if let Err(e) = self.engine.commit(&record).await {
            tracing::warn!(version = %step.migration.version, error = %e, "could not log the failure of a migration");
        }
    }
}

fn body_error(error: StatementError, outcome: FailureOutcome) -> StepError {
    StepError::Body(ApplyError { error, outcome })
}

/// "0003_x, 0004_y" for the steps whose finish `record` carries.
fn finished_names(record: &Record) -> Option<String> {
    let names: Vec<String> = record
        .events
        .iter()
        .filter(|e| matches!(e.event, LogEvent::Applied | LogEvent::Reverted))
        .filter_map(|e| Some(format!("{}_{}", e.version?, e.name.as_deref()?)))
        .collect();
    (!names.is_empty()).then(|| names.join(", "))
}

/// Prefix the context of an engine error with what the step was doing.
fn annotate(e: EngineError, what: &str) -> EngineError {
    match e {
        EngineError::Query { context, message } => EngineError::Query { context: format!("{what}: {context}"), message },
        EngineError::ConnectionLost { context, message } => EngineError::ConnectionLost { context: format!("{what}: {context}"), message },
        EngineError::LockLost { target, holder, context } => EngineError::LockLost { target, holder, context: format!("{what}: {context}") },
        other => other,
    }
}

/// The history entry of `step` in `state`: the recorded entry (revert) or a
/// new one (apply), with this run's batch, actor and kiln version.
fn entry(step: &Step<'_>, recorded: Option<&AppliedMigration>, state: State, ms: i64) -> AppliedMigration {
    let m = step.migration;
    match (step.direction, recorded) {
        // A revert, or a later phase (contract) of a recorded migration.
        (_, Some(prev)) => AppliedMigration { state, error: None, duration_ms: ms, applied_at: Utc::now(), ..prev.clone() },
        _ => RecordContext { batch: step.batch, actor: step.actor.to_string() }.entry(m, state, Utc::now(), ms, None),
    }
}

/// The `running` entry committed before the body of the intent path runs.
fn intent_change(step: &Step<'_>, recorded: Option<&AppliedMigration>) -> HistoryChange {
    let mut row = entry(step, recorded, State::Running, 0);
    row.error = Some(FailureInfo {
        message: format!(
            "{} by {} at {} was interrupted (the process died or lost its connection) before it finished; statements before the interruption may have been committed",
            if step.direction == Direction::Up { "the run started" } else { "the revert started" },
            step.actor,
            Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
        ),
        statement: None,
        line: None,
    });
    match recorded {
        None => HistoryChange::Insert(row),
        Some(_) => HistoryChange::Put(row),
    }
}

/// Undo the intent: remove a new entry, or restore the entry a revert changed.
fn undo_intent(step: &Step<'_>, recorded: Option<&AppliedMigration>) -> HistoryChange {
    match recorded {
        Some(prev) => HistoryChange::Put(prev.clone()),
        None => HistoryChange::Delete(step.migration.version.number),
    }
}

fn finish_change(step: &Step<'_>, recorded: Option<&AppliedMigration>, outcome: &Outcome, ms: i64) -> HistoryChange {
    match outcome {
        Outcome::Record(state) => HistoryChange::Put(entry(step, recorded, *state, ms)),
        Outcome::Remove => HistoryChange::Delete(step.migration.version.number),
    }
}

fn step_event(step: &Step<'_>, event: LogEvent, detail: String) -> LogEntry {
    LogEntry {
        at: Utc::now(),
        event,
        version: Some(step.migration.version.number),
        name: Some(step.migration.description.clone()),
        batch: Some(step.batch),
        actor: step.actor.to_string(),
        reason: None,
        detail: Some(detail),
    }
}

fn finish_event(step: &Step<'_>, outcome: &Outcome) -> LogEntry {
    let event = match step.direction {
        Direction::Up => LogEvent::Applied,
        Direction::Down => LogEvent::Reverted,
    };
    let word = match (outcome, step.migration.phases.is_some(), step.direction) {
        (Outcome::Record(State::Expanded), ..) => "expand",
        (Outcome::Record(State::Contracted), ..) => "contract",
        (_, true, Direction::Down) => "rollback",
        _ => step.word(),
    };
    let n = step.body.len();
    step_event(step, event, format!("{word}: {n} statement{}", if n == 1 { "" } else { "s" }))
}

fn failure_event(step: &Step<'_>, error: &StatementError, note: &str) -> LogEntry {
    let down = if step.direction == Direction::Down { "down: " } else { "" };
    step_event(step, LogEvent::Failed, format!("{down}{error}; {note}"))
}
