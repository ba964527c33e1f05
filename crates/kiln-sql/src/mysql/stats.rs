//! Row counts for [`crate::stats::table_status`].

use kiln_core::EngineError;
use sqlx::{AssertSqlSafe, Row};

use super::MysqlEngine;
use crate::common::quote_backtick;
use crate::stats::{count_sql, literal, Counts, EXACT_COUNT_LIMIT};

impl MysqlEngine {
    /// `(rows, exact)` of each of `tables`: `information_schema.TABLES.TABLE_ROWS`
    /// (InnoDB's estimate) above [`EXACT_COUNT_LIMIT`], else `count(*)`.
    pub(crate) async fn row_counts(&mut self, tables: &[String]) -> Result<Counts, EngineError> {
        let mut out = Counts::new();
        if tables.is_empty() {
            return Ok(out);
        }
        let context = format!("counting the rows of the tables of the database {}", self.database);
        let db = self.database.clone();
        let r: Result<(), sqlx::Error> = async {
            let sql =
                "SELECT CAST(TABLE_NAME AS CHAR), CAST(COALESCE(TABLE_ROWS, 0) AS UNSIGNED) FROM information_schema.TABLES WHERE TABLE_SCHEMA = ?";
            for r in sqlx::query(sql).bind(&db).fetch_all(&mut self.conn).await? {
                let name: String = r.try_get(0)?;
                let estimate: u64 = r.try_get(1)?;
                if estimate > EXACT_COUNT_LIMIT && tables.contains(&name) {
                    out.insert(name, (estimate, false));
                }
            }
            let small: Vec<&String> = tables.iter().filter(|t| !out.contains_key(*t)).collect();
            if !small.is_empty() {
                let sql = count_sql(&small, |t| format!("{}.{}", quote_backtick(&db), quote_backtick(t)), literal);
                for r in sqlx::query(AssertSqlSafe(sql)).fetch_all(&mut self.conn).await? {
                    let name: String = r.try_get(0)?;
                    let n: i64 = r.try_get(1)?;
                    out.insert(name, (n.max(0) as u64, true));
                }
            }
            Ok(())
        }
        .await;
        r.map_err(|e| EngineError::Query { context, message: e.to_string() })?;
        Ok(out)
    }
}
