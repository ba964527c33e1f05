//! [`MongoEngine`]: kiln's [`Engine`] for MongoDB — the connection, the
//! capabilities, the lease lock, schema inspection and scratch databases.
//!
//! The step protocol is not here: it is [`kiln_core::step`]. This crate
//! supplies primitives: [`kiln_core::engine::Executor`] (exec.rs) and
//! [`kiln_core::engine::HistoryStore`] (store.rs).

use std::time::Duration;

use async_trait::async_trait;
use bson::{doc, Document};
use kiln_core::engine::{Capabilities, Engine, Locker, SchemaStore, ScratchAdmin};
use kiln_core::event::Direction;
use kiln_core::schema::Snapshot;
use kiln_core::{BackendConfig, EngineError, Kind, LogEntry};
use mongodb::options::{CollectionOptions, WriteConcern};
use mongodb::{Client, Collection};

use crate::command::Prepared;
use crate::conn::{Conn, Topology};
use crate::lock::{Attempt, Lease, LOCK_COLLECTION};

/// The commands of the step [`kiln_core::engine::Executor::prepare`] checked
/// last, kept for its `run_one` / `run_atomic` calls.
pub(crate) struct PreparedStep {
    pub version: u64,
    pub direction: Direction,
    pub commands: Vec<Prepared>,
}

/// kiln's engine for MongoDB: history, event log and lease lock in the
/// migration's database, commands run as `db.runCommand()` runs them.
///
/// One value holds one [`mongodb::Client`] (a connection pool) for its life.
/// The lease lock is not tied to a connection: drop the engine without
/// [`Locker::unlock`] and the lease simply expires after its TTL. While it
/// holds the lease, every write it makes is fenced (see the `lock` module
/// docs and docs/safety.md).
///
/// The runner takes it as a [`kiln_core::engine::Engine`] ([`crate::connect`]
/// returns it boxed).
pub struct MongoEngine {
    pub(crate) conn: Conn,
    pub(crate) history_name: String,
    /// The history collection for reads (writes are commands, see store.rs).
    pub(crate) history: Collection<Document>,
    pub(crate) log_name: String,
    /// The jobs collection (`kiln_jobs` beside `kiln_history`, see jobdoc.rs).
    pub(crate) jobs_name: String,
    /// The jobs collection for writes outside transactions (majority write concern).
    pub(crate) jobs: Collection<Document>,
    pub(crate) snapshot_coll: Collection<Document>,
    pub(crate) lease: Lease,
    pub(crate) actor: String,
    pub(crate) prepared: Option<PreparedStep>,
    bulk_write_available: bool,
}

impl MongoEngine {
    /// Connect to the database named by `cfg.url` (or `cfg.database` when the
    /// URL names none) and check the server answers.
    ///
    /// # Errors
    /// [`EngineError::BadUrl`] for a URL that is not `mongodb://` / `mongodb+srv://`,
    /// is malformed, or names no database; [`EngineError::Connect`] (naming the
    /// URL with its password redacted) when no server answers within 5 s, or
    /// the `serverSelectionTimeoutMS` the URL sets.
    ///
    /// # Examples
    /// ```no_run
    /// # async fn f() -> Result<(), kiln_core::EngineError> {
    /// let cfg = kiln_core::BackendConfig::new("mongodb://127.0.0.1:27017/app");
    /// let mut engine = kiln_mongo::MongoEngine::connect(&cfg).await?;
    /// let mut runner = kiln_core::Runner::new(&mut engine, Default::default());
    /// # Ok(()) }
    /// ```
    pub async fn connect(cfg: &BackendConfig) -> Result<Self, EngineError> {
        let conn = Conn::open(cfg).await?;
        for (what, name) in [("history", &cfg.history_table), ("event log", &cfg.log_table), ("snapshot", &cfg.snapshot_table)] {
            if name.is_empty() || name.contains('$') || name.starts_with("system.") || name == LOCK_COLLECTION {
                return Err(EngineError::BadUrl { url: cfg.url.redacted(), message: format!("{name:?} cannot be the {what} collection") });
            }
        }
        let history =
            conn.db.collection_with_options(&cfg.history_table, CollectionOptions::builder().write_concern(WriteConcern::majority()).build());
        let snapshot_coll = conn.db.collection(&cfg.snapshot_table);
        let jobs_name = crate::jobdoc::jobs_collection(&cfg.history_table);
        let jobs = conn.db.collection_with_options(&jobs_name, CollectionOptions::builder().write_concern(WriteConcern::majority()).build());
        let lease = Lease::new(&conn, &cfg.history_table);
        let bulk_write_available = conn.bulk_write;
        Ok(MongoEngine {
            bulk_write_available,
            history_name: cfg.history_table.clone(),
            history,
            log_name: cfg.log_table.clone(),
            jobs_name,
            jobs,
            snapshot_coll,
            lease,
            conn,
            actor: kiln_core::current_actor(),
            prepared: None,
        })
    }

    /// The database migrations run in.
    pub fn database_name(&self) -> &str {
        &self.conn.db_name
    }

    /// The driver client, for callers that need more than kiln does.
    pub fn client(&self) -> &Client {
        &self.conn.client
    }

    /// The kind of deployment (decides whether `transaction: true` can be honoured).
    pub fn topology(&self) -> Topology {
        self.conn.topology
    }

    /// Change the lease time-to-live (default 30 s; renewed every third of it).
    /// A crashed runner blocks others for at most this long. Takes effect at the
    /// next acquisition.
    pub fn set_lease_ttl(&mut self, ttl: Duration) {
        self.lease.set_ttl(ttl);
    }

    /// The live schema (collections, indexes, validators; kiln's own
    /// collections excluded), for schema contracts and drift.
    ///
    /// # Errors
    /// [`EngineError::Query`] / [`EngineError::ConnectionLost`] when the listing fails.
    pub async fn snapshot(&self) -> Result<Snapshot, EngineError> {
        let own = [self.history_name.as_str(), self.log_name.as_str(), self.snapshot_coll.name(), self.jobs_name.as_str(), LOCK_COLLECTION];
        crate::snapshot::take(&self.conn, &own).await
    }

    /// Whether kiln's own writes go in one `bulkWrite` command (the server
    /// announces MongoDB 8.0's wire version), or one command per collection.
    /// Turning it off on a server that has it is for tests: the fence is then
    /// checked by a renewal just before the writes instead of inside them.
    pub fn set_bulk_write(&mut self, on: bool) {
        self.conn.bulk_write = on && self.bulk_write_available;
    }

    pub(crate) async fn create_if_missing(&self, name: &str) -> Result<(), EngineError> {
        if self.conn.collection_exists(name).await? {
            return Ok(());
        }
        match self.conn.db.create_collection(name).await {
            Ok(()) => Ok(()),
            Err(e) if crate::conn::error_code(&e) == Some(48) => Ok(()), // created meanwhile by another runner
            Err(e) => Err(self.conn.engine_error(format!("creating collection {name}"), &e)),
        }
    }

    /// Create the history and the event log if they are missing.
    pub(crate) async fn ensure_collections(&self) -> Result<(), EngineError> {
        self.create_if_missing(&self.history_name).await?;
        self.create_if_missing(&self.log_name).await
    }
}

#[async_trait]
impl Locker for MongoEngine {
    async fn try_lock(&mut self) -> Result<bool, EngineError> {
        match self.lease.try_take(&self.conn).await? {
            Attempt::Held => Ok(false),
            Attempt::Taken { previous: None } => Ok(true),
            Attempt::Taken { previous: Some(owner) } => {
                tracing::warn!(previous = %owner, "took over the migration lock lease");
                let entry = LogEntry {
                    at: chrono::Utc::now(),
                    event: kiln_core::LogEvent::LockTakeover,
                    version: None,
                    name: None,
                    batch: None,
                    actor: self.actor.clone(),
                    reason: None,
                    detail: Some(format!("took over the lease of {owner} on {}", self.history_name)),
                };
                let record = kiln_core::engine::Record { changes: vec![], events: vec![entry], durable: true };
                kiln_core::engine::HistoryStore::commit(self, &record).await?;
                Ok(true)
            }
        }
    }

    async fn holder(&mut self) -> Option<String> {
        self.lease.holder(&self.conn).await
    }

    async fn unlock(&mut self) -> Result<(), EngineError> {
        self.lease.release(&self.conn).await
    }

    fn detached_unlock(&self) -> Box<dyn FnOnce() + Send> {
        self.lease.detached_release()
    }
}

#[async_trait]
impl SchemaStore for MongoEngine {
    async fn inspect(&mut self) -> Result<Snapshot, EngineError> {
        self.snapshot().await
    }

    /// One document per history collection, `{_id: <history>, at, snapshot:
    /// "<JSON>"}`: the snapshot is stored as JSON text because collection and
    /// index names may contain dots, which make awkward field names.
    async fn save_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), EngineError> {
        let json = serde_json::to_string(snapshot)
            .map_err(|e| EngineError::Query { context: "serialising the schema snapshot".into(), message: e.to_string() })?;
        let d = doc! { "_id": &self.history_name, "at": bson::DateTime::from_chrono(self.conn.now()), "snapshot": json };
        self.snapshot_coll
            .replace_one(doc! { "_id": &self.history_name }, d)
            .upsert(true)
            .await
            .map_err(|e| self.conn.engine_error(format!("writing the schema snapshot to {}", self.snapshot_coll.name()), &e))?;
        Ok(())
    }

    async fn load_snapshot(&mut self) -> Result<Option<Snapshot>, EngineError> {
        let ctx = || format!("reading the schema snapshot from {}", self.snapshot_coll.name());
        let Some(d) = self.snapshot_coll.find_one(doc! { "_id": &self.history_name }).await.map_err(|e| self.conn.engine_error(ctx(), &e))? else {
            return Ok(None);
        };
        let json = d.get_str("snapshot").map_err(|_| EngineError::Query { context: ctx(), message: "the document has no `snapshot` text".into() })?;
        serde_json::from_str(json).map(Some).map_err(|e| EngineError::Query { context: ctx(), message: format!("invalid snapshot: {e}") })
    }
}

#[async_trait]
impl ScratchAdmin for MongoEngine {
    /// MongoDB creates databases on first write: this checks the name is free
    /// and returns the URL with the database replaced (credentials and options kept).
    async fn create_scratch(&mut self, name: &str) -> Result<String, EngineError> {
        if !name.starts_with("kiln_") {
            return Err(EngineError::Refused(format!("scratch database names start with kiln_; refusing {name}")));
        }
        if name == self.conn.db_name {
            return Err(EngineError::Refused(format!("the scratch database cannot be the migration database {name}")));
        }
        let existing = self
            .conn
            .client
            .database(name)
            .list_collection_names()
            .await
            .map_err(|e| self.conn.engine_error(format!("checking that database {name} is free"), &e))?;
        if !existing.is_empty() {
            return Err(EngineError::Refused(format!("database {name} already exists ({} collections); choose another name", existing.len())));
        }
        Ok(crate::conn::url_with_database(self.conn.url.expose(), name))
    }

    async fn drop_scratch(&mut self, name: &str) -> Result<(), EngineError> {
        if name == self.conn.db_name {
            return Err(EngineError::Refused(format!("refusing to drop the migration database {name}")));
        }
        if !name.starts_with("kiln_") {
            return Err(EngineError::Refused(format!("refusing to drop {name}: scratch database names start with kiln_")));
        }
        self.conn.client.database(name).drop().await.map_err(|e| self.conn.engine_error(format!("dropping database {name}"), &e))
    }
}

#[async_trait]
impl Engine for MongoEngine {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            engine: "mongodb",
            kind: Kind::Commands,
            transactional_ddl: false,
            transactions_on_request: self.conn.topology.supports_transactions(),
            merge_finish: true,
        }
    }

    fn target(&self) -> String {
        self.conn.target.clone()
    }

    fn schema(&mut self) -> Option<&mut dyn SchemaStore> {
        Some(self)
    }

    fn scratch(&mut self) -> Option<&mut dyn ScratchAdmin> {
        Some(self)
    }

    fn jobs(&mut self) -> Option<&mut dyn kiln_core::jobs::JobStore> {
        Some(self)
    }

    async fn close(mut self: Box<Self>) -> Result<(), EngineError> {
        let r = self.lease.release(&self.conn).await;
        let client = self.conn.client.clone();
        drop(self);
        client.shutdown().await;
        r
    }
}
