//! Other tools' history tables, read for `kiln adopt` (never changed).

use async_trait::async_trait;
use kiln_core::adopt::{ForeignReader, ForeignTable};
use kiln_core::EngineError;
use sqlx::Row;

use super::MysqlEngine;
use crate::common::quote_backtick;

#[async_trait]
impl ForeignReader for MysqlEngine {
    async fn read_foreign_table(&mut self, table: &str) -> Result<Option<ForeignTable>, EngineError> {
        let context = format!("reading {table} (another tool's history)");
        let cols: Vec<(String, String)> = sqlx::query_as(
            "SELECT CAST(column_name AS CHAR), CAST(data_type AS CHAR) FROM information_schema.columns \
             WHERE table_schema = DATABASE() AND table_name = ? ORDER BY ordinal_position",
        )
        .bind(table)
        .fetch_all(&mut self.conn)
        .await
        .map_err(|e| self.err(&context, e))?;
        if cols.is_empty() {
            return Ok(None);
        }
        // Every value as text on the server: binary ones (sqlx's checksum) as hex.
        let select: Vec<String> = cols
            .iter()
            .map(|(c, t)| {
                let q = quote_backtick(c);
                if t.to_ascii_lowercase().contains("blob") || t.eq_ignore_ascii_case("binary") || t.eq_ignore_ascii_case("varbinary") {
                    format!("LOWER(HEX({q}))")
                } else {
                    format!("CAST({q} AS CHAR)")
                }
            })
            .collect();
        let sql = format!("SELECT {} FROM {}", select.join(", "), quote_backtick(table));
        // Identifiers quoted by quote_backtick; the names come from information_schema.
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(&mut self.conn).await.map_err(|e| self.err(&context, e))?;
        let mut out = ForeignTable { columns: cols.iter().map(|(c, _)| c.to_ascii_lowercase()).collect(), rows: Vec::with_capacity(rows.len()) };
        for r in rows {
            let values = (0..out.columns.len())
                .map(|i| r.try_get::<Option<String>, _>(i))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| self.err(&context, e))?;
            out.rows.push(values);
        }
        Ok(Some(out))
    }
}
