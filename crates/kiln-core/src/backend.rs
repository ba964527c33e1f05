//! What every engine is given (its configuration, the context of a run) and
//! the errors a step returns. The engine traits themselves are in
//! [`crate::engine`]; the order of a step in [`crate::step`].

use crate::error::{EngineError, FailureOutcome, StatementError};
use crate::model::{AppliedMigration, FailureInfo, Migration, State};
use crate::schema::Violation;
use crate::url::DbUrl;

/// Where an engine keeps kiln's own objects. Every engine takes this.
/// `Debug` shows the URL with its password redacted.
#[derive(Clone)]
pub struct BackendConfig {
    /// The database URL. It may hold a password: `Display`/`Debug` redact it,
    /// [`DbUrl::expose`] is for the driver only.
    pub url: DbUrl,
    /// History table/collection name (default `kiln_history`).
    pub history_table: String,
    /// Event log table/collection name (default `kiln_log`).
    pub log_table: String,
    /// Table/collection holding the schema snapshot of the last run (default `kiln_snapshot`).
    pub snapshot_table: String,
    /// PostgreSQL schema for kiln's tables and the migrations' search_path
    /// (default: the connection's current schema). Used for schema-per-tenant.
    pub schema: Option<String>,
    /// Database name to use when the URL names none (MongoDB: `[mongodb] database` in kiln.toml).
    pub database: Option<String>,
    /// The command only reads (`status`, `check`, `diff`, dry runs): the engine
    /// must create nothing — SQLite reads a missing file as an empty database
    /// instead of creating it.
    pub read_only: bool,
}

impl std::fmt::Debug for BackendConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendConfig")
            .field("url", &self.url)
            .field("history_table", &self.history_table)
            .field("log_table", &self.log_table)
            .field("snapshot_table", &self.snapshot_table)
            .field("schema", &self.schema)
            .field("database", &self.database)
            .field("read_only", &self.read_only)
            .finish()
    }
}

impl BackendConfig {
    /// Defaults for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        BackendConfig {
            url: DbUrl::new(url),
            history_table: "kiln_history".into(),
            log_table: "kiln_log".into(),
            snapshot_table: "kiln_snapshot".into(),
            schema: None,
            database: None,
            read_only: false,
        }
    }
}

/// Context for recording one migration.
#[derive(Clone, Debug)]
pub struct RecordContext {
    /// Batch number of this run.
    pub batch: i64,
    /// `user@host`.
    pub actor: String,
}

impl RecordContext {
    /// The history entry for `m` recorded in this run.
    pub fn entry(
        &self,
        m: &Migration,
        state: State,
        applied_at: chrono::DateTime<chrono::Utc>,
        duration_ms: i64,
        error: Option<FailureInfo>,
    ) -> AppliedMigration {
        AppliedMigration {
            version: m.version.clone(),
            description: m.description.clone(),
            script: m.display_path(),
            group: m.directives.group.clone(),
            checksum: m.checksum.clone(),
            state,
            batch: self.batch,
            applied_at,
            duration_ms,
            applied_by: self.actor.clone(),
            kiln_version: crate::model::KILN_VERSION.into(),
            error,
        }
    }
}

/// A migration body failed; says what it left behind.
#[derive(Debug, Clone)]
pub struct ApplyError {
    /// The failing statement/command.
    pub error: StatementError,
    /// What remains in the database and history.
    pub outcome: FailureOutcome,
}

/// Either a body failure or an engine failure (connection lost, history write failed).
#[derive(Debug)]
pub enum StepError {
    /// The migration's own statement failed.
    Body(ApplyError),
    /// The migration ran but left the schema breaking the contract (`schema.yaml`).
    Invalid {
        /// What is wrong.
        violations: Vec<Violation>,
        /// Rolled back, or recorded as failed.
        outcome: FailureOutcome,
    },
    /// kiln could not talk to the database.
    Engine(EngineError),
}

impl From<EngineError> for StepError {
    fn from(e: EngineError) -> Self {
        StepError::Engine(e)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn debug_never_shows_the_password() {
        let cfg = super::BackendConfig::new("postgres://app:hunter2@db.example/app?password=also-secret");
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("hunter2") && !shown.contains("also-secret"), "{shown}");
        assert!(shown.contains("db.example"), "{shown}");
    }
}
