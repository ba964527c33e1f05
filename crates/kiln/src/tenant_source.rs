//! Reading a fleet's tenant names from where kiln.toml says they are
//! (DESIGN §5): a static `list`, a SQL `query` or a MongoDB `find` on the
//! public database, or the databases / schemas matching a `pattern`.
//!
//! Names are data. Every name is checked against the one rule of
//! [`tenant_name_problem`] before it is used: a name that breaks it (quotes,
//! semicolons, unicode, too long) never reaches a connection string or SQL,
//! and becomes a failed tenant of its own (the others go on). Duplicates
//! are kept once. Sources are read when a command runs, so a tenant added to
//! the table is migrated by the next `kiln up`.

use kiln_core::url::EngineKind;
use kiln_core::BackendConfig;

use crate::config::{tenant_name_problem, ConfigError, Placement, TenantSource, Tenants};

/// The fleet's tenants as read now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TenantList {
    /// Usable names, in the source's order.
    pub names: Vec<String>,
    /// Names the source gave that cannot be tenants, with why.
    pub rejected: Vec<(String, String)>,
}

/// Read the tenant names of `tenants`; `public` is the public database.
///
/// # Errors
/// [`ConfigError::Invalid`] (exit 2) naming the source when it cannot be read:
/// the query failed, the server is unreachable, the source does not fit the
/// engine (`find` on SQL, `query` on MongoDB), a pattern over a URL whose
/// `{tenant}` is not the database name.
pub async fn read(tenants: &Tenants, public: &BackendConfig) -> Result<TenantList, ConfigError> {
    let failed = |m: String| {
        ConfigError::Invalid(format!("cannot read the tenants ({}: [tenants] {}): {m}", tenants.declared_in.display(), tenants.source.describe()))
    };
    let raw: Vec<Option<String>> = match &tenants.source {
        TenantSource::List(l) => return Ok(TenantList { names: l.clone(), rejected: vec![] }),
        TenantSource::Query(sql) => match EngineKind::of(&public.url) {
            Some(EngineKind::Mongodb) => {
                return Err(failed("`query` is SQL and the public database is MongoDB: use `find = { collection, field, filter }`".into()))
            }
            _ => kiln_sql::names::read_names(public, kiln_sql::names::NameQuery::Sql(sql)).await.map_err(|e| failed(e.to_string()))?,
        },
        TenantSource::Find { collection, field, filter } => match EngineKind::of(&public.url) {
            Some(EngineKind::Mongodb) => mongo_find(public, collection, field, filter).await.map_err(failed)?,
            _ => return Err(failed("`find` reads a MongoDB collection and the public database is SQL: use `query = \"SELECT …\"`".into())),
        },
        TenantSource::Pattern(p) => return pattern(tenants, public, p).await.map_err(failed),
    };
    let mut list = TenantList::default();
    for (i, name) in raw.into_iter().enumerate() {
        match name {
            None => list.rejected.push((format!("#{}", i + 1), format!("row {} of the source has no name (NULL, missing or not text)", i + 1))),
            Some(n) => list.push(n),
        }
    }
    Ok(list)
}

impl TenantList {
    fn push(&mut self, name: String) {
        if self.names.contains(&name) || self.rejected.iter().any(|(n, _)| *n == name) {
            return;
        }
        match tenant_name_problem(&name) {
            Some(why) => self.rejected.push((name, why)),
            None => self.names.push(name),
        }
    }
}

#[cfg(feature = "mongodb")]
async fn mongo_find(public: &BackendConfig, collection: &str, field: &str, filter: &serde_json::Value) -> Result<Vec<Option<String>>, String> {
    let q = kiln_mongo::names::NameQuery::Find { collection: collection.into(), field: field.into(), filter: filter.clone() };
    kiln_mongo::names::read_names(public, &q).await.map_err(|e| e.to_string())
}

#[cfg(not(feature = "mongodb"))]
async fn mongo_find(_: &BackendConfig, _: &str, _: &str, _: &serde_json::Value) -> Result<Vec<Option<String>>, String> {
    Err("this build of kiln has no MongoDB support".into())
}

/// A template split around its one `{tenant}`.
struct Template<'a> {
    prefix: &'a str,
    suffix: &'a str,
}

impl<'a> Template<'a> {
    fn new(t: &'a str) -> Option<Self> {
        let (prefix, suffix) = t.split_once("{tenant}")?;
        (!suffix.contains("{tenant}")).then_some(Template { prefix, suffix })
    }
    /// The tenant whose name this template turns into `name`.
    fn invert<'n>(&self, name: &'n str) -> Option<&'n str> {
        let t = name.strip_prefix(self.prefix)?.strip_suffix(self.suffix)?;
        (!t.is_empty()).then_some(t)
    }
}

/// The server of `url` reached through its maintenance database
/// (PostgreSQL `postgres`, MySQL `information_schema`, MongoDB `admin`), to
/// list, create or drop the databases beside it: that URL's settings over
/// `base`, and the database `url` names (as written). `None` for SQLite, or
/// a URL without a database part.
pub fn maintenance(url: &str, base: &BackendConfig) -> Option<(BackendConfig, String)> {
    let admin = match EngineKind::of(url)? {
        EngineKind::Postgres => "postgres",
        EngineKind::Mysql => "information_schema",
        EngineKind::Mongodb => "admin",
        EngineKind::Sqlite => return None,
    };
    let (head, db, tail) = split_database(url)?;
    Some((BackendConfig { url: format!("{head}{admin}{tail}").into(), schema: None, ..base.clone() }, db.to_string()))
}

/// `scheme://authority/` + database + `?query`: the three parts of a server URL.
pub fn split_database(url: &str) -> Option<(&str, &str, &str)> {
    let after_scheme = url.find("://")? + 3;
    let slash = after_scheme + url[after_scheme..].find('/')?;
    let end = url[slash + 1..].find('?').map_or(url.len(), |q| slash + 1 + q);
    Some((&url[..slash + 1], &url[slash + 1..end], &url[end..]))
}

async fn pattern(tenants: &Tenants, public: &BackendConfig, glob: &str) -> Result<TenantList, String> {
    let pat = glob::Pattern::new(glob).map_err(|e| e.to_string())?;
    let (existing, template, public_name): (Vec<String>, String, Option<String>) = match &tenants.placement {
        Placement::Schema(tpl) => {
            let found = kiln_sql::names::read_names(public, kiln_sql::names::NameQuery::Schemas).await.map_err(|e| e.to_string())?;
            (found.into_iter().flatten().collect(), tpl.clone(), Some(public.schema.clone().unwrap_or_else(|| "public".into())))
        }
        Placement::Url(tpl) => match EngineKind::of(tpl) {
            Some(EngineKind::Sqlite) => {
                let (dir, file) = sqlite_template(tpl)?;
                let mut names = Vec::new();
                let entries = std::fs::read_dir(&dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
                for e in entries.flatten() {
                    if let Some(n) = e.file_name().to_str() {
                        names.push(n.to_string());
                    }
                }
                names.sort();
                (names, file, None)
            }
            kind => {
                split_database(tpl)
                    .filter(|(h, _, t)| !h.contains("{tenant}") && !t.contains("{tenant}"))
                    .ok_or("a `pattern` lists the databases of one server, so `{tenant}` must be in the database name of the `url` template")?;
                let (server, db) = maintenance(tpl, public).ok_or_else(|| format!("cannot list the databases of {}", kiln_core::url::redact(tpl)))?;
                let found = list_databases(&server, kind).await?;
                let public_db = split_database(public.url.expose()).map(|(_, d, _)| d.to_string());
                (found, db, public_db)
            }
        },
    };
    let template = Template::new(&template).ok_or("the template must contain `{tenant}` once")?;
    let system = ["admin", "local", "config", "information_schema", "performance_schema", "mysql", "sys"];
    let mut list = TenantList::default();
    for name in existing {
        if !pat.matches(&name) || Some(&name) == public_name.as_ref() || system.contains(&name.as_str()) {
            continue;
        }
        if let Some(t) = template.invert(&name) {
            list.push(t.to_string());
        }
    }
    Ok(list)
}

/// Create the database of a tenant at `url` on its server when it is missing
/// (`[tenants] create = true`): PostgreSQL and MySQL/MariaDB; MongoDB and
/// SQLite create theirs on first use. Returns whether it was created.
///
/// # Errors
/// Why it could not be created (no privilege, the server is unreachable).
pub(crate) async fn create_database(url: &str, public: &BackendConfig) -> Result<bool, kiln_core::EngineError> {
    if !matches!(EngineKind::of(url), Some(EngineKind::Postgres | EngineKind::Mysql)) {
        return Ok(false);
    }
    let Some((server, db)) = maintenance(url, public) else { return Ok(false) };
    kiln_sql::names::create_database(&server, &db).await
}

async fn list_databases(server: &BackendConfig, kind: Option<EngineKind>) -> Result<Vec<String>, String> {
    let names = match kind {
        #[cfg(feature = "mongodb")]
        Some(EngineKind::Mongodb) => {
            kiln_mongo::names::read_names(server, &kiln_mongo::names::NameQuery::Databases).await.map_err(|e| e.to_string())?
        }
        _ => kiln_sql::names::read_names(server, kiln_sql::names::NameQuery::Databases).await.map_err(|e| e.to_string())?,
    };
    Ok(names.into_iter().flatten().collect())
}

/// A SQLite URL template's directory and file-name template.
fn sqlite_template(tpl: &str) -> Result<(std::path::PathBuf, String), String> {
    let path = kiln_core::url::sqlite_parts(tpl).map_or(tpl, |(_, path, _)| path);
    let path = std::path::Path::new(path);
    let file = path.file_name().and_then(|f| f.to_str()).filter(|f| f.contains("{tenant}"));
    let dir = path.parent().filter(|d| !d.to_string_lossy().contains("{tenant}"));
    match (dir, file) {
        (Some(d), Some(f)) => Ok((if d.as_os_str().is_empty() { ".".into() } else { d.to_path_buf() }, f.to_string())),
        _ => Err("a `pattern` lists one directory, so `{tenant}` must be in the file name of the SQLite `url` template".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_invert() {
        let t = Template::new("tenant_{tenant}.db").unwrap();
        assert_eq!(t.invert("tenant_acme.db"), Some("acme"));
        assert_eq!(t.invert("tenant_.db"), None);
        assert_eq!(t.invert("other.db"), None);
        assert!(Template::new("{tenant}_{tenant}").is_none());
    }

    #[test]
    fn database_part_of_urls() {
        assert_eq!(
            split_database("postgres://u:p@h:5432/t_{tenant}?sslmode=disable"),
            Some(("postgres://u:p@h:5432/", "t_{tenant}", "?sslmode=disable"))
        );
        assert_eq!(split_database("mongodb://h/{tenant}"), Some(("mongodb://h/", "{tenant}", "")));
        assert_eq!(split_database("mongodb://h"), None);
    }

    #[test]
    fn sqlite_templates() {
        let (d, f) = sqlite_template("sqlite:///var/t/{tenant}.db?journal_mode=keep").unwrap();
        assert_eq!((d.to_str().unwrap(), f.as_str()), ("/var/t", "{tenant}.db"));
        assert!(sqlite_template("sqlite:///var/{tenant}/app.db").is_err());
    }

    #[test]
    fn hostile_and_duplicate_names_are_set_apart() {
        let mut l = TenantList::default();
        for n in ["acme", "acme", "x'; drop table t; --", "ünï", "globex"] {
            l.push(n.to_string());
        }
        assert_eq!(l.names, ["acme", "globex"]);
        assert_eq!(l.rejected.len(), 2);
        assert!(l.rejected[0].1.contains("cannot name a database"), "{:?}", l.rejected);
    }
}
