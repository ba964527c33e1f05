//! What every scenario uses: connecting to any engine, the runner settings,
//! and the runs themselves.

use std::sync::Arc;
use std::time::Duration;

use kiln_core::schema::{ColumnInfo, ConstraintInfo, Contract};
use kiln_core::{BackendConfig, DownTarget, EngineError, Migration, Policy, RunError, RunReport, Runner, RunnerSettings, UpTarget};
use kiln_testkit::compat::{Backend, Protocol};
use kiln_testkit::Engine;

/// Who the runs are recorded as.
pub const ACTOR: &str = "tester@testhost";

/// The engine a test function is named after.
pub fn engine(name: &str) -> Engine {
    match name {
        "postgres" => Engine::Postgres,
        "mysql" => Engine::Mysql,
        "sqlite" => Engine::Sqlite,
        "mongodb" => Engine::Mongodb,
        other => panic!("no engine called {other}"),
    }
}

/// Connect as `kiln::connect` does: MongoDB URLs to kiln-mongo, the rest to kiln-sql.
pub async fn connect(cfg: &BackendConfig) -> Result<Box<dyn kiln_core::Engine>, EngineError> {
    if cfg.url.expose().starts_with("mongodb") {
        kiln_mongo::connect(cfg).await
    } else {
        kiln_sql::connect(cfg).await
    }
}

/// An engine for `cfg`, driven one step at a time or by a runner.
pub async fn backend_for(cfg: &BackendConfig) -> Box<dyn Backend> {
    Protocol::boxed(connect(cfg).await.unwrap_or_else(|e| panic!("connect to {}: {e}", cfg.url)))
}

/// An engine for `url`.
pub async fn backend(url: &str) -> Box<dyn Backend> {
    backend_for(&BackendConfig::new(url)).await
}

/// A 1 s lock wait, runs recorded as [`ACTOR`].
pub fn settings() -> RunnerSettings {
    RunnerSettings { lock_timeout: Duration::from_secs(1), actor: ACTOR.into() }
}

/// `up` to the latest version.
pub async fn up(b: &mut dyn Backend, local: &[Migration]) -> Result<RunReport, RunError> {
    Runner::new(b, settings()).up(local, &UpTarget::Latest, &Policy::default(), false).await
}

/// `up` checked against a schema contract.
pub async fn up_with(b: &mut dyn Backend, local: &[Migration], c: &Contract) -> Result<RunReport, RunError> {
    Runner::new(b, settings()).with_contract(Some(Arc::new(c.clone()))).up(local, &UpTarget::Latest, &Policy::default(), false).await
}

/// `down` of the last batch.
pub async fn down(b: &mut dyn Backend, local: &[Migration]) -> Result<RunReport, RunError> {
    Runner::new(b, settings()).down(local, &DownTarget::LastBatch, false).await
}

/// The versions of a report's steps, in order.
pub fn versions(r: &RunReport) -> Vec<&str> {
    r.steps.iter().map(|s| s.version.as_str()).collect()
}

/// A contract from YAML.
pub fn contract(yaml: &str) -> Contract {
    Contract::parse(yaml, "schema.yaml").expect("contract parses")
}

/// A column as inspection reports it.
pub fn col(t: &str, nullable: bool) -> ColumnInfo {
    ColumnInfo { data_type: t.into(), nullable }
}

/// Owned strings.
pub fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// A constraint as inspection reports it.
pub fn constraint(kind: &str, columns: &[&str], definition: Option<&str>) -> ConstraintInfo {
    ConstraintInfo { kind: kind.into(), columns: strings(columns), definition: definition.map(str::to_string) }
}

/// Close an engine, checking that closing works.
pub async fn close(b: Box<dyn Backend>) {
    b.close().await.expect("close");
}

/// Column names of `table`, in order, read without kiln.
pub async fn columns(case: &kiln_testkit::case::EngineCase, table: &str) -> Vec<String> {
    let sql = match case.engine {
        Engine::Postgres => {
            format!("SELECT column_name::text FROM information_schema.columns WHERE table_name = '{table}' ORDER BY ordinal_position")
        }
        Engine::Mysql => format!(
            "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = '{}' AND TABLE_NAME = '{table}' ORDER BY ORDINAL_POSITION",
            case.db.name
        ),
        _ => format!("SELECT name FROM pragma_table_info('{table}') ORDER BY cid"),
    };
    case.strings(&sql).await
}
