//! Loader tests over real directories.

use super::*;
use std::fs;

fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for (name, content) in files {
        let p = d.path().join(name);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, content).unwrap();
    }
    d
}

fn load(d: &tempfile::TempDir) -> Result<Vec<Migration>, SourceError> {
    load_dir(d.path(), &LoadOptions::default())
}

#[test]
fn three_sql_layouts() {
    let d = dir_with(&[
        ("0001_one.sql", "-- kiln:up\ncreate table a (id int);\n-- kiln:down\ndrop table a;\n"),
        ("0002_two.up.sql", "create table b (id int);"),
        ("0002_two.down.sql", "drop table b;"),
        ("2019-02-26-002946_create-user/up.sql", "create table c (id int);"),
        ("2019-02-26-002946_create-user/down.sql", "drop table c;"),
        ("README.md", "not a migration"),
    ]);
    let ms = load(&d).unwrap();
    assert_eq!(ms.len(), 3);
    assert_eq!(ms[0].name(), "0001_one");
    assert_eq!(ms[0].up.len(), 1);
    assert!(ms[0].down.is_some());
    assert_eq!(ms[1].name(), "0002_two");
    assert_eq!(ms[2].version.number, 20190226002946);
    assert_eq!(ms[2].description, "create-user");
    assert!(ms[2].down.is_some());
}

#[test]
fn no_markers_is_irreversible_up() {
    let d = dir_with(&[("0001_x.sql", "create table a (id int);\ncreate table b (id int);")]);
    let ms = load(&d).unwrap();
    assert_eq!(ms[0].up.len(), 2);
    assert!(ms[0].down.is_none());
}

#[test]
fn directives() {
    let d = dir_with(&[
        ("0001_core_tables.sql", "create table a (id int);"),
        (
            "0002_x.sql",
            "-- kiln:depends 0001_core_tables\n-- kiln:transaction off\n-- kiln:group users\n-- kiln:up\ncreate index concurrently i on a (id);\n-- kiln:down\ndrop index i;",
        ),
        ("0003_y.sql", "-- DEPENDS: 0001_core_tables.sql\nselect 1;"),
    ]);
    let ms = load(&d).unwrap();
    assert_eq!(ms[1].directives.depends[0].version.number, 1);
    assert_eq!(ms[1].directives.transaction, TxMode::Off);
    assert_eq!(ms[1].directives.group.as_deref(), Some("users"));
    assert_eq!(ms[2].directives.depends[0].version.number, 1);
}

#[test]
fn unknown_directive_names_line() {
    let d = dir_with(&[("0001_x.sql", "-- kiln:transacton off\nselect 1;")]);
    let e = load(&d).unwrap_err().to_string();
    assert!(e.contains("0001_x.sql:1"), "{e}");
    assert!(e.contains("transacton"), "{e}");
}

#[test]
fn bad_name_and_duplicate() {
    let d = dir_with(&[("0001_Bad-Name.sql", "select 1;")]);
    assert!(matches!(load(&d), Err(SourceError::BadName { .. })));
    let d = dir_with(&[("0001_a.sql", "select 1;"), ("001_b.sql", "select 1;")]);
    assert!(matches!(load(&d), Err(SourceError::DuplicateVersion { .. })));
    let d = dir_with(&[("create_users.sql", "select 1;")]);
    assert!(matches!(load(&d), Err(SourceError::BadName { .. })));
}

#[test]
fn custom_rule() {
    let d = dir_with(&[("V1_Init.sql", "select 1;")]);
    let opts = LoadOptions { name_rule: Some(r"^V?[0-9]+_.+$".into()), ..Default::default() };
    // V1 does not start with a digit: still refused, with the version explanation.
    assert!(load_dir(d.path(), &opts).is_err());
    let d = dir_with(&[("1_Init.sql", "select 1;")]);
    assert_eq!(load_dir(d.path(), &opts).unwrap().len(), 1);
}

#[test]
fn groups_scopes_and_retired() {
    let d = dir_with(&[("users/0001_a.sql", "select 1;"), ("tenant/0002_b.sql", "select 1;"), ("0003_c.sql.retired", "select 1;")]);
    let ms = load(&d).unwrap();
    assert_eq!(ms.len(), 2);
    assert_eq!(ms[0].directives.group.as_deref(), Some("users"));
    assert_eq!(ms[1].directives.scope, Scope::Tenant);
    assert_eq!(ms[1].directives.group, None);
}

#[test]
fn yaml_commands() {
    let y = "up:\n  - createIndexes: creatorprofiles\n    indexes:\n      - key: { role: 1, verified: 1, rating.avg: -1 }\n        name: idx\n  - update: users\n    updates:\n      - q: { isMfaRequired: { $exists: false } }\n        u: { $set: { isMfaRequired: false } }\n        multi: true\ndown:\n  - dropIndexes: creatorprofiles\n    index: idx\n";
    let d = dir_with(&[("20251101_add_index.yaml", y)]);
    let ms = load(&d).unwrap();
    let Body::Commands { commands, .. } = &ms[0].up else { panic!() };
    assert_eq!(commands.len(), 2);
    assert_eq!(commands[0].line, 2);
    assert_eq!(commands[1].line, 6);
    assert_eq!(commands[0].doc["indexes"][0]["key"]["rating.avg"], -1);
    assert_eq!(ms[0].kind, Kind::Commands);
}

#[test]
fn bad_yaml_names_line() {
    let d = dir_with(&[("0001_x.yaml", "up:\n  - create: a\n  bad: [\n")]);
    let e = load(&d).unwrap_err().to_string();
    assert!(e.starts_with("0001_x.yaml:"), "{e}");
    let d = dir_with(&[("0001_x.yaml", "up:\n  - 5\n")]);
    let e = load(&d).unwrap_err().to_string();
    assert!(e.contains("command #1"), "{e}");
}

#[test]
fn down_without_up_and_delimiter() {
    let d = dir_with(&[("0001_x.down.sql", "drop table a;")]);
    assert!(load(&d).unwrap_err().to_string().contains("no matching"));
    let d = dir_with(&[("0001_x.sql", "DELIMITER //\ncreate procedure p() begin select 1; end//\n")]);
    assert!(load(&d).unwrap_err().to_string().contains("DELIMITER"));
}

#[test]
fn statement_lines_refer_to_file() {
    let d =
        dir_with(&[("0001_x.sql", "-- kiln:up\ncreate table a (id int);\n\ncreate table b (id int);\n-- kiln:down\ndrop table b;\ndrop table a;\n")]);
    let ms = load(&d).unwrap();
    let Body::Sql { statements, .. } = &ms[0].up else { panic!() };
    assert_eq!(statements[0].line, 2);
    assert_eq!(statements[1].line, 4);
    let Body::Sql { statements, .. } = ms[0].down.as_ref().unwrap() else { panic!() };
    assert_eq!(statements[1].line, 7);
}

#[test]
fn parallel_load_is_ordered_and_reports_every_bad_file() {
    let d = tempfile::tempdir().unwrap();
    for n in 1..=300 {
        fs::write(d.path().join(format!("{n:04}_t_{n}.sql")), format!("create table t_{n} (id int);")).unwrap();
    }
    let ms = load_dir(d.path(), &LoadOptions::default()).unwrap();
    assert_eq!(ms.len(), 300);
    assert!(ms.windows(2).all(|w| w[0].version < w[1].version));
    fs::write(d.path().join("0150_t_150.sql"), "select 'unterminated;").unwrap();
    fs::write(d.path().join("0250_t_250.sql"), "select 'also unterminated;").unwrap();
    let e = load_dir(d.path(), &LoadOptions::default()).unwrap_err();
    assert_eq!(e.code(), "parse_error");
    let e = e.to_string();
    assert!(e.starts_with("2 problems") && e.contains("\n  - 0150_t_150.sql:1") && e.contains("\n  - 0250_t_250.sql:1"), "{e}");
}

#[test]
fn statements_before_up_marker_refused() {
    let d = dir_with(&[("0001_x.sql", "select 1;\n-- kiln:up\nselect 2;\n")]);
    assert!(load(&d).unwrap_err().to_string().contains("before the first"));
}

/// Issue 8.8: three bad files are three problems in one error, each with its
/// file and line, sorted by file; the error keeps its code and kind.
#[test]
fn every_bad_file_is_reported_at_once() {
    let d = dir_with(&[
        ("0001_ok.sql", "select 1;"),
        ("0002_bad.sql", "select 1;\n-- kiln:transacton off\n"),
        ("0003_Bad-Name.sql", "select 1;"),
        ("0004_bad.yaml", "up:\n  - 5\n"),
        ("0005_ok.sql", "select 1;"),
        ("005_dup.sql", "select 1;"),
    ]);
    let e = load(&d).unwrap_err();
    let problems = e.problems();
    assert_eq!(problems.len(), 4, "{e}");
    let shown: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert!(shown[0].starts_with("0002_bad.sql:2: "), "{shown:?}");
    assert!(shown[1].starts_with("0003_Bad-Name.sql: the name"), "{shown:?}");
    assert!(shown[2].starts_with("0004_bad.yaml:2: "), "{shown:?}");
    assert!(shown[3].starts_with("duplicate version 005: 0005_ok.sql and 005_dup.sql"), "{shown:?}");
    assert!(e.to_string().starts_with("4 problems in the migration files:\n  - 0002_bad.sql:2"), "{e}");
    assert_eq!(e.code(), "parse_error");
    // One problem is not wrapped.
    let d = dir_with(&[("0001_ok.sql", "select 1;"), ("0002_Bad-Name.sql", "select 1;")]);
    assert!(matches!(load(&d), Err(SourceError::BadName { .. })));
}

#[test]
fn a_byte_order_mark_is_accepted_and_kept_in_the_checksum() {
    let d = dir_with(&[
        ("0001_a.sql", "\u{feff}-- kiln:transaction off\n-- kiln:up\ncreate table a (id int);\n-- kiln:down\ndrop table a;\n"),
        ("0002_b.up.sql", "\u{feff}create table b (id int);"),
        ("0002_b.down.sql", "\u{feff}drop table b;"),
        ("0003_c.yaml", "\u{feff}up:\n  - create: c\n"),
    ]);
    let ms = load(&d).unwrap();
    assert_eq!(ms[0].directives.transaction, TxMode::Off);
    let Body::Sql { statements, .. } = &ms[0].up else { panic!() };
    assert_eq!((statements[0].sql.as_str(), statements[0].line), ("create table a (id int)", 3));
    let Body::Sql { statements, .. } = &ms[1].up else { panic!() };
    assert!(statements[0].sql.starts_with("create"), "{:?}", statements[0].sql);
    assert_eq!(ms[2].kind, Kind::Commands);
    // The checksum is of the file as it is: a BOM added later is a change.
    let without = dir_with(&[("0001_a.sql", "-- kiln:transaction off\n-- kiln:up\ncreate table a (id int);\n-- kiln:down\ndrop table a;\n")]);
    assert_ne!(load(&without).unwrap()[0].checksum, ms[0].checksum);
}

#[test]
fn upper_case_extensions_are_migrations() {
    let d = dir_with(&[
        ("0001_x.SQL", "select 1;"),
        ("0002_y.Up.Sql", "select 1;"),
        ("0002_y.DOWN.sql", "select 2;"),
        ("0003_z.YAML", "up:\n  - create: z\n"),
    ]);
    let ms = load(&d).unwrap();
    assert_eq!(ms.iter().map(|m| m.version.number).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(ms[1].down.is_some());
}

#[test]
fn a_directive_after_the_up_marker_is_an_error() {
    let d = dir_with(&[("0001_x.sql", "-- kiln:up\n-- kiln:transaction off\ncreate index concurrently i on a (id);\n")]);
    let e = load(&d).unwrap_err().to_string();
    assert!(e.starts_with("0001_x.sql:2: `-- kiln:transaction` comes after"), "{e}");
    let d = dir_with(&[("0001_x.up.sql", "select 1;\n-- kiln:group late\n")]);
    let e = load(&d).unwrap_err().to_string();
    assert!(e.starts_with("0001_x.up.sql:2: `-- kiln:group`"), "{e}");
    // Markers and ordinary comments stay fine.
    let d = dir_with(&[("0001_x.sql", "-- kiln:up\n-- a comment\nselect 1;\n-- kiln:down\nselect 2;\n")]);
    assert!(load(&d).is_ok());
}

#[test]
fn contradicting_transaction_directives_are_an_error() {
    let d = dir_with(&[("0001_x.sql", "-- kiln:transaction off\n-- kiln:transaction on\nselect 1;\n")]);
    let e = load(&d).unwrap_err().to_string();
    assert!(e.starts_with("0001_x.sql:2: ") && e.contains("contradicts"), "{e}");
    let d = dir_with(&[("0001_x.sql", "-- kiln:transaction off\n-- kiln:transaction off\nselect 1;\n")]);
    assert_eq!(load(&d).unwrap()[0].directives.transaction, TxMode::Off);
}

#[test]
fn a_version_too_large_for_64_bits_says_so() {
    let d = dir_with(&[("99999999999999999999999_x.sql", "select 1;")]);
    let e = load(&d).unwrap_err();
    assert_eq!(e.code(), "version_too_large");
    let e = e.to_string();
    assert!(e.starts_with("99999999999999999999999_x.sql: the version 99999999999999999999999 is too large"), "{e}");
    let d = dir_with(&[(&format!("{}_x.sql", "9".repeat(200)), "select 1;")]);
    assert!(load(&d).unwrap_err().to_string().len() < 700, "the file name (200 digits) once, the version cut");
}

#[test]
fn deeply_nested_yaml_and_json_fail_fast_with_the_line() {
    let deep_yaml = format!("up:\n  - insert: a\n    documents: {}\n", "{a: ".repeat(50_000));
    let deep_json = format!("{{\"up\": [{}]}}", "[".repeat(100_000));
    let d = dir_with(&[("0001_a.yaml", &deep_yaml), ("0002_b.json", &deep_json)]);
    let t = std::time::Instant::now();
    let e = load(&d).unwrap_err();
    assert!(t.elapsed() < std::time::Duration::from_secs(2), "took {:?}", t.elapsed());
    let shown: Vec<String> = e.problems().iter().map(ToString::to_string).collect();
    assert!(shown[0].starts_with("0001_a.yaml:3: nested more than 64 levels"), "{shown:?}");
    assert!(shown[1].starts_with("0002_b.json:1: nested more than 64 levels"), "{shown:?}");
}

#[test]
fn errors_never_echo_a_whole_huge_value() {
    let huge = "x".repeat(9 << 20);
    let d = dir_with(&[
        ("0001_a.yaml", &format!("up:\n  - create: a\ntransaction: {huge}\n")),
        ("0002_b.sql", &format!("-- kiln:depends {huge}\nselect 1;\n")),
    ]);
    let e = load(&d).unwrap_err().to_string();
    assert!(e.len() < 2_000, "{} bytes", e.len());
    assert!(e.contains("bytes in all"), "{}", &e[..e.len().min(2_000)]);
}

#[test]
fn loose_files_beside_diesel_folders_are_ignored_as_diesel_does() {
    // crates.io keeps a data file in its diesel migrations root.
    let d = dir_with(&[
        ("2019-02-26-002946_create_user/up.sql", "create table u (id int);"),
        ("2019-02-26-002946_create_user/down.sql", "drop table u;"),
        ("dump-db.sql", "COPY crates FROM stdin;"),
        ("README.md", "notes"),
    ]);
    let found = load(&d).unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].version.number, 20190226002946);
    // Without diesel folders, the same loose file breaks the naming rule.
    let d = dir_with(&[("0001_a.sql", "select 1;"), ("dump-db.sql", "COPY crates FROM stdin;")]);
    assert!(matches!(load(&d), Err(SourceError::BadName { .. })));
}

/// issue 13: other tools' ways of saying "outside a transaction" are read as
/// their tools read them.
#[test]
fn other_tools_transaction_off_directives() {
    let d = dir_with(&[
        // sqlx
        ("0001_sqlx.up.sql", "-- no-transaction\ncreate index concurrently i1 on a (id);\n"),
        ("0001_sqlx.down.sql", "drop index i1;\n"),
        // golang-migrate / morph
        ("0002_morph.up.sql", "-- morph:nontransactional\ncreate index concurrently i2 on a (id);\n"),
        // dbmate: the option on the section marker
        ("0003_dbmate.sql", "-- migrate:up transaction:false\ncreate index concurrently i3 on a (id);\n\n-- migrate:down\ndrop index i3;\n"),
        // goose: anywhere
        ("0004_goose.sql", "-- +goose Up\n-- +goose NO TRANSACTION\ncreate index concurrently i4 on a (id);\n-- +goose Down\ndrop index i4;\n"),
        // sql-migrate
        ("0005_sqlmigrate.sql", "-- +migrate Up notransaction\ncreate index concurrently i5 on a (id);\n-- +migrate Down\ndrop index i5;\n"),
        // in a transaction: sqlx's marker later than the header is a comment,
        // dbmate's explicit true
        ("0006_tx.up.sql", "create table b (id int);\n-- no-transaction\n"),
        ("0007_dbmate_tx.sql", "-- migrate:up transaction:true\ncreate table c (id int);\n-- migrate:down\ndrop table c;\n"),
    ]);
    let ms = load(&d).unwrap();
    let modes: Vec<_> = ms.iter().map(|m| (m.description.as_str(), m.directives.transaction)).collect();
    assert_eq!(
        modes,
        [
            ("sqlx", TxMode::Off),
            ("morph", TxMode::Off),
            ("dbmate", TxMode::Off),
            ("goose", TxMode::Off),
            ("sqlmigrate", TxMode::Off),
            ("tx", TxMode::Default),
            ("dbmate_tx", TxMode::Default)
        ]
    );
    assert_eq!(ms[2].up.len(), 1);
    assert_eq!(ms[2].down.as_ref().unwrap().len(), 1);
    assert_eq!(ms[4].down.as_ref().unwrap().len(), 1);

    let bad = dir_with(&[("0001_x.sql", "-- migrate:up transaction:nope\nselect 1;\n")]);
    let e = load(&bad).unwrap_err().to_string();
    assert!(e.contains("0001_x.sql:1") && e.contains("true or false"), "{e}");
    let clash = dir_with(&[("0001_x.sql", "-- kiln:transaction on\n-- +goose NO TRANSACTION\nselect 1;\n")]);
    let e = load(&clash).unwrap_err().to_string();
    assert!(e.contains("0001_x.sql:2") && e.contains("contradicts"), "{e}");
}

/// goose's (and sql-migrate's) StatementBegin/End: one statement, `;` inside and all.
#[test]
fn goose_statement_blocks() {
    let d = dir_with(&[(
        "00001_fn.sql",
        "-- +goose Up\ncreate table a (id int);\n-- +goose StatementBegin\n\nCREATE FUNCTION f() RETURNS trigger AS '\nBEGIN\n  NEW.id := 1;\n  RETURN NEW;\nEND;\n' LANGUAGE plpgsql;\n-- +goose StatementEnd\ncreate table b (id int);\n-- +goose Down\n-- +goose StatementBegin\ndrop function f();\ndrop table b;\n-- +goose StatementEnd\ndrop table a;\n",
    )]);
    let ms = load(&d).unwrap();
    let Body::Sql { statements, .. } = &ms[0].up else { panic!() };
    assert_eq!(statements.len(), 3, "{statements:?}");
    assert_eq!(statements[0].line, 2);
    assert!(statements[1].sql.starts_with("CREATE FUNCTION") && statements[1].sql.ends_with("LANGUAGE plpgsql"), "{:?}", statements[1]);
    assert_eq!(statements[1].line, 5);
    assert_eq!((statements[2].sql.as_str(), statements[2].line), ("create table b (id int)", 12));
    let Body::Sql { statements, .. } = ms[0].down.as_ref().unwrap() else { panic!() };
    assert_eq!(statements.len(), 2);
    assert_eq!(statements[0].sql, "drop function f();\ndrop table b");

    let open = dir_with(&[("00001_x.sql", "-- +goose Up\n-- +goose StatementBegin\nselect 1;\n")]);
    let e = load(&open).unwrap_err().to_string();
    assert!(e.contains("00001_x.sql:2") && e.contains("StatementEnd"), "{e}");
}

/// issue 13: Flyway / refinery `V1__x.sql` (with Flyway's `U1__x.sql` undo)
/// and Prisma's `<timestamp>_<name>/migration.sql` folders, read as they are.
#[test]
fn flyway_refinery_and_prisma_layouts() {
    let d = dir_with(&[
        ("V1__Create_person_table.sql", "create table person (id int);\n"),
        ("U1__Create_person_table.sql", "drop table person;\n"),
        ("V2__add_people.sql", "insert into person values (1);\n"),
        ("V10__later.sql", "select 1;\n"),
    ]);
    let ms = load(&d).unwrap();
    let names: Vec<String> = ms.iter().map(|m| m.name()).collect();
    assert_eq!(names, ["1_Create_person_table", "2_add_people", "10_later"]);
    assert!(ms[0].down.is_some(), "U1 is V1's down");
    assert!(ms[1].down.is_none());
    assert_eq!(ms[0].path, std::path::Path::new("V1__Create_person_table.sql"));

    let refused =
        dir_with(&[("V1.1__x.sql", "select 1;\n"), ("R__view.sql", "create or replace view v as select 1;\n"), ("U3__x.sql", "select 1;\n")]);
    let e = load(&refused).unwrap_err().to_string();
    assert!(e.contains("3 problems"), "{e}");
    assert!(e.contains("V1.1__x.sql") && e.contains("whole numbers") && e.contains("V11__x.sql"), "{e}");
    assert!(e.contains("R__view.sql") && e.contains("repeatable"), "{e}");
    assert!(e.contains("U3__x.sql") && e.contains("no versioned migration"), "{e}");

    let p = dir_with(&[
        ("migration_lock.toml", "provider = \"postgresql\"\n"),
        ("20210101000000_init/migration.sql", "-- CreateTable\nCREATE TABLE \"User\" (id int);\n"),
        ("20210202000000_Add-Posts/migration.sql", "CREATE TABLE \"Post\" (id int);\n"),
    ]);
    let ms = load(&p).unwrap();
    assert_eq!(ms.iter().map(|m| m.name()).collect::<Vec<_>>(), ["20210101000000_init", "20210202000000_Add-Posts"]);
    assert!(ms[0].down.is_none());
    assert_eq!(ms[0].path, std::path::Path::new("20210101000000_init"));
}

/// issue 13: pairs follow golang-migrate's and sqlx's naming (hyphens, dots),
/// kiln's own single files the strict rule.
#[test]
fn pairs_keep_their_tools_naming_rule() {
    let d = dir_with(&[
        ("000118_create-index.up.sql", "create index i on a (id);\n"),
        ("000118_create-index.down.sql", "drop index i;\n"),
        ("1_init.v2.up.sql", "create table a (id int);\n"),
    ]);
    let ms = load(&d).unwrap();
    assert_eq!(ms.iter().map(|m| m.name()).collect::<Vec<_>>(), ["1_init.v2", "000118_create-index"]);
    let single = dir_with(&[("0001_Create-Index.sql", "select 1;\n")]);
    assert!(load(&single).unwrap_err().to_string().contains("naming rule"));
}

/// Load `d` from disk, then from an in-memory copy of the files
/// `embeddable_files` picks, as `kiln::embed_migrations!` embeds them.
fn disk_and_embedded(d: &tempfile::TempDir) -> (Vec<Migration>, Vec<Migration>) {
    let opts = LoadOptions::default();
    let on_disk = load_dir(d.path(), &opts).unwrap();
    let files: Vec<EmbeddedFile> = embeddable_files(d.path(), &opts)
        .unwrap()
        .into_iter()
        .map(|rel| EmbeddedFile {
            path: Box::leak(rel.to_string_lossy().into_owned().into_boxed_str()),
            bytes: Box::leak(fs::read(d.path().join(&rel)).unwrap().into_boxed_slice()),
        })
        .collect();
    let set = Embedded::new("migrations", Box::leak(files.into_boxed_slice()));
    (on_disk, load_embedded(&set, &opts).unwrap())
}

#[test]
fn embedded_set_loads_as_the_directory_does() {
    // Every layout at once: single files, pairs, diesel folders with
    // metadata, MongoDB YAML/JSON, group folders, public/tenant folders,
    // zero-downtime sections, CRLF endings, and files the loader ignores.
    let d = dir_with(&[
        ("0001_one.sql", "-- kiln:up\r\ncreate table a (id int);\r\n-- kiln:down\r\ndrop table a;\r\n"),
        ("0002_two.up.sql", "create table b (id int);"),
        ("0002_two.down.sql", "drop table b;"),
        ("users/0003_users.sql", "-- kiln:depends 0001_one\ncreate table u (id int);\n"),
        ("users/0004_idx.yaml", "up:\n  - createIndexes: users\n    indexes: [{ key: { email: 1 }, name: email_1 }]\n"),
        ("calls/0005_calls.json", "{\"group\": \"calls\", \"up\": [{\"create\": \"calls\"}]}"),
        ("public/0006_pub.sql", "create table p (id int);"),
        ("tenant/0007_ten.sql", "create table t (id int);"),
        ("0008_zdt.sql", "-- kiln:expand\nalter table a add column b int;\n-- kiln:backfill table=a key=id batch=10\nupdate a set b = 1 where id >= :lo and id < :hi and b is null;\n-- kiln:contract\nselect 1;\n"),
        ("README.md", "not a migration"),
        (".hidden.sql", "not read"),
        ("0009_old.sql.retired", "not read"),
    ]);
    let (disk, mem) = disk_and_embedded(&d);
    assert_eq!(disk.len(), 8);
    assert_eq!(serde_json::to_value(&disk).unwrap(), serde_json::to_value(&mem).unwrap());
    for (a, b) in disk.iter().zip(&mem) {
        assert_eq!(a.checksum, b.checksum, "{}", a.name());
        assert_eq!(a.path, b.path);
    }
    let embedded = embeddable_files(d.path(), &LoadOptions::default()).unwrap();
    assert!(!embedded.iter().any(|p| p.to_string_lossy().contains("README") || p.to_string_lossy().contains("retired")), "{embedded:?}");

    // diesel layout with metadata.toml (run_in_transaction = false).
    let d = dir_with(&[
        ("2019-02-26-002946_create-user/up.sql", "create index concurrently i on c (id);"),
        ("2019-02-26-002946_create-user/down.sql", "drop index i;"),
        ("2019-02-26-002946_create-user/metadata.toml", "run_in_transaction = false\n"),
        ("2019-03-01-000000_second/up.sql", "select 1;"),
    ]);
    let (disk, mem) = disk_and_embedded(&d);
    assert_eq!(disk.len(), 2);
    assert_eq!(mem[0].directives.transaction, TxMode::Off);
    assert_eq!(serde_json::to_value(&disk).unwrap(), serde_json::to_value(&mem).unwrap());
}

#[test]
fn embed_check_names_file_and_line() {
    let d = dir_with(&[("0001_ok.sql", "select 1;"), ("users/0002_bad.sql", "select 1;\nselect 'unterminated;\n"), ("0003_Bad-Name.sql", "x")]);
    let err = embed_check(d.path(), "migrations", &LoadOptions::default()).unwrap_err();
    assert!(err.contains("migrations/users/0002_bad.sql:2:"), "{err}");
    assert!(err.contains("0003_Bad-Name.sql"), "{err}");
    let err = embed_check(&d.path().join("nope"), "nope", &LoadOptions::default()).unwrap_err();
    assert!(err.contains("is not a directory"), "{err}");
    let ok = dir_with(&[("0001_ok.sql", "select 1;")]);
    assert_eq!(embed_check(ok.path(), "m", &LoadOptions::default()).unwrap(), vec![PathBuf::from("0001_ok.sql")]);
}
