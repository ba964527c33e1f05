//! Reading names (tenants) from this engine: see `crate::names`.

use kiln_core::EngineError;

use super::MysqlEngine;

impl MysqlEngine {
    /// The first column of every row `sql` returns, as text (`None` for
    /// NULL), read in a read-only transaction: tenant names from a
    /// `[tenants] query` or from the catalog.
    pub(crate) async fn text_column(&mut self, sql: &str) -> Result<Vec<Option<String>>, EngineError> {
        use sqlx::{Row, ValueRef};
        let context = format!("running {sql:?}");
        sqlx::raw_sql("START TRANSACTION READ ONLY").execute(&mut self.conn).await.map_err(|e| self.err(context.clone(), e))?;
        let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string())).fetch_all(&mut self.conn).await;
        let _ = sqlx::raw_sql("ROLLBACK").execute(&mut self.conn).await;
        let rows = rows.map_err(|e| self.err(context.clone(), e))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            if row.columns().is_empty() {
                continue;
            }
            let null = row.try_get_raw(0).map(|v| v.is_null()).unwrap_or(true);
            let text = if null {
                None
            } else if let Ok(s) = row.try_get::<String, _>(0) {
                Some(s)
            } else if let Ok(n) = row.try_get::<i64, _>(0) {
                Some(n.to_string())
            } else if let Ok(n) = row.try_get::<u64, _>(0) {
                Some(n.to_string())
            } else {
                let b: Vec<u8> = row.try_get(0).map_err(|e| self.err(context.clone(), e))?;
                Some(String::from_utf8_lossy(&b).into_owned())
            };
            out.push(text);
        }
        Ok(out)
    }
}

impl MysqlEngine {
    /// Run one statement of kiln's own (`CREATE DATABASE`).
    pub(crate) async fn execute_plain(&mut self, sql: &str) -> Result<(), EngineError> {
        match sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string())).execute(&mut self.conn).await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.err(format!("running {sql:?}"), e)),
        }
    }
}
