//! `kiln db create` / `kiln db drop` through the binary on every engine:
//! create is idempotent, drop needs --yes, and both say what they did.

mod support;

use support::*;

async fn create_and_drop(engine: Engine) {
    let p = Project::new(engine).await;
    let url = match engine {
        Engine::Sqlite => format!("sqlite://{}", p.root.path().join("made.db").display()),
        _ => p.db.url.replacen(&format!("/{}", p.db.name), &format!("/{}_made", p.db.name), 1),
    };
    let on = |args: &[&str]| output_to_run(kiln_cmd(p.root.path()).args(["--url", &url, "--dir"]).arg(p.dir()).args(args).output().unwrap());
    let db = |args: &[&str]| on(&[&["db"], args].concat());
    let created = db(&["create", "--json"]);
    created.ok();
    let made = created.json()["changed"] == true;
    // MongoDB makes a database on its first write: create has nothing to do.
    assert_eq!(made, engine != Engine::Mongodb, "{}", created.stdout);
    assert_eq!(db(&["create", "--json"]).json()["changed"], false, "the second create finds it");
    p.add_create(1);
    on(&["up"]).ok();
    let refused = db(&["drop"]);
    refused.fails_with(2);
    assert!(refused.stderr.contains("--yes"), "{}", refused.stderr);
    assert_eq!(on(&["status", "--json"]).json()["migrations"][0]["state"], "applied", "still there");
    let dropped = db(&["drop", "--yes", "--json"]);
    dropped.ok();
    assert_eq!(dropped.json()["changed"], true, "{}", dropped.stdout);
    assert_eq!(db(&["drop", "--yes", "--json"]).json()["changed"], false, "gone");
    if engine == Engine::Sqlite {
        assert!(!p.root.path().join("made.db").exists());
    }
}

#[tokio::test]
async fn db_create_and_drop_postgres() {
    create_and_drop(Engine::Postgres).await;
}

#[tokio::test]
async fn db_create_and_drop_mysql() {
    create_and_drop(Engine::Mysql).await;
}

#[tokio::test]
async fn db_create_and_drop_sqlite() {
    create_and_drop(Engine::Sqlite).await;
}

#[tokio::test]
async fn db_create_and_drop_mongodb() {
    create_and_drop(Engine::Mongodb).await;
}
