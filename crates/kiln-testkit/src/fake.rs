//! A fake engine for runner and protocol tests that need no database server.
//!
//! [`FakeDb`] is the "server": history, event log, a schema of named objects
//! and the lock, shared by every [`FakeEngine`] connected to it (two engines on
//! one `FakeDb` are two runners). Bodies are SQL-looking statements read by a
//! tiny interpreter:
//!
//! | statement | effect |
//! |---|---|
//! | `CREATE name` | adds the table `name` (an error if it exists) |
//! | `DROP name` | removes it (an error if it does not exist) |
//! | `FAIL` | fails with code `F0001` |
//! | `HANG` | never finishes (for cancellation tests) |
//! | `LOSE` | the connection is lost |
//!
//! The atomic path stages its changes and applies them only at commit, like a
//! transaction; the intent path applies each statement as it runs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use kiln_core::engine::{
    AtomicFailure, Capabilities, Engine, ExecFailure, Executor, HistoryChange, HistoryStore, Left, Locker, Record, SchemaCheck, SchemaStore, Step,
};
use kiln_core::schema::{ObjectInfo, Snapshot};
use kiln_core::{AppliedMigration, Body, EngineError, Kind, LogEntry, StatementError};

/// The fake server's state.
#[derive(Debug, Default)]
pub struct FakeState {
    /// History, by version; `None` until `ensure`.
    pub history: Option<BTreeMap<u64, AppliedMigration>>,
    /// The event log.
    pub log: Vec<LogEntry>,
    /// Tables that exist.
    pub tables: Vec<String>,
    /// The id of the engine holding the lock.
    pub lock_holder: Option<u64>,
    /// Number of [`HistoryStore::commit`] calls that wrote something, plus atomic commits.
    pub commits: usize,
    /// Statements run, in order (committed or not).
    pub executed: Vec<String>,
    /// The stored snapshot.
    pub snapshot: Option<Snapshot>,
}

/// A fake database server shared by the engines connected to it.
#[derive(Clone, Debug, Default)]
pub struct FakeDb {
    state: Arc<Mutex<FakeState>>,
    next_id: Arc<Mutex<u64>>,
}

impl FakeDb {
    /// An empty server.
    pub fn new() -> Self {
        Self::default()
    }

    /// Lock and read the state.
    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().expect("fake state not poisoned")
    }

    /// A new connection with capabilities `caps`.
    pub fn connect(&self, caps: Capabilities) -> FakeEngine {
        let mut id = self.next_id.lock().expect("not poisoned");
        *id += 1;
        FakeEngine { db: self.clone(), id: *id, caps }
    }

    /// A connection that behaves like PostgreSQL/SQLite (atomic steps).
    pub fn transactional(&self) -> FakeEngine {
        self.connect(Capabilities { engine: "fake", kind: Kind::Sql, transactional_ddl: true, transactions_on_request: true, merge_finish: false })
    }

    /// A connection that behaves like MySQL (intent steps, merged finishes).
    pub fn non_transactional(&self) -> FakeEngine {
        self.connect(Capabilities { engine: "fake", kind: Kind::Sql, transactional_ddl: false, transactions_on_request: false, merge_finish: true })
    }

    /// Versions and states in the history, in order.
    pub fn states(&self) -> Vec<(u64, String)> {
        self.state().history.as_ref().map(|h| h.values().map(|a| (a.version.number, a.state.to_string())).collect()).unwrap_or_default()
    }

    /// Event names in the log, in order.
    pub fn events(&self) -> Vec<String> {
        self.state().log.iter().map(|e| e.event.to_string()).collect()
    }

    /// True while some engine holds the lock.
    pub fn locked(&self) -> bool {
        self.state().lock_holder.is_some()
    }
}

/// One connection to a [`FakeDb`].
pub struct FakeEngine {
    db: FakeDb,
    id: u64,
    caps: Capabilities,
}

enum Effect {
    Create(String),
    Drop(String),
}

fn statements<'a>(step: &'a Step<'_>) -> Vec<(&'a str, usize)> {
    match step.body {
        Body::Sql { statements, .. } => statements.iter().map(|s| (s.sql.trim().trim_end_matches(';').trim(), s.line)).collect(),
        _ => vec![],
    }
}

fn statement_error(step: &Step<'_>, index: usize, line: usize, message: &str) -> StatementError {
    StatementError { file: step.migration.display_path(), statement: index + 1, line, message: message.to_string(), code: Some("F0001".into()) }
}

impl FakeEngine {
    /// Interpret one statement against `tables` (without touching the server).
    async fn interpret(&self, sql: &str, tables: &[String]) -> Result<Option<Effect>, Result<String, EngineError>> {
        self.db.state().executed.push(sql.to_string());
        let mut words = sql.split_whitespace();
        match (words.next(), words.next()) {
            (Some("CREATE"), Some(t)) if tables.iter().any(|x| x == t) => Err(Ok(format!("table {t} already exists"))),
            (Some("CREATE"), Some(t)) => Ok(Some(Effect::Create(t.to_string()))),
            (Some("DROP"), Some(t)) if !tables.iter().any(|x| x == t) => Err(Ok(format!("table {t} does not exist"))),
            (Some("DROP"), Some(t)) => Ok(Some(Effect::Drop(t.to_string()))),
            (Some("FAIL"), _) => Err(Ok("the statement says FAIL".into())),
            (Some("HANG"), _) => {
                std::future::pending::<()>().await;
                unreachable!()
            }
            (Some("LOSE"), _) => {
                Err(Err(EngineError::ConnectionLost { context: "running a statement".into(), message: "the fake server went away".into() }))
            }
            _ => Ok(None),
        }
    }

    fn apply_record(state: &mut FakeState, record: &Record) -> Result<(), EngineError> {
        let history = state.history.get_or_insert_with(BTreeMap::new);
        for c in &record.changes {
            if let HistoryChange::Insert(row) = c {
                if history.contains_key(&row.version.number) {
                    return Err(EngineError::Query {
                        context: "inserting a history entry".into(),
                        message: format!("version {} is already recorded", row.version),
                    });
                }
            }
        }
        for c in &record.changes {
            match c {
                HistoryChange::Insert(row) | HistoryChange::Put(row) => {
                    history.insert(row.version.number, row.clone());
                }
                HistoryChange::Delete(v) => {
                    history.remove(v);
                }
            }
        }
        state.log.extend(record.events.iter().cloned());
        if !record.is_empty() {
            state.commits += 1;
        }
        Ok(())
    }
}

fn apply_effect(tables: &mut Vec<String>, e: Effect) {
    match e {
        Effect::Create(t) => tables.push(t),
        Effect::Drop(t) => tables.retain(|x| *x != t),
    }
}

fn snapshot_of(tables: &[String]) -> Snapshot {
    Snapshot { objects: tables.iter().map(|t| (t.clone(), ObjectInfo::default())).collect() }
}

#[async_trait]
impl Locker for FakeEngine {
    async fn try_lock(&mut self) -> Result<bool, EngineError> {
        let mut s = self.db.state();
        match s.lock_holder {
            Some(h) if h != self.id => Ok(false),
            _ => {
                s.lock_holder = Some(self.id);
                Ok(true)
            }
        }
    }
    async fn holder(&mut self) -> Option<String> {
        self.db.state().lock_holder.map(|h| format!("fake connection {h}"))
    }
    async fn unlock(&mut self) -> Result<(), EngineError> {
        let mut s = self.db.state();
        if s.lock_holder == Some(self.id) {
            s.lock_holder = None;
        }
        Ok(())
    }
    fn detached_unlock(&self) -> Box<dyn FnOnce() + Send> {
        let db = self.db.clone();
        let id = self.id;
        Box::new(move || {
            let mut s = db.state();
            if s.lock_holder == Some(id) {
                s.lock_holder = None;
            }
        })
    }
}

#[async_trait]
impl HistoryStore for FakeEngine {
    async fn ensure(&mut self) -> Result<(), EngineError> {
        self.db.state().history.get_or_insert_with(BTreeMap::new);
        Ok(())
    }
    async fn list(&mut self) -> Result<Option<Vec<AppliedMigration>>, EngineError> {
        Ok(self.db.state().history.as_ref().map(|h| h.values().cloned().collect()))
    }
    async fn commit(&mut self, record: &Record) -> Result<(), EngineError> {
        Self::apply_record(&mut self.db.state(), record)
    }
}

#[async_trait]
impl Executor for FakeEngine {
    async fn prepare(&mut self, step: &Step<'_>) -> Result<(), StatementError> {
        for (i, (sql, line)) in statements(step).into_iter().enumerate() {
            if sql == "REFUSE" {
                return Err(statement_error(step, i, line, "the engine refuses this statement"));
            }
        }
        Ok(())
    }

    async fn run_atomic(&mut self, step: &Step<'_>, record: &Record, check: Option<&SchemaCheck>) -> Result<(), AtomicFailure> {
        let mut tables = self.db.state().tables.clone();
        for (i, (sql, line)) in statements(step).into_iter().enumerate() {
            match self.interpret(sql, &tables).await {
                Ok(Some(e)) => apply_effect(&mut tables, e),
                Ok(None) => {}
                Err(Ok(message)) => return Err(AtomicFailure::Body(statement_error(step, i, line, &message))),
                Err(Err(e)) => return Err(AtomicFailure::Engine(e)),
            }
        }
        if let Some(check) = check {
            let violations = check(&snapshot_of(&tables));
            if !violations.is_empty() {
                return Err(AtomicFailure::Invalid(violations));
            }
        }
        let mut s = self.db.state();
        Self::apply_record(&mut s, record).map_err(AtomicFailure::Engine)?;
        s.tables = tables;
        Ok(())
    }

    async fn run_one(&mut self, step: &Step<'_>, index: usize) -> Result<(), ExecFailure> {
        let (sql, line) = statements(step)[index];
        let tables = self.db.state().tables.clone();
        match self.interpret(sql, &tables).await {
            Ok(Some(e)) => {
                apply_effect(&mut self.db.state().tables, e);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(Ok(message)) => Err(ExecFailure::Statement { error: statement_error(step, index, line, &message), left: Left::autocommit(index) }),
            Err(Err(e)) => Err(ExecFailure::Engine(e)),
        }
    }
}

#[async_trait]
impl SchemaStore for FakeEngine {
    async fn inspect(&mut self) -> Result<Snapshot, EngineError> {
        Ok(snapshot_of(&self.db.state().tables))
    }
    async fn save_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), EngineError> {
        self.db.state().snapshot = Some(snapshot.clone());
        Ok(())
    }
    async fn load_snapshot(&mut self) -> Result<Option<Snapshot>, EngineError> {
        Ok(self.db.state().snapshot.clone())
    }
}

#[async_trait]
impl Engine for FakeEngine {
    fn capabilities(&self) -> Capabilities {
        self.caps.clone()
    }
    fn target(&self) -> String {
        format!("fake://{}", self.id)
    }
    fn schema(&mut self) -> Option<&mut dyn SchemaStore> {
        Some(self)
    }
}
