//! Rust-code migrations: transforms no file expresses, registered through the
//! library and run by every engine under the same history, lock and
//! immutability rules as files.
//!
//! A code migration declares its version, name and a **checksum string**; kiln
//! records the SHA-256 of that string, so changing the string after the
//! migration was applied is refused exactly like an edited file (change it
//! whenever the code's effect changes). It runs through the engine's step
//! protocol ([`crate::step`]): inside the step's transaction where the engine
//! has one (PostgreSQL and SQLite by default; MongoDB with
//! [`CodeMigration::transaction`] returning [`TxMode::On`] on a replica set),
//! otherwise on the intent path, where a failure leaves the migration `failed`
//! (kiln cannot know what the code changed before it failed).
//!
//! The code gets a [`CodeContext`]: SQL `execute`/`query` on the step's
//! connection (and transaction) on SQL engines, database commands on MongoDB.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;

use crate::error::SourceError;
use crate::model::{Body, Checksum, Directives, Kind, Migration, Scope, TxMode};

/// What a code migration's `up`/`down` returns on failure; its text is
/// recorded as the migration's error.
pub type CodeError = Box<dyn std::error::Error + Send + Sync>;

/// One row of [`CodeContext::query`]: column name → value (`null`, a
/// boolean, a number, a string; JSON columns as JSON).
pub type Row = serde_json::Map<String, serde_json::Value>;

/// The handle a code migration changes the database with: the step's own
/// connection, inside the step's transaction when it has one. Methods that do
/// not apply to the engine return an error saying so.
#[async_trait]
pub trait CodeContext: Send {
    /// `postgres`, `mysql`, `sqlite` or `mongodb`.
    fn engine(&self) -> &'static str;

    /// SQL engines: run one or more statements (no parameters; values are
    /// part of the text), returning the rows affected where the engine says.
    async fn execute(&mut self, sql: &str) -> Result<u64, CodeError>;

    /// SQL engines: run a query and return its rows.
    async fn query(&mut self, sql: &str) -> Result<Vec<Row>, CodeError>;

    /// MongoDB: run one database command, exactly as `db.runCommand()` takes it
    /// (Extended JSON, as in a YAML migration), and return the server's reply
    /// (relaxed Extended JSON). A reply with `ok: 0` or write errors is an error.
    async fn run_command(&mut self, command: serde_json::Value) -> Result<serde_json::Value, CodeError>;

    /// The engine's own handle, for what the methods above cannot express:
    /// on MongoDB a `kiln_mongo::CodeHandle` (the driver's `Database` and the
    /// transaction's session; `kiln_mongo::handle(ctx)` downcasts it), `None`
    /// on SQL engines.
    fn native(&mut self) -> Option<&mut (dyn std::any::Any + Send)> {
        None
    }
}

/// A migration written in Rust.
///
/// ```
/// use kiln_core::code::{CodeContext, CodeError, CodeMigration};
///
/// struct LowercaseEmails;
///
/// #[async_trait::async_trait]
/// impl CodeMigration for LowercaseEmails {
///     fn version(&self) -> &str { "0007" }
///     fn name(&self) -> &str { "lowercase_emails" }
///     // Change this string whenever the code's effect changes.
///     fn checksum(&self) -> &str { "lowercase emails v1" }
///     async fn up(&self, db: &mut dyn CodeContext) -> Result<(), CodeError> {
///         db.execute("UPDATE users SET email = lower(email)").await?;
///         Ok(())
///     }
/// }
/// ```
#[async_trait]
pub trait CodeMigration: Send + Sync + 'static {
    /// The version, as in a file name (`0007`, `20251101120000`); ordered
    /// with the file migrations by its number.
    fn version(&self) -> &str;
    /// The description (lower-case snake, like a file's).
    fn name(&self) -> &str;
    /// The declared checksum string (kiln records its SHA-256): an applied
    /// migration whose string changed is refused like an edited file.
    fn checksum(&self) -> &str;
    /// The group (schema/collection) it belongs to, for `--group` and status.
    fn group(&self) -> Option<&str> {
        None
    }
    /// Transaction mode, as `-- kiln:transaction` for a file.
    fn transaction(&self) -> TxMode {
        TxMode::Default
    }
    /// True when [`CodeMigration::down`] reverts `up` (`kiln down` refuses an
    /// irreversible migration, as for a file without a down section).
    fn reversible(&self) -> bool {
        false
    }
    /// Apply the change.
    async fn up(&self, db: &mut dyn CodeContext) -> Result<(), CodeError>;
    /// Revert it (only called when [`CodeMigration::reversible`]).
    async fn down(&self, db: &mut dyn CodeContext) -> Result<(), CodeError> {
        let _ = db;
        Err(format!("{}_{} has no down", self.version(), self.name()).into())
    }
}

/// A registered code migration inside a [`Body::Code`].
#[derive(Clone)]
pub struct CodeRef(pub Arc<dyn CodeMigration>);

impl fmt::Debug for CodeRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CodeRef({}_{})", self.0.version(), self.0.name())
    }
}

impl PartialEq for CodeRef {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
            || (self.0.version() == other.0.version() && self.0.name() == other.0.name() && self.0.checksum() == other.0.checksum())
    }
}

impl Serialize for CodeRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}_{}", self.0.version(), self.0.name()))
    }
}

impl CodeRef {
    /// Run the code of `direction` with `db`.
    ///
    /// # Errors
    /// The code's.
    pub async fn run(&self, direction: crate::event::Direction, db: &mut dyn CodeContext) -> Result<(), CodeError> {
        match direction {
            crate::event::Direction::Up => self.0.up(db).await,
            crate::event::Direction::Down => self.0.down(db).await,
        }
    }
}

/// The path a code migration shows in messages and records in the history
/// (`code:0007_lowercase_emails`): no file has it.
pub fn code_path(version: &str, name: &str) -> PathBuf {
    PathBuf::from(format!("code:{version}_{name}"))
}

/// The [`Migration`] of a registered code migration.
///
/// # Errors
/// [`SourceError::BadName`] for a version that is not a number or a name that
/// is empty.
pub fn migration(code: Arc<dyn CodeMigration>) -> Result<Migration, SourceError> {
    let path = code_path(code.version(), code.name());
    let stem = format!("{}_{}", code.version(), code.name());
    let (version, description) = match crate::source::split_version(&stem) {
        Some((v, d)) if !d.is_empty() && v.text == code.version() => (v, d),
        _ => {
            return Err(SourceError::BadName {
                file: path,
                rule: "a code migration's version is digits (e.g. \"0007\") and its name a non-empty description".into(),
            })
        }
    };
    let checksum = Checksum::of_parts(&["kiln code migration", code.checksum()]);
    let directives =
        Directives { depends: Vec::new(), transaction: code.transaction(), scope: Scope::Public, group: code.group().map(str::to_string) };
    let reversible = code.reversible();
    let body = Body::Code { code: CodeRef(code) };
    Ok(Migration {
        version,
        description,
        path,
        kind: Kind::Code,
        checksum,
        directives,
        down: reversible.then(|| body.clone()),
        up: body,
        phases: None,
    })
}

/// File migrations and code migrations in one list, ordered by version.
///
/// # Errors
/// A code migration that cannot be read ([`migration`]), or a version used
/// twice (by two code migrations, or by a file and a code migration).
pub fn merge(mut files: Vec<Migration>, code: &[Arc<dyn CodeMigration>]) -> Result<Vec<Migration>, SourceError> {
    let mut problems = Vec::new();
    for c in code {
        match migration(c.clone()) {
            Ok(m) => files.push(m),
            Err(e) => problems.push(e),
        }
    }
    files.sort_by(|a, b| a.version.cmp(&b.version));
    for w in files.windows(2) {
        if w[0].version == w[1].version {
            problems.push(SourceError::DuplicateVersion { version: w[1].version.clone(), first: w[0].path.clone(), second: w[1].path.clone() });
        }
    }
    match SourceError::collect(problems) {
        Some(e) => Err(e),
        None => Ok(files),
    }
}

/// The error of a code migration, as a failed statement (statement 1, line 0).
pub fn failure(step_path: &str, message: impl fmt::Display) -> crate::error::StatementError {
    crate::error::StatementError { file: step_path.to_string(), statement: 1, line: 0, message: format!("the code failed: {message}"), code: None }
}
