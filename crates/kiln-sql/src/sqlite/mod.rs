//! The SQLite engine: one `rusqlite` connection, one transaction per migration.
//!
//! SQLite has transactional DDL, so a migration's statements, its history row
//! and its `applied` event commit together in one `BEGIN IMMEDIATE … COMMIT`
//! ([`Executor::run_atomic`]): whatever happens, either all of it is in the
//! database or none of it is. A `-- kiln:transaction off` migration (e.g.
//! `VACUUM`) runs statement by statement in autocommit
//! ([`Executor::run_one`]) on the intent path of [`kiln_core::step`]. The
//! order of the steps is written once, in [`kiln_core::step`]; this engine
//! supplies the primitives only.
//!
//! The migration lock ([`lock`]) is an OS file lock on a sidecar file
//! `<db file>-kiln.lock`, which the OS releases when the process dies, so a
//! crashed runner never blocks the next one. The database file itself is never
//! opened a second time for locking: closing another descriptor on it would
//! drop SQLite's own POSIX locks on it.
//!
//! The first time kiln takes that lock on a database it switches the database
//! to WAL ([`journal`]), so that `kiln status`, and a second runner reading
//! the history before it waits for the lock, never wait on a running
//! migration.
//!
//! rusqlite is synchronous; with a single connection, running it inline in the
//! async methods is simpler and faster than shipping every call to a blocking
//! thread, and a migration run is sequential anyway.
//!
//! Schema contracts ([`inspect`]): [`SchemaStore::inspect`] reads the whole
//! schema with three queries joining the `pragma_table_list`,
//! `pragma_table_xinfo`, `pragma_index_list`/`pragma_index_xinfo` and
//! `pragma_foreign_key_list` table-valued functions, whatever the number of
//! tables. With a contract, [`Executor::run_atomic`] inspects inside the
//! migration's transaction, before `COMMIT`, and rolls everything back on
//! violations.
//!
//! Modules: [`history`] (kiln's tables, their SQL, [`HistoryStore`]),
//! [`lock`] ([`Locker`]), [`journal`] (WAL), [`exec`] ([`Executor`]),
//! [`inspect`] ([`SchemaStore`]), [`scratch`] ([`ScratchAdmin`]), [`jobs`]
//! (`kiln_jobs`, the backfill job store).
//!
//! [`Executor::run_atomic`]: kiln_core::engine::Executor::run_atomic
//! [`Executor::run_one`]: kiln_core::engine::Executor::run_one
//! [`SchemaStore::inspect`]: kiln_core::engine::SchemaStore::inspect
//! [`HistoryStore`]: kiln_core::engine::HistoryStore
//! [`Locker`]: kiln_core::engine::Locker
//! [`Executor`]: kiln_core::engine::Executor
//! [`SchemaStore`]: kiln_core::engine::SchemaStore
//! [`ScratchAdmin`]: kiln_core::engine::ScratchAdmin

mod code;
mod exec;
mod foreign;
mod history;
mod inspect;
mod jobs;
mod journal;
mod lock;
mod names;
mod scratch;
mod stats;

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use kiln_core::engine::{Capabilities, Engine, Locker, SchemaStore, ScratchAdmin};
use kiln_core::jobs::JobStore;
use kiln_core::{BackendConfig, EngineError, Kind};
use rusqlite::Connection;

use crate::common::quote_double;
use crate::jobs_common::jobs_table_name;
use history::Sql;
use journal::Journal;
use lock::SidecarLock;

/// How long a statement waits for another connection's write lock on the
/// database before failing with `SQLITE_BUSY`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the database lives.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Location {
    /// `sqlite::memory:` (tests only: the database dies with the connection).
    Memory,
    /// A file, created if missing.
    File(PathBuf),
}

/// The SQLite engine (see the module docs for its transaction and lock model).
/// Wrap it in [`kiln_core::backend::Protocol`] where a `Backend` is needed.
pub struct SqliteEngine {
    conn: Connection,
    target: String,
    /// The migration lock on `<db file>-kiln.lock` (a flag for an in-memory database).
    lock: SidecarLock,
    /// Where the database lives: scratch databases for `kiln verify` go next to it.
    location: Location,
    /// What to do with the journal mode ([`journal`]), done once, when the lock is first taken.
    journal: Journal,
    journal_settled: bool,
    /// The database is in WAL mode and this connection commits with
    /// `synchronous = NORMAL` unless a commit is durable ([`journal`]).
    wal: bool,
    /// The open transaction was begun for a durable commit (`synchronous = FULL`).
    synced_commit: bool,
    history_name: String,
    snapshot_name: String,
    /// kiln's own tables (history, log, snapshots), which [`SchemaStore::inspect`] leaves out.
    own_tables: [String; 4],
    sql: Sql,
    /// The backfill jobs table, quoted.
    jobs_table: String,
    /// Its name as it is, for existence checks.
    jobs_name: String,
}

impl SqliteEngine {
    /// Open (creating it if missing) the database named by `cfg.url`:
    /// `sqlite://relative/or/absolute.db` (`sqlite:///abs/path.db`),
    /// `sqlite:file.db`, or `sqlite::memory:` (tests only). Query parameters
    /// other than `journal_mode` are ignored. The connection gets a 5 s busy
    /// timeout. The database is switched to WAL the first time this engine
    /// takes the migration lock, unless the URL says `?journal_mode=keep` or
    /// the file is on a network filesystem ([`journal`]).
    /// `cfg.schema` does not apply to SQLite and is ignored.
    ///
    /// # Errors
    /// [`EngineError::BadUrl`] for a URL without a path, [`EngineError::Connect`]
    /// when the file cannot be opened or is not a database.
    pub async fn connect(cfg: &BackendConfig) -> Result<Self, EngineError> {
        let target = cfg.url.redacted();
        if cfg.url.has_password() {
            // The rest would be read as a file name and repeated in errors.
            return Err(EngineError::BadUrl {
                url: target,
                message: "a SQLite URL names a file and takes no user or password; remove them and the `@` (e.g. sqlite:///var/lib/app/app.db)"
                    .into(),
            });
        }
        let (location, journal) = parse_url(cfg.url.expose(), &target)?;
        let connect_err = |e: rusqlite::Error| {
            // SQLite's messages may repeat the path, which is part of the URL.
            let mut message = cfg.url.scrub(&e.to_string());
            if let Location::File(p) = &location {
                match p.parent().filter(|d| !d.as_os_str().is_empty()) {
                    Some(dir) if !dir.is_dir() => message.push_str(&format!(" (directory {} does not exist)", dir.display())),
                    _ => message.push_str(&format!(" ({})", p.display())),
                }
            }
            EngineError::Connect { url: target.clone(), message: cfg.url.scrub(&message) }
        };
        // A command that only reads sees a missing file as an empty database
        // and creates nothing (`status` before the first `up`).
        let absent = cfg.read_only && matches!(&location, Location::File(p) if !p.exists());
        let conn = match &location {
            Location::File(p) if !absent => Connection::open(p),
            _ => Connection::open_in_memory(),
        }
        .map_err(connect_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(connect_err)?;
        // kiln touches each page about once per run: a 512 KiB page cache instead
        // of the default 2 MiB keeps a 1,000-migration run's memory small without
        // slowing it (the OS page cache serves re-reads).
        conn.execute_batch("PRAGMA cache_size = -512").map_err(connect_err)?;
        // Opening is lazy: read the schema now so a file that is not a database
        // fails here, with the URL, rather than in the middle of a run.
        conn.query_row("PRAGMA schema_version", [], |r| r.get::<_, i64>(0)).map_err(connect_err)?;
        let lock = match &location {
            Location::Memory => SidecarLock::memory(),
            Location::File(_) if absent => SidecarLock::memory(),
            Location::File(p) => {
                let mut s = p.clone().into_os_string();
                s.push("-kiln.lock");
                SidecarLock::file(PathBuf::from(s))
            }
        };
        Ok(SqliteEngine {
            conn,
            target,
            lock,
            journal,
            // A missing file read as an empty database is an in-memory one.
            journal_settled: absent,
            wal: false,
            synced_commit: false,
            location,
            history_name: cfg.history_table.clone(),
            snapshot_name: cfg.snapshot_table.clone(),
            own_tables: [cfg.history_table.clone(), cfg.log_table.clone(), cfg.snapshot_table.clone(), jobs_table_name(&cfg.history_table)],
            jobs_table: quote_double(&jobs_table_name(&cfg.history_table)),
            jobs_name: jobs_table_name(&cfg.history_table),
            sql: Sql::new(&cfg.history_table, &cfg.log_table, &cfg.snapshot_table),
        })
    }

    fn query_err(&self, context: impl Into<String>, e: rusqlite::Error) -> EngineError {
        EngineError::Query { context: format!("{} ({})", context.into(), self.target), message: e.to_string() }
    }

    /// Roll back whatever is open; used on failure paths, where the original
    /// error is what matters, so a failing rollback is only logged.
    fn rollback(&self) {
        if !self.conn.is_autocommit() {
            if let Err(e) = self.conn.execute_batch("ROLLBACK") {
                tracing::warn!(target = %self.target, "ROLLBACK failed: {e}");
            }
        }
    }
}

#[async_trait]
impl Engine for SqliteEngine {
    fn capabilities(&self) -> Capabilities {
        Capabilities { engine: "sqlite", kind: Kind::Sql, transactional_ddl: true, transactions_on_request: true, merge_finish: false }
    }

    fn target(&self) -> String {
        self.target.clone()
    }

    fn schema(&mut self) -> Option<&mut dyn SchemaStore> {
        Some(self)
    }

    fn scratch(&mut self) -> Option<&mut dyn ScratchAdmin> {
        Some(self)
    }

    fn jobs(&mut self) -> Option<&mut dyn JobStore> {
        Some(self)
    }

    fn foreign(&mut self) -> Option<&mut dyn kiln_core::adopt::ForeignReader> {
        Some(self)
    }

    /// Releases the lock and closes the connection; anything still open is rolled back.
    async fn close(mut self: Box<Self>) -> Result<(), EngineError> {
        self.unlock().await?;
        let SqliteEngine { conn, target, .. } = *self;
        conn.close().map_err(|(_, e)| EngineError::Query { context: format!("closing {target}"), message: e.to_string() })
    }
}

/// The database file `cfg.url` names (`None` for `sqlite::memory:`).
pub(crate) fn sqlite_file(cfg: &BackendConfig) -> Result<Option<PathBuf>, EngineError> {
    match parse_url(cfg.url.expose(), &cfg.url.redacted())?.0 {
        Location::File(p) => Ok(Some(p)),
        Location::Memory => Ok(None),
    }
}

fn parse_url(url: &str, shown: &str) -> Result<(Location, Journal), EngineError> {
    let (_, path, query) = kiln_core::url::sqlite_parts(url)
        .ok_or_else(|| EngineError::BadUrl { url: shown.into(), message: "expected sqlite://PATH, sqlite:PATH or sqlite::memory:".into() })?;
    let journal = Journal::from_query(query.unwrap_or(""), shown)?;
    let location = match path {
        "" => Err(EngineError::BadUrl {
            url: shown.into(),
            message: "no database file; use e.g. sqlite://kiln.db or sqlite:///var/lib/app/app.db".into(),
        }),
        ":memory:" => Ok(Location::Memory),
        p => Ok(Location::File(PathBuf::from(p))),
    }?;
    Ok((location, journal))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let p = |u: &str| parse_url(u, u).map(|(l, _)| l);
        assert_eq!(p("sqlite://kiln.db").unwrap(), Location::File("kiln.db".into()));
        assert_eq!(p("sqlite:///tmp/x.db").unwrap(), Location::File("/tmp/x.db".into()));
        assert_eq!(p("sqlite:rel/x.db?mode=rwc").unwrap(), Location::File("rel/x.db".into()));
        assert_eq!(p("sqlite::memory:").unwrap(), Location::Memory);
        assert!(matches!(p("sqlite://"), Err(EngineError::BadUrl { .. })));
        assert!(matches!(p("postgres://x"), Err(EngineError::BadUrl { .. })));
        assert_eq!(parse_url("sqlite://x.db?journal_mode=keep", "").unwrap(), (Location::File("x.db".into()), Journal::Keep));
        assert!(matches!(p("sqlite://x.db?journal_mode=off"), Err(EngineError::BadUrl { .. })));
    }
}
