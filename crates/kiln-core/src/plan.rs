//! The planner: compares migrations on disk with the history and decides what
//! to run. Pure functions, no I/O: `--dry-run`, `status` and most tests come from
//! here without a database.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::error::PlanError;
use crate::model::*;

/// Rules that loosen or narrow a plan.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// Allow pending migrations older than the newest applied one.
    pub allow_out_of_order: bool,
    /// Only plan migrations of this group.
    pub group: Option<String>,
}

/// How far `up` goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum UpTarget {
    /// Everything pending.
    #[default]
    Latest,
    /// Pending migrations up to and including this version.
    To(Version),
}

/// How far `down` goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DownTarget {
    /// The last batch (one `kiln up` run).
    LastBatch,
    /// The last N applied migrations.
    Steps(usize),
    /// Everything applied after this version (it stays applied).
    To(Version),
}

/// What `up` will do.
#[derive(Debug, Clone)]
pub struct UpPlan<'a> {
    /// Batch number the run will record.
    pub batch: i64,
    /// Migrations to apply, in order.
    pub steps: Vec<&'a Migration>,
}

/// What `down` will do.
#[derive(Debug, Clone)]
pub struct DownPlan<'a> {
    /// Migrations to revert, in order (newest first), with their history entries.
    pub steps: Vec<(&'a Migration, &'a AppliedMigration)>,
}

/// The version of a history entry as its file wrote it (`0001` rather than `1`),
/// recovered from the recorded script name when the file itself is gone.
pub fn recorded_version(a: &AppliedMigration) -> Version {
    let file = a.script.rsplit('/').next().unwrap_or("");
    match crate::source::split_version(file.split('.').next().unwrap_or("")) {
        Some((v, _)) if v == a.version => v,
        _ => a.version.clone(),
    }
}

/// The order migrations apply in: the order of the files (the loader sorts
/// them as their tool does, [`VersionOrder`]); a version with no file (a
/// baseline marker, a removed file) falls among them by number.
///
/// Every comparison the planner makes about "before" and "after" (pending
/// older than the newest applied, `--to`, dependencies, which to revert
/// first, status rows) goes through [`ToolOrder::key`], so a diesel set is
/// planned in diesel's order and a numbered set by number.
pub struct ToolOrder {
    position: HashMap<u64, usize>,
    numbers: Vec<u64>,
}

impl ToolOrder {
    /// The order of `local`, as loaded.
    pub fn of(local: &[Migration]) -> Self {
        let position = local.iter().enumerate().map(|(i, m)| (m.version.number, i)).collect();
        let mut numbers: Vec<u64> = local.iter().map(|m| m.version.number).collect();
        numbers.sort_unstable();
        ToolOrder { position, numbers }
    }

    /// A total key: files by position; a version with no file just before
    /// the file of the next higher number among them.
    pub fn key(&self, v: &Version) -> (usize, u64) {
        match self.position.get(&v.number) {
            Some(&p) => (2 * p + 1, 0),
            None => {
                let next_higher = self.numbers.partition_point(|n| *n < v.number);
                let at = self.numbers.get(next_higher).and_then(|n| self.position.get(n)).copied().unwrap_or(self.numbers.len());
                (2 * at, v.number)
            }
        }
    }
}

fn by_version(applied: &[AppliedMigration]) -> HashMap<u64, &AppliedMigration> {
    applied.iter().map(|a| (a.version.number, a)).collect()
}

/// Problems that stop every run: failed/interrupted migrations, changed or missing
/// files of applied migrations. Used by `up`, `down` and `kiln check`.
pub fn integrity_problems(local: &[Migration], applied: &[AppliedMigration]) -> Vec<PlanError> {
    let files: HashMap<u64, &Migration> = local.iter().map(|m| (m.version.number, m)).collect();
    let mut problems = Vec::new();
    for a in applied {
        let file = files.get(&a.version.number);
        match a.state {
            State::Failed | State::Running => problems.push(PlanError::Blocked {
                version: file.map(|m| m.version.clone()).unwrap_or_else(|| a.version.clone()),
                file: file.map(|m| m.display_path()).unwrap_or_else(|| a.script.clone()),
                state: a.state.to_string(),
                failure: a.error.clone(),
            }),
            State::Applied | State::Baseline | State::Expanded | State::Contracted => match file {
                None if a.state == State::Baseline && a.script.is_empty() => {} // baseline marker
                None => problems.push(PlanError::MissingFile {
                    version: recorded_version(a),
                    name: if a.script.is_empty() { a.description.clone() } else { a.script.clone() },
                }),
                // An empty recorded checksum means "unknown" (an adopted migrate-mongo entry): not a mismatch.
                Some(m) if m.checksum != a.checksum && !a.checksum.0.is_empty() => problems.push(PlanError::ChecksumMismatch {
                    version: m.version.clone(),
                    file: m.display_path(),
                    recorded: a.checksum.0.clone(),
                    found: m.checksum.0.clone(),
                }),
                Some(_) => {}
            },
            State::Retired => {}
        }
    }
    problems
}

/// Dependency declarations that are wrong whatever the database holds:
/// unknown migrations and dependencies on later versions.
pub fn dependency_problems(local: &[Migration], applied: &[AppliedMigration]) -> Vec<PlanError> {
    let known: HashSet<u64> = local.iter().map(|m| m.version.number).chain(applied.iter().map(|a| a.version.number)).collect();
    let order = ToolOrder::of(local);
    let mut problems = Vec::new();
    for m in local {
        for d in &m.directives.depends {
            if !known.contains(&d.version.number) {
                problems.push(PlanError::UnknownDependency { file: m.display_path(), dependency: d.written.clone() });
            } else if order.key(&d.version) >= order.key(&m.version) {
                problems.push(PlanError::LaterDependency { file: m.display_path(), dependency: d.written.clone() });
            }
        }
    }
    problems
}

/// The next batch number.
pub fn next_batch(applied: &[AppliedMigration]) -> i64 {
    applied.iter().map(|a| a.batch).max().unwrap_or(0) + 1
}

/// Plan `kiln up`.
///
/// # Errors
/// Every problem found, so the operator sees them all at once: failed or
/// interrupted migrations, changed or missing files of applied migrations, bad
/// dependencies, out-of-order pending migrations (unless allowed), an unknown
/// target version.
pub fn plan_up<'a>(local: &'a [Migration], applied: &[AppliedMigration], target: &UpTarget, policy: &Policy) -> Result<UpPlan<'a>, Vec<PlanError>> {
    let mut problems = integrity_problems(local, applied);
    problems.extend(dependency_problems(local, applied));
    let recorded = by_version(applied);
    let order = ToolOrder::of(local);
    let newest_done = applied.iter().filter(|a| a.state.is_done()).map(|a| &a.version).max_by_key(|v| order.key(v));

    if let UpTarget::To(v) = target {
        if !local.iter().any(|m| &m.version == v) && !recorded.contains_key(&v.number) {
            problems.push(PlanError::UnknownVersion { version: v.to_string(), hint: "--to must name a migration".into() });
        }
    }

    let mut steps: Vec<&Migration> = Vec::new();
    for m in local {
        if recorded.contains_key(&m.version.number) {
            continue; // applied, baseline, retired, failed: not pending
        }
        if let UpTarget::To(v) = target {
            if order.key(&m.version) > order.key(v) {
                continue;
            }
        }
        if let Some(g) = &policy.group {
            if m.directives.group.as_deref() != Some(g.as_str()) {
                continue;
            }
        }
        if let Some(newest) = newest_done {
            if order.key(&m.version) < order.key(newest) && !policy.allow_out_of_order {
                problems.push(PlanError::OutOfOrder {
                    version: m.version.clone(),
                    file: m.display_path(),
                    newest: local.iter().find(|x| x.version == *newest).map(|x| x.version.clone()).unwrap_or_else(|| newest.clone()),
                });
                continue;
            }
        }
        steps.push(m);
    }

    // Every dependency of a planned migration must be done or planned before it.
    let planned: HashSet<u64> = steps.iter().map(|m| m.version.number).collect();
    for m in &steps {
        for d in &m.directives.depends {
            if order.key(&d.version) >= order.key(&m.version) {
                continue; // reported above
            }
            let done = recorded.get(&d.version.number).map(|a| a.state.is_done()).unwrap_or(false);
            if done || planned.contains(&d.version.number) {
                continue;
            }
            let why = match recorded.get(&d.version.number) {
                Some(a) => format!("it is {}", a.state),
                None if local.iter().any(|x| x.version == d.version) => {
                    if policy.group.is_some() {
                        // `--group` refuses rather than widening the run: the
                        // operator named one group and gets only that group.
                        match local.iter().find(|x| x.version == d.version).and_then(|x| x.directives.group.as_deref()) {
                            Some(g) => format!(
                                "it is pending in group `{g}`, which this run excludes; apply that group first (`kiln up --group {g}`) or run `kiln up` without --group"
                            ),
                            None => "it is pending outside any group, which this run excludes; run `kiln up` without --group".to_string(),
                        }
                    } else {
                        "it is pending but excluded from this run".to_string()
                    }
                }
                None => "its file is missing".to_string(),
            };
            problems.push(PlanError::UnmetDependency { file: m.display_path(), dependency: d.written.clone(), why });
        }
    }

    if problems.is_empty() {
        Ok(UpPlan { batch: next_batch(applied), steps })
    } else {
        Err(problems)
    }
}

/// Plan `kiln down`.
///
/// # Errors
/// Failed or interrupted migrations anywhere, and for every migration to revert:
/// a missing or changed file, no down section (irreversible), a baseline entry.
/// Nothing is planned unless everything can be reverted.
pub fn plan_down<'a>(local: &'a [Migration], applied: &'a [AppliedMigration], target: &DownTarget) -> Result<DownPlan<'a>, Vec<PlanError>> {
    plan_down_group(local, applied, target, None)
}

/// [`plan_down`] over one group's migrations (`kiln down --group users`):
/// the target counts only that group's applied migrations (the last batch
/// that applied any of them, the last N of them, those after VERSION), and
/// the plan is refused when an applied migration outside it depends on one
/// it would revert (every such pair is listed).
///
/// # Errors
/// As [`plan_down`], plus [`PlanError::Refused`] for the dependents.
pub fn plan_down_group<'a>(
    local: &'a [Migration],
    applied: &'a [AppliedMigration],
    target: &DownTarget,
    group: Option<&str>,
) -> Result<DownPlan<'a>, Vec<PlanError>> {
    let mut problems: Vec<PlanError> = integrity_problems(local, applied).into_iter().filter(|p| matches!(p, PlanError::Blocked { .. })).collect();
    let mut done: Vec<&AppliedMigration> = applied.iter().filter(|a| a.state.is_done()).collect();
    if let Some(g) = group {
        let file_group: HashMap<u64, Option<&str>> = local.iter().map(|m| (m.version.number, m.directives.group.as_deref())).collect();
        done.retain(|a| file_group.get(&a.version.number).copied().unwrap_or(a.group.as_deref()) == Some(g));
    }
    // Reverse order of application: newest batch first, within a batch the
    // last in the files' order first.
    let order = ToolOrder::of(local);
    done.sort_by(|a, b| b.batch.cmp(&a.batch).then(order.key(&b.version).cmp(&order.key(&a.version))));
    let chosen: Vec<&AppliedMigration> = match target {
        DownTarget::LastBatch => {
            let last = done.first().map(|a| a.batch);
            done.into_iter().filter(|a| Some(a.batch) == last).collect()
        }
        DownTarget::Steps(n) => done.into_iter().take(*n).collect(),
        DownTarget::To(v) => {
            if !local.iter().any(|m| &m.version == v) && !applied.iter().any(|a| &a.version == v) && v.number != 0 {
                problems.push(PlanError::UnknownVersion { version: v.to_string(), hint: "--to must name a migration, or 0 for all".into() });
            }
            // `--to 0` means everything, a version-0 migration included
            // (diesel's 00000000000000_diesel_initial_setup, a `0_initial`).
            done.into_iter().filter(|a| v.number == 0 || order.key(&a.version) > order.key(v)).collect()
        }
    };
    let files: HashMap<u64, &Migration> = local.iter().map(|m| (m.version.number, m)).collect();
    let mut steps = Vec::new();
    for a in chosen {
        if a.state == State::Baseline {
            problems.push(PlanError::NotRevertible { version: a.version.clone(), state: a.state.to_string() });
            continue;
        }
        let Some(m) = files.get(&a.version.number) else {
            problems.push(PlanError::MissingFile { version: recorded_version(a), name: a.script.clone() });
            continue;
        };
        if m.checksum != a.checksum && !a.checksum.0.is_empty() {
            problems.push(PlanError::ChecksumMismatch {
                version: m.version.clone(),
                file: m.display_path(),
                recorded: a.checksum.0.clone(),
                found: m.checksum.0.clone(),
            });
            continue;
        }
        if a.state == State::Contracted {
            problems.push(PlanError::Refused(format!(
                "{} (version {}) was contracted: its rollback undoes only the expand, and what contract removed is gone; write a new migration to change it back. Nothing was reverted",
                m.display_path(),
                m.version
            )));
            continue;
        }
        if m.down.is_none() {
            problems.push(PlanError::Irreversible { version: m.version.clone(), file: m.display_path() });
            continue;
        }
        steps.push((*m, a));
    }
    if group.is_some() {
        // Reverting part of the history: nothing that stays may depend on what goes.
        let going: HashSet<u64> = steps.iter().map(|(m, _)| m.version.number).collect();
        let staying = applied.iter().filter(|a| a.state.is_done() && !going.contains(&a.version.number));
        let mut pairs = Vec::new();
        for a in staying {
            if let Some(m) = local.iter().find(|m| m.version.number == a.version.number) {
                for d in m.directives.depends.iter().filter(|d| going.contains(&d.version.number)) {
                    pairs.push(format!("{} depends on {}", m.display_path(), d.written));
                }
            }
        }
        if !pairs.is_empty() {
            problems.push(PlanError::Refused(format!(
                "migrations outside the group stay applied and depend on ones it would revert: {}; revert those first (their group, or `kiln down --to`). Nothing was reverted",
                pairs.join("; ")
            )));
        }
    }
    if problems.is_empty() {
        Ok(DownPlan { steps })
    } else {
        Err(problems)
    }
}

/// One line of `kiln status`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Serialize)]
pub struct StatusRow {
    /// Version.
    pub version: String,
    /// Version number.
    pub version_number: u64,
    /// Description.
    pub name: String,
    /// File (relative path) if present.
    pub file: Option<String>,
    /// Group.
    pub group: Option<String>,
    /// `pending`, `applied`, `failed`, `running`, `baseline`, `retired`,
    /// `missing`; for zero-downtime migrations `expanded`, `backfilling`,
    /// `backfilled`, `backfill-paused`, `backfill-failed`,
    /// `backfill-cancelled`, `contracted`.
    pub state: String,
    /// Batch, when recorded.
    pub batch: Option<i64>,
    /// When recorded.
    pub applied_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Duration in ms, when recorded.
    pub duration_ms: Option<i64>,
    /// Who recorded it.
    pub applied_by: Option<String>,
    /// Checksum of the file (if present).
    pub checksum: Option<String>,
    /// Whether the file matches the recorded checksum (`None` when not comparable).
    pub checksum_ok: Option<bool>,
    /// Pending but older than the newest applied migration.
    pub out_of_order: bool,
    /// Has a down section.
    pub reversible: bool,
    /// The recorded error, for failed migrations.
    pub error: Option<FailureInfo>,
    /// The backfill job of an expanded zero-downtime migration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<crate::jobs::JobInfo>,
}

/// Every migration, on disk or in the history, with its state; in the order
/// they apply ([`ToolOrder`]).
pub fn status(local: &[Migration], applied: &[AppliedMigration]) -> Vec<StatusRow> {
    let order = ToolOrder::of(local);
    let newest_done = applied.iter().filter(|a| a.state.is_done()).map(|a| order.key(&a.version)).max();
    let mut rows: BTreeMap<u64, StatusRow> = BTreeMap::new();
    for m in local {
        rows.insert(
            m.version.number,
            StatusRow {
                version: m.version.text.clone(),
                version_number: m.version.number,
                name: m.description.clone(),
                file: Some(m.display_path()),
                group: m.directives.group.clone(),
                state: "pending".into(),
                batch: None,
                applied_at: None,
                duration_ms: None,
                applied_by: None,
                checksum: Some(m.checksum.0.clone()),
                checksum_ok: None,
                out_of_order: newest_done.map(|n| order.key(&m.version) < n).unwrap_or(false),
                reversible: m.down.is_some(),
                error: None,
                job: None,
            },
        );
    }
    for a in applied {
        let row = rows.entry(a.version.number).or_insert_with(|| StatusRow {
            version: recorded_version(a).text,
            version_number: a.version.number,
            name: a.description.clone(),
            file: None,
            group: a.group.clone(),
            state: String::new(),
            batch: None,
            applied_at: None,
            duration_ms: None,
            applied_by: None,
            checksum: None,
            checksum_ok: None,
            out_of_order: false,
            reversible: false,
            error: None,
            job: None,
        });
        row.out_of_order = false;
        row.state = match (a.state, row.file.is_some()) {
            (State::Applied | State::Baseline | State::Expanded | State::Contracted, false)
                if !(a.state == State::Baseline && a.script.is_empty()) =>
            {
                "missing".into()
            }
            (s, _) => s.to_string(),
        };
        row.batch = Some(a.batch);
        row.applied_at = Some(a.applied_at);
        row.duration_ms = Some(a.duration_ms);
        row.applied_by = Some(a.applied_by.clone());
        if a.state != State::Retired && !a.checksum.0.is_empty() {
            row.checksum_ok = row.checksum.as_ref().map(|c| *c == a.checksum.0);
        }
        row.error = a.error.clone();
    }
    let mut rows: Vec<StatusRow> = rows.into_values().collect();
    rows.sort_by_key(|r| order.key(&Version::from_number(r.version_number)));
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{load_dir, LoadOptions};

    fn mig(v: u64, down: bool) -> Migration {
        Migration {
            version: Version::new(v, format!("{v:04}")),
            description: format!("m{v}"),
            path: format!("{v:04}_m{v}.sql").into(),
            kind: Kind::Sql,
            checksum: Checksum::of_parts(&[&format!("create table t{v} (id int);")]),
            directives: Directives::default(),
            up: Body::Sql { file: "x".into(), statements: vec![] },
            down: if down { Some(Body::Sql { file: "x".into(), statements: vec![] }) } else { None },
            phases: None,
        }
    }

    fn rec(m: &Migration, batch: i64, state: State) -> AppliedMigration {
        AppliedMigration {
            version: m.version.clone(),
            description: m.description.clone(),
            script: m.display_path(),
            group: None,
            checksum: m.checksum.clone(),
            state,
            batch,
            applied_at: chrono::Utc::now(),
            duration_ms: 1,
            applied_by: "t@h".into(),
            kiln_version: KILN_VERSION.into(),
            error: None,
        }
    }

    #[test]
    fn pending_in_order() {
        let local = vec![mig(1, true), mig(2, true), mig(3, true)];
        let applied = vec![rec(&local[0], 1, State::Applied)];
        let p = plan_up(&local, &applied, &UpTarget::Latest, &Policy::default()).unwrap();
        assert_eq!(p.batch, 2);
        assert_eq!(p.steps.iter().map(|m| m.version.number).collect::<Vec<_>>(), vec![2, 3]);
        let p = plan_up(&local, &applied, &UpTarget::To(local[1].version.clone()), &Policy::default()).unwrap();
        assert_eq!(p.steps.len(), 1);
    }

    #[test]
    fn checksum_mismatch_and_missing() {
        let local = vec![mig(1, true), mig(3, true)];
        let mut a1 = rec(&local[0], 1, State::Applied);
        a1.checksum = Checksum("00".into());
        let gone = rec(&mig(2, true), 1, State::Applied);
        let e = plan_up(&local, &[a1, gone], &UpTarget::Latest, &Policy::default()).unwrap_err();
        assert!(matches!(e[0], PlanError::ChecksumMismatch { .. }));
        assert!(matches!(e[1], PlanError::MissingFile { .. }));
    }

    #[test]
    fn retired_is_not_missing_and_not_planned() {
        let local = vec![mig(2, true)];
        let r = rec(&mig(1, true), 1, State::Retired);
        let p = plan_up(&local, std::slice::from_ref(&r), &UpTarget::Latest, &Policy::default()).unwrap();
        assert_eq!(p.steps.len(), 1);
        let local = vec![mig(1, true), mig(2, true)];
        let p = plan_up(&local, &[r], &UpTarget::Latest, &Policy::default()).unwrap();
        assert_eq!(p.steps.iter().map(|m| m.version.number).collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn out_of_order() {
        let local = vec![mig(1, true), mig(2, true), mig(3, true)];
        let applied = vec![rec(&local[0], 1, State::Applied), rec(&local[2], 1, State::Applied)];
        let e = plan_up(&local, &applied, &UpTarget::Latest, &Policy::default()).unwrap_err();
        assert!(matches!(e[0], PlanError::OutOfOrder { .. }));
        let pol = Policy { allow_out_of_order: true, ..Default::default() };
        assert_eq!(plan_up(&local, &applied, &UpTarget::Latest, &pol).unwrap().steps.len(), 1);
    }

    #[test]
    fn failed_blocks() {
        let local = vec![mig(1, true), mig(2, true)];
        let mut f = rec(&local[0], 1, State::Failed);
        f.error = Some(FailureInfo { message: "boom".into(), statement: Some(2), line: Some(3) });
        let e = plan_up(&local, &[f.clone()], &UpTarget::Latest, &Policy::default()).unwrap_err();
        let msg = e[0].to_string();
        assert!(msg.contains("kiln repair 0001") && msg.contains("boom") && msg.contains("statement 2"), "{msg}");
        assert!(plan_down(&local, std::slice::from_ref(&f), &DownTarget::LastBatch).is_err());
    }

    #[test]
    fn dependencies() {
        let mut local = vec![mig(1, true), mig(2, true), mig(3, true)];
        local[1].directives.depends.push(DependsOn { version: Version::from_number(3), written: "0003".into(), line: 1 });
        local[2].directives.depends.push(DependsOn { version: Version::from_number(9), written: "0009_x".into(), line: 1 });
        let e = plan_up(&local, &[], &UpTarget::Latest, &Policy::default()).unwrap_err();
        assert!(e.iter().any(|p| matches!(p, PlanError::LaterDependency { .. })));
        assert!(e.iter().any(|p| matches!(p, PlanError::UnknownDependency { .. })));

        let mut local = vec![mig(1, true), mig(2, true)];
        local[1].directives.group = Some("users".into());
        local[1].directives.depends.push(DependsOn { version: Version::from_number(1), written: "0001".into(), line: 1 });
        let pol = Policy { group: Some("users".into()), ..Default::default() };
        let e = plan_up(&local, &[], &UpTarget::Latest, &pol).unwrap_err();
        assert!(matches!(e[0], PlanError::UnmetDependency { .. }), "{e:?}");
        assert!(e[0].to_string().contains("pending outside any group"), "{}", e[0]);
        assert!(plan_up(&local, &[], &UpTarget::Latest, &Policy::default()).is_ok());
        // The dependency's group is named, with the command that applies it.
        local[0].directives.group = Some("clients".into());
        let e = plan_up(&local, &[], &UpTarget::Latest, &pol).unwrap_err();
        assert!(e[0].to_string().contains("group `clients`") && e[0].to_string().contains("kiln up --group clients"), "{}", e[0]);
    }

    #[test]
    fn down_last_batch_steps_to() {
        let local = vec![mig(1, true), mig(2, true), mig(3, true)];
        let applied = vec![rec(&local[0], 1, State::Applied), rec(&local[1], 2, State::Applied), rec(&local[2], 2, State::Applied)];
        let v = |p: DownPlan| p.steps.iter().map(|(m, _)| m.version.number).collect::<Vec<_>>();
        assert_eq!(v(plan_down(&local, &applied, &DownTarget::LastBatch).unwrap()), vec![3, 2]);
        assert_eq!(v(plan_down(&local, &applied, &DownTarget::Steps(1)).unwrap()), vec![3]);
        assert_eq!(v(plan_down(&local, &applied, &DownTarget::To(local[0].version.clone())).unwrap()), vec![3, 2]);
        assert_eq!(v(plan_down(&local, &applied, &DownTarget::To(Version::from_number(0))).unwrap()), vec![3, 2, 1]);
    }

    #[test]
    fn down_refuses_irreversible_before_anything() {
        let local = vec![mig(1, true), mig(2, false), mig(3, true)];
        let applied: Vec<_> = local.iter().map(|m| rec(m, 1, State::Applied)).collect();
        let e = plan_down(&local, &applied, &DownTarget::LastBatch).unwrap_err();
        assert!(matches!(e[0], PlanError::Irreversible { .. }));
    }

    #[test]
    fn down_to_zero_reverts_version_zero_too() {
        let local = vec![mig(0, true), mig(1, true), mig(2, true)];
        let applied: Vec<_> = local.iter().map(|m| rec(m, 1, State::Applied)).collect();
        let p = plan_down(&local, &applied, &DownTarget::To(Version::from_number(0))).unwrap();
        let reverted: Vec<u64> = p.steps.iter().map(|(m, _)| m.version.number).collect();
        assert_eq!(reverted, [2, 1, 0]);
        let p = plan_down(&local, &applied, &DownTarget::To(Version::from_number(1))).unwrap();
        assert_eq!(p.steps.len(), 1);
    }

    #[test]
    fn status_rows() {
        let local = vec![mig(1, true), mig(2, true)];
        let mut a = rec(&local[0], 1, State::Applied);
        a.checksum = Checksum("ff".into());
        let gone = rec(&mig(5, true), 1, State::Applied);
        let rows = status(&local, &[a, gone]);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].state, "applied");
        assert_eq!(rows[0].checksum_ok, Some(false));
        assert_eq!(rows[1].state, "pending");
        assert!(rows[1].out_of_order);
        assert_eq!(rows[2].state, "missing");
    }

    /// issue 13.1: diesel orders by version string; its 18-digit names
    /// (`2025-11-19-091444-0000`) sort among the 14-digit ones as text.
    #[test]
    fn diesel_set_is_planned_in_diesel_order() {
        let d = tempfile::tempdir().unwrap();
        let folder = |name: &str| {
            let p = d.path().join(name);
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("up.sql"), format!("create table t{} (id int);", name.len())).unwrap();
            std::fs::write(p.join("down.sql"), "select 1;").unwrap();
        };
        for n in ["00000000000000_diesel_initial_setup", "2024-01-01-000000_old", "2025-11-19-091444-0000_new_style"] {
            folder(n);
        }
        let names = |ms: &[&Migration]| ms.iter().map(|m| m.description.clone()).collect::<Vec<_>>();
        let local = load_dir(d.path(), &LoadOptions::default()).unwrap();
        let p = plan_up(&local, &[], &UpTarget::Latest, &Policy::default()).unwrap();
        assert_eq!(names(&p.steps), ["diesel_initial_setup", "old", "new_style"]);
        let applied: Vec<_> = local.iter().map(|m| rec(m, 1, State::Applied)).collect();

        // A classic 14-digit folder dated after the 18-digit one comes after it
        // in diesel's order: pending, not out of order.
        folder("2025-12-01-000000_classic_later");
        let local = load_dir(d.path(), &LoadOptions::default()).unwrap();
        let all: Vec<&Migration> = local.iter().collect();
        assert_eq!(names(&all), ["diesel_initial_setup", "old", "new_style", "classic_later"]);
        let p = plan_up(&local, &applied, &UpTarget::Latest, &Policy::default()).unwrap();
        assert_eq!(names(&p.steps), ["classic_later"]);
        let rows = status(&local, &applied);
        assert_eq!(rows.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["diesel_initial_setup", "old", "new_style", "classic_later"]);
        assert!(!rows[3].out_of_order);

        // `--to` the 18-digit version stops before the later classic one.
        let to = Version::parse_arg("2025-11-19-091444-0000").unwrap();
        let p = plan_up(&local, &applied[..2], &UpTarget::To(to.clone()), &Policy::default()).unwrap();
        assert_eq!(names(&p.steps), ["new_style"]);

        // down reverts in reverse diesel order; `--to` keeps what comes before.
        let mut applied = applied;
        applied.push(rec(&local[3], 2, State::Applied));
        for a in &mut applied {
            a.batch = 1;
        }
        let v = |p: DownPlan| p.steps.iter().map(|(m, _)| m.description.clone()).collect::<Vec<_>>();
        assert_eq!(v(plan_down(&local, &applied, &DownTarget::Steps(2)).unwrap()), ["classic_later", "new_style"]);
        assert_eq!(v(plan_down(&local, &applied, &DownTarget::To(to)).unwrap()), ["classic_later"]);

        // An older classic folder added after the 18-digit one was applied is out of order, as its date says.
        folder("2025-10-01-000000_late_arrival");
        let local = load_dir(d.path(), &LoadOptions::default()).unwrap();
        let e = plan_up(&local, &applied, &UpTarget::Latest, &Policy::default()).unwrap_err();
        assert!(matches!(&e[0], PlanError::OutOfOrder { file, .. } if file.contains("late_arrival")), "{e:?}");
    }

    #[test]
    fn plans_from_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("0001_a.sql"), "-- kiln:up\ncreate table a (id int);\n-- kiln:down\ndrop table a;").unwrap();
        std::fs::write(d.path().join("0002_b.sql"), "-- kiln:depends 0001_a\ncreate table b (id int);").unwrap();
        let local = load_dir(d.path(), &LoadOptions::default()).unwrap();
        let p = plan_up(&local, &[], &UpTarget::Latest, &Policy::default()).unwrap();
        assert_eq!(p.steps.len(), 2);
        assert_eq!(p.batch, 1);
    }
}
