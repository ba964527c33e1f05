//! The [`CodeContext`] of a code migration on MongoDB: database commands on
//! the engine's own client (inside the step's transaction when it has one),
//! and the driver's handles through [`handle`].

use async_trait::async_trait;
use bson::Bson;
use kiln_core::code::{CodeContext, CodeError, Row};
use mongodb::{ClientSession, Database};

use crate::command;
use crate::conn::Conn;

/// The driver's handles a MongoDB code migration may use directly: the
/// database kiln migrates and, on the transactional path
/// (`transaction: true` on a replica set), the session of the step's
/// transaction — pass it to every operation (`.session(s)`) so the change
/// commits with the history entry.
pub struct CodeHandle {
    /// The database kiln migrates.
    pub db: Database,
    /// The step's transaction, when it runs in one.
    pub session: Option<ClientSession>,
}

/// The driver's handles of `ctx` on MongoDB, `None` on other engines.
pub fn handle(ctx: &mut dyn CodeContext) -> Option<&mut CodeHandle> {
    ctx.native()?.downcast_mut::<CodeHandle>()
}

pub(crate) struct MongoCode<'c> {
    pub conn: &'c Conn,
    pub handle: CodeHandle,
}

#[async_trait]
impl CodeContext for MongoCode<'_> {
    fn engine(&self) -> &'static str {
        "mongodb"
    }

    async fn execute(&mut self, _sql: &str) -> Result<u64, CodeError> {
        Err("execute runs SQL; on MongoDB use run_command (or kiln_mongo::handle for the driver)".into())
    }

    async fn query(&mut self, _sql: &str) -> Result<Vec<Row>, CodeError> {
        Err("query runs SQL; on MongoDB use run_command (or kiln_mongo::handle for the driver)".into())
    }

    async fn run_command(&mut self, cmd: serde_json::Value) -> Result<serde_json::Value, CodeError> {
        let prepared = command::prepare(&cmd, &self.conn.db_name).map_err(|e| e.0)?;
        let reply = command::run(self.conn, &prepared, self.handle.session.as_mut())
            .await
            .map_err(|f| format!("{} failed: {}", prepared.name(), f.message))?;
        Ok(Bson::Document(reply).into_relaxed_extjson())
    }

    fn native(&mut self) -> Option<&mut (dyn std::any::Any + Send)> {
        Some(&mut self.handle)
    }
}
