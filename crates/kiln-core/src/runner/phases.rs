//! The runner's side of zero-downtime changes (DESIGN §4): queueing a
//! backfill after `expand`, running jobs inline, operator control of jobs,
//! and `contract` — refused until the job is done and the remaining count is
//! zero, re-checked under the lock at contract time.

use std::time::Instant;

use chrono::Utc;
use serde::Serialize;

use super::Runner;
use crate::backend::RecordContext;
use crate::error::{EngineError, PlanError, RunError};
use crate::event::Direction;
use crate::jobs::{parts_of, Backfill, Job, JobControl, JobInfo, JobProgress, JobState, JobStore, WorkReport, WorkerOptions};
use crate::model::*;
use crate::plan;
use crate::report::StepReport;

/// A zero-downtime migration `kiln contract` did not contract, and why.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Serialize)]
pub struct ContractWait {
    /// Version.
    pub version: String,
    /// Description.
    pub name: String,
    /// Why it waits, with what to do.
    pub reason: String,
    /// Rows/documents the remaining count found, when it was counted.
    pub remaining: Option<i64>,
}

/// What `kiln contract` did.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Default, Serialize)]
pub struct ContractReport {
    /// Migrations contracted now.
    pub contracted: Vec<StepReport>,
    /// Expanded migrations not contracted, with the reason.
    pub waiting: Vec<ContractWait>,
    /// Milliseconds.
    pub duration_ms: u64,
}

fn no_jobs(engine: &str) -> RunError {
    PlanError::Refused(format!("zero-downtime migrations (expand/backfill/contract) are not available on {engine}")).into()
}

impl<'b> Runner<'b> {
    fn job_store(&mut self) -> Result<&mut dyn JobStore, RunError> {
        let engine = self.backend.capabilities().engine;
        self.backend.engine().jobs().ok_or_else(|| no_jobs(engine))
    }

    /// Every job part in `kiln_jobs` (empty when there is none). Takes no lock.
    pub async fn jobs(&mut self) -> Result<Vec<Job>, RunError> {
        self.backend.flush().await?;
        match self.backend.engine().jobs() {
            Some(store) => Ok(store.list_jobs().await?),
            None => Ok(vec![]),
        }
    }

    /// Apply an operator's change (`kiln jobs pause|resume|cancel|retry|throttle`)
    /// to the job of `version`.
    ///
    /// # Errors
    /// Refused when there is no such job, or when the change applies to none
    /// of its parts (e.g. resuming a job that is not paused); the message says
    /// the job's state.
    pub async fn control_job(&mut self, version: &Version, control: &JobControl) -> Result<JobInfo, RunError> {
        let parts: Vec<Job> = self.jobs().await?.into_iter().filter(|j| j.version == version.number).collect();
        let Some(info) = JobInfo::of(&parts, Utc::now()) else {
            return Err(PlanError::Refused(format!("there is no backfill job for version {version}; `kiln jobs` lists them")).into());
        };
        // Retrying a job that is done walks the whole table again (rows
        // written in the old shape since it finished); a failed or cancelled
        // job continues from its cursor.
        if *control == JobControl::Retry && info.state == JobState::Done {
            let spec = parts[0].spec.clone();
            let store = self.job_store()?;
            let plan = store.plan_backfill(&spec).await?;
            store.replace_jobs(version.number, &parts_of(version.number, &info.name, &spec, &plan)).await?;
        } else {
            let changed = self.job_store()?.control_job(version.number, control).await?;
            if changed == 0 {
                return Err(PlanError::Refused(format!("the job of {version} ({}) is {}: nothing to change", info.name, info.state)).into());
            }
        }
        let log = self.log_entry(LogEvent::Repair, Some((version, &info.name)), None, None, Some(format!("job: {control:?}")));
        self.backend.log(&log).await?;
        let parts: Vec<Job> = self.jobs().await?.into_iter().filter(|j| j.version == version.number).collect();
        JobInfo::of(&parts, Utc::now()).ok_or_else(|| PlanError::Refused(format!("the job of {version} disappeared")).into())
    }

    /// Claim and run backfill parts until none is left (`only`: of one
    /// version) or `opts.stop` is set. Takes no migration lock: workers
    /// coordinate through the job leases.
    pub async fn work(&mut self, opts: &WorkerOptions, only: Option<u64>, progress: &dyn JobProgress) -> Result<WorkReport, RunError> {
        self.backend.flush().await?;
        let store = self.job_store()?;
        store.ensure_jobs().await?;
        Ok(crate::jobs::work_all(store, opts, only, progress).await?)
    }

    /// Queue the backfill of `m`, just expanded. Called under the lock.
    pub(super) async fn queue_backfill(&mut self, m: &Migration, spec: &Backfill) -> Result<(), RunError> {
        // An engine keeping a step's finish open for the next commit (MySQL)
        // cannot write a job beside it: commit the finish first, so the
        // expand is recorded before its job is queued.
        self.backend.flush().await?;
        let name = m.name();
        let store = self.job_store()?;
        let queued = async {
            store.ensure_jobs().await?;
            let plan = store.plan_backfill(spec).await?;
            let parts = parts_of(m.version.number, &name, spec, &plan);
            store.replace_jobs(m.version.number, &parts).await?;
            Ok::<_, EngineError>(plan.total)
        }
        .await;
        match queued {
            Ok(total) => {
                tracing::info!(target: "kiln", version = %m.version, total, "backfill queued");
                Ok(())
            }
            Err(e) => Err(PlanError::Refused(format!(
                "{} was expanded, but its backfill could not be queued: {e}. Fix the cause, then run `kiln up` again: it queues the backfill of every expanded migration that has none (or `kiln down` to roll the expand back)",
                m.display_path(),
            ))
            .into()),
        }
    }

    /// Queue the backfill of every expanded migration that has no job (a run
    /// that died between expand and queueing, or a refused queueing fixed
    /// since). Called under the lock.
    pub(super) async fn queue_missing(&mut self, local: &[Migration], applied: &[AppliedMigration]) -> Result<(), RunError> {
        let expanded: Vec<&Migration> = local
            .iter()
            .filter(|m| m.phases.as_ref().is_some_and(|p| p.backfill.is_some()))
            .filter(|m| applied.iter().any(|a| a.version == m.version && a.state == State::Expanded))
            .collect();
        if expanded.is_empty() {
            return Ok(());
        }
        let jobs = self.jobs().await?;
        for m in expanded {
            if !jobs.iter().any(|j| j.version == m.version.number) {
                let spec = m.phases.as_ref().and_then(|p| p.backfill.clone()).expect("filtered");
                self.queue_backfill(m, &spec).await?;
            }
        }
        Ok(())
    }

    /// Contract expanded migrations (`kiln contract VERSION`, or every ready
    /// one for `kiln up --contract` with `version` `None`). Under the lock, for
    /// each: the backfill job must be done and the remaining count zero —
    /// counted now, since instances of the old application may have written
    /// old-shape rows since the job finished.
    ///
    /// # Errors
    /// With a `version`: refused (nothing run) when it is not expanded or not
    /// ready, saying why; a failing contract part is a [`RunError::Migration`].
    pub async fn contract(&mut self, local: &[Migration], version: Option<&Version>) -> Result<ContractReport, RunError> {
        let started = Instant::now();
        self.check_kinds(local)?;
        let version = version.cloned();
        let guard = self.acquire().await?;
        let this = &mut *self;
        let r: Result<ContractReport, RunError> = async {
            let applied = this.backend.read_history().await?.unwrap_or_default();
            let problems = plan::integrity_problems(local, &applied);
            if !problems.is_empty() {
                return Err(RunError::Plan(problems));
            }
            let mut candidates: Vec<(&Migration, &AppliedMigration)> = Vec::new();
            match &version {
                Some(v) => {
                    let m = local
                        .iter()
                        .find(|m| &m.version == v)
                        .ok_or_else(|| PlanError::UnknownVersion { version: v.to_string(), hint: "`kiln status` lists the migrations".into() })?;
                    if m.phases.is_none() {
                        return Err(PlanError::Refused(format!(
                            "{} is not a zero-downtime migration (it has no expand/contract parts); nothing to contract",
                            m.display_path()
                        ))
                        .into());
                    }
                    match applied.iter().find(|a| a.version == *v) {
                        Some(a) if a.state == State::Expanded => candidates.push((m, a)),
                        Some(a) if a.state == State::Contracted => {}
                        Some(a) => {
                            return Err(
                                PlanError::Refused(format!("{} is {}, not expanded; nothing was contracted", m.display_path(), a.state)).into()
                            )
                        }
                        None => {
                            return Err(PlanError::Refused(format!(
                                "{} is not applied yet: run `kiln up` (expand and backfill) first; nothing was contracted",
                                m.display_path()
                            ))
                            .into())
                        }
                    }
                }
                None => {
                    for a in applied.iter().filter(|a| a.state == State::Expanded) {
                        if let Some(m) = local.iter().find(|m| m.version == a.version) {
                            candidates.push((m, a));
                        }
                    }
                }
            }
            let mut report = ContractReport::default();
            if candidates.is_empty() {
                return Ok(report);
            }
            let jobs = this.jobs().await?;
            let batch = applied.iter().map(|a| a.batch).max().unwrap_or(0) + 1;
            let ctx = RecordContext { batch, actor: this.settings.actor.clone() };
            let mut ready = Vec::new();
            for (m, a) in candidates {
                match this.contract_blocker(m, &jobs).await? {
                    None => ready.push((m, a)),
                    Some(wait) => report.waiting.push(wait),
                }
            }
            if let (Some(_), Some(w)) = (&version, report.waiting.first()) {
                return Err(PlanError::Refused(format!("{}_{}: contract refused: {}; nothing was run", w.version, w.name, w.reason)).into());
            }
            if ready.is_empty() {
                return Ok(report);
            }
            let start = this.log_entry(LogEvent::RunStart, None, Some(batch), None, Some(format!("contract: {}", ready.len())));
            this.backend.log(&start).await?;
            // No step events: the report names what was contracted (a progress
            // line would say "applied").
            for (m, a) in ready {
                let t = Instant::now();
                let body = m.phases.as_ref().and_then(|p| p.contract.clone()).unwrap_or(Body::Sql { file: m.path.clone(), statements: vec![] });
                match this.backend.contract(m, a, &ctx).await {
                    Ok(()) => {
                        let d = t.elapsed();
                        report.contracted.push(StepReport::of(m, &body, d.as_millis() as u64, false));
                    }
                    Err(e) => return Err(this.step_failed(Direction::Up, m, e, &report.contracted, batch).await),
                }
            }
            this.save_snapshot().await;
            let end = this.log_entry(LogEvent::RunEnd, None, Some(batch), None, Some(format!("contract: {} contracted", report.contracted.len())));
            if let Err(e) = this.backend.log(&end).await {
                this.unconfirmed_warning();
                return Err(e.into());
            }
            this.release_held();
            Ok(report)
        }
        .await;
        let mut report = self.release(guard, r).await?;
        report.duration_ms = started.elapsed().as_millis() as u64;
        Ok(report)
    }

    /// Why `m` cannot be contracted now, or `None` when it can.
    async fn contract_blocker(&mut self, m: &Migration, jobs: &[Job]) -> Result<Option<ContractWait>, RunError> {
        let wait = |reason: String, remaining: Option<i64>| {
            Some(ContractWait { version: m.version.text.clone(), name: m.description.clone(), reason, remaining })
        };
        let Some(spec) = m.phases.as_ref().and_then(|p| p.backfill.clone()) else {
            return Ok(None);
        };
        let parts: Vec<Job> = jobs.iter().filter(|j| j.version == m.version.number).cloned().collect();
        let Some(info) = JobInfo::of(&parts, Utc::now()) else {
            return Ok(wait("its backfill was never queued: run `kiln up` to queue it".into(), None));
        };
        match info.state {
            JobState::Done => {}
            JobState::Failed => {
                return Ok(wait(
                    format!(
                        "its backfill failed: {}; fix the cause, then `kiln jobs retry {}`",
                        info.error.as_deref().unwrap_or("no error recorded"),
                        m.version
                    ),
                    None,
                ))
            }
            JobState::Cancelled => return Ok(wait(format!("its backfill was cancelled; `kiln jobs retry {}` queues it again", m.version), None)),
            s => {
                return Ok(wait(
                    format!("its backfill is {s} ({}); wait for it, or run it with `kiln worker` / `kiln up --wait`", info.progress()),
                    None,
                ))
            }
        }
        let remaining = self.job_store()?.count_remaining(&spec).await?;
        if remaining > 0 {
            return Ok(wait(
                format!(
                    "{remaining} row{} still need{} the backfill (the job is done, so something — an instance of the old application? — wrote old-shape rows since); deploy the version that writes both shapes everywhere, then `kiln jobs retry {}` and contract again",
                    if remaining == 1 { "" } else { "s" },
                    if remaining == 1 { "s" } else { "" },
                    m.version
                ),
                Some(remaining),
            ));
        }
        Ok(None)
    }

    /// Cancel the backfill of `version` before its rollback runs (`kiln
    /// down` of an expanded migration), and wait — up to the lease — until no
    /// worker holds a part, so no batch runs against what the rollback drops.
    pub(super) async fn cancel_for_rollback(&mut self, version: u64) -> Result<(), RunError> {
        self.backend.flush().await?;
        let Some(store) = self.backend.engine().jobs() else {
            return Ok(());
        };
        if store.list_jobs().await?.iter().all(|j| j.version != version) {
            return Ok(());
        }
        store.control_job(version, &JobControl::Cancel).await?;
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let now = Utc::now();
            let busy = store
                .list_jobs()
                .await?
                .into_iter()
                .filter(|j| j.version == version && j.lease_owner.is_some() && j.lease_until.is_some_and(|u| u > now))
                .count();
            if busy == 0 || Instant::now() > deadline {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Status rows with the phase of every expanded migration derived from its
    /// job: `expanded` (queued), `backfilling`, `backfilled` (done), or
    /// `backfill-failed` / `backfill-paused` / `backfill-cancelled`, with the
    /// job's progress.
    pub(super) async fn with_phases(&mut self, mut rows: Vec<plan::StatusRow>) -> Result<Vec<plan::StatusRow>, RunError> {
        if !rows.iter().any(|r| r.state == State::Expanded.as_str()) {
            return Ok(rows);
        }
        let jobs = self.jobs().await?;
        let infos = JobInfo::all(&jobs, Utc::now());
        for row in rows.iter_mut().filter(|r| r.state == State::Expanded.as_str()) {
            if let Some(info) = infos.iter().find(|i| i.version.parse::<u64>().ok() == Some(row.version_number)) {
                row.state = match info.state {
                    JobState::Queued => "expanded",
                    JobState::Running => "backfilling",
                    JobState::Done => "backfilled",
                    JobState::Paused => "backfill-paused",
                    JobState::Failed => "backfill-failed",
                    JobState::Cancelled => "backfill-cancelled",
                }
                .into();
                row.job = Some(info.clone());
            }
        }
        Ok(rows)
    }
}
