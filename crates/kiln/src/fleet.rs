//! Multi-tenant fleets (DESIGN §5): a public database plus one database or
//! PostgreSQL schema per tenant, each with its own history, log and lock.
//!
//! The decisions to know:
//! - **Public first, then tenants**, `concurrency` at a time. If the public
//!   database fails, no tenant runs (tenant migrations may rely on it); one
//!   tenant's failure never stops the others unless `fail_fast` is asked.
//! - **Shared fleets**: a tenant whose lock another runner holds is skipped at
//!   once, not waited on, and reported as `running elsewhere`; a tenant another
//!   runner finished has nothing pending. So several `kiln up` processes, on
//!   several machines, can work through one fleet and every tenant is still
//!   migrated exactly once: the databases are the coordination.
//! - Tenant names come from kiln.toml and are validated there (letters,
//!   digits, `_`, `-`); PostgreSQL schema names are always quoted by the engine.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures::stream::{self, StreamExt};
use kiln_core::report::{ErrorReport, FleetReport, TargetName, TargetOutcome, TargetResult};
use serde::Serialize;

use crate::config::{Placement, Tenants};
use crate::tenant_source::TenantList;
use crate::{connect, BackendConfig, EngineError, Kiln, Migration, RunError, RunReport, Scope, UpTarget};

/// Which databases of the fleet a command touches.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// Only the public database.
    pub public_only: bool,
    /// Only the tenants.
    pub tenants_only: bool,
    /// Only these tenants (and not the public database); empty: every tenant.
    pub tenants: Vec<String>,
}

impl Selection {
    fn public(&self) -> bool {
        !self.tenants_only && self.tenants.is_empty()
    }

    fn tenant_names<'a>(&self, all: &'a [String]) -> Result<Vec<&'a String>, String> {
        if self.public_only {
            return Ok(vec![]);
        }
        if self.tenants.is_empty() {
            return Ok(all.iter().collect());
        }
        let unknown: Vec<&String> = self.tenants.iter().filter(|t| !all.contains(t)).collect();
        if !unknown.is_empty() {
            return Err(format!(
                "unknown tenant{} {}; the fleet has: {}",
                if unknown.len() == 1 { "" } else { "s" },
                unknown.iter().map(|t| format!("{t:?}")).collect::<Vec<_>>().join(", "),
                all.join(", ")
            ));
        }
        Ok(all.iter().filter(|t| self.tenants.contains(t)).collect())
    }
}

/// How a fleet `up` runs.
#[derive(Clone, Debug, Default)]
pub struct FleetOptions {
    /// Which databases.
    pub selection: Selection,
    /// Stop starting tenants after the first failure (the rest are `skipped`).
    pub fail_fast: bool,
    /// Plan only: every target reports what would run and nothing changes.
    pub dry_run: bool,
    /// Tenants at a time (default: kiln.toml's `concurrency`).
    pub concurrency: Option<usize>,
}

/// What a fleet `up` tells its caller as it goes (for live output).
#[derive(Clone, Copy, Debug)]
pub enum FleetEvent<'e> {
    /// The tenants were read from their source: this many will be started
    /// (names that cannot be tenants included; they fail at once).
    Tenants {
        /// Selected tenants.
        count: usize,
    },
    /// A database's run starts.
    Started(&'e TargetName),
    /// A database's run ended.
    Done(&'e TargetOutcome),
}

/// One line of `kiln status --tenants`.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct TargetStatus {
    /// Which database.
    pub target: TargetName,
    /// Applied (or baseline) migrations.
    pub applied: usize,
    /// Pending migrations.
    pub pending: usize,
    /// Failed or interrupted migrations.
    pub failed: usize,
    /// When the newest migration was applied.
    pub last_applied_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Why the database could not be read, when it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorReport>,
}

/// One database's `kiln check` in a fleet.
#[derive(Clone, Debug, Serialize)]
pub struct TargetCheck {
    /// Which database.
    pub target: TargetName,
    /// What the check found, when the database could be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<kiln_core::runner::CheckReport>,
    /// Why it could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorReport>,
}

impl TargetCheck {
    /// Read, and nothing wrong.
    pub fn ok(&self) -> bool {
        self.report.as_ref().is_some_and(|r| r.ok)
    }
}

/// A fleet: the public database of a [`Kiln`] and its tenants.
pub struct Fleet<'a> {
    kiln: &'a Kiln,
    tenants: &'a Tenants,
    /// The tenant names, read from their source once per fleet.
    list: tokio::sync::OnceCell<TenantList>,
}

impl<'a> Fleet<'a> {
    /// The fleet of `kiln` (the public database) with `tenants` from kiln.toml.
    pub fn new(kiln: &'a Kiln, tenants: &'a Tenants) -> Self {
        Fleet { kiln, tenants, list: tokio::sync::OnceCell::new() }
    }

    /// The tenants, read from kiln.toml's source (a `list`, a `query`, a
    /// `find`, a `pattern`) on first use and kept for this fleet's life.
    ///
    /// # Errors
    /// The source cannot be read (see [`crate::tenant_source::read`]).
    pub async fn tenant_list(&self) -> Result<&TenantList, crate::Error> {
        Ok(self.list.get_or_try_init(|| crate::tenant_source::read(self.tenants, self.kiln.backend_config())).await?)
    }

    /// The selected databases (the public one first, then the tenants in
    /// the source's order) and the selected names the source gave that
    /// cannot be tenants, with why.
    ///
    /// # Errors
    /// The source cannot be read; an unknown tenant was asked for.
    pub async fn select(&self, selection: &Selection) -> Result<(Vec<TargetName>, Vec<(String, String)>), crate::Error> {
        let (names, rejected) = self.selected(selection).await?;
        let mut targets = Vec::new();
        if selection.public() {
            targets.push(TargetName::Public);
        }
        targets.extend(names.into_iter().map(TargetName::Tenant));
        Ok((targets, rejected))
    }

    /// The selected tenants, and the selected names the source gave that
    /// cannot be tenants (each reported as a failed tenant).
    async fn selected(&self, selection: &Selection) -> Result<(Vec<String>, Vec<(String, String)>), crate::Error> {
        let list = self.tenant_list().await?;
        let mut known = list.names.clone();
        known.extend(list.rejected.iter().map(|(n, _)| n.clone()));
        let chosen = selection.tenant_names(&known).map_err(crate::config::ConfigError::Invalid)?;
        let rejected = list.rejected.iter().filter(|(n, _)| chosen.contains(&n)).cloned().collect();
        Ok((chosen.into_iter().filter(|n| list.names.contains(n)).cloned().collect(), rejected))
    }

    /// How to reach `target`.
    pub fn backend(&self, target: &TargetName) -> BackendConfig {
        let public = self.kiln.backend_config().clone();
        match (target, &self.tenants.placement) {
            (TargetName::Public, _) => public,
            (TargetName::Tenant(t), Placement::Schema(tpl)) => BackendConfig { schema: Some(Tenants::resolve(tpl, t)), ..public },
            (TargetName::Tenant(t), Placement::Url(tpl)) => BackendConfig { url: Tenants::resolve(tpl, t).into(), schema: None, ..public },
        }
    }

    /// Every migration split by scope: (public, tenant).
    ///
    /// # Errors
    /// Bad files, naming the file.
    pub fn load(&self) -> Result<(Vec<Migration>, Vec<Migration>), crate::Error> {
        let all = self.kiln.load_unscoped()?;
        let (public, tenant): (Vec<Migration>, Vec<Migration>) = all.into_iter().partition(|m| m.directives.scope == Scope::Public);
        // Backfill jobs in tenant databases would have no worker: `kiln worker`
        // serves one database. Refuse rather than queue work nobody runs.
        let phased: Vec<String> = tenant.iter().filter(|m| m.phases.is_some()).map(|m| m.display_path()).collect();
        if !phased.is_empty() {
            return Err(crate::Error::Run(kiln_core::RunError::Plan(vec![kiln_core::PlanError::Refused(format!(
                "{}: zero-downtime migrations (expand/backfill/contract) run on the public database only for now; a tenant-scoped one would queue backfill jobs that no `kiln worker` serves. Nothing was run",
                phased.join(", ")
            ))])));
        }
        Ok((public, tenant))
    }

    /// Apply pending migrations: the public database first, then the tenants
    /// `concurrency` at a time. The tenants are read from their source after
    /// the public database ran, so a public migration may create or fill the
    /// table a `query` reads. `on_event` sees each target start and end as
    /// it happens (for live output).
    ///
    /// # Errors
    /// Only what stops the whole fleet: bad files, an unreadable schema file,
    /// an unknown tenant in the selection, a tenant source that cannot be
    /// read (after the public database ran). Per-target failures are in the
    /// report.
    pub async fn up(&self, opts: &FleetOptions, on_event: &(dyn Fn(FleetEvent<'_>) + Sync)) -> Result<FleetReport, crate::Error> {
        let started = Instant::now();
        let (public_migs, tenant_migs) = self.load()?;
        let contract = self.kiln.contract()?;
        if !opts.selection.tenants.is_empty() {
            // Unknown names are refused before anything runs.
            self.selected(&opts.selection).await?;
        }
        let on_done = |o: &TargetOutcome| on_event(FleetEvent::Done(o));
        let mut targets = Vec::new();
        let mut public_failed = false;
        if opts.selection.public() {
            on_event(FleetEvent::Started(&TargetName::Public));
            let t0 = Instant::now();
            let cfg = self.backend(&TargetName::Public);
            let result = self.run_one(&cfg, &TargetName::Public, &public_migs, contract.clone(), opts.dry_run, true).await;
            public_failed = matches!(result, TargetResult::Failed { .. });
            let outcome = TargetOutcome { target: TargetName::Public, result, duration_ms: t0.elapsed().as_millis() as u64 };
            on_done(&outcome);
            targets.push(outcome);
        }
        let (names, rejected) = self.selected(&opts.selection).await?;
        on_event(FleetEvent::Tenants { count: names.len() + rejected.len() });
        for (name, why) in rejected {
            on_event(FleetEvent::Started(&TargetName::Tenant(name.clone())));
            let outcome = TargetOutcome { target: TargetName::Tenant(name), result: TargetResult::Failed { error: bad_name(why) }, duration_ms: 0 };
            on_done(&outcome);
            targets.push(outcome);
        }
        let stop = AtomicBool::new(public_failed);
        let concurrency = opts.concurrency.unwrap_or(self.tenants.concurrency).max(1);
        let tenant_migs = &tenant_migs;
        let stop = &stop;
        let mut runs = stream::iter(names.into_iter().map(|name| async move {
            let target = TargetName::Tenant(name.clone());
            let t0 = Instant::now();
            let result = if stop.load(Ordering::SeqCst) {
                let reason = if public_failed { "the public database failed" } else { "--fail-fast: another tenant failed" };
                TargetResult::Skipped { reason: reason.into() }
            } else {
                on_event(FleetEvent::Started(&target));
                let r = self.run_one(&self.backend(&target), &target, tenant_migs, None, opts.dry_run, false).await;
                if opts.fail_fast && matches!(r, TargetResult::Failed { .. }) {
                    stop.store(true, Ordering::SeqCst);
                }
                r
            };
            TargetOutcome { target, result, duration_ms: t0.elapsed().as_millis() as u64 }
        }))
        .buffer_unordered(concurrency);
        while let Some(outcome) = runs.next().await {
            on_done(&outcome);
            targets.push(outcome);
        }
        Ok(FleetReport { targets, duration_ms: started.elapsed().as_millis() as u64 })
    }

    /// One target's `up`. The public database waits for its lock; a tenant
    /// whose lock is held elsewhere is skipped.
    async fn run_one(
        &self,
        cfg: &BackendConfig,
        target: &TargetName,
        migrations: &[Migration],
        contract: Option<Arc<kiln_core::schema::Contract>>,
        dry_run: bool,
        wait: bool,
    ) -> TargetResult {
        let cfg = BackendConfig { read_only: dry_run, ..cfg.clone() };
        let mut engine = match connect(&cfg).await {
            Ok(e) => e,
            // A missing tenant database is created when kiln.toml asks for it, then connected to again.
            Err(e @ EngineError::Connect { .. }) if self.tenants.create && !dry_run && matches!(target, TargetName::Tenant(_)) => {
                let retried = match crate::tenant_source::create_database(cfg.url.expose(), &cfg).await {
                    Ok(true) => connect(&cfg).await,
                    Ok(false) => Err(e),
                    Err(why) => {
                        Err(EngineError::Connect { url: cfg.url.redacted(), message: format!("{e}; creating the database failed too: {why}") })
                    }
                };
                match retried {
                    Ok(engine) => engine,
                    Err(e) => return TargetResult::Failed { error: ErrorReport::from(&RunError::Engine(e)) },
                }
            }
            Err(e) => return TargetResult::Failed { error: ErrorReport::from(&RunError::Engine(e)) },
        };
        let lock_timeout = if wait { None } else { Some(std::time::Duration::ZERO) };
        let r: Result<RunReport, RunError> = {
            let mut runner = self.kiln.runner_for(engine.as_mut(), contract, lock_timeout).with_target(target.to_string());
            runner.up(migrations, &UpTarget::Latest, self.kiln.policy(), dry_run).await
        };
        let _ = engine.close().await;
        match r {
            Ok(report) => TargetResult::Done { report },
            Err(RunError::Engine(EngineError::LockTimeout { holder, .. })) if !wait => {
                TargetResult::Skipped { reason: format!("running elsewhere: another runner holds its lock ({holder})") }
            }
            Err(e) => TargetResult::Failed { error: ErrorReport::from(&e) },
        }
    }

    /// `kiln check` on every selected database: pending, failed or changed
    /// migrations, bad dependencies, drift — and the schema contract on the
    /// public database. Read without locks, `concurrency` at a time.
    ///
    /// # Errors
    /// Bad files, an unreadable schema file, an unknown tenant.
    pub async fn check(&self, selection: &Selection) -> Result<Vec<TargetCheck>, crate::Error> {
        let (public_migs, tenant_migs) = self.load()?;
        let contract = self.kiln.contract()?;
        let (targets, rejected) = self.targets(selection, &public_migs, &tenant_migs).await?;
        let contract = &contract;
        let (public_ref, tenant_ref) = (public_migs.as_slice(), tenant_migs.as_slice());
        let mut out: Vec<TargetCheck> = stream::iter(target_names(targets).into_iter().map(|target| async move {
            // Picked here rather than passed in: a borrowed argument makes the
            // future's lifetime too general for axum's `Send` bound.
            let migs: &[Migration] = if target == TargetName::Public { public_ref } else { tenant_ref };
            let cfg = BackendConfig { read_only: true, ..self.backend(&target) };
            let c = if target == TargetName::Public { contract.as_deref() } else { None };
            let r = async {
                let mut engine = connect(&cfg).await?;
                let r = self.kiln.runner_for(engine.as_mut(), None, None).check(migs, c).await;
                let _ = engine.close().await;
                r
            }
            .await;
            match r {
                Ok(report) => TargetCheck { target, report: Some(report), error: None },
                Err(e) => TargetCheck { target, report: None, error: Some(ErrorReport::from(&e)) },
            }
        }))
        .buffer_unordered(self.tenants.concurrency.max(1))
        .collect()
        .await;
        out.extend(rejected.into_iter().map(|(n, why)| TargetCheck { target: TargetName::Tenant(n), report: None, error: Some(bad_name(why)) }));
        out.sort_by(|a, b| a.target.cmp(&b.target));
        Ok(out)
    }

    /// The selected databases, each with the migrations of its scope.
    /// The selected names the source gave that cannot be tenants come back
    /// apart, with why.
    async fn targets<'m>(
        &self,
        selection: &Selection,
        public_migs: &'m [Migration],
        tenant_migs: &'m [Migration],
    ) -> Result<(Vec<(TargetName, &'m [Migration])>, Vec<(String, String)>), crate::Error> {
        let (names, rejected) = self.selected(selection).await?;
        let mut targets: Vec<(TargetName, &[Migration])> = Vec::new();
        if selection.public() {
            targets.push((TargetName::Public, public_migs));
        }
        targets.extend(names.into_iter().map(|n| (TargetName::Tenant(n), tenant_migs)));
        Ok((targets, rejected))
    }

    /// Every target's migration counts (`kiln status --tenants`), read without
    /// locks and without creating anything, `concurrency` at a time.
    ///
    /// # Errors
    /// Bad files.
    pub async fn status(&self, selection: &Selection) -> Result<Vec<TargetStatus>, crate::Error> {
        let (public_migs, tenant_migs) = self.load()?;
        let (targets, rejected) = self.targets(selection, &public_migs, &tenant_migs).await?;
        let (public_ref, tenant_ref) = (public_migs.as_slice(), tenant_migs.as_slice());
        let mut out: Vec<TargetStatus> = stream::iter(target_names(targets).into_iter().map(|target| async move {
            // Picked here rather than passed in: a borrowed argument makes the
            // future's lifetime too general for axum's `Send` bound.
            let migs: &[Migration] = if target == TargetName::Public { public_ref } else { tenant_ref };
            let cfg = BackendConfig { read_only: true, ..self.backend(&target) };
            let rows = async {
                let mut engine = connect(&cfg).await?;
                let r = self.kiln.runner_for(engine.as_mut(), None, None).status(migs).await;
                let _ = engine.close().await;
                r
            }
            .await;
            match rows {
                Ok(rows) => TargetStatus {
                    applied: rows.iter().filter(|r| r.state == "applied" || r.state == "baseline").count(),
                    pending: rows.iter().filter(|r| r.state == "pending").count(),
                    failed: rows.iter().filter(|r| matches!(r.state.as_str(), "failed" | "running")).count(),
                    last_applied_at: rows.iter().filter_map(|r| r.applied_at).max(),
                    error: None,
                    target,
                },
                Err(e) => TargetStatus { target, applied: 0, pending: 0, failed: 0, last_applied_at: None, error: Some(ErrorReport::from(&e)) },
            }
        }))
        .buffer_unordered(self.tenants.concurrency.max(1))
        .collect()
        .await;
        out.extend(rejected.into_iter().map(|(n, why)| TargetStatus {
            target: TargetName::Tenant(n),
            applied: 0,
            pending: 0,
            failed: 0,
            last_applied_at: None,
            error: Some(bad_name(why)),
        }));
        out.sort_by(|a, b| a.target.cmp(&b.target));
        Ok(out)
    }
}

/// The error of a name the tenant source gave that cannot be a tenant.
fn bad_name(why: String) -> ErrorReport {
    ErrorReport { code: "bad_tenant_name".into(), message: format!("{why}; nothing was run on it"), exit_code: 2, problems: vec![], failure: None }
}

/// The names of `targets`, owned (a stream over borrowed pairs makes the
/// futures' lifetimes too general for axum's `Send` bound).
fn target_names(targets: Vec<(TargetName, &[Migration])>) -> Vec<TargetName> {
    targets.into_iter().map(|(t, _)| t).collect()
}
