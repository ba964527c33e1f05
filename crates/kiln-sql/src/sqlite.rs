//! The SQLite engine: one `rusqlite` connection, one transaction per migration.
//!
//! SQLite has transactional DDL, so a migration's statements, its history row
//! and its `applied` event commit together in one `BEGIN IMMEDIATE … COMMIT`:
//! whatever happens, either all of it is in the database or none of it is.
//!
//! The migration lock is an OS file lock on a sidecar file `<db file>-kiln.lock`,
//! which the OS releases when the process dies, so a crashed runner never
//! blocks the next one. The database file itself is never opened a second time
//! for locking: closing another descriptor on it would drop SQLite's own POSIX
//! locks on it.
//!
//! rusqlite is synchronous; with a single connection, running it inline in the
//! async methods is simpler and faster than shipping every call to a blocking
//! thread, and a migration run is sequential anyway.
//!
//! Schema contracts: [`Backend::inspect`] reads the whole schema with three
//! queries joining the `pragma_table_list`, `pragma_table_xinfo`,
//! `pragma_index_list`/`pragma_index_xinfo` and `pragma_foreign_key_list`
//! table-valued functions, whatever the number of tables. With a contract,
//! [`Backend::apply_checked`] inspects inside the migration's transaction,
//! before `COMMIT`, and rolls everything back on violations.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
use kiln_core::schema::{ColumnInfo, ConstraintInfo, IndexInfo, Snapshot};
use kiln_core::url::redact;
use kiln_core::{
    AppliedMigration, ApplyError, Backend, BackendConfig, Body, Capabilities, EngineError, FailureOutcome, Kind, LogEntry, Migration,
    RecordContext, SchemaCheck, State, Statement, StatementError, StepError, TxMode,
};
use rusqlite::{params, Connection, OptionalExtension};

use crate::common::{quote_double, RawHistoryRow, HISTORY_COLUMNS, LOG_COLUMNS};

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
pub struct SqliteBackend {
    conn: Connection,
    target: String,
    /// `<db file>-kiln.lock`; `None` for an in-memory database, which no other
    /// process can reach, so its lock is a flag.
    lock_path: Option<PathBuf>,
    /// The locked sidecar file while we hold the lock: dropping it releases the lock.
    lock_file: Option<File>,
    memory_locked: bool,
    /// Where the database lives: scratch databases for `kiln verify` go next to it.
    location: Location,
    history_name: String,
    snapshot_name: String,
    /// kiln's own tables (history, log, snapshots), which [`Backend::inspect`] leaves out.
    own_tables: [String; 3],
    sql: Sql,
}

/// SQL text built once from the configured table names, so prepared statements
/// are found again in rusqlite's statement cache.
struct Sql {
    create: String,
    select_history: String,
    insert_history: String,
    upsert_history: String,
    set_state: String,
    fail: String,
    finish: String,
    delete_history: String,
    insert_log: String,
    create_snapshot: String,
    insert_snapshot: String,
    select_snapshot: String,
}

impl Sql {
    fn new(history: &str, log: &str, snapshot: &str) -> Self {
        let h = quote_double(history);
        let l = quote_double(log);
        let sn = quote_double(snapshot);
        // Snapshots are only appended (older rows are the schema's history), so
        // `INTEGER PRIMARY KEY` numbers them in order without AUTOINCREMENT's
        // `sqlite_sequence` bookkeeping; the newest is the highest id.
        let create_snapshot = format!("CREATE TABLE IF NOT EXISTS {sn} (id INTEGER PRIMARY KEY, taken_at TEXT NOT NULL, snapshot TEXT NOT NULL);");
        let cols14 = "?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14";
        Sql {
            // `version INTEGER PRIMARY KEY` makes the version the rowid (no
            // separate index to maintain); the log's `id` likewise. The log needs
            // no AUTOINCREMENT: kiln never deletes from it, so ids are never reused.
            create: format!(
                "CREATE TABLE IF NOT EXISTS {h} (
                    version INTEGER PRIMARY KEY,
                    description TEXT NOT NULL,
                    script TEXT NOT NULL,
                    migration_group TEXT,
                    checksum TEXT NOT NULL,
                    state TEXT NOT NULL,
                    batch INTEGER NOT NULL,
                    applied_at TEXT NOT NULL,
                    duration_ms INTEGER NOT NULL,
                    applied_by TEXT NOT NULL,
                    kiln_version TEXT NOT NULL,
                    error TEXT,
                    error_statement INTEGER,
                    error_line INTEGER
                );
                CREATE TABLE IF NOT EXISTS {l} (
                    id INTEGER PRIMARY KEY,
                    at TEXT NOT NULL,
                    event TEXT NOT NULL,
                    version INTEGER,
                    name TEXT,
                    batch INTEGER,
                    actor TEXT NOT NULL,
                    reason TEXT,
                    detail TEXT
                );
                {create_snapshot}"
            ),
            select_history: format!("SELECT {HISTORY_COLUMNS} FROM {h} ORDER BY version"),
            insert_history: format!("INSERT INTO {h} ({HISTORY_COLUMNS}) VALUES ({cols14})"),
            upsert_history: format!("INSERT OR REPLACE INTO {h} ({HISTORY_COLUMNS}) VALUES ({cols14})"),
            set_state: format!("UPDATE {h} SET state = ?2, error = ?3 WHERE version = ?1"),
            fail: format!(
                "UPDATE {h} SET state = 'failed', error = ?2, error_statement = ?3, error_line = ?4, applied_at = ?5, duration_ms = ?6 WHERE version = ?1"
            ),
            finish: format!("UPDATE {h} SET state = 'applied', error = NULL, applied_at = ?2, duration_ms = ?3 WHERE version = ?1"),
            delete_history: format!("DELETE FROM {h} WHERE version = ?1"),
            insert_log: format!("INSERT INTO {l} ({LOG_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"),
            insert_snapshot: format!("INSERT INTO {sn} (taken_at, snapshot) VALUES (?1, ?2)"),
            select_snapshot: format!("SELECT snapshot FROM {sn} ORDER BY id DESC LIMIT 1"),
            create_snapshot,
        }
    }
}

/// Which way a body runs.
use kiln_core::Direction as Dir;

impl SqliteBackend {
    /// Open (creating it if missing) the database named by `cfg.url`:
    /// `sqlite://relative/or/absolute.db` (`sqlite:///abs/path.db`),
    /// `sqlite:file.db`, or `sqlite::memory:` (tests only). Query parameters
    /// are ignored. The journal mode and every other setting of the database
    /// are left as they are; the connection gets a 5 s busy timeout.
    /// `cfg.schema` does not apply to SQLite and is ignored.
    ///
    /// # Errors
    /// [`EngineError::BadUrl`] for a URL without a path, [`EngineError::Connect`]
    /// when the file cannot be opened or is not a database.
    pub async fn connect(cfg: &BackendConfig) -> Result<Self, EngineError> {
        let target = redact(&cfg.url);
        let location = parse_url(&cfg.url, &target)?;
        let connect_err = |e: rusqlite::Error| {
            let mut message = e.to_string();
            if let Location::File(p) = &location {
                match p.parent().filter(|d| !d.as_os_str().is_empty()) {
                    Some(dir) if !dir.is_dir() => message.push_str(&format!(" (directory {} does not exist)", dir.display())),
                    _ => message.push_str(&format!(" ({})", p.display())),
                }
            }
            EngineError::Connect { url: target.clone(), message }
        };
        let conn = match &location {
            Location::Memory => Connection::open_in_memory(),
            Location::File(p) => Connection::open(p),
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
        let lock_path = match &location {
            Location::Memory => None,
            Location::File(p) => {
                let mut s = p.clone().into_os_string();
                s.push("-kiln.lock");
                Some(PathBuf::from(s))
            }
        };
        Ok(SqliteBackend {
            conn,
            target,
            lock_path,
            lock_file: None,
            memory_locked: false,
            location,
            history_name: cfg.history_table.clone(),
            snapshot_name: cfg.snapshot_table.clone(),
            own_tables: [cfg.history_table.clone(), cfg.log_table.clone(), cfg.snapshot_table.clone()],
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

    fn insert_log(&self, e: &LogEntry) -> rusqlite::Result<()> {
        self.conn.prepare_cached(&self.sql.insert_log)?.execute(params![
            ts(&e.at),
            e.event,
            e.version.map(|v| v as i64),
            e.name,
            e.batch,
            e.actor,
            e.reason,
            e.detail
        ])?;
        Ok(())
    }

    fn insert_history(&self, a: &AppliedMigration) -> rusqlite::Result<()> {
        self.write_history(&self.sql.insert_history, a)
    }

    fn write_history(&self, sql: &str, a: &AppliedMigration) -> rusqlite::Result<()> {
        self.conn.prepare_cached(sql)?.execute(params![
            a.version.number as i64,
            a.description,
            a.script,
            a.group,
            a.checksum.0,
            a.state.as_str(),
            a.batch,
            ts(&a.applied_at),
            a.duration_ms,
            a.applied_by,
            a.kiln_version,
            a.error.as_ref().map(|e| e.message.as_str()),
            a.error.as_ref().and_then(|e| e.statement).map(i64::from),
            a.error.as_ref().and_then(|e| e.line).map(i64::from),
        ])?;
        Ok(())
    }

    /// Run `statements` of `m` in direction `dir`, recording the outcome. With
    /// `check` (transactional migrations only), the schema is checked before
    /// `COMMIT`, see [`Backend::apply_checked`].
    fn run(
        &mut self,
        m: &Migration,
        dir: Dir,
        applied: Option<&AppliedMigration>,
        ctx: &RecordContext,
        check: Option<&SchemaCheck>,
    ) -> Result<(), StepError> {
        let body = match dir {
            Dir::Up => &m.up,
            Dir::Down => m.down.as_ref().ok_or_else(|| {
                EngineError::Unsupported(format!("{} (version {}) has no down section, so it cannot be reverted", m.display_path(), m.version))
            })?,
        };
        let (file, statements) = match body {
            Body::Sql { file, statements } => (file.as_path(), statements.as_slice()),
            Body::Commands { .. } => {
                return Err(EngineError::Unsupported(format!("{}: MongoDB commands cannot run on SQLite", m.display_path())).into())
            }
            Body::Code => {
                return Err(EngineError::Unsupported(format!(
                    "{}: code migrations are run by the library's registered code, not by the SQLite engine",
                    m.display_path()
                ))
                .into())
            }
        };
        if m.directives.transaction == TxMode::Off {
            self.run_without_tx(m, dir, file, statements, applied, ctx)
        } else {
            self.run_in_tx(m, dir, file, statements, ctx, check)
        }
    }

    /// The normal path: body, history change and event in one transaction.
    /// `check` sees the schema the transaction would commit; its violations
    /// roll the whole migration back.
    fn run_in_tx(
        &mut self,
        m: &Migration,
        dir: Dir,
        file: &Path,
        statements: &[Statement],
        ctx: &RecordContext,
        check: Option<&SchemaCheck>,
    ) -> Result<(), StepError> {
        // A body that ends kiln's transaction itself would make the history
        // write land outside it; refuse before running anything.
        if let Some((i, st)) = statements.iter().enumerate().find(|(_, s)| controls_transaction(&s.sql)) {
            let error = StatementError {
                file: file.display().to_string(),
                statement: i + 1,
                line: st.line,
                message: "the statement controls the transaction itself, but kiln runs every SQLite migration in its own transaction; \
                          remove BEGIN/COMMIT/END/ROLLBACK from the file, or add `-- kiln:transaction off` to manage transactions yourself"
                    .into(),
                code: None,
            };
            return Err(self.failed(m, dir, ctx, error, FailureOutcome::RolledBack));
        }
        let started = Instant::now();
        self.conn.execute_batch("BEGIN IMMEDIATE").map_err(|e| self.query_err(format!("starting the transaction of {}", m.name()), e))?;
        for (i, st) in statements.iter().enumerate() {
            if let Err(e) = self.conn.execute_batch(&st.sql) {
                self.rollback();
                let error = statement_error(file, i, st, &e);
                return Err(self.failed(m, dir, ctx, error, FailureOutcome::RolledBack));
            }
        }
        if let Some(check) = check {
            // Same connection, same open transaction: the body's uncommitted DDL is what is inspected.
            let violations = match self.inspect_sync() {
                Ok(snapshot) => check(&snapshot),
                Err(e) => {
                    // Unchecked changes must not stay.
                    self.rollback();
                    return Err(StepError::Engine(e));
                }
            };
            if !violations.is_empty() {
                self.conn
                    .execute_batch("ROLLBACK")
                    .map_err(|e| self.query_err(format!("rolling back {}, which breaks the schema contract", m.name()), e))?;
                // The runner logs the `failed` event with the violations, so it is not logged here too.
                return Err(StepError::Invalid { violations, outcome: FailureOutcome::RolledBack });
            }
        }
        let now = Utc::now();
        let ms = started.elapsed().as_millis() as i64;
        self.record_step(m, ctx, dir, now, ms, |this| this.insert_history(&history_entry(m, ctx, State::Applied, now, ms, None)))
    }

    /// Inside the open transaction: record the finished step (`record_up` for an
    /// apply; a revert deletes the entry), log its event and commit. On any
    /// failure the transaction is rolled back.
    fn record_step(
        &self,
        m: &Migration,
        ctx: &RecordContext,
        dir: Dir,
        now: DateTime<Utc>,
        ms: i64,
        record_up: impl FnOnce(&Self) -> rusqlite::Result<()>,
    ) -> Result<(), StepError> {
        let recorded = (|| -> rusqlite::Result<()> {
            match dir {
                Dir::Up => record_up(self)?,
                Dir::Down => {
                    self.conn.prepare_cached(&self.sql.delete_history)?.execute([m.version.number as i64])?;
                }
            }
            self.insert_log(&event(dir_event(dir), m, ctx, now, Some(format!("{ms} ms"))))?;
            self.conn.execute_batch("COMMIT")
        })();
        if let Err(e) = recorded {
            self.rollback();
            return Err(self.query_err(format!("recording {} of {} in {}", dir_event(dir), m.name(), self.history_name), e).into());
        }
        Ok(())
    }

    /// `-- kiln:transaction off` (e.g. `VACUUM`): every statement commits on its
    /// own, so an intent row (`running`) is committed first; a process killed
    /// mid-migration leaves it behind and it blocks the next run.
    fn run_without_tx(
        &mut self,
        m: &Migration,
        dir: Dir,
        file: &Path,
        statements: &[Statement],
        applied: Option<&AppliedMigration>,
        ctx: &RecordContext,
    ) -> Result<(), StepError> {
        let started = Instant::now();
        let intent_error = interrupted_message(dir, ctx);
        let intent = match dir {
            Dir::Up => {
                let mut e = history_entry(m, ctx, State::Running, Utc::now(), 0, None);
                e.error = Some(kiln_core::FailureInfo { message: intent_error, statement: None, line: None });
                self.insert_history(&e)
            }
            Dir::Down => self
                .conn
                .prepare_cached(&self.sql.set_state)
                .and_then(|mut s| s.execute(params![m.version.number as i64, State::Running.as_str(), intent_error]))
                .map(|_| ()),
        };
        intent.map_err(|e| self.query_err(format!("recording the start of {}", m.name()), e))?;

        for (i, st) in statements.iter().enumerate() {
            if let Err(e) = self.conn.execute_batch(&st.sql) {
                self.rollback();
                let mut error = statement_error(file, i, st, &e);
                let now = Utc::now();
                let ms = started.elapsed().as_millis() as i64;
                if i == 0 {
                    // Nothing ran: undo the intent.
                    let undo = match dir {
                        Dir::Up => self.conn.prepare_cached(&self.sql.delete_history).and_then(|mut s| s.execute([m.version.number as i64])),
                        Dir::Down => self.conn.prepare_cached(&self.sql.set_state).and_then(|mut s| {
                            let state = applied.map(|a| a.state).unwrap_or(State::Applied);
                            s.execute(params![m.version.number as i64, state.as_str(), Option::<String>::None])
                        }),
                    };
                    undo.map_err(|e| self.query_err(format!("clearing the start of {}", m.name()), e))?;
                    return Err(self.failed(m, dir, ctx, error, FailureOutcome::RolledBack));
                }
                let which = if i == 1 {
                    "statement 1 was committed on its own and remains".to_string()
                } else {
                    format!("statements 1–{i} were each committed on their own and remain")
                };
                let why = format!("the migration runs with `-- kiln:transaction off`, so {which} in the database");
                let recorded = format!("{}{}; {why}", if dir == Dir::Down { "the down migration failed: " } else { "" }, error.message);
                self.conn
                    .prepare_cached(&self.sql.fail)
                    .and_then(|mut s| {
                        s.execute(params![
                            m.version.number as i64,
                            recorded,
                            error.statement as i64,
                            error.line as i64,
                            ts(&now),
                            ms
                        ])
                    })
                    .map_err(|e| self.query_err(format!("recording the failure of {}", m.name()), e))?;
                error.message = format!(
                    "{}; {why}: fix the database by hand, then run `kiln repair {}`",
                    error.message, m.version
                );
                return Err(self.failed(m, dir, ctx, error, FailureOutcome::RecordedFailed));
            }
        }
        let now = Utc::now();
        let ms = started.elapsed().as_millis() as i64;
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(|e| self.query_err(format!("recording {} of {} in {}", dir_event(dir), m.name(), self.history_name), e))?;
        self.record_step(m, ctx, dir, now, ms, |this| {
            this.conn.prepare_cached(&this.sql.finish)?.execute(params![m.version.number as i64, ts(&now), ms]).map(|_| ())
        })
    }

    /// Log a `failed` event and build the step error. A failure to write the
    /// event is reported instead, since the operator must know the log is incomplete.
    fn failed(&self, m: &Migration, dir: Dir, ctx: &RecordContext, error: StatementError, outcome: FailureOutcome) -> StepError {
        let detail = format!("{}{error}", if dir == Dir::Down { "down: " } else { "" });
        if let Err(e) = self.insert_log(&event("failed", m, ctx, Utc::now(), Some(detail))) {
            return StepError::Engine(self.query_err(format!("logging the failure of {} ({error})", m.name()), e));
        }
        StepError::Body(ApplyError { error, outcome })
    }

    /// Whether `name` is a table of the main database.
    fn table_exists(&self, name: &str) -> Result<bool, EngineError> {
        self.conn
            .prepare_cached("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1")
            .and_then(|mut s| s.query_row([name], |_| Ok(())).optional())
            .map(|found| found.is_some())
            .map_err(|e| self.query_err(format!("looking for the table {name}"), e))
    }

    fn read_history_sync(&self) -> Result<Option<Vec<AppliedMigration>>, EngineError> {
        if !self.table_exists(&self.history_name)? {
            return Ok(None);
        }
        let ctx = || format!("reading {}", self.history_name);
        let mut stmt = self.conn.prepare_cached(&self.sql.select_history).map_err(|e| self.query_err(ctx(), e))?;
        let rows = stmt
            .query_map([], |r| {
                let at: String = r.get(7)?;
                Ok((
                    at,
                    RawHistoryRow {
                        version: r.get(0)?,
                        description: r.get(1)?,
                        script: r.get(2)?,
                        group: r.get(3)?,
                        checksum: r.get(4)?,
                        state: r.get(5)?,
                        batch: r.get(6)?,
                        applied_at: DateTime::<Utc>::UNIX_EPOCH,
                        duration_ms: r.get(8)?,
                        applied_by: r.get(9)?,
                        kiln_version: r.get(10)?,
                        error: r.get(11)?,
                        error_statement: r.get(12)?,
                        error_line: r.get(13)?,
                    },
                ))
            })
            .map_err(|e| self.query_err(ctx(), e))?;
        let mut out = Vec::new();
        for row in rows {
            let (at, mut raw) = row.map_err(|e| self.query_err(ctx(), e))?;
            raw.applied_at = parse_ts(&at).ok_or_else(|| EngineError::Query {
                context: ctx(),
                message: format!("version {}: applied_at {at:?} is not an RFC 3339 timestamp", raw.version),
            })?;
            out.push(raw.into_applied());
        }
        Ok(Some(out))
    }
}

// ---------------------------------------------------------------------------
// Schema inspection and scratch databases.

/// The tables [`Backend::inspect`] reports, as a CTE the three inspection
/// queries share (`?1`–`?3`: kiln's own table names): tables of the `main`
/// database (not `temp`, not attached ones), ordinary or virtual; not views,
/// not the shadow tables that back a virtual table (FTS5's `…_data`…, the
/// virtual table's business), not `sqlite_%` internals such as
/// `sqlite_sequence` and `sqlite_stat1`. `wr` says `WITHOUT ROWID`.
const INSPECT_TABLES: &str = "WITH t AS (SELECT name, wr FROM pragma_table_list \
    WHERE schema = 'main' AND type IN ('table', 'virtual') AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' AND name NOT IN (?1, ?2, ?3))";

/// One row per column in declaration order. `table_xinfo` rather than
/// `table_info` so generated columns are included; `hidden = 1` marks the
/// hidden columns of virtual tables, which are not part of what the
/// migration declared.
const INSPECT_COLUMNS: &str = "SELECT t.name, t.wr, c.name, c.type, c.\"notnull\", c.pk \
    FROM t JOIN pragma_table_xinfo(t.name, 'main') c WHERE c.hidden <> 1 ORDER BY t.name, c.cid";

/// One row per key column of every index, in key order: `origin` tells a
/// `CREATE INDEX` (`c`) from the automatic index behind a `UNIQUE` (`u`) or
/// `PRIMARY KEY` (`pk`) constraint; `cid = -2` is an expression key.
const INSPECT_INDEXES: &str = "SELECT t.name, il.name, il.\"unique\", il.origin, il.partial, ii.cid, ii.name, ii.\"desc\", ii.coll \
    FROM t JOIN pragma_index_list(t.name, 'main') il JOIN pragma_index_xinfo(il.name, 'main') ii \
    WHERE ii.key = 1 ORDER BY t.name, il.name, ii.seqno";

/// One row per column of every foreign key, grouped by `id`, in key order.
const INSPECT_FOREIGN_KEYS: &str = "SELECT t.name, f.id, f.\"table\", f.\"from\", f.\"to\", f.on_update, f.on_delete \
    FROM t JOIN pragma_foreign_key_list(t.name, 'main') f ORDER BY t.name, f.id, f.seq";

/// The `CREATE INDEX` text of indexes whose expression keys or partial
/// predicate are only found there.
const INSPECT_INDEX_SQL: &str = "SELECT name, sql FROM main.sqlite_schema WHERE type = 'index' AND sql IS NOT NULL";

/// What the column query says about a table beyond its columns.
#[derive(Default)]
struct TableFacts {
    without_rowid: bool,
    /// Primary key columns with their 1-based position in the key.
    pk: Vec<(i64, String)>,
    /// The primary key has an index of its own; a rowid table whose key has
    /// none has an `INTEGER PRIMARY KEY` that is the rowid.
    pk_index: bool,
}

/// One index as [`INSPECT_INDEXES`] returns it, its key rows gathered.
struct IndexRow {
    table: String,
    name: String,
    unique: bool,
    origin: String,
    partial: bool,
    keys: Vec<IndexKey>,
}

struct IndexKey {
    cid: i64,
    name: Option<String>,
    desc: bool,
    collation: String,
}

/// One foreign key as [`INSPECT_FOREIGN_KEYS`] returns it, its column rows gathered.
struct ForeignKeyRow {
    table: String,
    id: i64,
    ref_table: String,
    from: Vec<String>,
    to: Vec<Option<String>>,
    on_update: String,
    on_delete: String,
}

impl SqliteBackend {
    /// The live schema as [`Backend::inspect`] describes it, read on this
    /// connection: inside a migration's open transaction it sees that
    /// transaction's uncommitted changes.
    fn inspect_sync(&self) -> Result<Snapshot, EngineError> {
        let fail = |e: rusqlite::Error| self.query_err("inspecting the schema", e);
        let own = params![self.own_tables[0], self.own_tables[1], self.own_tables[2]];
        let mut snapshot = Snapshot::default();
        let mut facts: HashMap<String, TableFacts> = HashMap::new();

        let mut stmt = self.conn.prepare_cached(&format!("{INSPECT_TABLES} {INSPECT_COLUMNS}")).map_err(fail)?;
        let mut rows = stmt.query(own).map_err(fail)?;
        while let Some(r) = rows.next().map_err(fail)? {
            let table: String = r.get(0).map_err(fail)?;
            let column: String = r.get(2).map_err(fail)?;
            let data_type: Option<String> = r.get(3).map_err(fail)?;
            let not_null: bool = r.get(4).map_err(fail)?;
            let pk: i64 = r.get(5).map_err(fail)?;
            let f = facts.entry(table.clone()).or_default();
            f.without_rowid = r.get(1).map_err(fail)?;
            if pk > 0 {
                f.pk.push((pk, column.clone()));
            }
            let data_type = data_type.unwrap_or_default().to_lowercase();
            snapshot.objects.entry(table).or_default().columns.insert(column, ColumnInfo { data_type, nullable: !not_null });
        }
        drop(rows);
        drop(stmt);

        let mut indexes: Vec<IndexRow> = Vec::new();
        let mut stmt = self.conn.prepare_cached(&format!("{INSPECT_TABLES} {INSPECT_INDEXES}")).map_err(fail)?;
        let mut rows = stmt.query(own).map_err(fail)?;
        while let Some(r) = rows.next().map_err(fail)? {
            let table: String = r.get(0).map_err(fail)?;
            let name: String = r.get(1).map_err(fail)?;
            let key = IndexKey {
                cid: r.get(5).map_err(fail)?,
                name: r.get(6).map_err(fail)?,
                desc: r.get(7).map_err(fail)?,
                collation: r.get::<_, Option<String>>(8).map_err(fail)?.unwrap_or_default(),
            };
            match indexes.last_mut() {
                Some(last) if last.table == table && last.name == name => last.keys.push(key),
                _ => indexes.push(IndexRow {
                    table,
                    name,
                    unique: r.get(2).map_err(fail)?,
                    origin: r.get(3).map_err(fail)?,
                    partial: r.get(4).map_err(fail)?,
                    keys: vec![key],
                }),
            }
        }
        drop(rows);
        drop(stmt);

        let mut foreign_keys: Vec<ForeignKeyRow> = Vec::new();
        let mut stmt = self.conn.prepare_cached(&format!("{INSPECT_TABLES} {INSPECT_FOREIGN_KEYS}")).map_err(fail)?;
        let mut rows = stmt.query(own).map_err(fail)?;
        while let Some(r) = rows.next().map_err(fail)? {
            let table: String = r.get(0).map_err(fail)?;
            let id: i64 = r.get(1).map_err(fail)?;
            let from: String = r.get(3).map_err(fail)?;
            let to: Option<String> = r.get(4).map_err(fail)?;
            match foreign_keys.last_mut() {
                Some(last) if last.table == table && last.id == id => {
                    last.from.push(from);
                    last.to.push(to);
                }
                _ => foreign_keys.push(ForeignKeyRow {
                    table,
                    id,
                    ref_table: r.get(2).map_err(fail)?,
                    from: vec![from],
                    to: vec![to],
                    on_update: r.get(5).map_err(fail)?,
                    on_delete: r.get(6).map_err(fail)?,
                }),
            }
        }
        drop(rows);
        drop(stmt);

        // Expression keys and partial predicates exist only in the index's SQL text.
        let needs_sql = indexes.iter().any(|i| i.partial || i.keys.iter().any(|k| k.name.is_none()));
        let mut index_sql: HashMap<String, String> = HashMap::new();
        if needs_sql {
            let mut stmt = self.conn.prepare_cached(INSPECT_INDEX_SQL).map_err(fail)?;
            let mut rows = stmt.query([]).map_err(fail)?;
            while let Some(r) = rows.next().map_err(fail)? {
                index_sql.insert(r.get(0).map_err(fail)?, r.get(1).map_err(fail)?);
            }
        }

        for i in indexes {
            if i.origin == "pk" {
                facts.entry(i.table).or_default().pk_index = true;
                continue;
            }
            let parts = index_sql.get(&i.name).and_then(|sql| index_parts(sql));
            let columns: Vec<String> = i
                .keys
                .iter()
                .enumerate()
                .map(|(n, k)| match &k.name {
                    Some(name) => name.clone(),
                    None if k.cid == -1 => "rowid".to_string(),
                    None => parts.as_ref().and_then(|(keys, _)| keys.get(n)).map(|e| expression_key(e)).unwrap_or_else(|| "?".into()),
                })
                .collect();
            let mut options = Vec::new();
            if i.keys.iter().any(|k| k.desc || !k.collation.eq_ignore_ascii_case("binary")) {
                let keys: Vec<String> = columns
                    .iter()
                    .zip(&i.keys)
                    .map(|(c, k)| {
                        let mut key = c.clone();
                        if !k.collation.eq_ignore_ascii_case("binary") {
                            key.push_str(&format!(" collate {}", k.collation.to_lowercase()));
                        }
                        if k.desc {
                            key.push_str(" desc");
                        }
                        key
                    })
                    .collect();
                options.push(format!("keys ({})", keys.join(", ")));
            }
            if i.partial {
                match parts.as_ref().and_then(|(_, predicate)| predicate.as_ref()) {
                    Some(p) => options.push(format!("where {p}")),
                    None => options.push("partial".into()),
                }
            }
            let options = (!options.is_empty()).then(|| options.join(" "));
            let object = snapshot.objects.entry(i.table.clone()).or_default();
            if i.origin == "u" {
                let name = free_name(&object.constraints, format!("{}_{}_key", i.table, columns.join("_")));
                object.constraints.insert(name, ConstraintInfo { kind: "unique".into(), columns, definition: options });
            } else {
                object.indexes.insert(i.name, IndexInfo { columns, unique: i.unique, options });
            }
        }

        for (table, f) in &mut facts {
            if f.pk.is_empty() {
                continue;
            }
            f.pk.sort();
            let columns: Vec<String> = f.pk.iter().map(|(_, c)| c.clone()).collect();
            let object = snapshot.objects.entry(table.clone()).or_default();
            if !f.without_rowid && !f.pk_index && columns.len() == 1 {
                // The rowid itself: NULL becomes the next rowid, never a NULL.
                if let Some(c) = object.columns.get_mut(&columns[0]) {
                    c.nullable = false;
                }
            }
            object.constraints.insert(format!("{table}_pkey"), ConstraintInfo { kind: "primary key".into(), columns, definition: None });
        }

        for fk in foreign_keys {
            // `REFERENCES t` without columns means t's primary key.
            let ref_columns: Vec<String> = if fk.to.iter().all(Option::is_none) {
                facts.get(&fk.ref_table).map(|f| f.pk.iter().map(|(_, c)| c.clone()).collect()).unwrap_or_default()
            } else {
                fk.to.iter().map(|c| c.clone().unwrap_or_else(|| "?".into())).collect()
            };
            let definition = format!(
                "references {} ({}) on update {} on delete {}",
                fk.ref_table,
                ref_columns.join(", "),
                fk.on_update.to_lowercase(),
                fk.on_delete.to_lowercase()
            );
            let object = snapshot.objects.entry(fk.table.clone()).or_default();
            let name = free_name(&object.constraints, format!("{}_{}_fkey", fk.table, fk.from.join("_")));
            object.constraints.insert(name, ConstraintInfo { kind: "foreign key".into(), columns: fk.from, definition: Some(definition) });
        }
        Ok(snapshot)
    }

    /// `<dir of the configured database>/<name>.db`, for a valid scratch name.
    fn scratch_path(&self, name: &str) -> Result<PathBuf, EngineError> {
        check_scratch_name(name)?;
        let dir = match &self.location {
            Location::File(p) => p.parent().map(Path::to_path_buf).unwrap_or_default(),
            Location::Memory => std::env::temp_dir(),
        };
        Ok(dir.join(format!("{name}.db")))
    }
}

/// `base`, or `base1`, `base2`… when a constraint of that name exists already
/// (PostgreSQL's rule for its generated names).
fn free_name(taken: &BTreeMap<String, ConstraintInfo>, base: String) -> String {
    if !taken.contains_key(&base) {
        return base;
    }
    (1..).map(|n| format!("{base}{n}")).find(|n| !taken.contains_key(n)).expect("a free name")
}

/// The key items (as written, trimmed) and the `WHERE` predicate of a
/// `CREATE INDEX` statement, or `None` for text it cannot follow. The first
/// parenthesis outside quotes opens the key list: before it come only names.
fn index_parts(sql: &str) -> Option<(Vec<String>, Option<String>)> {
    let bytes = sql.as_bytes();
    let mut i = 0;
    let mut depth = 0usize;
    let mut item_start = 0;
    let mut items = Vec::new();
    while i < bytes.len() {
        let c = bytes[i];
        let close = match c {
            b'\'' => Some(b'\''),
            b'"' => Some(b'"'),
            b'`' => Some(b'`'),
            b'[' => Some(b']'),
            _ => None,
        };
        if let Some(close) = close {
            // Skip the quoted text; a doubled quote is an escaped one and is skipped as two quotes.
            i += 1;
            while i < bytes.len() && bytes[i] != close {
                i += 1;
            }
            i += 1;
            continue;
        }
        match c {
            b'(' => {
                depth += 1;
                if depth == 1 {
                    item_start = i + 1;
                }
            }
            b')' if depth > 0 => {
                depth -= 1;
                if depth == 0 {
                    items.push(sql[item_start..i].trim().to_string());
                    let rest = sql[i + 1..].trim();
                    let predicate = rest
                        .get(..5)
                        .filter(|w| w.eq_ignore_ascii_case("where"))
                        .map(|_| rest[5..].trim().to_string())
                        .filter(|p| !p.is_empty());
                    return Some((items, predicate));
                }
            }
            b',' if depth == 1 => {
                items.push(sql[item_start..i].trim().to_string());
                item_start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// An expression key as written, without the `ASC`/`DESC` and `COLLATE x`
/// that the index's own key information already reports.
fn expression_key(item: &str) -> String {
    let mut t = item.trim();
    if let Some((head, last)) = t.rsplit_once(char::is_whitespace) {
        if last.eq_ignore_ascii_case("asc") || last.eq_ignore_ascii_case("desc") {
            t = head.trim_end();
        }
    }
    if let Some((head, _collation)) = t.rsplit_once(char::is_whitespace) {
        if let Some((expr, word)) = head.trim_end().rsplit_once(char::is_whitespace) {
            if word.eq_ignore_ascii_case("collate") {
                t = expr.trim_end();
            }
        }
    }
    t.to_string()
}

/// Scratch databases are named `kiln_verify_…` by `kiln verify`. Anything else
/// is refused, so neither a typo nor a caller's bug can create or delete a
/// real database file; letters, digits and `_` only, so the name cannot
/// reach outside the directory.
fn check_scratch_name(name: &str) -> Result<(), EngineError> {
    crate::common::check_scratch_name(name, 200)
}

#[async_trait]
impl Backend for SqliteBackend {
    fn capabilities(&self) -> Capabilities {
        Capabilities { engine: "sqlite", transactional_ddl: true, kind: Kind::Sql }
    }

    fn target(&self) -> String {
        self.target.clone()
    }

    async fn try_lock(&mut self) -> Result<bool, EngineError> {
        if self.lock_file.is_some() || self.memory_locked {
            return Ok(true);
        }
        let Some(path) = &self.lock_path else {
            self.memory_locked = true;
            return Ok(true);
        };
        let lock_err = |e: std::io::Error| EngineError::Query { context: format!("taking the lock file {}", path.display()), message: e.to_string() };
        // Not truncated on open: the holder's note must survive until we hold the lock.
        let mut f = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(lock_err)?;
        match f.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Ok(false),
            Err(std::fs::TryLockError::Error(e)) => return Err(lock_err(e)),
        }
        let note = format!(
            "pid {} {} since {}",
            std::process::id(),
            kiln_core::current_actor(),
            Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
        );
        // The note is only for messages; the lock is what matters, so a failed write is not fatal.
        let _ = f.set_len(0).and_then(|_| f.write_all(note.as_bytes())).and_then(|_| f.flush());
        self.lock_file = Some(f);
        Ok(true)
    }

    async fn lock_holder(&mut self) -> Option<String> {
        let path = self.lock_path.as_ref()?;
        let mut s = String::new();
        File::open(path).ok()?.read_to_string(&mut s).ok()?;
        let s = s.trim();
        (!s.is_empty()).then(|| format!("{s} (lock file {})", path.display()))
    }

    async fn unlock(&mut self) -> Result<(), EngineError> {
        self.memory_locked = false;
        if let Some(f) = self.lock_file.take() {
            // Clear the note so a stale one is never shown; closing the file releases the lock.
            let _ = f.set_len(0);
            let _ = f.unlock();
        }
        Ok(())
    }

    async fn ensure_history(&mut self) -> Result<(), EngineError> {
        self.conn.execute_batch(&self.sql.create).map_err(|e| self.query_err(format!("creating {}", self.history_name), e))
    }

    async fn read_history(&mut self) -> Result<Option<Vec<AppliedMigration>>, EngineError> {
        self.read_history_sync()
    }

    async fn apply(&mut self, m: &Migration, ctx: &RecordContext) -> Result<(), StepError> {
        self.run(m, Dir::Up, None, ctx, None)
    }

    async fn revert(&mut self, m: &Migration, applied: &AppliedMigration, ctx: &RecordContext) -> Result<(), StepError> {
        self.run(m, Dir::Down, Some(applied), ctx, None)
    }

    /// Inside the migration's transaction: the body runs as in
    /// [`Backend::apply`], then `check` sees the schema the transaction would
    /// commit (same connection, before the history row and `COMMIT`); its
    /// violations roll everything back ([`FailureOutcome::RolledBack`]: no
    /// trace of the migration, no history row, no `applied` event). The
    /// `failed` event with the violations is logged by the runner.
    ///
    /// `-- kiln:transaction off` migrations have no transaction to roll back:
    /// they are applied, then checked, and on violations their history entry is
    /// recorded as `failed` ([`FailureOutcome::RecordedFailed`]), which blocks
    /// the next run until `kiln repair`.
    async fn apply_checked(&mut self, m: &Migration, ctx: &RecordContext, check: &SchemaCheck) -> Result<(), StepError> {
        if m.directives.transaction != TxMode::Off {
            return self.run(m, Dir::Up, None, ctx, Some(check));
        }
        self.run(m, Dir::Up, None, ctx, None)?;
        let violations = check(&self.inspect_sync()?);
        if violations.is_empty() {
            return Ok(());
        }
        let message = format!(
            "schema validation failed after this migration, which ran outside a transaction and could not be rolled back: {}; \
             fix the schema, then run `kiln repair {}`",
            violations.iter().map(|v| v.to_string()).collect::<Vec<_>>().join("; "),
            m.version
        );
        self.conn
            .prepare_cached(&self.sql.fail)
            .and_then(|mut s| {
                s.execute(params![
                    m.version.number as i64,
                    message,
                    Option::<i64>::None,
                    Option::<i64>::None,
                    ts(&Utc::now()),
                    0i64
                ])
            })
            .map_err(|e| self.query_err(format!("recording {} as failed after schema validation", m.name()), e))?;
        Err(StepError::Invalid { violations, outcome: FailureOutcome::RecordedFailed })
    }

    /// Every table of the `main` database — ordinary, `WITHOUT ROWID`, `STRICT`
    /// and virtual ones; not views, not `sqlite_%` internals, not the shadow
    /// tables of virtual tables, not kiln's own — with their columns (declared
    /// type, lower-cased; generated columns included), indexes, and primary
    /// key, unique and foreign key constraints. Three queries, whatever the
    /// number of tables.
    ///
    /// SQLite keeps no names for table constraints (`CONSTRAINT x UNIQUE (…)`
    /// is parsed and forgotten; the index behind it is `sqlite_autoindex_<table>_<n>`,
    /// numbered by position), so constraints get the names PostgreSQL would
    /// give them by default — `<table>_pkey`, `<table>_<columns>_key`,
    /// `<table>_<columns>_fkey` — which survive the table rebuilds SQLite's
    /// `ALTER TABLE` procedure needs, and read the same as on PostgreSQL.
    /// Plain indexes keep their own names. `CHECK` constraints are not
    /// reported: SQLite exposes them only inside the `CREATE TABLE` text.
    ///
    /// Nullability is what SQLite enforces: `NOT NULL` columns, the primary
    /// key of a `WITHOUT ROWID` table, and an `INTEGER PRIMARY KEY` (the rowid)
    /// are not nullable; the other primary key columns of a rowid table are,
    /// as SQLite (unlike the SQL standard) accepts NULL in them.
    async fn inspect(&mut self) -> Result<Snapshot, EngineError> {
        self.inspect_sync()
    }

    /// Appends a row to the snapshot table (created here when a database from
    /// before snapshots lacks it); earlier snapshots are kept as history.
    async fn save_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), EngineError> {
        let context = format!("writing the schema snapshot to {}", self.snapshot_name);
        let json = serde_json::to_string(snapshot).map_err(|e| EngineError::Query { context: context.clone(), message: e.to_string() })?;
        if !self.table_exists(&self.snapshot_name)? {
            self.conn.execute_batch(&self.sql.create_snapshot).map_err(|e| self.query_err(&context, e))?;
        }
        self.conn
            .prepare_cached(&self.sql.insert_snapshot)
            .and_then(|mut s| s.execute(params![ts(&Utc::now()), json]))
            .map(|_| ())
            .map_err(|e| self.query_err(context, e))
    }

    /// The newest stored snapshot; `None` when there is none or no snapshot
    /// table at all. Creates nothing.
    async fn load_snapshot(&mut self) -> Result<Option<Snapshot>, EngineError> {
        let context = format!("reading the schema snapshot from {}", self.snapshot_name);
        if !self.table_exists(&self.snapshot_name)? {
            return Ok(None);
        }
        let text: Option<String> = self
            .conn
            .prepare_cached(&self.sql.select_snapshot)
            .and_then(|mut s| s.query_row([], |r| r.get(0)).optional())
            .map_err(|e| self.query_err(&context, e))?;
        let Some(text) = text else { return Ok(None) };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| EngineError::Query { context, message: format!("the stored snapshot is not a kiln snapshot: {e}") })
    }

    /// A new, empty database file `<name>.db` next to the configured one (in
    /// the system's temporary directory for `sqlite::memory:`); returns its
    /// `sqlite://` URL. Refuses names [`Backend::drop_scratch`] would refuse,
    /// and an existing file: a scratch database must start empty.
    async fn create_scratch(&mut self, name: &str) -> Result<String, EngineError> {
        let path = self.scratch_path(name)?;
        OpenOptions::new().write(true).create_new(true).open(&path).map_err(|e| EngineError::Query {
            context: format!("creating the scratch database {}", path.display()),
            message: e.to_string(),
        })?;
        Ok(format!("sqlite://{}", path.display()))
    }

    /// Deletes the file made by [`Backend::create_scratch`] and its companions
    /// (`-wal`, `-shm`, `-journal`, `-kiln.lock`); files already gone are not
    /// an error. Refuses any name that `kiln verify` does not make
    /// (`kiln_verify_…`), so a wrong argument can never delete a real database.
    async fn drop_scratch(&mut self, name: &str) -> Result<(), EngineError> {
        let path = self.scratch_path(name)?;
        for suffix in ["", "-wal", "-shm", "-journal", "-kiln.lock"] {
            let mut file = path.clone().into_os_string();
            file.push(suffix);
            let file = PathBuf::from(file);
            match std::fs::remove_file(&file) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(EngineError::Query { context: format!("dropping the scratch database: removing {}", file.display()), message: e.to_string() })
                }
                _ => {}
            }
        }
        Ok(())
    }

    async fn upsert_history(&mut self, entries: &[AppliedMigration]) -> Result<(), EngineError> {
        let r = (|| -> rusqlite::Result<()> {
            self.conn.execute_batch("BEGIN IMMEDIATE")?;
            for e in entries {
                self.write_history(&self.sql.upsert_history, e)?;
            }
            self.conn.execute_batch("COMMIT")
        })();
        r.map_err(|e| {
            self.rollback();
            self.query_err(format!("writing {}", self.history_name), e)
        })
    }

    async fn delete_history(&mut self, version: u64) -> Result<(), EngineError> {
        self.conn
            .prepare_cached(&self.sql.delete_history)
            .and_then(|mut s| s.execute([version as i64]))
            .map(|_| ())
            .map_err(|e| self.query_err(format!("deleting version {version} from {}", self.history_name), e))
    }

    async fn log(&mut self, entry: &LogEntry) -> Result<(), EngineError> {
        // Outside a transaction every statement commits (durably, unless the
        // user chose a weaker `synchronous` setting for the database).
        self.insert_log(entry).map_err(|e| self.query_err("writing the event log", e))
    }

    async fn close(mut self: Box<Self>) -> Result<(), EngineError> {
        self.unlock().await?;
        let SqliteBackend { conn, target, .. } = *self;
        conn.close().map_err(|(_, e)| EngineError::Query { context: format!("closing {target}"), message: e.to_string() })
    }
}

fn parse_url(url: &str, shown: &str) -> Result<Location, EngineError> {
    let lower = url.to_ascii_lowercase();
    let rest = ["sqlite3://", "sqlite://", "sqlite3:", "sqlite:"]
        .iter()
        .find(|p| lower.starts_with(*p))
        .map(|p| &url[p.len()..])
        .ok_or_else(|| EngineError::BadUrl { url: shown.into(), message: "expected sqlite://PATH, sqlite:PATH or sqlite::memory:".into() })?;
    let path = rest.split('?').next().unwrap_or("");
    match path {
        "" => Err(EngineError::BadUrl { url: shown.into(), message: "no database file; use e.g. sqlite://kiln.db or sqlite:///var/lib/app/app.db".into() }),
        ":memory:" => Ok(Location::Memory),
        p => Ok(Location::File(PathBuf::from(p))),
    }
}

/// True for statements that begin or end a transaction (savepoints excepted).
fn controls_transaction(sql: &str) -> bool {
    let mut words = leading_words(sql);
    match words.next().as_deref() {
        Some("BEGIN" | "COMMIT" | "END") => true,
        // `ROLLBACK [TRANSACTION] TO [SAVEPOINT] x` only rewinds to a savepoint.
        Some("ROLLBACK") => {
            let next = words.next();
            let to = if next.as_deref() == Some("TRANSACTION") { words.next() } else { next };
            to.as_deref() != Some("TO")
        }
        _ => false,
    }
}

/// Upper-cased words at the start of a statement, skipping comments.
fn leading_words(sql: &str) -> impl Iterator<Item = String> + '_ {
    let mut rest = sql;
    std::iter::from_fn(move || loop {
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix("--") {
            rest = r.find('\n').map(|i| &r[i..]).unwrap_or("");
        } else if let Some(r) = rest.strip_prefix("/*") {
            rest = r.find("*/").map(|i| &r[i + 2..]).unwrap_or("");
        } else {
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
            if end == 0 {
                return None;
            }
            let w = rest[..end].to_ascii_uppercase();
            rest = &rest[end..];
            return Some(w);
        }
    })
}

fn statement_error(file: &Path, index: usize, st: &Statement, e: &rusqlite::Error) -> StatementError {
    let (message, code) = match e {
        rusqlite::Error::SqliteFailure(err, msg) => {
            let text = msg.clone().unwrap_or_else(|| err.to_string());
            (format!("{text} (SQLite error {})", err.extended_code), Some(err.extended_code.to_string()))
        }
        other => (other.to_string(), None),
    };
    StatementError { file: file.display().to_string(), statement: index + 1, line: st.line, message, code }
}

fn history_entry(m: &Migration, ctx: &RecordContext, state: State, at: DateTime<Utc>, ms: i64, error: Option<kiln_core::FailureInfo>) -> AppliedMigration {
    ctx.entry(m, state, at, ms, error)
}

fn event(kind: &str, m: &Migration, ctx: &RecordContext, at: DateTime<Utc>, detail: Option<String>) -> LogEntry {
    LogEntry {
        at,
        event: kind.into(),
        version: Some(m.version.number),
        name: Some(m.description.clone()),
        batch: Some(ctx.batch),
        actor: ctx.actor.clone(),
        reason: None,
        detail,
    }
}

use crate::common::step_event as dir_event;

/// The error recorded with an intent row, shown if the runner never finishes it.
fn interrupted_message(dir: Dir, ctx: &RecordContext) -> String {
    format!(
        "{} by {} at {} was interrupted (the process died or lost its connection) before it finished; statements before the interruption may have been committed",
        if dir == Dir::Up { "the run started" } else { "the revert started" },
        ctx.actor,
        Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
    )
}

/// RFC 3339, UTC, milliseconds: sorts as text and reads back exactly.
fn ts(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// RFC 3339, or SQLite's own `YYYY-MM-DD HH:MM:SS[.fff]` (UTC) for adopted tables.
fn parse_ts(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .map(|d| d.with_timezone(&Utc))
        .ok()
        .or_else(|| NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f").ok().map(|n| n.and_utc()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let p = |u: &str| parse_url(u, u);
        assert_eq!(p("sqlite://kiln.db").unwrap(), Location::File("kiln.db".into()));
        assert_eq!(p("sqlite:///tmp/x.db").unwrap(), Location::File("/tmp/x.db".into()));
        assert_eq!(p("sqlite:rel/x.db?mode=rwc").unwrap(), Location::File("rel/x.db".into()));
        assert_eq!(p("sqlite::memory:").unwrap(), Location::Memory);
        assert!(matches!(p("sqlite://"), Err(EngineError::BadUrl { .. })));
        assert!(matches!(p("postgres://x"), Err(EngineError::BadUrl { .. })));
    }

    #[test]
    fn transaction_control() {
        assert!(controls_transaction("BEGIN"));
        assert!(controls_transaction("-- c\ncommit"));
        assert!(controls_transaction("END TRANSACTION"));
        assert!(controls_transaction("ROLLBACK"));
        assert!(!controls_transaction("ROLLBACK TO sp1"));
        assert!(!controls_transaction("CREATE TRIGGER t AFTER INSERT ON a BEGIN SELECT 1; END"));
        assert!(!controls_transaction("SAVEPOINT a"));
    }

    #[test]
    fn index_sql_parts() {
        let (keys, predicate) = index_parts("CREATE INDEX \"a(b\" ON t (lower(title) DESC, \"x,y\", substr(b, 1, 2) COLLATE nocase) WHERE a > ')'").unwrap();
        assert_eq!(keys, ["lower(title) DESC", "\"x,y\"", "substr(b, 1, 2) COLLATE nocase"]);
        assert_eq!(predicate.as_deref(), Some("a > ')'"));
        assert_eq!(index_parts("CREATE UNIQUE INDEX i ON t(a)").unwrap(), (vec!["a".to_string()], None));
        assert_eq!(index_parts("CREATE INDEX i ON t"), None);
        assert_eq!(expression_key("lower(title) DESC"), "lower(title)");
        assert_eq!(expression_key("substr(b, 1, 2) COLLATE nocase asc"), "substr(b, 1, 2)");
        assert_eq!(expression_key("a+b"), "a+b");
    }

    #[test]
    fn scratch_names() {
        assert!(check_scratch_name("kiln_verify_123_abc").is_ok());
        for bad in ["kiln_verify_", "app", "kiln_verify_../x", "kiln_verify_a/b", "kiln_verify_a.db"] {
            assert!(check_scratch_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn timestamps_round_trip() {
        let t = DateTime::parse_from_rfc3339("2025-11-01T12:30:00.123Z").unwrap().with_timezone(&Utc);
        assert_eq!(ts(&t), "2025-11-01T12:30:00.123Z");
        assert_eq!(parse_ts(&ts(&t)), Some(t));
        assert!(parse_ts("2025-11-01 12:30:00").is_some());
        assert!(parse_ts("yesterday").is_none());
    }
}
