//! kiln-mongo: kiln's MongoDB engine.
//!
//! Migrations are lists of database commands run exactly as `db.runCommand()`
//! runs them (Extended JSON in, BSON out, key order kept), so everything the
//! server can do is reachable and nothing new has to be learnt.
//!
//! The design decision to know: MongoDB DDL (index builds, `create`,
//! `collMod`, …) cannot be rolled back, so by default each migration commits
//! an intent entry (`running`) to the history *before* its first command and
//! marks it `applied` after its last. A failure after the first command (or a
//! crash) leaves a `failed`/`running` entry that blocks the next run until
//! `kiln repair`, instead of a silent disagreement between database and
//! history. With `transaction: true` on a replica set or sharded cluster, the
//! commands and the history entry commit together in one multi-document
//! transaction instead.
//!
//! The engine ([`MongoEngine`]) implements kiln_core's small engine traits
//! ([`kiln_core::engine`]); the step protocol itself is [`kiln_core::step`].
//! Besides it, the crate offers per-collection status ([`collection_status`]),
//! declarative indexes ([`sync_indexes`]) and the live schema for schema
//! contracts ([`schema_snapshot`], [`MongoEngine::snapshot`]).

#![warn(missing_docs)]

mod backfill;
mod code;
mod command;
mod conn;
mod engine;
mod exec;
mod history;
mod jobdoc;
mod jobs;
mod lock;
pub mod names;
mod proc;
mod snapshot;
mod status;
mod store;
mod sync;

pub use code::{handle, CodeHandle};
pub use conn::Topology;
pub use engine::MongoEngine;
pub use history::MIGRATE_MONGO_ACTOR;
pub use lock::{DEFAULT_TTL as DEFAULT_LEASE_TTL, LOCK_COLLECTION};
pub use snapshot::schema_snapshot;
pub use status::{collection_status, CollectionStatus, EXACT_COUNT_LIMIT};
pub use sync::{sync_indexes, MigratedIndex, SyncAction, SyncError, SyncOptions, SyncReport};

/// Connect to the MongoDB database named by `cfg`, boxed as a [`kiln_core::Engine`].
///
/// # Errors
/// As [`MongoEngine::connect`].
pub async fn connect(cfg: &kiln_core::BackendConfig) -> Result<Box<dyn kiln_core::Engine>, kiln_core::EngineError> {
    Ok(Box::new(MongoEngine::connect(cfg).await?))
}
