//! Reading names (tenants) from this engine: see `crate::names`.

use kiln_core::EngineError;

use super::SqliteEngine;

impl SqliteEngine {
    /// The first column of every row `sql` returns, as text (`None` for
    /// NULL): tenant names from a `[tenants] query`. The statement must
    /// only read (SQLite refuses to run it otherwise).
    pub(crate) async fn text_column(&mut self, sql: &str) -> Result<Vec<Option<String>>, EngineError> {
        use rusqlite::types::ValueRef;
        let context = format!("running {sql:?}");
        let read = || -> Result<Vec<Option<String>>, rusqlite::Error> {
            let mut stmt = self.conn.prepare(sql)?;
            if !stmt.readonly() {
                return Err(rusqlite::Error::InvalidQuery);
            }
            let mut rows = stmt.query([])?;
            let mut out = Vec::new();
            while let Some(r) = rows.next()? {
                out.push(match r.get_ref(0)? {
                    ValueRef::Null => None,
                    ValueRef::Integer(i) => Some(i.to_string()),
                    ValueRef::Real(f) => Some(f.to_string()),
                    ValueRef::Text(t) | ValueRef::Blob(t) => Some(String::from_utf8_lossy(t).into_owned()),
                });
            }
            Ok(out)
        };
        read().map_err(|e| match e {
            rusqlite::Error::InvalidQuery => {
                EngineError::Query { context: format!("{context} ({})", self.target), message: "the tenants query must only read (a SELECT)".into() }
            }
            e => self.query_err(context.clone(), e),
        })
    }
}
