//! Configuration: `kiln.toml`, environment, `.env` and command-line flags.
//!
//! Precedence for the database URL: `--url`, then `KILN_DATABASE_URL`, then
//! `DATABASE_URL` (either may come from a `.env` file, which never overrides
//! the real environment), then `url` in `kiln.toml`, then the embedded default
//! `sqlite://kiln.db`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_core::url::DbUrl;
use serde::Deserialize;

/// The embedded default database.
pub const DEFAULT_URL: &str = "sqlite://kiln.db";
/// The default migrations directory.
pub const DEFAULT_DIR: &str = "migrations";
/// The default config file.
pub const DEFAULT_CONFIG: &str = "kiln.toml";
/// The schema contract file, beside kiln.toml.
pub const DEFAULT_SCHEMA_FILE: &str = "schema.yaml";

/// How new migration versions are numbered by `kiln create`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Versioning {
    /// `0001`, `0002`, …
    #[default]
    Sequential,
    /// `20251101120000` (UTC).
    Timestamp,
}

/// A duration written as seconds (`60`) or with a unit (`"90s"`, `"2m"`, `"500ms"`).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum DurationValue {
    Secs(u64),
    Text(String),
}

/// `[mongodb]` section.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MongoSection {
    /// Database to use when the URL names none.
    pub database: Option<String>,
}

/// The contents of `kiln.toml`. Every key is optional.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Database URL.
    pub url: Option<String>,
    /// Migrations directory (relative to the config file's directory).
    pub dir: Option<PathBuf>,
    /// History table/collection.
    pub history_table: Option<String>,
    /// Event log table/collection.
    pub log_table: Option<String>,
    /// Schema snapshot table/collection.
    pub snapshot_table: Option<String>,
    /// Lock wait.
    lock_timeout: Option<DurationValue>,
    /// Numbering for `kiln create`.
    pub versioning: Option<Versioning>,
    /// Naming rule (regex on the file name without extension).
    pub name_rule: Option<String>,
    /// Allow pending migrations older than the newest applied one.
    pub allow_out_of_order: Option<bool>,
    /// PostgreSQL schema for kiln's tables and the migrations.
    pub schema: Option<String>,
    /// Expected schema file.
    pub schema_file: Option<PathBuf>,
    /// When to validate against it.
    pub validate: Option<ValidateMode>,
    /// MongoDB settings.
    pub mongodb: Option<MongoSection>,
    /// The tenant fleet (DESIGN §5).
    pub tenants: Option<TenantsSection>,
}

/// `[tenants]`: where the tenants are and how to reach each.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantsSection {
    /// A static list of tenant names.
    pub list: Option<Vec<String>>,
    /// PostgreSQL: one schema per tenant inside the public database (`"{tenant}"`).
    pub schema: Option<String>,
    /// One database per tenant: a URL with `{tenant}` (any engine).
    pub url: Option<String>,
    /// Tenants migrated at a time.
    pub concurrency: Option<usize>,
    /// Create a tenant's database when it is missing (PostgreSQL, MySQL; `url` placement).
    pub create: Option<bool>,
    /// SQL on the public database whose first column names the tenants.
    pub query: Option<String>,
    /// MongoDB: a find on a collection of the public database.
    pub find: Option<FindSection>,
    /// Databases (or PostgreSQL schemas) whose name matches this glob.
    pub pattern: Option<String>,
}

/// `[tenants] find = { collection, field, filter }`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FindSection {
    /// Collection of the public database (`client_configs`).
    pub collection: String,
    /// The field that names each tenant (a dotted path).
    pub field: String,
    /// Which documents (a query filter; every document when absent).
    pub filter: Option<toml::Value>,
}

/// Where the tenant names come from.
#[derive(Clone, Debug, PartialEq)]
pub enum TenantSource {
    /// `list = […]`: these, in this order (validated when kiln.toml is read).
    List(Vec<String>),
    /// `query = "SELECT …"`: the first column of its rows, on the public database.
    Query(String),
    /// `find = {…}`: a field of the matching documents of a public collection.
    Find {
        /// Collection.
        collection: String,
        /// Field (dotted path).
        field: String,
        /// Filter, as JSON.
        filter: serde_json::Value,
    },
    /// `pattern = "tenant_*"`: the databases (or schemas) whose name matches.
    Pattern(String),
}

impl TenantSource {
    /// How the source is written in kiln.toml, for messages.
    pub fn describe(&self) -> String {
        match self {
            TenantSource::List(l) => format!("list of {}", l.len()),
            TenantSource::Query(q) => format!("query {q:?}"),
            TenantSource::Find { collection, field, filter } => format!("find on {collection} (field {field}, filter {filter})"),
            TenantSource::Pattern(p) => format!("pattern {p:?}"),
        }
    }
}

/// Why `name` cannot be a tenant (`None` when it can): 1 to 63 ASCII letters,
/// digits, `_` or `-`, so it names a database, a schema or a file safely on
/// every engine.
pub fn tenant_name_problem(name: &str) -> Option<String> {
    let ok = !name.is_empty() && name.len() <= 63 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    (!ok).then(|| {
        format!(
            "tenant name {:?} cannot name a database or schema safely: use 1 to 63 ASCII letters, digits, `_` or `-`",
            name.chars().take(80).collect::<String>()
        )
    })
}

/// The resolved fleet: tenant names and how to reach each.
#[derive(Clone, Debug, PartialEq)]
pub struct Tenants {
    /// Where the tenant names come from (read when a command runs, except a `list`).
    pub source: TenantSource,
    /// The configuration file that declared the fleet (for messages).
    pub declared_in: PathBuf,
    /// Create a missing tenant database (`create = true`) instead of failing that tenant.
    pub create: bool,
    /// How a tenant is reached.
    pub placement: Placement,
    /// Tenants migrated at a time.
    pub concurrency: usize,
}

/// Where a tenant lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// A PostgreSQL schema named by the template, inside the public database.
    Schema(String),
    /// A database of its own, at the URL the template gives.
    Url(String),
}

impl Tenants {
    /// A tenant's schema or URL from its template.
    pub fn resolve(template: &str, tenant: &str) -> String {
        template.replace("{tenant}", tenant)
    }

    fn from_section(t: TenantsSection, path: &Path) -> Result<Tenants, ConfigError> {
        let at = |m: String| ConfigError::Invalid(format!("{}: [tenants] {m}", path.display()));
        let given: Vec<&str> =
            [("list", t.list.is_some()), ("query", t.query.is_some()), ("find", t.find.is_some()), ("pattern", t.pattern.is_some())]
                .into_iter()
                .filter_map(|(k, set)| set.then_some(k))
                .collect();
        if given.len() > 1 {
            return Err(at(format!("set one source of tenant names, not {}", given.join(" and "))));
        }
        let source = if let Some(names) = t.list {
            let mut seen = std::collections::HashSet::new();
            for n in &names {
                if let Some(problem) = tenant_name_problem(n) {
                    return Err(at(problem));
                }
                if !seen.insert(n.as_str()) {
                    return Err(at(format!("tenant {n:?} is listed twice")));
                }
            }
            TenantSource::List(names)
        } else if let Some(q) = t.query {
            if q.trim().is_empty() {
                return Err(at("`query` is empty: give the SQL whose first column names the tenants".into()));
            }
            TenantSource::Query(q)
        } else if let Some(f) = t.find {
            if f.collection.is_empty() || f.field.is_empty() {
                return Err(at("`find` needs a `collection` and a `field`".into()));
            }
            let filter = match f.filter {
                None => serde_json::json!({}),
                Some(v @ toml::Value::Table(_)) => serde_json::to_value(v).map_err(|e| at(format!("`find.filter`: {e}")))?,
                Some(other) => return Err(at(format!("`find.filter` must be a table (a query document), not {other}"))),
            };
            TenantSource::Find { collection: f.collection, field: f.field, filter }
        } else if let Some(p) = t.pattern {
            if let Err(e) = glob::Pattern::new(&p) {
                return Err(at(format!("`pattern` {p:?} is not a valid pattern: {e}")));
            }
            TenantSource::Pattern(p)
        } else {
            return Err(at(
                "needs the tenants: `list = [\"acme\", …]`, `query = \"SELECT …\"`, `find = { collection, field }` or `pattern = \"tenant_*\"`"
                    .into(),
            ));
        };
        let placement = match (t.schema, t.url) {
            (Some(s), None) if s.contains("{tenant}") => Placement::Schema(s),
            (None, Some(u)) if u.contains("{tenant}") => Placement::Url(u),
            (Some(_), Some(_)) => return Err(at("set `schema` (PostgreSQL schema per tenant) or `url` (database per tenant), not both".into())),
            (None, None) => return Err(at("needs `schema = \"{tenant}\"` (PostgreSQL) or `url = \"…/{tenant}\"`".into())),
            _ => return Err(at("the `schema` or `url` template must contain `{tenant}`".into())),
        };
        let concurrency = match t.concurrency {
            Some(0) => return Err(at("concurrency must be at least 1".into())),
            Some(n) if n > 256 => return Err(at(format!("concurrency {n} is more than 256"))),
            Some(n) => n,
            None => default_concurrency(),
        };
        Ok(Tenants { source, placement, concurrency, declared_in: path.to_path_buf(), create: t.create.unwrap_or(false) })
    }
}

/// Tenants at a time when kiln.toml does not say: the databases do the work,
/// so a few per core.
pub fn default_concurrency() -> usize {
    std::thread::available_parallelism().map(|n| n.get() * 4).unwrap_or(8).min(32)
}

/// When `up` validates the schema against `schema.yaml`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ValidateMode {
    /// Before every migration commits (the default when the schema file exists).
    #[default]
    AfterEach,
    /// Never during `up` (`kiln check` and `kiln verify` still validate).
    Off,
}

/// A configuration problem (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// kiln.toml cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// kiln.toml cannot be parsed.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML error, with line and column.
        message: String,
    },
    /// A `.env` file cannot be parsed.
    #[error(".env: {0}")]
    DotEnv(String),
    /// A value is invalid.
    #[error("{0}")]
    Invalid(String),
}

/// Flags from the command line (or a library caller) that override the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--url`.
    pub url: Option<String>,
    /// `--dir`.
    pub dir: Option<PathBuf>,
    /// `--config`.
    pub config: Option<PathBuf>,
    /// `--lock-timeout` in seconds.
    pub lock_timeout: Option<Duration>,
    /// `--allow-out-of-order`.
    pub allow_out_of_order: bool,
}

/// Where the URL came from, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UrlSource {
    /// `--url`.
    Flag,
    /// `KILN_DATABASE_URL`.
    KilnEnv,
    /// `DATABASE_URL`.
    Env,
    /// `kiln.toml`.
    File,
    /// The embedded default.
    Default,
}

/// The resolved configuration. `Debug` shows the URL with its password redacted.
#[derive(Clone)]
pub struct Config {
    /// Database URL. It may contain a password: `Display`/`Debug` redact it,
    /// [`DbUrl::expose`] is for the driver only.
    pub url: DbUrl,
    /// Where the URL came from.
    pub url_source: UrlSource,
    /// Migrations directory.
    pub dir: PathBuf,
    /// Config file used, if one exists.
    pub config_file: Option<PathBuf>,
    /// History table/collection.
    pub history_table: String,
    /// Event log table/collection.
    pub log_table: String,
    /// Schema snapshot table/collection.
    pub snapshot_table: String,
    /// Lock wait.
    pub lock_timeout: Duration,
    /// Numbering for `kiln create`: kiln.toml's `versioning`, else timestamps
    /// on MongoDB (migrate-mongo's convention) and sequential numbers on SQL.
    pub versioning: Versioning,
    /// Whether kiln.toml set `versioning`.
    pub versioning_explicit: bool,
    /// Naming rule override.
    pub name_rule: Option<String>,
    /// Allow out-of-order pending migrations.
    pub allow_out_of_order: bool,
    /// PostgreSQL schema.
    pub schema: Option<String>,
    /// MongoDB database when the URL names none.
    pub mongodb_database: Option<String>,
    /// Expected schema file (may not exist).
    pub schema_file: PathBuf,
    /// Whether the schema file path was set explicitly (then it must exist).
    pub schema_file_explicit: bool,
    /// When `up` validates.
    pub validate: ValidateMode,
    /// The tenant fleet, when kiln.toml has `[tenants]`.
    pub tenants: Option<Tenants>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("url", &self.url)
            .field("url_source", &self.url_source)
            .field("dir", &self.dir)
            .field("config_file", &self.config_file)
            .field("history_table", &self.history_table)
            .field("lock_timeout", &self.lock_timeout)
            .field("schema", &self.schema)
            .field("mongodb_database", &self.mongodb_database)
            .field("tenants", &self.tenants.as_ref().map(|t| t.source.describe()))
            .finish_non_exhaustive()
    }
}

/// `url` with a relative SQLite file path made relative to `base` (the
/// directory of the kiln.toml it came from); any other URL unchanged.
pub fn rebase_sqlite(url: &str, base: &Path) -> String {
    if base.as_os_str().is_empty() {
        return url.to_string();
    }
    let Some((prefix, path, query)) = kiln_core::url::sqlite_parts(url) else {
        return url.to_string();
    };
    if path.is_empty() || path.starts_with('/') || path.starts_with(':') {
        return url.to_string(); // absolute, or `:memory:`
    }
    let joined = base.join(path);
    let mut out = format!("{prefix}{}", joined.display());
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// Read `.env` from the current directory (or a parent) into the process
/// environment, never overriding a variable that is already set. The `kiln`
/// binary calls this before [`Config::load`]; a library embedding kiln decides
/// for itself (reading files into the environment is the program's business).
///
/// # Errors
/// [`ConfigError::DotEnv`] for a `.env` file that cannot be parsed.
pub fn load_dotenv() -> Result<(), ConfigError> {
    match dotenvy::dotenv() {
        Ok(_) => Ok(()),
        Err(e) if e.not_found() => Ok(()),
        // dotenvy's message repeats the whole line, which may hold a password.
        Err(dotenvy::Error::LineParse(line, at)) => {
            let key = line.split('=').next().unwrap_or("").trim();
            let key = if !key.is_empty() && key.len() <= 64 && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                format!(" (the line setting {key})")
            } else {
                String::new()
            };
            Err(ConfigError::DotEnv(format!("cannot parse a line{key} at character {at}; the line is not shown, it may hold a secret")))
        }
        Err(e) => Err(ConfigError::DotEnv(kiln_core::url::scrub_text(&e.to_string()))),
    }
}

impl Config {
    /// Resolve the configuration from the file, environment and overrides.
    /// `.env` is not read here (see [`load_dotenv`]).
    ///
    /// # Errors
    /// An unreadable or invalid `kiln.toml`, or invalid values.
    pub fn load(o: &Overrides) -> Result<Config, ConfigError> {
        let explicit = o.config.clone().or_else(|| std::env::var_os("KILN_CONFIG").map(PathBuf::from));
        // Like cargo and git: the nearest kiln.toml in this directory or a parent.
        let path = explicit.clone().or_else(find_config).unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
        let file: FileConfig = match read_config_text(&path) {
            Ok(text) => toml::from_str(&text).map_err(|e| toml_error(&path, &text, &e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && explicit.is_none() => FileConfig::default(),
            Err(e) => return Err(ConfigError::Read { path: path.clone(), source: e }),
        };
        let config_file = path.is_file().then(|| path.clone());
        let base = config_file.as_ref().and_then(|p| p.parent()).map(Path::to_path_buf).unwrap_or_default();

        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let (url, url_source) = if let Some(u) = &o.url {
            (u.clone(), UrlSource::Flag)
        } else if let Some(u) = env("KILN_DATABASE_URL") {
            (u, UrlSource::KilnEnv)
        } else if let Some(u) = env("DATABASE_URL") {
            (u, UrlSource::Env)
        } else if let Some(u) = &file.url {
            // A relative SQLite path in kiln.toml is relative to kiln.toml, like `dir`.
            (rebase_sqlite(u, &base), UrlSource::File)
        } else {
            (DEFAULT_URL.to_string(), UrlSource::Default)
        };
        let dir = match (&o.dir, &file.dir) {
            (Some(d), _) => d.clone(),
            (None, Some(d)) if d.is_relative() => base.join(d),
            (None, Some(d)) => d.clone(),
            (None, None) => base.join(DEFAULT_DIR),
        };
        let lock_timeout = match (&o.lock_timeout, &file.lock_timeout) {
            (Some(d), _) => *d,
            (None, Some(v)) => parse_duration(v).map_err(|m| ConfigError::Invalid(format!("{}: lock_timeout: {m}", path.display())))?,
            (None, None) => Duration::from_secs(60),
        };
        if let Some(rule) = &file.name_rule {
            regex::Regex::new(rule).map_err(|e| ConfigError::Invalid(format!("{}: name_rule is not a valid regex: {e}", path.display())))?;
        }
        for (key, v) in [
            ("history_table", &file.history_table),
            ("log_table", &file.log_table),
            ("snapshot_table", &file.snapshot_table),
            ("schema", &file.schema),
        ] {
            if let Some(v) = v {
                if v.is_empty() || v.len() > 63 || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(ConfigError::Invalid(format!("{}: {key} = {v:?}: use 1 to 63 letters, digits or underscores", path.display())));
                }
            }
        }
        let default_versioning = if url.starts_with("mongodb") { Versioning::Timestamp } else { Versioning::Sequential };
        Ok(Config {
            url: DbUrl::new(url),
            url_source,
            dir,
            config_file,
            history_table: file.history_table.unwrap_or_else(|| "kiln_history".into()),
            log_table: file.log_table.unwrap_or_else(|| "kiln_log".into()),
            snapshot_table: file.snapshot_table.unwrap_or_else(|| "kiln_snapshot".into()),
            lock_timeout,
            versioning_explicit: file.versioning.is_some(),
            versioning: file.versioning.unwrap_or(default_versioning),
            name_rule: file.name_rule,
            allow_out_of_order: o.allow_out_of_order || file.allow_out_of_order.unwrap_or(false),
            schema: file.schema,
            mongodb_database: file.mongodb.and_then(|m| m.database),
            tenants: match file.tenants {
                Some(t) => {
                    let mut t = Tenants::from_section(t, &path)?;
                    // A relative SQLite path in the template is relative to kiln.toml too.
                    if let Placement::Url(u) = &t.placement {
                        t.placement = Placement::Url(rebase_sqlite(u, &base));
                    }
                    Some(t)
                }
                None => None,
            },
            schema_file_explicit: file.schema_file.is_some(),
            schema_file: match file.schema_file {
                Some(p) if p.is_relative() => base.join(p),
                Some(p) => p,
                None => base.join(DEFAULT_SCHEMA_FILE),
            },
            validate: file.validate.unwrap_or_default(),
        })
    }

    /// The expected schema, when the schema file exists.
    ///
    /// # Errors
    /// An unreadable or invalid file, or an explicitly configured file that is missing.
    pub fn contract(&self) -> Result<Option<kiln_core::schema::Contract>, ConfigError> {
        read_contract(&self.schema_file, self.schema_file_explicit)
    }

    /// The URL with any password replaced by `***`.
    pub fn redacted_url(&self) -> String {
        self.url.redacted()
    }

    /// The engine settings for this configuration.
    pub fn backend_config(&self) -> kiln_core::BackendConfig {
        kiln_core::BackendConfig {
            url: self.url.clone(),
            history_table: self.history_table.clone(),
            log_table: self.log_table.clone(),
            snapshot_table: self.snapshot_table.clone(),
            schema: self.schema.clone(),
            database: self.mongodb_database.clone(),
            read_only: false,
        }
    }
}

/// The largest kiln.toml kiln reads.
const MAX_CONFIG_BYTES: usize = 1 << 20;

/// kiln.toml as text: a regular file (a FIFO would block every command, a link
/// to `/dev/zero` would fill memory) of at most [`MAX_CONFIG_BYTES`].
fn read_config_text(path: &Path) -> std::io::Result<String> {
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => {
            return Err(std::io::Error::other(
                "not a regular file (a FIFO, socket, device or directory); kiln reads kiln.toml only from a regular file",
            ))
        }
        _ => {}
    }
    let bytes = kiln_core::source::read_bounded(path, MAX_CONFIG_BYTES)?;
    String::from_utf8(bytes).map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not valid UTF-8"))
}

/// A kiln.toml syntax error, located by line and column. toml's own message
/// repeats the offending line, which may hold a password (`url = postgres://u:pw@h`
/// without quotes): the line is not repeated, and the message is scrubbed.
fn toml_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let start = e.span().map(|s| s.start).unwrap_or(0);
    let before = text.get(..start).unwrap_or("");
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    let what = kiln_core::error::cap(&kiln_core::url::scrub_text(e.message().trim()), 300).replace('\n', "; ");
    let mut message = format!("line {line}, column {column}: {what}");
    let source_line = text.lines().nth(line - 1).unwrap_or("");
    if let Some((key, value)) = source_line.split_once('=') {
        let value = value.trim_start();
        if !value.is_empty() && !value.starts_with(['"', '\'', '[', '{']) && value.parse::<f64>().is_err() && !matches!(value, "true" | "false") {
            message.push_str(&format!("; a text value needs quotes: {} = \"…\"", key.trim()));
        }
    }
    ConfigError::Parse { path: path.to_path_buf(), message }
}

fn parse_duration(v: &DurationValue) -> Result<Duration, String> {
    match v {
        DurationValue::Secs(s) => checked_duration(*s as f64, &s.to_string()),
        DurationValue::Text(t) => parse_duration_text(t),
    }
}

/// The nearest `kiln.toml` in the current directory or one of its parents,
/// as a path relative to the current directory (`kiln.toml`, `../kiln.toml`).
pub fn find_config() -> Option<PathBuf> {
    let cwd = std::env::current_dir().ok()?;
    let mut rel = PathBuf::new();
    for dir in cwd.ancestors() {
        if dir.join(DEFAULT_CONFIG).is_file() {
            return Some(rel.join(DEFAULT_CONFIG));
        }
        rel.push("..");
    }
    None
}

/// Read the schema contract at `path`: `None` when the file does not exist
/// and was not named explicitly (`explicit`), an error when a named file is
/// missing.
///
/// # Errors
/// An unreadable or invalid file, or an explicitly named file that is missing.
pub fn read_contract(path: &Path, explicit: bool) -> Result<Option<kiln_core::schema::Contract>, ConfigError> {
    // Bounded: a schema file is read before anything runs, and may be a link.
    match kiln_core::source::read_text(path) {
        Ok(text) => kiln_core::schema::Contract::parse(&text, &path.display().to_string()).map(Some).map_err(|e| ConfigError::Invalid(e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Ok(None),
        Err(e) => Err(ConfigError::Read { path: path.to_path_buf(), source: e }),
    }
}

/// Parse `60`, `90s`, `2m`, `500ms`.
pub fn parse_duration_text(t: &str) -> Result<Duration, String> {
    let t = t.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len()));
    let shown: String = t.chars().take(40).collect();
    let shown = if shown.len() < t.len() { format!("{shown}…") } else { shown };
    let n: f64 = num.parse().map_err(|_| format!("{shown:?} is not a duration (use e.g. 60, \"90s\", \"2m\", \"500ms\")"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        other => return Err(format!("unknown unit {other:?} in {shown:?} (use ms, s, m or h)")),
    };
    checked_duration(secs, &shown)
}

/// The longest duration kiln accepts for a wait: a week. Anything longer is a
/// typo, and would overflow the clock arithmetic of the wait itself.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

fn checked_duration(secs: f64, shown: &str) -> Result<Duration, String> {
    match Duration::try_from_secs_f64(secs) {
        Ok(d) if d <= MAX_DURATION => Ok(d),
        _ => Err(format!("{shown:?} is out of range (at most {} hours)", MAX_DURATION.as_secs() / 3600)),
    }
}

/// The `kiln.toml` that `kiln init` writes.
pub fn init_template(url: &str, dir: &str) -> String {
    let versioning = if url.starts_with("mongodb") { "timestamp" } else { "sequential" };
    format!(
        r#"# kiln configuration. Every key is optional; the values shown are the defaults
# unless set. The database URL can also come from --url, KILN_DATABASE_URL or
# DATABASE_URL (also read from .env), which take precedence over this file.

# Database: sqlite://file.db, postgres://user:pass@host/db, mysql://… / mariadb://…,
# mongodb://host/db or mongodb+srv://…
url = "{url}"

# Directory holding the migration files (relative to this file).
dir = "{dir}"

# How `kiln create` numbers new migrations: "sequential" (0001, 0002, …) or
# "timestamp" (20251101120000, UTC).
versioning = "{versioning}"

# Seconds to wait for another kiln run's lock before giving up.
lock_timeout = 60

# Names of kiln's own history table/collection and event log.
# history_table = "kiln_history"
# log_table = "kiln_log"
# snapshot_table = "kiln_snapshot"

# Naming rule for migration files (regex on the name without extension).
# Default: version, underscore, lower-case snake description (0001_add_users).
# name_rule = '^[0-9]+_[a-z0-9]+(_[a-z0-9]+)*$'

# Allow applying a pending migration older than the newest applied one.
# allow_out_of_order = false

# Expected schema (see docs/schema.md) and when `kiln up` validates against it:
# "after-each" (every migration, before it commits; the default when the file
# exists) or "off". `kiln check` and `kiln verify` always use it.
# schema_file = "schema.yaml"
# validate = "after-each"

# PostgreSQL: schema for kiln's tables and the migrations' search_path.
# schema = "public"

# MongoDB: database to use when the URL names none.
# [mongodb]
# database = "app"
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_sqlite_paths_in_kiln_toml_follow_the_file() {
        let base = Path::new("../proj");
        assert_eq!(rebase_sqlite("sqlite://kiln.db", base), "sqlite://../proj/kiln.db");
        assert_eq!(rebase_sqlite("sqlite:data/k.db?mode=rwc", base), "sqlite:../proj/data/k.db?mode=rwc");
        for same in ["sqlite:///abs/k.db", "sqlite::memory:", "postgres://u@h/db", "mongodb://h/db"] {
            assert_eq!(rebase_sqlite(same, base), same);
        }
        assert_eq!(rebase_sqlite("sqlite://kiln.db", Path::new("")), "sqlite://kiln.db");
    }

    #[test]
    fn durations_are_range_checked_not_panicking() {
        // These panicked ("cannot convert float seconds to Duration") before.
        for bad in ["99999999999999999999", "5124095576030431h", "169h"] {
            let e = parse_duration_text(bad).unwrap_err();
            assert!(e.contains("out of range") || e.contains("not a duration"), "{bad}: {e}");
        }
        assert!(parse_duration(&DurationValue::Secs(u64::MAX)).unwrap_err().contains("out of range"));
        assert!(parse_duration_text(&"9".repeat(10_000)).unwrap_err().len() < 200, "errors do not echo huge values");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_text("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration_text("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration_text("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration_text("5").unwrap(), Duration::from_secs(5));
        assert!(parse_duration_text("soon").is_err());
    }

    #[test]
    fn template_parses() {
        let t = init_template("sqlite://kiln.db", "migrations");
        let f: FileConfig = toml::from_str(&t).unwrap();
        assert_eq!(f.url.as_deref(), Some("sqlite://kiln.db"));
        assert_eq!(f.versioning, Some(Versioning::Sequential));
    }

    #[test]
    fn unknown_key_is_an_error() {
        let e = toml::from_str::<FileConfig>("urll = \"x\"\n").unwrap_err().to_string();
        assert!(e.contains("urll"), "{e}");
    }
}
