//! Throw-away databases on the same server, for `kiln verify`.

use async_trait::async_trait;
use kiln_core::engine::ScratchAdmin;
use kiln_core::EngineError;
use sqlx::AssertSqlSafe;

use super::inspect::text1;
use super::{error_number, MysqlEngine};
use crate::common::quote_backtick;

#[async_trait]
impl ScratchAdmin for MysqlEngine {
    /// `CREATE DATABASE` on this server, with the character set and collation
    /// of the configured database (so `kiln verify` sees the same index-length
    /// limits and comparisons); returns this backend's URL with the database
    /// replaced, everything else (password, `?socket=`…) kept. Only names
    /// [`ScratchAdmin::drop_scratch`] accepts are created.
    async fn create_scratch(&mut self, name: &str) -> Result<String, EngineError> {
        check_scratch_name(name)?;
        let url = scratch_url(self.url.expose(), name).map_err(|message| EngineError::BadUrl { url: self.target.clone(), message })?;
        self.settle_lock().await?;
        // CREATE/DROP DATABASE commit implicitly; the core flushes a kept finish first.
        self.in_tx = false;
        let context = format!("creating the scratch database {name}");
        let defaults =
            sqlx::query("SELECT DEFAULT_CHARACTER_SET_NAME, DEFAULT_COLLATION_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?")
                .bind(&self.database)
                .fetch_optional(&mut self.conn)
                .await
                .and_then(|r| r.map(|r| Ok::<_, sqlx::Error>((text1(&r, 0)?, text1(&r, 1)?))).transpose());
        let defaults = match defaults {
            Ok(d) => d,
            Err(e) => return Err(self.err(&context, e)),
        };
        let mut ddl = format!("CREATE DATABASE {}", quote_backtick(name));
        if let Some((charset, collation)) = defaults {
            ddl.push_str(&format!(" CHARACTER SET {} COLLATE {}", quote_backtick(&charset), quote_backtick(&collation)));
        }
        match sqlx::raw_sql(AssertSqlSafe(ddl)).execute(&mut self.conn).await {
            Ok(_) => Ok(url),
            Err(e) => {
                let denied = matches!(error_number(&e), Some(1044 | 1045 | 1227));
                let mut err = self.err(&context, e);
                if let (EngineError::Query { message, .. }, true) = (&mut err, denied) {
                    message.push_str(" (the user needs the CREATE privilege; or give `kiln verify` an empty database with --scratch-url)");
                }
                Err(err)
            }
        }
    }

    /// `DROP DATABASE IF EXISTS`. Refuses any name that `kiln verify` does not
    /// make (`kiln_verify_…`), so a wrong argument can never drop a real database.
    async fn drop_scratch(&mut self, name: &str) -> Result<(), EngineError> {
        check_scratch_name(name)?;
        self.settle_lock().await?;
        // CREATE/DROP DATABASE commit implicitly; the core flushes a kept finish first.
        self.in_tx = false;
        match sqlx::raw_sql(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {}", quote_backtick(name)))).execute(&mut self.conn).await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.err(format!("dropping the scratch database {name}"), e)),
        }
    }
}

/// Scratch databases are named `kiln_verify_…` by `kiln verify`. Anything else
/// is refused, so neither a typo nor a caller's bug can create or drop a real
/// database; plain ASCII and at most 64 bytes, MySQL's limit for a database name.
fn check_scratch_name(name: &str) -> Result<(), EngineError> {
    crate::common::check_scratch_name(name, 64)
}

/// `url` with its path (the database) replaced by `name`; scheme, user,
/// password, host and query (`?socket=…`, `ssl-mode`…) kept as written.
fn scratch_url(url: &str, name: &str) -> Result<String, String> {
    let mut u = url::Url::parse(url).map_err(|e| e.to_string())?;
    u.set_path(&format!("/{name}"));
    Ok(u.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_names_and_urls() {
        assert!(check_scratch_name("kiln_verify_1_2").is_ok());
        for bad in ["kiln_verify_", "mysql", "kiln_verify_x`; DROP DATABASE mysql; --", &format!("kiln_verify_{}", "a".repeat(60))] {
            assert!(check_scratch_name(bad).is_err(), "{bad}");
        }
        assert_eq!(
            scratch_url("mariadb://u:p%40ss@localhost/app?socket=/run/mysqld/mysqld.sock", "kiln_verify_1").unwrap(),
            "mariadb://u:p%40ss@localhost/kiln_verify_1?socket=/run/mysqld/mysqld.sock"
        );
    }
}
