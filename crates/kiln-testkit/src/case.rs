//! [`EngineCase`]: one protocol scenario on one engine — a fresh database, a
//! migrations directory, and what is really in the database, read without
//! kiln, in the same words on every engine.
//!
//! The library-level conformance suite (`crates/kiln-sql/tests/engines/`)
//! runs each scenario once per engine with an `EngineCase`; engine-specific
//! expectations stay in the scenario, in a `match case.engine`.

use std::path::Path;

use kiln_core::split::Dialect;
use kiln_core::{load_dir, LoadOptions, Migration};
use mongodb::bson::{Bson, Document};

use crate::{Engine, TestDb};

/// A fresh database and migrations directory for one scenario on one engine.
pub struct EngineCase {
    /// The engine.
    pub engine: Engine,
    /// The fresh database.
    pub db: TestDb,
    /// The migrations directory.
    pub dir: tempfile::TempDir,
}

impl EngineCase {
    /// A fresh database on `engine` and an empty migrations directory.
    pub async fn new(engine: Engine) -> EngineCase {
        EngineCase { engine, db: TestDb::new(engine).await, dir: tempfile::tempdir().expect("temp dir") }
    }

    /// The URL of the fresh database.
    pub fn url(&self) -> &str {
        &self.db.url
    }

    /// True for PostgreSQL, MySQL and SQLite.
    pub fn is_sql(&self) -> bool {
        self.engine != Engine::Mongodb
    }

    /// The extension of this engine's migration files (`sql`, `yaml`).
    pub fn ext(&self) -> &'static str {
        if self.is_sql() {
            "sql"
        } else {
            "yaml"
        }
    }

    /// Write a migration file (sub-directories are created).
    pub fn write(&self, name: &str, text: &str) {
        write(self.dir.path(), name, text);
    }

    /// Remove a migration file.
    pub fn remove(&self, name: &str) {
        std::fs::remove_file(self.dir.path().join(name)).expect("remove migration file");
    }

    /// The migrations directory, loaded as the CLI would for this engine.
    pub fn load(&self) -> Vec<Migration> {
        load(self.dir.path(), self.engine)
    }

    /// Objects (tables or collections) other than kiln's own, sorted.
    pub async fn objects(&self) -> Vec<String> {
        self.all_objects().await.into_iter().filter(|n| !n.starts_with("kiln_") && !n.starts_with("sqlite_")).collect()
    }

    /// Every table or collection, kiln's included, sorted.
    pub async fn all_objects(&self) -> Vec<String> {
        self.db.objects("").await.expect("list tables or collections")
    }

    /// Rows or documents in `object`.
    pub async fn count(&self, object: &str) -> usize {
        match self.engine {
            Engine::Mongodb => crate::mongo::documents(self.url(), object).await.len(),
            _ => self.strings(&format!("SELECT COUNT(*) FROM {object}")).await[0].parse().expect("a count"),
        }
    }

    /// `version:state` of every history entry, by version.
    pub async fn history(&self) -> Vec<String> {
        self.history_in("kiln_history").await
    }

    /// `version:state` of every entry of the history table/collection `name`.
    pub async fn history_in(&self, name: &str) -> Vec<String> {
        match self.engine {
            Engine::Mongodb => crate::mongo::documents(self.url(), name)
                .await
                .iter()
                .map(|d| format!("{}:{}", number(d, "_id"), d.get_str("state").unwrap_or("?")))
                .collect(),
            Engine::Mysql => self.strings(&format!("SELECT CONCAT(version, ':', state) FROM {} ORDER BY version", quote(self.engine, name))).await,
            _ => self.strings(&format!("SELECT version || ':' || state FROM {} ORDER BY version", quote(self.engine, name))).await,
        }
    }

    /// `version state batch applied_by` of every history entry, by version.
    pub async fn history_rows(&self) -> Vec<String> {
        match self.engine {
            Engine::Mongodb => crate::mongo::documents(self.url(), "kiln_history")
                .await
                .iter()
                .map(|d| {
                    format!(
                        "{} {} {} {}",
                        number(d, "_id"),
                        d.get_str("state").unwrap_or("?"),
                        number(d, "batch"),
                        d.get_str("applied_by").unwrap_or("?")
                    )
                })
                .collect(),
            Engine::Mysql => self.strings("SELECT CONCAT(version, ' ', state, ' ', batch, ' ', applied_by) FROM kiln_history ORDER BY version").await,
            _ => self.strings("SELECT version || ' ' || state || ' ' || batch || ' ' || applied_by FROM kiln_history ORDER BY version").await,
        }
    }

    /// `event[:version]` of every event-log entry, in order.
    pub async fn events(&self) -> Vec<String> {
        self.events_in("kiln_log").await
    }

    /// `event[:version]` of every entry of the event log `name`, in order.
    pub async fn events_in(&self, name: &str) -> Vec<String> {
        match self.engine {
            Engine::Mongodb => crate::mongo::documents(self.url(), name)
                .await
                .iter()
                .map(|d| match d.get("version") {
                    Some(Bson::Null) | None => d.get_str("event").unwrap_or("?").to_string(),
                    Some(_) => format!("{}:{}", d.get_str("event").unwrap_or("?"), number(d, "version")),
                })
                .collect(),
            Engine::Mysql => {
                self.strings(&format!("SELECT CONCAT(event, COALESCE(CONCAT(':', version), '')) FROM {} ORDER BY id", quote(self.engine, name))).await
            }
            _ => self.strings(&format!("SELECT event || coalesce(':' || version, '') FROM {} ORDER BY id", quote(self.engine, name))).await,
        }
    }

    /// `reason` of every event-log entry of `event`, in order.
    pub async fn reasons(&self, event: &str) -> Vec<String> {
        self.log_field(event, "reason").await
    }

    /// `detail` of every event-log entry of `event`, in order.
    pub async fn details(&self, event: &str) -> Vec<String> {
        self.log_field(event, "detail").await
    }

    /// A text field (`reason`, `detail`, `name`, `actor`) of every event-log
    /// entry of `event`, in order; empty when not set.
    pub async fn log_field(&self, event: &str, field: &str) -> Vec<String> {
        match self.engine {
            Engine::Mongodb => crate::mongo::documents(self.url(), "kiln_log")
                .await
                .iter()
                .filter(|d| d.get_str("event") == Ok(event))
                .map(|d| d.get_str(field).unwrap_or("").to_string())
                .collect(),
            _ => self.strings(&format!("SELECT COALESCE({field}, '') FROM kiln_log WHERE event = '{event}' ORDER BY id")).await,
        }
    }

    /// Run a one-column query on a SQL engine (see [`TestDb::query_strings`]).
    ///
    /// # Panics
    /// On MongoDB, or when the query fails.
    pub async fn strings(&self, sql: &str) -> Vec<String> {
        self.db.query_strings(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
}

/// Write `text` to `dir/name`, creating sub-directories.
pub fn write(dir: &Path, name: &str, text: &str) {
    let p = dir.join(name);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).expect("create migration folder");
    }
    std::fs::write(p, text).expect("write migration file");
}

/// Load `dir` as the CLI would for `engine` (its SQL dialect).
pub fn load(dir: &Path, engine: Engine) -> Vec<Migration> {
    let dialect = match engine {
        Engine::Postgres => Dialect::POSTGRES,
        Engine::Mysql => Dialect::MYSQL,
        Engine::Sqlite => Dialect::SQLITE,
        Engine::Mongodb => Dialect::GENERIC,
    };
    load_dir(dir, &LoadOptions { dialect, name_rule: None }).expect("migrations load")
}

/// A table name quoted for `engine`.
fn quote(engine: Engine, name: &str) -> String {
    match engine {
        Engine::Mysql => format!("`{}`", name.replace('`', "``")),
        _ => format!("\"{}\"", name.replace('"', "\"\"")),
    }
}

/// An integer field as text (`?` when missing).
fn number(d: &Document, key: &str) -> String {
    match d.get(key) {
        Some(Bson::Int64(n)) => n.to_string(),
        Some(Bson::Int32(n)) => n.to_string(),
        Some(Bson::Double(n)) => n.to_string(),
        _ => "?".into(),
    }
}
