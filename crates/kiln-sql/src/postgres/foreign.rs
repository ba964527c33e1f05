//! Other tools' history tables, read for `kiln adopt` (never changed).

use async_trait::async_trait;
use kiln_core::adopt::{ForeignReader, ForeignTable};
use kiln_core::EngineError;
use tokio_postgres::types::Type;
use tokio_postgres::SimpleQueryMessage;

use super::PgBackend;
use crate::common::quote_double;

#[async_trait]
impl ForeignReader for PgBackend {
    async fn read_foreign_table(&mut self, table: &str) -> Result<Option<ForeignTable>, EngineError> {
        // Where kiln's own history goes: the configured schema, else the search path.
        let qualified = match &self.schema {
            Some(s) => format!("{}.{}", quote_double(s), quote_double(table)),
            None => quote_double(table),
        };
        let context = format!("reading {table} (another tool's history)");
        let exists: bool = self
            .client
            .query_typed_one("SELECT to_regclass($1) IS NOT NULL", &[(&qualified, Type::TEXT)])
            .await
            .and_then(|r| r.try_get(0))
            .map_err(|e| self.engine_error(&context, &e))?;
        if !exists {
            return Ok(None);
        }
        // The simple protocol answers every value as text (bytea as `\x…` hex).
        let messages = self.client.simple_query(&format!("SELECT * FROM {qualified}")).await.map_err(|e| self.engine_error(&context, &e))?;
        let mut out = ForeignTable::default();
        for m in messages {
            match m {
                SimpleQueryMessage::RowDescription(cols) => out.columns = cols.iter().map(|c| c.name().to_ascii_lowercase()).collect(),
                SimpleQueryMessage::Row(r) => {
                    if out.columns.is_empty() {
                        out.columns = r.columns().iter().map(|c| c.name().to_ascii_lowercase()).collect();
                    }
                    out.rows.push((0..r.len()).map(|i| r.get(i).map(|v| v.strip_prefix("\\x").unwrap_or(v).to_string())).collect());
                }
                _ => {}
            }
        }
        Ok(Some(out))
    }
}
