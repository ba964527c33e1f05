//! Connecting: URL checks, client options, and what the server says about
//! itself (`hello`): topology (for transactions) and its clock (for leases).

use std::time::Duration;

use bson::{doc, Document};
use kiln_core::url::DbUrl;
use kiln_core::{BackendConfig, EngineError};
use mongodb::options::ClientOptions;
use mongodb::{Client, Database};

/// How long kiln waits for a server unless the URL says otherwise
/// (`serverSelectionTimeoutMS`, `connectTimeoutMS`): the driver's 30 s default
/// makes a typo in the host name look like a hang.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// What kind of deployment the server belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    /// A single `mongod` without replication: no multi-document transactions.
    Standalone,
    /// A replica set member (also a one-node replica set).
    ReplicaSet,
    /// A `mongos` router of a sharded cluster.
    Sharded,
}

impl Topology {
    /// From a `hello` reply: `msg: "isdbgrid"` is a mongos, `setName` a
    /// replica set member, anything else a standalone server.
    pub fn from_hello(hello: &Document) -> Topology {
        if hello.get_str("msg").ok() == Some("isdbgrid") {
            Topology::Sharded
        } else if hello.get_str("setName").is_ok() {
            Topology::ReplicaSet
        } else {
            Topology::Standalone
        }
    }

    /// Multi-document transactions need a replica set or a sharded cluster.
    pub fn supports_transactions(self) -> bool {
        !matches!(self, Topology::Standalone)
    }
}

/// An open connection to one database.
#[derive(Clone)]
pub(crate) struct Conn {
    /// The URL as given (`Display` redacts its password).
    pub url: DbUrl,
    pub client: Client,
    pub db: Database,
    pub db_name: String,
    /// The URL with its password redacted, plus the database when the URL does not name it.
    pub target: String,
    pub topology: Topology,
    /// Server clock minus local clock, from `hello.localTime`: lease times are
    /// written in the server's time so runners on machines with skewed clocks agree.
    pub skew: chrono::Duration,
    /// The server runs `bulkWrite` (MongoDB 8.0+, wire version 25): kiln's
    /// writes to the lease, the history and the log go in one command.
    pub bulk_write: bool,
}

/// The first wire version with the `bulkWrite` command (MongoDB 8.0).
const BULK_WRITE_WIRE_VERSION: i64 = 25;

impl Conn {
    /// Connect to the database named by `cfg` and check the server answers.
    ///
    /// # Errors
    /// [`EngineError::BadUrl`] for a URL that is not `mongodb://`/`mongodb+srv://`,
    /// cannot be parsed, or names no database (and `cfg.database` is unset);
    /// [`EngineError::Connect`] when no server answers within the selection
    /// timeout (5 s unless the URL sets `serverSelectionTimeoutMS`) or it refuses us.
    pub async fn open(cfg: &BackendConfig) -> Result<Conn, EngineError> {
        let url = cfg.url.expose();
        let redacted = cfg.url.redacted();
        let scrub = |m: String| cfg.url.scrub(&m);
        kiln_core::url::EngineKind::parse(&cfg.url)?;
        let lower = url.to_ascii_lowercase();
        if !(lower.starts_with("mongodb://") || lower.starts_with("mongodb+srv://")) {
            return Err(EngineError::BadUrl { url: redacted, message: "a MongoDB URL starts with mongodb:// or mongodb+srv://".into() });
        }
        let mut opts = match ClientOptions::parse(url).await {
            Ok(o) => o,
            Err(e) => {
                let message = scrub(e.kind.to_string());
                // An SRV lookup failure is a connection problem, not a bad URL.
                return Err(if matches!(*e.kind, mongodb::error::ErrorKind::DnsResolve { .. }) {
                    EngineError::Connect { url: redacted, message }
                } else {
                    EngineError::BadUrl { url: redacted, message }
                });
            }
        };
        let (db_name, target) = match (opts.default_database.clone(), &cfg.database) {
            (Some(d), _) if !d.is_empty() => (d, redacted.clone()),
            (_, Some(d)) if !d.is_empty() => (d.clone(), format!("{redacted} (database {d})")),
            _ => {
                return Err(EngineError::BadUrl {
                    url: redacted,
                    message: "the URL names no database; add /dbname or set [mongodb] database in kiln.toml".into(),
                })
            }
        };
        if opts.server_selection_timeout.is_none() {
            opts.server_selection_timeout = Some(DEFAULT_TIMEOUT);
        }
        if opts.connect_timeout.is_none() {
            opts.connect_timeout = Some(DEFAULT_TIMEOUT);
        }
        if opts.app_name.is_none() {
            opts.app_name = Some("kiln".into());
        }
        let client = Client::with_options(opts).map_err(|e| EngineError::BadUrl { url: redacted.clone(), message: scrub(e.kind.to_string()) })?;
        let asked = chrono::Utc::now();
        let hello = client
            .database("admin")
            .run_command(doc! { "hello": 1 })
            .await
            .map_err(|e| EngineError::Connect { url: redacted.clone(), message: scrub(e.kind.to_string()) })?;
        let answered = chrono::Utc::now();
        let skew = match hello.get_datetime("localTime") {
            Ok(t) => t.to_chrono() - (asked + (answered - asked) / 2),
            Err(_) => chrono::Duration::zero(),
        };
        let db = client.database(&db_name);
        let wire = hello.get_i32("maxWireVersion").map(i64::from).or_else(|_| hello.get_i64("maxWireVersion")).unwrap_or(0);
        let bulk_write = wire >= BULK_WRITE_WIRE_VERSION;
        Ok(Conn { url: cfg.url.clone(), client, db, db_name, target, topology: Topology::from_hello(&hello), skew, bulk_write })
    }

    /// Now, in the server's clock.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::Utc::now() + self.skew
    }

    /// A driver message with any password from the URL replaced by `***`.
    pub fn scrub(&self, message: impl Into<String>) -> String {
        self.url.scrub(&message.into())
    }

    /// A kiln-side failure (history, log, lock) as an [`EngineError`]: a lost
    /// connection is told apart from a query the server refused.
    pub fn engine_error(&self, context: impl Into<String>, e: &mongodb::error::Error) -> EngineError {
        let context = context.into();
        let message = self.scrub(e.kind.to_string());
        if is_connection_error(e) {
            EngineError::ConnectionLost { context, message }
        } else {
            EngineError::Query { context, message }
        }
    }

    /// Whether a collection exists, without creating it.
    pub async fn collection_exists(&self, name: &str) -> Result<bool, EngineError> {
        let names = self
            .db
            .list_collection_names()
            .filter(doc! { "name": name })
            .await
            .map_err(|e| self.engine_error(format!("looking for collection {name}"), &e))?;
        Ok(!names.is_empty())
    }
}

/// `url` with its database (the path) replaced by `db`; user, password,
/// hosts and options kept. Done by hand because a URL with several hosts is
/// not a valid URL for the `url` crate.
pub(crate) fn url_with_database(url: &str, db: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("mongodb", url));
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    // The host list ends at the first `/` after the user info.
    let after_at = before_query.rfind('@').map(|i| i + 1).unwrap_or(0);
    let authority_end = before_query[after_at..].find('/').map(|i| i + after_at).unwrap_or(before_query.len());
    let authority = &before_query[..authority_end];
    match query {
        Some(q) => format!("{scheme}://{authority}/{db}?{q}"),
        None => format!("{scheme}://{authority}/{db}"),
    }
}

/// True when the driver could not talk to the server at all (as opposed to a
/// server that answered with an error).
pub(crate) fn is_connection_error(e: &mongodb::error::Error) -> bool {
    use mongodb::error::ErrorKind;
    matches!(*e.kind, ErrorKind::Io(_) | ErrorKind::ConnectionPoolCleared { .. } | ErrorKind::ServerSelection { .. } | ErrorKind::Shutdown)
}

/// The server's error code of a driver error, if the server answered with one.
pub(crate) fn error_code(e: &mongodb::error::Error) -> Option<i32> {
    use mongodb::error::{ErrorKind, WriteFailure};
    match &*e.kind {
        ErrorKind::Command(c) => Some(c.code),
        ErrorKind::Write(WriteFailure::WriteError(w)) => Some(w.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => Some(w.code),
        ErrorKind::InsertMany(m) => {
            m.write_errors.as_ref().and_then(|w| w.first().map(|w| w.code)).or_else(|| m.write_concern_error.as_ref().map(|w| w.code))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_messages_are_scrubbed_by_the_urls_structure() {
        // A password with reserved characters left unescaped (issue 9.5): the
        // old redactor took "p" for the password and replaced every "p".
        let url = DbUrl::new("mongodb://user:p@ss:w/rd%?#@h1:1,h2:2/db?replicaSet=rs");
        let m = url.scrub("SCRAM failure for user with p@ss:w/rd%?# on mongodb://user:p@ss:w/rd%?#@h1:1,h2:2/db?replicaSet=rs");
        assert_eq!(m, "SCRAM failure for user with *** on mongodb://user:***@h1:1,h2:2/db?replicaSet=rs");
        assert_eq!(url.to_string(), "mongodb://user:***@h1:1,h2:2/db?replicaSet=rs");
    }

    #[test]
    fn database_is_replaced_in_urls() {
        assert_eq!(url_with_database("mongodb://u:p@h1:1,h2:2/app?replicaSet=rs", "scratch"), "mongodb://u:p@h1:1,h2:2/scratch?replicaSet=rs");
        assert_eq!(url_with_database("mongodb://h/?directConnection=true", "s"), "mongodb://h/s?directConnection=true");
        assert_eq!(url_with_database("mongodb://h", "s"), "mongodb://h/s");
        assert_eq!(url_with_database("mongodb+srv://u:p%2Fq@cluster.example.net/app", "s"), "mongodb+srv://u:p%2Fq@cluster.example.net/s");
    }

    #[test]
    fn topology_from_hello() {
        assert_eq!(Topology::from_hello(&doc! { "isWritablePrimary": true }), Topology::Standalone);
        assert_eq!(Topology::from_hello(&doc! { "setName": "rs0" }), Topology::ReplicaSet);
        assert_eq!(Topology::from_hello(&doc! { "msg": "isdbgrid" }), Topology::Sharded);
        assert!(!Topology::Standalone.supports_transactions());
        assert!(Topology::ReplicaSet.supports_transactions());
    }
}
