//! Schema inspection (drift detection, schema contracts) and the stored
//! snapshots: three catalog queries in one pipeline, whatever the number of
//! tables.

use std::collections::HashMap;

use async_trait::async_trait;
use kiln_core::engine::SchemaStore;
use kiln_core::schema::{ColumnInfo, ConstraintInfo, IndexInfo, Snapshot};
use kiln_core::EngineError;
use tokio_postgres::types::{ToSql, Type};

use super::PgBackend;
use crate::common::quote_double;

#[async_trait]
impl SchemaStore for PgBackend {
    /// Every table of the schema — the configured `schema`, else the session's
    /// current schema at connect — except kiln's own and those an extension
    /// owns: columns (`format_type`, lower-cased), indexes, and primary key,
    /// unique, foreign key, check and exclusion constraints. One pipelined
    /// round trip of three catalog queries, whatever the number of tables.
    async fn inspect(&mut self) -> Result<Snapshot, EngineError> {
        self.inspect_in(false).await
    }

    /// Appends a row to the snapshot table (created here when a database from
    /// before snapshots lacks it); earlier snapshots are kept as history.
    async fn save_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), EngineError> {
        let context = format!("writing the schema snapshot to {}", self.snapshot_table);
        let json = serde_json::to_string(snapshot).map_err(|e| EngineError::Query { context: context.clone(), message: e.to_string() })?;
        let sql = format!("INSERT INTO {} (taken_at, snapshot) VALUES (clock_timestamp(), $1)", self.snapshot_table);
        for attempt in 0..2 {
            match self.client.execute_typed(&sql, &[(&json, Type::TEXT)]).await {
                Ok(_) => return Ok(()),
                Err(e) if attempt == 0 && e.as_db_error().is_some_and(|d| d.code().code() == "42P01") => self.create_snapshot_table().await?,
                Err(e) => return Err(self.engine_error(&context, &e)),
            }
        }
        Ok(())
    }

    /// The newest stored snapshot; `None` when there is none or no snapshot
    /// table (or schema) at all. Creates nothing.
    async fn load_snapshot(&mut self) -> Result<Option<Snapshot>, EngineError> {
        let context = format!("reading the schema snapshot from {}", self.snapshot_table);
        let sql = format!("SELECT snapshot FROM {} ORDER BY id DESC LIMIT 1", self.snapshot_table);
        // Asking first whether the table exists would cost a round trip on
        // every `kiln check`; a missing table or schema is an answer too.
        let row = match self.client.query_typed_opt(&sql, &[]).await {
            Ok(row) => row,
            Err(e) if e.as_db_error().is_some_and(|d| matches!(d.code().code(), "42P01" | "3F000")) => return Ok(None),
            Err(e) => return Err(self.engine_error(&context, &e)),
        };
        let Some(row) = row else { return Ok(None) };
        let text: String = row.try_get(0).map_err(|e| self.engine_error(&context, &e))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| EngineError::Query { context, message: format!("the stored snapshot is not a kiln snapshot: {e}") })
    }
}

impl PgBackend {
    /// The live schema of `inspect_schema` (see [`SchemaStore::inspect`]).
    ///
    /// Three catalog queries — columns, indexes, constraints — each covering
    /// every table at once, sent as one pipeline: the cost does not grow with a
    /// round trip per table. `in_transaction` says whether a migration's
    /// transaction is open (then its uncommitted DDL is what is seen, and the
    /// transaction is left open for the caller to commit or roll back);
    /// otherwise the queries run in their own read-only repeatable-read
    /// transaction, so they agree with each other.
    ///
    /// The search_path is pinned to the inspected schema for the duration
    /// (`SET LOCAL`): `format_type`, `pg_get_expr` and `pg_get_constraintdef`
    /// qualify names that are not on the search_path, so without it the same
    /// schema would read differently depending on what the session (or the
    /// last migration) set — and `kiln diff` would report drift that is not there.
    pub(super) async fn inspect_in(&self, in_transaction: bool) -> Result<Snapshot, EngineError> {
        let Some(schema) = self.inspect_schema.as_deref() else {
            // No current schema at connect: nothing can have been created "here".
            return Ok(Snapshot::default());
        };
        let context = format!("inspecting the schema {}", quote_double(schema));
        // JIT compilation is off for these catalog reads: on a database with
        // many schemas the planner's estimates crossed `jit_above_cost`, and
        // compiling took longer (100+ ms) than the queries themselves. Through
        // `pg_settings`, so a server without JIT (before 11) is not an error.
        let set_path = format!(
            "SET LOCAL search_path TO {}; SELECT pg_catalog.set_config(name, 'off', true) FROM pg_catalog.pg_settings WHERE name = 'jit'",
            quote_double(schema)
        );
        let prelude = if in_transaction { set_path } else { format!("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; {set_path}") };
        let schema_param = schema.to_string();
        let params: [(&(dyn ToSql + Sync), Type); 2] = [(&schema_param, Type::TEXT), (&self.own_tables, Type::TEXT_ARRAY)];
        let columns_sql = format!("{INSPECT_TABLES} {INSPECT_COLUMNS}");
        let indexes_sql = format!("{INSPECT_TABLES} {INSPECT_INDEXES}");
        let constraints_sql = format!("{INSPECT_TABLES} {INSPECT_CONSTRAINTS}");
        let client = &self.client;
        // `join!` polls in order, and each request goes on the wire at its first
        // poll: one round trip for the whole inspection.
        let (begun, columns, indexes, constraints, ended) = futures::join!(
            client.batch_execute(&prelude),
            client.query_typed(&columns_sql, &params),
            client.query_typed(&indexes_sql, &params),
            client.query_typed(&constraints_sql, &params),
            async {
                if in_transaction {
                    Ok(())
                } else {
                    client.batch_execute("COMMIT").await
                }
            },
        );
        let fail = |e: tokio_postgres::Error| self.engine_error(&context, &e);
        begun.map_err(fail)?;
        let (columns, indexes, constraints) = (columns.map_err(fail)?, indexes.map_err(fail)?, constraints.map_err(fail)?);
        ended.map_err(fail)?;
        let bad_row = |e: tokio_postgres::Error| EngineError::Query { context: context.clone(), message: format!("unexpected catalog row: {e}") };

        let mut snapshot = Snapshot::default();
        // Table oid → name, and (table oid, column number) → column name, to name
        // the columns of constraints.
        let mut table_names: HashMap<u32, String> = HashMap::new();
        let mut column_names: HashMap<(u32, i16), String> = HashMap::new();
        for r in columns {
            let oid: u32 = r.try_get(0).map_err(bad_row)?;
            let table: String = r.try_get(1).map_err(bad_row)?;
            // Every table gets an entry, also one without columns (`CREATE TABLE t ()`).
            let object = snapshot.objects.entry(table.clone()).or_default();
            table_names.insert(oid, table);
            let column: Option<String> = r.try_get(3).map_err(bad_row)?;
            if let Some(column) = column {
                let number: i16 = r.try_get(2).map_err(bad_row)?;
                let data_type: String = r.try_get(4).map_err(bad_row)?;
                let nullable: bool = r.try_get(5).map_err(bad_row)?;
                column_names.insert((oid, number), column.clone());
                object.columns.insert(column, ColumnInfo { data_type, nullable });
            }
        }
        for r in indexes {
            let table: String = r.try_get(0).map_err(bad_row)?;
            let name: String = r.try_get(1).map_err(bad_row)?;
            let row = IndexRow {
                unique: r.try_get(2).map_err(bad_row)?,
                method: r.try_get(3).map_err(bad_row)?,
                keys: r.try_get(4).map_err(bad_row)?,
                decorations: r.try_get(5).map_err(bad_row)?,
                include: r.try_get(6).map_err(bad_row)?,
                nulls_not_distinct: r.try_get(7).map_err(bad_row)?,
                predicate: r.try_get(8).map_err(bad_row)?,
                valid: r.try_get(9).map_err(bad_row)?,
            };
            snapshot.objects.entry(table).or_default().indexes.insert(name, row.into_info());
        }
        for r in constraints {
            let table: String = r.try_get(0).map_err(bad_row)?;
            let name: String = r.try_get(1).map_err(bad_row)?;
            let oid: u32 = r.try_get(18).map_err(bad_row)?;
            let names = |rel: u32, numbers: &[i16]| -> Vec<String> {
                numbers.iter().map(|n| column_names.get(&(rel, *n)).cloned().unwrap_or_else(|| format!("#{n}"))).collect()
            };
            let conkey: Option<Vec<i16>> = r.try_get(3).map_err(bad_row)?;
            let ref_oid: u32 = r.try_get(4).map_err(bad_row)?;
            let confkey: Option<Vec<i16>> = r.try_get(5).map_err(bad_row)?;
            let index_key: Option<Vec<i16>> = r.try_get(13).map_err(bad_row)?;
            let index_key_count: Option<i16> = r.try_get(14).map_err(bad_row)?;
            let foreign_table: Option<String> = r.try_get(16).map_err(bad_row)?;
            let foreign_columns: Option<Vec<String>> = r.try_get(17).map_err(bad_row)?;
            let include = match (index_key, index_key_count) {
                (Some(k), Some(n)) => names(oid, k.get(n.max(0) as usize..).unwrap_or(&[])),
                _ => Vec::new(),
            };
            let (ref_table, ref_columns) = match foreign_table {
                Some(t) => (Some(t), foreign_columns.unwrap_or_default()),
                None => (table_names.get(&ref_oid).cloned(), names(ref_oid, confkey.as_deref().unwrap_or(&[]))),
            };
            let row = ConstraintRow {
                kind: r.try_get(2).map_err(bad_row)?,
                columns: names(oid, conkey.as_deref().unwrap_or(&[])),
                ref_table,
                ref_columns,
                on_update: r.try_get(6).map_err(bad_row)?,
                on_delete: r.try_get(7).map_err(bad_row)?,
                match_type: r.try_get(8).map_err(bad_row)?,
                deferrable: r.try_get(9).map_err(bad_row)?,
                deferred: r.try_get(10).map_err(bad_row)?,
                validated: r.try_get(11).map_err(bad_row)?,
                definition: r.try_get(12).map_err(bad_row)?,
                include,
                nulls_not_distinct: r.try_get(15).map_err(bad_row)?,
            };
            if let Some(info) = row.into_info() {
                snapshot.objects.entry(table).or_default().constraints.insert(name, info);
            }
        }
        Ok(snapshot)
    }

    /// `CREATE TABLE` for the snapshot table, tolerating a concurrent creator.
    pub(super) async fn create_snapshot_table(&self) -> Result<(), EngineError> {
        let ddl = format!("CREATE TABLE IF NOT EXISTS {} ({SNAPSHOT_COLUMNS})", self.snapshot_table);
        match self.client.batch_execute(&ddl).await {
            // Two sessions creating it at once: the loser sees a catalog unique violation; it exists now.
            Err(e) if !e.as_db_error().is_some_and(|d| matches!(d.code().code(), "23505" | "42P07")) => {
                Err(self.engine_error(&format!("creating the snapshot table {}", self.snapshot_table), &e))
            }
            _ => Ok(()),
        }
    }
}

/// Columns of the snapshot table: one row per stored snapshot, the newest is
/// the reference for drift; older rows are the schema's history.
pub(super) const SNAPSHOT_COLUMNS: &str = "id BIGSERIAL PRIMARY KEY, taken_at TIMESTAMPTZ NOT NULL, snapshot TEXT NOT NULL";

/// The tables [`SchemaStore::inspect`] reports, as a CTE the three catalog queries
/// share (`$1` the schema, `$2` kiln's own table names): ordinary and
/// partitioned tables (partitions included: they are tables a migration
/// made), not views or foreign tables; not kiln's own; and not tables an
/// extension owns (`CREATE EXTENSION postgis` brings `spatial_ref_sys`, which
/// `ALTER EXTENSION … UPDATE` may change — that is not drift of the schema).
///
/// The schema's relations are found through their dependency on the schema
/// (`pg_depend`, indexed by the object depended on), not by filtering
/// `pg_class` on `relnamespace`, which has no index: that was a scan of every
/// relation of the database, three times per inspection, and made the cost
/// of inspecting one tenant's schema grow with the number of tenant schemas
/// (issue #10). `relnamespace` is still checked on the rows found. The
/// schema name is compared as a `name`, so `pg_namespace` is read by its
/// index too.
const INSPECT_TABLES: &str = "WITH t AS (\
    SELECT c.oid, c.relname::text AS name FROM pg_catalog.pg_class c \
    WHERE c.oid IN (SELECT d.objid FROM pg_catalog.pg_depend d \
        WHERE d.refclassid = 'pg_catalog.pg_namespace'::regclass AND d.refobjsubid = 0 AND d.classid = 'pg_catalog.pg_class'::regclass \
        AND d.refobjid = (SELECT n.oid FROM pg_catalog.pg_namespace n WHERE n.nspname = $1::name)) \
    AND c.relnamespace = (SELECT n.oid FROM pg_catalog.pg_namespace n WHERE n.nspname = $1::name) \
    AND c.relkind IN ('r', 'p') AND c.relname::text <> ALL ($2::text[]) \
    AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d \
        WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e'))";

/// One row per column, and one with NULLs for a table without columns. The
/// table's oid and the column's number let constraints be resolved to column
/// names here instead of by a sub-query per constraint on the server.
const INSPECT_COLUMNS: &str =
    "SELECT t.oid, t.name, a.attnum, a.attname::text, lower(pg_catalog.format_type(a.atttypid, a.atttypmod)), NOT a.attnotnull \
    FROM t LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = t.oid AND a.attnum > 0 AND NOT a.attisdropped";

/// One row per index that backs no constraint.
///
/// Indexes behind a primary key, unique or exclusion constraint are reported
/// as the constraint only. The constraint is what the schema declares (`UNIQUE`
/// in `CREATE TABLE`, `ADD CONSTRAINT`): it is dropped with `DROP CONSTRAINT`
/// (`DROP INDEX` on it fails), foreign keys depend on it, and listing both
/// would show one change twice in `kiln diff`. A contract loses nothing:
/// `unique:` and `indexes:` are satisfied by a matching constraint as well as
/// by an index, by name or by columns. A `CREATE UNIQUE INDEX` without a
/// constraint stays an index with `unique: true`.
///
/// Key columns are the column names, or the expression text; ordering,
/// non-default operator classes, `INCLUDE` columns, `NULLS NOT DISTINCT`, the
/// access method when not btree, a partial predicate and an invalid index (a
/// failed `CREATE INDEX CONCURRENTLY`) go to `options`. `indnullsnotdistinct`
/// is read through `to_jsonb` so the query also runs on servers before 15
/// (only for unique indexes, where it means something: `to_jsonb` of a whole
/// `pg_index` row is not free).
const INSPECT_INDEXES: &str = "SELECT t.name, ic.relname::text, ix.indisunique, am.amname::text, \
    ARRAY(SELECT coalesce(CASE WHEN ix.indkey[k - 1] = 0 THEN pg_catalog.pg_get_indexdef(ix.indexrelid, k, true) \
            ELSE (SELECT a.attname::text FROM pg_catalog.pg_attribute a WHERE a.attrelid = ix.indrelid AND a.attnum = ix.indkey[k - 1]) END, '') \
        FROM generate_series(1, ix.indnkeyatts) k ORDER BY k), \
    ARRAY(SELECT concat_ws(' ', CASE WHEN o.opcdefault THEN NULL ELSE o.opcname::text END, \
            CASE ix.indoption[k - 1] & 3 WHEN 1 THEN 'desc nulls last' WHEN 2 THEN 'nulls first' WHEN 3 THEN 'desc' END) \
        FROM generate_series(1, ix.indnkeyatts) k LEFT JOIN pg_catalog.pg_opclass o ON o.oid = ix.indclass[k - 1] ORDER BY k), \
    ARRAY(SELECT a.attname::text FROM generate_series(ix.indnkeyatts + 1, ix.indnatts) k \
        JOIN pg_catalog.pg_attribute a ON a.attrelid = ix.indrelid AND a.attnum = ix.indkey[k - 1] ORDER BY k), \
    CASE WHEN ix.indisunique THEN coalesce((to_jsonb(ix) ->> 'indnullsnotdistinct')::boolean, false) ELSE false END, \
    pg_catalog.pg_get_expr(ix.indpred, ix.indrelid, true), \
    ix.indisvalid \
    FROM t JOIN pg_catalog.pg_index ix ON ix.indrelid = t.oid \
    JOIN pg_catalog.pg_class ic ON ic.oid = ix.indexrelid \
    JOIN pg_catalog.pg_am am ON am.oid = ic.relam \
    WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint con \
        WHERE con.conindid = ix.indexrelid AND con.conrelid = ix.indrelid AND con.contype IN ('p', 'u', 'x'))";

/// One row per primary key, unique, foreign key, check and exclusion
/// constraint (not the NOT NULL constraints of PostgreSQL 18: nullability is
/// on the column). Columns come as numbers (`conkey`, `confkey`, the backing
/// index's `indkey` for `INCLUDE` columns), named from [`INSPECT_COLUMNS`]'s
/// rows: a sub-query per constraint for the names doubled the time of this
/// query on 1,000 tables. Only a foreign key to a table outside the inspected
/// ones (another schema) gets that table's name and columns from the server.
/// Only checks and exclusions are deparsed (`pg_get_constraintdef`); the other
/// kinds are described from the catalog columns.
const INSPECT_CONSTRAINTS: &str = "SELECT t.name, con.conname::text, con.contype::text, con.conkey, con.confrelid, con.confkey, \
    con.confupdtype::text, con.confdeltype::text, con.confmatchtype::text, con.condeferrable, con.condeferred, con.convalidated, \
    CASE WHEN con.contype IN ('c', 'x') THEN pg_catalog.pg_get_constraintdef(con.oid, true) END, \
    i.indkey::int2[], i.indnkeyatts, CASE WHEN con.contype = 'u' THEN coalesce((to_jsonb(i) ->> 'indnullsnotdistinct')::boolean, false) ELSE false END, \
    CASE WHEN con.contype = 'f' AND con.confrelid NOT IN (SELECT oid FROM t) THEN \
        (SELECT CASE WHEN rn.nspname::text = $1 THEN rc.relname::text ELSE rn.nspname::text || '.' || rc.relname::text END \
            FROM pg_catalog.pg_class rc JOIN pg_catalog.pg_namespace rn ON rn.oid = rc.relnamespace WHERE rc.oid = con.confrelid) END, \
    CASE WHEN con.contype = 'f' AND con.confrelid NOT IN (SELECT oid FROM t) THEN \
        ARRAY(SELECT a.attname::text FROM unnest(con.confkey) WITH ORDINALITY k(num, ord) \
            JOIN pg_catalog.pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.num ORDER BY k.ord) END, \
    con.conrelid \
    FROM t JOIN pg_catalog.pg_constraint con ON con.conrelid = t.oid \
    LEFT JOIN pg_catalog.pg_index i ON i.indexrelid = con.conindid AND con.contype IN ('p', 'u') \
    WHERE con.contype IN ('p', 'u', 'f', 'c', 'x')";

/// An index as [`INSPECT_INDEXES`] returns it.
struct IndexRow {
    unique: bool,
    method: String,
    keys: Vec<String>,
    /// Per key column: operator class and ordering when not the default, or empty.
    decorations: Vec<String>,
    include: Vec<String>,
    nulls_not_distinct: bool,
    predicate: Option<String>,
    valid: bool,
}

impl IndexRow {
    fn into_info(self) -> IndexInfo {
        let mut options = Vec::new();
        if self.method != "btree" {
            options.push(format!("using {}", self.method));
        }
        if self.decorations.iter().any(|d| !d.is_empty()) {
            let keys: Vec<String> =
                self.keys.iter().zip(&self.decorations).map(|(k, d)| if d.is_empty() { k.clone() } else { format!("{k} {d}") }).collect();
            options.push(format!("keys ({})", keys.join(", ")));
        }
        if !self.include.is_empty() {
            options.push(format!("include ({})", self.include.join(", ")));
        }
        if self.nulls_not_distinct {
            options.push("nulls not distinct".into());
        }
        if let Some(p) = self.predicate {
            options.push(format!("where {p}"));
        }
        if !self.valid {
            options.push("invalid".into());
        }
        IndexInfo { columns: self.keys, unique: self.unique, options: (!options.is_empty()).then(|| options.join(" ")) }
    }
}

/// A constraint as [`INSPECT_CONSTRAINTS`] returns it.
struct ConstraintRow {
    kind: String,
    columns: Vec<String>,
    ref_table: Option<String>,
    ref_columns: Vec<String>,
    on_update: String,
    on_delete: String,
    match_type: String,
    deferrable: bool,
    deferred: bool,
    validated: bool,
    /// `pg_get_constraintdef`, for checks and exclusions only: the other kinds
    /// are described from the catalog columns, and deparsing every
    /// constraint would be most of the query's time on a large schema.
    definition: Option<String>,
    include: Vec<String>,
    nulls_not_distinct: bool,
}

impl ConstraintRow {
    /// `None` for a constraint kind the snapshot does not model.
    fn into_info(self) -> Option<ConstraintInfo> {
        let mut extra = Vec::new();
        let kind = match self.kind.as_str() {
            "p" | "u" => {
                if self.nulls_not_distinct {
                    extra.push("nulls not distinct".to_string());
                }
                if !self.include.is_empty() {
                    extra.push(format!("include ({})", self.include.join(", ")));
                }
                if self.kind == "p" {
                    "primary key"
                } else {
                    "unique"
                }
            }
            "f" => {
                extra.push(format!(
                    "references {} ({}) on update {} on delete {}",
                    self.ref_table.as_deref().unwrap_or("?"),
                    self.ref_columns.join(", "),
                    fk_action(&self.on_update),
                    fk_action(&self.on_delete)
                ));
                match self.match_type.as_str() {
                    "f" => extra.push("match full".into()),
                    "p" => extra.push("match partial".into()),
                    _ => {}
                }
                "foreign key"
            }
            // The server's own text says it all (NOT VALID, NO INHERIT, DEFERRABLE included).
            "c" => return Some(ConstraintInfo { kind: "check".into(), columns: self.columns, definition: self.definition }),
            "x" => return Some(ConstraintInfo { kind: "exclude".into(), columns: self.columns, definition: self.definition }),
            _ => return None,
        };
        match (self.deferrable, self.deferred) {
            (true, true) => extra.push("deferrable initially deferred".into()),
            (true, false) => extra.push("deferrable".into()),
            _ => {}
        }
        if !self.validated {
            extra.push("not valid".into());
        }
        Some(ConstraintInfo { kind: kind.into(), columns: self.columns, definition: (!extra.is_empty()).then(|| extra.join(" ")) })
    }
}

/// `pg_constraint.confupdtype` / `confdeltype` in words.
fn fk_action(code: &str) -> &'static str {
    match code {
        "r" => "restrict",
        "c" => "cascade",
        "n" => "set null",
        "d" => "set default",
        _ => "no action",
    }
}
