//! The values kiln reasons about: versions, checksums, migrations on disk and
//! migrations recorded in a database.
//!
//! A migration on disk ([`Migration`]) and a migration recorded in the history
//! ([`AppliedMigration`]) are deliberately two types: one is what the files say,
//! the other what the database remembers, and the planner compares the two.

use std::fmt;
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A migration version: the leading number of its file name. Two versions are
/// the same version when their numbers are equal (`001` and `1`), and `Ord`
/// compares numbers; the order a set is *applied* in is its tool's
/// ([`Version::order`], [`Version::order_key`]).
///
/// The original digits are kept for display so `0001` stays `0001` and a diesel
/// version `2019-02-26-002946` is shown as `20190226002946`.
#[derive(Clone, Debug, Eq, Serialize, Deserialize)]
pub struct Version {
    /// The numeric value; equality and `Ord` use this alone.
    pub number: u64,
    /// The digits as written in the file name (dashes removed).
    pub text: String,
    /// How the tool whose layout the file follows orders versions.
    #[serde(default, skip)]
    pub order: VersionOrder,
}

/// How a migration tool orders its versions, so a set written for it is
/// applied in its order (issue 13: diesel compares version *strings*, so its
/// 18-digit `2025-11-19-091444-0000` names sort before `2025-12-01-000000`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum VersionOrder {
    /// By number: kiln, golang-migrate, sqlx, goose, refinery.
    #[default]
    Number,
    /// By the digits as text (dashes removed): diesel.
    Text,
}

impl Version {
    /// A version from its number, displayed without padding.
    pub fn from_number(number: u64) -> Self {
        Version { number, text: number.to_string(), order: VersionOrder::Number }
    }

    /// A version from its number and digits as written, ordered by number.
    pub fn new(number: u64, text: impl Into<String>) -> Self {
        Version { number, text: text.into(), order: VersionOrder::Number }
    }

    /// The key this version sorts by in its tool's order: the number, or the
    /// digits as text. Keys of one [`VersionOrder`] compare as that tool
    /// compares versions; a set of migrations is ordered with one kind only
    /// (the loader sees to it).
    pub fn order_key(&self) -> (u64, &str) {
        match self.order {
            VersionOrder::Number => (self.number, ""),
            VersionOrder::Text => (0, &self.text),
        }
    }

    /// Parse a version as typed by a user on the command line (`0007`, `7`,
    /// `2019-02-26-002946`, or a whole migration name `0007_add_users`).
    pub fn parse_arg(s: &str) -> Option<Self> {
        let head = s.split('_').next().unwrap_or("");
        let digits: String = head.chars().filter(|c| *c != '-').collect();
        if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        let number = digits.parse().ok()?;
        Some(Version::new(number, digits))
    }
}

impl PartialEq for Version {
    fn eq(&self, other: &Self) -> bool {
        self.number == other.number
    }
}
impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Version {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.number.cmp(&other.number)
    }
}
impl std::hash::Hash for Version {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.number.hash(state)
    }
}
impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// SHA-256 of a migration's content with line endings normalised to `\n`,
/// as lower-case hex.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Checksum(pub String);

impl Checksum {
    /// Checksum of one or more content parts (a single file, or an up file and a
    /// down file). Line endings are normalised so a checkout with CRLF endings
    /// does not look like a changed migration.
    pub fn of_parts(parts: &[&str]) -> Self {
        let mut h = Sha256::new();
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                // A separator no file can contain, so ("ab","c") != ("a","bc").
                h.update(b"\n\x00kiln:part\x00\n");
            }
            let mut rest = *p;
            while let Some(pos) = rest.find('\r') {
                h.update(&rest.as_bytes()[..pos]);
                let after = &rest[pos + 1..];
                if after.starts_with('\n') {
                    rest = after;
                } else {
                    h.update(b"\n");
                    rest = after;
                }
            }
            h.update(rest.as_bytes());
        }
        let digest = h.finalize();
        // Hex by table: `write!("{:02x}")` per byte cost more than the hashing
        // itself when a no-op `up` checksums a thousand files.
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(64);
        for b in digest {
            s.push(HEX[(b >> 4) as usize] as char);
            s.push(HEX[(b & 15) as usize] as char);
        }
        Checksum(s)
    }

    /// The first 12 hex digits, for tables.
    pub fn short(&self) -> &str {
        &self.0[..self.0.len().min(12)]
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What kind of content a migration holds, which decides which engines can run it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// SQL text (PostgreSQL, MySQL/MariaDB, SQLite).
    Sql,
    /// A list of MongoDB database commands (YAML or JSON).
    Commands,
    /// Rust code registered through the library.
    Code,
}

/// How a migration asks to be run with respect to transactions.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TxMode {
    /// The engine's default: a transaction where the engine can (SQL), none on MongoDB.
    #[default]
    Default,
    /// `transaction: false` / `-- kiln:transaction off`: run statement by statement.
    Off,
    /// `transaction: true`: ask for a transaction (MongoDB multi-document transaction).
    On,
}

/// Where a migration runs in a multi-tenant deployment (DESIGN §5).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// The public (shared) database; the only scope of a single-database setup.
    #[default]
    Public,
    /// Every tenant database or schema.
    Tenant,
}

/// One SQL statement of a migration body, with the line it starts on in its file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Statement {
    /// The statement text, without the terminating `;`.
    pub sql: String,
    /// 1-based line in the file where the statement starts.
    pub line: usize,
}

/// One MongoDB command of a migration body, with the line it starts on.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Command {
    /// The command document as (Extended) JSON, exactly as `db.runCommand()` takes it.
    pub doc: serde_json::Value,
    /// 1-based line in the file where the command starts (0 when unknown, e.g. JSON).
    pub line: usize,
}

/// The runnable content of one direction (up or down) of a migration.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Body {
    /// SQL statements in order.
    Sql {
        /// The file the statements come from (relative to the migrations directory).
        file: PathBuf,
        /// The statements.
        statements: Vec<Statement>,
    },
    /// MongoDB commands in order.
    Commands {
        /// The file the commands come from.
        file: PathBuf,
        /// The commands.
        commands: Vec<Command>,
    },
    /// A Rust migration registered through the library; run by its registered code.
    Code {
        /// The registered migration ([`crate::code`]).
        code: crate::code::CodeRef,
    },
}

impl Body {
    /// Number of statements or commands.
    pub fn len(&self) -> usize {
        match self {
            Body::Sql { statements, .. } => statements.len(),
            Body::Commands { commands, .. } => commands.len(),
            Body::Code { .. } => 1,
        }
    }
    /// True when there is nothing to run.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A reference from one migration to another in `depends`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DependsOn {
    /// The version referred to.
    pub version: Version,
    /// The reference as written (for messages).
    pub written: String,
    /// 1-based line of the directive.
    pub line: usize,
}

/// Header directives of a migration (DESIGN §2).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Directives {
    /// Migrations that must be applied first.
    pub depends: Vec<DependsOn>,
    /// Transaction mode.
    pub transaction: TxMode,
    /// Public or tenant.
    pub scope: Scope,
    /// Group (schema/collection) the migration belongs to.
    pub group: Option<String>,
}

impl Directives {
    /// Complete the header's directives with where the file sits: its folder
    /// is the group unless `group` says otherwise, and `tenant/` makes it
    /// tenant-scoped.
    pub fn placed(mut self, folder_group: Option<&str>, folder_scope: Scope) -> Directives {
        if self.group.is_none() {
            self.group = folder_group.map(str::to_string);
        }
        if folder_scope == Scope::Tenant {
            self.scope = Scope::Tenant;
        }
        self
    }
}

/// A migration as found on disk (or registered in code): what *should* be run.
#[derive(Clone, Debug, Serialize)]
pub struct Migration {
    /// Version from the file name.
    pub version: Version,
    /// Description: the part of the name after the first `_`.
    pub description: String,
    /// Path relative to the migrations directory (the file, or the diesel folder).
    pub path: PathBuf,
    /// What the body is.
    pub kind: Kind,
    /// Checksum of everything kiln would run for this migration.
    pub checksum: Checksum,
    /// Header directives.
    pub directives: Directives,
    /// The up body.
    pub up: Body,
    /// The down body; `None` means irreversible. For a zero-downtime
    /// migration: its `rollback`, which undoes `expand` before contract.
    pub down: Option<Body>,
    /// The other parts of a zero-downtime migration (`up` is its `expand`);
    /// `None` for an ordinary migration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phases: Option<Box<crate::jobs::Phases>>,
}

impl Migration {
    /// `0001_create_users` — version text and description.
    pub fn name(&self) -> String {
        format!("{}_{}", self.version, self.description)
    }
    /// The path as shown in messages.
    pub fn display_path(&self) -> String {
        self.path.display().to_string()
    }
}

/// State of a migration in the history.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Ran successfully.
    Applied,
    /// Ran and failed where the engine could not roll it back; blocks runs until `kiln repair`.
    Failed,
    /// Started and never finished (the runner died mid-migration on an engine
    /// without transactional DDL); treated like `Failed`.
    Running,
    /// Recorded as applied by `kiln baseline` without running.
    Baseline,
    /// Removed from every plan by `kiln retire`.
    Retired,
    /// A zero-downtime migration whose `expand` ran; its backfill job runs or
    /// is queued, and `kiln contract` finishes it (DESIGN §4).
    Expanded,
    /// A zero-downtime migration whose `contract` ran: final, like `applied`.
    Contracted,
}

impl State {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Applied => "applied",
            State::Failed => "failed",
            State::Running => "running",
            State::Baseline => "baseline",
            State::Retired => "retired",
            State::Expanded => "expanded",
            State::Contracted => "contracted",
        }
    }
    /// Parse the stored spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "applied" => State::Applied,
            "failed" => State::Failed,
            "running" => State::Running,
            "baseline" => State::Baseline,
            "retired" => State::Retired,
            "expanded" => State::Expanded,
            "contracted" => State::Contracted,
            _ => return None,
        })
    }
    /// True for states that mean "this migration's effects are in the database".
    pub fn is_done(self) -> bool {
        matches!(self, State::Applied | State::Baseline | State::Expanded | State::Contracted)
    }
    /// True for states that block every run until `kiln repair`.
    pub fn is_blocking(self) -> bool {
        matches!(self, State::Failed | State::Running)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a failure happened, recorded with a failed migration.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureInfo {
    /// The database's message (with its code).
    pub message: String,
    /// 1-based number of the failing statement/command in its body.
    pub statement: Option<u32>,
    /// 1-based line in the file where that statement starts.
    pub line: Option<u32>,
}

/// A migration as recorded in the history: what the database remembers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AppliedMigration {
    /// The version (number; `text` is the number without padding unless the file is known).
    pub version: Version,
    /// The description recorded.
    pub description: String,
    /// The script path recorded (relative to the migrations directory).
    pub script: String,
    /// The group recorded, if any.
    pub group: Option<String>,
    /// Checksum at the time it was recorded.
    pub checksum: Checksum,
    /// State.
    pub state: State,
    /// Batch number: one `kiln up` run is one batch.
    pub batch: i64,
    /// When it finished (or failed).
    pub applied_at: DateTime<Utc>,
    /// How long it took, in milliseconds.
    pub duration_ms: i64,
    /// `user@host` of the runner.
    pub applied_by: String,
    /// kiln version that recorded it.
    pub kiln_version: String,
    /// The failure, for `failed` entries.
    pub error: Option<FailureInfo>,
}

/// What an event-log entry records. Stored as its [`LogEvent::as_str`] spelling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogEvent {
    /// A run (`up`, `down`) took the lock and starts changing the database.
    RunStart,
    /// A run ended (successfully or not); committed durably.
    RunEnd,
    /// A migration (or phase) was applied.
    Applied,
    /// A migration was reverted.
    Reverted,
    /// A migration failed.
    Failed,
    /// `kiln repair` changed an entry.
    Repair,
    /// `kiln baseline` recorded migrations without running them.
    Baseline,
    /// `kiln retire` retired a migration.
    Retire,
    /// A runner took over an expired lock lease (MongoDB).
    LockTakeover,
}

impl LogEvent {
    /// Every event, for parsing and documentation.
    pub const ALL: [LogEvent; 9] = [
        LogEvent::RunStart,
        LogEvent::RunEnd,
        LogEvent::Applied,
        LogEvent::Reverted,
        LogEvent::Failed,
        LogEvent::Repair,
        LogEvent::Baseline,
        LogEvent::Retire,
        LogEvent::LockTakeover,
    ];

    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            LogEvent::RunStart => "run-start",
            LogEvent::RunEnd => "run-end",
            LogEvent::Applied => "applied",
            LogEvent::Reverted => "reverted",
            LogEvent::Failed => "failed",
            LogEvent::Repair => "repair",
            LogEvent::Baseline => "baseline",
            LogEvent::Retire => "retire",
            LogEvent::LockTakeover => "lock-takeover",
        }
    }

    /// Parse the stored spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == s)
    }
}

impl fmt::Display for LogEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A row for the append-only event log (`kiln_log`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    /// When.
    pub at: DateTime<Utc>,
    /// What happened (stored as [`LogEvent::as_str`]).
    pub event: LogEvent,
    /// The migration concerned, if any.
    pub version: Option<u64>,
    /// Its name, if any.
    pub name: Option<String>,
    /// The batch concerned, if any.
    pub batch: Option<i64>,
    /// Who (`user@host`).
    pub actor: String,
    /// Why (operator's reason), if given.
    pub reason: Option<String>,
    /// Details (error message, old/new checksum).
    pub detail: Option<String>,
}

/// `user@host` of this process; `KILN_ACTOR` overrides it.
pub fn current_actor() -> String {
    if let Ok(a) = std::env::var("KILN_ACTOR") {
        if !a.trim().is_empty() {
            return a;
        }
    }
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("USERNAME"))
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(user_from_passwd)
        .unwrap_or_else(|| "unknown".into());
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    format!("{user}@{host}")
}

/// The user name of this process's uid, from /etc/passwd (services often run without $USER).
fn user_from_passwd() -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let uid = std::fs::metadata("/proc/self").ok()?.uid().to_string();
        let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
        passwd.lines().find_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let _pw = f.next()?;
            (f.next()? == uid).then(|| name.to_string())
        })
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// The kiln version string recorded with every migration.
pub const KILN_VERSION: &str = env!("CARGO_PKG_VERSION");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_ignores_line_endings() {
        let a = Checksum::of_parts(&["create table t (id int);\nselect 1;\n"]);
        let b = Checksum::of_parts(&["create table t (id int);\r\nselect 1;\r\n"]);
        assert_eq!(a, b);
        assert_eq!(a.0.len(), 64);
        let c = Checksum::of_parts(&["create table t (id int);\nselect 2;\n"]);
        assert_ne!(a, c);
    }

    #[test]
    fn checksum_parts_are_separated() {
        assert_ne!(Checksum::of_parts(&["ab", "c"]), Checksum::of_parts(&["a", "bc"]));
        assert_ne!(Checksum::of_parts(&["abc"]), Checksum::of_parts(&["abc", ""]));
    }

    #[test]
    fn checksum_of_known_input() {
        // sha256("abc")
        assert_eq!(Checksum::of_parts(&["abc"]).0, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn version_parse_arg() {
        assert_eq!(Version::parse_arg("0007").unwrap().number, 7);
        assert_eq!(Version::parse_arg("0007_add_users").unwrap().number, 7);
        assert_eq!(Version::parse_arg("2019-02-26-002946").unwrap().number, 20190226002946);
        assert!(Version::parse_arg("abc").is_none());
        assert!(Version::parse_arg("").is_none());
    }

    #[test]
    fn text_order_is_string_order() {
        let t = |s: &str| Version { order: VersionOrder::Text, ..Version::parse_arg(s).unwrap() };
        // diesel's new 18-digit names sort by string among its 14-digit ones.
        let new = t("2025-11-19-091444-0000");
        let later_old = t("2025-12-01-000000");
        assert!(new.order_key() < later_old.order_key());
        assert!(new > later_old, "Ord still compares numbers");
        assert!(t("1").order_key() < t("10").order_key());
        assert!(t("10").order_key() < t("2").order_key());
        assert!(t("00000000000000").order_key() < t("20190226002946").order_key());
        let n = |s: &str| Version::parse_arg(s).unwrap();
        assert!(n("2").order_key() < n("10").order_key());
    }
}
