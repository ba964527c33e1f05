//! The [`CodeContext`] of a code migration on PostgreSQL: the engine's own
//! session, inside the step's transaction on the atomic path.

use async_trait::async_trait;
use kiln_core::code::{CodeContext, CodeError, Row};
use tokio_postgres::types::Type;
use tokio_postgres::{Client, SimpleQueryMessage};

pub(super) struct PgCode<'c> {
    pub client: &'c Client,
}

#[async_trait]
impl CodeContext for PgCode<'_> {
    fn engine(&self) -> &'static str {
        "postgres"
    }

    async fn execute(&mut self, sql: &str) -> Result<u64, CodeError> {
        let mut n = 0;
        for m in self.client.simple_query(sql).await? {
            if let SimpleQueryMessage::CommandComplete(c) = m {
                n += c;
            }
        }
        Ok(n)
    }

    async fn query(&mut self, sql: &str) -> Result<Vec<Row>, CodeError> {
        let rows = self.client.query(sql, &[]).await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let mut r = Row::new();
            for (i, col) in row.columns().iter().enumerate() {
                let t = col.type_();
                let v: serde_json::Value = if *t == Type::BOOL {
                    row.try_get::<_, Option<bool>>(i)?.into()
                } else if *t == Type::INT2 {
                    row.try_get::<_, Option<i16>>(i)?.into()
                } else if *t == Type::INT4 {
                    row.try_get::<_, Option<i32>>(i)?.into()
                } else if *t == Type::INT8 {
                    row.try_get::<_, Option<i64>>(i)?.into()
                } else if *t == Type::FLOAT4 {
                    row.try_get::<_, Option<f32>>(i)?
                        .and_then(|f| serde_json::Number::from_f64(f64::from(f)))
                        .map_or(serde_json::Value::Null, Into::into)
                } else if *t == Type::FLOAT8 {
                    row.try_get::<_, Option<f64>>(i)?.and_then(serde_json::Number::from_f64).map_or(serde_json::Value::Null, Into::into)
                } else if *t == Type::JSON || *t == Type::JSONB {
                    row.try_get::<_, Option<serde_json::Value>>(i)?.unwrap_or(serde_json::Value::Null)
                } else if *t == Type::TIMESTAMPTZ {
                    row.try_get::<_, Option<chrono::DateTime<chrono::Utc>>>(i)?.map(|d| d.to_rfc3339()).into()
                } else if *t == Type::TIMESTAMP {
                    row.try_get::<_, Option<chrono::NaiveDateTime>>(i)?.map(|d| d.to_string()).into()
                } else if *t == Type::TEXT || *t == Type::VARCHAR || *t == Type::BPCHAR || *t == Type::NAME || *t == Type::UNKNOWN {
                    row.try_get::<_, Option<String>>(i)?.into()
                } else {
                    return Err(format!(
                        "column `{}` has type {}, which kiln does not convert; cast it in the query (`{}::text`)",
                        col.name(),
                        t.name(),
                        col.name()
                    )
                    .into());
                };
                r.insert(col.name().to_string(), v);
            }
            out.push(r);
        }
        Ok(out)
    }

    async fn run_command(&mut self, _command: serde_json::Value) -> Result<serde_json::Value, CodeError> {
        Err("run_command is for MongoDB; on PostgreSQL use execute or query".into())
    }
}
