//! Schema inspection and scratch databases on the SQL engines: what kiln
//! reads of a schema (without its own tables), at what speed, and the
//! throw-away databases of `kiln verify`.

use std::path::Path;
use std::time::{Duration, Instant};

use kiln_core::schema::{self, ConstraintInfo, IndexInfo, Snapshot};
use kiln_core::{BackendConfig, EngineError};
use kiln_testkit::case::EngineCase;
use kiln_testkit::Engine;

use crate::support::{backend, backend_for, col, constraint, contract, strings, up};

/// A schema with every kind of column, index and constraint the engine has,
/// the contract it satisfies, and the checks of what inspection reports.
struct Schema {
    ddl: &'static str,
    contract: &'static str,
    check: fn(&Snapshot),
}

fn schema_of(engine: Engine) -> Schema {
    match engine {
        Engine::Postgres => Schema { ddl: POSTGRES_DDL, contract: POSTGRES_CONTRACT, check: postgres_checks },
        Engine::Mysql => Schema { ddl: MYSQL_DDL, contract: MYSQL_CONTRACT, check: mysql_checks },
        Engine::Sqlite => Schema { ddl: SQLITE_DDL, contract: SQLITE_CONTRACT, check: sqlite_checks },
        Engine::Mongodb => unreachable!("MongoDB inspection is tested in kiln-mongo"),
    }
}

on!(inspect_reports_columns_indexes_and_constraints_without_kilns_tables: postgres, mysql, sqlite);
async fn inspect_reports_columns_indexes_and_constraints_without_kilns_tables(engine: Engine) {
    let case = EngineCase::new(engine).await;
    let schema = schema_of(engine);
    case.write("0001_schema.sql", schema.ddl);
    let mut b = backend(case.url()).await;
    up(&mut *b, &case.load()).await.unwrap();

    let s = b.inspect().await.unwrap();
    (schema.check)(&s);
    // A contract can ask for constraints and indexes by name or by columns.
    assert_eq!(schema::validate(&contract(schema.contract), &s), vec![]);
    // The dump of the live schema is a contract the live schema satisfies.
    assert_eq!(schema::validate(&schema::dump(&s, false), &s), vec![]);
    // Another connection reads exactly the same schema, so a stored snapshot shows no drift.
    assert_eq!(backend(case.url()).await.inspect().await.unwrap(), s);
}

const POSTGRES_DDL: &str =         "CREATE TABLE users (id BIGSERIAL PRIMARY KEY, email VARCHAR(255) NOT NULL, name TEXT, tenant_id INT NOT NULL,\n\
         created_at TIMESTAMPTZ NOT NULL DEFAULT now(), CONSTRAINT users_email_key UNIQUE (email),\n\
         CONSTRAINT users_name_len CHECK (length(name) < 100));\n\
         ALTER TABLE users DROP COLUMN tenant_id;\n\
         CREATE TABLE posts (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, user_id BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,\n\
         title TEXT NOT NULL, body TEXT, published BOOLEAN, score NUMERIC(10, 2));\n\
         CREATE INDEX posts_user_idx ON posts (user_id, id DESC);\n\
         CREATE UNIQUE INDEX posts_title_lower ON posts (lower(title)) WHERE published;\n\
         CREATE INDEX posts_body_gin ON posts USING gin (to_tsvector('english', body));\n\
         CREATE TABLE empty ();\n\
         CREATE VIEW recent_posts AS SELECT * FROM posts;\n\
         CREATE SCHEMA geo;\n\
         CREATE TABLE geo.countries (code TEXT PRIMARY KEY);\n\
         CREATE TABLE addresses (user_id BIGINT, kind TEXT, country TEXT REFERENCES geo.countries (code) ON UPDATE CASCADE DEFERRABLE INITIALLY DEFERRED,\n\
         PRIMARY KEY (user_id, kind), CONSTRAINT addresses_one UNIQUE NULLS NOT DISTINCT (kind, country) INCLUDE (user_id),\n\
         CONSTRAINT addresses_user FOREIGN KEY (user_id) REFERENCES users (id) MATCH FULL);\n";

const POSTGRES_CONTRACT: &str = "tables:\n  users:\n    required: [id, {name: email, type: varchar(255), nullable: false}, {name: created_at, type: timestamptz}]\n\
         \x20   unique: [users_email_key, [email]]\n    indexes: [users_pkey]\n\
         \x20 posts:\n    required: [{name: id, type: int8}, user_id]\n    indexes: [posts_user_idx, [user_id, id]]\n    unique: [posts_title_lower]\n";

fn postgres_checks(s: &Snapshot) {
    assert_eq!(s.objects.keys().collect::<Vec<_>>(), ["addresses", "empty", "posts", "users"], "no kiln tables, no views, no other schema");
    assert!(s.objects["empty"].columns.is_empty());

    let users = &s.objects["users"];
    assert_eq!(
        users.columns.iter().map(|(k, v)| (k.as_str(), v.clone())).collect::<Vec<_>>(),
        [
            ("created_at", col("timestamp with time zone", false)),
            ("email", col("character varying(255)", false)),
            ("id", col("bigint", false)),
            ("name", col("text", true)),
        ],
        "the dropped column is gone"
    );
    // The indexes behind the primary key and the unique constraint are reported as the constraints.
    assert!(users.indexes.is_empty(), "{:?}", users.indexes);
    assert_eq!(users.constraints["users_pkey"], ConstraintInfo { kind: "primary key".into(), columns: strings(&["id"]), definition: None });
    assert_eq!(users.constraints["users_email_key"], ConstraintInfo { kind: "unique".into(), columns: strings(&["email"]), definition: None });
    assert_eq!(
        users.constraints["users_name_len"],
        ConstraintInfo { kind: "check".into(), columns: strings(&["name"]), definition: Some("CHECK (length(name) < 100)".into()) }
    );

    let posts = &s.objects["posts"];
    assert_eq!(posts.columns["score"], col("numeric(10,2)", true));
    assert_eq!(
        posts.constraints["posts_user_id_fkey"],
        ConstraintInfo {
            kind: "foreign key".into(),
            columns: strings(&["user_id"]),
            definition: Some("references users (id) on update no action on delete cascade".into())
        }
    );
    assert_eq!(posts.constraints.len(), 2, "{:?}", posts.constraints);
    assert_eq!(
        posts.indexes["posts_user_idx"],
        IndexInfo { columns: strings(&["user_id", "id"]), unique: false, options: Some("keys (user_id, id desc)".into()) }
    );
    assert_eq!(
        posts.indexes["posts_title_lower"],
        IndexInfo { columns: strings(&["lower(title)"]), unique: true, options: Some("where published".into()) }
    );
    assert_eq!(
        posts.indexes["posts_body_gin"],
        IndexInfo { columns: strings(&["to_tsvector('english'::regconfig, body)"]), unique: false, options: Some("using gin".into()) }
    );
    assert_eq!(posts.indexes.len(), 3, "{:?}", posts.indexes);

    let addresses = &s.objects["addresses"];
    let constraint = |kind: &str, columns: &[&str], definition: Option<&str>| ConstraintInfo {
        kind: kind.into(),
        columns: strings(columns),
        definition: definition.map(str::to_string),
    };
    assert_eq!(
        addresses.constraints.iter().map(|(k, v)| (k.as_str(), v.clone())).collect::<Vec<_>>(),
        [
            (
                "addresses_country_fkey",
                constraint(
                    "foreign key",
                    &["country"],
                    Some("references geo.countries (code) on update cascade on delete no action deferrable initially deferred")
                )
            ),
            ("addresses_one", constraint("unique", &["kind", "country"], Some("nulls not distinct include (user_id)"))),
            ("addresses_pkey", constraint("primary key", &["user_id", "kind"], None)),
            (
                "addresses_user",
                constraint("foreign key", &["user_id"], Some("references users (id) on update no action on delete no action match full"))
            ),
        ]
    );
    assert!(addresses.indexes.is_empty(), "{:?}", addresses.indexes);
}

const MYSQL_DDL: &str =         "CREATE TABLE users (id BIGINT AUTO_INCREMENT PRIMARY KEY, email VARCHAR(255) NOT NULL, name TEXT, active TINYINT(1) NOT NULL DEFAULT 1,\n\
         visits INT UNSIGNED, CONSTRAINT users_email_key UNIQUE (email), CONSTRAINT users_name_len CHECK (CHAR_LENGTH(name) < 100));\n\
         CREATE TABLE posts (id BIGINT PRIMARY KEY, user_id BIGINT NOT NULL, title VARCHAR(200) NOT NULL, body TEXT, score DECIMAL(10, 2),\n\
         CONSTRAINT posts_user_fk FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE CASCADE);\n\
         CREATE INDEX posts_title_prefix ON posts (title(20), id DESC);\n\
         CREATE FULLTEXT INDEX posts_body_ft ON posts (body);\n\
         CREATE TABLE tags (post_id BIGINT NOT NULL, tag VARCHAR(50) NOT NULL, PRIMARY KEY (post_id, tag),\n\
         CONSTRAINT tags_post FOREIGN KEY (post_id) REFERENCES posts (id) ON UPDATE CASCADE ON DELETE NO ACTION, UNIQUE INDEX tags_tag (tag, post_id));\n\
         CREATE VIEW recent_posts AS SELECT * FROM posts;\n";

const MYSQL_CONTRACT: &str = "tables:\n  users:\n    required: [{name: id, type: bigint}, {name: email, type: varchar(255), nullable: false}, {name: active, type: boolean}]\n\
         \x20   unique: [users_email_key, [email]]\n\
         \x20 posts:\n    required: [id, user_id]\n    indexes: [posts_title_prefix, [user_id], PRIMARY]\n";

fn mysql_checks(s: &Snapshot) {
    assert_eq!(s.objects.keys().collect::<Vec<_>>(), ["posts", "tags", "users"], "no kiln tables, no views");

    let users = &s.objects["users"];
    assert_eq!(
        users.columns.iter().map(|(k, v)| (k.as_str(), v.clone())).collect::<Vec<_>>(),
        [
            ("active", col("tinyint(1)", false)),
            ("email", col("varchar(255)", false)),
            ("id", col("bigint", false)),
            ("name", col("text", true)),
            ("visits", col("int unsigned", true)),
        ],
        "integer display widths are dropped, as MySQL 8 reports them"
    );
    // The unique index behind the PRIMARY KEY and the UNIQUE constraint is reported once, as the constraint.
    assert!(users.indexes.is_empty(), "{:?}", users.indexes);
    assert_eq!(users.constraints["PRIMARY"], constraint("primary key", &["id"], None));
    assert_eq!(users.constraints["users_email_key"], constraint("unique", &["email"], None));
    let check = &users.constraints["users_name_len"];
    assert_eq!(check.kind, "check");
    assert!(check.definition.as_deref().is_some_and(|d| d.starts_with("CHECK (") && d.contains("100")), "{check:?}");
    assert_eq!(users.constraints.len(), 3, "{:?}", users.constraints);

    let posts = &s.objects["posts"];
    assert_eq!(posts.columns["score"], col("decimal(10,2)", true));
    assert_eq!(
        posts.constraints["posts_user_fk"],
        constraint("foreign key", &["user_id"], Some("references users (id) on update restrict on delete cascade"))
    );
    assert_eq!(
        posts.indexes["posts_title_prefix"],
        IndexInfo { columns: strings(&["title", "id"]), unique: false, options: Some("keys (title(20), id desc)".into()) }
    );
    assert_eq!(posts.indexes["posts_body_ft"], IndexInfo { columns: strings(&["body"]), unique: false, options: Some("using fulltext".into()) });
    // InnoDB's own index for the foreign key is an index like any other.
    assert_eq!(posts.indexes["posts_user_fk"], IndexInfo { columns: strings(&["user_id"]), unique: false, options: None });
    assert_eq!(posts.indexes.len(), 3, "{:?}", posts.indexes);

    let tags = &s.objects["tags"];
    assert_eq!(
        tags.constraints.iter().map(|(k, v)| (k.as_str(), v.clone())).collect::<Vec<_>>(),
        [
            ("PRIMARY", constraint("primary key", &["post_id", "tag"], None)),
            ("tags_post", constraint("foreign key", &["post_id"], Some("references posts (id) on update cascade on delete no action"))),
            ("tags_tag", constraint("unique", &["tag", "post_id"], None)),
        ]
    );
    assert!(tags.indexes.is_empty(), "the primary key serves the foreign key: {:?}", tags.indexes);
}

const SQLITE_DDL: &str =
    "CREATE TABLE users (id INTEGER PRIMARY KEY, email VARCHAR(255) NOT NULL, name TEXT, CONSTRAINT users_email_uq UNIQUE (email));\n\
         CREATE TABLE posts (id BIGINT PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES users ON DELETE CASCADE, title TEXT NOT NULL,\n\
         body, published BOOLEAN, score NUMERIC(10, 2), CHECK (length(title) < 100));\n\
         CREATE INDEX posts_user_idx ON posts (user_id, id DESC);\n\
         CREATE UNIQUE INDEX posts_title_lower ON posts (lower(title)) WHERE published;\n\
         CREATE INDEX posts_title_nocase ON posts (title COLLATE NOCASE);\n\
         CREATE TABLE tags (post_id INTEGER, tag TEXT, PRIMARY KEY (post_id, tag), FOREIGN KEY (post_id) REFERENCES posts (id)) WITHOUT ROWID;\n\
         CREATE TABLE counters (id INTEGER PRIMARY KEY AUTOINCREMENT, n INT, doubled INT GENERATED ALWAYS AS (n * 2));\n\
         INSERT INTO counters (n) VALUES (1);\n\
         CREATE VIRTUAL TABLE docs USING fts5(title, body);\n\
         CREATE VIEW recent_posts AS SELECT * FROM posts;\n\
         ANALYZE;\n";

const SQLITE_CONTRACT: &str = "tables:\n  users:\n    required: [id, {name: email, type: varchar(255), nullable: false}]\n    unique: [users_email_key, [email]]\n\
         \x20 posts:\n    required: [{name: id, type: int8}, user_id]\n    indexes: [posts_user_idx, [user_id, id], posts_pkey]\n    unique: [posts_title_lower]\n";

fn sqlite_checks(s: &Snapshot) {
    // No kiln tables, no view, no sqlite_sequence / sqlite_stat1, no FTS5 shadow tables (docs_data…).
    assert_eq!(s.objects.keys().collect::<Vec<_>>(), ["counters", "docs", "posts", "tags", "users"]);

    let users = &s.objects["users"];
    assert_eq!(
        users.columns.iter().map(|(k, v)| (k.as_str(), v.clone())).collect::<Vec<_>>(),
        [("email", col("varchar(255)", false)), ("id", col("integer", false)), ("name", col("text", true))],
        "an INTEGER PRIMARY KEY is the rowid: never NULL"
    );
    // The automatic index behind UNIQUE is reported as the constraint, under the name PostgreSQL would give it.
    assert!(users.indexes.is_empty(), "{:?}", users.indexes);
    assert_eq!(
        users.constraints.iter().map(|(k, v)| (k.as_str(), v.clone())).collect::<Vec<_>>(),
        [("users_email_key", constraint("unique", &["email"], None)), ("users_pkey", constraint("primary key", &["id"], None))]
    );

    let posts = &s.objects["posts"];
    assert_eq!(posts.columns["score"], col("numeric(10, 2)", true));
    assert_eq!(posts.columns["body"], col("", true), "no declared type");
    // SQLite accepts NULL in a primary key column of a rowid table that is not the rowid; kiln reports what it enforces.
    assert_eq!(posts.columns["id"], col("bigint", true));
    assert_eq!(
        posts.constraints.iter().map(|(k, v)| (k.as_str(), v.clone())).collect::<Vec<_>>(),
        [
            ("posts_pkey", constraint("primary key", &["id"], None)),
            // `REFERENCES users` names no column: users' primary key.
            ("posts_user_id_fkey", constraint("foreign key", &["user_id"], Some("references users (id) on update no action on delete cascade"))),
        ]
    );
    assert_eq!(
        posts.indexes.iter().map(|(k, v)| (k.as_str(), v.clone())).collect::<Vec<_>>(),
        [
            ("posts_title_lower", IndexInfo { columns: strings(&["lower(title)"]), unique: true, options: Some("where published".into()) }),
            ("posts_title_nocase", IndexInfo { columns: strings(&["title"]), unique: false, options: Some("keys (title collate nocase)".into()) }),
            ("posts_user_idx", IndexInfo { columns: strings(&["user_id", "id"]), unique: false, options: Some("keys (user_id, id desc)".into()) }),
        ]
    );

    let tags = &s.objects["tags"];
    assert_eq!((&tags.columns["post_id"], &tags.columns["tag"]), (&col("integer", false), &col("text", false)), "WITHOUT ROWID keys are NOT NULL");
    assert_eq!(
        tags.constraints.iter().map(|(k, v)| (k.as_str(), v.clone())).collect::<Vec<_>>(),
        [
            ("tags_pkey", constraint("primary key", &["post_id", "tag"], None)),
            ("tags_post_id_fkey", constraint("foreign key", &["post_id"], Some("references posts (id) on update no action on delete no action"))),
        ]
    );
    assert!(tags.indexes.is_empty(), "{:?}", tags.indexes);
    assert_eq!(s.objects["counters"].columns["doubled"], col("int", true), "generated columns are columns");
    assert_eq!(s.objects["docs"].columns.keys().collect::<Vec<_>>(), ["body", "title"]);
}

on!(inspect_of_a_thousand_tables_takes_milliseconds: postgres, mysql, sqlite);
async fn inspect_of_a_thousand_tables_takes_milliseconds(engine: Engine) {
    let case = EngineCase::new(engine).await;
    // Each table: 5 columns, a primary key, a unique constraint, a foreign key,
    // a check and a plain index.
    match engine {
        Engine::Postgres => case
            .db
            .sql(
                "CREATE TABLE t0 (id INT PRIMARY KEY);\n\
                 DO $$ BEGIN FOR i IN 1..999 LOOP EXECUTE format(\
                 'CREATE TABLE t%s (id BIGINT PRIMARY KEY, code TEXT NOT NULL UNIQUE, parent_id INT REFERENCES t0 (id), \
                  amount NUMERIC(12, 2) CHECK (amount >= 0), created_at TIMESTAMPTZ NOT NULL); CREATE INDEX t%s_created ON t%s (created_at)', i, i, i);\
                 END LOOP; END $$;",
            )
            .await
            .unwrap(),
        Engine::Mysql => {
            // One statement per table (with InnoDB's index for the foreign key):
            // MariaDB spends ~10 ms on each CREATE.
            let mut ddl = String::from("CREATE TABLE t0 (id INT PRIMARY KEY);\n");
            for i in 1..1000 {
                ddl.push_str(&format!(
                    "CREATE TABLE t{i} (id BIGINT PRIMARY KEY, code VARCHAR(50) NOT NULL UNIQUE, parent_id INT, \
                     amount DECIMAL(12, 2) CHECK (amount >= 0), created_at DATETIME NOT NULL, INDEX t{i}_created (created_at), \
                     CONSTRAINT t{i}_parent FOREIGN KEY (parent_id) REFERENCES t0 (id));\n"
                ));
            }
            case.write("0001_thousand_tables.sql", &ddl);
        }
        _ => {
            let mut ddl = String::from("CREATE TABLE t0 (id INTEGER PRIMARY KEY);\n");
            for i in 1..1000 {
                ddl.push_str(&format!(
                    "CREATE TABLE t{i} (id BIGINT PRIMARY KEY, code TEXT NOT NULL UNIQUE, parent_id INT REFERENCES t0 (id), \
                     amount NUMERIC(12, 2) CHECK (amount >= 0), created_at TEXT NOT NULL);\nCREATE INDEX t{i}_created ON t{i} (created_at);\n"
                ));
            }
            case.write("0001_thousand_tables.sql", &ddl);
        }
    }
    let mut b = backend(case.url()).await;
    if engine != Engine::Postgres {
        up(&mut *b, &case.load()).await.unwrap();
    }
    let t = Instant::now();
    let s = b.inspect().await.unwrap();
    let took = t.elapsed();
    println!("inspect of {} tables took {took:?}", s.objects.len());
    let t = Instant::now();
    assert_eq!(b.inspect().await.unwrap(), s);
    println!("again, warm: {:?}", t.elapsed());
    assert_eq!(s.objects.len(), 1000);
    let t500 = &s.objects["t500"];
    let sizes = (t500.columns.len(), t500.indexes.len(), t500.constraints.len());
    match engine {
        Engine::Postgres => {
            assert_eq!(sizes, (5, 1, 4), "{t500:?}");
            assert_eq!(
                t500.constraints["t500_parent_id_fkey"].definition.as_deref(),
                Some("references t0 (id) on update no action on delete no action")
            );
            assert_eq!(t500.constraints["t500_code_key"].columns, ["code"]);
        }
        Engine::Mysql => {
            assert_eq!(sizes, (5, 2, 4), "{t500:?}");
            assert_eq!(t500.constraints["t500_parent"].definition.as_deref(), Some("references t0 (id) on update restrict on delete restrict"));
            assert_eq!(t500.constraints["code"].columns, ["code"]);
            assert_eq!(t500.constraints["amount"].columns, ["amount"], "MariaDB names a column check after its column");
        }
        _ => {
            assert_eq!(sizes, (5, 1, 3), "{t500:?}");
            assert_eq!(
                t500.constraints["t500_parent_id_fkey"].definition.as_deref(),
                Some("references t0 (id) on update no action on delete no action")
            );
            assert_eq!(t500.constraints["t500_code_key"].columns, ["code"]);
        }
    }
    assert!(took < Duration::from_secs(5), "inspect of 1,000 tables took {took:?}: a query per table?");
}

/// Whether the scratch database `name` exists, seen without kiln.
async fn scratch_exists(case: &EngineCase, name: &str) -> bool {
    match case.engine {
        Engine::Postgres => case.strings(&format!("SELECT count(*) FROM pg_database WHERE datname = '{name}'")).await == ["1"],
        Engine::Mysql => case.strings(&format!("SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = '{name}'")).await == ["1"],
        _ => Path::new(&case.db.name).with_file_name(format!("{name}.db")).exists(),
    }
}

on!(scratch_databases_are_created_and_dropped_by_name: postgres, mysql, sqlite);
async fn scratch_databases_are_created_and_dropped_by_name(engine: Engine) {
    let case = EngineCase::new(engine).await;
    let name = kiln_testkit::unique_name("kiln_verify");
    let dir = Path::new(&case.db.name).parent().unwrap().to_path_buf();
    // The URL kiln is given, and the scratch URL expected from it.
    let (url, expected) = match engine {
        Engine::Postgres => {
            // Trust authentication ignores the password, which lets the test see that it is kept.
            let mut u = url::Url::parse(case.url()).unwrap();
            u.set_password(Some("s3cret")).unwrap();
            let mut expected = u.clone();
            expected.set_path(&format!("/{name}"));
            (u.to_string(), expected.to_string())
        }
        Engine::Mysql => {
            case.db.sql(&format!("ALTER DATABASE `{}` CHARACTER SET latin1 COLLATE latin1_swedish_ci", case.db.name)).await.unwrap();
            // Over the Unix socket: the scratch URL must keep `?socket=`.
            let mut u = url::Url::parse(case.url()).unwrap();
            u.set_query(Some("socket=/run/mysqld/mysqld.sock"));
            let mut expected = u.clone();
            expected.set_path(&format!("/{name}"));
            (u.to_string(), expected.to_string())
        }
        _ => (case.url().to_string(), format!("sqlite://{}", dir.join(format!("{name}.db")).display())),
    };
    let mut b = backend_for(&BackendConfig::new(url)).await;

    let scratch_url = b.create_scratch(&name).await.unwrap();
    assert_eq!(scratch_url, expected, "same server, user, password and options; another database");
    assert!(scratch_exists(&case, &name).await);
    match engine {
        Engine::Mysql => assert_eq!(
            case.strings(&format!("SELECT DEFAULT_COLLATION_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = '{name}'")).await,
            ["latin1_swedish_ci"],
            "the configured database's character set and collation"
        ),
        Engine::Sqlite => assert!(b.create_scratch(&name).await.is_err(), "an existing file is not an empty scratch database"),
        _ => {}
    }
    // It is empty and usable.
    let mut scratch = backend(&scratch_url).await;
    assert!(scratch.inspect().await.unwrap().objects.is_empty());
    assert!(scratch.read_history().await.unwrap().is_none());
    if engine == Engine::Sqlite {
        // A run leaves its lock file behind, and a crashed process can leave more.
        let mdir = tempfile::tempdir().unwrap();
        kiln_testkit::case::write(mdir.path(), "0001_t.sql", "CREATE TABLE t (id INTEGER);\n");
        up(&mut *scratch, &kiln_testkit::case::load(mdir.path(), engine)).await.unwrap();
        scratch.close().await.unwrap();
        assert!(dir.join(format!("{name}.db-kiln.lock")).exists());
        for companion in ["-wal", "-shm", "-journal"] {
            std::fs::write(dir.join(format!("{name}.db{companion}")), b"").unwrap();
        }
        b.drop_scratch(&name).await.unwrap();
        let left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&name))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    } else {
        // On PostgreSQL a session still connected does not stop the drop.
        if engine == Engine::Mysql {
            scratch.close().await.unwrap();
            b.drop_scratch(&name).await.unwrap();
        } else {
            b.drop_scratch(&name).await.unwrap();
            drop(scratch);
        }
    }
    assert!(!scratch_exists(&case, &name).await);
    b.drop_scratch(&name).await.unwrap(); // already gone: not an error

    // Only kiln's scratch names, never anything else.
    let others = match engine {
        Engine::Postgres => vec!["postgres".to_string(), case.db.name.clone(), "kiln_verify_x\"; DROP DATABASE postgres; --".into()],
        Engine::Mysql => vec!["mysql".to_string(), case.db.name.clone(), "kiln_verify_x`; DROP DATABASE mysql; --".into()],
        _ => vec!["test".to_string(), "kiln_verify_../test".into(), "kiln_verify_x/../../test".into()],
    };
    for other in &others {
        let err = b.drop_scratch(other).await.unwrap_err();
        assert!(matches!(err, EngineError::Refused(_)) && err.to_string().contains("kiln_verify_"), "{err}");
        assert!(b.create_scratch(other).await.is_err());
    }
    match engine {
        Engine::Sqlite => {
            assert!(Path::new(&case.db.name).exists());
            // An in-memory database has no directory: the scratch file goes to the temporary directory.
            let mut memory = backend("sqlite::memory:").await;
            let url = memory.create_scratch(&name).await.unwrap();
            let file = std::env::temp_dir().join(format!("{name}.db"));
            assert_eq!(url, format!("sqlite://{}", file.display()));
            memory.drop_scratch(&name).await.unwrap();
            assert!(!file.exists());
        }
        _ => assert!(scratch_exists(&case, &case.db.name).await, "the configured database is untouched"),
    }
}
