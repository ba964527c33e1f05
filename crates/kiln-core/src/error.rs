//! Typed errors, one enum per layer. Every message names the file, version or
//! statement concerned and, where there is one, the next step for the operator.

use std::path::PathBuf;
use std::time::Duration;

use crate::model::{FailureInfo, Version};

/// A problem with the migration files themselves, found before anything runs.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The migrations directory cannot be read.
    #[error("cannot read migrations directory {dir}: {source}")]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file cannot be read.
    #[error("cannot read {file}: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file name breaks the naming rule.
    #[error(
        "{file}: the name does not follow the naming rule {} (expected e.g. 0001_create_users.sql); rename it, or set `name_rule` in kiln.toml",
        cap(rule, MAX_QUOTED)
    )]
    BadName {
        /// The file.
        file: PathBuf,
        /// The rule (regex) it breaks.
        rule: String,
    },
    /// A file's version has more digits than a 64-bit number holds.
    #[error("{file}: the version {} is too large: kiln's versions are 64-bit numbers (at most {}, 20 digits); rename the file with a shorter version, e.g. a timestamp such as 20251101120000", cap(version, 40), u64::MAX)]
    VersionTooLarge {
        /// The file.
        file: PathBuf,
        /// The version as written.
        version: String,
    },
    /// Two files share a version.
    #[error("duplicate version {version}: {first} and {second}; every migration needs its own version")]
    DuplicateVersion {
        /// The version.
        version: Version,
        /// One file.
        first: PathBuf,
        /// The other.
        second: PathBuf,
    },
    /// The content cannot be parsed. The message is cut to [`MAX_QUOTED`]
    /// bytes: it may quote a value from the file, and a file may hold megabytes.
    #[error("{file}:{line}: {}", cap(message, MAX_QUOTED))]
    Parse {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The naming rule in the configuration is not a valid regex.
    #[error("invalid name_rule {:?}: {}", cap(rule, MAX_QUOTED), cap(message, MAX_QUOTED))]
    BadRule {
        /// The rule.
        rule: String,
        /// The regex error.
        message: String,
    },
    /// Several of the problems above, every one found in one pass over the
    /// directory (sorted by file). A single problem is never wrapped.
    #[error("{}", format_source_problems(.0))]
    Problems(Vec<SourceError>),
}

/// At most this many bytes of a value read from a file appear in a message.
pub const MAX_QUOTED: usize = 300;

/// `s` cut to at most `max` bytes (at a character boundary), followed by `…`
/// and the full length when it was longer: errors never repeat a huge value whole.
pub fn cap(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes in all)", &s[..end], s.len())
}

/// How many problems a message lists before "… and N more".
const MAX_LISTED: usize = 50;

fn format_source_problems(p: &[SourceError]) -> String {
    let mut s = format!("{} problems in the migration files:", p.len());
    for e in p.iter().take(MAX_LISTED) {
        s.push_str("\n  - ");
        s.push_str(&e.to_string());
    }
    if p.len() > MAX_LISTED {
        s.push_str(&format!("\n  … and {} more", p.len() - MAX_LISTED));
    }
    s
}

/// A reason the plan cannot go ahead, found by comparing files with the history.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    /// An applied migration's file changed.
    #[error("checksum mismatch for {file} (version {version}): recorded {recorded}, file now {found}. Applied migrations must not change; restore the file, or run `{}` to accept the change", crate::suggest::accept_checksum(.version))]
    ChecksumMismatch {
        /// Version.
        version: Version,
        /// File.
        file: String,
        /// Checksum in the history.
        recorded: String,
        /// Checksum of the file now.
        found: String,
    },
    /// An applied migration's file is gone.
    #[error("migration {version} ({name}) is applied in the database but its file is missing from the migrations directory; restore it, or run `{}`", crate::suggest::retire(.version))]
    MissingFile {
        /// Version.
        version: Version,
        /// Recorded script name.
        name: String,
    },
    /// A pending migration is older than the newest applied one.
    #[error("{file} (version {version}) is pending but older than the newest applied migration {newest}; give it a newer version, or run with --allow-out-of-order")]
    OutOfOrder {
        /// Version.
        version: Version,
        /// File.
        file: String,
        /// Newest applied version.
        newest: Version,
    },
    /// A dependency does not exist.
    #[error("{file}: depends on {dependency}, which is not a known migration")]
    UnknownDependency {
        /// File declaring it.
        file: String,
        /// The reference as written.
        dependency: String,
    },
    /// A dependency is not earlier than the dependent.
    #[error("{file}: depends on {dependency}, which has a later (or the same) version; a migration can only depend on earlier ones")]
    LaterDependency {
        /// File declaring it.
        file: String,
        /// The reference as written.
        dependency: String,
    },
    /// A dependency will not be applied before the dependent.
    #[error("{file}: depends on {dependency}, which is not applied and not part of this run ({why})")]
    UnmetDependency {
        /// File declaring it.
        file: String,
        /// The reference as written.
        dependency: String,
        /// Why it will not run.
        why: String,
    },
    /// A migration failed earlier and was not repaired.
    #[error("migration {version} ({file}) is recorded as {state}{}: {}. Fix the database by hand, then run `{}` (or `{}` if you completed it by hand)", .failure.as_ref().and_then(|f| f.statement).map(|s| format!(" at statement {s}")).unwrap_or_default(), .failure.as_ref().map(|f| f.message.as_str()).unwrap_or("the runner stopped before it finished"), crate::suggest::repair(.version), crate::suggest::repair_mark_applied(.version))]
    Blocked {
        /// Version.
        version: Version,
        /// File.
        file: String,
        /// `failed` or `running`.
        state: String,
        /// The recorded error.
        failure: Option<FailureInfo>,
    },
    /// `down` would revert a migration without a down section.
    #[error("{file} (version {version}) has no down section, so it is irreversible; nothing was reverted")]
    Irreversible {
        /// Version.
        version: Version,
        /// File.
        file: String,
    },
    /// `down` would revert a migration kiln did not apply.
    #[error("migration {version} is recorded as {state}; kiln only reverts migrations it applied, nothing was reverted")]
    NotRevertible {
        /// Version.
        version: Version,
        /// Its state.
        state: String,
    },
    /// A version named on the command line is unknown.
    #[error("no migration with version {version}{}", if .hint.is_empty() { String::new() } else { format!(" ({})", .hint) })]
    UnknownVersion {
        /// Version.
        version: String,
        /// More context.
        hint: String,
    },
    /// A migration cannot run on this engine (a `.yaml` migration on PostgreSQL).
    #[error("{file}: a {kind} migration cannot run on {engine}")]
    WrongKind {
        /// File.
        file: String,
        /// Kind of the file.
        kind: String,
        /// The engine.
        engine: String,
    },
    /// A version no history can store (every engine keeps versions as signed
    /// 64-bit integers).
    #[error("{file}: version {version} is larger than {}, the largest version kiln can store; give the file a smaller version", i64::MAX)]
    VersionTooLarge {
        /// File.
        file: String,
        /// The version as written.
        version: String,
    },
    /// Anything else the operator asked for that cannot be done.
    #[error("{0}")]
    Refused(String),
}

/// An error from the database layer.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The URL is not usable.
    #[error("invalid database URL {url}: {message}")]
    BadUrl {
        /// The URL, password redacted.
        url: String,
        /// Why.
        message: String,
    },
    /// The server cannot be reached or refused the connection.
    #[error("cannot connect to {url}: {message}")]
    Connect {
        /// The URL, password redacted.
        url: String,
        /// Why.
        message: String,
    },
    /// The lock was not acquired in time.
    #[error("another kiln run holds the migration lock on {target} ({holder}); waited {:.1}s. Try again when it finishes, or raise --lock-timeout / lock_timeout", .waited.as_secs_f64())]
    LockTimeout {
        /// What is locked (database / history table).
        target: String,
        /// Who holds it, as far as the database can tell.
        holder: String,
        /// How long we waited.
        waited: Duration,
    },
    /// The run lost the migration lock it held (MongoDB: its lease expired
    /// and another runner took it over, see docs/safety.md). kiln stopped
    /// before its next write or command; `context` says where, and what that left.
    #[error("lost the migration lock on {target} while {context}; the lock is now {holder}. kiln stopped and wrote nothing more. Once the other run has finished, run `kiln status`: a migration left `running` needs a look at the database, then `kiln repair <version>`")]
    LockLost {
        /// What is locked (database / history collection).
        target: String,
        /// Who holds the lock now, as far as the database can tell.
        holder: String,
        /// What kiln was about to do, and what it left.
        context: String,
    },
    /// A query of kiln's own (history, log, lock) failed.
    #[error("{context}: {message}")]
    Query {
        /// What kiln was doing.
        context: String,
        /// The database's message.
        message: String,
    },
    /// The connection was lost.
    #[error("lost the connection to the database while {context}: {message}")]
    ConnectionLost {
        /// What kiln was doing.
        context: String,
        /// The driver's message.
        message: String,
    },
    /// kiln refused what was asked, before doing any of it (a body the engine
    /// cannot run, a scratch name outside `kiln_`, `transaction: true` on a
    /// server without transactions). Never a failure of the database itself.
    #[error("{0}")]
    Refused(String),
}

/// A migration body failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{file}: statement {statement} (line {line}) failed: {message}")]
pub struct StatementError {
    /// The file.
    pub file: String,
    /// 1-based statement/command number.
    pub statement: usize,
    /// 1-based line in the file.
    pub line: usize,
    /// The database's error message, including its code.
    pub message: String,
    /// The database's error code (SQLSTATE, MySQL error number, MongoDB code).
    pub code: Option<String>,
}

/// Why a run stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Bad files.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The plan was refused; `problems` lists every reason (the first is the message).
    #[error("{}", format_problems(.0))]
    Plan(Vec<PlanError>),
    /// The database failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A migration failed.
    #[error("migration {version} failed ({outcome}): {error}")]
    Migration {
        /// Version.
        version: Version,
        /// What it did to the database and history.
        outcome: FailureOutcome,
        /// The statement error.
        error: StatementError,
        /// Versions successfully applied (or reverted) in this run before the failure.
        done: Vec<Version>,
    },
    /// A migration left the schema breaking the contract (`schema.yaml`).
    #[error("migration {version} ({file}) leaves the schema invalid ({outcome}):{}", .violations.iter().map(|v| format!("\n  - {v}")).collect::<String>())]
    Invalid {
        /// Version.
        version: Version,
        /// File.
        file: String,
        /// What it did to the database and history.
        outcome: FailureOutcome,
        /// The violations.
        violations: Vec<crate::schema::Violation>,
        /// Versions applied in this run before it.
        done: Vec<Version>,
    },
}

impl SourceError {
    /// A stable machine code (JSON output, HTTP API).
    pub fn code(&self) -> &'static str {
        match self {
            SourceError::BadName { .. } => "bad_name",
            SourceError::VersionTooLarge { .. } => "version_too_large",
            SourceError::DuplicateVersion { .. } => "duplicate_version",
            SourceError::Parse { .. } => "parse_error",
            SourceError::BadRule { .. } => "config",
            SourceError::Dir { .. } | SourceError::Read { .. } => "source_unreadable",
            // The first problem's code: a list of parse errors stays `parse_error`.
            SourceError::Problems(p) => p.first().map_or("parse_error", SourceError::code),
        }
    }

    /// Every problem this error stands for (itself, or the list it holds).
    pub fn problems(&self) -> &[SourceError] {
        match self {
            SourceError::Problems(p) => p,
            one => std::slice::from_ref(one),
        }
    }

    /// The file (or directory) concerned, relative to the migrations directory.
    pub fn path(&self) -> Option<&std::path::Path> {
        match self {
            SourceError::Dir { dir, .. } => Some(dir),
            SourceError::Read { file, .. }
            | SourceError::BadName { file, .. }
            | SourceError::Parse { file, .. }
            | SourceError::VersionTooLarge { file, .. } => Some(file),
            SourceError::DuplicateVersion { second, .. } => Some(second),
            SourceError::BadRule { .. } | SourceError::Problems(_) => None,
        }
    }

    /// One error for `problems` (sorted by file): the problem itself when there
    /// is one, [`SourceError::Problems`] when there are several.
    pub fn collect(mut problems: Vec<SourceError>) -> Option<SourceError> {
        problems.sort_by(|a, b| a.path().cmp(&b.path()));
        match problems.len() {
            0 => None,
            1 => problems.pop(),
            _ => Some(SourceError::Problems(problems)),
        }
    }
}

impl PlanError {
    /// A stable machine code (JSON output, HTTP API).
    pub fn code(&self) -> &'static str {
        match self {
            PlanError::ChecksumMismatch { .. } => "checksum_mismatch",
            PlanError::MissingFile { .. } => "missing_file",
            PlanError::OutOfOrder { .. } => "out_of_order",
            PlanError::UnknownDependency { .. } => "unknown_dependency",
            PlanError::LaterDependency { .. } => "later_dependency",
            PlanError::UnmetDependency { .. } => "unmet_dependency",
            PlanError::Blocked { .. } => "blocked_by_failed",
            PlanError::Irreversible { .. } => "irreversible",
            PlanError::NotRevertible { .. } => "not_revertible",
            PlanError::UnknownVersion { .. } => "unknown_version",
            PlanError::WrongKind { .. } => "wrong_kind",
            PlanError::VersionTooLarge { .. } => "version_too_large",
            PlanError::Refused(_) => "refused",
        }
    }
}

impl PlanError {
    /// 2 when the user's input is wrong (a file's `depends`, a `.yaml`
    /// migration on a SQL database, a version on the command line that names
    /// nothing or does not fit), 1 when the database's state refuses the plan
    /// (checksums, failed migrations, order, irreversible downs).
    pub fn exit_code(&self) -> i32 {
        match self {
            PlanError::UnknownDependency { .. }
            | PlanError::LaterDependency { .. }
            | PlanError::UnknownVersion { .. }
            | PlanError::WrongKind { .. }
            | PlanError::VersionTooLarge { .. } => 2,
            PlanError::ChecksumMismatch { .. }
            | PlanError::MissingFile { .. }
            | PlanError::OutOfOrder { .. }
            | PlanError::UnmetDependency { .. }
            | PlanError::Blocked { .. }
            | PlanError::Irreversible { .. }
            | PlanError::NotRevertible { .. }
            | PlanError::Refused(_) => 1,
        }
    }
}

impl EngineError {
    /// A stable machine code (JSON output, HTTP API).
    pub fn code(&self) -> &'static str {
        match self {
            EngineError::BadUrl { .. } => "bad_url",
            EngineError::Connect { .. } => "connect_failed",
            EngineError::LockTimeout { .. } => "lock_timeout",
            EngineError::LockLost { .. } => "lock_lost",
            EngineError::ConnectionLost { .. } => "connection_lost",
            EngineError::Query { .. } => "engine_error",
            EngineError::Refused(_) => "refused",
        }
    }
}

impl RunError {
    /// A stable machine code (JSON output, HTTP API): the same words wherever
    /// kiln reports this error.
    pub fn code(&self) -> &'static str {
        match self {
            RunError::Source(s) => s.code(),
            RunError::Plan(_) => "plan_refused",
            RunError::Engine(e) => e.code(),
            RunError::Migration { .. } => "migration_failed",
            RunError::Invalid { .. } => "schema_invalid",
        }
    }

    /// Versions applied (or reverted) in this run before it stopped.
    pub fn done(&self) -> &[Version] {
        match self {
            RunError::Migration { done, .. } | RunError::Invalid { done, .. } => done,
            _ => &[],
        }
    }

    /// 1 for a migration/check failure, 2 for bad usage or configuration.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Source(_) => 2,
            // The input must be fixed first when any problem is in it.
            RunError::Plan(p) => p.iter().map(PlanError::exit_code).max().unwrap_or(1),
            RunError::Engine(EngineError::BadUrl { .. }) => 2,
            _ => 1,
        }
    }
}

impl From<PlanError> for RunError {
    fn from(e: PlanError) -> Self {
        RunError::Plan(vec![e])
    }
}

fn format_problems(p: &[PlanError]) -> String {
    match p {
        [] => "plan refused".into(),
        [one] => one.to_string(),
        many => {
            let mut s = format!("{} problems, nothing was run:", many.len());
            for e in many {
                s.push_str("\n  - ");
                s.push_str(&e.to_string());
            }
            s
        }
    }
}

/// What a failed migration left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureOutcome {
    /// Rolled back completely; nothing of it remains and nothing is recorded as applied.
    RolledBack,
    /// Part of it may have been applied (non-transactional DDL); recorded as `failed`,
    /// and further runs are refused until `kiln repair`.
    RecordedFailed,
}

impl std::fmt::Display for FailureOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FailureOutcome::RolledBack => f.write_str("rolled back, nothing of it remains"),
            FailureOutcome::RecordedFailed => f.write_str(
                "it could not be rolled back: part of it remains in the database, as the message says; it is recorded as failed and kiln refuses to run until you fix the database and run `kiln repair`",
            ),
        }
    }
}
