//! Row counts for [`crate::stats::table_status`].

use kiln_core::EngineError;
use tokio_postgres::types::Type;

use super::PgBackend;
use crate::common::quote_double;
use crate::stats::{count_sql, literal, Counts, EXACT_COUNT_LIMIT};

impl PgBackend {
    /// `(rows, exact)` of each of `tables` (in the inspected schema): the
    /// planner's estimate above [`EXACT_COUNT_LIMIT`], else `count(*)`.
    pub(crate) async fn row_counts(&mut self, tables: &[String]) -> Result<Counts, EngineError> {
        let mut out = Counts::new();
        let Some(schema) = self.inspect_schema.clone() else { return Ok(out) };
        if tables.is_empty() {
            return Ok(out);
        }
        let context = format!("counting the rows of the tables of the schema {}", quote_double(&schema));
        let sql = "SELECT c.relname::text, c.reltuples::float8 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                   WHERE n.nspname = $1 AND c.relname = ANY($2) AND c.relkind IN ('r', 'p')";
        let rows =
            self.client.query_typed(sql, &[(&schema, Type::TEXT), (&tables, Type::TEXT_ARRAY)]).await.map_err(|e| self.engine_error(&context, &e))?;
        for r in rows {
            let estimate: f64 = r.get(1);
            // -1: never analysed (PostgreSQL 14+), so unknown: count it.
            if estimate > EXACT_COUNT_LIMIT as f64 {
                out.insert(r.get(0), (estimate as u64, false));
            }
        }
        let small: Vec<&String> = tables.iter().filter(|t| !out.contains_key(*t)).collect();
        if !small.is_empty() {
            let sql = count_sql(&small, |t| format!("{}.{}", quote_double(&schema), quote_double(t)), literal);
            let rows = self.client.query(&sql, &[]).await.map_err(|e| self.engine_error(&context, &e))?;
            for r in rows {
                let n: i64 = r.get(1);
                out.insert(r.get(0), (n.max(0) as u64, true));
            }
        }
        Ok(out)
    }
}
