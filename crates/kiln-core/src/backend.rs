//! The contract every database engine implements.
//!
//! One small trait, [`Backend`], with documented contracts. The runner decides
//! what to do from [`Capabilities`], never from the engine's name.

use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::error::{EngineError, FailureOutcome, StatementError};
use crate::model::{AppliedMigration, FailureInfo, Kind, LogEntry, Migration, State};
use crate::schema::{Snapshot, Violation};

/// What an engine can do; the runner reads this instead of assuming.
#[derive(Clone, Debug)]
pub struct Capabilities {
    /// `postgres`, `mysql`, `sqlite`, `mongodb`.
    pub engine: &'static str,
    /// DDL rolls back with the transaction (PostgreSQL, SQLite).
    pub transactional_ddl: bool,
    /// The kind of migration body this engine runs.
    pub kind: Kind,
}

/// Where an engine keeps kiln's own objects. Every engine takes this.
#[derive(Clone, Debug)]
pub struct BackendConfig {
    /// The database URL (may hold a password: never print it, use [`crate::url::redact`]).
    pub url: String,
    /// History table/collection name (default `kiln_history`).
    pub history_table: String,
    /// Event log table/collection name (default `kiln_log`).
    pub log_table: String,
    /// Table/collection holding the schema snapshot of the last run (default `kiln_snapshot`).
    pub snapshot_table: String,
    /// PostgreSQL schema for kiln's tables and the migrations' search_path
    /// (default: the connection's current schema). Used for schema-per-tenant.
    pub schema: Option<String>,
    /// Database name to use when the URL names none (MongoDB: `[mongodb] database` in kiln.toml).
    pub database: Option<String>,
}

impl BackendConfig {
    /// Defaults for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        BackendConfig { url: url.into(), history_table: "kiln_history".into(), log_table: "kiln_log".into(), snapshot_table: "kiln_snapshot".into(), schema: None, database: None }
    }
}

/// Context for recording one migration.
#[derive(Clone, Debug)]
pub struct RecordContext {
    /// Batch number of this run.
    pub batch: i64,
    /// `user@host`.
    pub actor: String,
}

impl RecordContext {
    /// The history entry for `m` recorded in this run.
    pub fn entry(&self, m: &Migration, state: State, applied_at: chrono::DateTime<chrono::Utc>, duration_ms: i64, error: Option<FailureInfo>) -> AppliedMigration {
        AppliedMigration {
            version: m.version.clone(),
            description: m.description.clone(),
            script: m.display_path(),
            group: m.directives.group.clone(),
            checksum: m.checksum.clone(),
            state,
            batch: self.batch,
            applied_at,
            duration_ms,
            applied_by: self.actor.clone(),
            kiln_version: crate::model::KILN_VERSION.into(),
            error,
        }
    }
}

/// A migration body failed; says what it left behind.
#[derive(Debug, Clone)]
pub struct ApplyError {
    /// The failing statement/command.
    pub error: StatementError,
    /// What remains in the database and history.
    pub outcome: FailureOutcome,
}

/// A check of the live schema run before a migration commits (see
/// [`Backend::apply_checked`]): returns the violations that make it fail.
pub type SchemaCheck = dyn Fn(&Snapshot) -> Vec<Violation> + Send + Sync;

/// Either a body failure or an engine failure (connection lost, history write failed).
#[derive(Debug)]
pub enum StepError {
    /// The migration's own statement failed.
    Body(ApplyError),
    /// The migration ran but left the schema breaking the contract (`schema.yaml`).
    Invalid {
        /// What is wrong.
        violations: Vec<Violation>,
        /// Rolled back, or recorded as failed.
        outcome: FailureOutcome,
    },
    /// kiln could not talk to the database.
    Engine(EngineError),
}

impl From<EngineError> for StepError {
    fn from(e: EngineError) -> Self {
        StepError::Engine(e)
    }
}

/// A database engine: history store, executor and locker in one connection.
///
/// Implementations hold one connection (or session) for their whole life, so
/// session-scoped locks die with the process.
#[async_trait]
pub trait Backend: Send {
    /// What this engine can do.
    fn capabilities(&self) -> Capabilities;

    /// The database as shown in messages (URL with the password redacted).
    fn target(&self) -> String;

    /// Try to take the migration lock without waiting. Returns `true` when taken.
    /// Taking a lock this connection already holds must not deadlock.
    async fn try_lock(&mut self) -> Result<bool, EngineError>;

    /// Who holds the lock, as far as the database can tell (for messages).
    async fn lock_holder(&mut self) -> Option<String>;

    /// Take the lock, waiting up to `wait`; on time-out return
    /// [`EngineError::LockTimeout`] naming the holder. The default polls
    /// [`Backend::try_lock`] with a growing pause.
    async fn lock(&mut self, wait: Duration) -> Result<(), EngineError> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(20);
        loop {
            if self.try_lock().await? {
                return Ok(());
            }
            if start.elapsed() >= wait {
                let holder = self.lock_holder().await.unwrap_or_else(|| "holder unknown".into());
                return Err(EngineError::LockTimeout { target: self.target(), holder, waited: start.elapsed() });
            }
            let left = wait.saturating_sub(start.elapsed());
            tokio::time::sleep(pause.min(left).max(Duration::from_millis(1))).await;
            pause = (pause * 2).min(Duration::from_millis(250));
        }
    }

    /// Release the lock. Releasing a lock not held is not an error.
    async fn unlock(&mut self) -> Result<(), EngineError>;

    /// See [`crate::engine::Locker::detached_unlock`]. The default does
    /// nothing: the lock then lives until the connection closes.
    fn detached_unlock(&self) -> Box<dyn FnOnce() + Send> {
        Box::new(|| {})
    }

    /// Create the history table/collection and the event log if they are missing.
    async fn ensure_history(&mut self) -> Result<(), EngineError>;

    /// Every history entry, or `None` when the history table does not exist
    /// (a database kiln never touched). Must not create anything.
    async fn read_history(&mut self) -> Result<Option<Vec<AppliedMigration>>, EngineError>;

    /// Run `m`'s up body and record it as applied, with an `applied` event.
    ///
    /// Contract: on `Ok`, the body's effects and the history entry are both
    /// committed. On [`StepError::Body`], the outcome says whether everything was
    /// rolled back (nothing recorded) or the entry is now `failed` with the error.
    /// A runner killed at any point must leave either both or neither, or an
    /// entry that blocks the next run (`running`/`failed`).
    async fn apply(&mut self, m: &Migration, ctx: &RecordContext) -> Result<(), StepError>;

    /// Run `m`'s down body and delete its history entry, with a `reverted` event.
    /// Same atomicity contract as [`Backend::apply`].
    async fn revert(&mut self, m: &Migration, applied: &AppliedMigration, ctx: &RecordContext) -> Result<(), StepError>;

    /// Like [`Backend::apply`], but `check` sees the live schema after the body ran
    /// and its violations fail the migration. Engines with transactional DDL
    /// override this to inspect inside the migration's transaction and roll back
    /// (outcome `RolledBack`). The default applies, inspects after the commit and,
    /// on violations, records the migration as `failed` (outcome `RecordedFailed`).
    async fn apply_checked(&mut self, m: &Migration, ctx: &RecordContext, check: &SchemaCheck) -> Result<(), StepError> {
        self.apply(m, ctx).await?;
        let snapshot = self.inspect().await?;
        let violations = check(&snapshot);
        if violations.is_empty() {
            return Ok(());
        }
        let message = format!(
            "schema validation failed after this migration: {}",
            violations.iter().map(|v| v.to_string()).collect::<Vec<_>>().join("; ")
        );
        let mut rows = self.read_history().await?.unwrap_or_default();
        if let Some(row) = rows.iter_mut().find(|r| r.version == m.version) {
            row.state = State::Failed;
            row.error = Some(FailureInfo { message, statement: None, line: None });
            let row = row.clone();
            self.upsert_history(std::slice::from_ref(&row)).await?;
        }
        Err(StepError::Invalid { violations, outcome: FailureOutcome::RecordedFailed })
    }

    /// The live schema: tables (columns, indexes, constraints) or collections
    /// (indexes, validator), kiln's own objects excluded.
    async fn inspect(&mut self) -> Result<Snapshot, EngineError> {
        Err(EngineError::Unsupported(format!("schema inspection is not available for {}", self.capabilities().engine)))
    }

    /// Store the snapshot taken after a successful run, replacing the previous
    /// one (the reference `kiln diff` compares with).
    async fn save_snapshot(&mut self, _snapshot: &Snapshot) -> Result<(), EngineError> {
        Err(EngineError::Unsupported(format!("schema snapshots are not available for {}", self.capabilities().engine)))
    }

    /// The stored snapshot, or `None` when none was stored yet.
    async fn load_snapshot(&mut self) -> Result<Option<Snapshot>, EngineError> {
        Err(EngineError::Unsupported(format!("schema snapshots are not available for {}", self.capabilities().engine)))
    }

    /// Create an empty database (or schema) named `name` on the same server, for
    /// `kiln verify`; returns its URL.
    async fn create_scratch(&mut self, _name: &str) -> Result<String, EngineError> {
        Err(EngineError::Unsupported(format!("scratch databases are not available for {}", self.capabilities().engine)))
    }

    /// Drop a database made by [`Backend::create_scratch`].
    async fn drop_scratch(&mut self, _name: &str) -> Result<(), EngineError> {
        Err(EngineError::Unsupported(format!("scratch databases are not available for {}", self.capabilities().engine)))
    }

    /// Insert or replace history entries by version (baseline, retire, repair).
    async fn upsert_history(&mut self, entries: &[AppliedMigration]) -> Result<(), EngineError>;

    /// Delete the history entry of a version (repair of a failed migration).
    async fn delete_history(&mut self, version: u64) -> Result<(), EngineError>;

    /// Append to the event log. Committed durably before returning, which also
    /// makes every earlier commit of this connection durable.
    async fn log(&mut self, entry: &LogEntry) -> Result<(), EngineError>;

    /// Close the connection cleanly.
    async fn close(self: Box<Self>) -> Result<(), EngineError> {
        Ok(())
    }
}

/// The [`Backend`] of an engine written against [`crate::engine::Engine`]:
/// steps go through [`crate::step::Stepper`], everything else to the small
/// traits. (Transitional: the runner drives [`crate::engine::Engine`]
/// directly once every engine implements it.)
pub struct Protocol<E> {
    /// The engine.
    pub engine: E,
    pending: Option<crate::engine::Record>,
}

impl<E: crate::engine::Engine> Protocol<E> {
    /// Wrap `engine`.
    pub fn new(engine: E) -> Self {
        Protocol { engine, pending: None }
    }

    async fn step(&mut self, m: &Migration, body: &crate::model::Body, dir: crate::event::Direction, ctx: &RecordContext, recorded: Option<&AppliedMigration>, check: Option<&SchemaCheck>) -> Result<(), StepError> {
        let step = crate::engine::Step { migration: m, direction: dir, body, batch: ctx.batch, actor: &ctx.actor };
        let outcome = match dir {
            crate::event::Direction::Up => crate::step::Outcome::Record(State::Applied),
            crate::event::Direction::Down => crate::step::Outcome::Remove,
        };
        let mut stepper = crate::step::Stepper::new(&mut self.engine);
        stepper.pending = self.pending.take();
        let r = stepper.run(&step, recorded, &outcome, check).await;
        self.pending = stepper.pending.take();
        r
    }

    async fn flush(&mut self, extra: crate::engine::Record) -> Result<(), EngineError> {
        let mut stepper = crate::step::Stepper::new(&mut self.engine);
        stepper.pending = self.pending.take();
        stepper.flush(extra).await
    }
}

#[async_trait]
impl<E: crate::engine::Engine> Backend for Protocol<E> {
    fn capabilities(&self) -> Capabilities {
        let c = crate::engine::Engine::capabilities(&self.engine);
        Capabilities { engine: c.engine, transactional_ddl: c.transactional_ddl, kind: c.kind }
    }
    fn target(&self) -> String {
        self.engine.target()
    }
    async fn try_lock(&mut self) -> Result<bool, EngineError> {
        self.flush(Default::default()).await?;
        self.engine.try_lock().await
    }
    async fn lock_holder(&mut self) -> Option<String> {
        self.engine.holder().await
    }
    async fn unlock(&mut self) -> Result<(), EngineError> {
        let flushed = self.flush(Default::default()).await;
        let unlocked = self.engine.unlock().await;
        flushed.and(unlocked)
    }
    fn detached_unlock(&self) -> Box<dyn FnOnce() + Send> {
        crate::engine::Locker::detached_unlock(&self.engine)
    }
    async fn ensure_history(&mut self) -> Result<(), EngineError> {
        self.flush(Default::default()).await?;
        self.engine.ensure().await
    }
    async fn read_history(&mut self) -> Result<Option<Vec<AppliedMigration>>, EngineError> {
        self.flush(Default::default()).await?;
        self.engine.list().await
    }
    async fn apply(&mut self, m: &Migration, ctx: &RecordContext) -> Result<(), StepError> {
        self.step(m, &m.up, crate::event::Direction::Up, ctx, None, None).await
    }
    async fn revert(&mut self, m: &Migration, applied: &AppliedMigration, ctx: &RecordContext) -> Result<(), StepError> {
        let Some(down) = &m.down else {
            return Err(StepError::Engine(EngineError::Unsupported(format!("{} (version {}) has no down section, so it cannot be reverted", m.display_path(), m.version))));
        };
        self.step(m, down, crate::event::Direction::Down, ctx, Some(applied), None).await
    }
    async fn apply_checked(&mut self, m: &Migration, ctx: &RecordContext, check: &SchemaCheck) -> Result<(), StepError> {
        self.step(m, &m.up, crate::event::Direction::Up, ctx, None, Some(check)).await
    }
    async fn inspect(&mut self) -> Result<Snapshot, EngineError> {
        self.flush(Default::default()).await?;
        let engine = self.engine.capabilities().engine;
        match self.engine.schema() {
            Some(s) => s.inspect().await,
            None => Err(EngineError::Unsupported(format!("schema inspection is not available for {engine}"))),
        }
    }
    async fn save_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), EngineError> {
        let engine = self.engine.capabilities().engine;
        match self.engine.schema() {
            Some(s) => s.save_snapshot(snapshot).await,
            None => Err(EngineError::Unsupported(format!("schema snapshots are not available for {engine}"))),
        }
    }
    async fn load_snapshot(&mut self) -> Result<Option<Snapshot>, EngineError> {
        let engine = self.engine.capabilities().engine;
        match self.engine.schema() {
            Some(s) => s.load_snapshot().await,
            None => Err(EngineError::Unsupported(format!("schema snapshots are not available for {engine}"))),
        }
    }
    async fn create_scratch(&mut self, name: &str) -> Result<String, EngineError> {
        let engine = self.engine.capabilities().engine;
        match self.engine.scratch() {
            Some(s) => s.create_scratch(name).await,
            None => Err(EngineError::Unsupported(format!("scratch databases are not available for {engine}"))),
        }
    }
    async fn drop_scratch(&mut self, name: &str) -> Result<(), EngineError> {
        let engine = self.engine.capabilities().engine;
        match self.engine.scratch() {
            Some(s) => s.drop_scratch(name).await,
            None => Err(EngineError::Unsupported(format!("scratch databases are not available for {engine}"))),
        }
    }
    async fn upsert_history(&mut self, entries: &[AppliedMigration]) -> Result<(), EngineError> {
        let changes = entries.iter().cloned().map(crate::engine::HistoryChange::Put).collect();
        self.flush(crate::engine::Record { changes, events: vec![], durable: false }).await
    }
    async fn delete_history(&mut self, version: u64) -> Result<(), EngineError> {
        self.flush(crate::engine::Record { changes: vec![crate::engine::HistoryChange::Delete(version)], events: vec![], durable: false }).await
    }
    async fn log(&mut self, entry: &LogEntry) -> Result<(), EngineError> {
        self.flush(crate::engine::Record { changes: vec![], events: vec![entry.clone()], durable: true }).await
    }
    async fn close(self: Box<Self>) -> Result<(), EngineError> {
        let mut this = *self;
        let flushed = this.flush(Default::default()).await;
        let closed = Box::new(this.engine).close().await;
        flushed.and(closed)
    }
}
