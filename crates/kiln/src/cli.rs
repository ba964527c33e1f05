//! Command-line flags and the commands behind them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, Parser, Subcommand, ValueEnum};
use kiln::config::{self, Config, Overrides, Versioning};
use kiln::{DownTarget, Engine, Migration, RunError, RunnerSettings, UpTarget, Version};

use crate::{render, scaffold};

/// Database migrations for MongoDB, PostgreSQL, MySQL/MariaDB and SQLite.
///
/// Versioned up/down migrations with a history in the database, checksums that
/// keep applied migrations immutable, and one runner at a time under a lock.
#[derive(Parser, Debug)]
#[command(name = "kiln", version, propagate_version = true, max_term_width = 100)]
#[command(
    after_help = "The database URL comes from --url, else KILN_DATABASE_URL, else DATABASE_URL (also read from .env), else kiln.toml, else sqlite://kiln.db.\nExit codes: 0 success, 1 a migration or check failed, 2 bad usage or configuration."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// Flags every command accepts.
#[derive(Args, Debug)]
pub struct Global {
    /// Database URL: sqlite://file.db, postgres://…, mysql://… / mariadb://…, mongodb://…
    #[arg(long, global = true, value_name = "URL")]
    pub url: Option<String>,
    /// Migrations directory [default: kiln.toml's `dir`, else migrations/]
    #[arg(long, global = true, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Config file [default: kiln.toml; env KILN_CONFIG]
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print one JSON document instead of human output
    #[arg(long, global = true)]
    pub json: bool,
    /// How long to wait for another runner's lock (e.g. 60, 90s, 2m) [default: 60s]
    #[arg(long, global = true, value_name = "DURATION")]
    pub lock_timeout: Option<String>,
    /// Log filter for diagnostics on stderr (error, warn, info, debug, trace) [env: KILN_LOG]
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Colour: auto (a terminal without NO_COLOR), always, never
    #[arg(long, global = true, value_enum, default_value = "auto", value_name = "WHEN")]
    pub color: render::ColorMode,
}

/// Which databases of a `[tenants]` fleet a command touches.
#[derive(Args, Debug, Clone, Default)]
pub struct FleetArgs {
    /// Fleet: only the public database
    #[arg(long, conflicts_with_all = ["tenants_only", "tenant"])]
    pub public_only: bool,
    /// Fleet: only the tenants
    #[arg(long)]
    pub tenants_only: bool,
    /// Fleet: only this tenant (repeatable)
    #[arg(long, value_name = "NAME")]
    pub tenant: Vec<String>,
}

impl Cmd {
    /// `--tenant NAME` of a one-database command (down, redo, baseline, repair).
    fn on_tenant(&self) -> Option<&str> {
        match self {
            Cmd::Down { tenant, .. } | Cmd::Redo { tenant } | Cmd::Baseline { tenant, .. } | Cmd::Repair { tenant, .. } => tenant.as_deref(),
            _ => None,
        }
    }
}

impl FleetArgs {
    fn selection(&self) -> kiln::fleet::Selection {
        kiln::fleet::Selection { public_only: self.public_only, tenants_only: self.tenants_only, tenants: self.tenant.clone() }
    }

    fn used(&self) -> bool {
        self.public_only || self.tenants_only || !self.tenant.is_empty()
    }
}

/// Layout of a new SQL migration.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Layout {
    /// One file with `-- kiln:up` and `-- kiln:down` sections
    Single,
    /// `NAME.up.sql` and `NAME.down.sql`
    Pair,
}

/// `kiln db …`
#[derive(Subcommand, Debug)]
pub enum DbCmd {
    /// Create the configured database unless it exists
    Create,
    /// Drop the configured database and everything in it (needs --yes)
    Drop {
        /// Yes, destroy it
        #[arg(long, short = 'y')]
        yes: bool,
        /// PostgreSQL: end the other sessions on it first (DROP DATABASE … WITH (FORCE))
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Write kiln.toml and create the migrations directory
    Init {
        /// Overwrite an existing kiln.toml
        #[arg(long)]
        force: bool,
    },
    /// Write the next migration file from a template
    #[command(visible_alias = "new")]
    Create {
        /// Description in lower-case snake case, e.g. add_user_index
        name: String,
        /// Number it with a UTC timestamp (default: kiln.toml's `versioning`, else timestamps on MongoDB, sequential on SQL)
        #[arg(long, conflicts_with = "sequential")]
        timestamp: bool,
        /// Number it with the next sequential number
        #[arg(long)]
        sequential: bool,
        /// File layout for SQL migrations
        #[arg(long, value_enum, default_value = "single")]
        layout: Layout,
    },
    /// Apply pending migrations, in order, as one batch
    Up {
        /// Apply pending migrations up to and including this version
        #[arg(long, value_name = "VERSION")]
        to: Option<String>,
        /// Print the plan and change nothing (not even the history table)
        #[arg(long)]
        dry_run: bool,
        /// Allow pending migrations older than the newest applied one
        #[arg(long)]
        allow_out_of_order: bool,
        /// Only migrations of this group (schema/collection)
        #[arg(long, visible_alias = "collection", value_name = "NAME")]
        group: Option<String>,
        #[command(flatten)]
        fleet: FleetArgs,
        /// Fleet: stop starting tenants after the first failure
        #[arg(long)]
        fail_fast: bool,
        /// Fleet: tenants migrated at a time [default: kiln.toml's tenants.concurrency]
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
        concurrency: Option<u16>,
        /// Also run the backfill jobs of zero-downtime migrations here, and wait for them
        #[arg(long)]
        wait: bool,
        /// Then contract every expanded migration whose backfill is done and counts 0 remaining
        #[arg(long)]
        contract: bool,
    },
    /// Run the contract part of an expanded zero-downtime migration (refused until its backfill is done and 0 rows remain)
    Contract {
        /// The expanded migration's version
        #[arg(value_name = "VERSION")]
        migration: String,
    },
    /// Process backfill jobs until stopped (SIGTERM finishes the current batch); run any number, anywhere
    Worker {
        /// Exit when no job is left to claim
        #[arg(long)]
        once: bool,
        /// Only this job (its migration's version)
        #[arg(long, value_name = "VERSION")]
        job: Option<String>,
        /// Lease length: a worker that stops renewing it for this long is taken over
        #[arg(long, value_name = "DURATION", default_value = "30s")]
        lease: String,
        /// How often an idle worker looks for new jobs
        #[arg(long, value_name = "DURATION", default_value = "2s")]
        idle: String,
    },
    /// List backfill jobs; show, pause, resume, cancel, retry or throttle one
    Jobs {
        #[command(subcommand)]
        cmd: Option<crate::jobs_cli::JobsCmd>,
    },
    /// Revert the last batch (or --steps N, or --to VERSION)
    Down {
        /// Revert the last N applied migrations
        #[arg(long, value_name = "N", conflicts_with = "to")]
        steps: Option<usize>,
        /// Revert everything applied after VERSION (0 reverts all)
        #[arg(long, value_name = "VERSION")]
        to: Option<String>,
        /// Print the plan and change nothing
        #[arg(long)]
        dry_run: bool,
        /// Only migrations of this group (schema/collection): its last batch, its last N, or its migrations after VERSION
        #[arg(long, visible_alias = "collection", value_name = "NAME")]
        group: Option<String>,
        /// Act on this tenant of the `[tenants]` fleet (its database or schema, its tenant-scoped migrations) instead of the public database
        #[arg(long, value_name = "NAME")]
        tenant: Option<String>,
    },
    /// Revert the last batch and apply it again (to rehearse a down while developing)
    Redo {
        /// Act on this tenant of the `[tenants]` fleet (its database or schema, its tenant-scoped migrations) instead of the public database
        #[arg(long, value_name = "NAME")]
        tenant: Option<String>,
    },
    /// Show every migration: version, name, state, batch, applied at, duration, checksum
    #[command(visible_alias = "list")]
    Status {
        /// Only pending migrations
        #[arg(long)]
        pending: bool,
        /// Only failed, interrupted or missing migrations
        #[arg(long)]
        failed: bool,
        /// Only the last N migrations (after the other filters)
        #[arg(long, visible_alias = "limit", value_name = "N")]
        last: Option<usize>,
        /// Every migration, also on a terminal (default there: the last 20 applied and everything not applied)
        #[arg(long, conflicts_with = "last")]
        all: bool,
        /// Only migrations of this group (schema/collection)
        #[arg(long, visible_alias = "collection", value_name = "NAME")]
        group: Option<String>,
        /// Fleet: one line per database (public and each tenant): applied, pending, failed, last applied
        #[arg(long)]
        tenants: bool,
        #[command(flatten)]
        fleet: FleetArgs,
        /// Also show every collection: exists, documents, indexes, validator (MongoDB)
        #[arg(long)]
        collections: bool,
        /// With --collections: count documents exactly instead of estimating
        #[arg(long, requires = "collections")]
        exact: bool,
    },
    /// Create or drop the configured database itself (PostgreSQL, MySQL: on the server; SQLite: the file; MongoDB: drop)
    Db {
        #[command(subcommand)]
        cmd: DbCmd,
    },
    /// Serve the HTTP API and the status dashboard (token from KILN_API_TOKEN or --token-file)
    Serve(kiln::api::ServeArgs),
    /// Record every migration up to VERSION as applied without running it
    Baseline {
        /// The newest version the existing database already has
        #[arg(value_name = "VERSION")]
        migration: String,
        /// Why (written to the event log)
        #[arg(long, default_value = "baseline of a database that existed before kiln")]
        reason: String,
        /// Act on this tenant of the `[tenants]` fleet (its database or schema, its tenant-scoped migrations) instead of the public database
        #[arg(long, value_name = "NAME")]
        tenant: Option<String>,
    },
    /// Take over another tool's history: record what diesel, sqlx, golang-migrate, dbmate, goose, refinery, Prisma or sql-migrate applied as baseline (their table is left as it is)
    Adopt {
        /// Show what would be recorded; record nothing
        #[arg(long)]
        dry_run: bool,
        /// Why (written to the event log)
        #[arg(long, default_value = "adopted from another migration tool's history")]
        reason: String,
    },
    /// Remove a migration from every future plan and rename its file to .retired
    Retire {
        /// Version to retire
        #[arg(value_name = "VERSION")]
        migration: String,
        /// Why (written to the event log)
        #[arg(long)]
        reason: String,
    },
    /// Accept changed checksums and clear failed or interrupted migrations
    Repair {
        /// Only this version (default: every changed or failed migration)
        #[arg(value_name = "VERSION")]
        migration: Option<String>,
        /// Record a failed migration as applied (you completed it by hand) instead of removing its entry
        #[arg(long, requires = "migration")]
        mark_applied: bool,
        /// Why (written to the event log)
        #[arg(long)]
        reason: String,
        /// Act on this tenant of the `[tenants]` fleet (its database or schema, its tenant-scoped migrations) instead of the public database
        #[arg(long, value_name = "NAME")]
        tenant: Option<String>,
    },
    /// Fail (exit 1) on pending, failed or changed migrations, an invalid schema, or drift
    Check {
        #[command(flatten)]
        fleet: FleetArgs,
    },
    /// Show what changed in the database schema since the last kiln run (exit 1 if anything)
    Diff,
    /// Print a shell completion script: kiln completions bash > /etc/bash_completion.d/kiln
    Completions {
        /// The shell
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Schema contract tools
    Schema {
        #[command(subcommand)]
        cmd: SchemaCmd,
    },
    /// On a scratch database: apply everything, validate, revert, apply again; report every down that does not undo its up
    Verify {
        /// Use this (empty) database instead of creating one on the configured server
        #[arg(long, value_name = "URL")]
        scratch_url: Option<String>,
        /// Keep the scratch database afterwards (to inspect it)
        #[arg(long)]
        keep: bool,
    },
    /// Create, compare and (with --prune) drop indexes declared in indexes/<collection>.yaml (MongoDB)
    Sync {
        /// Drop indexes that are not declared (never _id_; not those an applied migration created)
        #[arg(long)]
        prune: bool,
        /// With --prune, also drop undeclared indexes that an applied migration created
        #[arg(long, requires = "prune")]
        drop_migrated: bool,
        /// Print the differences and change nothing
        #[arg(long)]
        dry_run: bool,
        /// Directory of index declarations [default: indexes/ beside the migrations directory; a fleet's tenants use its tenant/ folder]
        #[arg(long, value_name = "DIR")]
        indexes: Option<PathBuf>,
        #[command(flatten)]
        fleet: FleetArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum SchemaCmd {
    /// Print the live schema in schema.yaml format (to bootstrap the contract)
    Dump {
        /// Write to FILE instead of stdout (refuses to overwrite without --force)
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Overwrite FILE
        #[arg(long)]
        force: bool,
    },
}

/// An error of the command line, with its exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Configuration (exit 2).
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// A run (exit code from the error).
    #[error(transparent)]
    Run(#[from] RunError),
    /// Bad usage (exit 2).
    #[error("{0}")]
    Usage(String),
    /// Something else failed (exit 1).
    #[error("{0}")]
    Failed(String),
}

impl CliError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Config(_) | CliError::Usage(_) => 2,
            CliError::Run(e) => e.exit_code(),
            CliError::Failed(_) => 1,
        }
    }
}

impl From<kiln::EngineError> for CliError {
    fn from(e: kiln::EngineError) -> Self {
        CliError::Run(e.into())
    }
}
impl From<kiln::SourceError> for CliError {
    fn from(e: kiln::SourceError) -> Self {
        CliError::Run(e.into())
    }
}

fn parse_version(s: &str) -> Result<Version, CliError> {
    Version::parse_arg(s).ok_or_else(|| CliError::Usage(format!("{s:?} is not a migration version (expected digits, e.g. 0007 or 20251101120000)")))
}

pub async fn run(cli: Cli) -> Result<i32, CliError> {
    let g = &cli.global;
    // `.env` never overrides the real environment; read by the binary only.
    config::load_dotenv()?;
    let lock_timeout = match &g.lock_timeout {
        Some(t) => Some(config::parse_duration_text(t).map_err(|m| CliError::Usage(format!("--lock-timeout: {m}")))?),
        None => None,
    };
    let allow_ooo = matches!(cli.cmd, Cmd::Up { allow_out_of_order: true, .. });
    let overrides = Overrides { url: g.url.clone(), dir: g.dir.clone(), config: g.config.clone(), lock_timeout, allow_out_of_order: allow_ooo };
    let json = g.json;

    match &cli.cmd {
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(*shell, &mut Cli::command(), "kiln", &mut std::io::stdout());
            return Ok(0);
        }
        Cmd::Init { force } => return scaffold::init(g, *force, json),
        Cmd::Db { cmd } => {
            let cfg = Config::load(&overrides)?;
            return match cmd {
                DbCmd::Create => crate::db_cmd::run(&cfg, false, false, false, json).await,
                DbCmd::Drop { yes, force } => crate::db_cmd::run(&cfg, true, *yes, *force, json).await,
            };
        }
        Cmd::Serve(args) => {
            return match kiln::api::serve(&Config::load(&overrides)?, args).await {
                Ok(()) => Ok(0),
                Err(kiln::api::ServeError::Usage(m)) => Err(CliError::Usage(m)),
                Err(kiln::api::ServeError::Io(m)) => Err(CliError::Failed(m)),
            };
        }
        Cmd::Create { name, timestamp, sequential, layout } => {
            let cfg = Config::load(&overrides)?;
            let versioning = if *timestamp {
                Versioning::Timestamp
            } else if *sequential {
                Versioning::Sequential
            } else {
                cfg.versioning
            };
            let explicit = *timestamp || *sequential || cfg.versioning_explicit;
            return scaffold::create(&cfg, name, versioning, explicit, *layout, json);
        }
        _ => {}
    }

    let cfg = Config::load(&overrides)?;
    kiln::url::EngineKind::parse(&cfg.url).map_err(|e| CliError::Run(e.into()))?;

    if let Some(done) = fleet_command(&cli.cmd, &cfg, json).await? {
        return Ok(done);
    }

    // `--tenant NAME` on a one-database command: that tenant's database or
    // schema, with the tenant-scoped migrations.
    let on_tenant = cli.cmd.on_tenant().is_some();
    let cfg = match cli.cmd.on_tenant() {
        Some(name) => tenant_config(cfg, name).await?,
        None => cfg,
    };
    // Read the files while the connection is being set up: both wait on I/O.
    let dir = cfg.dir.clone();
    let opts = kiln::load_options(&cfg.url, cfg.name_rule.clone());
    let fleet = cfg.tenants.is_some();
    // `status` shows bad files as problems beside the rest; `worker` and `jobs`
    // do not use the files (a job carries its spec), so a bad file deployed
    // beside them does not stop the backfills; every other command refuses them.
    let lenient = matches!(cli.cmd, Cmd::Status { .. } | Cmd::Worker { .. } | Cmd::Jobs { .. });
    let loader = std::thread::spawn(move || match (lenient, fleet) {
        _ if on_tenant => kiln::load_tenant_migrations(&dir, &opts).map(|m| (m, vec![])),
        (true, _) => kiln::load_migrations_lenient(&dir, &opts, fleet),
        (false, true) => kiln::load_public_migrations(&dir, &opts).map(|m| (m, vec![])),
        (false, false) => kiln::load_migrations(&dir, &opts).map(|m| (m, vec![])),
    });
    let mut backend_cfg = cfg.backend_config();
    // Commands that only read must not create the database (a SQLite file).
    backend_cfg.read_only =
        matches!(cli.cmd, Cmd::Status { .. } | Cmd::Check { .. } | Cmd::Diff | Cmd::Up { dry_run: true, .. } | Cmd::Down { dry_run: true, .. });
    tracing::debug!(
        config = %cfg.config_file.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "none".into()),
        url = %cfg.redacted_url(),
        url_source = ?cfg.url_source,
        dir = %cfg.dir.display(),
        read_only = backend_cfg.read_only,
        "configuration resolved"
    );
    let connected = kiln::connect(&backend_cfg).await;
    let local = loader.join().map_err(|_| CliError::Failed("loading migrations panicked".into()))?;
    let (local, problems) = local.map_err(|e| annotate_dir(e, &cfg.dir))?;
    let mut backend = connected?;

    let observer: Arc<dyn kiln::Observer> = if json { Arc::new(kiln::event::Silent) } else { Arc::new(render::Progress::new()) };
    // The library's builder: the CLI and an application run the same plan
    // with the same validation.
    let mut lib = kiln::Kiln::from_config(&cfg).observer(observer);
    if let Cmd::Up { group: Some(g), .. } = &cli.cmd {
        lib = lib.group(g.clone());
    }
    if let Cmd::Sync { prune, drop_migrated, dry_run, indexes, .. } = &cli.cmd {
        let opts = SyncArgs { prune: *prune, drop_migrated: *drop_migrated, dry_run: *dry_run, indexes: indexes.clone() };
        let result = sync(&cfg, &lib, &local, backend.as_mut(), opts, json).await;
        let _ = backend.close().await;
        return result;
    }
    // The schema contract describes the public database.
    let contract = if on_tenant { None } else { lib.contract()? };
    let result = command(&cli.cmd, &cfg, &lib, (&local, &problems), contract, backend.as_mut(), json).await;
    let _ = backend.close().await;
    result
}

/// `up` and `status --tenants` over a `[tenants]` fleet; `None` when the
/// command is not a fleet command (it then acts on one database).
async fn fleet_command(cmd: &Cmd, cfg: &Config, json: bool) -> Result<Option<i32>, CliError> {
    let fleet_flags = match cmd {
        Cmd::Up { fleet, .. } | Cmd::Check { fleet } | Cmd::Sync { fleet, .. } => fleet.used(),
        Cmd::Status { fleet, tenants, .. } => fleet.used() || *tenants,
        _ => false,
    };
    let Some(tenants) = &cfg.tenants else {
        if fleet_flags {
            return Err(CliError::Usage("--public-only, --tenants-only, --tenant and --tenants need a `[tenants]` fleet in kiln.toml".into()));
        }
        return Ok(None);
    };
    let observer: Arc<dyn kiln::Observer> = Arc::new(kiln::event::Silent);
    match cmd {
        Cmd::Up { wait: true, .. } | Cmd::Up { contract: true, .. } => Err(CliError::Usage(
            "--wait and --contract run the zero-downtime phases of one database; with a `[tenants]` fleet run `kiln up`, then `kiln worker` and `kiln contract VERSION` (they act on the public database)".into(),
        )),
        Cmd::Up { to: None, dry_run, group, fleet, fail_fast, concurrency, .. } => {
            let mut lib = kiln::Kiln::from_config(cfg).observer(observer);
            if let Some(g) = group {
                lib = lib.group(g.clone());
            }
            let f = kiln::fleet::Fleet::new(&lib, tenants);
            let opts = kiln::fleet::FleetOptions {
                selection: fleet.selection(),
                fail_fast: *fail_fast,
                dry_run: *dry_run,
                concurrency: concurrency.map(usize::from),
            };
            let live = render::FleetProgress::new(json);
            let report = f.up(&opts, &|e| live.event(e)).await.map_err(lib_error)?;
            if !json && !report.targets.iter().any(|t| matches!(t.target, kiln::report::TargetName::Tenant(_))) && !opts.selection.public_only {
                eprintln!("note: the fleet has no tenants ([tenants] {} gave none)", tenants.source.describe());
            }
            render::fleet_report(&report, json);
            Ok(Some(if report.ok() { 0 } else { 1 }))
        }
        Cmd::Up { to: Some(_), .. } => {
            Err(CliError::Usage("--to is for one database; with a `[tenants]` fleet, `up` applies everything pending on each".into()))
        }
        Cmd::Check { fleet } => {
            let lib = kiln::Kiln::from_config(cfg);
            let f = kiln::fleet::Fleet::new(&lib, tenants);
            let rows = f.check(&fleet.selection()).await.map_err(lib_error)?;
            render::fleet_check(&rows, json);
            Ok(Some(if rows.iter().all(|r| r.ok()) { 0 } else { 1 }))
        }
        Cmd::Sync { prune, drop_migrated, dry_run, indexes, fleet } => {
            let a = SyncArgs { prune: *prune, drop_migrated: *drop_migrated, dry_run: *dry_run, indexes: indexes.clone() };
            fleet_sync(cfg, tenants, &fleet.selection(), a, json).await.map(Some)
        }
        Cmd::Status { fleet, .. } if fleet_flags => {
            let lib = kiln::Kiln::from_config(cfg);
            let f = kiln::fleet::Fleet::new(&lib, tenants);
            let rows = f.status(&fleet.selection()).await.map_err(lib_error)?;
            render::fleet_status(&rows, json);
            Ok(Some(0))
        }
        _ => Ok(None),
    }
}

/// The configuration of one tenant of the fleet, for a one-database command
/// with `--tenant NAME`: its URL or schema, and no fleet (the command acts on
/// that database alone).
async fn tenant_config(mut cfg: Config, name: &str) -> Result<Config, CliError> {
    let Some(tenants) = cfg.tenants.clone() else {
        return Err(CliError::Usage("--tenant needs a `[tenants]` fleet in kiln.toml".into()));
    };
    let lib = kiln::Kiln::from_config(&cfg);
    let fleet = kiln::fleet::Fleet::new(&lib, &tenants);
    let list = fleet.tenant_list().await.map_err(lib_error)?;
    if let Some((_, why)) = list.rejected.iter().find(|(n, _)| n == name) {
        return Err(CliError::Usage(why.clone()));
    }
    if !list.names.iter().any(|n| n == name) {
        return Err(CliError::Usage(format!("unknown tenant {name:?}; the fleet has: {}", list.names.join(", "))));
    }
    let b = fleet.backend(&kiln::report::TargetName::Tenant(name.to_string()));
    cfg.url = b.url;
    cfg.schema = b.schema;
    cfg.tenants = None;
    Ok(cfg)
}

fn lib_error(e: kiln::Error) -> CliError {
    match e {
        kiln::Error::Config(c) => CliError::Config(c),
        kiln::Error::Run(r) => CliError::Run(r),
    }
}

fn annotate_dir(e: kiln::SourceError, dir: &Path) -> CliError {
    match e {
        kiln::SourceError::Dir { dir: d, source } if source.kind() == std::io::ErrorKind::NotFound => {
            CliError::Usage(format!("migrations directory {} does not exist; run `kiln init`, or point --dir / kiln.toml's `dir` at it", d.display()))
        }
        other => {
            let _ = dir;
            CliError::Run(other.into())
        }
    }
}

async fn command(
    cmd: &Cmd,
    cfg: &Config,
    lib: &kiln::Kiln,
    (local, problems): (&[Migration], &[kiln::SourceError]),
    contract: Option<Arc<kiln::schema::Contract>>,
    backend: &mut dyn Engine,
    json: bool,
) -> Result<i32, CliError> {
    let target = render::Target {
        url: cfg.redacted_url(),
        migrations: local.len(),
        dir: cfg.dir.display().to_string(),
        config: cfg.config_file.as_ref().map(|p| p.display().to_string()),
    };
    let mut runner = lib.runner(backend, contract.clone());
    match cmd {
        Cmd::Up { to, dry_run, wait, contract, .. } => {
            let t = match to {
                Some(v) => UpTarget::To(parse_version(v)?),
                None => UpTarget::Latest,
            };
            let r = runner.up(local, &t, lib.policy(), *dry_run).await?;
            if !(json && (*wait || *contract)) {
                render::run_report(&r, &target, json);
            }
            if *dry_run || !(*wait || *contract) {
                return Ok(0);
            }
            let unfinished = if *wait { crate::jobs_cli::wait_for_backfills(&mut runner).await? } else { vec![] };
            let c = if *contract { Some(runner.contract(local, None).await?) } else { None };
            if json {
                render::json(&serde_json::json!({ "up": r, "unfinished_jobs": unfinished, "contract": c }));
            } else {
                for j in &unfinished {
                    println!(
                        "backfill {}_{} is {}: {}{}",
                        j.version,
                        j.name,
                        j.state,
                        j.progress(),
                        j.error.as_deref().map(|e| format!("; {e}")).unwrap_or_default()
                    );
                }
                if let Some(c) = &c {
                    crate::jobs_cli::contract_report(c, false);
                }
            }
            let waiting = c.as_ref().is_some_and(|c| !c.waiting.is_empty());
            Ok(if *wait && (waiting || unfinished.iter().any(|j| j.state != kiln::jobs::JobState::Done)) { 1 } else { 0 })
        }
        Cmd::Contract { migration } => crate::jobs_cli::contract(&mut runner, local, migration, json).await,
        Cmd::Jobs { cmd } => crate::jobs_cli::jobs(&mut runner, cmd.as_ref(), json).await,
        Cmd::Worker { once, job, lease, idle } => {
            let dur = |flag: &str, t: &str| config::parse_duration_text(t).map_err(|m| CliError::Usage(format!("--{flag}: {m}")));
            let lease = dur("lease", lease)?;
            if lease < std::time::Duration::from_secs(1) {
                return Err(CliError::Usage("--lease: at least 1s (the lease is renewed at a third of it)".into()));
            }
            let args =
                crate::jobs_cli::WorkerArgs { once: *once, lease, only: job.as_deref().map(parse_version).transpose()?, idle: dur("idle", idle)? };
            drop(runner);
            crate::jobs_cli::worker(lib, backend, args, json).await
        }
        Cmd::Down { steps, to, dry_run, group, .. } => {
            let t = match (steps, to) {
                (Some(n), _) => DownTarget::Steps(*n),
                (None, Some(v)) => DownTarget::To(parse_version(v)?),
                (None, None) => DownTarget::LastBatch,
            };
            if let Some(g) = group {
                if !local.iter().any(|m| m.directives.group.as_deref() == Some(g)) {
                    let mut groups: Vec<&str> = local.iter().filter_map(|m| m.directives.group.as_deref()).collect();
                    groups.sort_unstable();
                    groups.dedup();
                    return Err(CliError::Usage(format!(
                        "no migration belongs to the group {g:?}; the groups are: {}",
                        if groups.is_empty() { "none".to_string() } else { groups.join(", ") }
                    )));
                }
            }
            let r = runner.down_group(local, &t, group.as_deref(), *dry_run).await?;
            render::run_report(&r, &target, json);
            Ok(0)
        }
        Cmd::Redo { .. } => {
            let down = runner.down(local, &DownTarget::LastBatch, false).await?;
            if !json {
                render::run_report(&down, &target, false);
            }
            // Reverted last-applied first: the first is the top in the files' order.
            let top = down.steps.first().map(|s| parse_version(&s.version)).transpose()?;
            let up = match top {
                Some(v) => Some(runner.up(local, &UpTarget::To(v), lib.policy(), false).await?),
                None => None,
            };
            match (&up, json) {
                (_, true) => render::json(&serde_json::json!({ "down": down, "up": up })),
                (Some(up), false) => render::run_report(up, &target, false),
                (None, false) => {}
            }
            Ok(0)
        }
        Cmd::Status { collections, exact, pending, failed, last, all, group, .. } => {
            let rows = runner.status(local).await?;
            // First run on a database another tool migrated: say so before the all-pending table.
            let note = if rows.iter().all(|r| r.state == "pending") { runner.foreign_history_note().await? } else { None };
            drop(runner);
            if let Some(note) = note {
                render::hint(&note);
            }
            let cols = if *collections { Some(collection_status(cfg, local, *exact).await?) } else { None };
            let view = render::StatusView { pending: *pending, failed: *failed, last: *last, all: *all, group: group.clone() };
            render::status(&rows, problems, &view, cols.as_ref(), &target, json);
            Ok(0)
        }
        Cmd::Baseline { migration, reason, .. } => {
            let v = parse_version(migration)?;
            let r = runner.baseline(local, &v, Some(reason)).await?;
            render::admin(&r, json);
            Ok(0)
        }
        Cmd::Adopt { dry_run, reason } => {
            let r = runner.adopt(local, &cfg.dir, *dry_run, Some(reason)).await?;
            render::adopt(&r, json);
            Ok(0)
        }
        Cmd::Retire { migration, reason } => {
            let v = parse_version(migration)?;
            let r = runner.retire(local, &cfg.dir, &v, reason).await?;
            render::admin(&r, json);
            Ok(0)
        }
        Cmd::Repair { migration, mark_applied, reason, .. } => {
            let v = match migration {
                Some(v) => Some(parse_version(v)?),
                None => None,
            };
            let r = runner.repair(local, v.as_ref(), *mark_applied, reason).await?;
            render::admin(&r, json);
            Ok(0)
        }
        Cmd::Check { .. } => {
            let r = runner.check(local, contract.as_deref()).await?;
            render::check(&r, &target, json);
            Ok(if r.ok { 0 } else { 1 })
        }
        Cmd::Diff => {
            let d = runner.diff().await?;
            render::diff(d.as_deref(), json);
            Ok(if d.map(|d| d.is_empty()).unwrap_or(true) { 0 } else { 1 })
        }
        Cmd::Schema { cmd: SchemaCmd::Dump { output, force } } => {
            let live = runner.inspect().await?;
            let mongo = kiln::url::EngineKind::of(&cfg.url) == Some(kiln::url::EngineKind::Mongodb);
            let c = kiln::schema::dump(&live, mongo);
            if json {
                render::json(&c);
                return Ok(0);
            }
            let text = format!(
                "# Expected schema for kiln (`kiln check`, `kiln verify`, validation during `kiln up`).\n# Dumped from {} — trim it to what the application relies on;\n# move columns it can live without to `optional:`.\n{}",
                cfg.redacted_url(),
                c.to_yaml()
            );
            match output {
                None => print!("{text}"),
                Some(p) => {
                    if p.exists() && !force {
                        return Err(CliError::Usage(format!("{} already exists; use --force to overwrite it", p.display())));
                    }
                    std::fs::write(p, text).map_err(|e| CliError::Failed(format!("cannot write {}: {e}", p.display())))?;
                    eprintln!("Wrote {}", p.display());
                }
            }
            Ok(0)
        }
        Cmd::Verify { scratch_url, keep } => {
            drop(runner);
            let scratch = match scratch_url {
                Some(u) => kiln::verify::Scratch::Url(u.clone()),
                None => kiln::verify::Scratch::Create,
            };
            let settings = RunnerSettings { lock_timeout: cfg.lock_timeout, ..RunnerSettings::default() };
            let r = kiln::verify::verify(&cfg.backend_config(), local, contract.as_deref(), scratch, *keep, settings).await?;
            render::verify(&r, json);
            Ok(if r.ok { 0 } else { 1 })
        }
        Cmd::Init { .. } | Cmd::Create { .. } | Cmd::Db { .. } | Cmd::Sync { .. } | Cmd::Completions { .. } | Cmd::Serve(_) => {
            unreachable!("handled before")
        }
    }
}

#[cfg(feature = "mongodb")]
async fn collection_status(cfg: &Config, local: &[Migration], exact: bool) -> Result<serde_json::Value, CliError> {
    use kiln::url::EngineKind;
    if EngineKind::of(&cfg.url) != Some(EngineKind::Mongodb) {
        return Err(CliError::Usage("--collections is for MongoDB databases".into()));
    }
    // Collections the migrations and index declarations name, so missing ones show up too.
    let mut extra: Vec<String> = Vec::new();
    for m in local {
        for body in std::iter::once(&m.up).chain(m.down.iter()) {
            if let kiln::Body::Commands { commands, .. } = body {
                for c in commands {
                    if let Some((k, serde_json::Value::String(coll))) = c.doc.as_object().and_then(|o| o.iter().next()) {
                        if matches!(k.as_str(), "create" | "createIndexes" | "collMod" | "insert" | "update") && !extra.contains(coll) {
                            extra.push(coll.clone());
                        }
                    }
                }
            }
        }
    }
    let rows = kiln_mongo::collection_status(&cfg.backend_config(), &extra, exact).await?;
    serde_json::to_value(rows).map_err(|e| CliError::Failed(e.to_string()))
}

#[cfg(not(feature = "mongodb"))]
async fn collection_status(_cfg: &Config, _local: &[Migration], _exact: bool) -> Result<serde_json::Value, CliError> {
    Err(CliError::Usage("this kiln was built without MongoDB support".into()))
}

/// `kiln sync`'s flags.
pub struct SyncArgs {
    prune: bool,
    drop_migrated: bool,
    dry_run: bool,
    indexes: Option<PathBuf>,
}

/// `kiln sync` is a kiln run: under the migration lock, and the schema
/// snapshot is stored afterwards so `kiln check` sees no drift. `--prune` keeps
/// an index an applied migration created unless `--drop-migrated` is given.
/// Exit 1 when a declared index differs on the server or `--prune` kept one.
#[cfg(feature = "mongodb")]
async fn sync(cfg: &Config, lib: &kiln::Kiln, local: &[Migration], backend: &mut dyn Engine, a: SyncArgs, json: bool) -> Result<i32, CliError> {
    use kiln::url::EngineKind;
    if EngineKind::of(&cfg.url) != Some(EngineKind::Mongodb) {
        return Err(CliError::Usage("`kiln sync` manages declared MongoDB indexes; the database is not MongoDB".into()));
    }
    let dir = a.indexes.unwrap_or_else(|| cfg.dir.parent().map(|p| p.join("indexes")).unwrap_or_else(|| PathBuf::from("indexes")));
    if !dir.is_dir() {
        return Err(CliError::Usage(format!("index declarations directory {} does not exist (use --indexes DIR)", dir.display())));
    }
    let mut runner = lib.runner(backend, None);
    let applied: Vec<String> = runner.status(local).await?.into_iter().filter(|r| r.state == "applied").map(|r| r.version).collect();
    let migrated = migrated_indexes(local.iter().filter(|m| applied.contains(&m.version.text)));
    let opts = kiln_mongo::SyncOptions { prune: a.prune, dry_run: a.dry_run, migrated, drop_migrated: a.drop_migrated };
    let backend_cfg = cfg.backend_config();
    let work = async { Ok(kiln_mongo::sync_indexes(&backend_cfg, &dir, &opts).await) };
    let report = if a.dry_run { work.await? } else { runner.locked(work, |r| r.as_ref().map(|r| r.applied > 0).unwrap_or(true)).await? };
    let report = report.map_err(|e| match e {
        kiln_mongo::SyncError::Engine(e) => CliError::Run(e.into()),
        e @ kiln_mongo::SyncError::BadFile { .. } => CliError::Usage(e.to_string()),
        e => CliError::Failed(e.to_string()),
    })?;
    render::sync_report(&report, json);
    Ok(if report.refused() { 1 } else { 0 })
}

/// `kiln sync` over a fleet: the public database against `indexes/`, every
/// tenant against `indexes/tenant/`, `concurrency` at a time, each under its
/// own lock (a tenant whose lock is held elsewhere is skipped), one
/// database's failure never stopping the others.
#[cfg(feature = "mongodb")]
async fn fleet_sync(
    cfg: &Config,
    tenants: &kiln::config::Tenants,
    selection: &kiln::fleet::Selection,
    a: SyncArgs,
    json: bool,
) -> Result<i32, CliError> {
    use anstream::println;
    use futures::StreamExt;
    use kiln::report::TargetName;
    use owo_colors::OwoColorize;
    if kiln::url::EngineKind::of(&cfg.url) != Some(kiln::url::EngineKind::Mongodb) {
        return Err(CliError::Usage("`kiln sync` manages declared MongoDB indexes; the database is not MongoDB".into()));
    }
    let dir = a.indexes.clone().unwrap_or_else(|| cfg.dir.parent().map(|p| p.join("indexes")).unwrap_or_else(|| PathBuf::from("indexes")));
    let tenant_dir = dir.join("tenant");
    let lib = kiln::Kiln::from_config(cfg);
    let fleet = kiln::fleet::Fleet::new(&lib, tenants);
    let (public_migs, tenant_migs) = fleet.load().map_err(lib_error)?;
    let (targets, rejected) = fleet.select(selection).await.map_err(lib_error)?;
    for (t, d) in [(targets.contains(&TargetName::Public), &dir), (targets.iter().any(|t| *t != TargetName::Public), &tenant_dir)] {
        if t && !d.is_dir() {
            return Err(CliError::Usage(format!(
                "index declarations directory {} does not exist (the public database's are in indexes/, the tenants' in indexes/tenant/; or use --indexes DIR)",
                d.display()
            )));
        }
    }
    let (a, lib, fleet, dir, tenant_dir) = (&a, &lib, &fleet, &dir, &tenant_dir);
    let (public_migs, tenant_migs) = (&public_migs, &tenant_migs);
    let mut rows: Vec<serde_json::Value> = futures::stream::iter(targets.into_iter().map(|target| async move {
        let public = target == TargetName::Public;
        let cfg = kiln::BackendConfig { read_only: a.dry_run, ..fleet.backend(&target) };
        let (migs, d) = if public { (public_migs, dir) } else { (tenant_migs, tenant_dir) };
        let r: Result<kiln_mongo::SyncReport, String> = async {
            let mut engine = kiln::connect(&cfg).await.map_err(|e| e.to_string())?;
            let wait = if public { None } else { Some(std::time::Duration::ZERO) };
            let mut runner = lib.runner_for(engine.as_mut(), None, wait);
            let applied: Vec<String> =
                runner.status(migs).await.map_err(|e| e.to_string())?.into_iter().filter(|r| r.state == "applied").map(|r| r.version).collect();
            let opts = kiln_mongo::SyncOptions {
                prune: a.prune,
                dry_run: a.dry_run,
                migrated: migrated_indexes(migs.iter().filter(|m| applied.contains(&m.version.text))),
                drop_migrated: a.drop_migrated,
            };
            let work = async { Ok(kiln_mongo::sync_indexes(&cfg, d, &opts).await) };
            let r = if a.dry_run { work.await } else { runner.locked(work, |r| r.as_ref().map(|r| r.applied > 0).unwrap_or(true)).await };
            drop(runner);
            let _ = engine.close().await;
            r.map_err(|e| e.to_string())?.map_err(|e| e.to_string())
        }
        .await;
        (target, r)
    }))
    .buffer_unordered(tenants.concurrency.max(1))
    .map(|(target, r)| {
        let line = match &r {
            Ok(rep) if rep.refused() => format!(
                "  {} {target}: {} index(es) differ or are protected",
                "✗".red().bold(),
                rep.actions.iter().filter(|x| matches!(x, kiln_mongo::SyncAction::Differs { .. } | kiln_mongo::SyncAction::Protected { .. })).count()
            ),
            Ok(rep) => {
                let changes = rep.actions.iter().filter(|x| x.is_change()).count();
                let verb = if rep.dry_run { "would change" } else { "changed" };
                format!("  {} {target}: {verb} {changes} index(es)", "✓".green())
            }
            Err(e) => format!("  {} {target}: {}", "✗".red().bold(), e.lines().next().unwrap_or_default()),
        };
        if !json {
            println!("{line}");
        }
        match r {
            Ok(rep) => serde_json::json!({ "target": target, "ok": !rep.refused(), "report": rep }),
            Err(e) => serde_json::json!({ "target": target, "ok": false, "error": e }),
        }
    })
    .collect()
    .await;
    for (name, why) in rejected {
        if !json {
            println!("  {} tenant {name}: {why}", "✗".red().bold());
        }
        rows.push(serde_json::json!({ "target": TargetName::Tenant(name), "ok": false, "error": why }));
    }
    let ok = rows.iter().all(|r| r["ok"] == true);
    if json {
        render::json(&serde_json::json!({ "ok": ok, "targets": rows }));
    } else {
        let failed = rows.iter().filter(|r| r["ok"] != true).count();
        println!("Fleet sync: {} database(s), {failed} with problems.", rows.len());
    }
    Ok(if ok { 0 } else { 1 })
}

#[cfg(not(feature = "mongodb"))]
async fn fleet_sync(_: &Config, _: &kiln::config::Tenants, _: &kiln::fleet::Selection, _: SyncArgs, _: bool) -> Result<i32, CliError> {
    Err(CliError::Usage("this kiln was built without MongoDB support".into()))
}

/// The indexes the up bodies of `applied` create (`createIndexes`).
#[cfg(feature = "mongodb")]
fn migrated_indexes<'a>(applied: impl Iterator<Item = &'a Migration>) -> Vec<kiln_mongo::MigratedIndex> {
    let mut out = Vec::new();
    for m in applied {
        let kiln::Body::Commands { commands, .. } = &m.up else { continue };
        for c in commands {
            let Some(coll) = c.doc.get("createIndexes").and_then(|v| v.as_str()) else { continue };
            for ix in c.doc.get("indexes").and_then(|v| v.as_array()).into_iter().flatten() {
                if let Some(name) = ix.get("name").and_then(|v| v.as_str()) {
                    out.push(kiln_mongo::MigratedIndex { collection: coll.to_string(), name: name.to_string(), migration: m.name() });
                }
            }
        }
    }
    out
}

#[cfg(not(feature = "mongodb"))]
async fn sync(_cfg: &Config, _lib: &kiln::Kiln, _local: &[Migration], _backend: &mut dyn Engine, _a: SyncArgs, _json: bool) -> Result<i32, CliError> {
    Err(CliError::Usage("this kiln was built without MongoDB support".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_the_documented_commands() {
        for args in [
            vec!["kiln", "up", "--to", "0003", "--dry-run"],
            vec!["kiln", "down", "--steps", "2"],
            vec!["kiln", "list", "--json"],
            vec!["kiln", "baseline", "0002"],
            vec!["kiln", "retire", "0002", "--reason", "x"],
            vec!["kiln", "repair", "0002", "--mark-applied", "--reason", "x"],
            vec!["kiln", "schema", "dump"],
            vec!["kiln", "verify", "--keep"],
            vec!["kiln", "up", "--collection", "users"],
        ] {
            Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        }
        assert!(Cli::try_parse_from(["kiln", "retire", "0002"]).is_err(), "retire needs --reason");
        assert!(Cli::try_parse_from(["kiln", "down", "--steps", "1", "--to", "2"]).is_err());
    }
}
