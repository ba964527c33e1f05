//! URLs and connection errors on every engine: a URL that cannot work is
//! `BadUrl`, a server or file that cannot be reached is `Connect` with the
//! reason, and no message ever shows a password.

use std::time::{Duration, Instant};

use kiln_core::{BackendConfig, EngineError};
use kiln_testkit::case::EngineCase;
use kiln_testkit::Engine;

use crate::support::{backend, connect};

/// The error `url` fails to connect with.
async fn refused(url: &str) -> EngineError {
    match connect(&BackendConfig::new(url)).await {
        Err(e) => e,
        Ok(_) => panic!("{url} connected"),
    }
}

on!(urls_and_connection_errors: postgres, mysql, sqlite, mongodb);
async fn urls_and_connection_errors(engine: Engine) {
    let case = EngineCase::new(engine).await;
    match engine {
        Engine::Postgres => {
            let err = refused("postgres://kiln:hunter2secret@127.0.0.1:1/db").await;
            let text = err.to_string();
            assert!(matches!(err, EngineError::Connect { .. }), "{err:?}");
            assert!(text.to_lowercase().contains("connection refused"), "{text}");
            assert!(!text.contains("hunter2secret") && text.contains("***"), "{text}");

            let mut u = url::Url::parse(case.url()).unwrap();
            u.set_password(Some("hunter2secret")).unwrap();
            u.set_path("/kiln_no_such_database");
            let text = refused(u.as_str()).await.to_string();
            assert!(text.contains("database \"kiln_no_such_database\" does not exist"), "{text}");
            assert!(!text.contains("hunter2secret"), "{text}");

            for bad in ["postgres://kiln:hunter2secret@127.0.0.1:notaport/db", "postgres://kiln:hunter2secret@127.0.0.1/db?sslmode=sometimes"] {
                let err = refused(bad).await;
                assert!(matches!(err, EngineError::BadUrl { .. }), "{err:?}");
                assert!(!err.to_string().contains("hunter2secret"), "{err}");
            }
            assert!(refused("postgres://kiln:hunter2secret@127.0.0.1/db?sslmode=sometimes").await.to_string().contains("sslmode"));
        }
        Engine::Mysql => {
            let mut u = url::Url::parse(case.url()).unwrap();
            // No database.
            let mut no_db = u.clone();
            no_db.set_path("");
            let _ = no_db.set_password(Some("s3cret"));
            let err = refused(no_db.as_str()).await;
            let msg = err.to_string();
            assert!(matches!(err, EngineError::BadUrl { .. }), "{err:?}");
            assert!(msg.contains("no database") && !msg.contains("s3cret"), "{msg}");
            // Wrong password: the server's reason, never the password.
            let mut bad_pw = u.clone();
            bad_pw.set_password(Some("wrong-s3cret")).unwrap();
            let err = refused(bad_pw.as_str()).await;
            let msg = err.to_string();
            assert!(matches!(err, EngineError::Connect { .. }), "{err:?}");
            assert!(msg.contains("1045") && !msg.contains("wrong-s3cret") && msg.contains("***"), "{msg}");
            // Nothing listening.
            let mut closed = u.clone();
            closed.set_port(Some(1)).unwrap();
            assert!(matches!(refused(closed.as_str()).await, EngineError::Connect { .. }));
            // A database that does not exist.
            let mut missing = u.clone();
            missing.set_path("/kiln_no_such_db");
            match refused(missing.as_str()).await {
                EngineError::Connect { message, .. } => assert!(message.contains("1049"), "{message}"),
                e => panic!("{e}"),
            }
            // mariadb:// works, and so does a Unix socket.
            u.set_scheme("mariadb").unwrap();
            let mut m = backend(u.as_str()).await;
            assert!(m.read_history().await.unwrap().is_none());
            assert_eq!(m.capabilities().engine, "mysql");
            assert!(!m.capabilities().transactional_ddl);
            let socket = format!("mysql://root@localhost/{}?socket=/run/mysqld/mysqld.sock", case.db.name);
            let mut s = backend(&socket).await;
            s.ensure_history().await.unwrap();
            assert_eq!(s.read_history().await.unwrap().unwrap().len(), 0);
        }
        Engine::Sqlite => {
            for url in ["sqlite://", "sqlite:"] {
                assert!(matches!(refused(url).await, EngineError::BadUrl { .. }), "{url}");
            }
            // A directory that does not exist.
            match refused("sqlite:///nonexistent-kiln-dir/x.db").await {
                EngineError::Connect { message, .. } => assert!(message.contains("/nonexistent-kiln-dir"), "{message}"),
                e => panic!("{e}"),
            }
            // A file that is not a database.
            let junk = case.dir.path().join("junk.db");
            std::fs::write(&junk, vec![b'x'; 4096]).unwrap();
            match refused(&format!("sqlite://{}", junk.display())).await {
                EngineError::Connect { message, .. } => assert!(message.contains("not a database"), "{message}"),
                e => panic!("{e}"),
            }
            // `sqlite:relative.db` creates the file relative to the working directory; use an absolute path here.
            let created = case.dir.path().join("new.db");
            let mut b = backend(&format!("sqlite:{}", created.display())).await;
            b.ensure_history().await.unwrap();
            assert!(created.exists());
            // In-memory databases work (tests only).
            let mut m = backend("sqlite::memory:").await;
            assert!(m.try_lock().await.unwrap());
            m.ensure_history().await.unwrap();
            assert_eq!(m.read_history().await.unwrap().unwrap().len(), 0);
            assert_eq!(m.capabilities().engine, "sqlite");
            assert!(m.capabilities().transactional_ddl);
        }
        Engine::Mongodb => {
            // Nothing listening: a prompt error with the password masked.
            let started = Instant::now();
            let err = refused("mongodb://kiln:s3cret-pw@127.0.0.1:9/app").await;
            assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
            let msg = err.to_string();
            assert!(matches!(err, EngineError::Connect { .. }), "{msg}");
            assert!(msg.contains("mongodb://kiln:***@127.0.0.1:9/app") && !msg.contains("s3cret"), "{msg}");
            let b = backend(case.url()).await;
            assert_eq!(b.capabilities().engine, "mongodb");
        }
    }
    // A URL of no engine at all.
    assert!(matches!(refused("nosuchdb://x/y").await, EngineError::BadUrl { .. }));
}
