//! `kiln sync` through the binary: it is a kiln run (the snapshot is stored,
//! so `kiln check` passes right after it), `--prune` never silently drops an
//! index an applied migration created, and a differing index exits 1.

mod support;

use support::*;

fn setup(p: &Project) {
    p.write(
        "0001_users.yaml",
        "up:\n  - create: users\n  - createIndexes: users\n    indexes: [ { key: { email: 1 }, name: email_1 } ]\ndown:\n  - drop: users\n",
    );
    std::fs::create_dir_all(p.root.path().join("indexes")).unwrap();
    std::fs::write(p.root.path().join("indexes/users.yaml"), "- key: { name: 1 }\n").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_then_check_passes_and_prune_keeps_migrated_indexes() {
    let p = Project::new(Engine::Mongodb).await;
    setup(&p);
    p.kiln(&["up"]).ok();
    p.kiln(&["check"]).ok();
    // Before the fix, check failed here with "drift since the last kiln run".
    let s = p.kiln(&["sync"]);
    s.ok();
    assert!(s.stdout.contains("name_1"), "{}", s.stdout);
    let c = p.kiln(&["check"]);
    assert_eq!(c.code, 0, "check right after sync:\n{}", c.text());

    // --prune names the migration that created email_1 and keeps it (exit 1).
    let pr = p.kiln(&["sync", "--prune"]);
    pr.fails_with(1);
    assert!(pr.stdout.contains("0001_users") && pr.stdout.contains("email_1"), "{}", pr.stdout);
    let json = p.kiln(&["sync", "--prune", "--dry-run", "--json"]);
    let actions = json.json()["actions"].as_array().unwrap().clone();
    assert!(actions.iter().any(|a| a["action"] == "protected" && a["name"] == "email_1" && a["created_by"] == "0001_users"), "{actions:?}");

    // With --drop-migrated it goes, and check still passes afterwards.
    p.kiln(&["sync", "--prune", "--drop-migrated"]).ok();
    let after = p.kiln(&["sync", "--dry-run", "--json"]);
    let names: Vec<String> = after.json()["actions"].as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names, ["name_1"], "{}", after.stdout);
    assert_eq!(p.kiln(&["check"]).code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_differing_index_exits_1() {
    let p = Project::new(Engine::Mongodb).await;
    setup(&p);
    p.kiln(&["up"]).ok();
    // Declared as unique, but the migration made it plain.
    std::fs::write(p.root.path().join("indexes/users.yaml"), "- key: { email: 1 }\n  unique: true\n").unwrap();
    let s = p.kiln(&["sync"]);
    s.fails_with(1);
    assert!(s.stdout.contains("email_1") && s.stdout.contains("unique"), "{}", s.stdout);
}
