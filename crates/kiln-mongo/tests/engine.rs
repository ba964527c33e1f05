//! The MongoDB engine driven through kiln_core's Runner: apply, revert,
//! failures and what they leave behind, transactions, Extended JSON, the
//! history format and migrate-mongo adoption.

mod common;

use std::time::{Duration, Instant};

use common::{code_of, settings, Env};
#[allow(unused_imports)]
use kiln_core::engine::{Engine as _, Locker as _};
use kiln_core::{BackendConfig, EngineError, FailureOutcome, PlanError, Policy, RunError, Runner, State, UpTarget, Version};
use kiln_mongo::MongoEngine;
use kiln_testkit::compat::Backend;
use kiln_testkit::compat::Protocol;
use mongodb::bson::{doc, Bson, Document};

const USERS: &str = "up:
  - create: users
  - createIndexes: users
    indexes:
      - key: { email: 1 }
        name: email_1
        unique: true
down:
  - drop: users
";

const SEED: &str = r#"{
  "up": [
    {"insert": "users", "documents": [
      {"_id": {"$oid": "5f1d7f0e9d3b2c0001a1b2c3"}, "email": "a@example.com", "createdAt": {"$date": "2025-11-01T10:00:00Z"}},
      {"_id": {"$oid": "5f1d7f0e9d3b2c0001a1b2c4"}, "email": "b@example.com", "createdAt": {"$date": "2025-11-02T10:00:00Z"}}
    ]}
  ],
  "down": [
    {"delete": "users", "deletes": [{"q": {}, "limit": 0}]}
  ]
}"#;

fn history_state(d: &Document) -> &str {
    d.get_str("state").unwrap()
}

#[tokio::test]
async fn up_status_down_up_again() {
    let env = Env::new().await;
    env.write("0001_create_users.yaml", USERS);
    env.write("0002_seed_users.json", SEED);

    let r = env.up().await.unwrap();
    assert_eq!(r.steps.len(), 2);
    assert_eq!(r.batch, Some(1));
    assert_eq!(env.states().await, vec!["0001:applied", "0002:applied"]);
    assert_eq!(env.index_names("users").await, vec!["_id_", "email_1"]);
    let users = env.docs("users").await;
    assert_eq!(users.len(), 2);
    assert!(matches!(users[0].get("_id"), Some(Bson::ObjectId(_))), "{users:?}");
    assert!(matches!(users[0].get("createdAt"), Some(Bson::DateTime(_))), "{users:?}");

    // The history has the documented fields, keyed by version.
    let h = env.docs("kiln_history").await;
    assert_eq!(h.len(), 2);
    assert_eq!(h[0].get_i64("_id").unwrap(), 1);
    for f in [
        "description",
        "script",
        "migration_group",
        "checksum",
        "state",
        "batch",
        "applied_at",
        "duration_ms",
        "applied_by",
        "kiln_version",
        "error",
        "error_statement",
        "error_line",
    ] {
        assert!(h[0].contains_key(f), "history lacks {f}: {:?}", h[0]);
    }
    assert_eq!(h[0].get_str("description").unwrap(), "create_users");
    assert_eq!(h[1].get_str("script").unwrap(), "0002_seed_users.json");
    assert_eq!(history_state(&h[0]), "applied");
    assert_eq!(h[0].get_str("applied_by").unwrap(), "tester@test");
    assert_eq!(h[0].get_str("checksum").unwrap(), env.load()[0].checksum.0);
    assert!(matches!(h[0].get("applied_at"), Some(Bson::DateTime(_))));
    let events: Vec<String> = env.docs("kiln_log").await.iter().map(|d| d.get_str("event").unwrap().to_string()).collect();
    assert_eq!(events, vec!["run-start", "applied", "applied", "run-end"]);

    // Nothing pending: a no-op.
    let r = env.up().await.unwrap();
    assert!(r.steps.is_empty());

    let r = env.down().await.unwrap();
    assert_eq!(r.steps.iter().map(|s| s.version.as_str()).collect::<Vec<_>>(), vec!["0002", "0001"]);
    assert!(!env.collections().await.contains(&"users".to_string()));
    assert!(env.docs("kiln_history").await.is_empty());
    assert_eq!(env.states().await, vec!["0001:pending", "0002:pending"]);

    let r = env.up().await.unwrap();
    assert_eq!(r.steps.len(), 2);
    assert_eq!(r.batch, Some(1), "batch numbering restarts when the history is empty");
    assert_eq!(env.docs("users").await.len(), 2);
    let events: Vec<String> = env.docs("kiln_log").await.iter().map(|d| d.get_str("event").unwrap().to_string()).collect();
    assert_eq!(events.iter().filter(|e| *e == "reverted").count(), 2);
}

#[tokio::test]
async fn failing_command_mid_batch_is_recorded_and_blocks_until_repair() {
    let env = Env::new().await;
    env.write("0001_create_users.yaml", USERS);
    let bad = "up:\n  - createIndexes: users\n    indexes:\n      - key: { name: 1 }\n        name: name_1\n  - insert: users\n    documents:\n      - { email: dup@example.com }\n      - { email: dup@example.com }\ndown:\n  - dropIndexes: users\n    index: name_1\n";
    env.write("0002_add_name_index.yaml", bad);
    env.write("0003_later.yaml", "up:\n  - create: later\n");

    let e = env.up().await.unwrap_err();
    let RunError::Migration { version, outcome, error, done } = &e else { panic!("{e}") };
    assert_eq!(version.number, 2);
    assert_eq!(*outcome, FailureOutcome::RecordedFailed);
    assert_eq!(done.iter().map(|v| v.number).collect::<Vec<_>>(), vec![1]);
    assert_eq!(error.statement, 2);
    assert_eq!(error.line, 6);
    assert_eq!(error.code.as_deref(), Some("11000"));
    assert_eq!(error.file, "0002_add_name_index.yaml");

    // Command 1 ran (index built), the first insert too: nothing pretends otherwise.
    assert!(env.index_names("users").await.contains(&"name_1".to_string()));
    assert_eq!(env.docs("users").await.len(), 1);
    assert!(!env.collections().await.contains(&"later".to_string()), "the run stops at the failure");

    let h = env.docs("kiln_history").await;
    let failed = h.iter().find(|d| d.get_i64("_id").unwrap() == 2).unwrap();
    assert_eq!(history_state(failed), "failed");
    assert!(failed.get_str("error").unwrap().contains("code 11000"), "{failed:?}");
    assert_eq!(failed.get_i64("error_statement").unwrap(), 2);
    assert_eq!(failed.get_i64("error_line").unwrap(), 6);
    assert_eq!(env.states().await, vec!["0001:applied", "0002:failed", "0003:pending"]);
    assert!(env.docs("kiln_log").await.iter().any(|d| d.get_str("event").unwrap() == "failed"));

    // Blocked until repair.
    let e = env.up().await.unwrap_err();
    let RunError::Plan(problems) = &e else { panic!("{e}") };
    assert!(matches!(&problems[0], PlanError::Blocked { state, .. } if state == "failed"), "{problems:?}");
    assert!(e.to_string().contains("kiln repair 0002"), "{e}");

    // The operator cleans up and fixes the file, then repairs: pending again.
    env.database().await.collection::<Document>("users").delete_many(doc! {}).await.unwrap();
    env.write(
        "0002_add_name_index.yaml",
        &bad.replace("      - { email: dup@example.com }\n      - { email: dup@example.com }\n", "      - { email: one@example.com }\n"),
    );
    let rep = env.repair(Some("0002")).await;
    assert!(rep.changes[0].to_string().contains("pending again"), "{:?}", rep.changes);
    let r = env.up().await.unwrap();
    assert_eq!(r.steps.len(), 2);
    assert_eq!(env.states().await, vec!["0001:applied", "0002:applied", "0003:applied"]);
}

#[tokio::test]
async fn first_command_refused_leaves_nothing() {
    let env = Env::new().await;
    // collMod of a collection that does not exist: NamespaceNotFound (26).
    env.write("0001_tighten.yaml", "up:\n  - collMod: nothere\n    validationLevel: strict\n  - create: never\n");
    let e = env.up().await.unwrap_err();
    let RunError::Migration { outcome, error, .. } = &e else { panic!("{e}") };
    assert_eq!(*outcome, FailureOutcome::RolledBack);
    assert_eq!(error.statement, 1);
    assert_eq!(error.line, 2);
    assert_eq!(error.code.as_deref(), Some("26"));
    assert!(env.docs("kiln_history").await.is_empty(), "no entry for a migration that changed nothing");
    assert!(!env.collections().await.contains(&"never".to_string()));
    assert_eq!(env.states().await, vec!["0001:pending"]);
    let log = env.docs("kiln_log").await;
    let failed = log.iter().find(|d| d.get_str("event").unwrap() == "failed").expect("failure logged");
    assert!(failed.get_str("detail").unwrap().contains("nothing was changed"), "{failed:?}");
    // Not blocked: fix the file and run again.
    env.write("0001_tighten.yaml", "up:\n  - create: nothere\n  - collMod: nothere\n    validationLevel: strict\n");
    env.up().await.unwrap();
    assert_eq!(env.states().await, vec!["0001:applied"]);
}

#[tokio::test]
async fn first_command_partly_written_is_recorded_failed() {
    let env = Env::new().await;
    // The first document is inserted, the second collides: something changed,
    // so this is not "rolled back" even though it is the first command.
    env.write("0001_seed.yaml", "up:\n  - insert: things\n    documents: [ { _id: 1 }, { _id: 1 } ]\n");
    let e = env.up().await.unwrap_err();
    let RunError::Migration { outcome, error, .. } = &e else { panic!("{e}") };
    assert_eq!(*outcome, FailureOutcome::RecordedFailed);
    assert_eq!(code_of(&e).as_deref(), Some("11000"));
    assert!(error.message.contains("item 2"), "{}", error.message);
    assert_eq!(env.docs("things").await.len(), 1);
    assert_eq!(env.states().await, vec!["0001:failed"]);
}

#[tokio::test]
async fn invalid_command_names_position_and_server_code() {
    let env = Env::new().await;
    env.write("0001_ok.yaml", "up:\n  - create: a\n");
    env.write("0002_typo.yaml", "up:\n  - create: b\n  - creatIndexes: b\n    indexes: []\n");
    let e = env.up().await.unwrap_err();
    let RunError::Migration { error, outcome, .. } = &e else { panic!("{e}") };
    assert_eq!(error.statement, 2);
    assert_eq!(error.line, 3);
    assert_eq!(error.code.as_deref(), Some("59"), "CommandNotFound: {error:?}");
    assert_eq!(*outcome, FailureOutcome::RecordedFailed);
    let text = e.to_string();
    assert!(text.contains("0002_typo.yaml: statement 2 (line 3) failed: creatIndexes failed: code 59"), "{text}");

    // Invalid Extended JSON is caught before anything runs.
    let env = Env::new().await;
    env.write("0001_bad.json", r#"{"up": [{"create": "c"}, {"insert": "c", "documents": [{"_id": {"$oid": "not-an-oid"}}]}]}"#);
    let e = env.up().await.unwrap_err();
    let RunError::Migration { error, outcome, .. } = &e else { panic!("{e}") };
    assert_eq!(*outcome, FailureOutcome::RolledBack);
    assert_eq!(error.statement, 2);
    assert!(error.message.contains("Extended JSON"), "{}", error.message);
    assert!(!env.collections().await.contains(&"c".to_string()), "command 1 must not run");
}

#[tokio::test]
async fn validator_create_and_coll_mod() {
    let env = Env::new().await;
    env.write(
        "0001_users.yaml",
        "up:\n  - create: users\n    validator:\n      $jsonSchema:\n        bsonType: object\n        required: [email]\n        properties:\n          email: { bsonType: string }\ndown:\n  - drop: users\n",
    );
    env.write(
        "0002_require_name.yaml",
        "up:\n  - collMod: users\n    validator:\n      $jsonSchema:\n        bsonType: object\n        required: [email, name]\n    validationLevel: strict\n    validationAction: error\ndown:\n  - collMod: users\n    validator:\n      $jsonSchema:\n        bsonType: object\n        required: [email]\n",
    );
    env.up().await.unwrap();
    let users = env.database().await.collection::<Document>("users");
    let err = users.insert_one(doc! { "email": "x@example.com" }).await.unwrap_err();
    assert_eq!(write_code(&err), Some(121), "{err}");
    users.insert_one(doc! { "email": "x@example.com", "name": "X" }).await.unwrap();

    // A migration inserting an invalid document fails with the server's code.
    env.write("0003_bad_seed.yaml", "up:\n  - insert: users\n    documents: [ { email: y@example.com } ]\n");
    let e = env.up().await.unwrap_err();
    assert_eq!(code_of(&e).as_deref(), Some("121"), "{e}");
    let RunError::Migration { outcome, .. } = &e else { panic!() };
    assert_eq!(*outcome, FailureOutcome::RolledBack, "nothing was written");
    env.remove("0003_bad_seed.yaml");

    // down of 0002 restores the looser validator.
    env.down().await.unwrap();
    users.insert_one(doc! { "email": "z@example.com" }).await.unwrap();
}

fn write_code(e: &mongodb::error::Error) -> Option<i32> {
    match &*e.kind {
        mongodb::error::ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) => Some(w.code),
        mongodb::error::ErrorKind::Command(c) => Some(c.code),
        _ => None,
    }
}

#[tokio::test]
async fn pipeline_update_copies_a_field() {
    let env = Env::new().await;
    env.write("0001_seed.yaml", "up:\n  - insert: people\n    documents: [ { _id: 1, name: Ada }, { _id: 2, name: Grace }, { _id: 3 } ]\n");
    env.write(
        "0002_display_name.yaml",
        "up:\n  - update: people\n    updates:\n      - q: { name: { $exists: true } }\n        u: [ { $set: { displayName: \"$name\" } } ]\n        multi: true\ndown:\n  - update: people\n    updates: [ { q: {}, u: { $unset: { displayName: \"\" } }, multi: true } ]\n",
    );
    env.up().await.unwrap();
    let people = env.docs("people").await;
    assert_eq!(people[0].get_str("displayName").unwrap(), "Ada");
    assert_eq!(people[1].get_str("displayName").unwrap(), "Grace");
    assert!(!people[2].contains_key("displayName"));
}

#[tokio::test]
async fn extended_json_types_reach_the_server() {
    let env = Env::new().await;
    env.write(
        "0001_typed.json",
        r#"{"up": [{"insert": "typed", "documents": [{
            "_id": {"$oid": "65f0c0ffee0000000000beef"},
            "at": {"$date": "2025-11-01T12:30:00.000Z"},
            "atMillis": {"$date": {"$numberLong": "1700000000000"}},
            "price": {"$numberDecimal": "19.99"},
            "big": {"$numberLong": "9007199254740993"},
            "small": 7,
            "ratio": 0.5
        }]},
        {"update": "typed", "updates": [{"q": {"at": {"$gte": {"$date": "2025-01-01T00:00:00Z"}}}, "u": {"$set": {"matchedByDate": true}}}]}]}"#,
    );
    env.up().await.unwrap();
    let d = &env.docs("typed").await[0];
    assert_eq!(d.get_object_id("_id").unwrap().to_hex(), "65f0c0ffee0000000000beef");
    assert_eq!(d.get_datetime("at").unwrap().timestamp_millis(), 1762000200000);
    assert_eq!(d.get_datetime("atMillis").unwrap().timestamp_millis(), 1700000000000);
    assert!(matches!(d.get("price"), Some(Bson::Decimal128(_))), "{d:?}");
    assert_eq!(d.get_i64("big").unwrap(), 9007199254740993);
    assert_eq!(d.get_i32("small").unwrap(), 7);
    assert_eq!(d.get_f64("ratio").unwrap(), 0.5);
    assert!(d.get_bool("matchedByDate").unwrap(), "a $date in a filter matches");
}

#[tokio::test]
async fn rename_collection_with_bare_names() {
    let env = Env::new().await;
    env.write("0001_old.yaml", "up:\n  - insert: old_name\n    documents: [ { _id: 1 } ]\n");
    env.up().await.unwrap();
    env.write("0002_rename.yaml", "up:\n  - renameCollection: old_name\n    to: new_name\ndown:\n  - renameCollection: new_name\n    to: old_name\n");
    env.up().await.unwrap();
    let names = env.collections().await;
    assert!(names.contains(&"new_name".to_string()) && !names.contains(&"old_name".to_string()), "{names:?}");
    env.down().await.unwrap();
    let names = env.collections().await;
    assert!(names.contains(&"old_name".to_string()) && !names.contains(&"new_name".to_string()), "{names:?}");

    // Renaming onto an existing collection: NamespaceExists (48); a missing source: 26.
    env.write("0003_clash.yaml", "up:\n  - create: taken\n  - renameCollection: new_name\n    to: taken\n");
    let e = env.up().await.unwrap_err();
    assert_eq!(code_of(&e).as_deref(), Some("48"), "{e}");
    let env = Env::new().await;
    env.write("0001_missing.yaml", "up:\n  - renameCollection: nothere\n    to: other\n");
    assert_eq!(code_of(&env.up().await.unwrap_err()).as_deref(), Some("26"));
}

#[tokio::test]
async fn drop_index_that_does_not_exist_is_a_failure() {
    let env = Env::new().await;
    env.write("0001_coll.yaml", "up:\n  - create: c\n  - dropIndexes: c\n    index: nope_1\n");
    let e = env.up().await.unwrap_err();
    assert_eq!(code_of(&e).as_deref(), Some("27"), "IndexNotFound: {e}");
}

#[tokio::test]
async fn transaction_commits_commands_and_history_together() {
    let env = Env::new().await;
    env.write("0001_coll.yaml", "up:\n  - create: accounts\n");
    env.up().await.unwrap();
    env.write(
        "0002_seed.yaml",
        "transaction: true\nup:\n  - insert: accounts\n    documents: [ { _id: 1, balance: 10 }, { _id: 2, balance: 0 } ]\n  - update: accounts\n    updates: [ { q: { _id: 1 }, u: { $inc: { balance: -5 } } }, { q: { _id: 2 }, u: { $inc: { balance: 5 } } } ]\ndown:\n  - delete: accounts\n    deletes: [ { q: {}, limit: 0 } ]\n",
    );
    env.up().await.unwrap();
    let a = env.docs("accounts").await;
    assert_eq!((a[0].get_i32("balance").unwrap(), a[1].get_i32("balance").unwrap()), (5, 5));
    assert_eq!(env.states().await, vec!["0001:applied", "0002:applied"]);

    // A failure inside the transaction undoes every command of the migration.
    env.write(
        "0003_move.yaml",
        "transaction: true\nup:\n  - update: accounts\n    updates: [ { q: { _id: 1 }, u: { $inc: { balance: -5 } } } ]\n  - insert: accounts\n    documents: [ { _id: 3 } ]\n  - insert: accounts\n    documents: [ { _id: 2 } ]\n",
    );
    let e = env.up().await.unwrap_err();
    let RunError::Migration { outcome, error, .. } = &e else { panic!("{e}") };
    assert_eq!(*outcome, FailureOutcome::RolledBack);
    assert_eq!(error.statement, 3);
    assert_eq!(error.code.as_deref(), Some("11000"));
    let a = env.docs("accounts").await;
    assert_eq!(a.len(), 2, "the insert of _id 3 was rolled back: {a:?}");
    assert_eq!(a[0].get_i32("balance").unwrap(), 5, "the update was rolled back");
    assert_eq!(env.states().await, vec!["0001:applied", "0002:applied", "0003:pending"]);

    // Revert in a transaction too.
    env.remove("0003_move.yaml");
    env.down().await.unwrap();
    assert!(env.docs("accounts").await.is_empty());
}

#[tokio::test]
async fn transaction_refused_on_a_standalone_server() {
    let base = kiln_testkit::mongo::standalone_server_url().await;
    let name = kiln_testkit::unique_name("kiln_t");
    let url = kiln_testkit::mongo::with_db(&base, &name);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("0001_tx.yaml"), "transaction: true\nup:\n  - insert: a\n    documents: [ { _id: 1 } ]\n").unwrap();
    let local = kiln_core::load_dir(dir.path(), &Default::default()).unwrap();
    let engine = MongoEngine::connect(&BackendConfig::new(url.clone())).await.unwrap();
    assert_eq!(engine.topology(), kiln_mongo::Topology::Standalone);
    let mut b = Protocol::new(engine);
    let e = Runner::new(&mut b, settings()).up(&local, &UpTarget::Latest, &Policy::default(), false).await.unwrap_err();
    let msg = e.to_string();
    // Refused while preparing: a `failed` event, nothing run, nothing recorded.
    assert!(matches!(&e, RunError::Migration { outcome: FailureOutcome::RolledBack, error, .. } if error.statement == 1), "{e:?}");
    assert!(msg.contains("transaction: true") && msg.contains("replica set") && msg.contains("nothing was run"), "{msg}");
    let h = kiln_testkit::mongo::documents(&url, "kiln_history").await;
    assert!(h.is_empty(), "nothing recorded: {h:?}");
    assert!(kiln_testkit::mongo::documents(&url, "a").await.is_empty());
    // Without `transaction: true` the same server runs it.
    std::fs::write(dir.path().join("0001_tx.yaml"), "up:\n  - insert: a\n    documents: [ { _id: 1 } ]\n").unwrap();
    let local = kiln_core::load_dir(dir.path(), &Default::default()).unwrap();
    Runner::new(&mut b, settings()).up(&local, &UpTarget::Latest, &Policy::default(), false).await.unwrap();
    assert_eq!(kiln_testkit::mongo::documents(&url, "a").await.len(), 1);
    kiln_testkit::mongo::drop_db(&base, &name).await;
}

#[tokio::test]
async fn read_history_creates_nothing() {
    let env = Env::new().await;
    env.write("0001_a.yaml", "up:\n  - create: a\n");
    let mut b = env.backend().await;
    assert!(b.read_history().await.unwrap().is_none());
    let rows = Runner::new(&mut b, settings()).status(&env.load()).await.unwrap();
    assert_eq!(rows[0].state, "pending");
    let dry = Runner::new(&mut b, settings()).up(&env.load(), &UpTarget::Latest, &Policy::default(), true).await.unwrap();
    assert!(dry.dry_run && dry.steps.len() == 1);
    assert!(env.collections().await.is_empty(), "status and dry runs create nothing");
    b.ensure_history().await.unwrap();
    assert_eq!(env.collections().await, vec!["kiln_history", "kiln_log"]);
    assert_eq!(b.read_history().await.unwrap(), Some(vec![]));
}

#[tokio::test]
async fn url_without_database_and_unreachable_server() {
    let base = kiln_testkit::mongo::server_url().await;
    let e = MongoEngine::connect(&BackendConfig::new(base.clone())).await.err().expect("no database named");
    assert!(matches!(e, EngineError::BadUrl { .. }), "{e}");
    assert!(e.to_string().contains("add /dbname or set [mongodb] database in kiln.toml"), "{e}");

    let mut cfg = BackendConfig::new(base);
    cfg.database = Some(kiln_testkit::unique_name("kiln_t"));
    let engine = MongoEngine::connect(&cfg).await.unwrap();
    assert_eq!(engine.database_name(), cfg.database.as_deref().unwrap());
    let b = Protocol::new(engine);
    assert!(b.target().contains(cfg.database.as_deref().unwrap()), "{}", b.target());

    let e = MongoEngine::connect(&BackendConfig::new("postgres://x/y")).await.err().unwrap();
    assert!(matches!(e, EngineError::BadUrl { .. }), "{e}");

    let started = Instant::now();
    let e = MongoEngine::connect(&BackendConfig::new("mongodb://kiln:s3cret-pw@127.0.0.1:9/app")).await.err().expect("nothing listens on port 9");
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
    let msg = e.to_string();
    assert!(matches!(e, EngineError::Connect { .. }), "{msg}");
    assert!(msg.contains("mongodb://kiln:***@127.0.0.1:9/app"), "{msg}");
    assert!(!msg.contains("s3cret"), "{msg}");
}

#[tokio::test]
async fn interrupted_run_blocks() {
    let env = Env::new().await;
    env.write("0001_a.yaml", "up:\n  - create: a\n");
    env.up().await.unwrap();
    env.write("0002_b.yaml", "up:\n  - create: b\n");
    // What a runner killed between its intent entry and its last command leaves.
    env.database()
        .await
        .collection::<Document>("kiln_history")
        .insert_one(doc! {
            "_id": 2_i64, "description": "b", "script": "0002_b.yaml", "migration_group": null, "checksum": env.load()[1].checksum.0.clone(),
            "state": "running", "batch": 2_i64, "applied_at": mongodb::bson::DateTime::now(), "duration_ms": 0_i64,
            "applied_by": "ghost@elsewhere", "kiln_version": "0.1.0", "error": null, "error_statement": null, "error_line": null,
        })
        .await
        .unwrap();
    let e = env.up().await.unwrap_err();
    assert!(e.to_string().contains("recorded as running"), "{e}");
    env.repair(None).await;
    env.up().await.unwrap();
    assert_eq!(env.states().await, vec!["0001:applied", "0002:applied"]);
}

#[tokio::test]
async fn tampered_file_baseline_and_retire() {
    let env = Env::new().await;
    env.write("0001_a.yaml", "up:\n  - create: a\n");
    env.write("0002_b.yaml", "up:\n  - create: b\n");
    env.up().await.unwrap();
    env.write("0002_b.yaml", "up:\n  - create: b2\n");
    let e = env.up().await.unwrap_err();
    assert!(e.to_string().contains("checksum mismatch"), "{e}");
    let rep = env.repair(Some("0002")).await;
    assert!(rep.changes[0].to_string().contains("checksum"), "{:?}", rep.changes);
    env.up().await.unwrap();

    // Retire: recorded and renamed.
    let local = env.load();
    let mut b = env.backend().await;
    Runner::new(&mut b, settings()).retire(&local, env.path(), &Version::from_number(2), "obsolete").await.unwrap();
    assert!(env.path().join("0002_b.yaml.retired").exists());
    let h = env.docs("kiln_history").await;
    assert_eq!(history_state(&h[1]), "retired");

    // Baseline on a fresh database.
    let env = Env::new().await;
    env.write("0001_a.yaml", "up:\n  - create: a\n");
    env.write("0002_b.yaml", "up:\n  - create: b\n");
    env.write("0003_c.yaml", "up:\n  - create: c\n");
    let mut b = env.backend().await;
    Runner::new(&mut b, settings()).baseline(&env.load(), &Version::from_number(2), Some("existing db")).await.unwrap();
    assert_eq!(env.states().await, vec!["0001:baseline", "0002:baseline", "0003:pending"]);
    let r = env.up().await.unwrap();
    assert_eq!(r.steps.len(), 1);
    assert_eq!(env.collections().await, vec!["c", "kiln_history", "kiln_lock", "kiln_log", "kiln_snapshot"]);
}

#[tokio::test]
async fn migrate_mongo_changelog_is_adopted() {
    let mut env = Env::new().await;
    env.cfg.history_table = "changelog".into();
    let changelog = env.database().await.collection::<Document>("changelog");
    changelog
        .insert_many(vec![
            doc! { "fileName": "20240101120000-init.js", "appliedAt": mongodb::bson::DateTime::from_millis(1704110400000) },
            doc! { "fileName": "20240201120000-add-users-index.js", "appliedAt": mongodb::bson::DateTime::from_millis(1706788800000), "migrationBlock": 2 },
        ])
        .await
        .unwrap();
    env.write("20251101000000_add_flag.yaml", "up:\n  - insert: flags\n    documents: [ { _id: 1 } ]\ndown:\n  - drop: flags\n");

    let rows = env.status().await;
    let view: Vec<String> = rows.iter().map(|r| format!("{}:{}:{}", r.version, r.state, r.applied_by.clone().unwrap_or_default())).collect();
    assert_eq!(view, vec!["20240101120000:baseline:migrate-mongo", "20240201120000:baseline:migrate-mongo", "20251101000000:pending:"]);
    assert_eq!(rows[1].name, "20240201120000-add-users-index.js");
    assert_eq!(rows[1].batch, Some(2));

    let r = env.up().await.unwrap();
    assert_eq!(r.steps.len(), 1);
    assert_eq!(r.batch, Some(3), "batches continue after migrate-mongo's migrationBlock");
    let docs = env.docs("changelog").await;
    assert_eq!(docs.len(), 3, "migrate-mongo's entries are kept as they are: {docs:?}");
    assert!(docs.iter().filter(|d| d.contains_key("fileName")).all(|d| !d.contains_key("state")));
    assert!(env.collections().await.contains(&"flags".to_string()));

    env.down().await.unwrap();
    assert!(!env.collections().await.contains(&"flags".to_string()));
    // migrate-mongo's migrations cannot be reverted by kiln.
    let e = env.down().await.unwrap_err();
    assert!(matches!(&e, RunError::Plan(p) if matches!(p[0], PlanError::NotRevertible { .. })), "{e}");

    // A kiln file older than the adopted history is out of order.
    env.write("20230101000000_old.yaml", "up:\n  - create: old\n");
    let e = env.up().await.unwrap_err();
    assert!(matches!(&e, RunError::Plan(p) if matches!(p[0], PlanError::OutOfOrder { .. })), "{e}");
}

#[tokio::test]
async fn history_documents_kiln_does_not_understand_are_an_error() {
    let mut env = Env::new().await;
    env.cfg.history_table = "changelog".into();
    env.database().await.collection::<Document>("changelog").insert_one(doc! { "_id": "weird" }).await.unwrap();
    env.write("0001_a.yaml", "up:\n  - create: a\n");
    let e = env.up().await.unwrap_err();
    assert!(matches!(&e, RunError::Engine(EngineError::Query { .. })), "{e}");
    assert!(e.to_string().contains("changelog"), "{e}");
}

#[tokio::test]
async fn failed_revert_is_recorded() {
    let env = Env::new().await;
    env.write("0001_a.yaml", "up:\n  - create: a\n  - create: b\ndown:\n  - drop: b\n  - dropIndexes: a\n    index: nope_1\n");
    env.up().await.unwrap();
    let e = env.down().await.unwrap_err();
    let RunError::Migration { outcome, error, .. } = &e else { panic!("{e}") };
    assert_eq!(*outcome, FailureOutcome::RecordedFailed);
    assert_eq!(error.statement, 2);
    let h = env.docs("kiln_history").await;
    assert_eq!(history_state(&h[0]), "failed");
    assert!(h[0].get_str("error").unwrap().starts_with("the down migration failed: "), "{:?}", h[0]);

    // A revert whose first command is refused leaves the entry applied.
    let env = Env::new().await;
    env.write("0001_a.yaml", "up:\n  - create: a\ndown:\n  - dropIndexes: a\n    index: nope_1\n  - drop: a\n");
    env.up().await.unwrap();
    let e = env.down().await.unwrap_err();
    let RunError::Migration { outcome, .. } = &e else { panic!("{e}") };
    assert_eq!(*outcome, FailureOutcome::RolledBack);
    assert_eq!(env.states().await, vec!["0001:applied"]);
    assert!(env.collections().await.contains(&"a".to_string()));
}

#[tokio::test]
async fn history_entry_state_round_trips_through_upsert() {
    let env = Env::new().await;
    let mut b = env.backend().await;
    b.ensure_history().await.unwrap();
    let entry = kiln_core::AppliedMigration {
        version: Version::from_number(42),
        description: "x".into(),
        script: "0042_x.yaml".into(),
        group: Some("users".into()),
        checksum: kiln_core::Checksum("c".repeat(64)),
        state: State::Failed,
        batch: 7,
        applied_at: chrono::DateTime::from_timestamp_millis(1_700_000_000_000).unwrap(),
        duration_ms: 3,
        applied_by: "a@b".into(),
        kiln_version: "0.1.0".into(),
        error: Some(kiln_core::FailureInfo { message: "code 1 (X): y".into(), statement: Some(3), line: Some(9) }),
    };
    b.upsert_history(std::slice::from_ref(&entry)).await.unwrap();
    assert_eq!(b.read_history().await.unwrap().unwrap(), vec![entry.clone()]);
    b.delete_history(42).await.unwrap();
    assert_eq!(b.read_history().await.unwrap().unwrap(), vec![]);
}

#[tokio::test]
async fn an_insert_never_overwrites_a_recorded_version_and_no_event_is_logged_without_its_change() {
    use kiln_core::engine::{HistoryChange, HistoryStore, Record};
    let env = Env::new().await;
    let mut e = MongoEngine::connect(&env.cfg).await.unwrap();
    e.ensure().await.unwrap();
    let row = |v: u64, state: State| kiln_core::AppliedMigration {
        version: Version::from_number(v),
        description: format!("m{v}"),
        script: format!("000{v}_m{v}.yaml"),
        group: None,
        checksum: kiln_core::Checksum("c".repeat(64)),
        state,
        batch: 1,
        applied_at: chrono::DateTime::from_timestamp_millis(1_700_000_000_000).unwrap(),
        duration_ms: 0,
        applied_by: "other@runner".into(),
        kiln_version: "0.1.0".into(),
        error: None,
    };
    let event = kiln_core::LogEntry {
        at: chrono::Utc::now(),
        event: kiln_core::LogEvent::Applied,
        version: Some(2),
        name: Some("m2".into()),
        batch: Some(1),
        actor: "t@h".into(),
        reason: None,
        detail: None,
    };
    e.commit(&Record { changes: vec![HistoryChange::Insert(row(1, State::Running))], events: vec![], durable: false }).await.unwrap();
    // Another runner's merged finish + intent collides with the recorded version 1.
    let record = Record {
        changes: vec![
            HistoryChange::Put(row(2, State::Applied)),
            HistoryChange::Insert(row(1, State::Applied)),
            HistoryChange::Put(row(3, State::Applied)),
        ],
        events: vec![event],
        durable: false,
    };
    let err = e.commit(&record).await.unwrap_err();
    assert!(matches!(err, EngineError::Query { .. }), "{err}");
    assert!(err.to_string().contains("code 11000"), "{err}");
    let h = env.docs("kiln_history").await;
    let states: Vec<(i64, String)> = h.iter().map(|d| (d.get_i64("_id").unwrap(), history_state(d).to_string())).collect();
    assert_eq!(states, vec![(1, "running".to_string()), (2, "applied".to_string())], "version 1 kept, statements after the collision not run");
    assert!(env.docs("kiln_log").await.is_empty(), "no event is logged when the history write failed");
    // Put replaces, Delete removes, one record at a time.
    e.commit(&Record { changes: vec![HistoryChange::Put(row(1, State::Applied)), HistoryChange::Delete(2)], events: vec![], durable: true })
        .await
        .unwrap();
    assert_eq!(e.list().await.unwrap().unwrap().iter().map(|a| (a.version.number, a.state)).collect::<Vec<_>>(), vec![(1, State::Applied)]);
}
