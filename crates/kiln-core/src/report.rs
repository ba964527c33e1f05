//! What commands report, as data: serialisable for `--json` and the HTTP API,
//! rendered for people by the CLI. Nothing here is pre-formatted text except
//! the `Display` impls, which are the human rendering of one item.

use std::fmt;

use serde::Serialize;

use crate::event::Direction;
use crate::model::{Body, Migration, State, TxMode};
use crate::schema::{Change, Violation};

/// One planned or executed step, for reports.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Serialize)]
pub struct StepReport {
    /// Version.
    pub version: String,
    /// Description.
    pub name: String,
    /// File.
    pub file: String,
    /// Statements/commands in the body run.
    pub statements: usize,
    /// Transaction mode asked for.
    pub transaction: TxMode,
    /// Duration in ms (0 for dry runs).
    pub duration_ms: u64,
    /// The SQL statements or commands (dry runs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub body: Option<Body>,
}

impl StepReport {
    pub(crate) fn of(m: &Migration, body: &Body, ms: u64, with_body: bool) -> Self {
        StepReport {
            version: m.version.text.clone(),
            name: m.description.clone(),
            file: m.display_path(),
            statements: body.len(),
            transaction: m.directives.transaction,
            duration_ms: ms,
            body: with_body.then(|| body.clone()),
        }
    }
}

/// What `up` or `down` did (or would do, for a dry run).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    /// Direction.
    pub direction: Direction,
    /// The batch recorded (`up`, when something ran); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<i64>,
    /// Steps done (or planned, for a dry run), in order.
    pub steps: Vec<StepReport>,
    /// Nothing was changed.
    pub dry_run: bool,
    /// Total time in ms.
    pub duration_ms: u64,
}

/// Which operator command produced an [`AdminReport`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminAction {
    /// `kiln baseline`.
    Baseline,
    /// `kiln retire`.
    Retire,
    /// `kiln repair`.
    Repair,
}

impl fmt::Display for AdminAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AdminAction::Baseline => "baseline",
            AdminAction::Retire => "retire",
            AdminAction::Repair => "repair",
        })
    }
}

/// One change an operator command made to the history (or the files).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum AdminChange {
    /// Recorded as applied without running (`baseline`).
    Baseline {
        /// Version.
        version: String,
        /// Description.
        name: String,
    },
    /// Removed from every plan (`retire`).
    Retired {
        /// Version.
        version: String,
        /// Description.
        name: String,
        /// State before (`applied`, `failed`, …, or `pending` when it had no entry).
        was: String,
    },
    /// A file renamed to `<file>.retired` by `retire`.
    Renamed {
        /// The file.
        from: String,
        /// Its new name.
        to: String,
    },
    /// A failed or interrupted entry removed: the migration is pending again.
    Removed {
        /// Version.
        version: String,
        /// Description.
        name: String,
        /// `failed` or `running`.
        was: State,
    },
    /// A failed or interrupted entry recorded as applied (completed by hand).
    MarkedApplied {
        /// Version.
        version: String,
        /// Description.
        name: String,
        /// `failed` or `running`.
        was: State,
        /// The state recorded now: `applied`, or `expanded` for a
        /// zero-downtime migration (its backfill is queued).
        now: State,
    },
    /// An applied migration's recorded checksum realigned with its file.
    Checksum {
        /// Version.
        version: String,
        /// Description.
        name: String,
        /// Checksum recorded before.
        from: String,
        /// The file's checksum, recorded now.
        to: String,
    },
}

impl fmt::Display for AdminChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let short = |c: &str| c.chars().take(12).collect::<String>();
        match self {
            AdminChange::Baseline { version, name } => write!(f, "{version} {name}: baseline"),
            AdminChange::Retired { version, name, was } => write!(f, "{version} {name}: {was} -> retired"),
            AdminChange::Renamed { from, to } => write!(f, "renamed {from} to {to}"),
            AdminChange::Removed { version, name, was } => write!(f, "{version} {name}: {was} entry removed; it is pending again"),
            AdminChange::MarkedApplied { version, name, was, now } => write!(f, "{version} {name}: {was} -> {now} (completed by hand)"),
            AdminChange::Checksum { version, name, from, to } => write!(f, "{version} {name}: checksum {} -> {}", short(from), short(to)),
        }
    }
}

/// What an operator command (baseline, retire, repair) changed; `changes` is
/// empty when there was nothing to do.
#[derive(Clone, Debug, Serialize)]
pub struct AdminReport {
    /// The command.
    pub action: AdminAction,
    /// Every change, in order.
    pub changes: Vec<AdminChange>,
}

/// A failed or interrupted migration found by `kiln check`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Serialize)]
pub struct CheckFailed {
    /// Version.
    pub version: String,
    /// Description.
    pub name: String,
    /// `failed` or `running`.
    pub state: String,
    /// The recorded error (`None`: interrupted).
    pub error: Option<String>,
}

impl fmt::Display for CheckFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}_{} ({}): {}", self.version, self.name, self.state, self.error.as_deref().unwrap_or("interrupted"))
    }
}

/// A plan problem found by `kiln check`, with its stable code.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// Stable machine code (`unknown_dependency`, …).
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub code: &'static str,
    /// The message.
    pub message: String,
}

/// An applied migration whose file changed or is gone, found by `kiln check`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Serialize)]
pub struct CheckChanged {
    /// Version.
    pub version: String,
    /// Description.
    pub name: String,
    /// True when the file is gone; false when it changed (checksum).
    pub missing: bool,
}

impl fmt::Display for CheckChanged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = if self.missing { "applied but its file is missing" } else { "file changed since it was applied" };
        write!(f, "{}_{}: {what}", self.version, self.name)
    }
}

/// A pending migration found by `kiln check`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Serialize)]
pub struct CheckPending {
    /// Version.
    pub version: String,
    /// Description.
    pub name: String,
    /// Older than the newest applied migration.
    pub out_of_order: bool,
}

impl fmt::Display for CheckPending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}_{}{}", self.version, self.name, if self.out_of_order { " (out of order)" } else { "" })
    }
}

/// What `kiln check` found. `ok` is false when anything below is non-empty
/// (warnings aside).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    /// Nothing wrong.
    pub ok: bool,
    /// Pending migrations.
    pub pending: Vec<CheckPending>,
    /// Failed or interrupted migrations, with their errors.
    pub failed: Vec<CheckFailed>,
    /// Applied migrations whose file changed, and applied migrations whose file is gone.
    pub changed: Vec<CheckChanged>,
    /// Other plan problems (bad dependencies).
    pub problems: Vec<Problem>,
    /// Contract errors and warnings.
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<Object>))]
    pub violations: Vec<Violation>,
    /// Differences between the live schema and the snapshot stored by the last run.
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<Object>))]
    pub drift: Vec<Change>,
    /// Whether a snapshot was stored to compare with.
    pub snapshot_found: bool,
    /// Whether a contract (schema.yaml) was checked.
    pub contract_checked: bool,
}

/// An error as data: what `--json` prints under `"error"`, what the HTTP API
/// returns, and what a fleet report records for a tenant that failed. The
/// same stable `code` as [`RunError::code`](crate::RunError::code).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ErrorReport {
    /// Stable machine code (`checksum_mismatch`, `lock_timeout`, `migration_failed`, …).
    pub code: String,
    /// The human message.
    pub message: String,
    /// What the CLI exits with: 1 the database/migration/check said no, 2 bad input.
    pub exit_code: i32,
    /// Every reason a plan was refused, with its own code.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<Problem>,
    /// The failed migration, when one failed (its fields sit beside `code`).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    // An optional flattened struct has no faithful JSON Schema (utoipa makes it
    // `oneOf [null, …]`, which an error without a failure violates): left out,
    // the extra properties are allowed.
    #[cfg_attr(feature = "openapi", schema(ignore))]
    pub failure: Option<MigrationFailure>,
}

/// Details of a failed migration inside an [`ErrorReport`].
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MigrationFailure {
    /// Version.
    pub version: String,
    /// File.
    pub file: String,
    /// 1-based statement or command, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub statement: Option<usize>,
    /// Line in the file, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    /// The database's own error code (SQLSTATE, MySQL number, MongoDB code).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_code: Option<String>,
    /// True when nothing of it remains; false when it is recorded as failed.
    pub rolled_back: bool,
    /// Contract violations, when the schema check failed it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<Object>))]
    pub violations: Vec<Violation>,
    /// Versions done in this run before it (applied for `up`, reverted for `down`).
    pub done_before_failure: Vec<String>,
}

impl From<&crate::error::RunError> for ErrorReport {
    fn from(e: &crate::error::RunError) -> Self {
        use crate::error::{FailureOutcome, RunError};
        let mut r = ErrorReport { code: e.code().to_string(), message: e.to_string(), exit_code: e.exit_code(), problems: vec![], failure: None };
        match e {
            RunError::Plan(ps) => r.problems = ps.iter().map(|p| Problem { code: p.code(), message: p.to_string() }).collect(),
            RunError::Migration { version, outcome, error, done } => {
                r.failure = Some(MigrationFailure {
                    version: version.text.clone(),
                    file: error.file.clone(),
                    statement: Some(error.statement),
                    line: Some(error.line),
                    database_code: error.code.clone(),
                    rolled_back: *outcome == FailureOutcome::RolledBack,
                    violations: vec![],
                    done_before_failure: done.iter().map(|d| d.text.clone()).collect(),
                })
            }
            RunError::Invalid { version, file, outcome, violations, done } => {
                r.failure = Some(MigrationFailure {
                    version: version.text.clone(),
                    file: file.clone(),
                    statement: None,
                    line: None,
                    database_code: None,
                    rolled_back: *outcome == FailureOutcome::RolledBack,
                    violations: violations.clone(),
                    done_before_failure: done.iter().map(|d| d.text.clone()).collect(),
                })
            }
            // Every bad file, one problem each (a single one too).
            RunError::Source(s) => r.problems = s.problems().iter().map(|p| Problem { code: p.code(), message: p.to_string() }).collect(),
            RunError::Engine(_) => {}
        }
        r
    }
}

/// One database of a fleet (DESIGN §5): the public database or a tenant.
/// Every event and report of a fleet run names its target.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(tag = "kind", content = "name", rename_all = "lowercase")]
pub enum TargetName {
    /// The public (shared) database.
    Public,
    /// A tenant's database or schema.
    Tenant(String),
}

impl fmt::Display for TargetName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetName::Public => f.write_str("public"),
            TargetName::Tenant(t) => write!(f, "tenant {t}"),
        }
    }
}

/// How one target of a fleet run ended.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum TargetResult {
    /// The run finished (possibly with nothing to do).
    Done {
        /// What it did.
        report: RunReport,
    },
    /// The run failed; other targets were not affected.
    Failed {
        /// Why.
        error: ErrorReport,
    },
    /// Not run (`--fail-fast` after another target failed, or cancelled).
    Skipped {
        /// Why.
        reason: String,
    },
}

/// One target's line of a [`FleetReport`].
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Serialize)]
pub struct TargetOutcome {
    /// Which database.
    pub target: TargetName,
    /// How it ended.
    #[serde(flatten)]
    pub result: TargetResult,
    /// Wall time on this target, lock wait included.
    pub duration_ms: u64,
}

/// A run over many databases (a tenant fleet, or the HTTP API's run of a
/// group): one outcome per target, in the order they finished.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Serialize)]
pub struct FleetReport {
    /// Every target.
    pub targets: Vec<TargetOutcome>,
    /// Wall time of the whole run.
    pub duration_ms: u64,
}

impl FleetReport {
    /// True when no target failed.
    pub fn ok(&self) -> bool {
        !self.targets.iter().any(|t| matches!(t.result, TargetResult::Failed { .. }))
    }

    /// The targets that failed.
    pub fn failed(&self) -> impl Iterator<Item = &TargetOutcome> {
        self.targets.iter().filter(|t| matches!(t.result, TargetResult::Failed { .. }))
    }
}

/// One table or collection as the HTTP API's status shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ObjectStatus {
    /// Table or collection name.
    pub name: String,
    /// Whether it exists.
    pub exists: bool,
    /// Rows (SQL) or documents (MongoDB).
    pub rows: u64,
    /// `true` when `rows` was counted; `false` when it is the database's
    /// estimate (catalog statistics), used where counting would scan a large table.
    pub exact: bool,
    /// Number of indexes.
    pub index_count: usize,
    /// Index names.
    pub indexes: Vec<String>,
}
