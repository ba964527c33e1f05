//! Snapshots and schema contracts on the SQL engines: the drift reference,
//! and a migration that breaks the contract — rolled back where DDL is
//! transactional, recorded `failed` where it ran outside a transaction.

use kiln_core::schema::Snapshot;
use kiln_core::{FailureOutcome, RunError, Runner};
use kiln_testkit::case::EngineCase;
use kiln_testkit::Engine;

use crate::support::{backend, columns, contract, settings, up, up_with};

on!(snapshots_round_trip_and_keep_history: postgres, mysql, sqlite);
async fn snapshots_round_trip_and_keep_history(engine: Engine) {
    let case = EngineCase::new(engine).await;
    let mut b = backend(case.url()).await;
    // A database kiln never touched: no snapshot, and nothing gets created by asking.
    assert_eq!(b.load_snapshot().await.unwrap(), None);
    assert_eq!(b.inspect().await.unwrap(), Snapshot::default());
    assert!(case.all_objects().await.is_empty());

    let text = if engine == Engine::Mysql { "VARCHAR(40)" } else { "TEXT" };
    case.db.sql(&format!("CREATE TABLE items (id INT PRIMARY KEY, sku {text} NOT NULL)")).await.unwrap();
    let first = b.inspect().await.unwrap();
    // Saved without ensure_history: the table is created on demand.
    b.save_snapshot(&first).await.unwrap();
    assert_eq!(b.load_snapshot().await.unwrap(), Some(first.clone()));
    assert_eq!(case.all_objects().await, ["items", "kiln_snapshot"]);
    assert_eq!(b.inspect().await.unwrap(), first, "kiln_snapshot is not part of the schema");

    case.db.sql("CREATE INDEX items_sku ON items (sku)").await.unwrap();
    let second = b.inspect().await.unwrap();
    assert_ne!(first, second);
    b.save_snapshot(&second).await.unwrap();
    assert_eq!(b.load_snapshot().await.unwrap(), Some(second), "the newest wins");
    assert_eq!(case.count("kiln_snapshot").await, 2, "older snapshots are kept");

    // After a run the stored snapshot is the live schema (written with the
    // run's last commit); a hand-made change is drift, seen from any connection.
    let email = if engine == Engine::Mysql { "VARCHAR(100)" } else { "TEXT" };
    case.write("0001_users.sql", &format!("CREATE TABLE users (id INT PRIMARY KEY, email {email} NOT NULL);\n"));
    case.write("0002_posts.sql", "CREATE TABLE posts (id INT PRIMARY KEY, body TEXT, title TEXT);\nINSERT INTO posts VALUES (1, 'b', 't');\n");
    up(&mut *b, &case.load()).await.unwrap();
    assert_eq!(case.count("kiln_snapshot").await, 3);
    assert_eq!(Runner::new(&mut *b, settings()).diff().await.unwrap(), Some(vec![]));
    let mut fresh = backend(case.url()).await;
    assert_eq!(Runner::new(&mut *fresh, settings()).diff().await.unwrap(), Some(vec![]));
    case.db.sql("CREATE INDEX by_hand ON users (email, id); ALTER TABLE posts DROP COLUMN body").await.unwrap();
    for b in [&mut b, &mut fresh] {
        let drift = Runner::new(&mut **b, settings()).diff().await.unwrap().unwrap();
        let shown: Vec<String> = drift.iter().map(|c| c.to_string()).collect();
        assert_eq!(shown, ["- posts: column body removed (text)", "+ users: index by_hand added ((email, id))"]);
    }
}

on!(a_migration_dropping_a_required_column_is_rolled_back: postgres, sqlite);
async fn a_migration_dropping_a_required_column_is_rolled_back(engine: Engine) {
    let case = EngineCase::new(engine).await;
    case.write("0001_users.sql", "CREATE TABLE users (id BIGINT PRIMARY KEY, email TEXT NOT NULL, nickname TEXT);\n");
    case.write("0002_cleanup.sql", "CREATE TABLE audit (id INT);\nALTER TABLE users DROP COLUMN email;\nALTER TABLE users DROP COLUMN nickname;\n");
    case.write("0003_more.sql", "CREATE TABLE more (id INT);\n");
    let local = case.load();
    let c = contract("tables:\n  users:\n    required: [id, email]\n    optional: [nickname]\n");
    let mut b = backend(case.url()).await;

    let err = up_with(&mut *b, &local, &c).await.unwrap_err();
    let text = err.to_string();
    let RunError::Invalid { version, file, outcome, violations, done } = err else { panic!("expected a contract violation, got {err:?}") };
    assert_eq!((version.number, file.as_str(), outcome), (2, "0002_cleanup.sql", FailureOutcome::RolledBack));
    assert_eq!(done.iter().map(|v| v.number).collect::<Vec<_>>(), [1]);
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert_eq!((violations[0].object.as_str(), violations[0].message.as_str()), ("users", "required column email is missing"));
    assert!(text.contains("0002_cleanup.sql") && text.contains("email"), "{text}");

    // Nothing of 0002 remains: the columns, the other table, the history row, its `applied` event.
    assert_eq!(columns(&case, "users").await, ["id", "email", "nickname"]);
    assert_eq!(case.all_objects().await, ["kiln_history", "kiln_log", "kiln_snapshot", "users"]);
    assert_eq!(case.history().await, ["1:applied"]);
    assert_eq!(case.events().await, ["run-start", "applied:1", "failed:2", "run-end"]);
    let detail = case.strings("SELECT detail FROM kiln_log WHERE event = 'failed'").await;
    assert!(detail[0].contains("required column email is missing"), "{detail:?}");

    // The lock was released and the database is usable: the next run stops at the same place.
    let again = up_with(&mut *b, &local, &c).await.unwrap_err();
    assert!(matches!(again, RunError::Invalid { ref version, .. } if version.number == 2), "{again:?}");
    // Without the breaking migration, the run goes through and checks the end state.
    case.remove("0002_cleanup.sql");
    let report = up_with(&mut *b, &case.load(), &c).await.unwrap();
    assert_eq!(report.steps.len(), 1);
    assert_eq!(case.history().await, ["1:applied", "3:applied"]);
}

on!(a_migration_outside_a_transaction_that_breaks_the_contract_is_recorded_failed: postgres, mysql, sqlite);
async fn a_migration_outside_a_transaction_that_breaks_the_contract_is_recorded_failed(engine: Engine) {
    let case = EngineCase::new(engine).await;
    let email = if engine == Engine::Mysql { "VARCHAR(100)" } else { "TEXT" };
    case.write("0001_users.sql", &format!("CREATE TABLE users (id BIGINT PRIMARY KEY, email {email} NOT NULL);\n"));
    case.write("0002_drop_email.sql", "-- kiln:transaction off\nALTER TABLE users DROP COLUMN email;\n");
    case.write("0003_more.sql", "CREATE TABLE more (id INT);\n");
    let local = case.load();
    let c = contract("tables:\n  users:\n    required: [id, email]\n");
    let mut b = backend(case.url()).await;

    let err = up_with(&mut *b, &local, &c).await.unwrap_err();
    let RunError::Invalid { version, outcome, .. } = err else { panic!("{err:?}") };
    assert_eq!((version.number, outcome), (2, FailureOutcome::RecordedFailed));
    // There was no transaction to roll back: the column is gone, and the entry blocks the next run.
    assert_eq!(columns(&case, "users").await, ["id"]);
    assert_eq!(case.history().await, ["1:applied", "2:failed"]);
    let error = case.strings("SELECT error FROM kiln_history WHERE version = 2").await;
    assert!(error[0].contains("required column email is missing") && error[0].contains("kiln repair 0002"), "{error:?}");
    // The next run is refused and tells the operator to repair.
    let blocked = up_with(&mut *b, &local, &c).await.unwrap_err();
    assert!(matches!(blocked, RunError::Plan(_)), "{blocked:?}");
    assert!(blocked.to_string().contains("kiln repair 0002"), "{blocked}");
    assert!(!case.objects().await.contains(&"more".to_string()));
}
