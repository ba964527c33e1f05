//! Reading names (tenants) from this engine: see `crate::names`.

use kiln_core::EngineError;

use super::conn::{error_text, is_connection_loss};
use super::PgBackend;

impl PgBackend {
    /// The first column of every row `sql` returns, as text (`None` for
    /// NULL), read in a read-only transaction: tenant names from a
    /// `[tenants] query` or from the catalog.
    pub(crate) async fn text_column(&self, sql: &str) -> Result<Vec<Option<String>>, EngineError> {
        let err = |e: tokio_postgres::Error| {
            let context = format!("running {sql:?} ({})", self.target);
            if is_connection_loss(&e) {
                EngineError::ConnectionLost { context, message: error_text(&e) }
            } else {
                EngineError::Query { context, message: error_text(&e) }
            }
        };
        self.client.batch_execute("BEGIN READ ONLY").await.map_err(err)?;
        let rows = self.client.simple_query(sql).await;
        let _ = self.client.batch_execute("ROLLBACK").await;
        let mut out = Vec::new();
        for m in rows.map_err(err)? {
            if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                out.push(r.get(0).map(str::to_string));
            }
        }
        Ok(out)
    }
}

impl PgBackend {
    /// Run one statement of kiln's own outside any transaction (`CREATE DATABASE`).
    pub(crate) async fn execute_plain(&self, sql: &str) -> Result<(), EngineError> {
        self.client
            .batch_execute(sql)
            .await
            .map_err(|e| EngineError::Query { context: format!("running {sql:?} ({})", self.target), message: error_text(&e) })
    }
}
