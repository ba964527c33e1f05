//! The example shipped in examples/mongodb: applied and reverted against a
//! real server, and its declared indexes checked with sync.

mod common;

use std::path::PathBuf;

#[allow(unused_imports)]
use kiln_core::engine::{Engine as _, Locker as _};
use kiln_core::{load_dir, BackendConfig, DownTarget, LoadOptions, Policy, Runner, UpTarget};
use kiln_mongo::{sync_indexes, MongoEngine, SyncAction, SyncOptions};
use kiln_testkit::compat::Protocol;
use kiln_testkit::{Engine, TestDb};
use mongodb::bson::{doc, Document};

fn example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/mongodb")
}

#[tokio::test]
async fn creator_discovery_example_applies_and_reverts() {
    let db = TestDb::new(Engine::Mongodb).await;
    let cfg = BackendConfig::new(db.url.clone());
    let mdb = kiln_testkit::mongo::database(&db.url).await;
    let users = mdb.collection::<Document>("users");
    users
        .insert_many(vec![
            doc! { "_id": 1, "email": "a@x" },
            doc! { "_id": 2, "email": "b@x", "isMfaRequired": true },
            doc! { "_id": 3, "email": "c@x" },
        ])
        .await
        .unwrap();
    mdb.collection::<Document>("creatorprofiles").insert_one(doc! { "role": "creator", "verified": true, "rating": { "avg": 4.5 } }).await.unwrap();

    let local = load_dir(&example().join("migrations"), &LoadOptions::default()).unwrap();
    assert_eq!(local.len(), 1);
    assert_eq!(local[0].version.number, 20251101000000);
    let mut b = Protocol::new(MongoEngine::connect(&cfg).await.unwrap());
    let settings = common::settings();
    let r = Runner::new(&mut b, settings.clone()).up(&local, &UpTarget::Latest, &Policy::default(), false).await.unwrap();
    assert_eq!(r.steps.len(), 1);

    let specs = kiln_testkit::mongo::indexes(&db.url, "creatorprofiles").await;
    let idx = specs.iter().find(|d| d.get_str("name").unwrap() == "idx_creator_discovery_20251101").expect("index created");
    let key = idx.get_document("key").unwrap();
    assert_eq!(key.keys().collect::<Vec<_>>(), vec!["role", "verified", "rating.avg"], "key order kept");
    assert_eq!(key.get("rating.avg").and_then(|v| v.as_i32().or(v.as_f64().map(|f| f as i32))), Some(-1));
    let u = kiln_testkit::mongo::documents(&db.url, "users").await;
    assert_eq!(u.iter().map(|d| d.get_bool("isMfaRequired").unwrap()).collect::<Vec<_>>(), vec![false, true, false]);

    // The declared indexes agree with what the migration built (userId_1 is still to create).
    let report =
        sync_indexes(&cfg, &example().join("indexes"), &SyncOptions { prune: false, dry_run: true, ..SyncOptions::default() }).await.unwrap();
    let summary: Vec<String> = report.actions.iter().map(|a| format!("{}:{}", a.name(), matches!(a, SyncAction::Unchanged { .. }))).collect();
    assert_eq!(summary, vec!["idx_creator_discovery_20251101:true", "userId_1:false"]);

    let r = Runner::new(&mut b, settings).down(&local, &DownTarget::LastBatch, false).await.unwrap();
    assert_eq!(r.steps.len(), 1);
    assert_eq!(kiln_testkit::mongo::index_names(&db.url, "creatorprofiles").await, vec!["_id_"]);
    let u = kiln_testkit::mongo::documents(&db.url, "users").await;
    assert!(u.iter().all(|d| !d.contains_key("isMfaRequired")), "{u:?}");
}
