//! [`MongoBackend`]: kiln's [`Backend`] for MongoDB.

use std::path::Path;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bson::{doc, Document};
use futures::TryStreamExt;
use kiln_core::schema::Snapshot;
use kiln_core::url::redact;
use kiln_core::{
    AppliedMigration, ApplyError, Backend, BackendConfig, Body, Capabilities, Command, EngineError, FailureInfo, FailureOutcome, Kind,
    LogEntry, Migration, RecordContext, State, StatementError, StepError, TxMode,
};
use mongodb::options::WriteConcern;
use mongodb::{Client, ClientSession, Collection};

use crate::command::{self, Effect, Failure, Prepared};
use crate::conn::{error_code, Conn, Topology};
use crate::history;
use crate::lock::{Attempt, Lease, LOCK_COLLECTION};

/// Which body of a migration runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Up,
    Down,
}

impl Dir {
    fn word(self) -> &'static str {
        match self {
            Dir::Up => "up",
            Dir::Down => "down",
        }
    }
}

/// kiln's engine for MongoDB: history, event log and lease lock in the
/// migration's database, commands run as `db.runCommand()` runs them.
///
/// One value holds one [`mongodb::Client`] (a connection pool) for its life.
/// The lease lock is not tied to a connection: drop the backend without
/// [`Backend::unlock`] and the lease simply expires after its TTL.
pub struct MongoBackend {
    conn: Conn,
    history_name: String,
    history: Collection<Document>,
    log_coll: Collection<Document>,
    snapshot_coll: Collection<Document>,
    lease: Lease,
    actor: String,
}

impl MongoBackend {
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
    /// let mut backend = kiln_mongo::MongoBackend::connect(&cfg).await?;
    /// let mut runner = kiln_core::Runner::new(&mut backend, Default::default());
    /// # Ok(()) }
    /// ```
    pub async fn connect(cfg: &BackendConfig) -> Result<Self, EngineError> {
        let conn = Conn::open(cfg).await?;
        for (what, name) in [("history", &cfg.history_table), ("event log", &cfg.log_table), ("snapshot", &cfg.snapshot_table)] {
            if name.is_empty() || name.contains('$') || name.starts_with("system.") || name == LOCK_COLLECTION {
                return Err(EngineError::BadUrl {
                    url: redact(&cfg.url),
                    message: format!("{name:?} cannot be the {what} collection"),
                });
            }
        }
        let majority = WriteConcern::majority();
        let durable = WriteConcern::builder().w(mongodb::options::Acknowledgment::Majority).journal(true).build();
        let history = conn.db.collection_with_options(&cfg.history_table, mongodb::options::CollectionOptions::builder().write_concern(majority).build());
        let log_coll = conn.db.collection_with_options(&cfg.log_table, mongodb::options::CollectionOptions::builder().write_concern(durable).build());
        let snapshot_coll = conn.db.collection(&cfg.snapshot_table);
        let lease = Lease::new(&conn, &cfg.history_table);
        Ok(MongoBackend { history_name: cfg.history_table.clone(), history, log_coll, snapshot_coll, lease, conn, actor: kiln_core::current_actor() })
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
    pub async fn snapshot(&self) -> Result<kiln_core::schema::Snapshot, EngineError> {
        let own = [self.history_name.as_str(), self.log_coll.name(), self.snapshot_coll.name(), LOCK_COLLECTION];
        crate::snapshot::take(&self.conn, &own).await
    }

    fn history_for_txn(&self) -> Collection<Document> {
        // Operations inside a transaction must not carry their own write concern.
        self.conn.db.collection(&self.history_name)
    }

    async fn write_log(&self, entry: &LogEntry) -> Result<(), EngineError> {
        self.log_coll
            .insert_one(history::log_doc(entry))
            .await
            .map_err(|e| self.conn.engine_error(format!("writing to the event log {}", self.log_coll.name()), &e))?;
        Ok(())
    }

    fn log_entry(&self, event: &str, m: &Migration, batch: i64, actor: &str, detail: String) -> LogEntry {
        LogEntry {
            at: chrono::Utc::now(),
            event: event.into(),
            version: Some(m.version.number),
            name: Some(m.description.clone()),
            batch: Some(batch),
            actor: actor.into(),
            reason: None,
            detail: Some(detail),
        }
    }

    fn check_lease(&self, m: &Migration, dir: Dir) -> Result<(), StepError> {
        if self.lease.is_lost() {
            return Err(StepError::Engine(EngineError::Unsupported(format!(
                "the migration lock lease on {} was lost (it could not be renewed in time, and another runner may hold it now); stopped before running {} of {}. Run again",
                self.conn.target,
                dir.word(),
                m.name()
            ))));
        }
        Ok(())
    }

    fn entry(&self, m: &Migration, ctx: &RecordContext, state: State, duration_ms: i64, error: Option<FailureInfo>) -> AppliedMigration {
        ctx.entry(m, state, self.conn.now(), duration_ms, error)
    }

    /// Convert every command before running any, so invalid Extended JSON in
    /// command 3 does not leave commands 1 and 2 applied.
    fn prepare_all(&self, file: &Path, commands: &[Command]) -> Result<Vec<Prepared>, StatementError> {
        commands
            .iter()
            .enumerate()
            .map(|(i, c)| {
                command::prepare(&c.doc, &self.conn.db_name).map_err(|e| StatementError {
                    file: file.display().to_string(),
                    statement: i + 1,
                    line: c.line,
                    message: e.0,
                    code: None,
                })
            })
            .collect()
    }

    async fn run_body(&mut self, m: &Migration, dir: Dir, ctx: &RecordContext) -> Result<(), StepError> {
        self.check_lease(m, dir)?;
        let body = match dir {
            Dir::Up => Some(&m.up),
            Dir::Down => m.down.as_ref(),
        };
        let (file, commands) = match body {
            Some(Body::Commands { file, commands }) => (file.clone(), commands.clone()),
            Some(_) => {
                return Err(StepError::Engine(EngineError::Unsupported(format!(
                    "{}: only MongoDB command migrations (.yaml/.json) run on MongoDB",
                    m.display_path()
                ))))
            }
            None => return Err(StepError::Engine(EngineError::Unsupported(format!("{} has no down section", m.display_path())))),
        };
        let prepared = match self.prepare_all(&file, &commands) {
            Ok(p) => p,
            Err(error) => {
                let detail = format!("{}: {error}; nothing was run", dir.word());
                self.write_log(&self.log_entry("failed", m, ctx.batch, &ctx.actor, detail)).await?;
                return Err(StepError::Body(ApplyError { error, outcome: FailureOutcome::RolledBack }));
            }
        };
        if m.directives.transaction == TxMode::On {
            if !self.conn.topology.supports_transactions() {
                return Err(StepError::Engine(EngineError::Unsupported(format!(
                    "{} asks for `transaction: true`, but {} is a standalone server and multi-document transactions need a replica set or a sharded cluster; nothing was run. Convert the server to a (one-node) replica set, or remove `transaction: true`",
                    m.display_path(),
                    self.conn.target
                ))));
            }
            self.run_in_transaction(m, dir, ctx, &file, &commands, &prepared).await
        } else {
            self.run_plain(m, dir, ctx, &file, &commands, &prepared).await
        }
    }

    /// Without a transaction: commit an intent entry (`running`) first, so a
    /// runner killed mid-migration leaves an entry that blocks the next run.
    async fn run_plain(&mut self, m: &Migration, dir: Dir, ctx: &RecordContext, file: &Path, commands: &[Command], prepared: &[Prepared]) -> Result<(), StepError> {
        let started = Instant::now();
        let id = m.version.number as i64;
        match dir {
            Dir::Up => {
                let intent = history::to_doc(&self.entry(m, ctx, State::Running, 0, None));
                self.history.insert_one(intent).await.map_err(|e| {
                    if error_code(&e) == Some(11000) {
                        EngineError::Query {
                            context: format!("recording the start of {}", m.name()),
                            message: format!("{} already has an entry for version {}; another runner may have recorded it. Run `kiln status`", self.history_name, m.version),
                        }
                    } else {
                        self.conn.engine_error(format!("recording the start of {}", m.name()), &e)
                    }
                })?;
            }
            Dir::Down => {
                let r = self
                    .history
                    .update_one(doc! { "_id": id, "state": "applied" }, doc! { "$set": { "state": "running" } })
                    .await
                    .map_err(|e| self.conn.engine_error(format!("recording the start of the revert of {}", m.name()), &e))?;
                if r.matched_count != 1 {
                    return Err(StepError::Engine(EngineError::Query {
                        context: format!("recording the start of the revert of {}", m.name()),
                        message: format!("{} no longer records version {} as applied; run `kiln status`", self.history_name, m.version),
                    }));
                }
            }
        }
        for (i, cmd) in prepared.iter().enumerate() {
            if let Err(f) = command::run(&self.conn, cmd, None).await {
                return Err(self.plain_failure(m, dir, ctx, file, commands, i, cmd, f, started).await);
            }
        }
        let ms = started.elapsed().as_millis() as i64;
        match dir {
            Dir::Up => {
                self.history
                    .update_one(
                        doc! { "_id": id },
                        doc! { "$set": { "state": "applied", "applied_at": bson::DateTime::from_chrono(self.conn.now()), "duration_ms": ms } },
                    )
                    .await
                    .map_err(|e| self.conn.engine_error(format!("recording {} as applied", m.name()), &e))?;
                self.write_log(&self.log_entry("applied", m, ctx.batch, &ctx.actor, format!("{} commands in {ms} ms", prepared.len()))).await?;
            }
            Dir::Down => {
                self.history
                    .delete_one(doc! { "_id": id })
                    .await
                    .map_err(|e| self.conn.engine_error(format!("deleting the history entry of {}", m.name()), &e))?;
                self.write_log(&self.log_entry("reverted", m, ctx.batch, &ctx.actor, format!("{} commands in {ms} ms", prepared.len()))).await?;
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn plain_failure(
        &mut self,
        m: &Migration,
        dir: Dir,
        ctx: &RecordContext,
        file: &Path,
        commands: &[Command],
        index: usize,
        cmd: &Prepared,
        f: Failure,
        started: Instant,
    ) -> StepError {
        let id = m.version.number as i64;
        let line = commands[index].line;
        let error = StatementError {
            file: file.display().to_string(),
            statement: index + 1,
            line,
            message: format!("{} failed: {}", cmd.name(), f.message),
            code: f.code.map(|c| c.to_string()),
        };
        let nothing_ran = index == 0 && f.effect == Effect::Nothing;
        let recorded: Result<FailureOutcome, EngineError> = async {
            if nothing_ran {
                match dir {
                    Dir::Up => {
                        self.history
                            .delete_one(doc! { "_id": id, "state": "running" })
                            .await
                            .map_err(|e| self.conn.engine_error(format!("removing the start entry of {}", m.name()), &e))?;
                    }
                    Dir::Down => {
                        self.history
                            .update_one(doc! { "_id": id }, doc! { "$set": { "state": "applied" } })
                            .await
                            .map_err(|e| self.conn.engine_error(format!("restoring the entry of {}", m.name()), &e))?;
                    }
                }
                Ok(FailureOutcome::RolledBack)
            } else {
                let failure = FailureInfo {
                    message: format!("{}: {}", dir.word(), error.message),
                    statement: Some((index + 1) as u32),
                    line: Some(line as u32),
                };
                let entry = history::to_doc(&self.entry(m, ctx, State::Failed, started.elapsed().as_millis() as i64, Some(failure)));
                self.history
                    .replace_one(doc! { "_id": id }, entry)
                    .upsert(true)
                    .await
                    .map_err(|e| self.conn.engine_error(format!("recording {} as failed", m.name()), &e))?;
                Ok(FailureOutcome::RecordedFailed)
            }
        }
        .await;
        let outcome = match recorded {
            Ok(o) => o,
            // The `running` entry stays and blocks the next run, which is right:
            // nobody knows what the database holds now.
            Err(e) => return StepError::Engine(e),
        };
        let detail = format!(
            "{}: command {} (line {}) failed: {}; {}",
            dir.word(),
            index + 1,
            line,
            f.message,
            if outcome == FailureOutcome::RolledBack { "nothing was changed" } else { "recorded as failed" }
        );
        if let Err(e) = self.write_log(&self.log_entry("failed", m, ctx.batch, &ctx.actor, detail)).await {
            return StepError::Engine(e);
        }
        StepError::Body(ApplyError { error, outcome })
    }

    /// With `transaction: true`: the commands and the history write commit
    /// together or not at all.
    async fn run_in_transaction(&mut self, m: &Migration, dir: Dir, ctx: &RecordContext, file: &Path, commands: &[Command], prepared: &[Prepared]) -> Result<(), StepError> {
        let started = Instant::now();
        let id = m.version.number as i64;
        let mut session = self
            .conn
            .client
            .start_session()
            .await
            .map_err(|e| self.conn.engine_error("starting a session for a transaction", &e))?;
        session.start_transaction().await.map_err(|e| self.conn.engine_error("starting a transaction", &e))?;
        let mut failed: Option<(usize, Failure)> = None;
        for (i, cmd) in prepared.iter().enumerate() {
            if let Err(f) = command::run(&self.conn, cmd, Some(&mut session)).await {
                failed = Some((i, f));
                break;
            }
        }
        if failed.is_none() {
            let coll = self.history_for_txn();
            let w = match dir {
                Dir::Up => {
                    let entry = history::to_doc(&self.entry(m, ctx, State::Applied, started.elapsed().as_millis() as i64, None));
                    coll.insert_one(entry).session(&mut session).await.map(|_| ())
                }
                Dir::Down => coll.delete_one(doc! { "_id": id }).session(&mut session).await.map(|_| ()),
            };
            if let Err(e) = w {
                let _ = session.abort_transaction().await;
                return Err(StepError::Engine(self.conn.engine_error(format!("recording {} in the transaction", m.name()), &e)));
            }
            match commit(&mut session).await {
                Ok(()) => {
                    let ms = started.elapsed().as_millis() as i64;
                    let (event, what) = if dir == Dir::Up { ("applied", "applied") } else { ("reverted", "reverted") };
                    self.write_log(&self.log_entry(event, m, ctx.batch, &ctx.actor, format!("{} commands {what} in one transaction in {ms} ms", prepared.len())))
                        .await?;
                    return Ok(());
                }
                Err(e) => {
                    let last = prepared.len().saturating_sub(1);
                    failed = Some((last, Failure { code: error_code(&e), message: self.conn.scrub(format!("committing the transaction failed: {}", e.kind)), effect: Effect::Nothing }));
                }
            }
        } else {
            let _ = session.abort_transaction().await;
        }
        let (i, f) = failed.expect("set on every failing path");
        let line = commands.get(i).map(|c| c.line).unwrap_or(0);
        let error = StatementError {
            file: file.display().to_string(),
            statement: i + 1,
            line,
            message: format!("{} failed: {}; the transaction was aborted", prepared[i].name(), f.message),
            code: f.code.map(|c| c.to_string()),
        };
        let detail = format!("{}: command {} (line {line}) failed in a transaction: {}; nothing was changed", dir.word(), i + 1, f.message);
        self.write_log(&self.log_entry("failed", m, ctx.batch, &ctx.actor, detail)).await?;
        Err(StepError::Body(ApplyError { error, outcome: FailureOutcome::RolledBack }))
    }

    async fn create_if_missing(&self, name: &str) -> Result<(), EngineError> {
        if self.conn.collection_exists(name).await? {
            return Ok(());
        }
        match self.conn.db.create_collection(name).await {
            Ok(()) => Ok(()),
            Err(e) if error_code(&e) == Some(48) => Ok(()), // created meanwhile by another runner
            Err(e) => Err(self.conn.engine_error(format!("creating collection {name}"), &e)),
        }
    }
}

/// Commit, retrying while the server says the outcome is unknown (the
/// transactions spec's `UnknownTransactionCommitResult`).
async fn commit(session: &mut ClientSession) -> Result<(), mongodb::error::Error> {
    let mut tries = 0;
    loop {
        match session.commit_transaction().await {
            Ok(()) => return Ok(()),
            Err(e) if e.contains_label(mongodb::error::UNKNOWN_TRANSACTION_COMMIT_RESULT) && tries < 3 => {
                tries += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

#[async_trait]
impl Backend for MongoBackend {
    fn capabilities(&self) -> Capabilities {
        Capabilities { engine: "mongodb", transactional_ddl: false, kind: Kind::Commands }
    }

    fn target(&self) -> String {
        self.conn.target.clone()
    }

    async fn try_lock(&mut self) -> Result<bool, EngineError> {
        match self.lease.try_take(&self.conn).await? {
            Attempt::Held => Ok(false),
            Attempt::Taken { previous: None } => Ok(true),
            Attempt::Taken { previous: Some(owner) } => {
                tracing::warn!(previous = %owner, "took over an expired migration lock lease");
                let entry = LogEntry {
                    at: chrono::Utc::now(),
                    event: "lock-takeover".into(),
                    version: None,
                    name: None,
                    batch: None,
                    actor: self.actor.clone(),
                    reason: None,
                    detail: Some(format!("took over the expired lease of {owner} on {}", self.history_name)),
                };
                self.write_log(&entry).await?;
                Ok(true)
            }
        }
    }

    async fn lock_holder(&mut self) -> Option<String> {
        self.lease.holder(&self.conn).await
    }

    async fn unlock(&mut self) -> Result<(), EngineError> {
        self.lease.release(&self.conn).await
    }

    async fn ensure_history(&mut self) -> Result<(), EngineError> {
        self.create_if_missing(&self.history_name.clone()).await?;
        let log = self.log_coll.name().to_string();
        self.create_if_missing(&log).await
    }

    async fn read_history(&mut self) -> Result<Option<Vec<AppliedMigration>>, EngineError> {
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

    async fn apply(&mut self, m: &Migration, ctx: &RecordContext) -> Result<(), StepError> {
        self.run_body(m, Dir::Up, ctx).await
    }

    async fn revert(&mut self, m: &Migration, _applied: &AppliedMigration, ctx: &RecordContext) -> Result<(), StepError> {
        self.run_body(m, Dir::Down, ctx).await
    }

    async fn inspect(&mut self) -> Result<Snapshot, EngineError> {
        self.snapshot().await
    }

    /// One document per history collection, `{_id: <history>, at, snapshot:
    /// "<JSON>"}`: the snapshot is stored as JSON text because collection and
    /// index names may contain dots, which make awkward field names.
    async fn save_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), EngineError> {
        let json = serde_json::to_string(snapshot).map_err(|e| EngineError::Unsupported(format!("serialising the schema snapshot: {e}")))?;
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

    /// MongoDB creates databases on first write: this checks the name is free
    /// and returns the URL with the database replaced (credentials and options kept).
    async fn create_scratch(&mut self, name: &str) -> Result<String, EngineError> {
        if name == self.conn.db_name {
            return Err(EngineError::Unsupported(format!("the scratch database cannot be the migration database {name}")));
        }
        let existing = self
            .conn
            .client
            .database(name)
            .list_collection_names()
            .await
            .map_err(|e| self.conn.engine_error(format!("checking that database {name} is free"), &e))?;
        if !existing.is_empty() {
            return Err(EngineError::Unsupported(format!("database {name} already exists ({} collections); choose another name", existing.len())));
        }
        Ok(crate::conn::url_with_database(&self.conn.url, name))
    }

    async fn drop_scratch(&mut self, name: &str) -> Result<(), EngineError> {
        if name == self.conn.db_name {
            return Err(EngineError::Unsupported(format!("refusing to drop the migration database {name}")));
        }
        self.conn.client.database(name).drop().await.map_err(|e| self.conn.engine_error(format!("dropping database {name}"), &e))
    }

    async fn upsert_history(&mut self, entries: &[AppliedMigration]) -> Result<(), EngineError> {
        for a in entries {
            self.history
                .replace_one(doc! { "_id": a.version.number as i64 }, history::to_doc(a))
                .upsert(true)
                .await
                .map_err(|e| self.conn.engine_error(format!("recording {} {} in {}", a.version, a.description, self.history_name), &e))?;
        }
        Ok(())
    }

    async fn delete_history(&mut self, version: u64) -> Result<(), EngineError> {
        self.history
            .delete_one(doc! { "_id": version as i64 })
            .await
            .map_err(|e| self.conn.engine_error(format!("deleting the history entry of {version}"), &e))?;
        Ok(())
    }

    async fn log(&mut self, entry: &LogEntry) -> Result<(), EngineError> {
        self.write_log(entry).await
    }

    async fn close(mut self: Box<Self>) -> Result<(), EngineError> {
        let r = self.lease.release(&self.conn).await;
        let client = self.conn.client.clone();
        drop(self);
        client.shutdown().await;
        r
    }
}
