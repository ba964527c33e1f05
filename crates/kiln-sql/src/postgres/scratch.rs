//! Scratch databases for `kiln verify`: `CREATE DATABASE` / `DROP DATABASE`
//! on the same server, only for names `kiln verify` makes.

use async_trait::async_trait;
use kiln_core::engine::ScratchAdmin;
use kiln_core::EngineError;

use super::PgBackend;
use crate::common::quote_double;

#[async_trait]
impl ScratchAdmin for PgBackend {
    /// `CREATE DATABASE "<name>"` on this server; returns this backend's URL
    /// with the database replaced (everything else, password included, kept:
    /// the URL is for connecting, and is only shown redacted). Only names
    /// [`ScratchAdmin::drop_scratch`] accepts are created, so kiln never makes a
    /// database it then refuses to drop.
    async fn create_scratch(&mut self, name: &str) -> Result<String, EngineError> {
        check_scratch_name(name)?;
        let url = database_url(self.url.expose(), name)
            .map_err(|message| EngineError::BadUrl { url: self.url.redacted(), message: self.url.scrub(&message) })?;
        self.client.batch_execute(&format!("CREATE DATABASE {}", quote_double(name))).await.map_err(|e| {
            let mut err = self.engine_error(&format!("creating the scratch database {name}"), &e);
            if let EngineError::Query { message, .. } = &mut err {
                if e.as_db_error().is_some_and(|d| d.code().code() == "42501") {
                    message.push_str(" (the role needs CREATEDB; or give `kiln verify` an empty database with --scratch-url)");
                }
            }
            err
        })?;
        Ok(url)
    }

    /// `DROP DATABASE IF EXISTS "<name>" WITH (FORCE)`, ending sessions still
    /// connected to it. Refuses any name that `kiln verify` does not make
    /// (`kiln_verify_…`), so a wrong argument can never drop a real database.
    async fn drop_scratch(&mut self, name: &str) -> Result<(), EngineError> {
        check_scratch_name(name)?;
        let context = format!("dropping the scratch database {name}");
        let force = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_double(name));
        match self.client.batch_execute(&force).await {
            Ok(()) => Ok(()),
            // `WITH (FORCE)` is PostgreSQL 13+; older servers drop without it.
            Err(e) if e.as_db_error().is_some_and(|d| d.code().code() == "42601") => self
                .client
                .batch_execute(&format!("DROP DATABASE IF EXISTS {}", quote_double(name)))
                .await
                .map_err(|e| self.engine_error(&context, &e)),
            Err(e) => Err(self.engine_error(&context, &e)),
        }
    }
}

/// Scratch databases are named `kiln_verify_…` by `kiln verify`. Anything else
/// is refused, so neither a typo nor a caller's bug can create or drop a real
/// database; plain ASCII and at most 63 bytes, so PostgreSQL neither needs
/// quoting rules nor silently truncates the name.
fn check_scratch_name(name: &str) -> Result<(), EngineError> {
    crate::common::check_scratch_name(name, 63)
}

/// `url` naming database `name` instead: the path replaced (and a `dbname`
/// query parameter, which would override it), everything else kept as
/// written. Works on the text, like `tls::split_tls_params`, because multi-host
/// URLs (`h1:5432,h2:5433`) are not URLs the `url` crate accepts.
fn database_url(url: &str, name: &str) -> Result<String, String> {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return Err("the scratch database needs a postgres:// URL".into());
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let after = &rest[authority_end..];
    let query_start = after.find(['?', '#']).unwrap_or(after.len());
    let tail = &after[query_start..];
    let (query, fragment) = match tail.find('#') {
        Some(i) => (&tail[..i], &tail[i..]),
        None => (tail, ""),
    };
    let query = match query.strip_prefix('?') {
        Some(q) => {
            let pairs: Vec<String> = q
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| if p.split('=').next() == Some("dbname") { format!("dbname={name}") } else { p.to_string() })
                .collect();
            if pairs.is_empty() {
                String::new()
            } else {
                format!("?{}", pairs.join("&"))
            }
        }
        None => String::new(),
    };
    Ok(format!("{}/{name}{query}{fragment}", &url[..scheme_end + authority_end]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_urls_keep_everything_but_the_database() {
        assert_eq!(
            database_url("postgres://u:pw@h:5432/app?sslmode=require", "kiln_verify_1").unwrap(),
            "postgres://u:pw@h:5432/kiln_verify_1?sslmode=require"
        );
        assert_eq!(database_url("postgresql://u@h1:5432,h2:5433/app", "kiln_verify_1").unwrap(), "postgresql://u@h1:5432,h2:5433/kiln_verify_1");
        assert_eq!(database_url("postgres://h", "kiln_verify_1").unwrap(), "postgres://h/kiln_verify_1");
        assert_eq!(
            database_url("postgres:///app?host=/var/run/postgresql", "kiln_verify_1").unwrap(),
            "postgres:///kiln_verify_1?host=/var/run/postgresql"
        );
        assert_eq!(database_url("postgres://h/?dbname=app&x=1", "kiln_verify_1").unwrap(), "postgres://h/kiln_verify_1?dbname=kiln_verify_1&x=1");
        assert!(database_url("host=h dbname=app", "kiln_verify_1").is_err());
    }

    #[test]
    fn only_kiln_scratch_names() {
        assert!(check_scratch_name("kiln_verify_123_456").is_ok());
        for bad in ["postgres", "kiln_verify_", "kiln_t_1", "kiln_verify_a\"; DROP", "kiln_verify_ä", &format!("kiln_verify_{}", "x".repeat(60))] {
            assert!(check_scratch_name(bad).is_err(), "{bad}");
        }
    }
}
