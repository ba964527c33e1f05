//! Schema inspection and the stored snapshots (drift detection, schema
//! contracts).
//!
//! [`SchemaStore::inspect`] reads `information_schema` with six queries, one
//! per table (`TABLES`, `COLUMNS`, `STATISTICS`, `KEY_COLUMN_USAGE`,
//! `REFERENTIAL_CONSTRAINTS`, `CHECK_CONSTRAINTS`), each filtered by the
//! database and joined in Rust: MariaDB fills every `information_schema` table
//! of a join by opening each table of the schema, so joins there cost seconds
//! on 1,000 tables where six single-table queries cost about 100 ms.
//!
//! A schema contract cannot roll MySQL's DDL back: the core inspects after the
//! migration's finish and records a violating migration `failed`.

use std::collections::{BTreeMap, HashMap, HashSet};

use async_trait::async_trait;
use chrono::Utc;
use kiln_core::engine::SchemaStore;
use kiln_core::schema::{ColumnInfo, ConstraintInfo, IndexInfo, Snapshot};
use kiln_core::EngineError;
use sqlx::{AssertSqlSafe, Row};

use super::{error_number, MysqlEngine};

/// What the `information_schema` of the server offers beyond the common core.
#[derive(Clone, Copy, Debug)]
pub(super) struct Server {
    mariadb: bool,
    /// `STATISTICS.IGNORED` (MariaDB 10.6+) or `IS_VISIBLE`/`EXPRESSION` (MySQL 8.0.13+).
    hidden_indexes: bool,
    /// `CHECK_CONSTRAINTS` (MariaDB 10.2.22+, MySQL 8.0.16+).
    checks: bool,
}

impl Server {
    /// From `SELECT VERSION()`: `10.11.6-MariaDB-0+deb12u1`, `8.0.36`.
    fn from_version(v: &str) -> Server {
        let mut numbers = v.split(|c: char| !c.is_ascii_digit()).filter(|p| !p.is_empty()).map(|p| p.parse::<u32>().unwrap_or(0));
        let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
        if v.to_ascii_lowercase().contains("mariadb") {
            Server { mariadb: true, hidden_indexes: version >= (10, 6, 0), checks: version >= (10, 2, 22) }
        } else {
            Server { mariadb: false, hidden_indexes: version >= (8, 0, 13), checks: version >= (8, 0, 16) }
        }
    }
}

/// Every table and view of the database; [`is_table`] keeps the tables.
const INSPECT_TABLES: &str = "SELECT TABLE_NAME, TABLE_TYPE FROM information_schema.TABLES WHERE TABLE_SCHEMA = ?";

/// Every column (of views too: filtered by the table list, because an
/// `information_schema` join costs a scan per row on MariaDB).
const INSPECT_COLUMNS: &str = "SELECT TABLE_NAME, COLUMN_NAME, COLUMN_TYPE, IS_NULLABLE FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ?";

/// Foreign key columns in key order, with the referenced table and column.
const INSPECT_FOREIGN_KEYS: &str =
    "SELECT TABLE_NAME, CONSTRAINT_NAME, COLUMN_NAME, REFERENCED_TABLE_SCHEMA, REFERENCED_TABLE_NAME, REFERENCED_COLUMN_NAME \
    FROM information_schema.KEY_COLUMN_USAGE WHERE TABLE_SCHEMA = ? AND REFERENCED_TABLE_NAME IS NOT NULL \
    ORDER BY TABLE_NAME, CONSTRAINT_NAME, ORDINAL_POSITION";

/// `ON UPDATE` / `ON DELETE` of every foreign key.
const INSPECT_FOREIGN_KEY_RULES: &str =
    "SELECT TABLE_NAME, CONSTRAINT_NAME, UPDATE_RULE, DELETE_RULE FROM information_schema.REFERENTIAL_CONSTRAINTS WHERE CONSTRAINT_SCHEMA = ?";

/// `information_schema.STATISTICS`: one row per key part of every index, in key
/// order. The last two columns — whether the index is hidden from the
/// optimizer, and a functional key part's expression — are spelled
/// differently by each server (or missing), see [`Server`].
fn inspect_indexes_sql(server: Server) -> String {
    let extra = match (server.mariadb, server.hidden_indexes) {
        (true, true) => "CAST(IGNORED = 'YES' AS SIGNED), NULL",
        (false, true) => "CAST(IS_VISIBLE = 'NO' AS SIGNED), EXPRESSION",
        (_, false) => "0, NULL",
    };
    format!(
        "SELECT TABLE_NAME, INDEX_NAME, CAST(NON_UNIQUE AS SIGNED), COLUMN_NAME, COLLATION, CAST(SUB_PART AS SIGNED), INDEX_TYPE, {extra} \
         FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = ? ORDER BY TABLE_NAME, INDEX_NAME, SEQ_IN_INDEX"
    )
}

/// Check constraints: table, name, clause, the column a column-level check
/// belongs to (MariaDB names those after their column), and `ENFORCED`
/// (MySQL only; MariaDB always enforces them). MariaDB's `CHECK_CONSTRAINTS`
/// names the table itself; MySQL's does not, so it is joined with
/// `TABLE_CONSTRAINTS` there (MySQL 8's `information_schema` is a set of views
/// over the data dictionary, where a join is cheap).
fn inspect_checks_sql(server: Server) -> &'static str {
    if server.mariadb {
        "SELECT TABLE_NAME, CONSTRAINT_NAME, CHECK_CLAUSE, CASE WHEN LEVEL = 'Column' THEN CONSTRAINT_NAME END, 'YES' \
         FROM information_schema.CHECK_CONSTRAINTS WHERE CONSTRAINT_SCHEMA = ?"
    } else {
        "SELECT tc.TABLE_NAME, tc.CONSTRAINT_NAME, cc.CHECK_CLAUSE, NULL, tc.ENFORCED \
         FROM information_schema.TABLE_CONSTRAINTS tc JOIN information_schema.CHECK_CONSTRAINTS cc \
         ON cc.CONSTRAINT_SCHEMA = tc.CONSTRAINT_SCHEMA AND cc.CONSTRAINT_NAME = tc.CONSTRAINT_NAME \
         WHERE tc.TABLE_SCHEMA = ? AND tc.CONSTRAINT_TYPE = 'CHECK'"
    }
}

/// Base tables, including MariaDB's system-versioned ones; not views, not
/// sequences (MariaDB lists those as tables of their own type).
fn is_table(table_type: &str) -> bool {
    matches!(table_type, "BASE TABLE" | "SYSTEM VERSIONED")
}

/// `COLUMN_TYPE`, lower-cased, with the display width of integer types
/// dropped as MySQL 8.0.19+ reports them (`int(11) unsigned` → `int
/// unsigned`), so MariaDB and MySQL describe the same column alike. The
/// width stays where it means something: `tinyint(1)` (a boolean, by
/// convention) and `zerofill` columns.
fn column_type(t: &str) -> String {
    let t = t.trim().to_lowercase();
    let Some(open) = t.find('(') else { return t };
    let base = &t[..open];
    let integer = matches!(base, "tinyint" | "smallint" | "mediumint" | "int" | "integer" | "bigint" | "year");
    if !integer || t.starts_with("tinyint(1)") || t.contains("zerofill") {
        return t;
    }
    match t[open..].find(')') {
        Some(close) => format!("{base}{}", &t[open + close + 1..]),
        None => t,
    }
}

/// One foreign key as `KEY_COLUMN_USAGE` returns it, its columns gathered in key order.
#[derive(Default)]
struct ForeignKey {
    columns: Vec<String>,
    /// `table`, or `database.table` for a table of another database.
    ref_table: String,
    ref_columns: Vec<String>,
}

/// One index as `STATISTICS` returns it, its key parts gathered.
struct IndexRow {
    table: String,
    name: String,
    unique: bool,
    index_type: String,
    hidden: bool,
    /// Column (or a functional key part's expression), ascending, prefix length.
    keys: Vec<(String, bool, Option<i64>)>,
}

impl IndexRow {
    fn columns(&self) -> Vec<String> {
        self.keys.iter().map(|(c, _, _)| c.clone()).collect()
    }

    /// What else makes two indexes on the same columns differ, normalised text
    /// in the PostgreSQL engine's words: the index type when not B-tree,
    /// descending and prefix key parts, an index hidden from the optimizer.
    fn options(&self) -> Option<String> {
        let mut options = Vec::new();
        if !self.index_type.eq_ignore_ascii_case("btree") {
            options.push(format!("using {}", self.index_type.to_lowercase()));
        }
        if self.keys.iter().any(|(_, asc, prefix)| !asc || prefix.is_some()) {
            let keys: Vec<String> = self
                .keys
                .iter()
                .map(|(c, asc, prefix)| {
                    let mut key = c.clone();
                    if let Some(n) = prefix {
                        key.push_str(&format!("({n})"));
                    }
                    if !asc {
                        key.push_str(" desc");
                    }
                    key
                })
                .collect();
            options.push(format!("keys ({})", keys.join(", ")));
        }
        if self.hidden {
            options.push("invisible".into());
        }
        (!options.is_empty()).then(|| options.join(" "))
    }
}

/// A text column of `information_schema`. Decoded without sqlx's type check:
/// some servers give a few of these columns a binary collation
/// (`utf8mb3_bin`…), which sqlx would refuse as not text.
fn text(r: &sqlx::mysql::MySqlRow, i: usize) -> Result<Option<String>, sqlx::Error> {
    r.try_get_unchecked::<Option<String>, _>(i)
}

/// [`text`] for a column that is never NULL.
pub(super) fn text1(r: &sqlx::mysql::MySqlRow, i: usize) -> Result<String, sqlx::Error> {
    Ok(text(r, i)?.unwrap_or_default())
}

impl MysqlEngine {
    /// The server's `information_schema` dialect, asked once.
    async fn server(&mut self) -> Result<Server, EngineError> {
        if let Some(s) = self.server {
            return Ok(s);
        }
        let version: String = match sqlx::query("SELECT VERSION()").fetch_one(&mut self.conn).await.and_then(|r| text1(&r, 0)) {
            Ok(v) => v,
            Err(e) => return Err(self.err("asking the server's version", e)),
        };
        let server = Server::from_version(&version);
        self.server = Some(server);
        Ok(server)
    }

    /// The live schema (see [`SchemaStore::inspect`]). Runs in whatever state
    /// the session is in — inside the open transaction of a body whose finish
    /// the core keeps, too, which it neither commits nor ends.
    async fn inspect_schema(&mut self) -> Result<Snapshot, EngineError> {
        let server = self.server().await?;
        let context = format!("inspecting the schema of the database {}", self.database);
        let db = self.database.clone();
        let mut snapshot = Snapshot::default();

        let r: Result<(), sqlx::Error> = async {
            let mut tables: HashSet<String> = HashSet::new();
            for r in sqlx::query(INSPECT_TABLES).bind(&db).fetch_all(&mut self.conn).await? {
                let name = text1(&r, 0)?;
                if is_table(&text1(&r, 1)?) && !self.own_tables.contains(&name) {
                    tables.insert(name);
                }
            }
            for t in &tables {
                snapshot.objects.insert(t.clone(), Default::default());
            }
            for r in sqlx::query(INSPECT_COLUMNS).bind(&db).fetch_all(&mut self.conn).await? {
                let table = text1(&r, 0)?;
                let Some(object) = snapshot.objects.get_mut(&table) else { continue };
                let nullable = text1(&r, 3)? == "YES";
                object.columns.insert(text1(&r, 1)?, ColumnInfo { data_type: column_type(&text1(&r, 2)?), nullable });
            }

            let mut indexes: Vec<IndexRow> = Vec::new();
            for r in sqlx::query(AssertSqlSafe(inspect_indexes_sql(server))).bind(&db).fetch_all(&mut self.conn).await? {
                let table = text1(&r, 0)?;
                if !tables.contains(&table) {
                    continue;
                }
                let name = text1(&r, 1)?;
                let column = match text(&r, 3)? {
                    Some(c) => c,
                    None => text(&r, 8)?.unwrap_or_else(|| "?".into()),
                };
                let key = (column, text(&r, 4)?.as_deref() != Some("D"), r.try_get::<Option<i64>, _>(5)?);
                match indexes.last_mut() {
                    Some(last) if last.table == table && last.name == name => last.keys.push(key),
                    _ => indexes.push(IndexRow {
                        table,
                        name,
                        unique: r.try_get::<i64, _>(2)? == 0,
                        index_type: text1(&r, 6)?,
                        hidden: r.try_get::<i64, _>(7)? != 0,
                        keys: vec![key],
                    }),
                }
            }
            for i in indexes {
                let Some(object) = snapshot.objects.get_mut(&i.table) else { continue };
                if i.unique {
                    // Every unique index is a unique constraint to MySQL (TABLE_CONSTRAINTS
                    // lists it; DROP INDEX and DROP CONSTRAINT both remove it): reported once,
                    // as the constraint, like the PostgreSQL engine does.
                    let kind = if i.name == "PRIMARY" { "primary key" } else { "unique" };
                    object.constraints.insert(i.name.clone(), ConstraintInfo { kind: kind.into(), columns: i.columns(), definition: i.options() });
                } else {
                    let (columns, options) = (i.columns(), i.options());
                    object.indexes.insert(i.name, IndexInfo { columns, unique: false, options });
                }
            }

            let mut rules: HashMap<(String, String), (String, String)> = HashMap::new();
            for r in sqlx::query(INSPECT_FOREIGN_KEY_RULES).bind(&db).fetch_all(&mut self.conn).await? {
                rules.insert((text1(&r, 0)?, text1(&r, 1)?), (text1(&r, 2)?.to_lowercase(), text1(&r, 3)?.to_lowercase()));
            }
            let mut fks: BTreeMap<(String, String), ForeignKey> = BTreeMap::new();
            for r in sqlx::query(INSPECT_FOREIGN_KEYS).bind(&db).fetch_all(&mut self.conn).await? {
                let table = text1(&r, 0)?;
                if !tables.contains(&table) {
                    continue;
                }
                let ref_schema = text1(&r, 3)?;
                let ref_table = text1(&r, 4)?;
                let ref_table = if ref_schema == db { ref_table } else { format!("{ref_schema}.{ref_table}") };
                let fk = fks.entry((table, text1(&r, 1)?)).or_insert_with(|| ForeignKey { ref_table, ..Default::default() });
                fk.columns.push(text1(&r, 2)?);
                fk.ref_columns.push(text(&r, 5)?.unwrap_or_else(|| "?".into()));
            }
            for ((table, name), ForeignKey { columns, ref_table, ref_columns }) in fks {
                let (on_update, on_delete) = rules.remove(&(table.clone(), name.clone())).unwrap_or_else(|| ("restrict".into(), "restrict".into()));
                let definition = format!("references {ref_table} ({}) on update {on_update} on delete {on_delete}", ref_columns.join(", "));
                if let Some(object) = snapshot.objects.get_mut(&table) {
                    object.constraints.insert(name, ConstraintInfo { kind: "foreign key".into(), columns, definition: Some(definition) });
                }
            }

            if server.checks {
                for r in sqlx::query(AssertSqlSafe(inspect_checks_sql(server))).bind(&db).fetch_all(&mut self.conn).await? {
                    let Some(object) = snapshot.objects.get_mut(&text1(&r, 0)?) else { continue };
                    let mut definition = format!("CHECK ({})", text1(&r, 2)?);
                    if text(&r, 4)?.as_deref() == Some("NO") {
                        definition.push_str(" NOT ENFORCED");
                    }
                    let columns = text(&r, 3)?.into_iter().collect();
                    object.constraints.insert(text1(&r, 1)?, ConstraintInfo { kind: "check".into(), columns, definition: Some(definition) });
                }
            }
            Ok(())
        }
        .await;
        r.map_err(|e| self.err(context, e))?;
        Ok(snapshot)
    }
}

#[async_trait]
impl SchemaStore for MysqlEngine {
    /// Every base table of the database (not views or sequences, not kiln's
    /// own): columns (`COLUMN_TYPE` lower-cased, integer display widths
    /// dropped), plain indexes, and primary key (named `PRIMARY`), unique,
    /// foreign key and check constraints. Every unique index is reported as a
    /// unique constraint, once. InnoDB's automatic index for a foreign key is
    /// a plain index. Six queries, whatever the number of tables.
    async fn inspect(&mut self) -> Result<Snapshot, EngineError> {
        self.settle_lock().await?;
        self.inspect_schema().await
    }

    /// Appends a row to the snapshot table (created here when a database from
    /// before snapshots lacks it); earlier snapshots are kept as history. The
    /// row joins the open transaction of a body whose finish the core keeps,
    /// when there is one, and commits with that finish; otherwise it commits
    /// on its own.
    async fn save_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), EngineError> {
        self.settle_lock().await?;
        let context = format!("writing the schema snapshot to {}", self.snapshot_name);
        let json = serde_json::to_string(snapshot).map_err(|e| EngineError::Query { context: context.clone(), message: e.to_string() })?;
        for attempt in 0..2 {
            let r =
                sqlx::query(AssertSqlSafe(self.sql.insert_snapshot.clone())).bind(Utc::now().naive_utc()).bind(&json).execute(&mut self.conn).await;
            match r {
                Ok(_) => return Ok(()),
                Err(e) if attempt == 0 && error_number(&e) == Some(1146) => {
                    // CREATE TABLE commits implicitly, and with it an open body's DML
                    // whose finish the core still keeps: that migration stays
                    // `running` until the finish commits, which is safe.
                    self.in_tx = false;
                    if let Err(e) = sqlx::raw_sql(AssertSqlSafe(self.sql.create_snapshot.clone())).execute(&mut self.conn).await {
                        return Err(self.err(format!("creating the snapshot table {}", self.snapshot_name), e));
                    }
                }
                Err(e) => return Err(self.err(context, e)),
            }
        }
        Ok(())
    }

    /// The newest stored snapshot; `None` when there is none or no snapshot
    /// table at all. Creates nothing.
    async fn load_snapshot(&mut self) -> Result<Option<Snapshot>, EngineError> {
        self.settle_lock().await?;
        let context = format!("reading the schema snapshot from {}", self.snapshot_name);
        // A missing table is an answer too; asking first would cost a round trip.
        let row = match sqlx::query(AssertSqlSafe(self.sql.select_snapshot.clone())).fetch_optional(&mut self.conn).await {
            Ok(row) => row,
            Err(e) if error_number(&e) == Some(1146) => return Ok(None),
            Err(e) => return Err(self.err(context, e)),
        };
        let Some(row) = row else { return Ok(None) };
        let text: String = row.try_get(0).map_err(|e| self.err(&context, e))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| EngineError::Query { context, message: format!("the stored snapshot is not a kiln snapshot: {e}") })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_types_read_alike_on_mariadb_and_mysql() {
        assert_eq!(column_type("bigint(20)"), "bigint");
        assert_eq!(column_type("int(10) unsigned"), "int unsigned");
        assert_eq!(column_type("INT"), "int");
        assert_eq!(column_type("tinyint(1)"), "tinyint(1)");
        assert_eq!(column_type("int(5) unsigned zerofill"), "int(5) unsigned zerofill");
        assert_eq!(column_type("varchar(200)"), "varchar(200)");
        assert_eq!(column_type("decimal(12,2)"), "decimal(12,2)");
        assert_eq!(column_type("year(4)"), "year");
        assert_eq!(column_type("enum('a','b')"), "enum('a','b')");
    }

    #[test]
    fn servers() {
        let m = Server::from_version("10.11.6-MariaDB-0+deb12u1");
        assert!(m.mariadb && m.hidden_indexes && m.checks);
        let m = Server::from_version("10.5.2-MariaDB");
        assert!(m.mariadb && !m.hidden_indexes && m.checks);
        let m = Server::from_version("8.0.36");
        assert!(!m.mariadb && m.hidden_indexes && m.checks);
        let m = Server::from_version("8.0.12-log");
        assert!(!m.mariadb && !m.hidden_indexes && !m.checks);
    }
}
