//! The migration protocol on every engine: apply in batches, status, revert
//! batch by batch, apply again; a history that is created only when needed;
//! a body of the wrong kind refused; custom table names and baseline; the
//! lock; a failed migration that changed nothing, rolled back and blocking
//! nothing.

use std::time::{Duration, Instant};

use kiln_core::{BackendConfig, EngineError, Policy, RecordContext, RunError, Runner, RunnerSettings, State, StepError, UpTarget, Version};
use kiln_testkit::case::EngineCase;
use kiln_testkit::Engine;

use crate::support::{backend, backend_for, close, down, settings, up, versions, ACTOR};

/// users (0001), two users and a unique index on their email (0002), posts (0003, in two files).
fn users_seed_posts(case: &EngineCase) {
    match case.engine {
        Engine::Mongodb => {
            case.write(
                "0001_create_users.yaml",
                "up:\n  - create: users\n  - createIndexes: users\n    indexes:\n      - { key: { email: 1 }, name: users_email, unique: true }\ndown:\n  - drop: users\n",
            );
            case.write(
                "0002_seed_users.json",
                r#"{"up": [{"insert": "users", "documents": [{"_id": 1, "email": "a@x"}, {"_id": 2, "email": "b@x"}]}],
                    "down": [{"delete": "users", "deletes": [{"q": {}, "limit": 0}]}]}"#,
            );
            case.write("0003_create_posts.yaml", "up:\n  - create: posts\ndown:\n  - drop: posts\n");
        }
        engine => {
            let (users, posts, drop_index) = match engine {
                Engine::Postgres => (
                    "CREATE TABLE users (id BIGSERIAL PRIMARY KEY, email TEXT NOT NULL)",
                    "CREATE TABLE posts (id BIGSERIAL PRIMARY KEY, user_id BIGINT NOT NULL REFERENCES users (id), body TEXT);\nCREATE INDEX posts_user_idx ON posts (user_id)",
                    "DROP INDEX users_email",
                ),
                Engine::Mysql => (
                    "CREATE TABLE users (id INT AUTO_INCREMENT PRIMARY KEY, email VARCHAR(100) NOT NULL)",
                    "CREATE TABLE posts (id INT PRIMARY KEY, user_id INT, FOREIGN KEY (user_id) REFERENCES users (id))",
                    "DROP INDEX users_email ON users",
                ),
                _ => (
                    "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT NOT NULL)",
                    "CREATE TABLE posts (id INTEGER PRIMARY KEY, user_id INTEGER REFERENCES users (id))",
                    "DROP INDEX users_email",
                ),
            };
            case.write("0001_create_users.sql", &format!("-- kiln:up\n{users};\n-- kiln:down\nDROP TABLE users;\n"));
            case.write(
                "0002_seed_users.sql",
                &format!(
                    "-- kiln:up\nINSERT INTO users (email) VALUES ('a@x'), ('b@x');\nCREATE UNIQUE INDEX users_email ON users (email);\n\
                     -- kiln:down\n{drop_index};\nDELETE FROM users;\n"
                ),
            );
            case.write("0003_create_posts.up.sql", &format!("{posts};\n"));
            case.write("0003_create_posts.down.sql", "DROP TABLE posts;\n");
        }
    }
}

on!(up_status_down_up_again: postgres, mysql, sqlite, mongodb);
async fn up_status_down_up_again(engine: Engine) {
    let case = EngineCase::new(engine).await;
    users_seed_posts(&case);
    let local = case.load();
    let mut b = backend(case.url()).await;

    // First batch: up to 0002; second batch: the rest.
    let r = Runner::new(&mut *b, settings()).up(&local, &UpTarget::To(Version::parse_arg("0002").unwrap()), &Policy::default(), false).await.unwrap();
    assert_eq!((r.batch, versions(&r)), (Some(1), vec!["0001", "0002"]));
    let r = up(&mut *b, &local).await.unwrap();
    assert_eq!((r.batch, versions(&r)), (Some(2), vec!["0003"]));

    // Seen from another connection: everything is committed.
    assert_eq!(case.objects().await, ["posts", "users"]);
    if case.is_sql() {
        assert_eq!(case.all_objects().await, ["kiln_history", "kiln_log", "kiln_snapshot", "posts", "users"]);
    }
    assert_eq!(case.count("users").await, 2);
    assert_eq!(case.history_rows().await, [format!("1 applied 1 {ACTOR}"), format!("2 applied 1 {ACTOR}"), format!("3 applied 2 {ACTOR}")]);
    assert_eq!(case.events().await, ["run-start", "applied:1", "applied:2", "run-end", "run-start", "applied:3", "run-end"]);
    match engine {
        // RFC 3339, UTC, milliseconds.
        Engine::Sqlite => {
            let at = case.strings("SELECT applied_at FROM kiln_history WHERE version = 3").await;
            assert!(at[0].len() == 24 && at[0].ends_with('Z') && at[0].as_bytes()[19] == b'.', "{at:?}");
        }
        // History columns are what DESIGN §3 says.
        Engine::Mysql => assert_eq!(
            case.strings(&format!(
                "SELECT DATA_TYPE FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = '{}' AND TABLE_NAME = 'kiln_history' \
                 AND COLUMN_NAME IN ('applied_at', 'version') ORDER BY COLUMN_NAME",
                case.db.name
            ))
            .await,
            ["datetime", "bigint"]
        ),
        _ => {}
    }

    let status = Runner::new(&mut *b, settings()).status(&local).await.unwrap();
    assert_eq!(status.iter().map(|r| r.state.as_str()).collect::<Vec<_>>(), ["applied", "applied", "applied"]);
    assert!(status.iter().all(|r| r.checksum_ok == Some(true)), "{status:?}");
    let history = b.read_history().await.unwrap().unwrap();
    assert_eq!(history.len(), 3);
    assert!(history.iter().all(|a| a.state == State::Applied && a.error.is_none()));
    assert!(history.iter().zip(&local).all(|(a, m)| a.checksum == m.checksum));
    assert!((chrono::Utc::now() - history[2].applied_at).num_seconds().abs() < 60, "applied_at is UTC: {}", history[2].applied_at);

    // A second `up` finds nothing to do and records nothing.
    assert!(up(&mut *b, &local).await.unwrap().steps.is_empty());
    assert_eq!(case.events().await.len(), 7);

    // down reverts the last batch only …
    let r = down(&mut *b, &local).await.unwrap();
    assert_eq!(versions(&r), ["0003"]);
    assert_eq!(case.objects().await, ["users"]);
    assert_eq!(case.history().await, ["1:applied", "2:applied"]);
    // … and then the batch before it, newest first.
    let r = down(&mut *b, &local).await.unwrap();
    assert_eq!(versions(&r), ["0002", "0001"]);
    assert!(case.objects().await.is_empty());
    if case.is_sql() {
        assert_eq!(case.all_objects().await, ["kiln_history", "kiln_log", "kiln_snapshot"], "the index went with 0002's down");
    }
    assert!(case.history().await.is_empty());
    assert_eq!(case.events().await[7..], ["run-start", "reverted:3", "run-end", "run-start", "reverted:2", "reverted:1", "run-end"]);

    // Up again from nothing: batch numbering restarts with the empty history.
    let r = up(&mut *b, &local).await.unwrap();
    assert_eq!((r.batch, r.steps.len()), (Some(1), 3));
    assert_eq!(case.count("users").await, 2);
    assert_eq!(case.history_rows().await, [format!("1 applied 1 {ACTOR}"), format!("2 applied 1 {ACTOR}"), format!("3 applied 1 {ACTOR}")]);
    // Nothing pending: a no-op.
    assert!(up(&mut *b, &local).await.unwrap().steps.is_empty());
    close(b).await;
}

on!(read_history_on_a_fresh_database_creates_nothing: postgres, mysql, sqlite, mongodb);
async fn read_history_on_a_fresh_database_creates_nothing(engine: Engine) {
    let case = EngineCase::new(engine).await;
    case.write(&format!("0001_one.{}", case.ext()), if case.is_sql() { "CREATE TABLE one (id INT);\n" } else { "up:\n  - create: one\n" });
    let local = case.load();
    let mut b = backend(case.url()).await;
    assert!(b.read_history().await.unwrap().is_none());
    assert!(case.all_objects().await.is_empty());
    // Status and a dry run of a database kiln never touched: everything pending, still nothing created.
    let status = Runner::new(&mut *b, settings()).status(&local).await.unwrap();
    assert_eq!(status[0].state, "pending");
    let dry = Runner::new(&mut *b, settings()).up(&local, &UpTarget::Latest, &Policy::default(), true).await.unwrap();
    assert!(dry.dry_run && dry.steps.len() == 1);
    assert!(case.all_objects().await.is_empty());

    b.ensure_history().await.unwrap();
    b.ensure_history().await.unwrap(); // idempotent
    assert_eq!(b.read_history().await.unwrap(), Some(vec![]));
    match engine {
        Engine::Mongodb => assert_eq!(case.all_objects().await, ["kiln_history", "kiln_log"]),
        _ => assert_eq!(case.all_objects().await, ["kiln_history", "kiln_log", "kiln_snapshot"]),
    }
    match engine {
        Engine::Postgres => assert_eq!(
            case.strings(
                "SELECT string_agg(column_name || ' ' || data_type, ', ' ORDER BY ordinal_position) FROM information_schema.columns WHERE table_name = 'kiln_history'"
            )
            .await[0],
            "version bigint, description text, script text, migration_group text, checksum text, state text, batch bigint, \
             applied_at timestamp with time zone, duration_ms bigint, applied_by text, kiln_version text, error text, error_statement integer, error_line integer"
        ),
        Engine::Mysql => assert_eq!(
            case.strings(&format!("SELECT DISTINCT ENGINE FROM information_schema.TABLES WHERE TABLE_SCHEMA = '{}'", case.db.name)).await,
            ["InnoDB"]
        ),
        _ => {}
    }
}

on!(a_body_of_another_kind_is_refused: postgres, mysql, sqlite, mongodb);
async fn a_body_of_another_kind_is_refused(engine: Engine) {
    let case = EngineCase::new(engine).await;
    let file = match engine {
        Engine::Mongodb => {
            case.write("0001_index.sql", "CREATE TABLE users (id INT);\n");
            "0001_index.sql"
        }
        _ => {
            case.write("0001_index.yaml", "up:\n  - createIndexes: users\n    indexes: [{ key: { a: 1 }, name: a_1 }]\n");
            "0001_index.yaml"
        }
    };
    let local = case.load();
    let mut b = backend(case.url()).await;
    b.ensure_history().await.unwrap();
    let ctx = RecordContext { batch: 1, actor: "t@h".into() };
    match b.apply(&local[0], &ctx).await {
        Err(StepError::Engine(EngineError::Refused(m))) => assert!(m.contains(file), "{m}"),
        Err(StepError::Engine(e)) => panic!("{e}"),
        Err(StepError::Body(e)) => panic!("{}", e.error),
        Err(StepError::Invalid { violations, .. }) => panic!("{violations:?}"),
        Ok(()) => panic!("a migration of another kind ran on {engine:?}"),
    }
    assert!(case.history().await.is_empty());
    // The runner refuses the plan before it reaches the engine.
    assert!(matches!(up(&mut *b, &local).await, Err(RunError::Plan(_))));
    assert!(case.objects().await.is_empty());
}

on!(custom_table_names_upsert_and_baseline: postgres, mysql, sqlite, mongodb);
async fn custom_table_names_upsert_and_baseline(engine: Engine) {
    let case = EngineCase::new(engine).await;
    for (file, name) in [("0001_one", "one"), ("0002_two", "two")] {
        match engine {
            Engine::Mongodb => case.write(&format!("{file}.yaml"), &format!("up:\n  - create: {name}\n")),
            _ => case.write(&format!("{file}.sql"), &format!("CREATE TABLE {name} (id INT);\n")),
        }
    }
    let local = case.load();
    // Names that need quoting in each engine's own way.
    let history = match engine {
        Engine::Mysql => "app`changelog",
        Engine::Mongodb => "app changelog",
        _ => "app \"changelog\"",
    };
    let mut cfg = BackendConfig::new(case.url());
    cfg.history_table = history.into();
    cfg.log_table = "app_events".into();
    let mut b = backend_for(&cfg).await;
    Runner::new(&mut *b, settings()).baseline(&local, &Version::parse_arg("0001").unwrap(), Some("existed before kiln")).await.unwrap();
    up(&mut *b, &local).await.unwrap();
    assert_eq!(case.history_in(history).await, ["1:baseline", "2:applied"]);
    // The baseline did not run 0001.
    let mut expected = vec!["app_events", history, "two"];
    expected.sort();
    assert_eq!(case.objects().await, expected);
    let events = case.events_in("app_events").await;
    assert_eq!(events.iter().filter(|e| e.starts_with("baseline")).count(), 1, "{events:?}");

    // Upsert replaces by version; delete removes one entry.
    let mut e = b.read_history().await.unwrap().unwrap().remove(1);
    e.description = "renamed".into();
    b.upsert_history(&[e]).await.unwrap();
    let back = b.read_history().await.unwrap().unwrap();
    assert_eq!(back.iter().map(|a| a.description.as_str()).collect::<Vec<_>>(), ["one", "renamed"]);
    b.delete_history(2).await.unwrap();
    assert_eq!(case.history_in(history).await, ["1:baseline"]);
}

/// A URL whose connection says who it is, where the engine shows it as the lock holder.
fn holder_url(case: &EngineCase) -> String {
    match case.engine {
        Engine::Postgres => format!("{}?application_name=holder-runner", case.url()),
        _ => case.url().to_string(),
    }
}

on!(lock_contention_names_the_holder_and_dies_with_the_session: postgres, mysql, sqlite);
async fn lock_contention_names_the_holder_and_dies_with_the_session(engine: Engine) {
    let case = EngineCase::new(engine).await;
    let mut a = backend(&holder_url(&case)).await;
    let mut b = backend(case.url()).await;
    assert!(a.try_lock().await.unwrap());
    assert!(a.try_lock().await.unwrap(), "re-taking our own lock must not block");
    assert!(!b.try_lock().await.unwrap());

    // The holder, as each engine can tell it.
    let mysql_lock = format!("kiln:{}:kiln_history", case.db.name);
    let names_the_holder: Box<dyn Fn(&str) -> bool> = match engine {
        Engine::Postgres => Box::new(|s: &str| s.contains("holder-runner") && s.contains("server pid")),
        Engine::Mysql => {
            let id = case.strings(&format!("SELECT IS_USED_LOCK('{mysql_lock}')")).await.remove(0);
            Box::new(move |s: &str| s.contains(&format!("MySQL connection {id} (root@")))
        }
        _ => Box::new(|s: &str| s.contains(&format!("pid {}", std::process::id())) && s.contains("-kiln.lock")),
    };
    let holder = b.lock_holder().await.expect("holder named");
    assert!(names_the_holder(&holder), "{holder}");

    let t = Instant::now();
    let err = b.lock(Duration::from_millis(300)).await.unwrap_err();
    assert!(t.elapsed() >= Duration::from_millis(300) && t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(matches!(err, EngineError::LockTimeout { .. }), "{err:?}");
    assert!(names_the_holder(&err.to_string()), "{err}");

    // A runner on `b` waits its lock time-out, gives up with the same error, and changes nothing.
    case.write("0001_t.sql", "CREATE TABLE t (id INTEGER);\n");
    let short = RunnerSettings { lock_timeout: Duration::from_millis(200), actor: ACTOR.into() };
    let err = Runner::new(&mut *b, short).up(&case.load(), &UpTarget::Latest, &Policy::default(), false).await.unwrap_err();
    assert!(matches!(err, RunError::Engine(EngineError::LockTimeout { .. })), "{err:?}");
    assert!(names_the_holder(&err.to_string()), "{err}");
    assert!(case.all_objects().await.is_empty());

    // One unlock releases it, even though it was taken twice; releasing twice is fine.
    a.unlock().await.unwrap();
    a.unlock().await.unwrap();
    assert!(b.try_lock().await.unwrap());
    assert!(!a.try_lock().await.unwrap());
    b.unlock().await.unwrap();
    if engine == Engine::Mysql {
        assert_eq!(case.strings(&format!("SELECT IS_FREE_LOCK('{mysql_lock}')")).await, ["1"]);
    }

    // The holder's session dying (a process exit) releases the lock.
    assert!(a.try_lock().await.unwrap());
    drop(a);
    b.lock(Duration::from_secs(5)).await.expect("the lock dies with its session");
    b.unlock().await.unwrap();
    let mut c = backend(&holder_url(&case)).await;
    assert!(c.try_lock().await.unwrap());

    // … and so does the holder's connection being killed, as a crashed host would.
    match engine {
        Engine::Postgres => {
            case.db.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'holder-runner'").await.unwrap();
            b.lock(Duration::from_secs(5)).await.expect("a killed holder never blocks");
            let err = c.try_lock().await.unwrap_err();
            assert!(matches!(err, EngineError::ConnectionLost { .. }), "{err:?}");
        }
        Engine::Mysql => {
            let id = case.strings(&format!("SELECT IS_USED_LOCK('{mysql_lock}')")).await;
            case.db.sql(&format!("KILL {}", id[0])).await.unwrap();
            b.lock(Duration::from_secs(5)).await.expect("a killed holder never blocks");
        }
        _ => {
            c.unlock().await.unwrap();
            assert!(b.try_lock().await.unwrap());
        }
    }
    drop(c);
}

/// A second migration that fails where it has changed nothing yet, on each engine,
/// and what the failure must say: (file text, statement, line, code, start of the message).
fn failing_second(engine: Engine) -> (&'static str, usize, usize, &'static str, &'static str) {
    match engine {
        // The failing statement is the second one; the error sits on its third line.
        Engine::Postgres => (
            "CREATE TABLE second (id INT);\n\nINSERT INTO second (id)\nSELECT id\nFROM no_such_table;\nCREATE TABLE never (id INT);\n",
            2,
            5,
            "42P01",
            "42P01: relation \"no_such_table\" does not exist",
        ),
        // MySQL commits DDL: only a failure of the first statement leaves nothing.
        Engine::Mysql => {
            ("-- comment\nCREATE TABLE first (id INT);\nCREATE TABLE never (id INT);\n", 1, 2, "1050", "1050 (42S01): Table 'first' already exists")
        }
        Engine::Sqlite => {
            ("CREATE TABLE second (id INTEGER);\nINSERT INTO second VALUES (1);\n\nINSERT INTO nope VALUES (1);\n", 3, 4, "1", "no such table: nope")
        }
        // collMod of a collection that does not exist: NamespaceNotFound (26), before anything changed.
        Engine::Mongodb => ("up:\n  - collMod: nothere\n    validationLevel: strict\n  - create: never\n", 1, 2, "26", "NamespaceNotFound"),
    }
}

on!(a_failed_migration_that_changed_nothing_is_rolled_back_and_blocks_nothing: postgres, mysql, sqlite, mongodb);
async fn a_failed_migration_that_changed_nothing_is_rolled_back_and_blocks_nothing(engine: Engine) {
    let case = EngineCase::new(engine).await;
    let ext = case.ext();
    let create = |name: &str| if case.is_sql() { format!("CREATE TABLE {name} (id INT);\n") } else { format!("up:\n  - create: {name}\n") };
    case.write(&format!("0001_first.{ext}"), &create("first"));
    let (body, statement, line, code, message) = failing_second(engine);
    let file = format!("0002_second.{ext}");
    case.write(&file, body);
    case.write(&format!("0003_third.{ext}"), &create("third"));
    let mut b = backend(case.url()).await;

    let err = up(&mut *b, &case.load()).await.unwrap_err();
    let RunError::Migration { version, outcome, error, done } = err else { panic!("expected a migration failure, got {err:?}") };
    assert_eq!((version.number, outcome), (2, kiln_core::FailureOutcome::RolledBack));
    assert_eq!(done.iter().map(|v| v.number).collect::<Vec<_>>(), [1]);
    assert_eq!((error.file.as_str(), error.statement, error.line, error.code.as_deref()), (file.as_str(), statement, line, Some(code)));
    match engine {
        Engine::Postgres | Engine::Mysql => assert!(error.message.starts_with(message), "{}", error.message),
        _ => assert!(error.message.contains(message), "{}", error.message),
    }

    // Nothing of 0002 remains and there is no entry for it; 0001 stays; 0003 never ran.
    assert_eq!(case.objects().await, ["first"]);
    assert_eq!(case.history().await, ["1:applied"]);
    assert_eq!(case.events().await, ["run-start", "applied:1", "failed:2", "run-end"]);
    let detail = case.details("failed").await;
    assert_eq!(detail.len(), 1);
    assert!(detail[0].starts_with(&format!("{file}: statement {statement} (line {line}) failed")), "{detail:?}");
    match engine {
        Engine::Postgres => assert!(detail[0].contains("no_such_table"), "{detail:?}"),
        Engine::Mongodb => assert!(detail[0].contains("nothing was changed"), "{detail:?}"),
        _ => assert!(detail[0].contains(message), "{detail:?}"),
    }

    // Rolled back means not blocking: fix the file and run again.
    let fixed = match engine {
        Engine::Mongodb => "up:\n  - create: nothere\n  - collMod: nothere\n    validationLevel: strict\n",
        Engine::Sqlite => "CREATE TABLE second (id INTEGER);\nINSERT INTO second VALUES (1);\n",
        _ => "CREATE TABLE second (id INT);\nCREATE TABLE never (id INT);\n",
    };
    case.write(&file, fixed);
    let r = up(&mut *b, &case.load()).await.unwrap();
    assert_eq!(versions(&r), ["0002", "0003"]);
    assert_eq!(case.history().await, ["1:applied", "2:applied", "3:applied"]);
    match engine {
        Engine::Mongodb => assert_eq!(case.objects().await, ["first", "nothere", "third"]),
        Engine::Sqlite => {
            assert_eq!(case.objects().await, ["first", "second", "third"]);
            assert_eq!(case.count("second").await, 1);
        }
        _ => assert_eq!(case.objects().await, ["first", "never", "second", "third"]),
    }
}
