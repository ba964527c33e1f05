//! `kiln verify`: prove on a scratch database that every migration applies,
//! validates, and that every down undoes its up.
//!
//! The scratch database is created and dropped by kiln on the same server as
//! the configured database (or given explicitly, and then must be empty). The
//! configured database itself is never touched.

use std::sync::Arc;

use serde::Serialize;

use kiln_core::schema::{self, Change, Contract, Snapshot, Violation};
use kiln_core::{BackendConfig, DownTarget, Engine, Migration, Policy, RunError, Runner, RunnerSettings, UpTarget};

/// One problem `verify` found.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    /// The migration concerned (`0003_add_index`), or `(all)`.
    pub migration: String,
    /// What went wrong.
    pub problem: String,
    /// Schema differences, where that is the problem.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub differences: Vec<Change>,
    /// Contract violations, where that is the problem.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub violations: Vec<Violation>,
}

/// What `verify` did and found.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    /// No findings.
    pub ok: bool,
    /// The scratch database (password redacted).
    pub scratch: String,
    /// Migrations checked.
    pub migrations: usize,
    /// Irreversible migrations (their down could not be checked).
    pub irreversible: Vec<String>,
    /// Whether a schema contract (`schema.yaml`) was checked after every migration.
    pub contract_checked: bool,
    /// Problems found.
    pub findings: Vec<Finding>,
    /// Non-fatal remarks.
    pub notes: Vec<String>,
}

/// Where to verify.
pub enum Scratch {
    /// Create (and afterwards drop) a database on the server of this configuration.
    Create,
    /// Use this URL; it must hold no tables/collections and no kiln history.
    Url(String),
}

fn err_text(e: &RunError) -> String {
    e.to_string()
}

/// Run the verification.
///
/// # Errors
/// Only when the scratch database cannot be made, reached or dropped; every
/// problem with the migrations themselves is a [`Finding`].
pub async fn verify(
    base: &BackendConfig,
    local: &[Migration],
    contract: Option<&Contract>,
    scratch: Scratch,
    keep: bool,
    settings: RunnerSettings,
) -> Result<VerifyReport, RunError> {
    let (url, created) = match scratch {
        Scratch::Url(u) => (u, None),
        Scratch::Create => {
            let name = format!(
                "kiln_verify_{}_{}",
                std::process::id(),
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
            );
            let mut admin = crate::connect(base).await?;
            let url = scratch_admin(admin.as_mut())?.create_scratch(&name).await;
            let _ = admin.close().await;
            let url = url?;
            (url, Some(name))
        }
    };
    let mut cfg = base.clone();
    cfg.url = url.clone().into();
    let result = run_checks(&cfg, local, contract, settings).await;
    if let Some(name) = &created {
        if !keep {
            let mut admin = crate::connect(base).await?;
            let dropped = scratch_admin(admin.as_mut())?.drop_scratch(name).await;
            let _ = admin.close().await;
            dropped?;
        }
    }
    let mut report = result?;
    report.scratch = kiln_core::url::redact(&url);
    if keep && created.is_some() {
        report.notes.push(format!("scratch database kept: {}", report.scratch));
    }
    Ok(report)
}

/// The engine's scratch databases, or a refusal naming the engine.
fn scratch_admin(engine: &mut dyn Engine) -> Result<&mut dyn kiln_core::engine::ScratchAdmin, RunError> {
    let name = engine.capabilities().engine;
    engine.scratch().ok_or_else(|| {
        kiln_core::PlanError::Refused(format!("{name} cannot create a scratch database; pass --scratch-url with an empty database")).into()
    })
}

async fn run_checks(
    cfg: &BackendConfig,
    local: &[Migration],
    contract: Option<&Contract>,
    settings: RunnerSettings,
) -> Result<VerifyReport, RunError> {
    let mut backend: Box<dyn Engine> = crate::connect(cfg).await?;
    let mut report = VerifyReport {
        ok: true,
        scratch: String::new(),
        migrations: local.len(),
        irreversible: vec![],
        contract_checked: contract.is_some(),
        findings: vec![],
        notes: vec![],
    };
    let result = checks(backend.as_mut(), local, contract, settings, &mut report).await;
    let _ = backend.close().await;
    result?;
    report.ok = report.findings.is_empty();
    Ok(report)
}

async fn checks(
    b: &mut dyn Engine,
    local: &[Migration],
    contract: Option<&Contract>,
    settings: RunnerSettings,
    report: &mut VerifyReport,
) -> Result<(), RunError> {
    let contract_arc = contract.map(|c| Arc::new(c.clone()));
    let policy = Policy::default();
    let mut runner = Runner::new(b, settings).with_contract(None);
    if runner.history().await?.iter().any(|_| true) || !runner.inspect().await?.objects.is_empty() {
        return Err(kiln_core::PlanError::Refused("the scratch database is not empty; verify needs an empty database".into()).into());
    }
    let empty = runner.inspect().await?;

    // 1. One migration at a time: apply, revert, compare, apply again.
    let mut before = empty.clone();
    for m in local {
        let name = m.name();
        if let Err(e) = runner.up(local, &UpTarget::To(m.version.clone()), &policy, false).await {
            report.findings.push(Finding {
                migration: name,
                problem: format!("does not apply: {}", err_text(&e)),
                differences: vec![],
                violations: vec![],
            });
            report.notes.push("stopped at the first migration that does not apply".into());
            return Ok(());
        }
        let after = runner.inspect().await?;
        if let Some(c) = &contract_arc {
            let broke = schema::regressions(c, &before, &after);
            if !broke.is_empty() {
                report.findings.push(Finding {
                    migration: name.clone(),
                    problem: "breaks the schema contract".into(),
                    differences: vec![],
                    violations: broke,
                });
            }
        }
        if m.down.is_none() {
            report.irreversible.push(name);
            before = after;
            continue;
        }
        if let Err(e) = runner.down(local, &DownTarget::Steps(1), false).await {
            report.findings.push(Finding {
                migration: name,
                problem: format!("its down fails: {}", err_text(&e)),
                differences: vec![],
                violations: vec![],
            });
            report.notes.push("stopped at the first down that fails".into());
            return Ok(());
        }
        let reverted = runner.inspect().await?;
        let left = schema::diff(&before, &reverted);
        if !left.is_empty() {
            report.findings.push(Finding {
                migration: name.clone(),
                problem: "its down does not undo its up".into(),
                differences: left,
                violations: vec![],
            });
        }
        if let Err(e) = runner.up(local, &UpTarget::To(m.version.clone()), &policy, false).await {
            report.findings.push(Finding {
                migration: name,
                problem: format!("does not apply again after its down: {}", err_text(&e)),
                differences: vec![],
                violations: vec![],
            });
            return Ok(());
        }
        let again = runner.inspect().await?;
        let differs = schema::diff(&after, &again);
        if !differs.is_empty() {
            report.findings.push(Finding {
                migration: name,
                problem: "applying it again after its down gives a different schema".into(),
                differences: differs,
                violations: vec![],
            });
        }
        before = again;
    }
    let full: Snapshot = before;

    // 2. The whole set must satisfy the contract.
    if let Some(c) = contract {
        let v: Vec<Violation> = schema::validate(c, &full).into_iter().filter(|v| v.severity == schema::Severity::Error).collect();
        if !v.is_empty() {
            report.findings.push(Finding {
                migration: "(all)".into(),
                problem: "after every migration the schema breaks the contract".into(),
                differences: vec![],
                violations: v,
            });
        }
    }

    // 3. Revert everything: the schema must be empty again; then apply again.
    if !report.irreversible.is_empty() {
        report.notes.push(format!(
            "not reverting everything: {} irreversible migration(s) ({})",
            report.irreversible.len(),
            report.irreversible.join(", ")
        ));
        return Ok(());
    }
    if let Err(e) = runner.down(local, &DownTarget::To(kiln_core::Version::from_number(0)), false).await {
        report.findings.push(Finding {
            migration: "(all)".into(),
            problem: format!("reverting everything fails: {}", err_text(&e)),
            differences: vec![],
            violations: vec![],
        });
        return Ok(());
    }
    let emptied = runner.inspect().await?;
    let left = schema::diff(&empty, &emptied);
    if !left.is_empty() {
        report.findings.push(Finding {
            migration: "(all)".into(),
            problem: "after reverting everything the schema is not empty".into(),
            differences: left,
            violations: vec![],
        });
    }
    if let Err(e) = runner.up(local, &UpTarget::Latest, &policy, false).await {
        report.findings.push(Finding {
            migration: "(all)".into(),
            problem: format!("applying everything again fails: {}", err_text(&e)),
            differences: vec![],
            violations: vec![],
        });
        return Ok(());
    }
    let again = runner.inspect().await?;
    let differs = schema::diff(&full, &again);
    if !differs.is_empty() {
        report.findings.push(Finding {
            migration: "(all)".into(),
            problem: "applying everything again gives a different schema than the first time".into(),
            differences: differs,
            violations: vec![],
        });
    }
    Ok(())
}
