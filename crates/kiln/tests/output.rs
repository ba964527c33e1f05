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
