//! kiln: database migrations for MongoDB, PostgreSQL, MySQL/MariaDB and SQLite,
//! as a library and as the `kiln` command.
//!
//! The design decision to know: the library and the CLI are the same code path.
//! [`Kiln`] resolves configuration, loads the migrations, connects with
//! [`connect`] and hands both to [`kiln_core::Runner`], which plans under the
//! lock. The library never prints; pass an [`Observer`] to see progress.
//!
//! ```no_run
//! # async fn start() -> Result<(), Box<dyn std::error::Error>> {
//! // At application start: apply pending migrations under the lock.
//! let report = kiln::Kiln::new("postgres://app@localhost/app").dir("migrations").up().await?;
//! println!("applied {} migrations", report.steps.len());
//! # Ok(()) }
//! ```

#![warn(missing_docs)]
// `RunError` is large by design (see kiln-core).
#![allow(clippy::result_large_err)]

pub mod config;
pub mod verify;

use std::path::PathBuf;
use std::sync::Arc;

pub use kiln_core;
pub use kiln_core::*;

use kiln_core::url::EngineKind;

/// Connect to the database named by `cfg.url`, whatever the engine: the one
/// place that maps a URL's scheme to an engine.
///
/// # Errors
/// [`EngineError::BadUrl`] for an unknown scheme (or an engine not compiled
/// in), [`EngineError::Connect`] when the server cannot be reached.
pub async fn connect(cfg: &BackendConfig) -> Result<Box<dyn Engine>, EngineError> {
    match EngineKind::parse(&cfg.url)? {
        #[cfg(feature = "mongodb")]
        EngineKind::Mongodb => kiln_mongo::connect(cfg).await,
        EngineKind::Postgres | EngineKind::Mysql | EngineKind::Sqlite => kiln_sql::connect(cfg).await,
        #[allow(unreachable_patterns)]
        other => {
            Err(EngineError::BadUrl { url: kiln_core::url::redact(&cfg.url), message: format!("{other:?} is not compiled into this build of kiln") })
        }
    }
}

/// Load options (dialect and naming rule) for a URL and naming rule.
pub fn load_options(url: &str, name_rule: Option<String>) -> LoadOptions {
    LoadOptions { dialect: EngineKind::of(url).map(EngineKind::dialect).unwrap_or(kiln_core::split::Dialect::GENERIC), name_rule }
}

/// Everything needed to run migrations from a program: a builder over the same
/// engine the CLI uses.
pub struct Kiln {
    backend: BackendConfig,
    dir: PathBuf,
    name_rule: Option<String>,
    settings: RunnerSettings,
    policy: Policy,
    observer: Option<Arc<dyn Observer>>,
}

impl Kiln {
    /// Migrations from `./migrations` for the database at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Kiln {
            backend: BackendConfig::new(url),
            dir: PathBuf::from(config::DEFAULT_DIR),
            name_rule: None,
            settings: RunnerSettings::default(),
            policy: Policy::default(),
            observer: None,
        }
    }

    /// From a resolved [`config::Config`] (what the CLI does).
    pub fn from_config(c: &config::Config) -> Self {
        Kiln {
            backend: c.backend_config(),
            dir: c.dir.clone(),
            name_rule: c.name_rule.clone(),
            settings: RunnerSettings { lock_timeout: c.lock_timeout, ..RunnerSettings::default() },
            policy: Policy { allow_out_of_order: c.allow_out_of_order, group: None },
            observer: None,
        }
    }

    /// The migrations directory.
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = dir.into();
        self
    }

    /// How long to wait for another runner's lock.
    pub fn lock_timeout(mut self, d: std::time::Duration) -> Self {
        self.settings.lock_timeout = d;
        self
    }

    /// Receive progress events.
    pub fn observer(mut self, o: Arc<dyn Observer>) -> Self {
        self.observer = Some(o);
        self
    }

    /// Apply every pending migration (one batch).
    ///
    /// # Errors
    /// See [`RunError`]: bad files, a refused plan (checksum mismatch, failed
    /// migration, …), a lock time-out, or a failed migration with what it left.
    pub async fn up(&self) -> Result<RunReport, RunError> {
        let local = self.load()?;
        let mut b = connect(&self.backend).await?;
        let r = self.runner(b.as_mut()).up(&local, &UpTarget::Latest, &self.policy, false).await;
        let _ = b.close().await;
        r
    }

    /// Every migration with its state.
    ///
    /// # Errors
    /// Bad files or an unreachable database.
    pub async fn status(&self) -> Result<Vec<StatusRow>, RunError> {
        let local = self.load()?;
        // Reading creates nothing (not even a SQLite file).
        let mut b = connect(&BackendConfig { read_only: true, ..self.backend.clone() }).await?;
        let r = self.runner(b.as_mut()).status(&local).await;
        let _ = b.close().await;
        r
    }

    /// Load the migration files.
    ///
    /// # Errors
    /// [`SourceError`] naming the file.
    pub fn load(&self) -> Result<Vec<Migration>, SourceError> {
        load_dir(&self.dir, &load_options(&self.backend.url, self.name_rule.clone()))
    }

    fn runner<'a>(&self, b: &'a mut dyn Engine) -> Runner<'a> {
        let r = Runner::new(b, self.settings.clone());
        match &self.observer {
            Some(o) => r.with_observer(o.clone()),
            None => r,
        }
    }
}
