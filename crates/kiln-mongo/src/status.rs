//! Per-collection status (`kiln status --collections`): existence, document
//! count, indexes and validator of every collection.

use std::fmt;

use bson::{doc, Bson, Document};
use futures::TryStreamExt;
use kiln_core::{BackendConfig, EngineError};
use serde::Serialize;

use crate::conn::Conn;
use crate::lock::LOCK_COLLECTION;

/// Collections with more documents than this (by the estimate) are not
/// counted exactly unless asked: `countDocuments` scans the collection.
pub const EXACT_COUNT_LIMIT: u64 = 10_000;

/// The state of one collection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CollectionStatus {
    /// Collection name.
    pub name: String,
    /// Whether it exists (collections named by the caller may not).
    pub exists: bool,
    /// Number of documents (0 when missing).
    pub documents: u64,
    /// `true` when `documents` was counted, `false` when it is the server's
    /// estimate from collection metadata.
    pub exact: bool,
    /// Index names, in the server's order (`_id_` first).
    pub indexes: Vec<String>,
    /// Whether the collection has a validator (e.g. `$jsonSchema`).
    pub validator: bool,
}

impl fmt::Display for CollectionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.exists {
            return write!(f, "{}: missing", self.name);
        }
        write!(
            f,
            "{}: {}{} document{}, {} index{} ({}){}",
            self.name,
            if self.exact { "" } else { "~" },
            self.documents,
            if self.documents == 1 { "" } else { "s" },
            self.indexes.len(),
            if self.indexes.len() == 1 { "" } else { "es" },
            self.indexes.join(", "),
            if self.validator { ", validator" } else { "" }
        )
    }
}

/// Status of every collection of the database named by `cfg` (kiln's own
/// history, event log and lock excluded, and `system.*`), plus the `extra`
/// names, reported with `exists: false` when missing. Sorted by name.
///
/// Counts are the server's estimate (`estimatedDocumentCount`, cheap) unless
/// `exact` is set or the estimate is at most [`EXACT_COUNT_LIMIT`], in which
/// case they are counted (`countDocuments`).
///
/// # Errors
/// Connection failures as [`crate::MongoEngine::connect`]; a failing listing
/// or count as [`EngineError::Query`].
pub async fn collection_status(cfg: &BackendConfig, extra: &[String], exact: bool) -> Result<Vec<CollectionStatus>, EngineError> {
    let conn = Conn::open(cfg).await?;
    let jobs = crate::jobdoc::jobs_collection(&cfg.history_table);
    let own = [cfg.history_table.as_str(), cfg.log_table.as_str(), cfg.snapshot_table.as_str(), jobs.as_str(), LOCK_COLLECTION];
    let specs: Vec<Document> = conn
        .db
        .run_cursor_command(doc! { "listCollections": 1, "authorizedCollections": true })
        .await
        .map_err(|e| conn.engine_error(format!("listing the collections of {}", conn.db_name), &e))?
        .try_collect()
        .await
        .map_err(|e| conn.engine_error(format!("listing the collections of {}", conn.db_name), &e))?;
    let mut out = Vec::new();
    for spec in &specs {
        let Ok(name) = spec.get_str("name") else { continue };
        if own.contains(&name) || name.starts_with("system.") {
            continue;
        }
        let kind = spec.get_str("type").unwrap_or("collection");
        let options = spec.get_document("options").ok();
        let validator = options.and_then(|o| o.get_document("validator").ok()).map(|v| !v.is_empty()).unwrap_or(false);
        out.push(one(&conn, name, kind == "view", validator, exact).await?);
    }
    for name in extra {
        if !out.iter().any(|s| &s.name == name) {
            out.push(CollectionStatus { name: name.clone(), exists: false, documents: 0, exact: true, indexes: vec![], validator: false });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

async fn one(conn: &Conn, name: &str, view: bool, validator: bool, exact: bool) -> Result<CollectionStatus, EngineError> {
    let coll = conn.db.collection::<Document>(name);
    let err = |what: &str, e: mongodb::error::Error| conn.engine_error(format!("{what} of collection {name}"), &e);
    // Views have no metadata count and no indexes of their own.
    let (documents, counted) = if view {
        (coll.count_documents(doc! {}).await.map_err(|e| err("counting the documents", e))?, true)
    } else {
        let estimate = coll.estimated_document_count().await.map_err(|e| err("estimating the documents", e))?;
        if exact || estimate <= EXACT_COUNT_LIMIT {
            (coll.count_documents(doc! {}).await.map_err(|e| err("counting the documents", e))?, true)
        } else {
            (estimate, false)
        }
    };
    let indexes = if view {
        vec![]
    } else {
        let specs: Vec<Document> = conn
            .db
            .run_cursor_command(doc! { "listIndexes": name })
            .await
            .map_err(|e| err("listing the indexes", e))?
            .try_collect()
            .await
            .map_err(|e| err("listing the indexes", e))?;
        specs
            .iter()
            .filter_map(|s| match s.get("name") {
                Some(Bson::String(n)) => Some(n.clone()),
                _ => None,
            })
            .collect()
    };
    Ok(CollectionStatus { name: name.to_string(), exists: true, documents, exact: counted, indexes, validator })
}
