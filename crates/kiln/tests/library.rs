//! The library and the CLI are one engine: `Kiln::from_config(&cfg).up()` makes
//! the same plan with the same schema validation and refusals as `kiln up`, and
//! `Kiln::check()` is `kiln check`.

use std::path::Path;

use kiln::config::{Config, Overrides};

/// A project on a SQLite file: kiln.toml, schema.yaml requiring users.email,
/// 0001 creating users and 0002 dropping email (which breaks the contract).
fn project(root: &Path) {
    std::fs::create_dir_all(root.join("migrations")).unwrap();
    std::fs::write(root.join("kiln.toml"), "url = \"sqlite://app.db\"\ndir = \"migrations\"\n").unwrap();
    std::fs::write(root.join("schema.yaml"), "tables:\n  users:\n    required: [id, email]\n").unwrap();
    std::fs::write(
        root.join("migrations/0001_users.sql"),
        "-- kiln:up\nCREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT NOT NULL, name TEXT);\n-- kiln:down\nDROP TABLE users;\n",
    )
    .unwrap();
    std::fs::write(root.join("migrations/0002_drop_email.sql"), "ALTER TABLE users DROP COLUMN email;\n").unwrap();
}

fn config(root: &Path) -> Config {
    Config::load(&Overrides { config: Some(root.join("kiln.toml")), ..Overrides::default() }).unwrap()
}

#[tokio::test]
async fn from_config_up_refuses_a_migration_that_breaks_the_contract() {
    let root = tempfile::tempdir().unwrap();
    project(root.path());
    let lib = kiln::Kiln::from_config(&config(root.path()));
    let err = lib.up().await.expect_err("0002 breaks schema.yaml");
    match &err {
        kiln::Error::Run(kiln::RunError::Invalid { version, done, .. }) => {
            assert_eq!(version.to_string(), "0002");
            assert_eq!(done.iter().map(ToString::to_string).collect::<Vec<_>>(), ["0001"]);
        }
        other => panic!("expected the contract to refuse 0002, got {other:?}"),
    }
    assert_eq!(err.code(), "schema_invalid");
    assert_eq!(err.exit_code(), 1);
    // Rolled back: 0002 is pending and email is still there.
    let rows = lib.status().await.unwrap();
    let states: Vec<&str> = rows.iter().map(|r| r.state.as_str()).collect();
    assert_eq!(states, ["applied", "pending"]);
}

#[tokio::test]
async fn new_with_a_schema_file_validates_and_a_missing_named_file_is_an_error() {
    let root = tempfile::tempdir().unwrap();
    project(root.path());
    let url = format!("sqlite://{}", root.path().join("b.db").display());
    let lib = kiln::Kiln::new(&url).dir(root.path().join("migrations")).schema_file(root.path().join("schema.yaml"));
    assert!(matches!(lib.up().await, Err(kiln::Error::Run(kiln::RunError::Invalid { .. }))));

    let missing = kiln::Kiln::new(&url).dir(root.path().join("migrations")).schema_file(root.path().join("nope.yaml"));
    let err = missing.up().await.expect_err("a named schema file must exist");
    assert_eq!((err.code(), err.exit_code()), ("config", 2), "{err}");
    assert!(err.to_string().contains("nope.yaml"), "{err}");

    // validate(Off) applies it, as `validate = "off"` does for the CLI.
    let off = kiln::Kiln::new(&url).dir(root.path().join("migrations")).validate(kiln::config::ValidateMode::Off);
    assert_eq!(off.up().await.unwrap().steps.len(), 1, "0001 was applied above; 0002 now");
}

#[tokio::test]
async fn check_is_the_startup_gate() {
    let root = tempfile::tempdir().unwrap();
    project(root.path());
    std::fs::remove_file(root.path().join("migrations/0002_drop_email.sql")).unwrap();
    let lib = kiln::Kiln::from_config(&config(root.path()));
    let before = lib.check().await.unwrap();
    assert!(!before.ok, "0001 is pending");
    assert_eq!(before.pending.iter().map(ToString::to_string).collect::<Vec<_>>(), ["0001_users"]);
    assert!(!root.path().join("app.db").exists(), "check creates nothing");
    lib.up().await.unwrap();
    let after = lib.check().await.unwrap();
    assert!(after.ok, "{after:?}");
    assert!(after.contract_checked);
    // A hand-made change breaking the contract fails the gate.
    let conn = rusqlite::Connection::open(root.path().join("app.db")).unwrap();
    conn.execute_batch("ALTER TABLE users DROP COLUMN email;").unwrap();
    let broken = lib.check().await.unwrap();
    assert!(!broken.ok);
    assert!(!broken.violations.is_empty(), "{broken:?}");
}

#[tokio::test]
async fn a_tenant_scope_is_refused_not_applied_to_the_one_database() {
    // Before: `-- kiln:scope tenant` and migrations/tenant/ were applied to the
    // configured database with no warning.
    for (file, text, line) in [
        ("0002_t.sql", "-- kiln:scope tenant\n-- kiln:up\nCREATE TABLE t (id INT);\n", 1),
        ("0002_t.yaml", "description: x\nscope: tenant\nup: []\n", 2),
        ("tenant/0002_t.sql", "CREATE TABLE t (id INT);\n", 1),
    ] {
        let root = tempfile::tempdir().unwrap();
        project(root.path());
        std::fs::remove_file(root.path().join("migrations/0002_drop_email.sql")).unwrap();
        let path = root.path().join("migrations").join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        let lib = kiln::Kiln::from_config(&config(root.path()));
        let err = lib.up().await.expect_err(file);
        assert_eq!(err.exit_code(), 2, "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&format!("{file}:{line}:")) && msg.contains("tenant"), "{msg}");
        assert!(!root.path().join("app.db").exists(), "{file}: nothing was applied, not even 0001");
    }
}

#[tokio::test]
async fn startup_policy_refuses_or_logs_and_continues_explicitly() {
    let root = tempfile::tempdir().unwrap();
    project(root.path());
    let lib = kiln::Kiln::from_config(&config(root.path()));
    let refused = lib.up_at_startup(kiln::StartupPolicy::Refuse).await;
    assert!(matches!(refused, Err(kiln::Error::Run(kiln::RunError::Invalid { .. }))), "{refused:?}");
    assert_eq!(kiln::StartupPolicy::default(), kiln::StartupPolicy::Refuse);
    let went_on = lib.up_at_startup(kiln::StartupPolicy::LogAndContinue).await.unwrap();
    assert!(went_on.is_none(), "the failure is reported as None (and logged), not hidden as success");
    std::fs::remove_file(root.path().join("migrations/0002_drop_email.sql")).unwrap();
    let ok = lib.up_at_startup(kiln::StartupPolicy::LogAndContinue).await.unwrap().expect("a report");
    assert!(ok.steps.is_empty(), "0001 was applied by the first call");
}

#[tokio::test]
async fn eight_instances_starting_at_once_apply_each_migration_once() {
    let root = tempfile::tempdir().unwrap();
    project(root.path());
    std::fs::remove_file(root.path().join("migrations/0002_drop_email.sql")).unwrap();
    for n in 2..=20 {
        std::fs::write(root.path().join(format!("migrations/{n:04}_t{n}.sql")), format!("CREATE TABLE t{n} (id INT);\n")).unwrap();
    }
    let cfg = config(root.path());
    let runs = (0..8).map(|_| {
        let cfg = cfg.clone();
        tokio::spawn(async move { kiln::Kiln::from_config(&cfg).up_at_startup(kiln::StartupPolicy::Refuse).await })
    });
    let mut applied = 0;
    for r in futures::future::join_all(runs).await {
        applied += r.unwrap().unwrap().unwrap().steps.len();
    }
    assert_eq!(applied, 20, "every migration exactly once across the 8 instances");
}
