//! Declarative indexes (`kiln sync`): `indexes/<collection>.yaml` lists the
//! indexes a collection should have; sync creates the missing ones, reports
//! the ones whose options differ, and drops undeclared ones only when asked.
//!
//! A differing index is never dropped and recreated behind the operator's back:
//! rebuilding an index on a large collection is an outage-sized decision, so it
//! is reported with its differences and left alone. `_id_` is never touched.
//!
//! File format (YAML or JSON), a list of index specs, or `{indexes: [...]}`:
//!
//! ```yaml
//! - key: { email: 1 }            # ordered; 1 / -1 (or a type such as "2dsphere")
//!   unique: true
//!   collation: { locale: en, strength: 2 }
//! - key: { role: 1, verified: 1, rating.avg: -1 }
//!   name: idx_creator_discovery_20251101   # default: derived like the server (role_1_verified_1_rating.avg_-1)
//! - key: { createdAt: 1 }
//!   expireAfterSeconds: 86400              # TTL
//! - key: { phone: 1 }
//!   sparse: true
//!   partialFilterExpression: { phone: { $exists: true } }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use bson::{doc, Bson, Document};
use futures::TryStreamExt;
use kiln_core::{BackendConfig, EngineError};
use serde::Serialize;

use crate::command::describe;
use crate::conn::{error_code, Conn};

/// What `sync` may do.
#[derive(Clone, Debug, Default)]
pub struct SyncOptions {
    /// Drop indexes that exist on a declared collection but are not declared.
    pub prune: bool,
    /// Report what would change and change nothing.
    pub dry_run: bool,
    /// Indexes created by applied migrations: `prune` keeps these (and says
    /// which migration created each) unless `drop_migrated` is set too.
    pub migrated: Vec<MigratedIndex>,
    /// With `prune`, also drop undeclared indexes that a migration created.
    pub drop_migrated: bool,
}

/// An index that an applied migration created (`createIndexes` in its up).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MigratedIndex {
    /// Collection.
    pub collection: String,
    /// Index name.
    pub name: String,
    /// The migration (`0003_add_email_index`).
    pub migration: String,
}

/// One index of the comparison between the files and the server.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum SyncAction {
    /// Declared and missing: created (or, in a dry run, would be).
    Create {
        /// Collection.
        collection: String,
        /// Index name.
        name: String,
        /// The index spec sent to `createIndexes` (relaxed Extended JSON).
        spec: serde_json::Value,
    },
    /// Declared and present with other options: reported, never changed.
    Differs {
        /// Collection.
        collection: String,
        /// Index name.
        name: String,
        /// One line per difference (`unique: declared true, server false`).
        differences: Vec<String>,
    },
    /// Present, not declared, and `prune` was asked: dropped (or would be).
    Drop {
        /// Collection.
        collection: String,
        /// Index name.
        name: String,
        /// The applied migration that created it, when one did (dropped only
        /// with `drop_migrated`).
        #[serde(skip_serializing_if = "Option::is_none")]
        created_by: Option<String>,
    },
    /// Present, not declared, `prune` was asked, but an applied migration
    /// created it: kept unless `drop_migrated` is set.
    Protected {
        /// Collection.
        collection: String,
        /// Index name.
        name: String,
        /// The migration that created it.
        created_by: String,
    },
    /// Present and not declared; kept because `prune` was not asked.
    Extra {
        /// Collection.
        collection: String,
        /// Index name.
        name: String,
    },
    /// Declared and present with the declared options.
    Unchanged {
        /// Collection.
        collection: String,
        /// Index name.
        name: String,
    },
}

impl SyncAction {
    /// The collection concerned.
    pub fn collection(&self) -> &str {
        match self {
            SyncAction::Create { collection, .. }
            | SyncAction::Differs { collection, .. }
            | SyncAction::Drop { collection, .. }
            | SyncAction::Protected { collection, .. }
            | SyncAction::Extra { collection, .. }
            | SyncAction::Unchanged { collection, .. } => collection,
        }
    }

    /// The index concerned.
    pub fn name(&self) -> &str {
        match self {
            SyncAction::Create { name, .. }
            | SyncAction::Differs { name, .. }
            | SyncAction::Drop { name, .. }
            | SyncAction::Protected { name, .. }
            | SyncAction::Extra { name, .. }
            | SyncAction::Unchanged { name, .. } => name,
        }
    }

    /// True for the actions that change the database (create, drop).
    pub fn is_change(&self) -> bool {
        matches!(self, SyncAction::Create { .. } | SyncAction::Drop { .. })
    }
}

impl fmt::Display for SyncAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = format!("{}.{}", self.collection(), self.name());
        match self {
            SyncAction::Create { spec, .. } => write!(f, "+ {at}: create {spec}"),
            SyncAction::Differs { differences, .. } => {
                write!(f, "~ {at}: differs from the declaration (not changed; drop and recreate it deliberately, e.g. in a migration)")?;
                for d in differences {
                    write!(f, "\n    {d}")?;
                }
                Ok(())
            }
            SyncAction::Drop { created_by: None, .. } => write!(f, "- {at}: drop (not declared)"),
            SyncAction::Drop { created_by: Some(m), .. } => write!(f, "- {at}: drop (not declared; created by migration {m})"),
            SyncAction::Protected { created_by, .. } => {
                write!(f, "! {at}: not declared, but migration {created_by} created it; kept (add --drop-migrated to drop it)")
            }
            SyncAction::Extra { .. } => write!(f, "? {at}: not declared; kept (use --prune to drop it)"),
            SyncAction::Unchanged { .. } => write!(f, "= {at}: unchanged"),
        }
    }
}

/// What `sync` did, or would do in a dry run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SyncReport {
    /// Every declared and every existing index of the declared collections, in
    /// file order then server order.
    pub actions: Vec<SyncAction>,
    /// Nothing was changed: the create/drop actions are what *would* happen.
    pub dry_run: bool,
    /// Number of create/drop actions carried out (0 for a dry run).
    pub applied: usize,
}

impl SyncReport {
    /// True when sync could not do what was asked: a declared index differs
    /// on the server, or `prune` kept an index a migration created. The CLI
    /// exits 1 then.
    pub fn refused(&self) -> bool {
        self.actions.iter().any(|a| matches!(a, SyncAction::Differs { .. } | SyncAction::Protected { .. }))
    }

    /// True when declarations and server disagree in a way sync did not fix:
    /// differing indexes, undeclared ones kept, or (dry run) pending changes.
    pub fn has_drift(&self) -> bool {
        self.actions.iter().any(|a| match a {
            SyncAction::Differs { .. } | SyncAction::Extra { .. } | SyncAction::Protected { .. } => true,
            SyncAction::Create { .. } | SyncAction::Drop { .. } => self.dry_run,
            SyncAction::Unchanged { .. } => false,
        })
    }
}

impl fmt::Display for SyncReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for a in &self.actions {
            writeln!(f, "{a}")?;
        }
        let changes = self.actions.iter().filter(|a| a.is_change()).count();
        if self.dry_run {
            write!(f, "dry run: {changes} change{} planned, nothing was changed", if changes == 1 { "" } else { "s" })
        } else {
            write!(f, "{} change{} applied", self.applied, if self.applied == 1 { "" } else { "s" })
        }
    }
}

/// Why `sync` stopped.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The indexes directory cannot be read.
    #[error("cannot read the indexes directory {dir}: {source}")]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file cannot be read.
    #[error("cannot read {file}: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file is not a valid list of index specs; nothing was changed.
    #[error("{file}: {}{message}; nothing was changed", .entry.as_ref().map(|e| format!("{e}: ")).unwrap_or_default())]
    BadFile {
        /// The file.
        file: PathBuf,
        /// The entry (`entry 2 (email_1)`), when the problem is in one.
        entry: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// The database failed outside an index operation.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Creating or dropping an index failed; `done` lists what was changed before.
    #[error("{collection}.{name}: {action} failed: {message} ({} change{} applied before)", .done.len(), if .done.len() == 1 { "" } else { "s" })]
    Index {
        /// Collection.
        collection: String,
        /// Index name.
        name: String,
        /// `create` or `drop`.
        action: &'static str,
        /// The server's code.
        code: Option<i32>,
        /// `code N (Name): message`.
        message: String,
        /// Changes applied before the failure.
        done: Vec<SyncAction>,
    },
}

/// One declared index.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct IndexSpec {
    pub name: String,
    pub key: Document,
    pub unique: bool,
    pub sparse: bool,
    pub partial: Option<Document>,
    pub ttl: Option<i64>,
    pub collation: Option<Document>,
}

impl IndexSpec {
    /// The spec as `createIndexes` takes it.
    pub fn to_doc(&self) -> Document {
        let mut d = doc! { "key": self.key.clone(), "name": &self.name };
        if self.unique {
            d.insert("unique", true);
        }
        if self.sparse {
            d.insert("sparse", true);
        }
        if let Some(p) = &self.partial {
            d.insert("partialFilterExpression", p.clone());
        }
        if let Some(t) = self.ttl {
            d.insert("expireAfterSeconds", t);
        }
        if let Some(c) = &self.collation {
            d.insert("collation", c.clone());
        }
        d
    }
}

/// The declared indexes of one collection.
#[derive(Clone, Debug)]
pub(crate) struct Declared {
    pub collection: String,
    pub indexes: Vec<IndexSpec>,
}

const FIELDS: &[&str] = &["key", "name", "unique", "sparse", "partialFilterExpression", "expireAfterSeconds", "collation"];

/// The name the server derives for a key pattern: `field_value` pairs joined by `_`.
pub(crate) fn derived_name(key: &Document) -> String {
    key.iter()
        .map(|(k, v)| {
            let v = match v {
                Bson::Int32(n) => n.to_string(),
                Bson::Int64(n) => n.to_string(),
                Bson::Double(n) if n.fract() == 0.0 => (*n as i64).to_string(),
                Bson::Double(n) => n.to_string(),
                Bson::String(s) => s.clone(),
                other => other.to_string(),
            };
            format!("{k}_{v}")
        })
        .collect::<Vec<_>>()
        .join("_")
}

/// Parse one index file's text. `file` is for messages only.
pub(crate) fn parse_file(file: &Path, collection: &str, text: &str) -> Result<Declared, SyncError> {
    let bad = |entry: Option<String>, message: String| SyncError::BadFile { file: file.to_path_buf(), entry, message };
    let json = file.extension().map(|e| e == "json").unwrap_or(false);
    // Before the parser, which is quadratic in the depth of flow collections.
    kiln_core::source::nesting::check_nesting(text, kiln_core::source::nesting::MAX_NESTING)
        .map_err(|d| bad(None, format!("line {}: {d}", d.line)))?;
    let value: serde_json::Value = if json {
        serde_json::from_str(text).map_err(|e| bad(None, format!("invalid JSON at line {}: {e}", e.line())))?
    } else if text.trim().is_empty() {
        serde_json::Value::Array(vec![])
    } else {
        serde_yaml_ng::from_str(text).map_err(|e| bad(None, format!("invalid YAML: {e}")))?
    };
    let items = match value {
        serde_json::Value::Array(a) => a,
        serde_json::Value::Object(mut o) if o.contains_key("indexes") && o.len() == 1 => match o.remove("indexes") {
            Some(serde_json::Value::Array(a)) => a,
            Some(serde_json::Value::Null) => vec![],
            _ => return Err(bad(None, "`indexes` must be a list of index specs".into())),
        },
        serde_json::Value::Null => vec![],
        _ => return Err(bad(None, "expected a list of index specs (or `indexes:` with one), e.g. `- key: { email: 1 }`".into())),
    };
    let mut out: Vec<IndexSpec> = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let label = |name: Option<&str>| match name {
            Some(n) => format!("entry {} ({n})", i + 1),
            None => format!("entry {}", i + 1),
        };
        let serde_json::Value::Object(map) = item else {
            return Err(bad(Some(label(None)), "an index spec is a mapping such as `key: { email: 1 }`".into()));
        };
        let given_name = map.get("name").and_then(|v| v.as_str()).map(str::to_string);
        let at = label(given_name.as_deref());
        if let Some(k) = map.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(bad(Some(at), format!("unknown field `{k}` (known: {})", FIELDS.join(", "))));
        }
        let key = match map.get("key") {
            Some(serde_json::Value::Object(k)) if !k.is_empty() => {
                for (field, v) in k {
                    let ok = match v {
                        serde_json::Value::Number(n) => n.as_f64().map(|x| x != 0.0).unwrap_or(false),
                        serde_json::Value::String(s) => !s.is_empty(),
                        _ => false,
                    };
                    if !ok {
                        return Err(bad(Some(at), format!("key `{field}`: direction must be 1, -1 or an index type such as \"2dsphere\", not {v}")));
                    }
                }
                Document::try_from(k.clone()).map_err(|e| bad(Some(at.clone()), format!("key: {e}")))?
            }
            Some(_) => return Err(bad(Some(at), "`key` must be a non-empty mapping such as { email: 1 }".into())),
            None => return Err(bad(Some(at), "missing `key`".into())),
        };
        let name = match map.get("name") {
            None => derived_name(&key),
            Some(serde_json::Value::String(s)) if !s.is_empty() => s.clone(),
            Some(v) => return Err(bad(Some(at), format!("`name` must be a non-empty string, not {v}"))),
        };
        if name == "_id_" {
            return Err(bad(Some(at), "`_id_` is managed by the server and never touched by sync; remove this entry".into()));
        }
        let flag = |k: &str| -> Result<bool, SyncError> {
            match map.get(k) {
                None => Ok(false),
                Some(serde_json::Value::Bool(b)) => Ok(*b),
                Some(v) => Err(bad(Some(at.clone()), format!("`{k}` must be true or false, not {v}"))),
            }
        };
        let unique = flag("unique")?;
        let sparse = flag("sparse")?;
        let doc_field = |k: &str| -> Result<Option<Document>, SyncError> {
            match map.get(k) {
                None => Ok(None),
                Some(serde_json::Value::Object(o)) => {
                    Document::try_from(o.clone()).map(Some).map_err(|e| bad(Some(at.clone()), format!("`{k}`: {e}")))
                }
                Some(v) => Err(bad(Some(at.clone()), format!("`{k}` must be a mapping, not {v}"))),
            }
        };
        let partial = doc_field("partialFilterExpression")?;
        let collation = doc_field("collation")?;
        if let Some(c) = &collation {
            if c.get_str("locale").is_err() {
                return Err(bad(Some(at), "`collation` needs a `locale` (e.g. { locale: en, strength: 2 })".into()));
            }
        }
        let ttl = match map.get("expireAfterSeconds") {
            None => None,
            Some(serde_json::Value::Number(n)) if n.as_i64().map(|x| x >= 0).unwrap_or(false) => n.as_i64(),
            Some(v) => return Err(bad(Some(at), format!("`expireAfterSeconds` must be a whole number of seconds, not {v}"))),
        };
        if out.iter().any(|s| s.name == name) {
            return Err(bad(Some(at), format!("index name `{name}` is declared twice")));
        }
        out.push(IndexSpec { name, key, unique, sparse, partial, ttl, collation });
    }
    Ok(Declared { collection: collection.to_string(), indexes: out })
}

/// Every index file of `dir`, parsed; sorted by collection.
pub(crate) fn load_dir(dir: &Path) -> Result<Vec<Declared>, SyncError> {
    let entries = std::fs::read_dir(dir).map_err(|source| SyncError::Dir { dir: dir.to_path_buf(), source })?;
    let mut files: BTreeMap<String, PathBuf> = BTreeMap::new();
    for e in entries {
        let e = e.map_err(|source| SyncError::Dir { dir: dir.to_path_buf(), source })?;
        let path = e.path();
        if !path.is_file() {
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(collection) = [".yaml", ".yml", ".json"].iter().find_map(|x| name.strip_suffix(x)) else { continue };
        if collection.is_empty() || collection.starts_with('.') {
            continue;
        }
        if let Some(first) = files.get(collection) {
            return Err(SyncError::BadFile {
                file: path.clone(),
                entry: None,
                message: format!("collection `{collection}` is also declared in {}; keep one file per collection", first.display()),
            });
        }
        files.insert(collection.to_string(), path);
    }
    files
        .into_iter()
        .map(|(collection, file)| {
            let text = kiln_core::source::read_text(&file).map_err(|source| SyncError::Read { file: file.clone(), source })?;
            parse_file(&file, &collection, &text)
        })
        .collect()
}

fn as_f64(b: &Bson) -> Option<f64> {
    match b {
        Bson::Int32(n) => Some(*n as f64),
        Bson::Int64(n) => Some(*n as f64),
        Bson::Double(n) => Some(*n),
        _ => None,
    }
}

/// Equal as the server means it: numbers by value whatever their BSON type;
/// documents key by key (in order when `ordered`).
fn same(a: &Bson, b: &Bson, ordered: bool) -> bool {
    match (a, b) {
        (Bson::Document(x), Bson::Document(y)) => same_doc(x, y, ordered),
        (Bson::Array(x), Bson::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same(p, q, ordered)),
        _ => match (as_f64(a), as_f64(b)) {
            (Some(x), Some(y)) => x == y,
            _ => a == b,
        },
    }
}

fn same_doc(x: &Document, y: &Document, ordered: bool) -> bool {
    if x.len() != y.len() {
        return false;
    }
    if ordered {
        x.iter().zip(y.iter()).all(|((k1, v1), (k2, v2))| k1 == k2 && same(v1, v2, ordered))
    } else {
        x.iter().all(|(k, v)| y.get(k).map(|w| same(v, w, ordered)).unwrap_or(false))
    }
}

fn show(b: &Bson) -> String {
    b.clone().into_relaxed_extjson().to_string()
}

fn truthy(d: &Document, k: &str) -> bool {
    match d.get(k) {
        Some(Bson::Boolean(b)) => *b,
        Some(other) => as_f64(other).map(|x| x != 0.0).unwrap_or(false),
        None => false,
    }
}

/// How an existing index differs from its declaration (empty when it matches).
pub(crate) fn differences(want: &IndexSpec, have: &Document) -> Vec<String> {
    let mut out = Vec::new();
    let have_key = have.get_document("key").cloned().unwrap_or_default();
    if !same_doc(&want.key, &have_key, true) {
        out.push(format!("key: declared {}, server {}", show(&Bson::Document(want.key.clone())), show(&Bson::Document(have_key))));
    }
    for (k, w) in [("unique", want.unique), ("sparse", want.sparse)] {
        let h = truthy(have, k);
        if w != h {
            out.push(format!("{k}: declared {w}, server {h}"));
        }
    }
    let have_partial = have.get_document("partialFilterExpression").ok();
    let partial_same = match (&want.partial, have_partial) {
        (None, None) => true,
        (Some(w), Some(h)) => same_doc(w, h, false),
        _ => false,
    };
    if !partial_same {
        let s = |d: Option<&Document>| d.map(|d| show(&Bson::Document(d.clone()))).unwrap_or_else(|| "none".into());
        out.push(format!("partialFilterExpression: declared {}, server {}", s(want.partial.as_ref()), s(have_partial)));
    }
    let have_ttl = have.get("expireAfterSeconds").and_then(as_f64).map(|x| x as i64);
    if want.ttl != have_ttl {
        let s = |t: Option<i64>| t.map(|t| t.to_string()).unwrap_or_else(|| "none".into());
        out.push(format!("expireAfterSeconds: declared {}, server {}", s(want.ttl), s(have_ttl)));
    }
    // The server fills in every collation default (caseLevel, strength, …):
    // compare the fields the declaration names, and a missing declaration
    // with the simple collation.
    let have_coll = have.get_document("collation").ok().filter(|c| c.get_str("locale").ok() != Some("simple"));
    let want_coll = want.collation.as_ref().filter(|c| c.get_str("locale").ok() != Some("simple"));
    let coll_same = match (want_coll, have_coll) {
        (None, None) => true,
        (Some(w), Some(h)) => w.iter().all(|(k, v)| h.get(k).map(|x| same(v, x, false)).unwrap_or(false)),
        _ => false,
    };
    if !coll_same {
        let s = |d: Option<&Document>| d.map(|d| show(&Bson::Document(d.clone()))).unwrap_or_else(|| "none".into());
        out.push(format!("collation: declared {}, server {}", s(want_coll), s(have_coll)));
    }
    out
}

/// Compare the declarations of one collection with its indexes on the server.
pub(crate) fn plan_collection(decl: &Declared, existing: &[Document], opts: &SyncOptions) -> Vec<SyncAction> {
    let collection = decl.collection.clone();
    let name_of = |d: &Document| d.get_str("name").unwrap_or("").to_string();
    let mut claimed: Vec<String> = vec!["_id_".into()];
    let mut actions = Vec::new();
    for want in &decl.indexes {
        if let Some(have) = existing.iter().find(|d| name_of(d) == want.name) {
            claimed.push(want.name.clone());
            let diffs = differences(want, have);
            actions.push(if diffs.is_empty() {
                SyncAction::Unchanged { collection: collection.clone(), name: want.name.clone() }
            } else {
                SyncAction::Differs { collection: collection.clone(), name: want.name.clone(), differences: diffs }
            });
            continue;
        }
        // The same index under another name: the server would refuse a second
        // one (IndexOptionsConflict), and renaming means a rebuild.
        let twin = existing.iter().find(|d| {
            let n = name_of(d);
            n != "_id_" && !claimed.contains(&n) && !decl.indexes.iter().any(|s| s.name == n) && differences(want, d).is_empty()
        });
        if let Some(twin) = twin {
            let n = name_of(twin);
            claimed.push(n.clone());
            actions.push(SyncAction::Differs {
                collection: collection.clone(),
                name: want.name.clone(),
                differences: vec![format!("name: declared `{}`, the server has the same index as `{n}`", want.name)],
            });
            continue;
        }
        actions.push(SyncAction::Create {
            collection: collection.clone(),
            name: want.name.clone(),
            spec: Bson::Document(want.to_doc()).into_relaxed_extjson(),
        });
    }
    for have in existing {
        let n = name_of(have);
        if claimed.contains(&n) {
            continue;
        }
        let created_by = opts.migrated.iter().find(|m| m.collection == collection && m.name == n).map(|m| m.migration.clone());
        actions.push(match (opts.prune, created_by) {
            (false, _) => SyncAction::Extra { collection: collection.clone(), name: n },
            (true, Some(m)) if !opts.drop_migrated => SyncAction::Protected { collection: collection.clone(), name: n, created_by: m },
            (true, created_by) => SyncAction::Drop { collection: collection.clone(), name: n, created_by },
        });
    }
    actions
}

async fn list_indexes(conn: &Conn, collection: &str) -> Result<Vec<Document>, EngineError> {
    let ctx = || format!("listing the indexes of {collection}");
    match conn.db.run_cursor_command(doc! { "listIndexes": collection }).await {
        Ok(c) => c.try_collect().await.map_err(|e| conn.engine_error(ctx(), &e)),
        Err(e) if error_code(&e) == Some(26) => Ok(vec![]), // no collection yet: no indexes
        Err(e) => Err(conn.engine_error(ctx(), &e)),
    }
}

/// Bring the indexes of the collections declared in `indexes_dir` in line
/// with their files (see the module docs for the format).
///
/// Every file is read and checked before anything changes. Missing indexes
/// are created (the collection too, implicitly); differing ones are reported
/// only; undeclared ones are dropped with `opts.prune`, else reported as
/// extra. Collections without a file are not looked at. With `opts.dry_run`
/// the report says what would happen and nothing changes.
///
/// # Errors
/// [`SyncError::BadFile`] naming the file and entry; [`SyncError::Index`]
/// when the server refuses a create or drop (with what was done before);
/// [`SyncError::Engine`] for connection failures.
pub async fn sync_indexes(cfg: &BackendConfig, indexes_dir: &Path, opts: &SyncOptions) -> Result<SyncReport, SyncError> {
    let declared = load_dir(indexes_dir)?;
    let conn = Conn::open(cfg).await?;
    let mut actions = Vec::new();
    for decl in &declared {
        let existing = list_indexes(&conn, &decl.collection).await?;
        actions.extend(plan_collection(decl, &existing, opts));
    }
    let mut applied = 0;
    if !opts.dry_run {
        let mut done: Vec<SyncAction> = Vec::new();
        for a in actions.iter().filter(|a| a.is_change()) {
            let (cmd, action) = match a {
                SyncAction::Create { collection, spec, .. } => {
                    let spec = Bson::try_from(spec.clone())
                        .map_err(|e| EngineError::Query { context: "converting an index spec".into(), message: e.to_string() })?;
                    (doc! { "createIndexes": collection, "indexes": [spec] }, "create")
                }
                SyncAction::Drop { collection, name, .. } => (doc! { "dropIndexes": collection, "index": name }, "drop"),
                _ => continue,
            };
            let failed = |code: Option<i32>, message: String, done: &Vec<SyncAction>| SyncError::Index {
                collection: a.collection().to_string(),
                name: a.name().to_string(),
                action,
                code,
                message,
                done: done.clone(),
            };
            match conn.db.run_command(cmd).await {
                Ok(reply) => {
                    if let Err(f) = crate::command::check_reply(&reply) {
                        return Err(failed(f.code, f.message, &done));
                    }
                }
                Err(e) => {
                    let message = match &*e.kind {
                        mongodb::error::ErrorKind::Command(c) => describe(c.code, Some(&c.code_name), &c.message),
                        _ => conn.scrub(e.kind.to_string()),
                    };
                    return Err(failed(error_code(&e), message, &done));
                }
            }
            done.push(a.clone());
            applied += 1;
        }
    }
    Ok(SyncReport { actions, dry_run: opts.dry_run, applied })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Declared, SyncError> {
        parse_file(Path::new("indexes/users.yaml"), "users", text)
    }

    #[test]
    fn parses_specs_in_order() {
        let d = parse(
            "- key: { role: 1, verified: 1, rating.avg: -1 }\n- key: { email: 1 }\n  name: email_ci\n  unique: true\n  collation: { locale: en, strength: 2 }\n- key: { at: 1 }\n  expireAfterSeconds: 60\n- key: { p: 1 }\n  sparse: true\n  partialFilterExpression: { p: { $exists: true } }\n",
        )
        .unwrap();
        assert_eq!(d.indexes.len(), 4);
        assert_eq!(d.indexes[0].name, "role_1_verified_1_rating.avg_-1");
        assert_eq!(d.indexes[0].key.keys().collect::<Vec<_>>(), vec!["role", "verified", "rating.avg"]);
        assert_eq!(d.indexes[1].name, "email_ci");
        assert!(d.indexes[1].unique);
        assert_eq!(d.indexes[2].ttl, Some(60));
        assert!(d.indexes[3].sparse && d.indexes[3].partial.is_some());
        let wrapped = parse("indexes:\n  - key: { a: 1 }\n").unwrap();
        assert_eq!(wrapped.indexes[0].name, "a_1");
        assert!(parse("").unwrap().indexes.is_empty());
    }

    #[test]
    fn bad_entries_name_file_and_entry() {
        let e = parse("- key: { a: 1 }\n- key: { b: 1 }\n  uniqe: true\n").unwrap_err().to_string();
        assert!(e.starts_with("indexes/users.yaml: entry 2: unknown field `uniqe`"), "{e}");
        let e = parse("- key: { a: 1 }\n  name: x\n- key: { b: 1 }\n  name: x\n").unwrap_err().to_string();
        assert!(e.contains("entry 2 (x)") && e.contains("twice"), "{e}");
        for bad in [
            "- key: {}\n",
            "- name: x\n",
            "- key: { a: 0 }\n",
            "- key: { a: 1 }\n  unique: yes please\n",
            "- key: { a: 1 }\n  expireAfterSeconds: -1\n",
            "- key: { _id: 1 }\n  name: _id_\n",
            "- key: { a: 1 }\n  collation: { strength: 2 }\n",
            "key: { a: 1 }\n",
            "- [1]\n",
        ] {
            assert!(matches!(parse(bad), Err(SyncError::BadFile { .. })), "{bad}");
        }
        assert!(parse("- key: { a: 1 \n").unwrap_err().to_string().contains("invalid YAML"));
    }

    #[test]
    fn differences_are_reported() {
        let want = parse("- key: { email: 1 }\n  unique: true\n  collation: { locale: en, strength: 2 }\n").unwrap().indexes.remove(0);
        let server_full_collation = doc! {"v": 2, "key": {"email": 1}, "name": "email_1", "unique": true, "collation": {"locale": "en", "caseLevel": false, "strength": 2, "version": "57.1"}};
        assert!(differences(&want, &server_full_collation).is_empty());
        let not_unique = doc! {"v": 2, "key": {"email": 1.0}, "name": "email_1", "collation": {"locale": "en", "strength": 2}};
        assert_eq!(differences(&want, &not_unique), vec!["unique: declared true, server false".to_string()]);
        let other = doc! {"v": 2, "key": {"email": -1}, "name": "email_1", "unique": true, "expireAfterSeconds": 10};
        let d = differences(&want, &other);
        assert_eq!(d.len(), 3, "{d:?}");
    }

    #[test]
    fn plan_create_differs_extra_drop() {
        let decl = parse("- key: { a: 1 }\n- key: { b: 1 }\n  unique: true\n- key: { c: 1 }\n  name: c_new\n- key: { d: 1 }\n").unwrap();
        let existing = vec![
            doc! {"v": 2, "key": {"_id": 1}, "name": "_id_"},
            doc! {"v": 2, "key": {"a": 1}, "name": "a_1"},
            doc! {"v": 2, "key": {"b": 1}, "name": "b_1"},
            doc! {"v": 2, "key": {"c": 1}, "name": "c_1"},
            doc! {"v": 2, "key": {"z": 1}, "name": "z_1"},
        ];
        let kinds = |acts: &[SyncAction]| {
            acts.iter()
                .map(|a| {
                    format!(
                        "{}:{}",
                        a.name(),
                        match a {
                            SyncAction::Create { .. } => "create",
                            SyncAction::Differs { .. } => "differs",
                            SyncAction::Drop { .. } => "drop",
                            SyncAction::Protected { .. } => "protected",
                            SyncAction::Extra { .. } => "extra",
                            SyncAction::Unchanged { .. } => "unchanged",
                        }
                    )
                })
                .collect::<Vec<_>>()
        };
        let acts = plan_collection(&decl, &existing, &SyncOptions::default());
        assert_eq!(kinds(&acts), vec!["a_1:unchanged", "b_1:differs", "c_new:differs", "d_1:create", "z_1:extra"]);
        let prune = SyncOptions { prune: true, ..SyncOptions::default() };
        let acts = plan_collection(&decl, &existing, &prune);
        assert_eq!(kinds(&acts), vec!["a_1:unchanged", "b_1:differs", "c_new:differs", "d_1:create", "z_1:drop"]);
        // An index an applied migration created is kept by --prune, naming the migration.
        let migrated = vec![MigratedIndex { collection: decl.collection.clone(), name: "z_1".into(), migration: "0003_add_z".into() }];
        let guarded = SyncOptions { prune: true, migrated: migrated.clone(), ..SyncOptions::default() };
        let acts = plan_collection(&decl, &existing, &guarded);
        assert_eq!(kinds(&acts).last().unwrap(), "z_1:protected");
        assert!(acts.last().unwrap().to_string().contains("0003_add_z"), "{}", acts.last().unwrap());
        let forced = SyncOptions { prune: true, migrated, drop_migrated: true, ..SyncOptions::default() };
        let acts = plan_collection(&decl, &existing, &forced);
        assert_eq!(kinds(&acts).last().unwrap(), "z_1:drop");
        assert!(acts.last().unwrap().to_string().contains("created by migration 0003_add_z"));
    }
}
