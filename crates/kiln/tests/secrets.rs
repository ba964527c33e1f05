//! No password is ever printed (issue 9.5): a corpus of odd URLs, given to
//! the real `kiln` binary by flag, environment and kiln.toml, through the
//! commands users run (`status`, `up`, `--json`), against the real servers
//! where a server is involved. Every run must fail (or succeed) without the
//! password in its output.

mod support;

use support::*;

/// The marker every password of the corpus contains.
const PW: &str = "Zq7hunter2";

/// `(what, url)`: the URLs of the issue and their relatives.
fn corpus() -> Vec<(&'static str, String)> {
    vec![
        ("no scheme", format!("user:{PW}@127.0.0.1/db")),
        ("missing // (postgres)", format!("postgres:user:{PW}@127.0.0.1/db")),
        ("missing // (postgresql, port)", format!("postgresql:user:{PW}@127.0.0.1:5432/db")),
        ("missing // (mysql)", format!("mysql:user:{PW}@127.0.0.1/db")),
        ("missing // (mongodb)", format!("mongodb:user:{PW}@127.0.0.1/db")),
        ("sqlite with credentials", format!("sqlite://user:{PW}@/tmp/kiln-secrets-test.db")),
        ("sqlite with credentials, relative", format!("sqlite://user:{PW}@kiln.db")),
        ("sqlite: form with credentials", format!("sqlite:user:{PW}@kiln.db")),
        ("mongodb reserved characters", format!("mongodb://user:p@ss:w/rd%?#{PW}@127.0.0.1:1/db?serverSelectionTimeoutMS=300")),
        ("mongodb encoded reserved characters", format!("mongodb://user:p%40ss%3Aw%2Frd%25%3F%23{PW}@127.0.0.1:1/db?serverSelectionTimeoutMS=300")),
        ("postgres refused", format!("postgres://user:{PW}@127.0.0.1:1/db")),
        ("postgres real server, no such database", format!("postgres://postgres:{PW}@127.0.0.1:5432/kiln_no_such_db_x?sslmode=disable")),
        ("postgres unknown parameter", format!("postgres://postgres:{PW}@127.0.0.1:5432/postgres?sslmdoe=disable")),
        ("postgres password parameter", format!("postgres://127.0.0.1:1/db?user=u&password={PW}")),
        ("postgres password with a space", format!("postgres://u:{PW} x@127.0.0.1:1/db")),
        ("postgres password with a slash", format!("postgres://u:{PW}/x@127.0.0.1:1/db")),
        ("mysql wrong password, real server", format!("mysql://root:{PW}@127.0.0.1:3306/kiln_no_such_db_x")),
        ("mariadb refused", format!("mariadb://root:{PW}@127.0.0.1:1/db")),
        ("mysql unknown parameter", format!("mysql://root:{PW}@127.0.0.1:3306/db?bogus=1")),
        ("mysql no database", format!("mysql://root:{PW}@127.0.0.1:3306")),
        ("unknown scheme", format!("http://user:{PW}@127.0.0.1/db")),
        ("double @", format!("postgres://us@er:{PW}@127.0.0.1:1/db")),
    ]
}

fn project() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("migrations")).unwrap();
    std::fs::write(root.path().join("migrations/0001_a.sql"), "CREATE TABLE a (id INT);\n").unwrap();
    root
}

#[track_caller]
fn assert_no_password(what: &str, how: &str, run: &Run) {
    let text = run.text();
    assert!(!text.contains(PW), "{what} ({how}) printed the password:\n{text}");
    // Fragments of the reserved-character password.
    for piece in ["p@ss", "ss:w", "rd%", "p%40ss"] {
        assert!(!text.contains(piece), "{what} ({how}) printed part of the password ({piece}):\n{text}");
    }
    assert!(run.code != 101, "{what} ({how}) panicked:\n{text}");
}

#[test]
fn odd_urls_by_flag_never_print_the_password() {
    let root = project();
    for (what, url) in corpus() {
        for args in [&["status"][..], &["status", "--json"][..], &["up"][..], &["up", "--json"][..], &["check", "--json"][..]] {
            let run = output_to_run(kiln_cmd(root.path()).args(args).arg("--url").arg(&url).output().unwrap());
            assert_no_password(what, &format!("--url, {args:?}"), &run);
            assert_ne!(run.code, 0, "{what} ({args:?}) cannot succeed:\n{}", run.text());
        }
    }
}

#[test]
fn odd_urls_from_the_environment_and_kiln_toml_never_print_the_password() {
    for (what, url) in corpus() {
        let root = project();
        let run = output_to_run(kiln_cmd(root.path()).env("DATABASE_URL", &url).args(["status"]).output().unwrap());
        assert_no_password(what, "DATABASE_URL", &run);
        // Quoted in kiln.toml (TOML basic string: escape what needs it).
        let quoted = url.replace('\\', "\\\\").replace('"', "\\\"");
        std::fs::write(root.path().join("kiln.toml"), format!("url = \"{quoted}\"\n")).unwrap();
        for args in [&["status"][..], &["up", "--json"][..]] {
            let run = output_to_run(kiln_cmd(root.path()).args(args).output().unwrap());
            assert_no_password(what, &format!("kiln.toml, {args:?}"), &run);
        }
        // Unquoted: TOML's own error repeats the line.
        std::fs::write(root.path().join("kiln.toml"), format!("dir = \"migrations\"\nurl = {url}\n")).unwrap();
        for args in [&["status"][..], &["status", "--json"][..]] {
            let run = output_to_run(kiln_cmd(root.path()).args(args).output().unwrap());
            assert_no_password(what, &format!("unquoted in kiln.toml, {args:?}"), &run);
            run.fails_with(2);
        }
    }
}

#[test]
fn an_unquoted_url_in_kiln_toml_is_located_and_explained() {
    let root = project();
    std::fs::write(root.path().join("kiln.toml"), format!("dir = \"migrations\"\nurl = postgres://app:{PW}@db.example/app\n")).unwrap();
    let run = output_to_run(kiln_cmd(root.path()).args(["status"]).output().unwrap());
    run.fails_with(2);
    assert!(run.stderr.contains("kiln.toml: line 2, column 7"), "{}", run.stderr);
    assert!(run.stderr.contains("url = \"…\""), "says how to fix it: {}", run.stderr);
}

#[test]
fn unknown_url_parameters_are_refused_alike_on_postgres_and_mariadb() {
    let root = project();
    for url in ["postgres://postgres@127.0.0.1:5432/postgres?sslmdoe=disable", "mysql://root@127.0.0.1:3306/mysql?sslmdoe=disable"] {
        let run = output_to_run(kiln_cmd(root.path()).args(["status", "--json", "--url", url]).output().unwrap());
        run.fails_with(2);
        let e = &run.json()["error"];
        assert_eq!(e["code"], "bad_url", "{url}: {}", run.stdout);
        let m = e["message"].as_str().unwrap();
        assert!(m.contains("unknown parameter `sslmdoe`") && m.contains("known parameters:"), "{url}: {m}");
    }
}
