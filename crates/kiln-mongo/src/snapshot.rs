//! The live schema of a MongoDB database as kiln_core's normalised
//! [`Snapshot`]: collections, their indexes and `$jsonSchema` validators, for
//! schema contracts, drift and `kiln verify`.

use std::collections::BTreeMap;

use bson::{doc, Bson, Document};
use futures::{StreamExt, TryStreamExt};
use kiln_core::schema::{key_column, IndexInfo, ObjectInfo, Snapshot, ValidatorInfo};
use kiln_core::{BackendConfig, EngineError};

use crate::conn::{error_code, Conn};
use crate::lock::LOCK_COLLECTION;

/// The index options that make two indexes with the same keys differ, as
/// stable text (`sparse; expireAfterSeconds=60; partialFilterExpression={…}`).
fn index_options(spec: &Document) -> Option<String> {
    let mut parts = Vec::new();
    for flag in ["sparse", "hidden"] {
        if matches!(spec.get(flag), Some(Bson::Boolean(true))) {
            parts.push(flag.to_string());
        }
    }
    for key in ["expireAfterSeconds", "partialFilterExpression", "collation", "weights", "2dsphereIndexVersion", "wildcardProjection"] {
        if let Some(v) = spec.get(key) {
            parts.push(format!("{key}={}", v.clone().into_relaxed_extjson()));
        }
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

fn index_info(spec: &Document) -> IndexInfo {
    let columns =
        spec.get_document("key").map(|k| k.iter().map(|(f, v)| key_column(f, &v.clone().into_relaxed_extjson())).collect()).unwrap_or_default();
    IndexInfo { columns, unique: matches!(spec.get("unique"), Some(Bson::Boolean(true))), options: index_options(spec) }
}

/// The top-level `required` of a `$jsonSchema` validator, and the whole
/// validator as canonical JSON text.
fn validator_info(validator: &Document) -> Option<ValidatorInfo> {
    if validator.is_empty() {
        return None;
    }
    let required = validator
        .get_document("$jsonSchema")
        .ok()
        .and_then(|s| s.get_array("required").ok())
        .map(|r| r.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    Some(ValidatorInfo { required, json: Bson::Document(validator.clone()).into_canonical_extjson().to_string() })
}

/// How many `listIndexes` commands a snapshot keeps in flight.
const LIST_INDEXES_IN_FLIGHT: usize = 8;

/// The indexes of the collection `spec` describes (none when it was dropped meanwhile).
async fn list_indexes<'a>(conn: &Conn, spec: &'a Document) -> Result<(&'a Document, Vec<Document>), EngineError> {
    let name = spec.get_str("name").unwrap_or_default();
    let indexes = match conn.db.run_cursor_command(doc! { "listIndexes": name }).await {
        Ok(c) => c.try_collect().await.map_err(|e| conn.engine_error(format!("listing the indexes of {name}"), &e))?,
        Err(e) if error_code(&e) == Some(26) => vec![], // dropped meanwhile
        Err(e) => return Err(conn.engine_error(format!("listing the indexes of {name}"), &e)),
    };
    Ok((spec, indexes))
}

pub(crate) async fn take(conn: &Conn, own: &[&str]) -> Result<Snapshot, EngineError> {
    let ctx = || format!("reading the collections of {}", conn.db_name);
    let specs: Vec<Document> = conn
        .db
        .run_cursor_command(doc! { "listCollections": 1, "filter": { "type": "collection" } })
        .await
        .map_err(|e| conn.engine_error(ctx(), &e))?
        .try_collect()
        .await
        .map_err(|e| conn.engine_error(ctx(), &e))?;
    let wanted: Vec<&Document> =
        specs.iter().filter(|spec| spec.get_str("name").is_ok_and(|name| !own.contains(&name) && !name.starts_with("system."))).collect();
    // One `listIndexes` per collection, several in flight: a database with
    // hundreds of collections is read in a few round trips' time, not hundreds.
    let listing: Vec<_> = wanted.into_iter().map(|spec| list_indexes(conn, spec)).collect();
    let listed: Vec<(&Document, Vec<Document>)> = futures::stream::iter(listing).buffered(LIST_INDEXES_IN_FLIGHT).try_collect().await?;
    let mut objects = BTreeMap::new();
    for (spec, indexes) in listed {
        let name = spec.get_str("name").unwrap_or_default();
        let validator = spec.get_document("options").ok().and_then(|o| o.get_document("validator").ok()).and_then(validator_info);
        let info = ObjectInfo {
            indexes: indexes.iter().filter_map(|i| Some((i.get_str("name").ok()?.to_string(), index_info(i)))).collect(),
            validator,
            ..Default::default()
        };
        objects.insert(name.to_string(), info);
    }
    Ok(Snapshot { objects })
}

/// The live schema of the database named by `cfg`: every collection (views,
/// `system.*` and kiln's own collections excluded) with its indexes and
/// validator.
///
/// # Errors
/// Connection failures as [`crate::MongoEngine::connect`]; a failing listing as
/// [`EngineError::Query`].
pub async fn schema_snapshot(cfg: &BackendConfig) -> Result<Snapshot, EngineError> {
    let conn = Conn::open(cfg).await?;
    let jobs = crate::jobdoc::jobs_collection(&cfg.history_table);
    take(&conn, &[cfg.history_table.as_str(), cfg.log_table.as_str(), cfg.snapshot_table.as_str(), jobs.as_str(), LOCK_COLLECTION]).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_and_validator_normalised() {
        let i = index_info(
            &doc! {"v": 2, "key": {"role": 1, "rating.avg": -1, "loc": "2dsphere"}, "name": "x", "unique": true, "sparse": true, "expireAfterSeconds": 60},
        );
        assert_eq!(i.columns, vec!["role", "rating.avg:-1", "loc:2dsphere"]);
        assert!(i.unique);
        assert_eq!(i.options.as_deref(), Some("sparse; expireAfterSeconds=60"));
        assert_eq!(index_info(&doc! {"key": {"_id": 1}, "name": "_id_"}).options, None);
        let v = validator_info(&doc! {"$jsonSchema": {"bsonType": "object", "required": ["email", "name"]}}).unwrap();
        assert_eq!(v.required, vec!["email", "name"]);
        assert!(validator_info(&doc! {}).is_none());
    }
}
