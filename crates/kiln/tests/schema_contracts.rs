//! Schema contracts through the `kiln` binary on every engine: validation during
//! `up`, `kiln check` (all five reasons), drift with `kiln diff`, `schema dump`
//! and `kiln verify`. Each test has its own fresh database.

mod support;

use support::*;

macro_rules! per_engine {
    ($($scenario:ident),* $(,)?) => {
        mod postgres { use super::*; $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $scenario() { super::$scenario(Engine::Postgres).await } )* }
        mod mysql { use super::*; $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $scenario() { super::$scenario(Engine::Mysql).await } )* }
        mod sqlite { use super::*; $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $scenario() { super::$scenario(Engine::Sqlite).await } )* }
        mod mongodb { use super::*; $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $scenario() { super::$scenario(Engine::Mongodb).await } )* }
    };
}

per_engine!(
    breaking_migration_is_caught_and_rolled_back,
    missing_optional_only_warns,
    check_fails_for_each_reason_and_passes_when_good,
    hand_made_change_is_reported_by_diff_and_check,
    schema_dump_bootstraps_a_valid_contract,
    verify_passes_a_good_set_and_names_a_bad_down,
);

/// `users` with id + email, an index on email, and (MongoDB) a validator requiring email.
fn write_users(p: &Project) {
    if p.is_mongo() {
        p.write(
            "0001_create_users.yaml",
            "up:\n  - create: users\n    validator: { $jsonSchema: { bsonType: object, required: [email, name] } }\n  - createIndexes: users\n    indexes: [ { key: { email: 1 }, name: users_email_idx } ]\ndown:\n  - drop: users\n",
        );
    } else {
        p.write(
            "0001_create_users.sql",
            "-- kiln:up\nCREATE TABLE users (id bigint primary key, email varchar(200) not null, name varchar(100));\nCREATE INDEX users_email_idx ON users (email);\n-- kiln:down\nDROP TABLE users;\n",
        );
    }
}

fn write_contract(p: &Project, with_optional: bool) {
    let text = if p.is_mongo() {
        "collections:\n  users:\n    required: [email]\n    indexes: [users_email_idx]\n".to_string()
    } else {
        format!(
            "tables:\n  users:\n    required: [id, email]\n{}    indexes: [users_email_idx]\n",
            if with_optional { "    optional: [avatar_url]\n" } else { "" }
        )
    };
    std::fs::write(p.root.path().join("schema.yaml"), text).unwrap();
}

/// A migration that breaks the contract: drops `email` (SQL) or stops requiring it (MongoDB).
fn write_breaking(p: &Project, n: u32) {
    if p.is_mongo() {
        p.write(
            &format!("{n:04}_relax_users.yaml"),
            "up:\n  - collMod: users\n    validator: { $jsonSchema: { bsonType: object, required: [name] } }\ndown:\n  - collMod: users\n    validator: { $jsonSchema: { bsonType: object, required: [email, name] } }\n",
        );
    } else {
        let drop_index = if p.db.engine == Engine::Mysql { "DROP INDEX users_email_idx ON users;\n" } else { "DROP INDEX users_email_idx;\n" };
        p.write(
            &format!("{n:04}_drop_email.sql"),
            &format!(
                "-- kiln:up\n{drop_index}ALTER TABLE users DROP COLUMN email;\n-- kiln:down\nALTER TABLE users ADD COLUMN email varchar(200);\n"
            ),
        );
    }
}

/// kiln run with the project root as working directory, so ./schema.yaml is found.
fn kiln(p: &Project, args: &[&str]) -> Run {
    p.kiln(args)
}

async fn add_index_by_hand(p: &Project) {
    if p.is_mongo() {
        let client = ::mongodb::Client::with_uri_str(&p.db.url).await.unwrap();
        let db = client.default_database().unwrap();
        db.run_command(::mongodb::bson::doc! { "createIndexes": "users", "indexes": [ { "key": { "name": 1 }, "name": "by_hand_idx" } ] })
            .await
            .unwrap();
    } else {
        p.db.sql("CREATE INDEX by_hand_idx ON users (name)").await.unwrap();
    }
}

async fn breaking_migration_is_caught_and_rolled_back(e: Engine) {
    let p = Project::new(e).await;
    write_users(&p);
    write_contract(&p, false);
    p.add_create(2);
    write_breaking(&p, 3);
    let r = kiln(&p, &["up", "--json"]);
    r.fails_with(1);
    let err = &r.json()["error"];
    assert_eq!(err["code"], "schema_invalid", "{err}");
    assert_eq!(err["version"], "0003");
    let msgs = err["violations"].to_string();
    assert!(msgs.contains("email"), "{msgs}");
    assert_eq!(p.state_of("0001"), "applied");
    assert_eq!(p.state_of("0002"), "applied");
    match e {
        Engine::Postgres | Engine::Sqlite => {
            // rolled back: the column is still there, nothing recorded
            assert_eq!(err["rolled_back"], true);
            assert_eq!(p.state_of("0003"), "pending");
            let cols =
                p.db.query_strings(match e {
                    Engine::Postgres => "SELECT column_name FROM information_schema.columns WHERE table_name = 'users' AND column_name = 'email'",
                    _ => "SELECT name FROM pragma_table_info('users') WHERE name = 'email'",
                })
                .await
                .unwrap();
            assert_eq!(cols, vec!["email"]);
        }
        _ => {
            // DDL committed: recorded failed, further runs refused until repair
            assert_eq!(err["rolled_back"], false);
            assert_eq!(p.state_of("0003"), "failed");
            kiln(&p, &["up"]).fails_with(1);
        }
    }
}

async fn missing_optional_only_warns(e: Engine) {
    let p = Project::new(e).await;
    write_users(&p);
    write_contract(&p, true);
    kiln(&p, &["up"]).ok();
    let r = kiln(&p, &["check", "--json"]);
    r.ok();
    let v = r.json();
    assert_eq!(v["ok"], true);
    if !p.is_mongo() {
        let warnings: Vec<&serde_json::Value> = v["violations"].as_array().unwrap().iter().filter(|x| x["severity"] == "warning").collect();
        assert_eq!(warnings.len(), 1, "{v}");
        assert!(warnings[0]["message"].as_str().unwrap().contains("avatar_url"));
        let human = kiln(&p, &["check"]);
        human.ok();
        assert!(human.stdout.contains("avatar_url") && human.stdout.contains("warning"), "{}", human.stdout);
    }
}

async fn check_fails_for_each_reason_and_passes_when_good(e: Engine) {
    let p = Project::new(e).await;
    write_users(&p);
    write_contract(&p, false);
    // 1. pending
    let r = kiln(&p, &["check", "--json"]);
    r.fails_with(1);
    assert_eq!(r.json()["pending"].as_array().unwrap().len(), 1);
    // good
    kiln(&p, &["up"]).ok();
    let r = kiln(&p, &["check", "--json"]);
    r.ok();
    assert_eq!(r.json()["ok"], true, "{}", r.stdout);
    assert_eq!(r.json()["snapshot_found"], true);

    // 3. checksum mismatch
    let ext = if p.is_mongo() { "yaml" } else { "sql" };
    let f = p.dir().join(format!("0001_create_users.{ext}"));
    let original = std::fs::read_to_string(&f).unwrap();
    std::fs::write(&f, format!("{original}{}", if p.is_mongo() { "# edited\n" } else { "-- edited\n" })).unwrap();
    let r = kiln(&p, &["check", "--json"]);
    r.fails_with(1);
    assert_eq!(r.json()["changed"].as_array().unwrap().len(), 1, "{}", r.stdout);
    std::fs::write(&f, &original).unwrap();
    kiln(&p, &["check"]).ok();

    // 4. invalid schema: the contract asks for something the database lacks
    let contract = p.root.path().join("schema.yaml");
    let good = std::fs::read_to_string(&contract).unwrap();
    let stricter = if p.is_mongo() {
        good.replace("required: [email]", "required: [email, phone]")
    } else {
        good.replace("required: [id, email]", "required: [id, email, phone]")
    };
    std::fs::write(&contract, stricter).unwrap();
    let r = kiln(&p, &["check", "--json"]);
    r.fails_with(1);
    assert!(r.json()["violations"].to_string().contains("phone"), "{}", r.stdout);
    std::fs::write(&contract, good).unwrap();

    // 5. drift
    add_index_by_hand(&p).await;
    let r = kiln(&p, &["check", "--json"]);
    r.fails_with(1);
    assert!(r.json()["drift"].to_string().contains("by_hand_idx"), "{}", r.stdout);

    // 2. failed migration (a fresh project: the failure must be recorded)
    let q = Project::new(e).await;
    write_users(&q);
    q.add_failing_after_create(2);
    kiln(&q, &["up"]).fails_with(1);
    let r = kiln(&q, &["check", "--json"]);
    r.fails_with(1);
    let v = r.json();
    if matches!(e, Engine::Mysql | Engine::Mongodb) {
        assert_eq!(v["failed"].as_array().unwrap().len(), 1, "{v}");
    } else {
        // rolled back: it is pending again
        assert_eq!(v["pending"].as_array().unwrap().len(), 1, "{v}");
    }
}

async fn hand_made_change_is_reported_by_diff_and_check(e: Engine) {
    let p = Project::new(e).await;
    write_users(&p);
    kiln(&p, &["up"]).ok();
    let r = kiln(&p, &["diff", "--json"]);
    r.ok();
    assert_eq!(r.json()["changes"].as_array().unwrap().len(), 0);
    add_index_by_hand(&p).await;
    let r = kiln(&p, &["diff"]);
    r.fails_with(1);
    assert!(r.stdout.contains("by_hand_idx") && r.stdout.contains("added"), "{}", r.stdout);
    let r = kiln(&p, &["check"]);
    r.fails_with(1);
    assert!(r.stdout.contains("drift") && r.stdout.contains("by_hand_idx"), "{}", r.stdout);
}

async fn schema_dump_bootstraps_a_valid_contract(e: Engine) {
    let p = Project::new(e).await;
    write_users(&p);
    kiln(&p, &["up"]).ok();
    let out = p.root.path().join("schema.yaml");
    kiln(&p, &["schema", "dump", "--output", out.to_str().unwrap()]).ok();
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.contains("users") && text.contains("users_email_idx"), "{text}");
    assert!(!text.contains("kiln_history"), "kiln's own tables must not be dumped: {text}");
    // the dumped contract holds for the database it came from
    let r = kiln(&p, &["check", "--json"]);
    r.ok();
    assert_eq!(r.json()["contract_checked"], true);
    // and refuses to overwrite
    kiln(&p, &["schema", "dump", "--output", out.to_str().unwrap()]).fails_with(2);
}

async fn verify_passes_a_good_set_and_names_a_bad_down(e: Engine) {
    let p = Project::new(e).await;
    write_users(&p);
    p.add_create(2);
    write_contract(&p, false);
    // kiln creates (and drops) the scratch database on the configured server
    let r = kiln(&p, &["verify", "--json"]);
    r.ok();
    assert_eq!(r.json()["ok"], true, "{}", r.stdout);
    // the configured database itself is untouched
    assert!(p.objects().await.is_empty());

    // a down that forgets to drop an index
    if p.is_mongo() {
        p.write("0003_add_name_index.yaml", "up:\n  - createIndexes: users\n    indexes: [ { key: { name: 1 }, name: users_name_idx } ]\ndown: []\n");
    } else {
        p.write("0003_add_name_index.sql", "-- kiln:up\nCREATE INDEX users_name_idx ON users (name);\n-- kiln:down\n");
    }
    let scratch2 = TestDb::new(e).await;
    let r = kiln(&p, &["verify", "--scratch-url", &scratch2.url, "--json"]);
    r.fails_with(1);
    let v = r.json();
    let findings = v["findings"].as_array().unwrap();
    assert!(!findings.is_empty());
    assert_eq!(findings[0]["migration"], "0003_add_name_index", "{v}");
    assert!(findings[0]["differences"].to_string().contains("users_name_idx"), "{v}");
    let human = kiln(&p, &["verify", "--scratch-url", &TestDb::new(e).await.url]);
    human.fails_with(1);
    assert!(human.stdout.contains("0003_add_name_index") && human.stdout.contains("does not undo"), "{}", human.stdout);
}
