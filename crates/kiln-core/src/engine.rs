//! What a database engine supplies: small traits with documented contracts.
//!
//! An engine is a [`Locker`], a [`HistoryStore`] and an [`Executor`] over one
//! connection (or session), plus optional parts reached through [`Engine`]:
//! a [`SchemaStore`] (inspection and drift snapshots) and a [`ScratchAdmin`]
//! (throw-away databases for `kiln verify`). An engine without one of them
//! returns `None`; nothing is signalled by an "unsupported" error at runtime.
//!
//! Engines supply primitives only. The order in which they are called — take
//! the intent, run the body, record the finish or the failure, log the events —
//! is written once, in [`crate::step`], and chosen from [`Capabilities`].

use async_trait::async_trait;

use crate::error::{EngineError, StatementError};
use crate::event::Direction;
use crate::model::{AppliedMigration, Body, Kind, LogEntry, Migration};
use crate::schema::{Snapshot, Violation};

/// What an engine can do; [`crate::step`] decides every step from this.
#[derive(Clone, Debug)]
pub struct Capabilities {
    /// `postgres`, `mysql`, `sqlite`, `mongodb`.
    pub engine: &'static str,
    /// The kind of migration body this engine runs.
    pub kind: Kind,
    /// DDL rolls back with the transaction (PostgreSQL, SQLite): a migration in
    /// the default transaction mode runs through [`Executor::run_atomic`].
    pub transactional_ddl: bool,
    /// A migration that asks for a transaction (`-- kiln:transaction on`,
    /// `transaction: true`) can run through [`Executor::run_atomic`] even
    /// without transactional DDL (MongoDB on a replica set).
    pub transactions_on_request: bool,
    /// Writing a step's finish on its own costs a commit that the next step's
    /// intent could carry (MySQL). When set, [`crate::step::Stepper`] keeps the
    /// finish and commits it together with the next intent, or at
    /// [`crate::step::Stepper::flush`] — never later than the end of the run.
    pub merge_finish: bool,
}

/// One change to the history, as part of a [`Record`].
#[derive(Clone, Debug, PartialEq)]
pub enum HistoryChange {
    /// Add an entry that must not exist yet. An engine that finds the version
    /// already recorded returns [`EngineError::Query`] saying so (another
    /// runner recorded it) and commits nothing of the record.
    Insert(AppliedMigration),
    /// Insert or replace the entry of `row.version`.
    Put(AppliedMigration),
    /// Remove the entry of this version; removing a missing entry is not an error.
    Delete(u64),
}

/// History changes and log events that commit together.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Record {
    /// Applied in order.
    pub changes: Vec<HistoryChange>,
    /// Appended to the event log, in order, after `changes`.
    pub events: Vec<LogEntry>,
    /// When set, the commit — and with it every earlier commit of this
    /// connection — is on disk when [`HistoryStore::commit`] returns. Steps
    /// commit without it (PostgreSQL skips the WAL flush); the end of every run
    /// commits with it.
    pub durable: bool,
}

impl Record {
    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.events.is_empty()
    }

    /// Append `other` to this record.
    pub fn extend(&mut self, other: Record) {
        self.changes.extend(other.changes);
        self.events.extend(other.events);
        self.durable |= other.durable;
    }
}

/// One migration step handed to an [`Executor`]: which body runs, for whom.
#[derive(Clone, Copy, Debug)]
pub struct Step<'a> {
    /// The migration.
    pub migration: &'a Migration,
    /// Apply or revert.
    pub direction: Direction,
    /// The body that runs (`up`, `down`, or a phase's).
    pub body: &'a Body,
    /// Batch number of this run.
    pub batch: i64,
    /// `user@host` recorded as the actor.
    pub actor: &'a str,
}

impl<'a> Step<'a> {
    /// The file and SQL statements of the body; any other body is refused
    /// (see [`Step::wrong_body`]).
    pub fn sql(&self, engine: &str) -> Result<(&'a std::path::Path, &'a [crate::model::Statement]), EngineError> {
        match self.body {
            Body::Sql { file, statements } => Ok((file.as_path(), statements.as_slice())),
            _ => Err(self.wrong_body(engine)),
        }
    }

    /// The file and MongoDB commands of the body; any other body is refused
    /// (see [`Step::wrong_body`]).
    pub fn commands(&self, engine: &str) -> Result<(&'a std::path::Path, &'a [crate::model::Command]), EngineError> {
        match self.body {
            Body::Commands { file, commands } => Ok((file.as_path(), commands.as_slice())),
            _ => Err(self.wrong_body(engine)),
        }
    }

    /// The registered code of a code migration's body, `None` for any other body.
    pub fn code(&self) -> Option<&'a crate::code::CodeRef> {
        match self.body {
            Body::Code { code } => Some(code),
            _ => None,
        }
    }

    /// The one refusal for a body `engine` cannot run. [`crate::step::Stepper`]
    /// checks the kind before any engine sees the step, so engines reach this
    /// only when driven directly.
    pub fn wrong_body(&self, engine: &str) -> EngineError {
        let kind = match self.body {
            Body::Sql { .. } => "SQL",
            Body::Commands { .. } => "MongoDB command",
            Body::Code { .. } => "code",
        };
        EngineError::Refused(format!("{}: a {kind} body cannot run on {engine}; nothing was run", self.migration.display_path()))
    }

    /// `up` or `down`, for messages.
    pub fn word(&self) -> &'static str {
        match self.direction {
            Direction::Up => "up",
            Direction::Down => "down",
        }
    }
}

/// A check of the live schema run before a migration commits: returns the
/// violations that make it fail.
pub type SchemaCheck = dyn Fn(&Snapshot) -> Vec<Violation> + Send + Sync;

/// Why [`Executor::run_atomic`] failed. In every case nothing of the step
/// remains: the transaction was rolled back, or never committed.
#[derive(Debug)]
pub enum AtomicFailure {
    /// A statement/command of the body failed.
    Body(StatementError),
    /// The body ran, but the schema check returned violations.
    Invalid(Vec<Violation>),
    /// kiln's own write, the commit or the connection failed.
    Engine(EngineError),
}

/// What a failed statement left behind, on the intent path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Left {
    /// Nothing of the body remains (the failing statement was the first to
    /// change anything, and it changed nothing).
    Nothing,
    /// Part of the body is committed; the text says which part and why, for
    /// the operator (e.g. "MySQL had already committed statement 1 (…)").
    Committed(String),
}

impl Left {
    /// The usual answer for a body whose statements commit one by one: after
    /// a failure at `index` (0-based), the statements before it remain.
    pub fn autocommit(index: usize) -> Left {
        match index {
            0 => Left::Nothing,
            1 => Left::Committed(
                "the migration runs with `-- kiln:transaction off`, so statement 1 was committed on its own and remains in the database".into(),
            ),
            n => Left::Committed(format!(
                "the migration runs with `-- kiln:transaction off`, so statements 1–{n} were each committed on their own and remain in the database"
            )),
        }
    }
}

/// Why [`Executor::run_one`] failed.
#[derive(Debug)]
pub enum ExecFailure {
    /// The statement/command failed; `left` says what of the body remains.
    Statement {
        /// The failing statement.
        error: StatementError,
        /// What of the body is committed.
        left: Left,
    },
    /// The connection (or the lock) was lost: what the statement did is unknown.
    Engine(EngineError),
}

/// The migration lock: one runner at a time per database (or tenant).
///
/// Use it through [`crate::lock::acquire`], which waits with a bounded
/// back-off and returns a [`crate::lock::LockGuard`] that is released on every
/// path, a dropped future included.
#[async_trait]
pub trait Locker: Send {
    /// Take the lock without waiting; `Ok(true)` when taken. Taking a lock this
    /// engine already holds returns `Ok(true)` and must not deadlock.
    async fn try_lock(&mut self) -> Result<bool, EngineError>;

    /// Who holds the lock, as far as the database can tell (for messages);
    /// `None` when it cannot tell or nobody does.
    async fn holder(&mut self) -> Option<String>;

    /// Release the lock. Releasing a lock not held is not an error.
    async fn unlock(&mut self) -> Result<(), EngineError>;

    /// An unlock that runs without `&mut self`, for a guard dropped without
    /// [`crate::lock::LockGuard::release`] (the future was cancelled, or a
    /// panic unwound it). It must not block: it releases in the background,
    /// or marks the lock for release at the connection's next use, and closing
    /// or dropping the connection releases it in any case.
    fn detached_unlock(&self) -> Box<dyn FnOnce() + Send>;
}

/// kiln's history and event log.
///
/// Contract, goose-`Store` style: every method either does all it says or
/// returns an error and leaves the history as it was (for [`commit`]: as far
/// as the engine's atomicity reaches, see there).
///
/// [`commit`]: HistoryStore::commit
#[async_trait]
pub trait HistoryStore: Send {
    /// Create the history and the event log if they are missing. Idempotent;
    /// safe while another runner does the same.
    async fn ensure(&mut self) -> Result<(), EngineError>;

    /// Every history entry, ordered by version; `Ok(None)` when the history
    /// does not exist (a database kiln never touched). Must not create
    /// anything. An entry that cannot be read back is an error naming it, not
    /// a skipped row.
    async fn list(&mut self) -> Result<Option<Vec<AppliedMigration>>, EngineError>;

    /// Apply `record.changes` and append `record.events` in one commit. On an
    /// error nothing of the record is committed — except on engines without
    /// multi-table transactions (MongoDB without a replica set), which write
    /// the history changes before the events, so an error can leave the
    /// changes without their events but never events without their changes.
    async fn commit(&mut self, record: &Record) -> Result<(), EngineError>;
}

/// Runs migration bodies. Called only by [`crate::step::Stepper`].
#[async_trait]
pub trait Executor: Send {
    /// Check `step`'s body before anything runs or is recorded: statements
    /// the engine refuses, commands that do not convert, a transaction the
    /// deployment cannot give. `Err` means nothing ran; [`crate::step`] logs it
    /// as a `failed` event and reports the migration as rolled back.
    async fn prepare(&mut self, step: &Step<'_>) -> Result<(), StatementError>;

    /// Run the whole body and commit `record` in the same transaction (the
    /// atomic path, chosen from [`Capabilities`]). With `check`, the schema is
    /// inspected inside the transaction after the body, and violations roll
    /// everything back.
    ///
    /// In `record`, the rows of `step`'s own version may get `applied_at` and
    /// `duration_ms` from the engine's clock (PostgreSQL sends body and record
    /// in one pipeline, so only the server knows the duration).
    ///
    /// Contract: `Ok` means body and record are committed together; every
    /// `Err` means neither is.
    async fn run_atomic(&mut self, step: &Step<'_>, record: &Record, check: Option<&SchemaCheck>) -> Result<(), AtomicFailure>;

    /// Run statement/command `index` (0-based) of the body on its own (the
    /// intent path: the `running` entry is committed before the first call).
    /// The engine may keep a transaction of its own across calls (MySQL keeps
    /// DML transactional between DDL statements); that transaction is
    /// committed by the next [`HistoryStore::commit`], which records the finish.
    async fn run_one(&mut self, step: &Step<'_>, index: usize) -> Result<(), ExecFailure>;

    /// Give up an intent-path step whose body ran to the end but whose schema
    /// check failed, and say what of the body remains committed. When nothing
    /// does, the engine rolls back its own open transaction (see
    /// [`Executor::run_one`]) and returns [`Left::Nothing`]; otherwise it keeps
    /// that transaction, so the `failed` record commits the rest of the body
    /// with it (the migration stays whole, not cut at its last implicit
    /// commit). The default is right for engines whose statements commit one
    /// by one: everything remains, unless the body was empty.
    async fn abandon(&mut self, step: &Step<'_>) -> Result<Left, EngineError> {
        Ok(match step.body.len() {
            0 => Left::Nothing,
            n => Left::Committed(format!(
                "its {n} statement{} ran outside a transaction and remain{} in the database",
                if n == 1 { "" } else { "s" },
                if n == 1 { "s" } else { "" }
            )),
        })
    }
}

/// The live schema and the snapshot the last run stored (drift detection,
/// schema contracts).
#[async_trait]
pub trait SchemaStore: Send {
    /// Tables (columns, indexes, constraints) or collections (indexes,
    /// validator), kiln's own objects excluded.
    async fn inspect(&mut self) -> Result<Snapshot, EngineError>;

    /// Store `snapshot` as the reference `kiln diff` compares with, replacing
    /// the previous one.
    async fn save_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), EngineError>;

    /// The stored snapshot, or `None` when none was stored yet.
    async fn load_snapshot(&mut self) -> Result<Option<Snapshot>, EngineError>;
}

/// Throw-away databases on the same server (`kiln verify`).
#[async_trait]
pub trait ScratchAdmin: Send {
    /// Create an empty database (or schema) `name` and return its URL.
    /// `name` always starts with `kiln_`; other names are refused.
    async fn create_scratch(&mut self, name: &str) -> Result<String, EngineError>;

    /// Drop a database made by [`ScratchAdmin::create_scratch`].
    async fn drop_scratch(&mut self, name: &str) -> Result<(), EngineError>;
}

/// A database engine: lock, history and executor over one connection, with
/// optional parts.
///
/// Implementations hold one connection (or session) for their whole life, so
/// session-scoped locks die with the process.
#[async_trait]
pub trait Engine: Locker + HistoryStore + Executor {
    /// What this engine can do.
    fn capabilities(&self) -> Capabilities;

    /// The database as shown in messages (URL with the password redacted).
    fn target(&self) -> String;

    /// Schema inspection and snapshots; `None` when the engine has none.
    fn schema(&mut self) -> Option<&mut dyn SchemaStore> {
        None
    }

    /// Scratch databases; `None` when the engine cannot make them.
    fn scratch(&mut self) -> Option<&mut dyn ScratchAdmin> {
        None
    }

    /// Other tools' history tables, for `kiln adopt`; `None` when the engine
    /// cannot read them.
    fn foreign(&mut self) -> Option<&mut dyn crate::adopt::ForeignReader> {
        None
    }

    /// Backfill jobs (`kiln_jobs`, DESIGN §4); `None` when the engine has none.
    fn jobs(&mut self) -> Option<&mut dyn crate::jobs::JobStore> {
        None
    }

    /// Close the connection cleanly (releasing anything session-scoped).
    async fn close(self: Box<Self>) -> Result<(), EngineError> {
        Ok(())
    }
}
