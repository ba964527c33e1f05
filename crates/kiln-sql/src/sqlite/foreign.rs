//! Other tools' history tables, read for `kiln adopt` (never changed).

use async_trait::async_trait;
use kiln_core::adopt::{ForeignReader, ForeignTable};
use kiln_core::EngineError;
use rusqlite::types::ValueRef;
use rusqlite::OptionalExtension;

use super::SqliteEngine;
use crate::common::quote_double;

#[async_trait]
impl ForeignReader for SqliteEngine {
    async fn read_foreign_table(&mut self, table: &str) -> Result<Option<ForeignTable>, EngineError> {
        let context = format!("reading {table} (another tool's history)");
        let exists = self
            .conn
            .query_row("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1", [table], |_| Ok(()))
            .optional()
            .map_err(|e| self.query_err(&context, e))?
            .is_some();
        if !exists {
            return Ok(None);
        }
        let read = || -> rusqlite::Result<ForeignTable> {
            let mut stmt = self.conn.prepare(&format!("SELECT * FROM {}", quote_double(table)))?;
            let columns: Vec<String> = stmt.column_names().iter().map(|c| c.to_ascii_lowercase()).collect();
            let n = columns.len();
            let rows = stmt
                .query_map([], |r| {
                    (0..n)
                        .map(|i| {
                            Ok(match r.get_ref(i)? {
                                ValueRef::Null => None,
                                ValueRef::Integer(v) => Some(v.to_string()),
                                ValueRef::Real(v) => Some(v.to_string()),
                                ValueRef::Text(t) => Some(String::from_utf8_lossy(t).into_owned()),
                                ValueRef::Blob(b) => Some(b.iter().map(|x| format!("{x:02x}")).collect()),
                            })
                        })
                        .collect::<rusqlite::Result<Vec<_>>>()
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(ForeignTable { columns, rows })
        };
        read().map(Some).map_err(|e| self.query_err(&context, e))
    }
}
