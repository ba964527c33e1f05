//! The runner's view of one engine: the step protocol plus the history, log,
//! lock and schema operations every command needs, each of which first
//! commits a finish the engine is still holding (see [`Stepper::flush`]).

use std::time::Duration;

use crate::backend::{RecordContext, StepError};
use crate::engine::{Capabilities, Engine, HistoryChange, Record, SchemaCheck, Step};
use crate::error::EngineError;
use crate::event::Direction;
use crate::lock::{self, LockGuard};
use crate::model::{AppliedMigration, LogEntry, Migration, State};
use crate::schema::Snapshot;
use crate::step::{Outcome, Stepper};

/// One engine, driven by the runner.
pub struct Session<'e> {
    stepper: Stepper<'e>,
    caps: Capabilities,
}

impl<'e> Session<'e> {
    /// A session over `engine`.
    pub fn new(engine: &'e mut dyn Engine) -> Self {
        let caps = engine.capabilities();
        Session { stepper: Stepper::new(engine), caps }
    }

    /// What the engine can do.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// The database as shown in messages.
    pub fn target(&mut self) -> String {
        self.stepper.engine().target()
    }

    /// Take the lock, waiting up to `wait`; `on_wait` hears the holder once.
    pub async fn lock(&mut self, wait: Duration, on_wait: impl FnOnce(&str)) -> Result<LockGuard, EngineError> {
        self.stepper.flush(Record::default()).await?;
        let target = self.target();
        lock::acquire(self.stepper.engine(), &target, wait, on_wait).await
    }

    /// Release the lock held by `guard`, after committing any kept finish.
    pub async fn unlock(&mut self, guard: LockGuard) -> Result<(), EngineError> {
        let flushed = self.stepper.flush(Record::default()).await;
        let released = guard.release(self.stepper.engine()).await;
        flushed.and(released)
    }

    /// Create the history and the log if missing.
    pub async fn ensure_history(&mut self) -> Result<(), EngineError> {
        self.stepper.flush(Record::default()).await?;
        self.stepper.engine().ensure().await
    }

    /// Every history entry, or `None` when kiln never ran here.
    pub async fn read_history(&mut self) -> Result<Option<Vec<AppliedMigration>>, EngineError> {
        self.stepper.flush(Record::default()).await?;
        self.stepper.engine().list().await
    }

    /// Append `entry` to the event log durably (with any kept finish).
    pub async fn log(&mut self, entry: &LogEntry) -> Result<(), EngineError> {
        self.stepper.flush(Record { changes: vec![], events: vec![entry.clone()], durable: true }).await
    }

    /// Insert or replace history entries, with `event` in the same commit.
    pub async fn put_history(&mut self, entries: &[AppliedMigration], event: Option<&LogEntry>) -> Result<(), EngineError> {
        let changes = entries.iter().cloned().map(HistoryChange::Put).collect();
        self.stepper.flush(Record { changes, events: event.into_iter().cloned().collect(), durable: true }).await
    }

    /// Delete the entry of `version`, with `event` in the same commit.
    pub async fn delete_history(&mut self, version: u64, event: Option<&LogEntry>) -> Result<(), EngineError> {
        self.stepper
            .flush(Record { changes: vec![HistoryChange::Delete(version)], events: event.into_iter().cloned().collect(), durable: true })
            .await
    }

    /// Apply `m` (state `applied`; `expanded` for a zero-downtime migration,
    /// whose `up` is its expand part), checking the schema with `check` when given.
    pub async fn apply(&mut self, m: &Migration, ctx: &RecordContext, check: Option<&SchemaCheck>) -> Result<(), StepError> {
        let step = Step { migration: m, direction: Direction::Up, body: &m.up, batch: ctx.batch, actor: &ctx.actor };
        let state = if m.phases.is_some() { State::Expanded } else { State::Applied };
        self.stepper.run(&step, None, &Outcome::Record(state), check).await
    }

    /// Run the contract part of `m`, whose entry is `expanded`; the entry
    /// becomes `contracted`. A migration without a contract part is only
    /// recorded as contracted.
    pub async fn contract(&mut self, m: &Migration, expanded: &AppliedMigration, ctx: &RecordContext) -> Result<(), StepError> {
        let Some(body) = m.phases.as_ref().and_then(|p| p.contract.as_ref()) else {
            let row = AppliedMigration { state: State::Contracted, applied_at: chrono::Utc::now(), ..expanded.clone() };
            return self.put_history(&[row], None).await.map_err(StepError::Engine);
        };
        let step = Step { migration: m, direction: Direction::Up, body, batch: ctx.batch, actor: &ctx.actor };
        self.stepper.run(&step, Some(expanded), &Outcome::Record(State::Contracted), None).await
    }

    /// Revert `m`, whose entry is `applied`.
    pub async fn revert(&mut self, m: &Migration, applied: &AppliedMigration, ctx: &RecordContext) -> Result<(), StepError> {
        let Some(down) = &m.down else {
            // The planner never plans this; say so rather than guess.
            return Err(StepError::Engine(EngineError::Query {
                context: format!("reverting {}", m.name()),
                message: format!("{} (version {}) has no down section", m.display_path(), m.version),
            }));
        };
        let step = Step { migration: m, direction: Direction::Down, body: down, batch: ctx.batch, actor: &ctx.actor };
        self.stepper.run(&step, Some(applied), &Outcome::Remove, None).await
    }

    /// The live schema, or `None` when the engine cannot inspect.
    pub async fn inspect(&mut self) -> Result<Option<Snapshot>, EngineError> {
        self.stepper.flush(Record::default()).await?;
        match self.stepper.engine().schema() {
            Some(s) => s.inspect().await.map(Some),
            None => Ok(None),
        }
    }

    /// Store `snapshot` as the drift reference; nothing when the engine has no snapshots.
    pub async fn save_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), EngineError> {
        match self.stepper.engine().schema() {
            Some(s) => s.save_snapshot(snapshot).await,
            None => Ok(()),
        }
    }

    /// The stored drift reference, `None` when none is stored (or the engine has none).
    pub async fn load_snapshot(&mut self) -> Result<Option<Snapshot>, EngineError> {
        match self.stepper.engine().schema() {
            Some(s) => s.load_snapshot().await,
            None => Ok(None),
        }
    }

    /// Successful steps of this session whose finish is durable (see
    /// [`Stepper::durable_steps`]).
    pub fn durable_steps(&self) -> u64 {
        self.stepper.durable_steps()
    }

    /// Successful steps of this session so far.
    pub fn finished_steps(&self) -> u64 {
        self.stepper.finished_steps()
    }

    /// Commit whatever the engine still holds.
    pub async fn flush(&mut self) -> Result<(), EngineError> {
        self.stepper.flush(Record::default()).await
    }

    /// The engine itself.
    pub fn engine(&mut self) -> &mut dyn Engine {
        self.stepper.engine()
    }
}
