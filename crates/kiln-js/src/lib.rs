//! kiln's embedded JavaScript engine: runs migrate-mongo projects as they are.
//!
//! A migrate-mongo migration is a JavaScript (or TypeScript) module exporting
//! `up(db, client)` and `down(db, client)`, written against the Node.js MongoDB
//! driver. This crate runs such modules on QuickJS (through `rquickjs`), with
//! no Node.js installed: TypeScript types are stripped at load (`oxc`), ES
//! modules and CommonJS both work, and `db` / `client` are a JavaScript API
//! modelled on the Node.js driver (src/prelude.js) over one native: run a
//! database command with the Rust MongoDB driver.
//!
//! The design decision to know: **the JavaScript runs on a thread of its own
//! and every database call blocks that thread** (on the caller's tokio
//! runtime, through its handle). A QuickJS runtime is not `Send`, kiln's
//! engines are; and a migration's `await db.collection(…).updateMany(…)`
//! then needs no bridge between QuickJS promises and Rust futures: the
//! promise is already settled when the call returns. Migrations run one
//! command at a time anyway.
//!
//! Limits: every evaluation has a memory limit and a deadline; a runaway loop
//! is interrupted, a command waiting on the server is cut off at the deadline.

#![warn(missing_docs)]

mod host;
mod modules;
mod mongo;
pub mod transpile;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use host::Level;

/// Limits of one evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Memory the JavaScript heap may use, in bytes.
    pub memory: usize,
    /// Wall-clock time one migration (or config file) may take, database commands included.
    pub timeout: Duration,
}

impl Default for Limits {
    /// 512 MiB and 1 hour: far above what a migration needs, low enough that a
    /// runaway script stops.
    fn default() -> Self {
        Limits { memory: 512 << 20, timeout: Duration::from_secs(3600) }
    }
}

/// Why a script failed, with where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}{}", location(file, *line), message)]
pub struct ScriptError {
    /// The file the error points at (as the user would write it: relative to
    /// the working directory when inside it).
    pub file: String,
    /// 1-based line in that file, when known.
    pub line: Option<u32>,
    /// What went wrong, and what to do.
    pub message: String,
    /// Write commands the script had sent before it failed (0: the database
    /// is as it was before the script started).
    pub writes: u64,
}

fn location(file: &str, line: Option<u32>) -> String {
    match (file.is_empty(), line) {
        (true, _) => String::new(),
        (false, Some(l)) => format!("{file}:{l}: "),
        (false, None) => format!("{file}: "),
    }
}

/// Where console output goes: `(level, file, text)`.
pub type LogSink = std::sync::Arc<dyn Fn(Level, &str, &str) + Send + Sync>;

/// Console output to `tracing` (target `kiln::js`): `console.log` at info,
/// `console.warn` at warn, `console.error` at error.
pub fn tracing_sink() -> LogSink {
    std::sync::Arc::new(|level, file, text| match level {
        Level::Debug => tracing::debug!(target: "kiln::js", file, "{text}"),
        Level::Info => tracing::info!(target: "kiln::js", file, "{text}"),
        Level::Warn => tracing::warn!(target: "kiln::js", file, "{text}"),
        Level::Error => tracing::error!(target: "kiln::js", file, "{text}"),
    })
}

/// What a migrate-mongo config file says (`migrate-mongo-config.js`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MigrateMongoConfig {
    /// `mongodb.url`.
    pub url: Option<String>,
    /// `mongodb.databaseName`.
    pub database: Option<String>,
    /// `migrationsDir` (default `migrations`).
    pub migrations_dir: String,
    /// `changelogCollectionName` (default `changelog`).
    pub changelog: String,
    /// `lockCollectionName` (default `changelog_lock`): migrate-mongo's lock,
    /// which kiln does not use (kiln has its own lease lock).
    pub lock_collection: String,
    /// `migrationFileExtension` (default `.js`).
    pub extension: String,
    /// `useFileHash` (default false).
    pub use_file_hash: bool,
    /// `moduleSystem` (`commonjs` or `esm`; kiln tells each file apart itself).
    pub module_system: Option<String>,
}

/// Evaluate a migrate-mongo config file (CommonJS or ES module, possibly a
/// promise) with `env` as `process.env`, and read its settings.
///
/// # Errors
/// [`ScriptError`] naming the file and line for a file that does not
/// evaluate, or a value that is not a config (e.g. no `mongodb.url`).
pub fn read_config(path: &Path, env: BTreeMap<String, String>, limits: Limits) -> Result<MigrateMongoConfig, ScriptError> {
    let value = host::Host::run_config(path, env, limits)?;
    let err = |message: String| ScriptError { file: host::display_path(path), line: None, message, writes: 0 };
    let serde_json::Value::Object(cfg) = value else {
        return Err(err("the config file must export an object (module.exports = { mongodb: { url, databaseName }, … })".into()));
    };
    let text = |v: Option<&serde_json::Value>| v.and_then(|v| v.as_str()).map(str::to_string);
    let mongodb = cfg.get("mongodb").and_then(|m| m.as_object());
    let extension = text(cfg.get("migrationFileExtension")).unwrap_or_else(|| ".js".into());
    if !extension.starts_with('.') {
        return Err(err(format!("migrationFileExtension {extension:?} must start with a dot (e.g. \".js\")")));
    }
    Ok(MigrateMongoConfig {
        url: text(mongodb.and_then(|m| m.get("url"))),
        database: text(mongodb.and_then(|m| m.get("databaseName"))),
        migrations_dir: text(cfg.get("migrationsDir")).unwrap_or_else(|| "migrations".into()),
        changelog: text(cfg.get("changelogCollectionName")).unwrap_or_else(|| "changelog".into()),
        lock_collection: text(cfg.get("lockCollectionName")).unwrap_or_else(|| "changelog_lock".into()),
        extension,
        use_file_hash: cfg.get("useFileHash").and_then(|v| v.as_bool()).unwrap_or(false),
        module_system: text(cfg.get("moduleSystem")),
    })
}

/// Load a migration module without a database, as `kiln status` and
/// `--dry-run` do: every `require`/`import` resolves (an npm package that is
/// not there is an error now, not half-way through a run), the top level
/// evaluates, and `up` and `down` are functions.
///
/// # Errors
/// [`ScriptError`] naming the file and line.
pub fn check_migration(path: &Path, limits: Limits) -> Result<(), ScriptError> {
    check_migrations(&[path.to_path_buf()], limits).pop().unwrap_or(Ok(()))
}

/// [`check_migration`] for many modules, in one JavaScript runtime (a
/// helper they share is loaded once): the result of each, in order.
pub fn check_migrations(paths: &[PathBuf], limits: Limits) -> Vec<Result<(), ScriptError>> {
    host::Host::check_all(paths, limits)
}

/// One migration to run.
pub struct Run {
    /// The module.
    pub path: PathBuf,
    /// `up` or `down`.
    pub function: String,
    /// The client whose connections the script uses (kiln's).
    pub client: mongodb::Client,
    /// The database passed as `db`.
    pub database: String,
    /// Limits.
    pub limits: Limits,
    /// Console output.
    pub log: LogSink,
}

/// What a successful run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Commands sent.
    pub commands: u64,
    /// Write commands among them.
    pub writes: u64,
}

/// Run `run.function(db, client)` of the module at `run.path` and wait for
/// its promise. The JavaScript runs on a thread of its own; database commands
/// run on the caller's tokio runtime.
///
/// # Errors
/// [`ScriptError`] with the file and line of the failure and how many write
/// commands had been sent before it.
///
/// # Panics
/// Outside a tokio runtime.
pub async fn run_migration(run: Run) -> Result<Report, ScriptError> {
    let handle = tokio::runtime::Handle::current();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let path = run.path.clone();
    let spawned = std::thread::Builder::new().name("kiln-js".into()).stack_size(16 << 20).spawn(move || {
        let _ = tx.send(host::Host::run_migration(run, handle));
    });
    if let Err(e) = spawned {
        return Err(ScriptError {
            file: host::display_path(&path),
            line: None,
            message: format!("cannot start the JavaScript thread: {e}"),
            writes: 0,
        });
    }
    rx.await.unwrap_or_else(|_| {
        Err(ScriptError {
            file: host::display_path(&path),
            line: None,
            message: "the JavaScript engine stopped without an answer (it panicked)".into(),
            writes: 0,
        })
    })
}
