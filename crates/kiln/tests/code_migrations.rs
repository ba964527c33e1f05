//! Rust-code migrations on every engine: mixed with file migrations in one
//! order, recorded in the same history, refused like an edited file when
//! their checksum string changes, rolled back where the engine has
//! transactions and recorded `failed` where it has not.

use kiln::{CodeContext, CodeError, CodeMigration};
use kiln_testkit::{Engine, TestDb};
use serde_json::json;

/// 0002: lower-cases every user's e-mail, reading the rows and writing them
/// back through the context (SQL `query` + `execute`, MongoDB commands).
struct LowercaseEmails {
    checksum: &'static str,
    fail: bool,
}

#[kiln::async_trait]
impl CodeMigration for LowercaseEmails {
    fn version(&self) -> &str {
        "0002"
    }
    fn name(&self) -> &str {
        "lowercase_emails"
    }
    fn checksum(&self) -> &str {
        self.checksum
    }
    fn group(&self) -> Option<&str> {
        Some("users")
    }
    fn reversible(&self) -> bool {
        true
    }
    async fn up(&self, db: &mut dyn CodeContext) -> Result<(), CodeError> {
        if db.engine() == "mongodb" {
            let reply = db.run_command(json!({ "find": "users", "filter": {}, "sort": { "_id": 1 } })).await?;
            let docs = reply["cursor"]["firstBatch"].as_array().cloned().unwrap_or_default();
            for d in docs {
                let email = d["email"].as_str().unwrap_or_default().to_lowercase();
                db.run_command(json!({ "update": "users", "updates": [ { "q": { "_id": d["_id"] }, "u": { "$set": { "email": email } } } ] }))
                    .await?;
            }
            // The driver is there too, for what commands cannot say.
            let h = kiln::mongo::handle(db).expect("a MongoDB handle");
            let n = h.db.collection::<mongodb::bson::Document>("users").count_documents(mongodb::bson::doc! {}).await?;
            assert_eq!(n, 3);
        } else {
            assert!(kiln::mongo::handle(db).is_none());
            let rows = db.query("SELECT id, email FROM users ORDER BY id").await?;
            assert_eq!(rows.len(), 3);
            for r in rows {
                let id = r["id"].as_i64().ok_or("id is not a number")?;
                let email = r["email"].as_str().ok_or("email is not text")?.to_lowercase();
                let n = db.execute(&format!("UPDATE users SET email = '{}' WHERE id = {id}", email.replace('\'', "''"))).await?;
                assert_eq!(n, 1);
            }
        }
        if self.fail {
            return Err("deliberate failure after the update".into());
        }
        Ok(())
    }
    async fn down(&self, db: &mut dyn CodeContext) -> Result<(), CodeError> {
        if db.engine() == "mongodb" {
            db.run_command(json!({ "update": "users", "updates": [ { "q": {}, "u": { "$set": { "reverted": true } }, "multi": true } ] })).await?;
        } else {
            db.execute("UPDATE users SET email = upper(email)").await?;
        }
        Ok(())
    }
}

/// 0001 creates users with three upper-case e-mails, 0003 (after the code
/// migration) adds a table/collection.
fn files(engine: Engine) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let w = |name: &str, text: &str| std::fs::write(d.path().join(name), text).unwrap();
    if engine == Engine::Mongodb {
        w(
            "0001_users.yaml",
            "up:\n  - insert: users\n    documents: [{ _id: 1, email: A@X.IO }, { _id: 2, email: B@X.IO }, { _id: 3, email: \"O'C@X.IO\" }]\ndown:\n  - drop: users\n",
        );
        w("0003_calls.yaml", "up:\n  - create: calls\ndown:\n  - drop: calls\n");
    } else {
        w(
            "0001_users.sql",
            "-- kiln:up\nCREATE TABLE users (id INT PRIMARY KEY, email VARCHAR(100) NOT NULL);\nINSERT INTO users VALUES (1, 'A@X.IO'), (2, 'B@X.IO'), (3, 'O''C@X.IO');\n-- kiln:down\nDROP TABLE users;\n",
        );
        w("0003_calls.sql", "-- kiln:up\nCREATE TABLE calls (id INT);\n-- kiln:down\nDROP TABLE calls;\n");
    }
    d
}

async fn emails(db: &TestDb) -> Vec<String> {
    if db.engine == Engine::Mongodb {
        kiln_testkit::mongo::documents(&db.url, "users").await.iter().map(|d| d.get_str("email").unwrap().to_string()).collect()
    } else {
        db.query_strings("SELECT email FROM users ORDER BY id").await.unwrap()
    }
}

async fn code_migrations_on(engine: Engine) {
    let db = TestDb::new(engine).await;
    let dir = files(engine);
    let kiln = |checksum: &'static str, fail: bool| kiln::Kiln::new(&db.url).dir(dir.path()).code(LowercaseEmails { checksum, fail });

    // A failing code migration: rolled back with its transaction where the
    // engine has one (SQLite, PostgreSQL); recorded `failed` where it has not.
    let err = kiln("v1", true).up().await.expect_err("the code fails");
    let text = err.to_string();
    assert!(text.contains("deliberate failure") && text.contains("code:0002_lowercase_emails"), "{engine:?}: {text}");
    let history = kiln("v1", false).status().await.unwrap();
    let state_of = |v: &str| history.iter().find(|r| r.version == v).map(|r| r.state.clone()).unwrap();
    assert_eq!(state_of("0001"), "applied");
    match engine {
        Engine::Sqlite | Engine::Postgres => {
            assert_eq!(state_of("0002"), "pending", "{engine:?}: rolled back");
            assert_eq!(emails(&db).await, ["A@X.IO", "B@X.IO", "O'C@X.IO"], "{engine:?}: the update was rolled back");
        }
        Engine::Mysql | Engine::Mongodb => {
            assert_eq!(state_of("0002"), "failed", "{engine:?}: what the code did cannot be rolled back");
            // The operator checks the database and accepts it, as for a failed file.
            let r = kiln::Kiln::new(&db.url).dir(dir.path()).code(LowercaseEmails { checksum: "v1", fail: false });
            let mut b = kiln::connect(r.backend_config()).await.unwrap();
            let local = r.load().unwrap();
            r.runner(b.as_mut(), None).repair(&local, Some(&kiln::Version::parse_arg("0002").unwrap()), true, "checked by the test").await.unwrap();
            let _ = b.close().await;
        }
    }

    // Mixed with the files in one order.
    let report = kiln("v1", false).up().await.unwrap();
    let applied: Vec<&str> = report.steps.iter().map(|s| s.version.as_str()).collect();
    match engine {
        Engine::Sqlite | Engine::Postgres => assert_eq!(applied, ["0002", "0003"]),
        _ => assert_eq!(applied, ["0003"]),
    }
    assert_eq!(emails(&db).await, ["a@x.io", "b@x.io", "o'c@x.io"], "{engine:?}");
    let rows = kiln("v1", false).status().await.unwrap();
    let row = rows.iter().find(|r| r.version == "0002").unwrap();
    assert_eq!(row.state, "applied");
    assert_eq!(row.group.as_deref(), Some("users"));

    // A changed checksum string is refused like an edited file.
    let err = kiln("v2", false).up().await.expect_err("the checksum string changed");
    let kiln::Error::Run(kiln::RunError::Plan(problems)) = &err else { panic!("{engine:?}: {err:?}") };
    assert_eq!(problems.iter().map(|p| p.code()).collect::<Vec<_>>(), ["checksum_mismatch"], "{engine:?}: {err}");
    assert!(err.to_string().contains("code:0002_lowercase_emails"), "{err}");

    // Down runs the code's down.
    let r = kiln("v1", false);
    let mut b = kiln::connect(r.backend_config()).await.unwrap();
    let local = r.load().unwrap();
    let down = r.runner(b.as_mut(), None).down(&local, &kiln::DownTarget::Steps(2), false).await.unwrap();
    let _ = b.close().await;
    assert_eq!(down.steps.iter().map(|s| s.version.as_str()).collect::<Vec<_>>(), ["0003", "0002"]);
    if engine == Engine::Mongodb {
        let docs = kiln_testkit::mongo::documents(&db.url, "users").await;
        assert!(docs.iter().all(|d| d.get_bool("reverted") == Ok(true)), "{docs:?}");
    } else {
        assert_eq!(emails(&db).await, ["A@X.IO", "B@X.IO", "O'C@X.IO"]);
    }
}

#[tokio::test]
async fn code_migrations_on_sqlite() {
    code_migrations_on(Engine::Sqlite).await;
}

#[tokio::test]
async fn code_migrations_on_postgres() {
    code_migrations_on(Engine::Postgres).await;
}

#[tokio::test]
async fn code_migrations_on_mysql() {
    code_migrations_on(Engine::Mysql).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_migrations_on_mongodb() {
    code_migrations_on(Engine::Mongodb).await;
}

#[test]
fn a_code_migration_with_a_file_s_version_is_refused() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("0002_users.sql"), "select 1;").unwrap();
    let err = kiln::Kiln::new("sqlite://x.db").dir(d.path()).code(LowercaseEmails { checksum: "v1", fail: false }).load().unwrap_err();
    let text = err.to_string();
    assert!(text.contains("duplicate version 0002") && text.contains("code:0002_lowercase_emails"), "{text}");
}
