//! The runner: plans under the lock and drives a [`Backend`] step by step.
//!
//! Every mutating operation takes the lock, reads the history *after* the lock
//! is held (so a second runner that waited finds nothing left to do), and
//! releases the lock on every path, errors included.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;

use crate::backend::{RecordContext, StepError};
use crate::engine::Engine;
use crate::error::{EngineError, PlanError, RunError};
use crate::event::{Direction, Event, Observer, Silent};
use crate::lock::LockGuard;
use crate::model::*;
use crate::plan::{self, DownTarget, Policy, StatusRow, UpTarget};
use crate::schema::{self, Change, Contract, Snapshot};
use crate::session::Session;

mod phases;

pub use crate::report::{
    AdminAction, AdminChange, AdminReport, CheckChanged, CheckFailed, CheckPending, CheckReport, Problem, RunReport, StepReport,
};
pub use phases::{ContractReport, ContractWait};

/// Settings of a runner.
#[derive(Clone, Debug)]
pub struct RunnerSettings {
    /// How long to wait for another runner's lock.
    pub lock_timeout: Duration,
    /// `user@host` recorded as the actor.
    pub actor: String,
}

impl Default for RunnerSettings {
    fn default() -> Self {
        RunnerSettings { lock_timeout: Duration::from_secs(60), actor: current_actor() }
    }
}

/// Drives one backend.
pub struct Runner<'b> {
    backend: Session<'b>,
    settings: RunnerSettings,
    observer: Arc<dyn Observer>,
    contract: Option<Arc<Contract>>,
    target: Option<String>,
    /// `StepFinished` events held until their step is durable, each with the
    /// session's durable-step count it needs (see [`Session::durable_steps`]).
    held: std::collections::VecDeque<(u64, Event)>,
}

impl<'b> Runner<'b> {
    /// A runner over `backend`.
    pub fn new(engine: &'b mut dyn Engine, settings: RunnerSettings) -> Self {
        Runner { backend: Session::new(engine), settings, observer: Arc::new(Silent), contract: None, target: None, held: Default::default() }
    }

    /// Validate every migration of `up` against `contract` before it commits: a
    /// migration that breaks something the contract requires (and the database
    /// had), or that brings the database to its newest version without
    /// satisfying the contract, fails and is rolled back where the engine allows.
    pub fn with_contract(mut self, contract: Option<Arc<Contract>>) -> Self {
        self.contract = contract;
        self
    }

    /// Send events to `observer`.
    pub fn with_observer(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observer = observer;
        self
    }

    /// Label every event of this runner with `target` (a tenant's name, a
    /// database of several), see [`Observer::on_targeted`].
    pub fn with_target(mut self, target: impl Into<String>) -> Self {
        self.target = Some(target.into());
        self
    }

    fn emit(&self, e: Event) {
        // `--log-level debug` shows kiln's own decisions: lock, plan, each step's timing.
        tracing::debug!(target: "kiln", database = self.target.as_deref().unwrap_or(""), event = ?e);
        self.observer.on_targeted(self.target.as_deref(), &e);
    }

    /// Report a finished step once it is durable: a database server that
    /// crashes right after can no longer undo what was reported as applied.
    fn hold(&mut self, e: Event) {
        let need = self.backend.finished_steps();
        self.held.push_back((need, e));
        self.release_held();
    }

    /// Emit every held event whose step is durable now.
    fn release_held(&mut self) {
        let durable = self.backend.durable_steps();
        while self.held.front().is_some_and(|(need, _)| *need <= durable) {
            let (_, e) = self.held.pop_front().expect("checked");
            self.emit(e);
        }
    }

    /// After the connection was lost: say which finished steps were never
    /// confirmed on disk, instead of reporting them as applied.
    fn unconfirmed_warning(&mut self) {
        self.release_held();
        let versions: Vec<String> = self
            .held
            .drain(..)
            .filter_map(|(_, e)| match e {
                Event::StepFinished { version, name, .. } => Some(format!("{version}_{name}")),
                _ => None,
            })
            .collect();
        if !versions.is_empty() {
            self.emit(Event::Warning {
                message: format!(
                    "{} finished just before the connection was lost, but the database had not confirmed {} on disk; a server crash may have undone {}: `kiln status` shows what it kept",
                    versions.join(", "),
                    if versions.len() == 1 { "it" } else { "them" },
                    if versions.len() == 1 { "it" } else { "them" }
                ),
            });
        }
    }

    fn check_kinds(&self, local: &[Migration]) -> Result<(), RunError> {
        let caps = self.backend.capabilities().clone();
        let wrong: Vec<PlanError> = local
            .iter()
            .filter(|m| m.kind != caps.kind && m.kind != Kind::Code)
            .map(|m| PlanError::WrongKind {
                file: m.display_path(),
                kind: match m.kind {
                    Kind::Sql => "SQL".into(),
                    Kind::Commands => "MongoDB command".into(),
                    Kind::Code => "code".into(),
                },
                engine: caps.engine.into(),
            })
            .chain(
                local
                    .iter()
                    .filter(|m| m.version.number > i64::MAX as u64)
                    .map(|m| PlanError::VersionTooLarge { file: m.display_path(), version: m.version.text.clone() }),
            )
            .collect();
        if wrong.is_empty() {
            Ok(())
        } else {
            Err(RunError::Plan(wrong))
        }
    }

    /// Take the lock (waiting up to the lock time-out). The guard releases it
    /// if the returned future is dropped before [`Runner::release`] runs.
    async fn acquire(&mut self) -> Result<LockGuard, RunError> {
        let observer = self.observer.clone();
        let timeout = self.settings.lock_timeout;
        let target = self.target.clone();
        tracing::debug!(target: "kiln", ?timeout, "taking the migration lock");
        let started = Instant::now();
        let guard = self
            .backend
            .lock(timeout, |holder| {
                tracing::debug!(target: "kiln", holder, "lock held by another runner; waiting");
                observer.on_targeted(target.as_deref(), &Event::LockWaiting { holder: holder.to_string(), timeout })
            })
            .await?;
        tracing::debug!(target: "kiln", waited = ?started.elapsed(), "lock taken");
        self.emit(Event::LockAcquired);
        Ok(guard)
    }

    /// Release the lock on every path, keeping `result`'s error first.
    async fn release<T>(&mut self, guard: LockGuard, result: Result<T, RunError>) -> Result<T, RunError> {
        let unlocked = self.backend.unlock(guard).await;
        match (result, unlocked) {
            (Ok(v), Ok(())) => Ok(v),
            (Ok(_), Err(e)) => Err(e.into()),
            (Err(e), _) => Err(e),
        }
    }

    fn log_entry(&self, event: LogEvent, m: Option<(&Version, &str)>, batch: Option<i64>, reason: Option<&str>, detail: Option<String>) -> LogEntry {
        LogEntry {
            at: Utc::now(),
            event,
            version: m.map(|(v, _)| v.number),
            name: m.map(|(_, n)| n.to_string()),
            batch,
            actor: self.settings.actor.clone(),
            reason: reason.map(str::to_string),
            detail,
        }
    }

    /// The history, or an empty one when kiln never ran here. Takes no lock and
    /// creates nothing.
    pub async fn history(&mut self) -> Result<Vec<AppliedMigration>, RunError> {
        Ok(self.backend.read_history().await?.unwrap_or_default())
    }

    /// Every migration with its state (`kiln status`). Changes nothing.
    pub async fn status(&mut self, local: &[Migration]) -> Result<Vec<StatusRow>, RunError> {
        let applied = self.history().await?;
        let rows = plan::status(local, &applied);
        self.with_phases(rows).await
    }

    /// Apply pending migrations (`kiln up`). One call is one batch.
    ///
    /// # Errors
    /// [`RunError::Plan`] lists every reason the plan was refused (nothing ran);
    /// [`RunError::Migration`] names the failed migration, what it left behind and
    /// what was applied before it.
    pub async fn up(&mut self, local: &[Migration], target: &UpTarget, policy: &Policy, dry_run: bool) -> Result<RunReport, RunError> {
        let started = Instant::now();
        self.check_kinds(local)?;
        // Fast path without the lock: when the history exists and nothing is
        // pending, there is nothing to wait for (the cost every application pays
        // at boot). Any problem goes through the locked path, because another
        // runner may be in the middle of a migration.
        let history = self.backend.read_history().await?;
        if history.as_ref().is_none_or(|h| h.is_empty()) {
            self.refuse_foreign_history().await?;
        }
        if dry_run {
            let applied = history.unwrap_or_default();
            let p = plan::plan_up(local, &applied, target, policy).map_err(RunError::Plan)?;
            return Ok(RunReport {
                direction: Direction::Up,
                batch: (!p.steps.is_empty()).then_some(p.batch),
                steps: p.steps.iter().map(|m| StepReport::of(m, &m.up, 0, true)).collect(),
                dry_run: true,
                duration_ms: started.elapsed().as_millis() as u64,
            });
        }
        // (Expanded migrations take the locked path: it queues a backfill a
        // dead run left unqueued.)
        if let Some(applied) = history.as_ref().filter(|h| !h.iter().any(|a| a.state == State::Expanded)) {
            if let Ok(p) = plan::plan_up(local, applied, target, policy) {
                if p.steps.is_empty() {
                    return Ok(RunReport {
                        direction: Direction::Up,
                        batch: None,
                        steps: vec![],
                        dry_run: false,
                        duration_ms: started.elapsed().as_millis() as u64,
                    });
                }
            }
        }
        let target = target.clone();
        let policy = policy.clone();
        let mut report = async {
            let guard = self.acquire().await?;
            let this = &mut *self;
            let r: Result<_, RunError> = async {
                this.backend.ensure_history().await?;
                let applied = this.backend.read_history().await?.unwrap_or_default();
                let p = plan::plan_up(local, &applied, &target, &policy).map_err(RunError::Plan)?;
                this.queue_missing(local, &applied).await?;
                this.emit(Event::Planned { direction: Direction::Up, steps: p.steps.len(), batch: Some(p.batch) });
                if p.steps.is_empty() {
                    return Ok(RunReport { direction: Direction::Up, batch: None, steps: vec![], dry_run: false, duration_ms: 0 });
                }
                let ctx = RecordContext { batch: p.batch, actor: this.settings.actor.clone() };
                let start = this.log_entry(LogEvent::RunStart, None, Some(p.batch), None, Some(format!("up: {} pending", p.steps.len())));
                this.backend.log(&start).await?;
                let total = p.steps.len();
                let mut done: Vec<StepReport> = Vec::with_capacity(total);
                // With a contract, each migration is checked before it commits.
                let reaches_head = target == UpTarget::Latest && policy.group.is_none();
                let contract = this.contract.clone();
                let mut before: Option<Snapshot> = match &contract {
                    Some(_) => this.backend.inspect().await?,
                    None => None,
                };
                for (i, m) in p.steps.iter().enumerate() {
                    this.emit(Event::StepStarted {
                        direction: Direction::Up,
                        version: m.version.text.clone(),
                        name: m.description.clone(),
                        index: i + 1,
                        total,
                    });
                    let t = Instant::now();
                    let result = match (&contract, before.take()) {
                        (Some(c), Some(prev)) => {
                            let last = reaches_head && i + 1 == total;
                            let seen = std::sync::Arc::new(std::sync::Mutex::new(None::<Snapshot>));
                            let seen2 = seen.clone();
                            let c2 = c.clone();
                            let check = move |s: &Snapshot| {
                                *seen2.lock().expect("not poisoned") = Some(s.clone());
                                if last {
                                    schema::validate(&c2, s).into_iter().filter(|v| v.severity == schema::Severity::Error).collect()
                                } else {
                                    schema::regressions(&c2, &prev, s)
                                }
                            };
                            let r = this.backend.apply(m, &ctx, Some(&check)).await;
                            before = seen.lock().expect("not poisoned").take();
                            if before.is_none() && r.is_ok() {
                                before = this.backend.inspect().await?;
                            }
                            r
                        }
                        _ => this.backend.apply(m, &ctx, None).await,
                    };
                    match result {
                        Ok(()) => {
                            let d = t.elapsed();
                            this.hold(Event::StepFinished {
                                direction: Direction::Up,
                                version: m.version.text.clone(),
                                name: m.description.clone(),
                                duration: d,
                            });
                            done.push(StepReport::of(m, &m.up, d.as_millis() as u64, false));
                            if let Some(spec) = m.phases.as_ref().and_then(|ph| ph.backfill.as_ref()) {
                                if let Err(e) = this.queue_backfill(m, spec).await {
                                    let end = this.log_entry(
                                        LogEvent::RunEnd,
                                        None,
                                        Some(p.batch),
                                        None,
                                        Some(format!("up: {} applied, backfill of {} not queued", done.len(), m.name())),
                                    );
                                    let _ = this.backend.log(&end).await;
                                    this.unconfirmed_warning();
                                    return Err(e);
                                }
                            }
                        }
                        Err(e) => return Err(this.step_failed(Direction::Up, m, e, &done, p.batch).await),
                    }
                }
                this.save_snapshot().await;
                let end = this.log_entry(LogEvent::RunEnd, None, Some(p.batch), None, Some(format!("up: {} applied", done.len())));
                if let Err(e) = this.backend.log(&end).await {
                    // also makes every commit of the run durable
                    this.unconfirmed_warning();
                    return Err(e.into());
                }
                this.release_held();
                Ok(RunReport { direction: Direction::Up, batch: Some(p.batch), steps: done, dry_run: false, duration_ms: 0 })
            }
            .await;
            self.release(guard, r).await
        }
        .await?;
        report.duration_ms = started.elapsed().as_millis() as u64;
        Ok(report)
    }

    async fn step_failed(&mut self, dir: Direction, m: &Migration, e: StepError, done: &[StepReport], batch: i64) -> RunError {
        let done_versions: Vec<Version> = done.iter().filter_map(|s| Version::parse_arg(&s.version)).collect();
        if !done.is_empty() {
            self.save_snapshot().await;
        }
        let failed = |message: String| Event::StepFailed { direction: dir, version: m.version.text.clone(), name: m.description.clone(), message };
        // The run-end commit is durable: it confirms the steps before the
        // failure, which are reported (as applied) before the failure itself.
        match e {
            StepError::Invalid { violations, outcome } => {
                let message = violations.iter().map(|v| v.to_string()).collect::<Vec<_>>().join("; ");
                let fail = self.log_entry(
                    LogEvent::Failed,
                    Some((&m.version, &m.description)),
                    Some(batch),
                    None,
                    Some(format!("schema validation: {message}")),
                );
                let _ = self.backend.log(&fail).await;
                let end = self.log_entry(
                    LogEvent::RunEnd,
                    None,
                    Some(batch),
                    None,
                    Some(format!("{} done, stopped at {}: schema invalid", done.len(), m.name())),
                );
                let _ = self.backend.log(&end).await;
                self.unconfirmed_warning();
                self.emit(failed(message));
                RunError::Invalid { version: m.version.clone(), file: m.display_path(), outcome, violations, done: done_versions }
            }
            StepError::Body(a) => {
                let end = self.log_entry(
                    LogEvent::RunEnd,
                    None,
                    Some(batch),
                    None,
                    Some(format!("{}: {} done, stopped at {}", if dir == Direction::Up { "up" } else { "down" }, done.len(), m.name())),
                );
                // The failure itself is logged by the backend; this commit makes the run durable.
                let _ = self.backend.log(&end).await;
                self.unconfirmed_warning();
                self.emit(failed(a.error.to_string()));
                RunError::Migration { version: m.version.clone(), outcome: a.outcome, error: a.error, done: done_versions }
            }
            StepError::Engine(e) => {
                self.unconfirmed_warning();
                self.emit(failed(e.to_string()));
                RunError::Engine(e)
            }
        }
    }

    /// Store the live schema as the drift reference. A failure here does not undo
    /// the run: it is reported as a warning event.
    async fn save_snapshot(&mut self) {
        let r = match self.backend.inspect().await {
            Ok(Some(s)) => self.backend.save_snapshot(&s).await,
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => {}
            Err(e) => self.emit(Event::Warning { message: format!("could not store the schema snapshot for drift detection: {e}") }),
        }
    }

    /// Run `work` — a change made outside the migration files, such as
    /// `kiln sync`'s index changes — as a kiln run: under the migration lock
    /// (so it never races `up`), then store the schema snapshot, so `kiln check`
    /// and `kiln diff` compare against the result instead of calling it drift.
    /// `changed` tells from `work`'s result whether anything changed (no
    /// snapshot is stored otherwise).
    ///
    /// # Errors
    /// A lock time-out, or `work`'s error (the lock is released either way).
    pub async fn locked<T, F>(&mut self, work: F, changed: impl FnOnce(&T) -> bool) -> Result<T, RunError>
    where
        F: std::future::Future<Output = Result<T, RunError>>,
    {
        let guard = self.acquire().await?;
        let r = work.await;
        if let Ok(v) = &r {
            if changed(v) && self.backend.read_history().await.map(|h| h.is_some()).unwrap_or(false) {
                self.save_snapshot().await;
            }
        }
        self.release(guard, r).await
    }

    /// The live schema (kiln's own objects excluded).
    pub async fn inspect(&mut self) -> Result<Snapshot, RunError> {
        self.live().await
    }

    /// The live schema, or an error saying this engine cannot inspect.
    async fn live(&mut self) -> Result<Snapshot, RunError> {
        match self.backend.inspect().await? {
            Some(s) => Ok(s),
            None => Err(PlanError::Refused(format!("schema inspection is not available for {}", self.backend.capabilities().engine)).into()),
        }
    }

    /// What changed in the live schema since the snapshot stored by the last run;
    /// `None` when no snapshot was stored yet.
    pub async fn diff(&mut self) -> Result<Option<Vec<Change>>, RunError> {
        let Some(stored) = self.backend.load_snapshot().await? else {
            return Ok(None);
        };
        let live = self.live().await?;
        Ok(Some(schema::diff(&stored, &live)))
    }

    /// Everything that should stop an application from starting (`kiln check`):
    /// pending, failed or changed migrations, plan problems, contract errors and
    /// drift. Takes no lock and changes nothing.
    pub async fn check(&mut self, local: &[Migration], contract: Option<&Contract>) -> Result<CheckReport, RunError> {
        self.check_kinds(local)?;
        let history = self.backend.read_history().await?;
        let applied = history.clone().unwrap_or_default();
        let mut r = CheckReport {
            ok: true,
            pending: vec![],
            failed: vec![],
            changed: vec![],
            problems: vec![],
            violations: vec![],
            drift: vec![],
            snapshot_found: false,
            contract_checked: contract.is_some(),
        };
        for row in plan::status(local, &applied) {
            let (version, name) = (row.version.clone(), row.name.clone());
            match row.state.as_str() {
                "pending" => r.pending.push(CheckPending { version: version.clone(), name: name.clone(), out_of_order: row.out_of_order }),
                "failed" | "running" => r.failed.push(CheckFailed {
                    version: version.clone(),
                    name: name.clone(),
                    state: row.state.clone(),
                    error: row.error.as_ref().map(|e| e.message.clone()),
                }),
                "missing" => r.changed.push(CheckChanged { version: version.clone(), name: name.clone(), missing: true }),
                _ => {}
            }
            if row.checksum_ok == Some(false) {
                r.changed.push(CheckChanged { version, name, missing: false });
            }
        }
        for p in plan::dependency_problems(local, &applied) {
            r.problems.push(Problem { code: p.code(), message: p.to_string() });
        }
        let needs_schema = contract.is_some() || history.is_some();
        let live = if needs_schema {
            match contract {
                Some(_) => Some(self.live().await?),
                None => self.backend.inspect().await?,
            }
        } else {
            None
        };
        if let (Some(c), Some(live)) = (contract, &live) {
            r.violations = schema::validate(c, live);
        }
        if let (Some(_), Some(live)) = (&history, &live) {
            match self.backend.load_snapshot().await {
                Ok(Some(stored)) => {
                    r.snapshot_found = true;
                    r.drift = schema::diff(&stored, live);
                }
                Ok(None) => {}
                Err(e) => return Err(e.into()),
            }
        }
        r.ok = r.pending.is_empty()
            && r.failed.is_empty()
            && r.changed.is_empty()
            && r.problems.is_empty()
            && !schema::has_errors(&r.violations)
            && r.drift.is_empty();
        Ok(r)
    }

    /// Revert applied migrations (`kiln down`).
    ///
    /// # Errors
    /// As [`Runner::up`]; nothing is reverted unless every chosen migration can be.
    pub async fn down(&mut self, local: &[Migration], target: &DownTarget, dry_run: bool) -> Result<RunReport, RunError> {
        self.down_group(local, target, None, dry_run).await
    }

    /// [`Runner::down`] over one group's migrations (`kiln down --group G`):
    /// see [`plan::plan_down_group`].
    pub async fn down_group(&mut self, local: &[Migration], target: &DownTarget, group: Option<&str>, dry_run: bool) -> Result<RunReport, RunError> {
        let started = Instant::now();
        self.check_kinds(local)?;
        if dry_run {
            let applied = self.history().await?;
            let p = plan::plan_down_group(local, &applied, target, group).map_err(RunError::Plan)?;
            return Ok(RunReport {
                direction: Direction::Down,
                batch: None,
                steps: p.steps.iter().map(|(m, _)| StepReport::of(m, m.down.as_ref().expect("planned"), 0, true)).collect(),
                dry_run: true,
                duration_ms: started.elapsed().as_millis() as u64,
            });
        }
        let target = target.clone();
        let group = group.map(str::to_string);
        let mut report = async {
            let guard = self.acquire().await?;
            let this = &mut *self;
            let r: Result<_, RunError> = async {
                let Some(applied) = this.backend.read_history().await? else {
                    return Ok(RunReport { direction: Direction::Down, batch: None, steps: vec![], dry_run: false, duration_ms: 0 });
                };
                let p = plan::plan_down_group(local, &applied, &target, group.as_deref()).map_err(RunError::Plan)?;
                this.emit(Event::Planned { direction: Direction::Down, steps: p.steps.len(), batch: None });
                if p.steps.is_empty() {
                    return Ok(RunReport { direction: Direction::Down, batch: None, steps: vec![], dry_run: false, duration_ms: 0 });
                }
                let batch = p.steps[0].1.batch;
                let ctx = RecordContext { batch, actor: this.settings.actor.clone() };
                let start = this.log_entry(LogEvent::RunStart, None, Some(batch), None, Some(format!("down: {} to revert", p.steps.len())));
                this.backend.log(&start).await?;
                let total = p.steps.len();
                let mut done = Vec::with_capacity(total);
                for (i, (m, a)) in p.steps.iter().enumerate() {
                    this.emit(Event::StepStarted {
                        direction: Direction::Down,
                        version: m.version.text.clone(),
                        name: m.description.clone(),
                        index: i + 1,
                        total,
                    });
                    let t = Instant::now();
                    if a.state == State::Expanded {
                        this.cancel_for_rollback(m.version.number).await?;
                    }
                    match this.backend.revert(m, a, &ctx).await {
                        Ok(()) => {
                            let d = t.elapsed();
                            this.hold(Event::StepFinished {
                                direction: Direction::Down,
                                version: m.version.text.clone(),
                                name: m.description.clone(),
                                duration: d,
                            });
                            done.push(StepReport::of(m, m.down.as_ref().expect("planned"), d.as_millis() as u64, false));
                        }
                        Err(e) => return Err(this.step_failed(Direction::Down, m, e, &done, batch).await),
                    }
                }
                this.save_snapshot().await;
                let end = this.log_entry(LogEvent::RunEnd, None, Some(batch), None, Some(format!("down: {} reverted", done.len())));
                if let Err(e) = this.backend.log(&end).await {
                    this.unconfirmed_warning();
                    return Err(e.into());
                }
                this.release_held();
                Ok(RunReport { direction: Direction::Down, batch: None, steps: done, dry_run: false, duration_ms: 0 })
            }
            .await;
            self.release(guard, r).await
        }
        .await?;
        report.duration_ms = started.elapsed().as_millis() as u64;
        Ok(report)
    }

    /// Record every migration up to `version` as applied without running it
    /// (`kiln baseline`), for databases that existed before kiln.
    ///
    /// # Errors
    /// Refused when the history already records applied migrations.
    pub async fn baseline(&mut self, local: &[Migration], version: &Version, reason: Option<&str>) -> Result<AdminReport, RunError> {
        self.check_kinds(local)?;
        let version = version.clone();
        let reason = reason.map(str::to_string);
        {
            let guard = self.acquire().await?;
            let this = &mut *self;
            let r: Result<_, RunError> = async {
                this.backend.ensure_history().await?;
                let applied = this.backend.read_history().await?.unwrap_or_default();
                if let Some(a) = applied.iter().find(|a| a.state != State::Retired) {
                    return Err(PlanError::Refused(format!(
                        "the history already records migrations (e.g. {} {} is {}); baseline is for databases that existed before kiln",
                        a.version, a.description, a.state
                    ))
                    .into());
                }
                let batch = plan::next_batch(&applied);
                let now = Utc::now();
                let actor = this.settings.actor.clone();
                let mk = |v: &Version, desc: &str, script: String, checksum: Checksum, group: Option<String>| {
                    baseline_entry(v, desc, script, checksum, group, batch, now, &actor)
                };
                let order = plan::ToolOrder::of(local);
                let mut entries: Vec<AppliedMigration> = local
                    .iter()
                    .filter(|m| order.key(&m.version) <= order.key(&version))
                    .filter(|m| !applied.iter().any(|a| a.version == m.version))
                    .map(|m| mk(&m.version, &m.description, m.display_path(), m.checksum.clone(), m.directives.group.clone()))
                    .collect();
                if !local.iter().any(|m| m.version == version) {
                    entries.push(mk(&version, "<< baseline >>", String::new(), Checksum(String::new()), None));
                }
                this.backend.put_history(&entries, None).await?;
                this.save_snapshot().await;
                let changes: Vec<AdminChange> =
                    entries.iter().map(|e| AdminChange::Baseline { version: e.version.to_string(), name: e.description.clone() }).collect();
                let entry = this.log_entry(
                    LogEvent::Baseline,
                    Some((&version, "")),
                    Some(batch),
                    reason.as_deref(),
                    Some(format!("{} migrations up to {} recorded as baseline", entries.len(), version)),
                );
                this.backend.log(&entry).await?;
                Ok(AdminReport { action: AdminAction::Baseline, changes })
            }
            .await;
            self.release(guard, r).await
        }
    }

    /// On a database kiln never migrated: stop when another tool's history
    /// lists applied migrations, which `up` would run a second time.
    async fn refuse_foreign_history(&mut self) -> Result<(), RunError> {
        match self.foreign_history_note().await? {
            Some(note) => Err(PlanError::Refused(note).into()),
            None => Ok(()),
        }
    }

    /// What `kiln up` would say about another tool's history on this
    /// database (see [`Runner::adopt`]), or `None` when there is none with
    /// applied migrations. Reads only; meant for a database whose kiln
    /// history is empty (`kiln status` shows it as a hint).
    ///
    /// # Errors
    /// The engine's.
    pub async fn foreign_history_note(&mut self) -> Result<Option<String>, RunError> {
        let Some(reader) = self.backend.engine().foreign() else { return Ok(None) };
        let (tool, table, count) = match crate::adopt::read_foreign(reader).await? {
            None => return Ok(None),
            Some(Err(e)) => return Ok(Some(format!("this database holds another tool's history that kiln cannot take over as it is: {e}"))),
            Some(Ok(h)) if h.applied.is_empty() && h.upto.is_none_or(|v| v == 0) => return Ok(None),
            Some(Ok(h)) => {
                (h.tool, h.table.clone(), h.upto.map(|v| format!("up to version {v}")).unwrap_or_else(|| format!("{} migrations", h.applied.len())))
            }
        };
        Ok(Some(format!(
            "this database was migrated by {} ({table} records {count} as applied) and kiln's history is empty, so `kiln up` would run them again. \
             Run `kiln adopt` first: it records them as baseline in kiln's history (and leaves {table} as it is); then `kiln up` runs only the rest",
            tool.name()
        )))
    }

    /// Take over another tool's history (`kiln adopt`): read its table,
    /// record the migrations it applied as `baseline` with the checksums of
    /// today's files, and report files it fingerprinted that changed since.
    /// The other tool's table is read, never changed. Running it again adopts
    /// only what is not recorded yet.
    ///
    /// # Errors
    /// No other tool's history in the database; a dirty or failed entry there
    /// (nothing is recorded then); the engine's.
    pub async fn adopt(
        &mut self,
        local: &[Migration],
        dir: &Path,
        dry_run: bool,
        reason: Option<&str>,
    ) -> Result<crate::adopt::AdoptReport, RunError> {
        let reason = reason.map(str::to_string);
        let guard = self.acquire().await?;
        let this = &mut *self;
        let r: Result<_, RunError> = async {
            let target = this.backend.target();
            let Some(reader) = this.backend.engine().foreign() else {
                return Err(PlanError::Refused(format!("kiln cannot read other tools' history tables on {target}")).into());
            };
            let foreign = match crate::adopt::read_foreign(reader).await? {
                None => {
                    return Err(PlanError::Refused(format!(
                        "no other tool's history in {target}: kiln looked for {} (in the schema kiln's own history goes to); nothing adopted",
                        crate::adopt::FOREIGN_TABLES.join(", ")
                    ))
                    .into())
                }
                Some(Err(e)) => return Err(PlanError::Refused(e.to_string()).into()),
                Some(Ok(h)) => h,
            };
            let applied = this.backend.read_history().await?.unwrap_or_default();
            let recorded: Vec<u64> = applied.iter().map(|a| a.version.number).collect();
            let p = crate::adopt::plan_adopt(local, dir, &foreign, &recorded);
            let mut report = crate::adopt::AdoptReport {
                tool: p.tool,
                table: p.table.clone(),
                adopted: p
                    .adopt
                    .iter()
                    .map(|m| crate::adopt::Adopted { version: m.version.to_string(), name: m.description.clone(), file: m.display_path() })
                    .collect(),
                already: p.already,
                changed: p.changed.clone(),
                missing: p.missing.clone(),
                dry_run,
            };
            if dry_run || p.adopt.is_empty() {
                return Ok(report);
            }
            this.backend.ensure_history().await?;
            let batch = plan::next_batch(&applied);
            let now = Utc::now();
            let entries: Vec<AppliedMigration> = p
                .adopt
                .iter()
                .map(|m| {
                    baseline_entry(
                        &m.version,
                        &m.description,
                        m.display_path(),
                        m.checksum.clone(),
                        m.directives.group.clone(),
                        batch,
                        now,
                        &this.settings.actor,
                    )
                })
                .collect();
            let mut detail = format!("{} migrations adopted from {} ({}) as baseline", entries.len(), foreign.tool.name(), foreign.table);
            if !p.changed.is_empty() {
                let files: Vec<&str> = p.changed.iter().map(|c| c.file.as_str()).collect();
                detail.push_str(&format!("; changed since {} applied them: {}", foreign.tool.name(), files.join(", ")));
            }
            let entry = this.log_entry(LogEvent::Baseline, None, Some(batch), reason.as_deref(), Some(detail));
            this.backend.put_history(&entries, Some(&entry)).await?;
            this.save_snapshot().await;
            report.dry_run = false;
            Ok(report)
        }
        .await;
        self.release(guard, r).await
    }

    /// Retire a migration (`kiln retire`): record it as retired, then rename its
    /// file(s) under `dir` to `….retired` so it is never loaded again.
    pub async fn retire(&mut self, local: &[Migration], dir: &Path, version: &Version, reason: &str) -> Result<AdminReport, RunError> {
        let version = version.clone();
        let reason = reason.to_string();
        let dir = dir.to_path_buf();
        {
            let guard = self.acquire().await?;
            let this = &mut *self;
            let r: Result<_, RunError> = async {
                this.backend.ensure_history().await?;
                let applied = this.backend.read_history().await?.unwrap_or_default();
                let file = local.iter().find(|m| m.version == version);
                let rec = applied.iter().find(|a| a.version == version);
                let entry = match (file, rec) {
                    (_, Some(a)) if a.state == State::Retired => {
                        return Err(PlanError::Refused(format!("migration {version} is already retired")).into())
                    }
                    (_, Some(a)) => AppliedMigration { state: State::Retired, error: None, ..a.clone() },
                    (Some(m), None) => AppliedMigration {
                        version: m.version.clone(),
                        description: m.description.clone(),
                        script: m.display_path(),
                        group: m.directives.group.clone(),
                        checksum: m.checksum.clone(),
                        state: State::Retired,
                        batch: 0,
                        applied_at: Utc::now(),
                        duration_ms: 0,
                        applied_by: this.settings.actor.clone(),
                        kiln_version: KILN_VERSION.into(),
                        error: None,
                    },
                    (None, None) => {
                        return Err(PlanError::UnknownVersion { version: version.to_string(), hint: "no file and no history entry".into() }.into())
                    }
                };
                let old = rec.map(|a| a.state.to_string()).unwrap_or_else(|| "pending".into());
                this.backend.put_history(std::slice::from_ref(&entry), None).await?;
                let mut changes =
                    vec![AdminChange::Retired { version: entry.version.to_string(), name: entry.description.clone(), was: old.clone() }];
                if let Some(m) = file {
                    for p in files_of(m) {
                        let from = dir.join(&p);
                        let mut to = from.clone().into_os_string();
                        to.push(".retired");
                        std::fs::rename(&from, &to).map_err(|e| EngineError::Query {
                            context: format!("recorded {version} as retired but could not rename {}", p.display()),
                            message: format!("{e}; rename it to {}.retired by hand", p.display()),
                        })?;
                        changes.push(AdminChange::Renamed { from: p.display().to_string(), to: format!("{}.retired", p.display()) });
                    }
                }
                let log =
                    this.log_entry(LogEvent::Retire, Some((&entry.version, &entry.description)), None, Some(&reason), Some(format!("was {old}")));
                this.backend.log(&log).await?;
                Ok(AdminReport { action: AdminAction::Retire, changes })
            }
            .await;
            self.release(guard, r).await
        }
    }

    /// Accept deliberate changes (`kiln repair`): realign changed checksums and
    /// clear failed or interrupted entries — all of them, or one version's.
    /// A cleared entry is deleted (the migration is pending again), or with
    /// `mark_applied` recorded as applied (it was completed by hand).
    pub async fn repair(
        &mut self,
        local: &[Migration],
        version: Option<&Version>,
        mark_applied: bool,
        reason: &str,
    ) -> Result<AdminReport, RunError> {
        let version = version.cloned();
        let reason = reason.to_string();
        {
            let guard = self.acquire().await?;
            let this = &mut *self;
            let r: Result<_, RunError> = async {
                let applied = this.backend.read_history().await?.unwrap_or_default();
                if let Some(v) = &version {
                    if !applied.iter().any(|a| &a.version == v) {
                        return Err(PlanError::UnknownVersion {
                            version: v.to_string(),
                            hint: "it is not recorded in the history, so there is nothing to repair".into(),
                        }
                        .into());
                    }
                }
                let mut changes = Vec::new();
                for a in &applied {
                    if let Some(v) = &version {
                        if &a.version != v {
                            continue;
                        }
                    }
                    let file = local.iter().find(|m| m.version == a.version);
                    let name = a.description.clone();
                    match a.state {
                        State::Failed | State::Running => {
                            if mark_applied {
                                // A zero-downtime migration completed by hand has
                                // completed its expand: it is `expanded`, and its
                                // backfill is queued below, as `up` would have.
                                let state = if file.is_some_and(|m| m.phases.is_some()) { State::Expanded } else { State::Applied };
                                let mut e = AppliedMigration { state, error: None, ..a.clone() };
                                if let Some(m) = file {
                                    e.checksum = m.checksum.clone();
                                }
                                this.backend.put_history(std::slice::from_ref(&e), None).await?;
                                if state == State::Expanded {
                                    this.queue_missing(local, std::slice::from_ref(&e)).await?;
                                }
                                changes.push(AdminChange::MarkedApplied {
                                    version: plan::recorded_version(a).to_string(),
                                    name: name.clone(),
                                    was: a.state,
                                    now: state,
                                });
                            } else {
                                this.backend.delete_history(a.version.number, None).await?;
                                changes.push(AdminChange::Removed {
                                    version: plan::recorded_version(a).to_string(),
                                    name: name.clone(),
                                    was: a.state,
                                });
                            }
                            let detail = format!(
                                "{} -> {}; recorded error: {}",
                                a.state,
                                match (mark_applied, file.is_some_and(|m| m.phases.is_some())) {
                                    (true, true) => "expanded",
                                    (true, false) => "applied",
                                    _ => "removed",
                                },
                                a.error.as_ref().map(|e| e.message.as_str()).unwrap_or("none")
                            );
                            let log = this.log_entry(LogEvent::Repair, Some((&a.version, &name)), Some(a.batch), Some(&reason), Some(detail));
                            this.backend.log(&log).await?;
                        }
                        State::Applied | State::Baseline | State::Expanded | State::Contracted => match file {
                            // An empty recorded checksum (adopted from another tool) is filled in.
                            Some(m) if m.checksum != a.checksum => {
                                let e = AppliedMigration { checksum: m.checksum.clone(), ..a.clone() };
                                this.backend.put_history(std::slice::from_ref(&e), None).await?;
                                changes.push(AdminChange::Checksum {
                                    version: plan::recorded_version(a).to_string(),
                                    name: name.clone(),
                                    from: a.checksum.0.clone(),
                                    to: m.checksum.0.clone(),
                                });
                                let log = this.log_entry(
                                    LogEvent::Repair,
                                    Some((&a.version, &name)),
                                    Some(a.batch),
                                    Some(&reason),
                                    Some(format!("checksum {} -> {}", a.checksum, m.checksum)),
                                );
                                this.backend.log(&log).await?;
                            }
                            None if version.is_some() && !a.script.is_empty() => {
                                return Err(PlanError::Refused(format!(
                                    "the file of {} {} is missing; restore it, or run `{}` to drop it from every plan",
                                    plan::recorded_version(a),
                                    name,
                                    crate::suggest::retire(&plan::recorded_version(a))
                                ))
                                .into())
                            }
                            _ => {}
                        },
                        State::Retired => {}
                    }
                }
                Ok(AdminReport { action: AdminAction::Repair, changes })
            }
            .await;
            self.release(guard, r).await
        }
    }
}

/// The files that make up a migration, relative to the migrations directory.
pub fn files_of(m: &Migration) -> Vec<std::path::PathBuf> {
    let p = m.path.clone();
    let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if let Some(stem) = name.strip_suffix(".up.sql") {
        let down = p.with_file_name(format!("{stem}.down.sql"));
        if m.down.is_some() {
            return vec![p, down];
        }
        return vec![p];
    }
    vec![p]
}

/// A history entry recording a migration as `baseline` (`kiln baseline`,
/// `kiln adopt`): present in the database, never run by kiln.
#[allow(clippy::too_many_arguments)]
fn baseline_entry(
    version: &Version,
    description: &str,
    script: String,
    checksum: Checksum,
    group: Option<String>,
    batch: i64,
    applied_at: chrono::DateTime<Utc>,
    actor: &str,
) -> AppliedMigration {
    AppliedMigration {
        version: version.clone(),
        description: description.to_string(),
        script,
        group,
        checksum,
        state: State::Baseline,
        batch,
        applied_at,
        duration_ms: 0,
        applied_by: actor.to_string(),
        kiln_version: KILN_VERSION.into(),
        error: None,
    }
}
