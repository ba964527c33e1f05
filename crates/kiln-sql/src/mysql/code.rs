//! The [`CodeContext`] of a code migration on MySQL/MariaDB: the engine's own
//! session, in autocommit (MySQL commits DDL implicitly, so kiln takes the
//! intent path for every migration there).

use async_trait::async_trait;
use kiln_core::code::{CodeContext, CodeError, Row};
use sqlx::mysql::MySqlRow;
use sqlx::{AssertSqlSafe, Column, MySqlConnection, Row as _, TypeInfo, ValueRef};

pub(super) struct MysqlCode<'c> {
    pub conn: &'c mut MySqlConnection,
}

#[async_trait]
impl CodeContext for MysqlCode<'_> {
    fn engine(&self) -> &'static str {
        "mysql"
    }

    async fn execute(&mut self, sql: &str) -> Result<u64, CodeError> {
        Ok(sqlx::raw_sql(AssertSqlSafe(sql.to_string())).execute(&mut *self.conn).await?.rows_affected())
    }

    async fn query(&mut self, sql: &str) -> Result<Vec<Row>, CodeError> {
        let rows = sqlx::raw_sql(AssertSqlSafe(sql.to_string())).fetch_all(&mut *self.conn).await?;
        rows.iter().map(row).collect()
    }

    async fn run_command(&mut self, _command: serde_json::Value) -> Result<serde_json::Value, CodeError> {
        Err("run_command is for MongoDB; on MySQL/MariaDB use execute or query".into())
    }
}

fn row(r: &MySqlRow) -> Result<Row, CodeError> {
    let mut out = Row::new();
    for (i, col) in r.columns().iter().enumerate() {
        let raw = r.try_get_raw(i)?;
        let v: serde_json::Value = if raw.is_null() {
            serde_json::Value::Null
        } else {
            let ty = col.type_info().name().to_ascii_uppercase();
            match ty.as_str() {
                "BOOLEAN" => r.try_get::<bool, _>(i)?.into(),
                "TINYINT" | "SMALLINT" | "MEDIUMINT" | "INT" | "BIGINT" => r.try_get::<i64, _>(i)?.into(),
                "TINYINT UNSIGNED" | "SMALLINT UNSIGNED" | "MEDIUMINT UNSIGNED" | "INT UNSIGNED" | "BIGINT UNSIGNED" => {
                    r.try_get::<u64, _>(i)?.into()
                }
                "FLOAT" | "DOUBLE" => serde_json::Number::from_f64(r.try_get::<f64, _>(i)?).map_or(serde_json::Value::Null, Into::into),
                "JSON" => serde_json::from_str(&r.try_get_unchecked::<String, _>(i)?)?,
                "DATETIME" | "TIMESTAMP" => r.try_get::<chrono::NaiveDateTime, _>(i)?.to_string().into(),
                "DATE" => r.try_get::<chrono::NaiveDate, _>(i)?.to_string().into(),
                "CHAR" | "VARCHAR" | "TEXT" | "TINYTEXT" | "MEDIUMTEXT" | "LONGTEXT" | "ENUM" | "SET" => r.try_get::<String, _>(i)?.into(),
                other => {
                    return Err(format!(
                        "column `{}` has type {other}, which kiln does not convert; cast it in the query (`CAST({} AS CHAR)`)",
                        col.name(),
                        col.name()
                    )
                    .into())
                }
            }
        };
        out.insert(col.name().to_string(), v);
    }
    Ok(out)
}
