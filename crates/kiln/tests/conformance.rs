//! The conformance suite: every engine must behave the same way through the
//! `kiln` binary. Each scenario is written once and instantiated per engine;
//! every test gets its own fresh database (kiln-testkit).

mod support;

use support::*;

macro_rules! conformance {
    ($($scenario:ident),* $(,)?) => {
        mod postgres { use super::*; $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $scenario() { super::$scenario(Engine::Postgres).await } )* }
        mod mysql { use super::*; $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $scenario() { super::$scenario(Engine::Mysql).await } )* }
        mod sqlite { use super::*; $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $scenario() { super::$scenario(Engine::Sqlite).await } )* }
        mod mongodb { use super::*; $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $scenario() { super::$scenario(Engine::Mongodb).await } )* }
    };
}

conformance!(
    up_status_down_up_again,
    dry_run_changes_nothing,
    failure_in_the_middle_of_a_batch,
    tampered_file_stops_the_run,
    duplicate_version_is_refused,
    bad_name_is_refused,
    unmet_dependency_is_refused,
    out_of_order_is_refused_unless_allowed,
    baseline_records_without_running,
    retire_removes_from_every_plan,
    repair_accepts_a_deliberate_change,
    irreversible_stops_down_before_anything,
    down_steps_and_to,
    eight_concurrent_runners_apply_each_migration_once,
);

async fn up_status_down_up_again(e: Engine) {
    let p = Project::new(e).await;
    for n in 1..=3 {
        p.add_create(n);
    }
    let r = p.kiln(&["up", "--json"]);
    r.ok();
    assert_eq!(r.json()["steps"].as_array().unwrap().len(), 3);
    assert_eq!(r.json()["batch"], 1);
    assert_eq!(p.objects().await, names(&["t_1", "t_2", "t_3"]));

    // status: every migration applied, checksums match, batch 1
    let s = p.kiln(&["status", "--json"]);
    s.ok();
    let rows = s.json()["migrations"].as_array().unwrap().clone();
    assert_eq!(rows.len(), 3);
    for row in &rows {
        assert_eq!(row["state"], "applied", "{row}");
        assert_eq!(row["batch"], 1);
        assert_eq!(row["checksum_ok"], true);
        assert!(row["applied_by"].as_str().unwrap().contains('@'));
        assert!(row["applied_at"].is_string());
    }
    // human status names every migration
    let h = p.kiln(&["status"]);
    h.ok();
    assert!(h.stdout.contains("create_t_2") && h.stdout.contains("applied"), "{}", h.stdout);

    // a second batch
    p.add_create(4);
    let r = p.kiln(&["up", "--json"]);
    r.ok();
    assert_eq!(r.json()["batch"], 2);
    // no-op up
    let r = p.kiln(&["up", "--json"]);
    r.ok();
    assert_eq!(r.json()["steps"].as_array().unwrap().len(), 0);

    // down reverts only the last batch
    let r = p.kiln(&["down", "--json"]);
    r.ok();
    let reverted: Vec<String> = r.json()["steps"].as_array().unwrap().iter().map(|s| s["version"].as_str().unwrap().to_string()).collect();
    assert_eq!(reverted, vec!["0004"]);
    assert_eq!(p.objects().await, names(&["t_1", "t_2", "t_3"]));
    assert_eq!(p.state_of("0004"), "pending");
    // down again reverts batch 1, newest first
    let r = p.kiln(&["down", "--json"]);
    r.ok();
    let order: Vec<String> = r.json()["steps"].as_array().unwrap().iter().map(|s| s["version"].as_str().unwrap().to_string()).collect();
    assert_eq!(order, vec!["0003", "0002", "0001"]);
    assert!(p.objects().await.is_empty());
    // and up again applies everything
    p.kiln(&["up"]).ok();
    assert_eq!(p.objects().await, names(&["t_1", "t_2", "t_3", "t_4"]));
    assert!(p.states().iter().all(|(_, s)| s == "applied"));
}

async fn dry_run_changes_nothing(e: Engine) {
    let p = Project::new(e).await;
    p.add_create(1);
    p.add_create(2);
    let r = p.kiln(&["up", "--dry-run"]);
    r.ok();
    assert!(r.stdout.contains("0001") && r.stdout.contains("0002") && r.stdout.contains("nothing was changed"), "{}", r.stdout);
    assert!(p.objects().await.is_empty());
    // not even the history table/collection
    let kiln_objects = p.db.objects("kiln_").await.unwrap();
    assert!(kiln_objects.is_empty(), "dry run created {kiln_objects:?}");
    // dry-run down after a real up changes nothing either
    p.kiln(&["up"]).ok();
    let r = p.kiln(&["down", "--dry-run", "--json"]);
    r.ok();
    assert_eq!(r.json()["steps"].as_array().unwrap().len(), 2);
    assert_eq!(p.objects().await, names(&["t_1", "t_2"]));
}

async fn failure_in_the_middle_of_a_batch(e: Engine) {
    let p = Project::new(e).await;
    p.add_create(1);
    p.add_failing_after_create(2);
    p.add_create(3);
    let r = p.kiln(&["up"]);
    r.fails_with(1);
    // the error names the file, the statement and carries the database's message
    let text = r.text();
    assert!(text.contains("0002_broken_2"), "{text}");
    assert!(text.contains("statement 2"), "{text}");
    assert!(text.contains("applied in this run before the failure") && text.contains("0001"), "{text}");
    // the migration before the failure stays applied, the one after never ran
    assert_eq!(p.state_of("0001"), "applied");
    assert_eq!(p.state_of("0003"), "pending");
    let objects = p.objects().await;
    assert!(objects.contains(&"t_1".to_string()));
    assert!(!objects.contains(&"t_3".to_string()));

    let json = p.kiln(&["up", "--json"]);
    if matches!(e, Engine::Postgres | Engine::Sqlite) {
        // transactional DDL: nothing of the failed migration remains, nothing recorded
        assert!(!objects.contains(&"t_2".to_string()), "{objects:?}");
        assert_eq!(p.state_of("0002"), "pending");
        // and the next run fails the same way, cleanly
        json.fails_with(1);
        assert_eq!(json.json()["error"]["code"], "migration_failed");
        assert_eq!(json.json()["error"]["rolled_back"], true);
    } else {
        // DDL commits implicitly: recorded failed, and the next run is refused until repair
        assert_eq!(p.state_of("0002"), "failed");
        json.fails_with(1);
        let err = &json.json()["error"];
        assert_eq!(err["code"], "plan_refused", "{err}");
        assert!(err["message"].as_str().unwrap().contains("kiln repair 0002"), "{err}");
        // the operator cleans up by hand, fixes the file… here: repairs by removing the entry
        p.kiln(&["repair", "0002", "--reason", "dropped t_2 by hand"]).ok();
        assert_eq!(p.state_of("0002"), "pending");
    }
}

async fn tampered_file_stops_the_run(e: Engine) {
    let p = Project::new(e).await;
    p.add_create(1);
    p.kiln(&["up"]).ok();
    // change the applied file
    let file = std::fs::read_dir(p.dir()).unwrap().next().unwrap().unwrap().path();
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str(if p.is_mongo() { "# tampered\n" } else { "-- tampered\n" });
    std::fs::write(&file, text).unwrap();
    p.add_create(2);
    let r = p.kiln(&["up", "--json"]);
    r.fails_with(1);
    let err = &r.json()["error"];
    assert_eq!(err["problems"][0]["code"], "checksum_mismatch", "{err}");
    let msg = err["message"].as_str().unwrap();
    assert!(msg.contains("0001_create_t_1") && msg.contains("recorded"), "{msg}");
    // nothing ran
    assert_eq!(p.objects().await, names(&["t_1"]));
    assert_eq!(p.state_of("0002"), "pending");
    // status shows the change
    let s = p.kiln(&["status", "--json"]);
    assert_eq!(s.json()["migrations"][0]["checksum_ok"], false);
}

async fn duplicate_version_is_refused(e: Engine) {
    let p = Project::new(e).await;
    p.add_create(1);
    let ext = if p.is_mongo() { "yaml" } else { "sql" };
    let body = if p.is_mongo() { "up:\n  - create: t_x\n" } else { "CREATE TABLE t_x (id int);\n" };
    p.write(&format!("001_other.{ext}"), body);
    let r = p.kiln(&["up", "--json"]);
    r.fails_with(2);
    assert_eq!(r.json()["error"]["code"], "duplicate_version");
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("0001_create_t_1") && msg.contains("001_other"), "{msg}");
    assert!(p.objects().await.is_empty());
}

async fn bad_name_is_refused(e: Engine) {
    let p = Project::new(e).await;
    p.add_create(1);
    let ext = if p.is_mongo() { "yaml" } else { "sql" };
    let body = if p.is_mongo() { "up:\n  - create: t_x\n" } else { "CREATE TABLE t_x (id int);\n" };
    p.write(&format!("0002_Add-Thing.{ext}"), body);
    let r = p.kiln(&["up"]);
    r.fails_with(2);
    assert!(r.stderr.contains("0002_Add-Thing") && r.stderr.contains("naming rule"), "{}", r.stderr);
    assert!(p.objects().await.is_empty());
    // create refuses such a name too
    let c = p.kiln(&["create", "Add-Thing"]);
    c.fails_with(2);
}

async fn unmet_dependency_is_refused(e: Engine) {
    let p = Project::new(e).await;
    p.add_create(1);
    if p.is_mongo() {
        p.write("0002_needs_missing.yaml", "depends: [0009_not_there]\nup:\n  - create: t_2\n");
    } else {
        p.write("0002_needs_missing.sql", "-- kiln:depends 0009_not_there\nCREATE TABLE t_2 (id int);\n");
    }
    let r = p.kiln(&["up", "--json"]);
    // A `depends` naming nothing is a bad file: exit 2, like a bad name (issue 8.9).
    r.fails_with(2);
    let err = &r.json()["error"];
    assert_eq!(err["problems"][0]["code"], "unknown_dependency", "{err}");
    assert!(err["message"].as_str().unwrap().contains("0002_needs_missing"), "{err}");
    assert!(p.objects().await.is_empty(), "nothing may run when the plan is refused");

    // a dependency in another group that is not applied: unmet for a group-only run
    std::fs::remove_file(p.dir().join(if p.is_mongo() { "0002_needs_missing.yaml" } else { "0002_needs_missing.sql" })).unwrap();
    if p.is_mongo() {
        p.write("0003_users_part.yaml", "group: users\ndepends: [0001_create_t_1]\nup:\n  - create: t_3\n");
    } else {
        p.write("0003_users_part.sql", "-- kiln:group users\n-- kiln:depends 0001_create_t_1\nCREATE TABLE t_3 (id int);\n");
    }
    let r = p.kiln(&["up", "--group", "users", "--json"]);
    r.fails_with(1);
    assert_eq!(r.json()["error"]["problems"][0]["code"], "unmet_dependency");
    // once the dependency is applied, the group run works
    p.kiln(&["up", "--to", "0001"]).ok();
    p.kiln(&["up", "--group", "users"]).ok();
    assert_eq!(p.objects().await, names(&["t_1", "t_3"]));
}

async fn out_of_order_is_refused_unless_allowed(e: Engine) {
    let p = Project::new(e).await;
    p.add_create(1);
    p.add_create(3);
    p.kiln(&["up"]).ok();
    p.add_create(2);
    let r = p.kiln(&["up", "--json"]);
    r.fails_with(1);
    assert_eq!(r.json()["error"]["problems"][0]["code"], "out_of_order");
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("0002_create_t_2"));
    assert_eq!(p.objects().await, names(&["t_1", "t_3"]));
    p.kiln(&["up", "--allow-out-of-order"]).ok();
    assert_eq!(p.objects().await, names(&["t_1", "t_2", "t_3"]));
    assert_eq!(p.state_of("0002"), "applied");
}

async fn baseline_records_without_running(e: Engine) {
    let p = Project::new(e).await;
    for n in 1..=3 {
        p.add_create(n);
    }
    let r = p.kiln(&["baseline", "0002", "--reason", "existing production db", "--json"]);
    r.ok();
    assert_eq!(r.json()["changes"].as_array().unwrap().len(), 2);
    assert_eq!(p.state_of("0001"), "baseline");
    assert_eq!(p.state_of("0002"), "baseline");
    assert_eq!(p.state_of("0003"), "pending");
    assert!(p.objects().await.is_empty(), "baseline must not run anything");
    p.kiln(&["up"]).ok();
    assert_eq!(p.objects().await, names(&["t_3"]));
    // a second baseline is refused
    p.kiln(&["baseline", "0003"]).fails_with(1);
    // down stops at baseline entries: 0003 reverts, then refusal
    p.kiln(&["down"]).ok();
    let r = p.kiln(&["down", "--json"]);
    r.fails_with(1);
    assert_eq!(r.json()["error"]["problems"][0]["code"], "not_revertible");
}

async fn retire_removes_from_every_plan(e: Engine) {
    let p = Project::new(e).await;
    p.add_create(1);
    p.add_create(2);
    p.kiln(&["up"]).ok();
    // retire needs a reason
    p.kiln(&["retire", "0001"]).fails_with(2);
    p.kiln(&["retire", "0001", "--reason", "folded into 0002"]).ok();
    let ext = if p.is_mongo() { "yaml" } else { "sql" };
    assert!(p.dir().join(format!("0001_create_t_1.{ext}.retired")).exists());
    assert!(!p.dir().join(format!("0001_create_t_1.{ext}")).exists());
    assert_eq!(p.state_of("0001"), "retired");
    // the missing file is not an error, and down skips it
    p.kiln(&["up"]).ok();
    p.kiln(&["down", "--to", "0"]).ok();
    assert_eq!(p.objects().await, names(&["t_1"]));
    // retiring a pending migration keeps it out of up
    p.add_create(3);
    p.kiln(&["retire", "0003", "--reason", "not needed"]).ok();
    p.kiln(&["up"]).ok();
    assert!(!p.objects().await.contains(&"t_3".to_string()));
}

async fn repair_accepts_a_deliberate_change(e: Engine) {
    let p = Project::new(e).await;
    p.add_create(1);
    p.kiln(&["up"]).ok();
    let ext = if p.is_mongo() { "yaml" } else { "sql" };
    let f = p.dir().join(format!("0001_create_t_1.{ext}"));
    let text = std::fs::read_to_string(&f).unwrap() + if p.is_mongo() { "# reviewed\n" } else { "-- reviewed\n" };
    std::fs::write(&f, text).unwrap();
    p.add_create(2);
    p.kiln(&["up"]).fails_with(1);
    // repair needs a reason
    p.kiln(&["repair"]).fails_with(2);
    let r = p.kiln(&["repair", "--reason", "comment only", "--json"]);
    r.ok();
    assert_eq!(r.json()["changes"][0]["change"], "checksum", "{}", r.stdout);
    p.kiln(&["up"]).ok();
    assert_eq!(p.objects().await, names(&["t_1", "t_2"]));
    // nothing left to repair
    let r = p.kiln(&["repair", "--reason", "again"]);
    r.ok();
    assert!(r.stdout.contains("nothing to repair"), "{}", r.stdout);
}

async fn irreversible_stops_down_before_anything(e: Engine) {
    let p = Project::new(e).await;
    p.add_create(1);
    if p.is_mongo() {
        p.write("0002_one_way.yaml", "up:\n  - create: t_2\n");
    } else {
        p.write("0002_one_way.sql", "CREATE TABLE t_2 (id int);\n");
    }
    p.add_create(3);
    p.kiln(&["up"]).ok();
    let r = p.kiln(&["down"]);
    r.fails_with(1);
    assert!(r.stderr.contains("0002_one_way") && r.stderr.contains("irreversible"), "{}", r.stderr);
    // nothing was reverted, not even 0003 which comes first
    assert_eq!(p.objects().await, names(&["t_1", "t_2", "t_3"]));
    // --steps 1 only touches 0003
    p.kiln(&["down", "--steps", "1"]).ok();
    assert_eq!(p.objects().await, names(&["t_1", "t_2"]));
}

async fn down_steps_and_to(e: Engine) {
    let p = Project::new(e).await;
    for n in 1..=4 {
        p.add_create(n);
    }
    p.kiln(&["up"]).ok();
    p.kiln(&["down", "--steps", "2"]).ok();
    assert_eq!(p.objects().await, names(&["t_1", "t_2"]));
    p.kiln(&["up", "--to", "0003"]).ok();
    assert_eq!(p.objects().await, names(&["t_1", "t_2", "t_3"]));
    p.kiln(&["down", "--to", "0001"]).ok();
    assert_eq!(p.objects().await, names(&["t_1"]));
    let r = p.kiln(&["down", "--to", "0042", "--json"]);
    r.fails_with(2);
    assert_eq!(r.json()["error"]["problems"][0]["code"], "unknown_version");
}

async fn eight_concurrent_runners_apply_each_migration_once(e: Engine) {
    let p = Project::new(e).await;
    for n in 1..=50 {
        p.add_create(n);
    }
    let mut children = Vec::new();
    for _ in 0..8 {
        let child = kiln_cmd(p.root.path())
            .args(["up", "--json", "--lock-timeout", "120s", "--url", &p.db.url, "--dir"])
            .arg(p.dir())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        children.push(child);
    }
    let mut applied_total = 0;
    let mut runs_that_applied = 0;
    for c in children {
        let r = output_to_run(c.wait_with_output().unwrap());
        r.ok();
        let n = r.json()["steps"].as_array().unwrap().len();
        applied_total += n;
        if n > 0 {
            runs_that_applied += 1;
        }
    }
    // every migration applied exactly once, by exactly one runner
    assert_eq!(applied_total, 50);
    assert_eq!(runs_that_applied, 1);
    assert_eq!(p.objects().await.len(), 50);
    let states = p.states();
    assert_eq!(states.len(), 50);
    assert!(states.iter().all(|(_, s)| s == "applied"));
}
