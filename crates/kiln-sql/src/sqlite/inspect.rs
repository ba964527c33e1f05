//! The live schema of a SQLite database and the stored snapshots:
//! [`SchemaStore`] for SQLite.
//!
//! [`SchemaStore::inspect`] reads the whole schema with three queries joining
//! the `pragma_table_list`, `pragma_table_xinfo`,
//! `pragma_index_list`/`pragma_index_xinfo` and `pragma_foreign_key_list`
//! table-valued functions, whatever the number of tables, plus the
//! `CREATE INDEX` text of indexes with expression keys or a predicate
//! ([`index_parts`]). It reads on the engine's connection, so inside a
//! migration's open transaction ([`super::exec`]) it sees that transaction's
//! uncommitted changes.

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use chrono::Utc;
use kiln_core::engine::SchemaStore;
use kiln_core::schema::{ColumnInfo, ConstraintInfo, IndexInfo, Snapshot};
use kiln_core::EngineError;
use rusqlite::{params, OptionalExtension};

use super::history::ts;
use super::SqliteEngine;

/// The tables [`SchemaStore::inspect`] reports, as a CTE the three inspection
/// queries share (`?1`–`?4`: kiln's own table names): tables of the `main`
/// database (not `temp`, not attached ones), ordinary or virtual; not views,
/// not the shadow tables that back a virtual table (FTS5's `…_data`…, the
/// virtual table's business), not `sqlite_%` internals such as
/// `sqlite_sequence` and `sqlite_stat1`. `wr` says `WITHOUT ROWID`.
const INSPECT_TABLES: &str = "WITH t AS (SELECT name, wr FROM pragma_table_list \
    WHERE schema = 'main' AND type IN ('table', 'virtual') AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' AND name NOT IN (?1, ?2, ?3, ?4))";

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

impl SqliteEngine {
    /// The live schema as [`SchemaStore::inspect`] describes it, read on this
    /// connection: inside a migration's open transaction it sees that
    /// transaction's uncommitted changes.
    pub(super) fn inspect_sync(&self) -> Result<Snapshot, EngineError> {
        let fail = |e: rusqlite::Error| self.query_err("inspecting the schema", e);
        let own = params![self.own_tables[0], self.own_tables[1], self.own_tables[2], self.own_tables[3]];
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
                    let predicate =
                        rest.get(..5).filter(|w| w.eq_ignore_ascii_case("where")).map(|_| rest[5..].trim().to_string()).filter(|p| !p.is_empty());
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

#[async_trait]
impl SchemaStore for SqliteEngine {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_sql_parts() {
        let (keys, predicate) =
            index_parts("CREATE INDEX \"a(b\" ON t (lower(title) DESC, \"x,y\", substr(b, 1, 2) COLLATE nocase) WHERE a > ')'").unwrap();
        assert_eq!(keys, ["lower(title) DESC", "\"x,y\"", "substr(b, 1, 2) COLLATE nocase"]);
        assert_eq!(predicate.as_deref(), Some("a > ')'"));
        assert_eq!(index_parts("CREATE UNIQUE INDEX i ON t(a)").unwrap(), (vec!["a".to_string()], None));
        assert_eq!(index_parts("CREATE INDEX i ON t"), None);
        assert_eq!(expression_key("lower(title) DESC"), "lower(title)");
        assert_eq!(expression_key("substr(b, 1, 2) COLLATE nocase asc"), "substr(b, 1, 2)");
        assert_eq!(expression_key("a+b"), "a+b");
    }
}
