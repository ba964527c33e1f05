//! `kiln db create` / `kiln db drop`: the configured database itself (as
//! `sqlx database create|drop` and `dbmate create|drop` do).
//!
//! - PostgreSQL, MySQL/MariaDB: `CREATE DATABASE` / `DROP DATABASE` on the
//!   server, from its maintenance database (`postgres`, `information_schema`);
//!   the name is always quoted. A configured `schema` is not touched (kiln
//!   creates it on the first `up`).
//! - SQLite: the file (and its `-wal`, `-shm` and kiln's `-kiln.lock`).
//! - MongoDB: a database exists once something is written to it, so `create`
//!   has nothing to do and says so; `drop` drops it.
//!
//! `drop` destroys data: it needs `--yes`.

use std::path::PathBuf;

use kiln::url::EngineKind;
use kiln::BackendConfig;

use crate::cli::CliError;
use crate::render;
use kiln::config::Config;

/// What `kiln db` did.
#[derive(serde::Serialize)]
struct Outcome {
    database: String,
    action: &'static str,
    changed: bool,
    message: String,
}

/// `kiln db create` (`drop: false`) or `kiln db drop`.
pub async fn run(cfg: &Config, drop: bool, yes: bool, force: bool, json: bool) -> Result<i32, CliError> {
    if drop && !yes {
        return Err(CliError::Usage(format!(
            "`kiln db drop` destroys {} and everything in it; run it again with --yes if that is what you want",
            cfg.redacted_url()
        )));
    }
    let backend = cfg.backend_config();
    let kind = EngineKind::parse(&cfg.url).map_err(|e| CliError::Run(e.into()))?;
    let outcome = match kind {
        EngineKind::Sqlite => sqlite(&backend, drop)?,
        EngineKind::Mongodb => mongo(&backend, drop).await?,
        _ => server(&backend, drop, force).await?,
    };
    if json {
        render::json(&outcome);
    } else {
        println!("{}", outcome.message);
    }
    Ok(0)
}

async fn server(backend: &BackendConfig, drop: bool, force: bool) -> Result<Outcome, CliError> {
    let (server, db) = kiln::tenant_source::maintenance(backend.url.expose(), backend)
        .filter(|(_, d)| !d.is_empty())
        .ok_or_else(|| CliError::Usage(format!("{} names no database", backend.url.redacted())))?;
    let db = percent_decode(&db);
    let shown = backend.url.redacted();
    let (changed, message) = if drop {
        let existed = kiln_sql::names::drop_database(&server, &db, force).await.map_err(|e| CliError::Run(e.into()))?;
        (
            existed,
            if existed { format!("dropped database {db} ({shown})") } else { format!("database {db} does not exist ({shown}); nothing to drop") },
        )
    } else {
        let created = kiln_sql::names::create_database(&server, &db).await.map_err(|e| CliError::Run(e.into()))?;
        (created, if created { format!("created database {db} ({shown})") } else { format!("database {db} already exists ({shown})") })
    };
    Ok(Outcome { database: db, action: if drop { "drop" } else { "create" }, changed, message })
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| s.to_string())
}

#[cfg(feature = "mongodb")]
async fn mongo(backend: &BackendConfig, drop: bool) -> Result<Outcome, CliError> {
    let shown = backend.url.redacted();
    let name = kiln::tenant_source::split_database(backend.url.expose())
        .map(|(_, d, _)| d.to_string())
        .filter(|d| !d.is_empty())
        .or_else(|| backend.database.clone())
        .unwrap_or_else(|| shown.clone());
    if !drop {
        return Ok(Outcome {
            database: name,
            action: "create",
            changed: false,
            message: format!("MongoDB creates a database on its first write: nothing to do for {shown} (`kiln up` creates it)"),
        });
    }
    let existed = kiln_mongo::names::drop_database(backend).await.map_err(|e| CliError::Run(e.into()))?;
    let message = if existed { format!("dropped database {shown}") } else { format!("database {shown} does not exist; nothing to drop") };
    Ok(Outcome { database: name, action: "drop", changed: existed, message })
}

#[cfg(not(feature = "mongodb"))]
async fn mongo(_: &BackendConfig, _: bool) -> Result<Outcome, CliError> {
    Err(CliError::Usage("this kiln was built without MongoDB support".into()))
}

fn sqlite(backend: &BackendConfig, drop: bool) -> Result<Outcome, CliError> {
    let url = backend.url.expose();
    let path = kiln::url::sqlite_parts(url).map_or("", |(_, path, _)| path);
    if path.is_empty() || path.starts_with(':') {
        return Err(CliError::Usage(format!("{url} is not a database file")));
    }
    let path = PathBuf::from(path);
    let shown = path.display().to_string();
    if drop {
        let existed = path.exists();
        for suffix in ["", "-wal", "-shm", "-journal", "-kiln.lock"] {
            let mut p = path.clone().into_os_string();
            p.push(suffix);
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(CliError::Failed(format!("cannot remove {}: {e}", PathBuf::from(p).display()))),
            }
        }
        let message = if existed {
            format!("dropped database {shown} (the file and its -wal/-shm)")
        } else {
            format!("database {shown} does not exist; nothing to drop")
        };
        return Ok(Outcome { database: shown, action: "drop", changed: existed, message });
    }
    if path.exists() {
        return Ok(Outcome { database: shown.clone(), action: "create", changed: false, message: format!("database {shown} already exists") });
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(CliError::Usage(format!("cannot create {shown}: directory {} does not exist", dir.display())));
        }
    }
    rusqlite_free_create(&path).map_err(|e| CliError::Failed(format!("cannot create {shown}: {e}")))?;
    Ok(Outcome { database: shown.clone(), action: "create", changed: true, message: format!("created database {shown}") })
}

/// An empty file is an empty SQLite database.
fn rusqlite_free_create(path: &std::path::Path) -> std::io::Result<()> {
    std::fs::OpenOptions::new().write(true).create_new(true).open(path).map(|_| ())
}
