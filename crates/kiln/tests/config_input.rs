//! kiln.toml is read like a migration file: a regular file, bounded in size.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// Run `kiln status` in `dir`, killing it after `limit`: `None` when it hung.
fn status_within(dir: &std::path::Path, limit: Duration) -> Option<Run> {
    let mut child = kiln_cmd(dir)
        .args(["status", "--url", "sqlite::memory:"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while start.elapsed() < limit {
        if child.try_wait().unwrap().is_some() {
            return Some(output_to_run(child.wait_with_output().unwrap()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

#[test]
fn a_fifo_named_kiln_toml_is_refused_instead_of_blocking() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("migrations")).unwrap();
    let made = std::process::Command::new("mkfifo").arg(root.path().join("kiln.toml")).status().unwrap();
    assert!(made.success());
    let run = status_within(root.path(), Duration::from_secs(10)).expect("kiln status blocked on a FIFO named kiln.toml");
    run.fails_with(2);
    assert!(run.stderr.contains("kiln.toml") && run.stderr.contains("not a regular file"), "{}", run.stderr);
}

#[test]
fn a_huge_kiln_toml_is_refused_with_its_size() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("migrations")).unwrap();
    std::fs::write(root.path().join("kiln.toml"), format!("# {}\n", "x".repeat(2 << 20))).unwrap();
    let run = status_within(root.path(), Duration::from_secs(10)).expect("kiln status hung");
    run.fails_with(2);
    assert!(run.stderr.contains("larger than 1 MiB"), "{}", run.stderr);
}

/// A `.env` line that does not parse was echoed whole, password included
/// (found by the fault harness, docs/reliability.md).
#[test]
fn a_bad_env_line_is_not_echoed() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("migrations")).unwrap();
    std::fs::write(root.path().join(".env"), "DB_PASSWORD=Zq7hunter2 'unbalanced\n").unwrap();
    for args in [&["status"][..], &["status", "--json"][..]] {
        let run = output_to_run(kiln_cmd(root.path()).args(args).output().unwrap());
        assert!(run.code != 0 && !run.text().contains("Zq7hunter2"), "{args:?} printed the password:\n{}", run.text());
        assert!(run.text().contains("DB_PASSWORD"), "names the line's variable: {}", run.text());
    }
}
