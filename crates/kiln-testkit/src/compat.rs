//! The engine tests' call surface: one migration step or history operation
//! per call, on any [`Engine`], through the same [`Stepper`] the runner uses.
//!
//! Engine tests drive single steps (`apply` this migration, then look at the
//! database) far more often than whole runs; [`Backend`] gives them that
//! without a runner, and [`Protocol`] keeps a finish the engine merges with the
//! next intent between calls, exactly as a run does. Product code never uses
//! this: the runner drives [`Engine`] through `kiln_core::session`.

use std::time::Duration;

use async_trait::async_trait;
use kiln_core::engine::{
    AtomicFailure, Capabilities, Engine, ExecFailure, Executor, HistoryChange, HistoryStore, Left, Locker, Record, SchemaCheck, SchemaStore,
    ScratchAdmin, Step,
};
use kiln_core::schema::Snapshot;
use kiln_core::step::{Outcome, Stepper};
use kiln_core::{AppliedMigration, Body, Direction, EngineError, LogEntry, Migration, RecordContext, State, StatementError, StepError};

/// One step or history operation per call (see the module docs).
#[async_trait]
pub trait Backend: Engine {
    /// Who holds the lock.
    async fn lock_holder(&mut self) -> Option<String>;
    /// Take the lock, waiting up to `wait`.
    async fn lock(&mut self, wait: Duration) -> Result<(), EngineError>;
    /// [`HistoryStore::ensure`].
    async fn ensure_history(&mut self) -> Result<(), EngineError>;
    /// [`HistoryStore::list`].
    async fn read_history(&mut self) -> Result<Option<Vec<AppliedMigration>>, EngineError>;
    /// Apply `m` (state `applied`).
    async fn apply(&mut self, m: &Migration, ctx: &RecordContext) -> Result<(), StepError>;
    /// Apply `m`, failing it when `check` finds violations.
    async fn apply_checked(&mut self, m: &Migration, ctx: &RecordContext, check: &SchemaCheck) -> Result<(), StepError>;
    /// Revert `m`, recorded as `applied`.
    async fn revert(&mut self, m: &Migration, applied: &AppliedMigration, ctx: &RecordContext) -> Result<(), StepError>;
    /// The live schema.
    async fn inspect(&mut self) -> Result<Snapshot, EngineError>;
    /// Store the drift reference.
    async fn save_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), EngineError>;
    /// The stored drift reference.
    async fn load_snapshot(&mut self) -> Result<Option<Snapshot>, EngineError>;
    /// A scratch database.
    async fn create_scratch(&mut self, name: &str) -> Result<String, EngineError>;
    /// Drop a scratch database.
    async fn drop_scratch(&mut self, name: &str) -> Result<(), EngineError>;
    /// Insert or replace entries.
    async fn upsert_history(&mut self, entries: &[AppliedMigration]) -> Result<(), EngineError>;
    /// Delete an entry.
    async fn delete_history(&mut self, version: u64) -> Result<(), EngineError>;
    /// Append to the log, durably.
    async fn log(&mut self, entry: &LogEntry) -> Result<(), EngineError>;
}

/// Any engine as a [`Backend`] (and still an [`Engine`], so a runner can take it).
pub struct Protocol {
    engine: Box<dyn Engine>,
    pending: Option<Record>,
}

impl Protocol {
    /// Wrap `engine`.
    pub fn new(engine: impl Engine + 'static) -> Self {
        Protocol { engine: Box::new(engine), pending: None }
    }

    /// Wrap a boxed engine (what `connect` returns).
    pub fn boxed(engine: Box<dyn Engine>) -> Box<dyn Backend> {
        Box::new(Protocol { engine, pending: None })
    }

    async fn step(
        &mut self,
        m: &Migration,
        body: &Body,
        dir: Direction,
        ctx: &RecordContext,
        recorded: Option<&AppliedMigration>,
        check: Option<&SchemaCheck>,
    ) -> Result<(), StepError> {
        let step = Step { migration: m, direction: dir, body, batch: ctx.batch, actor: &ctx.actor };
        let outcome = match dir {
            Direction::Up => Outcome::Record(State::Applied),
            Direction::Down => Outcome::Remove,
        };
        let mut stepper = Stepper::new(self.engine.as_mut());
        stepper.restore_pending(self.pending.take());
        let r = stepper.run(&step, recorded, &outcome, check).await;
        self.pending = stepper.take_pending();
        r
    }

    async fn flush(&mut self, extra: Record) -> Result<(), EngineError> {
        let mut stepper = Stepper::new(self.engine.as_mut());
        stepper.restore_pending(self.pending.take());
        stepper.flush(extra).await
    }
}

#[async_trait]
impl Backend for Protocol {
    async fn lock_holder(&mut self) -> Option<String> {
        self.engine.holder().await
    }
    async fn lock(&mut self, wait: Duration) -> Result<(), EngineError> {
        self.flush(Record::default()).await?;
        let target = self.engine.target();
        kiln_core::lock::acquire(self.engine.as_mut(), &target, wait, |_| {}).await?.disarm();
        Ok(())
    }
    async fn ensure_history(&mut self) -> Result<(), EngineError> {
        self.flush(Record::default()).await?;
        self.engine.ensure().await
    }
    async fn read_history(&mut self) -> Result<Option<Vec<AppliedMigration>>, EngineError> {
        self.flush(Record::default()).await?;
        self.engine.list().await
    }
    async fn apply(&mut self, m: &Migration, ctx: &RecordContext) -> Result<(), StepError> {
        self.step(m, &m.up, Direction::Up, ctx, None, None).await
    }
    async fn apply_checked(&mut self, m: &Migration, ctx: &RecordContext, check: &SchemaCheck) -> Result<(), StepError> {
        self.step(m, &m.up, Direction::Up, ctx, None, Some(check)).await
    }
    async fn revert(&mut self, m: &Migration, applied: &AppliedMigration, ctx: &RecordContext) -> Result<(), StepError> {
        let Some(down) = &m.down else {
            return Err(StepError::Engine(EngineError::Refused(format!(
                "{} (version {}) has no down section, so it cannot be reverted",
                m.display_path(),
                m.version
            ))));
        };
        self.step(m, down, Direction::Down, ctx, Some(applied), None).await
    }
    async fn inspect(&mut self) -> Result<Snapshot, EngineError> {
        self.flush(Record::default()).await?;
        let engine = self.engine.capabilities().engine;
        match self.engine.schema() {
            Some(s) => s.inspect().await,
            None => Err(EngineError::Refused(format!("schema inspection is not available for {engine}"))),
        }
    }
    async fn save_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), EngineError> {
        let engine = self.engine.capabilities().engine;
        match self.engine.schema() {
            Some(s) => s.save_snapshot(snapshot).await,
            None => Err(EngineError::Refused(format!("schema snapshots are not available for {engine}"))),
        }
    }
    async fn load_snapshot(&mut self) -> Result<Option<Snapshot>, EngineError> {
        let engine = self.engine.capabilities().engine;
        match self.engine.schema() {
            Some(s) => s.load_snapshot().await,
            None => Err(EngineError::Refused(format!("schema snapshots are not available for {engine}"))),
        }
    }
    async fn create_scratch(&mut self, name: &str) -> Result<String, EngineError> {
        let engine = self.engine.capabilities().engine;
        match self.engine.scratch() {
            Some(s) => s.create_scratch(name).await,
            None => Err(EngineError::Refused(format!("scratch databases are not available for {engine}"))),
        }
    }
    async fn drop_scratch(&mut self, name: &str) -> Result<(), EngineError> {
        let engine = self.engine.capabilities().engine;
        match self.engine.scratch() {
            Some(s) => s.drop_scratch(name).await,
            None => Err(EngineError::Refused(format!("scratch databases are not available for {engine}"))),
        }
    }
    async fn upsert_history(&mut self, entries: &[AppliedMigration]) -> Result<(), EngineError> {
        let changes = entries.iter().cloned().map(HistoryChange::Put).collect();
        self.flush(Record { changes, events: vec![], durable: false }).await
    }
    async fn delete_history(&mut self, version: u64) -> Result<(), EngineError> {
        self.flush(Record { changes: vec![HistoryChange::Delete(version)], events: vec![], durable: false }).await
    }
    async fn log(&mut self, entry: &LogEntry) -> Result<(), EngineError> {
        self.flush(Record { changes: vec![], events: vec![entry.clone()], durable: true }).await
    }
}

#[async_trait]
impl Locker for Protocol {
    async fn try_lock(&mut self) -> Result<bool, EngineError> {
        self.flush(Record::default()).await?;
        self.engine.try_lock().await
    }
    async fn holder(&mut self) -> Option<String> {
        self.engine.holder().await
    }
    async fn unlock(&mut self) -> Result<(), EngineError> {
        let flushed = self.flush(Record::default()).await;
        let unlocked = self.engine.unlock().await;
        flushed.and(unlocked)
    }
    fn detached_unlock(&self) -> Box<dyn FnOnce() + Send> {
        self.engine.detached_unlock()
    }
}

#[async_trait]
impl HistoryStore for Protocol {
    async fn ensure(&mut self) -> Result<(), EngineError> {
        self.ensure_history().await
    }
    async fn list(&mut self) -> Result<Option<Vec<AppliedMigration>>, EngineError> {
        self.read_history().await
    }
    async fn commit(&mut self, record: &Record) -> Result<(), EngineError> {
        self.flush(record.clone()).await
    }
}

#[async_trait]
impl Executor for Protocol {
    async fn prepare(&mut self, step: &Step<'_>) -> Result<(), StatementError> {
        self.engine.prepare(step).await
    }
    async fn run_atomic(&mut self, step: &Step<'_>, record: &Record, check: Option<&SchemaCheck>) -> Result<(), AtomicFailure> {
        self.engine.run_atomic(step, record, check).await
    }
    async fn run_one(&mut self, step: &Step<'_>, index: usize) -> Result<(), ExecFailure> {
        self.engine.run_one(step, index).await
    }
    async fn abandon(&mut self, step: &Step<'_>) -> Result<Left, EngineError> {
        self.engine.abandon(step).await
    }
}

#[async_trait]
impl Engine for Protocol {
    fn capabilities(&self) -> Capabilities {
        self.engine.capabilities()
    }
    fn target(&self) -> String {
        self.engine.target()
    }
    fn schema(&mut self) -> Option<&mut dyn SchemaStore> {
        self.engine.schema()
    }
    fn scratch(&mut self) -> Option<&mut dyn ScratchAdmin> {
        self.engine.scratch()
    }
    async fn close(self: Box<Self>) -> Result<(), EngineError> {
        let mut this = *self;
        let flushed = this.flush(Record::default()).await;
        let closed = this.engine.close().await;
        flushed.and(closed)
    }
}
