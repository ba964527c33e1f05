//! Schema contracts: the live schema as data ([`Snapshot`]), the expected schema
//! (`schema.yaml`, [`Contract`]), validation of one against the other, and the
//! difference between two snapshots (drift, `kiln verify`).
//!
//! The design decision to know: one normalised model serves SQL tables and
//! MongoDB collections alike, so validation, drift and verify are written once.
//! Engines only produce a [`Snapshot`]; everything else here is pure.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The live schema of a database: tables (SQL) or collections (MongoDB), by name.
/// kiln's own tables are never part of it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Tables or collections.
    pub objects: BTreeMap<String, ObjectInfo>,
}

/// One table or collection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectInfo {
    /// Columns by name (SQL). Empty for collections.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub columns: BTreeMap<String, ColumnInfo>,
    /// Indexes by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub indexes: BTreeMap<String, IndexInfo>,
    /// Constraints by name: primary key, unique, foreign key, check (SQL).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub constraints: BTreeMap<String, ConstraintInfo>,
    /// The `$jsonSchema` validator (MongoDB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validator: Option<ValidatorInfo>,
}

/// A column.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnInfo {
    /// The type as the database reports it, lower-case (`bigint`, `character varying(255)`).
    #[serde(rename = "type")]
    pub data_type: String,
    /// Accepts NULL.
    pub nullable: bool,
}

/// An index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexInfo {
    /// Key columns in order (MongoDB: `field` or `field:-1` for descending, `field:text`…).
    pub columns: Vec<String>,
    /// Unique index.
    pub unique: bool,
    /// Other options that make two indexes differ (partial filter, TTL, sparse…), normalised text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<String>,
}

/// A table constraint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConstraintInfo {
    /// `primary key`, `unique`, `foreign key`, `check`.
    pub kind: String,
    /// Columns involved, in order.
    pub columns: Vec<String>,
    /// Extra definition (referenced table, check expression), normalised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub definition: Option<String>,
}

/// A MongoDB `$jsonSchema` validator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidatorInfo {
    /// Top-level `required` fields.
    pub required: Vec<String>,
    /// The whole validator as canonical JSON text.
    pub json: String,
}

// ---------------------------------------------------------------- contract

/// The expected schema, as written in `schema.yaml`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Contract {
    /// SQL tables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tables: BTreeMap<String, TableContract>,
    /// MongoDB collections.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub collections: BTreeMap<String, CollectionContract>,
}

/// Expectations for one table.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableContract {
    /// Columns that must exist.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required: Vec<ColumnSpec>,
    /// Columns that may be missing (a warning), but must match when present.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub optional: Vec<ColumnSpec>,
    /// Indexes that must exist: by name, or by columns (and uniqueness).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub indexes: Vec<IndexSpec>,
    /// Unique constraints (or unique indexes) that must exist: by name or by columns.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unique: Vec<IndexSpec>,
}

/// Expectations for one collection.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectionContract {
    /// Fields the `$jsonSchema` validator must require.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required: Vec<String>,
    /// Indexes that must exist: by name, or by keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub indexes: Vec<IndexSpec>,
}

/// A column: a bare name, or a name with type and nullability.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ColumnSpec {
    /// Just the name.
    Name(String),
    /// Name with optional type and nullability.
    Full {
        /// Column name.
        name: String,
        /// Expected type (compared after normalising synonyms: `int8` = `bigint`).
        #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
        data_type: Option<String>,
        /// Expected nullability.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nullable: Option<bool>,
    },
}

impl ColumnSpec {
    /// The column name.
    pub fn name(&self) -> &str {
        match self {
            ColumnSpec::Name(n) | ColumnSpec::Full { name: n, .. } => n,
        }
    }
}

/// An index: by name, or by columns/keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IndexSpec {
    /// By name.
    Name(String),
    /// By a bare list of columns: `[email]`, `[tenant_id, email]`.
    List(Vec<String>),
    /// By columns (SQL) or keys (MongoDB, `{field: 1}` → `field`, `{f: -1}` → `f:-1`).
    Columns {
        /// Columns in order.
        #[serde(alias = "keys")]
        columns: ColumnList,
        /// Must be unique.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        unique: Option<bool>,
    },
}

/// Index columns written as a list (`[a, b]`) or as MongoDB keys (`{a: 1, b: -1}`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ColumnList {
    /// `[a, b]`
    List(Vec<String>),
    /// `{a: 1, b: -1}` (order kept)
    Keys(serde_json::Map<String, serde_json::Value>),
}

impl ColumnList {
    /// Normalised column list: `a`, `b:-1`.
    pub fn normalised(&self) -> Vec<String> {
        match self {
            ColumnList::List(v) => v.clone(),
            ColumnList::Keys(m) => m.iter().map(|(k, v)| key_column(k, v)).collect(),
        }
    }
}

/// How a MongoDB index key is written in a snapshot: `field` for ascending, else `field:<dir>`.
pub fn key_column(field: &str, dir: &serde_json::Value) -> String {
    match dir {
        serde_json::Value::Number(n) if n.as_f64() == Some(1.0) => field.to_string(),
        serde_json::Value::Number(n) => format!("{field}:{}", n.as_f64().map(|f| f as i64).unwrap_or(0)),
        serde_json::Value::String(s) => format!("{field}:{s}"),
        other => format!("{field}:{other}"),
    }
}

/// A contract that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct ContractError {
    /// The file.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl Contract {
    /// Parse `schema.yaml` text; `file` is used in messages.
    ///
    /// # Errors
    /// Invalid YAML or unknown keys, with the line; nesting deeper than
    /// [`MAX_NESTING`](crate::source::nesting::MAX_NESTING) levels (refused
    /// before the parser, which is slow on it). Messages are cut to a few
    /// hundred bytes.
    pub fn parse(text: &str, file: &str) -> Result<Contract, ContractError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        use crate::source::nesting::{check_nesting, MAX_NESTING};
        check_nesting(text, MAX_NESTING).map_err(|d| ContractError { file: file.to_string(), line: d.line, message: d.to_string() })?;
        serde_yaml_ng::from_str(text).map_err(|e| ContractError {
            file: file.to_string(),
            line: e.location().map(|l| l.line()).unwrap_or(1),
            message: crate::error::cap(&e.to_string(), crate::error::MAX_QUOTED),
        })
    }

    /// Render as `schema.yaml` text.
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).unwrap_or_default()
    }

    /// Is there anything to check?
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty() && self.collections.is_empty()
    }
}

// ---------------------------------------------------------------- validation

/// How bad a violation is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Fails validation.
    Error,
    /// Reported only.
    Warning,
}

/// One way the live schema breaks the contract.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    /// Error or warning.
    pub severity: Severity,
    /// The table or collection.
    pub object: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{s}: {}: {}", self.object, self.message)
    }
}

/// Normalise a SQL type name so synonyms compare equal (`int8` = `bigint`,
/// `varchar(20)` = `character varying(20)`, `int(11)` = `int`).
pub fn normalise_type(t: &str) -> String {
    let t = t.trim().to_ascii_lowercase();
    let t = t.split_whitespace().collect::<Vec<_>>().join(" ");
    let (base, args) = match t.find('(') {
        Some(i) => (t[..i].trim().to_string(), t[i..].replace(' ', "")),
        None => (t.clone(), String::new()),
    };
    let base = match base.as_str() {
        "int8" | "bigserial" | "serial8" => "bigint",
        "int" | "int4" | "serial" | "serial4" | "mediumint" => "integer",
        "int2" | "smallserial" => "smallint",
        "varchar" => "character varying",
        "char" | "bpchar" => "character",
        "bool" | "boolean" | "tinyint(1)" => "boolean",
        "float8" | "double" => "double precision",
        "float4" => "real",
        "decimal" => "numeric",
        "timestamptz" => "timestamp with time zone",
        "timestamp" | "timestamp without time zone" => "timestamp",
        "timetz" => "time with time zone",
        other => other,
    }
    .to_string();
    // Display widths of MySQL integers are not part of the type.
    let args = if matches!(base.as_str(), "bigint" | "integer" | "smallint" | "tinyint") { String::new() } else { args };
    if base == "tinyint" && args.is_empty() && t.starts_with("tinyint(1)") {
        return "boolean".into();
    }
    format!("{base}{args}")
}

fn index_matches(spec: &IndexSpec, obj: &ObjectInfo, want_unique: bool) -> bool {
    match spec {
        IndexSpec::Name(n) => {
            obj.indexes.get(n).map(|i| !want_unique || i.unique).unwrap_or(false)
                || obj.constraints.get(n).map(|c| !want_unique || c.kind == "unique" || c.kind == "primary key").unwrap_or(false)
        }
        IndexSpec::List(cols) => index_matches(&IndexSpec::Columns { columns: ColumnList::List(cols.clone()), unique: None }, obj, want_unique),
        IndexSpec::Columns { columns, unique } => {
            let cols = columns.normalised();
            let need_unique = want_unique || unique.unwrap_or(false);
            obj.indexes.values().any(|i| i.columns == cols && (!need_unique || i.unique))
                // A foreign key is not an index (PostgreSQL creates none for it).
                || obj.constraints.values().any(|c| c.columns == cols && (c.kind == "unique" || c.kind == "primary key"))
        }
    }
}

fn describe_index(spec: &IndexSpec) -> String {
    match spec {
        IndexSpec::Name(n) => n.clone(),
        IndexSpec::List(cols) => format!("({})", cols.join(", ")),
        IndexSpec::Columns { columns, unique } => {
            format!("{}({})", if unique.unwrap_or(false) { "unique " } else { "" }, columns.normalised().join(", "))
        }
    }
}

fn check_column(table: &str, spec: &ColumnSpec, obj: &ObjectInfo, required: bool, out: &mut Vec<Violation>) {
    let name = spec.name();
    match obj.columns.get(name) {
        None => out.push(Violation {
            severity: if required { Severity::Error } else { Severity::Warning },
            object: table.to_string(),
            message: format!("{} column {name} is missing", if required { "required" } else { "optional" }),
        }),
        Some(col) => {
            if let ColumnSpec::Full { data_type, nullable, .. } = spec {
                if let Some(t) = data_type {
                    if normalise_type(t) != normalise_type(&col.data_type) {
                        out.push(Violation {
                            severity: Severity::Error,
                            object: table.to_string(),
                            message: format!("column {name} has type {}, expected {t}", col.data_type),
                        });
                    }
                }
                if let Some(n) = nullable {
                    if *n != col.nullable {
                        out.push(Violation {
                            severity: Severity::Error,
                            object: table.to_string(),
                            message: format!(
                                "column {name} is {}, expected {}",
                                if col.nullable { "nullable" } else { "NOT NULL" },
                                if *n { "nullable" } else { "NOT NULL" }
                            ),
                        });
                    }
                }
            }
        }
    }
}

/// Every way `live` breaks `contract`, errors first.
pub fn validate(contract: &Contract, live: &Snapshot) -> Vec<Violation> {
    let mut out = Vec::new();
    for (name, t) in &contract.tables {
        let Some(obj) = live.objects.get(name) else {
            out.push(Violation { severity: Severity::Error, object: name.clone(), message: "table is missing".into() });
            continue;
        };
        for c in &t.required {
            check_column(name, c, obj, true, &mut out);
        }
        for c in &t.optional {
            check_column(name, c, obj, false, &mut out);
        }
        for i in &t.indexes {
            if !index_matches(i, obj, false) {
                out.push(Violation {
                    severity: Severity::Error,
                    object: name.clone(),
                    message: format!("required index {} is missing", describe_index(i)),
                });
            }
        }
        for u in &t.unique {
            if !index_matches(u, obj, true) {
                out.push(Violation {
                    severity: Severity::Error,
                    object: name.clone(),
                    message: format!("required unique constraint {} is missing", describe_index(u)),
                });
            }
        }
    }
    for (name, c) in &contract.collections {
        let Some(obj) = live.objects.get(name) else {
            out.push(Violation { severity: Severity::Error, object: name.clone(), message: "collection is missing".into() });
            continue;
        };
        if !c.required.is_empty() {
            match &obj.validator {
                None => out.push(Violation {
                    severity: Severity::Error,
                    object: name.clone(),
                    message: format!("has no $jsonSchema validator; expected it to require {}", c.required.join(", ")),
                }),
                Some(v) => {
                    for f in &c.required {
                        if !v.required.contains(f) {
                            out.push(Violation {
                                severity: Severity::Error,
                                object: name.clone(),
                                message: format!("the validator does not require field {f}"),
                            });
                        }
                    }
                }
            }
        }
        for i in &c.indexes {
            if !index_matches(i, obj, false) {
                out.push(Violation {
                    severity: Severity::Error,
                    object: name.clone(),
                    message: format!("required index {} is missing", describe_index(i)),
                });
            }
        }
    }
    out.sort_by_key(|v| v.severity == Severity::Warning);
    out
}

/// Keys of the contract's required items that `live` does not satisfy (a
/// missing table leaves every one of its items unsatisfied). Used to tell a
/// migration that *breaks* the contract from one that simply has not reached it.
pub fn unsatisfied(contract: &Contract, live: &Snapshot) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for (name, t) in &contract.tables {
        let obj = live.objects.get(name);
        if obj.is_none() {
            out.insert(name.to_string());
        }
        let empty = ObjectInfo::default();
        let o = obj.unwrap_or(&empty);
        for c in &t.required {
            let mut v = Vec::new();
            check_column(name, c, o, true, &mut v);
            if !v.is_empty() || obj.is_none() {
                out.insert(format!("{name}.column.{}", c.name()));
            }
        }
        for c in &t.optional {
            let mut v = Vec::new();
            check_column(name, c, o, false, &mut v);
            if v.iter().any(|x| x.severity == Severity::Error) || obj.is_none() {
                out.insert(format!("{name}.column.{}", c.name()));
            }
        }
        for i in &t.indexes {
            if obj.is_none() || !index_matches(i, o, false) {
                out.insert(format!("{name}.index.{}", describe_index(i)));
            }
        }
        for u in &t.unique {
            if obj.is_none() || !index_matches(u, o, true) {
                out.insert(format!("{name}.unique.{}", describe_index(u)));
            }
        }
    }
    for (name, c) in &contract.collections {
        let obj = live.objects.get(name);
        if obj.is_none() {
            out.insert(name.to_string());
        }
        for f in &c.required {
            let ok = obj.and_then(|o| o.validator.as_ref()).map(|v| v.required.contains(f)).unwrap_or(false);
            if !ok {
                out.insert(format!("{name}.required.{f}"));
            }
        }
        for i in &c.indexes {
            if obj.map(|o| !index_matches(i, o, false)).unwrap_or(true) {
                out.insert(format!("{name}.index.{}", describe_index(i)));
            }
        }
    }
    out
}

/// Errors `after` has that `before` did not: what a migration broke. Items the
/// database had not reached yet (a table a later migration creates) are not
/// regressions.
pub fn regressions(contract: &Contract, before: &Snapshot, after: &Snapshot) -> Vec<Violation> {
    let was = unsatisfied(contract, before);
    let now = unsatisfied(contract, after);
    let broken: Vec<&String> = now.difference(&was).collect();
    if broken.is_empty() {
        return Vec::new();
    }
    validate(contract, after)
        .into_iter()
        .filter(|v| v.severity == Severity::Error)
        .filter(|v| broken.iter().any(|k| k.split('.').next() == Some(v.object.as_str())))
        .filter(|v| {
            // keep the violations that name a broken item
            broken.iter().any(|k| {
                let mut parts = k.splitn(3, '.');
                let obj = parts.next().unwrap_or("");
                let item = parts.nth(1).unwrap_or("");
                obj == v.object && (item.is_empty() || v.message.contains(item))
            })
        })
        .collect()
}

/// True when any violation is an error.
pub fn has_errors(v: &[Violation]) -> bool {
    v.iter().any(|x| x.severity == Severity::Error)
}

// ---------------------------------------------------------------- diff

/// One difference between two snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The table or collection.
    pub object: String,
    /// `added`, `removed` or `changed`.
    pub kind: String,
    /// What: `table`, `column email`, `index users_email_key`, `validator`…
    pub what: String,
    /// Before → after, for changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = match self.kind.as_str() {
            "added" => "+",
            "removed" => "-",
            _ => "~",
        };
        write!(f, "{sign} {}: {} {}", self.object, self.what, self.kind)?;
        if let Some(d) = &self.detail {
            write!(f, " ({d})")?;
        }
        Ok(())
    }
}

fn diff_map<V: PartialEq + fmt::Debug>(
    object: &str,
    label: &str,
    before: &BTreeMap<String, V>,
    after: &BTreeMap<String, V>,
    show: impl Fn(&V) -> String,
    out: &mut Vec<Change>,
) {
    for (k, b) in before {
        match after.get(k) {
            None => out.push(Change { object: object.into(), kind: "removed".into(), what: format!("{label} {k}"), detail: Some(show(b)) }),
            Some(a) if a != b => out.push(Change {
                object: object.into(),
                kind: "changed".into(),
                what: format!("{label} {k}"),
                detail: Some(format!("{} → {}", show(b), show(a))),
            }),
            _ => {}
        }
    }
    for (k, a) in after {
        if !before.contains_key(k) {
            out.push(Change { object: object.into(), kind: "added".into(), what: format!("{label} {k}"), detail: Some(show(a)) });
        }
    }
}

fn show_column(c: &ColumnInfo) -> String {
    format!("{}{}", c.data_type, if c.nullable { "" } else { " not null" })
}
fn show_index(i: &IndexInfo) -> String {
    let mut s = format!("{}({})", if i.unique { "unique " } else { "" }, i.columns.join(", "));
    if let Some(o) = &i.options {
        s.push_str(&format!(" {o}"));
    }
    s
}
fn show_constraint(c: &ConstraintInfo) -> String {
    let mut s = format!("{} ({})", c.kind, c.columns.join(", "));
    if let Some(d) = &c.definition {
        s.push_str(&format!(" {d}"));
    }
    s
}

impl ObjectInfo {
    /// A MongoDB collection that carries no schema: no validator and no index
    /// but `_id_`. Applications and `update`/`insert` commands create these
    /// implicitly, so their appearing or disappearing is not drift.
    pub fn is_schemaless(&self) -> bool {
        self.columns.is_empty() && self.constraints.is_empty() && self.validator.is_none() && self.indexes.keys().all(|k| k == "_id_")
    }
}

/// What changed from `before` to `after`. Schema-less collections (see
/// [`ObjectInfo::is_schemaless`]) that appear or disappear are not reported.
pub fn diff(before: &Snapshot, after: &Snapshot) -> Vec<Change> {
    let mut out = Vec::new();
    for (name, b) in &before.objects {
        let Some(a) = after.objects.get(name) else {
            if !b.is_schemaless() {
                out.push(Change { object: name.clone(), kind: "removed".into(), what: "table/collection".into(), detail: None });
            }
            continue;
        };
        diff_map(name, "column", &b.columns, &a.columns, show_column, &mut out);
        diff_map(name, "index", &b.indexes, &a.indexes, show_index, &mut out);
        diff_map(name, "constraint", &b.constraints, &a.constraints, show_constraint, &mut out);
        if b.validator != a.validator {
            let show =
                |v: &Option<ValidatorInfo>| v.as_ref().map(|v| format!("required [{}]", v.required.join(", "))).unwrap_or_else(|| "none".into());
            out.push(Change {
                object: name.clone(),
                kind: "changed".into(),
                what: "validator".into(),
                detail: Some(format!("{} → {}", show(&b.validator), show(&a.validator))),
            });
        }
    }
    for (name, a) in &after.objects {
        if !before.objects.contains_key(name) && !a.is_schemaless() {
            out.push(Change { object: name.clone(), kind: "added".into(), what: "table/collection".into(), detail: None });
        }
    }
    out
}

/// A contract that the snapshot satisfies exactly: every column required with its
/// type and nullability, every index and unique constraint by name
/// (`kiln schema dump`).
pub fn dump(s: &Snapshot, mongo: bool) -> Contract {
    let mut c = Contract::default();
    for (name, o) in &s.objects {
        if mongo {
            c.collections.insert(
                name.clone(),
                CollectionContract {
                    required: o.validator.as_ref().map(|v| v.required.clone()).unwrap_or_default(),
                    indexes: o.indexes.keys().filter(|k| *k != "_id_").map(|k| IndexSpec::Name(k.clone())).collect(),
                },
            );
        } else {
            c.tables.insert(
                name.clone(),
                TableContract {
                    required: o
                        .columns
                        .iter()
                        .map(|(n, col)| ColumnSpec::Full { name: n.clone(), data_type: Some(col.data_type.clone()), nullable: Some(col.nullable) })
                        .collect(),
                    optional: vec![],
                    indexes: o.indexes.iter().filter(|(_, i)| !i.unique).map(|(k, _)| IndexSpec::Name(k.clone())).collect(),
                    unique: o
                        .indexes
                        .iter()
                        .filter(|(_, i)| i.unique)
                        .map(|(k, _)| k.clone())
                        .chain(o.constraints.iter().filter(|(_, c)| c.kind == "unique").map(|(k, _)| k.clone()))
                        .map(IndexSpec::Name)
                        .collect(),
                },
            );
        }
    }
    c
}

#[cfg(test)]
mod tests;
