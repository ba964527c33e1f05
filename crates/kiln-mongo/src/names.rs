//! Names read from MongoDB for a tenant fleet (DESIGN §5): a `[tenants] find`
//! on a collection of the public database (`client_configs`, the field that
//! names each tenant's database), or the server's databases for a
//! `[tenants] pattern`.

use bson::{Bson, Document};
use futures::TryStreamExt;
use kiln_core::{BackendConfig, EngineError};

use crate::conn::Conn;

/// What to read.
#[derive(Clone, Debug)]
pub enum NameQuery {
    /// The value of `field` (a dotted path) in every document of `collection`
    /// that matches `filter`, in `_id` order.
    Find {
        /// Collection of the public database.
        collection: String,
        /// Field naming the tenant.
        field: String,
        /// Query filter (Extended JSON, as kiln.toml gives it).
        filter: serde_json::Value,
    },
    /// The databases of the server.
    Databases,
}

/// Read names: one entry per document (or database); `None` where the field
/// is missing, null or not a string or integer.
///
/// # Errors
/// What connecting returns; [`EngineError::Query`] when the find fails or the
/// filter is not a document.
pub async fn read_names(cfg: &BackendConfig, what: &NameQuery) -> Result<Vec<Option<String>>, EngineError> {
    let conn = Conn::open(&BackendConfig { read_only: true, ..cfg.clone() }).await?;
    match what {
        NameQuery::Databases => {
            let names = conn.client.list_database_names().await.map_err(|e| conn.engine_error("listing the databases", &e))?;
            Ok(names.into_iter().map(Some).collect())
        }
        NameQuery::Find { collection, field, filter } => {
            let context = format!("reading tenant names from {collection}.{field}");
            let filter: Document = match Bson::try_from(filter.clone()) {
                Ok(Bson::Document(d)) => d,
                _ => return Err(EngineError::Query { context, message: format!("the filter must be a document, not {filter}") }),
            };
            let mut projection = Document::new();
            projection.insert(field.clone(), 1);
            let coll = conn.db.collection::<Document>(collection);
            let docs: Vec<Document> = coll
                .find(filter)
                .projection(projection)
                .sort(bson::doc! {"_id": 1})
                .await
                .map_err(|e| conn.engine_error(context.clone(), &e))?
                .try_collect()
                .await
                .map_err(|e| conn.engine_error(context.clone(), &e))?;
            Ok(docs.iter().map(|d| value_at(d, field)).collect())
        }
    }
}

/// Drop the database `cfg` names (`kiln db drop`). Returns whether it existed.
///
/// # Errors
/// What connecting returns; [`EngineError::Query`] when the server refuses.
pub async fn drop_database(cfg: &BackendConfig) -> Result<bool, EngineError> {
    let conn = Conn::open(cfg).await?;
    let names = conn.client.list_database_names().await.map_err(|e| conn.engine_error("listing the databases", &e))?;
    if !names.contains(&conn.db_name) {
        return Ok(false);
    }
    conn.db.drop().await.map_err(|e| conn.engine_error(format!("dropping database {}", conn.db_name), &e))?;
    Ok(true)
}

/// The string (or integer, as text) at a dotted path.
fn value_at(d: &Document, path: &str) -> Option<String> {
    let mut cur = d;
    let mut parts = path.split('.').peekable();
    while let Some(p) = parts.next() {
        let v = cur.get(p)?;
        if parts.peek().is_none() {
            return match v {
                Bson::String(s) => Some(s.clone()),
                Bson::Int32(i) => Some(i.to_string()),
                Bson::Int64(i) => Some(i.to_string()),
                _ => None,
            };
        }
        cur = v.as_document()?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotted_paths_and_types() {
        let d = bson::doc! {"schema": "acme", "n": 7, "x": {"db": "globex"}, "f": 1.5};
        assert_eq!(value_at(&d, "schema").as_deref(), Some("acme"));
        assert_eq!(value_at(&d, "n").as_deref(), Some("7"));
        assert_eq!(value_at(&d, "x.db").as_deref(), Some("globex"));
        assert_eq!(value_at(&d, "f"), None);
        assert_eq!(value_at(&d, "missing"), None);
        assert_eq!(value_at(&d, "schema.deeper"), None);
    }
}
