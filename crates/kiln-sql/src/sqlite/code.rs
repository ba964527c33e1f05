//! The [`CodeContext`] of a code migration on SQLite: the engine's own
//! connection, inside the step's transaction on the atomic path.

use async_trait::async_trait;
use kiln_core::code::{CodeContext, CodeError, Row};
use rusqlite::types::ValueRef;
use rusqlite::Connection;

pub(super) struct SqliteCode<'c> {
    pub conn: &'c mut Connection,
}

#[async_trait]
impl CodeContext for SqliteCode<'_> {
    fn engine(&self) -> &'static str {
        "sqlite"
    }

    async fn execute(&mut self, sql: &str) -> Result<u64, CodeError> {
        self.conn.execute_batch(sql)?;
        Ok(self.conn.changes())
    }

    async fn query(&mut self, sql: &str) -> Result<Vec<Row>, CodeError> {
        let mut stmt = self.conn.prepare(sql)?;
        let names: Vec<String> = stmt.column_names().into_iter().map(String::from).collect();
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let mut r = Row::new();
            for (i, name) in names.iter().enumerate() {
                let v = match row.get_ref(i)? {
                    ValueRef::Null => serde_json::Value::Null,
                    ValueRef::Integer(n) => n.into(),
                    ValueRef::Real(f) => serde_json::Number::from_f64(f).map_or(serde_json::Value::Null, serde_json::Value::Number),
                    ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned().into(),
                    ValueRef::Blob(b) => b.iter().map(|x| format!("{x:02x}")).collect::<String>().into(),
                };
                r.insert(name.clone(), v);
            }
            out.push(r);
        }
        Ok(out)
    }

    async fn run_command(&mut self, _command: serde_json::Value) -> Result<serde_json::Value, CodeError> {
        Err("run_command is for MongoDB; on SQLite use execute or query".into())
    }
}
