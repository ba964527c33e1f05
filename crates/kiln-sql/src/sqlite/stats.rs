//! Row counts for [`crate::stats::table_status`].

use kiln_core::EngineError;

use super::SqliteEngine;
use crate::common::quote_double;
use crate::stats::{count_sql, literal, Counts};

impl SqliteEngine {
    /// `(rows, true)` of each of `tables`: SQLite keeps no estimate, so every
    /// table is counted, in one query.
    pub(crate) fn row_counts(&self, tables: &[String]) -> Result<Counts, EngineError> {
        let mut out = Counts::new();
        if tables.is_empty() {
            return Ok(out);
        }
        let fail = |e: rusqlite::Error| self.query_err("counting the rows of the tables", e);
        let sql = count_sql(&tables.iter().collect::<Vec<_>>(), |t| format!("main.{}", quote_double(t)), literal);
        let mut stmt = self.conn.prepare(&sql).map_err(fail)?;
        let mut rows = stmt.query([]).map_err(fail)?;
        while let Some(r) = rows.next().map_err(fail)? {
            let n: i64 = r.get(1).map_err(fail)?;
            out.insert(r.get(0).map_err(fail)?, (n.max(0) as u64, true));
        }
        Ok(out)
    }
}
