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

pub mod api;
pub mod config;
pub mod fleet;
pub mod tenant_source;
pub mod verify;

use std::path::PathBuf;
use std::sync::Arc;

/// For implementing [`CodeMigration`]: `#[kiln::async_trait]`.
pub use async_trait::async_trait;
pub use kiln_core;
pub use kiln_core::*;
pub use kiln_macros::embed_migrations;
/// The MongoDB engine; code migrations reach the driver through
/// [`mongo::handle`].
#[cfg(feature = "mongodb")]
pub use kiln_mongo as mongo;

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
        other => Err(EngineError::BadUrl { url: cfg.url.redacted(), message: format!("{other:?} is not compiled into this build of kiln") }),
    }
}

/// Load the migrations in `dir` as every kiln command does: [`load_dir`], then
/// refuse what this kiln cannot honour. A tenant-scoped migration
/// (`-- kiln:scope tenant`, `scope: tenant`, or a file under `tenant/`) is
/// refused until multi-tenant fleets exist: applying it to the one configured
/// database would silently do the wrong thing.
///
/// # Errors
/// [`SourceError`] naming the file (and line) of the first problem.
pub fn load_migrations(dir: &std::path::Path, opts: &LoadOptions) -> Result<Vec<Migration>, SourceError> {
    refuse_tenant_scope(dir, load_dir(dir, opts)?, &|p| std::fs::read_to_string(dir.join(p)).ok())
}

/// For commands that show rather than run (`kiln status`): the migrations
/// that loaded and every problem beside them, with the same rules as
/// [`load_migrations`] (`fleet`: a `[tenants]` fleet is configured, so only the
/// public-scoped migrations are this database's).
///
/// # Errors
/// Only what leaves nothing to show (an unreadable migrations directory).
pub fn load_migrations_lenient(dir: &std::path::Path, opts: &LoadOptions, fleet: bool) -> Result<(Vec<Migration>, Vec<SourceError>), SourceError> {
    let (found, mut problems) = load_dir_lenient(dir, opts)?;
    let (public, tenant): (Vec<Migration>, Vec<Migration>) = found.into_iter().partition(|m| m.directives.scope == Scope::Public);
    if !fleet {
        if let Err(e) = refuse_tenant_scope(dir, tenant, &|p| std::fs::read_to_string(dir.join(p)).ok()) {
            problems.push(e);
        }
    }
    Ok((public, problems))
}

/// With a `[tenants]` fleet configured, the commands that act on one database
/// act on the public one: its migrations are the public-scoped ones.
///
/// # Errors
/// [`SourceError`] naming the file.
pub fn load_public_migrations(dir: &std::path::Path, opts: &LoadOptions) -> Result<Vec<Migration>, SourceError> {
    Ok(load_dir(dir, opts)?.into_iter().filter(|m| m.directives.scope == Scope::Public).collect())
}

/// The tenant-scoped migrations: what one tenant's database runs (a
/// one-database command with `--tenant NAME`).
///
/// # Errors
/// [`SourceError`] naming the file.
pub fn load_tenant_migrations(dir: &std::path::Path, opts: &LoadOptions) -> Result<Vec<Migration>, SourceError> {
    Ok(load_dir(dir, opts)?.into_iter().filter(|m| m.directives.scope == Scope::Tenant).collect())
}

/// `text` reads a migration's file by its path relative to `dir`.
fn refuse_tenant_scope(
    dir: &std::path::Path,
    local: Vec<Migration>,
    text: &dyn Fn(&std::path::Path) -> Option<String>,
) -> Result<Vec<Migration>, SourceError> {
    let tenant: Vec<&Migration> = local.iter().filter(|m| m.directives.scope == Scope::Tenant).collect();
    if let Some(first) = tenant.first() {
        let path = dir.join(&first.path);
        let text = text(&first.path).unwrap_or_default();
        let line = text.lines().position(|l| {
            let l = l.trim_start();
            l.starts_with("-- kiln:scope") || l.starts_with("scope:") || l.starts_with("\"scope\"")
        });
        let how = match line {
            Some(_) => "it declares `scope tenant`",
            None => "it is in a `tenant/` folder",
        };
        let more = match tenant.len() {
            1 => String::new(),
            n => format!(" ({} more: {})", n - 1, tenant[1..].iter().map(|m| m.display_path()).collect::<Vec<_>>().join(", ")),
        };
        return Err(SourceError::Parse {
            file: path,
            line: line.map(|l| l + 1).unwrap_or(1),
            message: format!(
                "{how}, but kiln.toml declares no tenant fleet (`[tenants]`), and applying a tenant migration to the one configured database would be wrong; declare the fleet (see docs/tenants.md), or move it out of `tenant/` / remove the scope{more}"
            ),
        });
    }
    Ok(local)
}

/// Load options (dialect and naming rule) for a URL and naming rule.
pub fn load_options(url: impl AsRef<str>, name_rule: Option<String>) -> LoadOptions {
    LoadOptions { dialect: EngineKind::of(url).map(EngineKind::dialect).unwrap_or(kiln_core::split::Dialect::GENERIC), name_rule }
}

/// An error of the library: configuration, or a run. Both carry the stable
/// machine code the CLI's `--json` output and the HTTP API use.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Configuration: kiln.toml, the schema file, a value (the CLI exits 2).
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// Loading, planning or running migrations.
    #[error(transparent)]
    Run(#[from] RunError),
}

impl Error {
    /// A stable machine code (`config`, `checksum_mismatch`, `lock_timeout`, …).
    pub fn code(&self) -> &'static str {
        match self {
            Error::Config(_) => "config",
            Error::Run(e) => e.code(),
        }
    }

    /// The CLI's exit code for this error: 1 when the database, a migration or a
    /// check says no, 2 when the input (flags, files, configuration) is wrong.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) => 2,
            Error::Run(e) => e.exit_code(),
        }
    }
}

impl From<EngineError> for Error {
    fn from(e: EngineError) -> Self {
        Error::Run(e.into())
    }
}

impl From<SourceError> for Error {
    fn from(e: SourceError) -> Self {
        Error::Run(e.into())
    }
}

/// What an application does when migrating at start-up fails — chosen
/// explicitly, never silently.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StartupPolicy {
    /// Return the error: the application refuses to start (a hardened
    /// service's choice, and the default).
    #[default]
    Refuse,
    /// Log the error (`tracing::error!`, with its stable code) and let the
    /// application start anyway, as some services choose ("start-up failures
    /// don't prevent the application from starting").
    LogAndContinue,
}

/// Everything needed to run migrations from a program: a builder over the same
/// engine the CLI uses — the same plan, the same schema validation, the same
/// refusals. `kiln up` is `Kiln::from_config(&cfg).up()`.
pub struct Kiln {
    backend: BackendConfig,
    dir: PathBuf,
    name_rule: Option<String>,
    settings: RunnerSettings,
    policy: Policy,
    observer: Option<Arc<dyn Observer>>,
    schema_file: PathBuf,
    schema_file_explicit: bool,
    validate: config::ValidateMode,
    fleet: bool,
    embedded: Option<Embedded>,
    code: Vec<Arc<dyn CodeMigration>>,
}

impl Kiln {
    /// Migrations from `./migrations` for the database at `url`; the schema
    /// contract from `./schema.yaml` when that file exists (as the CLI does
    /// without a kiln.toml).
    pub fn new(url: impl Into<String>) -> Self {
        Kiln {
            backend: BackendConfig::new(url),
            dir: PathBuf::from(config::DEFAULT_DIR),
            name_rule: None,
            settings: RunnerSettings::default(),
            policy: Policy::default(),
            observer: None,
            schema_file: PathBuf::from(config::DEFAULT_SCHEMA_FILE),
            schema_file_explicit: false,
            validate: config::ValidateMode::default(),
            fleet: false,
            embedded: None,
            code: Vec::new(),
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
            schema_file: c.schema_file.clone(),
            schema_file_explicit: c.schema_file_explicit,
            validate: c.validate,
            fleet: c.tenants.is_some(),
            embedded: None,
            code: Vec::new(),
        }
    }

    /// The migrations directory.
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = dir.into();
        self
    }

    /// Migrations embedded in the program by [`embed_migrations!`] instead of
    /// a directory read at run time: loaded with the same rules into the same
    /// migrations and checksums (history written from either is the same).
    ///
    /// ```no_run
    /// # async fn start() -> Result<(), kiln::Error> {
    /// static MIGRATIONS: kiln::Embedded = kiln::embed_migrations!("migrations");
    /// kiln::Kiln::new("postgres://app@localhost/app").embedded(MIGRATIONS).up().await?;
    /// # Ok(()) }
    /// ```
    pub fn embedded(mut self, set: Embedded) -> Self {
        self.dir = PathBuf::from(set.dir);
        self.embedded = Some(set);
        self
    }

    /// Register a migration written in Rust ([`CodeMigration`]): it runs in
    /// version order among the file migrations, on every engine, under the
    /// same lock, history and checksum rules (see [`kiln_core::code`]).
    pub fn code(mut self, migration: impl CodeMigration) -> Self {
        self.code.push(Arc::new(migration));
        self
    }

    /// The naming rule (a regex on the name without extension), as
    /// `name_rule` in kiln.toml.
    pub fn name_rule(mut self, rule: impl Into<String>) -> Self {
        self.name_rule = Some(rule.into());
        self
    }

    /// The schema contract file; unlike the default `schema.yaml`, a file named
    /// here must exist.
    pub fn schema_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.schema_file = path.into();
        self.schema_file_explicit = true;
        self
    }

    /// Whether `up` validates the contract before each migration commits
    /// (default) or not at all (`check` still validates).
    pub fn validate(mut self, mode: config::ValidateMode) -> Self {
        self.validate = mode;
        self
    }

    /// How long to wait for another runner's lock.
    pub fn lock_timeout(mut self, d: std::time::Duration) -> Self {
        self.settings.lock_timeout = d;
        self
    }

    /// Only migrations of this group (`up --group`).
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.policy.group = Some(group.into());
        self
    }

    /// Allow pending migrations older than the newest applied one.
    pub fn allow_out_of_order(mut self, allow: bool) -> Self {
        self.policy.allow_out_of_order = allow;
        self
    }

    /// Receive progress events.
    pub fn observer(mut self, o: Arc<dyn Observer>) -> Self {
        self.observer = Some(o);
        self
    }

    /// The engine settings this value connects with.
    pub fn backend_config(&self) -> &BackendConfig {
        &self.backend
    }

    /// Apply every pending migration (one batch), validating the schema
    /// contract before each migration commits, exactly as `kiln up`.
    ///
    /// # Errors
    /// See [`RunError`]: bad files, a refused plan (checksum mismatch, failed
    /// migration, …), a lock time-out, a failed migration or one that breaks
    /// the contract, with what it left; [`Error::Config`] for an unreadable
    /// schema file.
    pub async fn up(&self) -> Result<RunReport, Error> {
        self.up_to(&UpTarget::Latest, false).await
    }

    /// Migrate at application start-up under `policy`. Many instances may
    /// start at once: each takes the lock in turn and every migration runs
    /// exactly once; with nothing pending, `up` only reads the history.
    ///
    /// Returns the report, or — under [`StartupPolicy::LogAndContinue`] only —
    /// `Ok(None)` after logging the error at `error` level.
    ///
    /// # Errors
    /// Under [`StartupPolicy::Refuse`], what [`Kiln::up`] returns.
    pub async fn up_at_startup(&self, policy: StartupPolicy) -> Result<Option<RunReport>, Error> {
        match (self.up().await, policy) {
            (Ok(r), _) => Ok(Some(r)),
            (Err(e), StartupPolicy::Refuse) => Err(e),
            (Err(e), StartupPolicy::LogAndContinue) => {
                tracing::error!(code = e.code(), error = %e, "migrating at start-up failed; starting anyway (StartupPolicy::LogAndContinue)");
                Ok(None)
            }
        }
    }

    /// `up` to a target version, or a dry run that changes nothing.
    ///
    /// # Errors
    /// As [`Kiln::up`].
    pub async fn up_to(&self, target: &UpTarget, dry_run: bool) -> Result<RunReport, Error> {
        let contract = self.contract()?;
        let local = self.load()?;
        let mut b = connect(&BackendConfig { read_only: dry_run, ..self.backend.clone() }).await?;
        let r = self.runner(b.as_mut(), contract).up(&local, target, &self.policy, dry_run).await;
        let _ = b.close().await;
        Ok(r?)
    }

    /// The start-up gate, as `kiln check`: pending, failed or changed
    /// migrations, plan problems, contract violations and drift since the last
    /// run, read without taking the lock or changing anything.
    /// [`CheckReport::ok`](runner::CheckReport::ok) says whether it passed.
    ///
    /// # Errors
    /// Bad files, an unreadable schema file or an unreachable database (a
    /// failed check is a report, not an error).
    pub async fn check(&self) -> Result<runner::CheckReport, Error> {
        let contract = self.contract()?;
        let local = self.load()?;
        let mut b = connect(&BackendConfig { read_only: true, ..self.backend.clone() }).await?;
        let r = self.runner(b.as_mut(), None).check(&local, contract.as_deref()).await;
        let _ = b.close().await;
        Ok(r?)
    }

    /// Every migration with its state.
    ///
    /// # Errors
    /// Bad files or an unreachable database.
    pub async fn status(&self) -> Result<Vec<StatusRow>, Error> {
        let local = self.load()?;
        // Reading creates nothing (not even a SQLite file).
        let mut b = connect(&BackendConfig { read_only: true, ..self.backend.clone() }).await?;
        let r = self.runner(b.as_mut(), None).status(&local).await;
        let _ = b.close().await;
        Ok(r?)
    }

    /// Every backfill job (zero-downtime migrations), as `kiln jobs` lists them.
    ///
    /// # Errors
    /// An unreachable database.
    pub async fn jobs(&self) -> Result<Vec<jobs::JobInfo>, Error> {
        let mut b = connect(&BackendConfig { read_only: true, ..self.backend.clone() }).await?;
        let r = self.runner(b.as_mut(), None).jobs().await;
        let _ = b.close().await;
        Ok(jobs::JobInfo::all(&r?, chrono::Utc::now()))
    }

    /// Pause, resume, cancel, retry or throttle the backfill job of `version`
    /// (`kiln jobs pause|resume|cancel|retry|throttle`).
    ///
    /// # Errors
    /// Refused when there is no such job or the change does not apply to its
    /// state; an unreachable database.
    pub async fn control_job(&self, version: &Version, control: &jobs::JobControl) -> Result<jobs::JobInfo, Error> {
        let mut b = connect(&self.backend).await?;
        let r = self.runner(b.as_mut(), None).control_job(version, control).await;
        let _ = b.close().await;
        Ok(r?)
    }

    /// Contract the expanded migration `version` (`kiln contract`): refused
    /// until its backfill is done and its remaining count is 0.
    ///
    /// # Errors
    /// As [`Runner::contract`].
    pub async fn contract_migration(&self, version: &Version) -> Result<ContractReport, Error> {
        let local = self.load()?;
        let mut b = connect(&self.backend).await?;
        let r = self.runner(b.as_mut(), None).contract(&local, Some(version)).await;
        let _ = b.close().await;
        Ok(r?)
    }

    /// Load the migration files (with a `[tenants]` fleet: the public-scoped
    /// ones; [`fleet::Fleet`] runs the others).
    ///
    /// # Errors
    /// [`SourceError`] naming the file.
    pub fn load(&self) -> Result<Vec<Migration>, SourceError> {
        let files = self.load_files()?;
        code::merge(files, &self.code)
    }

    fn load_files(&self) -> Result<Vec<Migration>, SourceError> {
        let opts = load_options(&self.backend.url, self.name_rule.clone());
        if let Some(set) = &self.embedded {
            let all = load_embedded(set, &opts)?;
            if self.fleet {
                return Ok(all.into_iter().filter(|m| m.directives.scope == Scope::Public).collect());
            }
            let text = |p: &std::path::Path| set.file(p).map(|b| String::from_utf8_lossy(b).into_owned());
            return refuse_tenant_scope(&self.dir, all, &text);
        }
        // With a fleet, this value's database is the public one.
        if self.fleet {
            load_public_migrations(&self.dir, &opts)
        } else {
            load_migrations(&self.dir, &opts)
        }
    }

    /// Every migration whatever its scope (a fleet splits them).
    ///
    /// # Errors
    /// [`SourceError`] naming the file.
    pub fn load_unscoped(&self) -> Result<Vec<Migration>, SourceError> {
        let opts = load_options(&self.backend.url, self.name_rule.clone());
        let files = match &self.embedded {
            Some(set) => load_embedded(set, &opts)?,
            None => load_dir(&self.dir, &opts)?,
        };
        code::merge(files, &self.code)
    }

    /// [`Kiln::runner`] with another lock wait (`Some(ZERO)`: do not wait).
    pub fn runner_for<'a>(
        &self,
        engine: &'a mut dyn Engine,
        contract: Option<Arc<schema::Contract>>,
        lock_timeout: Option<std::time::Duration>,
    ) -> Runner<'a> {
        let mut settings = self.settings.clone();
        if let Some(t) = lock_timeout {
            settings.lock_timeout = t;
        }
        let mut r = Runner::new(engine, settings);
        if let Some(o) = &self.observer {
            r = r.with_observer(o.clone());
        }
        if self.validate == config::ValidateMode::AfterEach {
            r = r.with_contract(contract);
        }
        r
    }

    /// The schema contract, when the schema file exists (or was named).
    ///
    /// # Errors
    /// An unreadable or invalid schema file, or a named one that is missing.
    pub fn contract(&self) -> Result<Option<Arc<schema::Contract>>, config::ConfigError> {
        config::read_contract(&self.schema_file, self.schema_file_explicit).map(|c| c.map(Arc::new))
    }

    /// A runner over `engine` with this value's settings and observer, and —
    /// when validation is on — the contract that `up` validates against. The
    /// CLI's commands run through here too.
    pub fn runner<'a>(&self, engine: &'a mut dyn Engine, contract: Option<Arc<schema::Contract>>) -> Runner<'a> {
        self.runner_for(engine, contract, None)
    }

    /// The policy of `up` (out-of-order, group).
    pub fn policy(&self) -> &Policy {
        &self.policy
    }
}
