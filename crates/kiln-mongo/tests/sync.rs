//! Declarative indexes (`sync_indexes`) and per-collection status
//! (`collection_status`) against a real server.

mod common;

use common::Env;
use kiln_mongo::{collection_status, sync_indexes, SyncAction, SyncError, SyncOptions};
use mongodb::bson::{doc, Document};

fn write_indexes(env: &Env, file: &str, text: &str) -> std::path::PathBuf {
    let dir = env.path().join("indexes");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(file), text).unwrap();
    dir
}

fn kinds(actions: &[SyncAction]) -> Vec<String> {
    actions
        .iter()
        .map(|a| {
            let k = match a {
                SyncAction::Create { .. } => "create",
                SyncAction::Differs { .. } => "differs",
                SyncAction::Drop { .. } => "drop",
                SyncAction::Protected { .. } => "protected",
                SyncAction::Extra { .. } => "extra",
                SyncAction::Unchanged { .. } => "unchanged",
            };
            format!("{}.{}:{k}", a.collection(), a.name())
        })
        .collect()
}

const USERS: &str = "- key: { email: 1 }
  unique: true
  collation: { locale: en, strength: 2 }
- key: { lastName: 1, firstName: 1 }
- key: { sessionStartedAt: 1 }
  name: session_ttl
  expireAfterSeconds: 3600
- key: { phone: 1 }
  sparse: true
- key: { referrer: 1 }
  partialFilterExpression: { referrer: { $exists: true } }
";

#[tokio::test]
async fn sync_creates_missing_indexes_then_is_a_no_op() {
    let env = Env::new().await;
    let dir = write_indexes(&env, "users.yaml", USERS);
    let r = sync_indexes(&env.cfg, &dir, &SyncOptions::default()).await.unwrap();
    assert_eq!(
        kinds(&r.actions),
        vec![
            "users.email_1:create",
            "users.lastName_1_firstName_1:create",
            "users.session_ttl:create",
            "users.phone_1:create",
            "users.referrer_1:create"
        ]
    );
    assert_eq!(r.applied, 5);
    assert!(!r.has_drift());
    let specs = kiln_testkit::mongo::indexes(&env.db.url, "users").await;
    let by = |n: &str| specs.iter().find(|d| d.get_str("name").unwrap() == n).cloned().unwrap_or_else(|| panic!("{n} missing: {specs:?}"));
    assert!(by("email_1").get_bool("unique").unwrap());
    assert_eq!(by("email_1").get_document("collation").unwrap().get_str("locale").unwrap(), "en");
    assert_eq!(by("lastName_1_firstName_1").get_document("key").unwrap().keys().collect::<Vec<_>>(), vec!["lastName", "firstName"]);
    assert!(by("session_ttl").contains_key("expireAfterSeconds"));
    assert!(by("phone_1").get_bool("sparse").unwrap());
    assert!(by("referrer_1").contains_key("partialFilterExpression"));

    let again = sync_indexes(&env.cfg, &dir, &SyncOptions::default()).await.unwrap();
    assert!(again.actions.iter().all(|a| matches!(a, SyncAction::Unchanged { .. })), "{}", again);
    assert_eq!(again.applied, 0);
}

#[tokio::test]
async fn differing_indexes_are_reported_not_rebuilt() {
    let env = Env::new().await;
    let users = env.database().await.collection::<Document>("users");
    users.create_index(mongodb::IndexModel::builder().keys(doc! { "email": 1 }).build()).await.unwrap();
    users
        .create_index(
            mongodb::IndexModel::builder()
                .keys(doc! { "at": 1 })
                .options(
                    mongodb::options::IndexOptions::builder().name("at_ttl".to_string()).expire_after(std::time::Duration::from_secs(60)).build(),
                )
                .build(),
        )
        .await
        .unwrap();
    let dir = write_indexes(&env, "users.yaml", "- key: { email: 1 }\n  unique: true\n- key: { at: 1 }\n  name: at_ttl\n  expireAfterSeconds: 120\n");
    let r = sync_indexes(&env.cfg, &dir, &SyncOptions { prune: true, dry_run: false, ..SyncOptions::default() }).await.unwrap();
    assert_eq!(kinds(&r.actions), vec!["users.email_1:differs", "users.at_ttl:differs"]);
    let SyncAction::Differs { differences, .. } = &r.actions[0] else { unreachable!() };
    assert_eq!(differences, &vec!["unique: declared true, server false".to_string()]);
    let SyncAction::Differs { differences, .. } = &r.actions[1] else { unreachable!() };
    assert_eq!(differences, &vec!["expireAfterSeconds: declared 120, server 60".to_string()]);
    assert!(r.has_drift());
    assert_eq!(r.applied, 0);
    let email = kiln_testkit::mongo::indexes(&env.db.url, "users").await.into_iter().find(|d| d.get_str("name").unwrap() == "email_1").unwrap();
    assert!(!email.contains_key("unique"), "left as it was: {email:?}");
    assert!(r.to_string().contains("not changed"), "{r}");
}

#[tokio::test]
async fn undeclared_indexes_are_dropped_only_with_prune() {
    let env = Env::new().await;
    let users = env.database().await.collection::<Document>("users");
    users.create_index(mongodb::IndexModel::builder().keys(doc! { "legacy": 1 }).build()).await.unwrap();
    let dir = write_indexes(&env, "users.yaml", "- key: { email: 1 }\n");
    // A collection without a file is not looked at.
    env.database().await.collection::<Document>("other").create_index(mongodb::IndexModel::builder().keys(doc! { "x": 1 }).build()).await.unwrap();

    let r = sync_indexes(&env.cfg, &dir, &SyncOptions::default()).await.unwrap();
    assert_eq!(kinds(&r.actions), vec!["users.email_1:create", "users.legacy_1:extra"]);
    assert_eq!(env.index_names("users").await, vec!["_id_", "email_1", "legacy_1"]);
    assert!(r.has_drift());

    let r = sync_indexes(&env.cfg, &dir, &SyncOptions { prune: true, dry_run: false, ..SyncOptions::default() }).await.unwrap();
    assert_eq!(kinds(&r.actions), vec!["users.email_1:unchanged", "users.legacy_1:drop"]);
    assert_eq!(env.index_names("users").await, vec!["_id_", "email_1"], "_id_ is never touched");
    assert_eq!(env.index_names("other").await, vec!["_id_", "x_1"]);

    // An empty declaration with --prune leaves only _id_.
    let dir = write_indexes(&env, "users.yaml", "[]\n");
    sync_indexes(&env.cfg, &dir, &SyncOptions { prune: true, dry_run: false, ..SyncOptions::default() }).await.unwrap();
    assert_eq!(env.index_names("users").await, vec!["_id_"]);
}

#[tokio::test]
async fn dry_run_changes_nothing() {
    let env = Env::new().await;
    let users = env.database().await.collection::<Document>("users");
    users.create_index(mongodb::IndexModel::builder().keys(doc! { "legacy": 1 }).build()).await.unwrap();
    let dir = write_indexes(&env, "users.yaml", "- key: { email: 1 }\n");
    write_indexes(&env, "orders.json", r#"[{"key": {"customerId": 1, "createdAt": -1}}]"#);
    let r = sync_indexes(&env.cfg, &dir, &SyncOptions { prune: true, dry_run: true, ..SyncOptions::default() }).await.unwrap();
    assert_eq!(kinds(&r.actions), vec!["orders.customerId_1_createdAt_-1:create", "users.email_1:create", "users.legacy_1:drop"]);
    assert!(r.dry_run && r.applied == 0 && r.has_drift());
    let text = r.to_string();
    assert!(text.contains("+ users.email_1: create") && text.contains("- users.legacy_1: drop") && text.contains("nothing was changed"), "{text}");
    assert_eq!(env.index_names("users").await, vec!["_id_", "legacy_1"]);
    assert!(!env.collections().await.contains(&"orders".to_string()));
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["actions"][0]["action"], "create");
    assert_eq!(json["actions"][0]["spec"]["key"]["customerId"], 1);
}

#[tokio::test]
async fn bad_index_files_change_nothing() {
    let env = Env::new().await;
    let dir = write_indexes(&env, "a.yaml", "- key: { x: 1 }\n");
    write_indexes(&env, "b.yaml", "- key: { y: 1 }\n- key: { z: 1 }\n  uniqe: true\n");
    let e = sync_indexes(&env.cfg, &dir, &SyncOptions::default()).await.unwrap_err();
    let SyncError::BadFile { file, entry, .. } = &e else { panic!("{e}") };
    assert!(file.ends_with("b.yaml"));
    assert_eq!(entry.as_deref(), Some("entry 2"));
    assert!(e.to_string().contains("unknown field `uniqe`"), "{e}");
    assert!(env.collections().await.is_empty(), "a.yaml was not applied either");

    let e = sync_indexes(&env.cfg, &env.path().join("nope"), &SyncOptions::default()).await.unwrap_err();
    assert!(matches!(e, SyncError::Dir { .. }), "{e}");
}

#[tokio::test]
async fn a_refused_index_reports_the_server_code_and_what_was_done() {
    let env = Env::new().await;
    let users = env.database().await.collection::<Document>("users");
    users.insert_many(vec![doc! { "email": "a" }, doc! { "email": "a" }]).await.unwrap();
    let dir = write_indexes(&env, "users.yaml", "- key: { name: 1 }\n- key: { email: 1 }\n  unique: true\n");
    let e = sync_indexes(&env.cfg, &dir, &SyncOptions::default()).await.unwrap_err();
    let SyncError::Index { name, code, done, .. } = &e else { panic!("{e}") };
    assert_eq!(name, "email_1");
    assert_eq!(*code, Some(11000), "{e}");
    assert_eq!(done.len(), 1);
    assert_eq!(env.index_names("users").await, vec!["_id_", "name_1"]);
}

#[tokio::test]
async fn collection_status_reports_every_collection() {
    let env = Env::new().await;
    env.write("0001_users.yaml", "up:\n  - create: users\n    validator: { $jsonSchema: { bsonType: object, required: [email] } }\n  - createIndexes: users\n    indexes: [ { key: { email: 1 }, name: email_1, unique: true } ]\n  - insert: users\n    documents: [ { email: a }, { email: b }, { email: c } ]\n  - insert: events\n    documents: [ { n: 1 } ]\n");
    env.up().await.unwrap();
    let s = collection_status(&env.cfg, &["users".to_string(), "missing_one".to_string()], false).await.unwrap();
    let names: Vec<&str> = s.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, vec!["events", "missing_one", "users"], "kiln's own collections are left out");
    let users = &s[2];
    assert!(users.exists && users.validator);
    assert_eq!(users.documents, 3);
    assert!(users.exact, "small collections are counted exactly");
    assert_eq!(users.indexes, vec!["_id_", "email_1"]);
    assert!(!s[0].validator);
    assert_eq!(s[0].documents, 1);
    assert!(!s[1].exists && s[1].documents == 0 && s[1].indexes.is_empty());
    assert_eq!(users.to_string(), "users: 3 documents, 2 indexes (_id_, email_1), validator");
    assert_eq!(s[1].to_string(), "missing_one: missing");
    let exact = collection_status(&env.cfg, &[], true).await.unwrap();
    assert!(exact.iter().all(|c| c.exact));
    let json = serde_json::to_value(&exact).unwrap();
    assert_eq!(json[1]["indexes"][1], "email_1");
}

#[tokio::test]
async fn large_collections_are_estimated_unless_exact_is_asked() {
    let env = Env::new().await;
    let n = kiln_mongo::EXACT_COUNT_LIMIT + 1;
    let docs: Vec<Document> = (0..n).map(|i| doc! { "i": i as i64 }).collect();
    env.database().await.collection::<Document>("big").insert_many(docs).await.unwrap();
    let s = collection_status(&env.cfg, &[], false).await.unwrap();
    assert_eq!(s[0].name, "big");
    assert!(!s[0].exact, "estimated: {:?}", s[0]);
    assert!(s[0].documents > kiln_mongo::EXACT_COUNT_LIMIT, "{:?}", s[0]);
    assert!(s[0].to_string().starts_with("big: ~"), "{}", s[0]);
    let s = collection_status(&env.cfg, &[], true).await.unwrap();
    assert!(s[0].exact);
    assert_eq!(s[0].documents, n);
}

#[tokio::test]
async fn schema_snapshot_lists_collections_indexes_and_validators() {
    let env = Env::new().await;
    env.write("0001_users.yaml", "up:\n  - create: users\n    validator: { $jsonSchema: { bsonType: object, required: [email] } }\n  - createIndexes: users\n    indexes: [ { key: { email: 1 }, name: email_1, unique: true }, { key: { at: -1 }, name: at_ttl, expireAfterSeconds: 60 } ]\n  - create: plain\n");
    env.up().await.unwrap();
    let s = kiln_mongo::schema_snapshot(&env.cfg).await.unwrap();
    assert_eq!(s.objects.keys().collect::<Vec<_>>(), vec!["plain", "users"], "kiln's own collections are left out");
    let users = &s.objects["users"];
    assert_eq!(users.validator.as_ref().unwrap().required, vec!["email"]);
    assert!(users.indexes["email_1"].unique);
    assert_eq!(users.indexes["at_ttl"].columns, vec!["at:-1"]);
    assert_eq!(users.indexes["at_ttl"].options.as_deref(), Some("expireAfterSeconds=60"));
    assert!(s.objects["plain"].validator.is_none());
    let engine = kiln_mongo::MongoEngine::connect(&env.cfg).await.unwrap();
    assert_eq!(engine.snapshot().await.unwrap(), s);
    let contract = kiln_core::schema::dump(&s, true);
    assert!(kiln_core::schema::validate(&contract, &s).is_empty());
}
