//! The migrations directory is read without hanging or filling memory: FIFOs,
//! devices, symlink loops and huge files are refused with the file named.
#![cfg(unix)]

use std::path::Path;

use kiln_core::{load_dir, LoadOptions, SourceError};

fn write(dir: &Path, name: &str, body: &str) {
    std::fs::write(dir.join(name), body).unwrap();
}

fn refused(dir: &Path) -> String {
    match load_dir(dir, &LoadOptions::default()) {
        Err(e @ (SourceError::Read { .. } | SourceError::Dir { .. })) => e.to_string(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_fifo_is_refused_instead_of_blocking() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_a.sql", "CREATE TABLE a (id INT);\n");
    let made = std::process::Command::new("mkfifo").arg(dir.path().join("0005_fifo.sql")).status().unwrap();
    assert!(made.success());
    let e = refused(dir.path());
    assert!(e.contains("0005_fifo.sql") && e.contains("not a regular file"), "{e}");
}

#[test]
fn a_link_to_a_device_is_refused_instead_of_read_forever() {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink("/dev/zero", dir.path().join("0002_zero.sql")).unwrap();
    let e = refused(dir.path());
    assert!(e.contains("0002_zero.sql") && e.contains("not a regular file"), "{e}");
}

#[test]
fn a_symlink_loop_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_a.sql", "CREATE TABLE a (id INT);\n");
    std::fs::create_dir(dir.path().join("users")).unwrap();
    std::os::unix::fs::symlink("..", dir.path().join("users/loop")).unwrap();
    let e = refused(dir.path());
    assert!(e.contains("loop"), "{e}");
}

#[test]
fn links_to_regular_files_and_folders_are_followed() {
    let shared = tempfile::tempdir().unwrap();
    write(shared.path(), "0002_shared.sql", "CREATE TABLE s (id INT);\n");
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_a.sql", "CREATE TABLE a (id INT);\n");
    std::os::unix::fs::symlink(shared.path().join("0002_shared.sql"), dir.path().join("0002_shared.sql")).unwrap();
    let local = load_dir(dir.path(), &LoadOptions::default()).unwrap();
    assert_eq!(local.iter().map(|m| m.version.number).collect::<Vec<_>>(), [1, 2]);
}

#[test]
fn a_huge_file_is_refused_with_its_size_limit() {
    let dir = tempfile::tempdir().unwrap();
    let big = "-- padding\n".repeat((kiln_core::source::MAX_FILE_BYTES / 11) + 10);
    write(dir.path(), "0001_big.sql", &big);
    let e = refused(dir.path());
    assert!(e.contains("0001_big.sql") && e.contains("MiB"), "{e}");
}
