//! Bad input, as a user meets it through the `kiln` binary: every bad file at
//! once, deep nesting refused fast, driver logs kept out of the output.

mod support;

use support::*;

/// Issue 8.8: three bad files are three problems in one run, each with its
/// file and line; exit code 2 and the code of the problem kind are kept.
#[test]
fn three_bad_files_are_three_problems_in_one_run() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("migrations");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("0001_ok.sql"), "CREATE TABLE a (id INT);\n").unwrap();
    std::fs::write(dir.join("0002_one.sql"), "SELECT 'unterminated;\n").unwrap();
    std::fs::write(dir.join("0003_two.sql"), "-- kiln:transaction off\n-- kiln:transaction on\nSELECT 1;\n").unwrap();
    std::fs::write(dir.join("0004_three.yaml"), "up:\n  - create: a\n  bad: [\n").unwrap();
    let url = format!("sqlite://{}", root.path().join("k.db").display());
    let human = output_to_run(kiln_cmd(root.path()).args(["up", "--url", &url]).output().unwrap());
    human.fails_with(2);
    assert!(human.stderr.contains("3 problems in the migration files:"), "{}", human.stderr);
    for located in ["0002_one.sql:1: ", "0003_two.sql:2: ", "0004_three.yaml:3: "] {
        assert!(human.stderr.contains(&format!("\n  - {located}")), "{located} missing:\n{}", human.stderr);
    }
    let json = output_to_run(kiln_cmd(root.path()).args(["up", "--json", "--url", &url]).output().unwrap());
    json.fails_with(2);
    let e = &json.json()["error"];
    assert_eq!(e["code"], "parse_error", "{}", json.stdout);
    assert_eq!(e["problems"].as_array().map(Vec::len), Some(3), "{}", json.stdout);
    // `status` shows them as problems beside the good migration (and exits 0).
    let status = output_to_run(kiln_cmd(root.path()).args(["status", "--json", "--url", &url]).output().unwrap());
    status.ok();
    assert_eq!(status.json()["problems"].as_array().map(Vec::len), Some(3), "{}", status.stdout);
    assert_eq!(status.json()["migrations"].as_array().map(Vec::len), Some(1), "{}", status.stdout);
    assert!(!root.path().join("k.db").exists() || human.stdout.is_empty(), "nothing ran");
}

/// Issue 9.6: 50,000 levels of `{a:` took 15 s in a migration and in `check`.
#[test]
fn deep_nesting_fails_fast_in_a_migration_and_in_schema_yaml() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("migrations");
    std::fs::create_dir_all(&dir).unwrap();
    let deep = "{a: ".repeat(50_000);
    std::fs::write(dir.join("0001_deep.yaml"), format!("up:\n  - insert: a\n    documents: {deep}\n")).unwrap();
    let url = format!("sqlite://{}", root.path().join("k.db").display());
    let t = std::time::Instant::now();
    let run = output_to_run(kiln_cmd(root.path()).args(["up", "--url", &url]).output().unwrap());
    run.fails_with(2);
    assert!(run.stderr.contains("0001_deep.yaml:3: nested more than 64 levels"), "{}", run.stderr);
    let status = output_to_run(kiln_cmd(root.path()).args(["status", "--url", &url]).output().unwrap());
    status.ok();
    assert!(status.stdout.contains("0001_deep.yaml:3: nested more than 64 levels"), "{}", status.stdout);
    std::fs::remove_file(dir.join("0001_deep.yaml")).unwrap();
    std::fs::write(root.path().join("schema.yaml"), format!("tables:\n  a: {deep}\n")).unwrap();
    let run = output_to_run(kiln_cmd(root.path()).args(["check", "--url", &url]).output().unwrap());
    run.fails_with(2);
    assert!(run.stderr.contains("schema.yaml:2: nested more than 64 levels"), "{}", run.stderr);
    // A regression guard against the quadratic parse (27 s before in a debug build), not a speed target.
    assert!(t.elapsed() < std::time::Duration::from_secs(10), "took {:?}", t.elapsed());
}

/// Issue 9.9: sqlx's `WARN slow statement` lines (a `GET_LOCK` or a body that
/// takes over a second) reached stderr, coloured, on every long MariaDB run.
#[tokio::test]
async fn driver_logs_stay_out_of_the_output_by_default() {
    let p = Project::new(Engine::Mysql).await;
    p.write("0001_slow.sql", "SELECT SLEEP(1.2);\n");
    let run = p.kiln(&["up"]);
    run.ok();
    assert!(!run.stderr.contains("slow statement") && !run.stderr.contains("WARN"), "driver log in the output:\n{}", run.stderr);
}
