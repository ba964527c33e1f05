//! Schema contracts on MongoDB: inspection, the stored snapshot and drift,
//! validation after each migration, `check`, and scratch databases for verify.

mod common;

use std::sync::Arc;

use common::{settings, Env};
#[allow(unused_imports)]
use kiln_core::engine::{Engine as _, Locker as _};
use kiln_core::schema::Contract;
use kiln_core::{FailureOutcome, Policy, RunError, Runner, UpTarget};
use kiln_testkit::compat::Backend;
use mongodb::bson::{doc, Document};

const USERS: &str = "up:
  - create: users
    validator: { $jsonSchema: { bsonType: object, required: [email] } }
  - createIndexes: users
    indexes: [ { key: { email: 1 }, name: email_1, unique: true } ]
down:
  - drop: users
";

#[tokio::test]
async fn snapshot_is_stored_after_a_run_and_drift_is_seen() {
    let env = Env::new().await;
    env.write("0001_users.yaml", USERS);
    env.up().await.unwrap();
    assert!(env.collections().await.contains(&"kiln_snapshot".to_string()));

    let mut b = env.backend().await;
    let stored = b.load_snapshot().await.unwrap().expect("stored by the run");
    assert_eq!(stored, b.inspect().await.unwrap());
    assert!(stored.objects["users"].indexes.contains_key("email_1"));
    let mut r = Runner::new(&mut b, settings());
    assert_eq!(r.diff().await.unwrap(), Some(vec![]));

    // Someone adds an index by hand: drift.
    env.database().await.collection::<Document>("users").create_index(mongodb::IndexModel::builder().keys(doc! { "name": 1 }).build()).await.unwrap();
    let changes = r.diff().await.unwrap().unwrap();
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(changes[0].to_string(), "+ users: index name_1 added ((name))");
    let report = r.check(&env.load(), None).await.unwrap();
    assert!(!report.ok && report.drift.len() == 1, "{report:?}");
}

#[tokio::test]
async fn nothing_stored_yet_means_no_snapshot() {
    let env = Env::new().await;
    let mut b = env.backend().await;
    assert_eq!(b.load_snapshot().await.unwrap(), None);
    assert!(env.collections().await.is_empty(), "reading creates nothing");
}

#[tokio::test]
async fn a_migration_breaking_the_contract_is_recorded_failed() {
    let env = Env::new().await;
    env.write("0001_users.yaml", USERS);
    env.write("0002_drop_email_index.yaml", "up:\n  - dropIndexes: users\n    index: email_1\n");
    let contract = Arc::new(Contract::parse("collections:\n  users:\n    required: [email]\n    indexes: [email_1]\n", "schema.yaml").unwrap());
    let mut b = env.backend().await;
    let e = Runner::new(&mut b, settings())
        .with_contract(Some(contract.clone()))
        .up(&env.load(), &UpTarget::Latest, &Policy::default(), false)
        .await
        .unwrap_err();
    let RunError::Invalid { version, outcome, violations, done, .. } = &e else { panic!("{e}") };
    assert_eq!(version.number, 2);
    assert_eq!(*outcome, FailureOutcome::RecordedFailed, "index drops cannot be rolled back on MongoDB");
    assert!(violations[0].message.contains("email_1"), "{violations:?}");
    assert_eq!(done.iter().map(|v| v.number).collect::<Vec<_>>(), vec![1]);
    assert_eq!(env.states().await, vec!["0001:applied", "0002:failed"]);

    // A good database passes `check` with the contract.
    let env = Env::new().await;
    env.write("0001_users.yaml", USERS);
    let mut b = env.backend().await;
    Runner::new(&mut b, settings())
        .with_contract(Some(contract.clone()))
        .up(&env.load(), &UpTarget::Latest, &Policy::default(), false)
        .await
        .unwrap();
    let report = Runner::new(&mut b, settings()).check(&env.load(), Some(&contract)).await.unwrap();
    assert!(report.ok, "{report:?}");
}

#[tokio::test]
async fn scratch_databases_for_verify() {
    let env = Env::new().await;
    let mut b = env.backend().await;
    let name = kiln_testkit::unique_name("kiln_scratch");
    let url = b.create_scratch(&name).await.unwrap();
    assert!(url.contains(&format!("/{name}")), "{url}");
    // The scratch URL works like any other.
    let mut cfg = env.cfg.clone();
    cfg.url = url.clone().into();
    let engine = kiln_mongo::MongoEngine::connect(&cfg).await.unwrap();
    assert_eq!(engine.database_name(), name);
    let mut s = kiln_testkit::compat::Protocol::new(engine);
    s.ensure_history().await.unwrap();
    let client = kiln_testkit::mongo::client(&env.db.url).await;
    assert!(client.list_database_names().await.unwrap().contains(&name));
    b.drop_scratch(&name).await.unwrap();
    assert!(!client.list_database_names().await.unwrap().contains(&name));
    // Never the migration database itself.
    let own = env.db.name.clone();
    assert!(b.drop_scratch(&own).await.is_err());
    assert!(b.create_scratch(&own).await.is_err());
}
