//! Output for people and for pipes: no colour codes reach a pipe.

mod support;

use support::*;

#[tokio::test]
async fn no_colour_codes_in_a_pipe_even_without_no_color() {
    let p = Project::new(Engine::Sqlite).await;
    p.write("0001_ok.sql", "CREATE TABLE a (id INT);\n");
    p.write("0002_half.sql", "-- kiln:transaction off\n-- kiln:up\nCREATE TABLE b (id INT);\nINSERT INTO nope VALUES (1);\n");
    p.kiln(&["up"]).fails_with(1);
    for args in [&["status"][..], &["up"][..], &["check"][..]] {
        let mut c = kiln_cmd(p.root.path());
        c.env_remove("NO_COLOR").args(args).arg("--url").arg(&p.db.url).arg("--dir").arg(p.dir());
        let run = output_to_run(c.output().unwrap());
        assert!(run.text().contains("0002"), "{args:?} names the failed migration:\n{}", run.text());
        assert!(!run.stdout.contains('\x1b') && !run.stderr.contains('\x1b'), "{args:?} printed colour codes into a pipe:\n{:?}", run.text());
    }
}

#[tokio::test]
async fn a_config_from_another_directory_uses_its_own_sqlite_file() {
    // From sub/, `--config ../kiln.toml` used to open ./kiln.db in sub/ (empty:
    // everything pending) while reading migrations next to kiln.toml.
    let root = tempfile::tempdir().unwrap();
    let proj = root.path();
    std::fs::create_dir_all(proj.join("migrations")).unwrap();
    std::fs::create_dir_all(proj.join("sub")).unwrap();
    std::fs::write(proj.join("kiln.toml"), "url = \"sqlite://kiln.db\"\ndir = \"migrations\"\n").unwrap();
    std::fs::write(proj.join("migrations/0001_a.sql"), "CREATE TABLE a (id INT);\n").unwrap();
    let run = |cwd: &std::path::Path, args: &[&str]| output_to_run(kiln_cmd(cwd).args(args).output().unwrap());
    run(proj, &["up"]).ok();
    let status = run(&proj.join("sub"), &["--config", "../kiln.toml", "status", "--json"]);
    status.ok();
    let states: Vec<String> = status.json()["migrations"].as_array().unwrap().iter().map(|m| m["state"].as_str().unwrap().to_string()).collect();
    assert_eq!(states, ["applied"], "{}", status.stdout);
    assert!(!proj.join("sub/kiln.db").exists(), "no stray database in sub/");
}

#[tokio::test]
async fn reading_commands_create_no_sqlite_file() {
    // `status` and `up --dry-run` on a SQLite URL whose file does not exist
    // created an empty file while saying nothing was changed.
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("migrations")).unwrap();
    std::fs::write(root.path().join("migrations/0001_a.sql"), "CREATE TABLE a (id INT);\n").unwrap();
    let db = root.path().join("fresh.db");
    let url = format!("sqlite://{}", db.display());
    for args in [&["status"][..], &["up", "--dry-run"][..], &["check"][..], &["down", "--dry-run"][..]] {
        let run = output_to_run(kiln_cmd(root.path()).args(args).arg("--url").arg(&url).output().unwrap());
        assert!(run.code == 0 || run.code == 1, "{args:?}: {}", run.text());
        assert!(!db.exists(), "{args:?} created {}", db.display());
        assert!(!root.path().join("fresh.db-kiln.lock").exists(), "{args:?} created a lock file");
    }
    let status = output_to_run(kiln_cmd(root.path()).args(["status", "--json", "--url", &url]).output().unwrap());
    assert_eq!(status.json()["migrations"][0]["state"], "pending", "{}", status.stdout);
    // `up` creates it.
    output_to_run(kiln_cmd(root.path()).args(["up", "--url", &url]).output().unwrap()).ok();
    assert!(db.exists());
}

#[tokio::test]
async fn the_librarys_status_creates_no_sqlite_file() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("migrations")).unwrap();
    std::fs::write(root.path().join("migrations/0001_a.sql"), "CREATE TABLE a (id INT);\n").unwrap();
    let db = root.path().join("lib.db");
    let rows = kiln::Kiln::new(format!("sqlite://{}", db.display())).dir(root.path().join("migrations")).status().await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].state, "pending");
    assert!(!db.exists());
}

#[tokio::test]
async fn a_failed_down_lists_what_it_reverted_not_applied() {
    // Before: "applied in this run before the failure (still applied): 0002"
    // after 0002 had been reverted.
    let p = Project::new(Engine::Sqlite).await;
    p.write("0001_a.sql", "-- kiln:up\nCREATE TABLE a (id INT);\n-- kiln:down\nDROP TABLE no_such_table;\n");
    p.write("0002_b.sql", "-- kiln:up\nCREATE TABLE b (id INT);\n-- kiln:down\nDROP TABLE b;\n");
    p.kiln(&["up"]).ok();
    let run = p.kiln(&["down", "--to", "0"]);
    run.fails_with(1);
    assert!(run.stderr.contains("reverted in this run before the failure (now pending): 0002"), "{}", run.stderr);
    assert!(!run.stderr.contains("still applied"), "{}", run.stderr);
    let json = p.kiln(&["down", "--to", "0", "--json"]);
    json.fails_with(1);
    assert_eq!(json.json()["error"]["direction"], "down", "{}", json.stdout);
    assert_eq!(p.states(), [("0001".to_string(), "applied".to_string()), ("0002".to_string(), "pending".to_string())]);
}

#[tokio::test]
async fn argument_errors_are_json_with_json() {
    let root = tempfile::tempdir().unwrap();
    let run = output_to_run(kiln_cmd(root.path()).args(["up", "--no-such-flag", "--json"]).output().unwrap());
    run.fails_with(2);
    let v = run.json();
    assert_eq!(v["error"]["code"], "usage", "{}", run.stdout);
    assert!(v["error"]["message"].as_str().unwrap().contains("--no-such-flag"), "{}", run.stdout);
    // Without --json, clap's text on stderr.
    let plain = output_to_run(kiln_cmd(root.path()).args(["up", "--no-such-flag"]).output().unwrap());
    plain.fails_with(2);
    assert!(plain.stderr.contains("--no-such-flag") && plain.stdout.is_empty());
}

#[tokio::test]
async fn down_json_has_no_null_batch_and_admin_changes_are_data() {
    let p = Project::new(Engine::Sqlite).await;
    p.add_create(1);
    p.kiln(&["up"]).ok();
    let down = p.kiln(&["down", "--json"]);
    down.ok();
    assert!(down.json().get("batch").is_none(), "{}", down.stdout);
    let b = p.kiln(&["baseline", "0001", "--json"]);
    b.ok();
    assert_eq!(b.json()["action"], "baseline");
    assert_eq!(b.json()["changes"][0]["change"], "baseline", "{}", b.stdout);
    assert_eq!(b.json()["changes"][0]["version"], "0001", "{}", b.stdout);
}

#[tokio::test]
async fn kiln_toml_is_found_in_a_parent_directory_and_named_in_the_header() {
    let root = tempfile::tempdir().unwrap();
    let proj = root.path();
    std::fs::create_dir_all(proj.join("migrations")).unwrap();
    std::fs::create_dir_all(proj.join("src/deep")).unwrap();
    std::fs::write(proj.join("kiln.toml"), "url = \"sqlite://kiln.db\"\n").unwrap();
    std::fs::write(proj.join("migrations/0001_a.sql"), "CREATE TABLE a (id INT);\n").unwrap();
    let run = |cwd: &std::path::Path, args: &[&str]| output_to_run(kiln_cmd(cwd).args(args).output().unwrap());
    run(&proj.join("src/deep"), &["up"]).ok();
    assert!(proj.join("kiln.db").exists(), "up from src/deep used ../../kiln.toml and its database");
    assert!(!proj.join("src/deep/kiln.db").exists());
    let status = run(&proj.join("src/deep"), &["status"]);
    status.ok();
    let header = status.stdout.lines().next().unwrap();
    assert!(header.contains("config ../../kiln.toml"), "{header}");
    assert!(header.contains("1 migration in ../../migrations"), "{header}");
}

#[tokio::test]
async fn status_filters_group_column_and_irreversible_mark() {
    let p = Project::new(Engine::Sqlite).await;
    for n in 1..=5 {
        p.add_create(n);
    }
    p.write("0006_oneway.sql", "-- kiln:group users\nCREATE TABLE t_6 (id INT);\n");
    p.kiln(&["up"]).ok();
    p.add_create(7);
    p.write("0008_broken.sql", "-- kiln:transaction off\nCREATE TABLE t_8 (id INT);\nINSERT INTO nope VALUES (1);\n");
    p.kiln(&["up", "--to", "0008"]).fails_with(1);
    let versions = |args: &[&str]| -> Vec<String> {
        let r = p.kiln(args);
        r.ok();
        r.json()["migrations"].as_array().unwrap().iter().map(|m| m["version"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(versions(&["status", "--json"]).len(), 8);
    assert_eq!(versions(&["status", "--json", "--pending"]), Vec::<String>::new(), "0007 applied before 0008 failed");
    assert_eq!(versions(&["status", "--json", "--failed"]), ["0008"]);
    assert_eq!(versions(&["status", "--json", "--last", "2"]), ["0007", "0008"]);
    assert_eq!(versions(&["status", "--json", "--group", "users"]), ["0006"]);
    let table = p.kiln(&["status"]);
    table.ok();
    let lines: Vec<&str> = table.stdout.lines().collect();
    let head = lines.iter().find(|l| l.starts_with("VERSION")).unwrap();
    assert!(head.contains("GROUP") && head.contains("DOWN"), "{head}");
    let row6 = lines.iter().find(|l| l.starts_with("0006")).unwrap();
    assert!(row6.contains("users") && row6.split_whitespace().any(|w| w == "no"), "{row6}");
    let row1 = lines.iter().find(|l| l.starts_with("0001")).unwrap();
    assert!(row1.split_whitespace().any(|w| w == "yes"), "{row1}");
    // The summary counts everything, whatever the filter.
    let only = p.kiln(&["status", "--failed"]);
    assert!(only.stdout.contains("7 applied, 0 pending, 1 failed"), "{}", only.stdout);
}

#[tokio::test]
async fn redo_reverts_and_reapplies_the_last_batch() {
    let p = Project::new(Engine::Sqlite).await;
    p.add_create(1);
    p.kiln(&["up"]).ok();
    p.add_create(2);
    p.add_create(3);
    p.kiln(&["up"]).ok();
    let r = p.kiln(&["redo", "--json"]);
    r.ok();
    let v = r.json();
    assert_eq!(v["down"]["steps"].as_array().unwrap().len(), 2, "{}", r.stdout);
    assert_eq!(v["up"]["steps"].as_array().unwrap().len(), 2, "{}", r.stdout);
    assert_eq!(v["up"]["batch"], 2, "the reverted batch number is used again: {}", r.stdout);
    assert!(p.states().iter().all(|(_, s)| s == "applied"));
}

#[tokio::test]
async fn create_on_mongodb_numbers_with_timestamps_and_new_is_an_alias() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("migrations")).unwrap();
    let url = "mongodb://127.0.0.1:1/app";
    let run = |args: &[&str]| output_to_run(kiln_cmd(root.path()).args(args).args(["--url", url]).output().unwrap());
    let c = run(&["new", "add_index", "--json"]);
    c.ok();
    let version = c.json()["version"].as_str().unwrap().to_string();
    assert_eq!(version.len(), 14, "migrate-mongo style timestamp: {version}");
    assert!(root.path().join(format!("migrations/{version}_add_index.yaml")).exists());
    // A project numbered 0001… keeps its style.
    let seq = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(seq.path().join("migrations")).unwrap();
    std::fs::write(seq.path().join("migrations/0001_a.yaml"), "up: []\n").unwrap();
    let c = output_to_run(kiln_cmd(seq.path()).args(["create", "b", "--json", "--url", url]).output().unwrap());
    c.ok();
    assert_eq!(c.json()["version"], "0002");
    // SQL stays sequential.
    std::fs::create_dir_all(root.path().join("sqlmig")).unwrap();
    let sql = output_to_run(kiln_cmd(root.path()).args(["create", "c", "--json", "--dir", "sqlmig", "--url", "sqlite://x.db"]).output().unwrap());
    sql.ok();
    assert_eq!(sql.json()["version"], "0001");
}

#[tokio::test]
async fn completions_and_color_flags() {
    let root = tempfile::tempdir().unwrap();
    let bash = output_to_run(kiln_cmd(root.path()).args(["completions", "bash"]).output().unwrap());
    bash.ok();
    assert!(bash.stdout.contains("_kiln") && bash.stdout.contains("status"), "{}", &bash.stdout[..200.min(bash.stdout.len())]);
    let p = Project::new(Engine::Sqlite).await;
    p.add_create(1);
    p.kiln(&["up"]).ok();
    let always = p.kiln(&["status", "--color", "always"]);
    assert!(always.stdout.contains('\x1b'), "--color always colours a pipe");
    let never = p.kiln(&["status", "--color", "never"]);
    assert!(!never.stdout.contains('\x1b'));
}

#[tokio::test]
async fn log_level_debug_shows_kilns_decisions() {
    let p = Project::new(Engine::Sqlite).await;
    p.add_create(1);
    let r = p.kiln(&["up", "--log-level", "debug"]);
    r.ok();
    for needle in ["configuration resolved", "url_source", "lock taken", "Planned", "StepFinished"] {
        assert!(r.stderr.contains(needle), "{needle} missing from:\n{}", r.stderr);
    }
    assert!(!r.stderr.contains('\x1b'), "no colour on a non-terminal stderr");
    // Quiet by default.
    let quiet = p.kiln(&["status"]);
    assert!(quiet.stderr.is_empty(), "{}", quiet.stderr);
}

#[tokio::test]
async fn status_shows_bad_files_as_problems_beside_the_rest() {
    // Before: one bad file name made `status` itself exit 2 and show nothing.
    let p = Project::new(Engine::Sqlite).await;
    p.add_create(1);
    p.kiln(&["up"]).ok();
    p.write("0002-bad name.sql", "CREATE TABLE b (id INT);\n");
    p.write("0003_bad_directive.sql", "-- kiln:transacton off\nCREATE TABLE c (id INT);\n");
    let st = p.kiln(&["status"]);
    st.ok();
    assert!(st.stdout.contains("2 bad file(s)"), "{}", st.stdout);
    assert!(st.stdout.contains("0002-bad name.sql") && st.stdout.contains("0003_bad_directive.sql"), "{}", st.stdout);
    assert!(st.stdout.lines().any(|l| l.starts_with("0001") && l.contains("applied")), "{}", st.stdout);
    let js = p.kiln(&["status", "--json"]);
    js.ok();
    assert_eq!(js.json()["problems"].as_array().unwrap().len(), 2, "{}", js.stdout);
    assert_eq!(js.json()["migrations"].as_array().unwrap().len(), 1);
    // Commands that run refuse, naming both at once.
    let up = p.kiln(&["up"]);
    up.fails_with(2);
    assert!(up.stderr.contains("0002-bad name.sql") && up.stderr.contains("0003_bad_directive.sql"), "{}", up.stderr);
}

#[tokio::test]
async fn verify_says_what_it_checked_and_no_more() {
    // Before: "every migration applies, validates, and its down undoes its up"
    // with every migration irreversible and no schema.yaml.
    let p = Project::new(Engine::Sqlite).await;
    p.write("0001_a.sql", "CREATE TABLE a (id INT);\n");
    p.write("0002_b.sql", "CREATE TABLE b (id INT);\n");
    let r = p.kiln(&["verify"]);
    r.ok();
    assert!(!r.stdout.contains("undoes its up"), "{}", r.stdout);
    assert!(r.stdout.contains("no down was checked: all 2 are irreversible"), "{}", r.stdout);
    assert!(r.stdout.contains("the schema was not validated"), "{}", r.stdout);
    p.add_create(3);
    let r = p.kiln(&["verify"]);
    r.ok();
    assert!(r.stdout.contains("1 of 3 downs undo their ups; 2 irreversible, not checked"), "{}", r.stdout);
}
