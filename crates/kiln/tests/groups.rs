//! `kiln down --group NAME` through the binary: only that group's
//! migrations are reverted, and never one that an applied migration of
//! another group depends on.

mod support;

use support::*;

#[tokio::test]
async fn down_reverts_one_group_and_respects_dependencies() {
    let p = Project::new(Engine::Sqlite).await;
    p.write("users/0001_users.sql", "-- kiln:up\nCREATE TABLE users (id INT);\n-- kiln:down\nDROP TABLE users;\n");
    p.write("assistants/0002_assistants.sql", "-- kiln:up\nCREATE TABLE assistants (id INT);\n-- kiln:down\nDROP TABLE assistants;\n");
    p.write(
        "schedules/0003_schedules.sql",
        "-- kiln:depends 0001\n-- kiln:up\nCREATE TABLE schedules (id INT);\n-- kiln:down\nDROP TABLE schedules;\n",
    );
    p.kiln(&["up"]).ok();
    // The last batch holds all three; only the group's one goes.
    let a = p.kiln(&["down", "--group", "assistants", "--json"]);
    a.ok();
    let reverted: Vec<String> = a.json()["steps"].as_array().unwrap().iter().map(|s| s["version"].as_str().unwrap().to_string()).collect();
    assert_eq!(reverted, ["0002"]);
    assert_eq!(p.states(), names_pairs(&[("0001", "applied"), ("0002", "pending"), ("0003", "applied")]));
    // users cannot go while schedules (applied, another group) depends on it.
    let refused = p.kiln(&["down", "--group", "users"]);
    refused.fails_with(1);
    assert!(refused.stderr.contains("schedules/0003_schedules.sql depends on 0001"), "{}", refused.stderr);
    assert_eq!(p.state_of("0001"), "applied", "nothing was reverted");
    p.kiln(&["down", "--collection", "schedules"]).ok();
    p.kiln(&["down", "--group", "users", "--dry-run"]).ok();
    assert_eq!(p.state_of("0001"), "applied", "a dry run reverts nothing");
    p.kiln(&["down", "--group", "users"]).ok();
    assert_eq!(p.state_of("0001"), "pending");
    let unknown = p.kiln(&["down", "--group", "nope"]);
    unknown.fails_with(2);
    assert!(unknown.stderr.contains("assistants, schedules, users"), "{}", unknown.stderr);
}

fn names_pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}
