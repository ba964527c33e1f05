//! `kiln adopt` (issue 13): a database another tool migrated switches to
//! kiln with no edit to its files.
//!
//! The databases come from the real tools: `tests/adopt/<tool>/database.sql`
//! is `pg_dump --inserts` of a database that tool migrated with the files in
//! `tests/adopt/<tool>/migrations/` (diesel 2.3.14, dbmate 2.36.0,
//! sql-migrate from Debian, sqlx-cli; PostgreSQL 15), the tool's own history
//! table included, exactly as it wrote it.

mod support;

use std::path::Path;

use support::*;

fn fixture(tool: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/adopt").join(tool)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// A PostgreSQL project whose database and files are `tool`'s fixture.
async fn migrated_by(tool: &str) -> Project {
    let p = Project::new(Engine::Postgres).await;
    let dump = std::fs::read_to_string(fixture(tool).join("database.sql")).unwrap();
    p.db.sql(&dump).await.unwrap();
    copy_dir(&fixture(tool).join("migrations"), &p.dir());
    p
}

async fn rows(p: &Project, sql: &str) -> Vec<String> {
    p.db.query_strings(sql).await.unwrap()
}

/// The whole path, as a user takes it: `up` stops and points at `adopt`;
/// `adopt` records the old tool's migrations as baseline; `status` shows
/// them; `up` runs only the new one; the old table is untouched; a second
/// `adopt` records nothing.
async fn take_over(p: &Project, tool: &str, table: &str, adopted: usize, new_version: &str) {
    let before = rows(p, &format!("SELECT count(*) FROM {table}")).await;

    // The first look says so: status hints, up refuses.
    let r = p.kiln(&["status"]);
    r.ok();
    assert!(r.stderr.contains(&format!("hint: this database was migrated by {tool}")) && r.stderr.contains("kiln adopt"), "{}", r.text());
    let r = p.kiln(&["up"]);
    r.fails_with(1);
    assert!(r.text().contains(&format!("migrated by {tool}")) && r.text().contains("kiln adopt"), "{}", r.text());
    assert_eq!(p.db.objects("kiln_").await.unwrap(), Vec::<String>::new(), "the refusal wrote nothing");

    let dry = p.kiln(&["adopt", "--dry-run", "--json"]);
    dry.ok();
    assert_eq!(dry.json()["adopted"].as_array().unwrap().len(), adopted, "{}", dry.stdout);
    assert!(dry.json()["dry_run"].as_bool().unwrap());

    let r = p.kiln(&["adopt"]);
    r.ok();
    assert!(r.stdout.contains(&format!("adopted {adopted} migrations {tool} applied ({table})")), "{}", r.stdout);

    let states = p.states();
    let baseline = states.iter().filter(|(_, s)| s == "baseline").count();
    assert_eq!(baseline, adopted, "{states:?}");
    assert_eq!(states.last().unwrap(), &(new_version.to_string(), "pending".to_string()), "{states:?}");

    let r = p.kiln(&["up", "--json"]);
    r.ok();
    let steps: Vec<String> = r.json()["steps"].as_array().unwrap().iter().map(|s| s["version"].as_str().unwrap().to_string()).collect();
    assert_eq!(steps, [new_version], "only the new migration runs: {}", r.stdout);
    assert_eq!(rows(p, &format!("SELECT count(*) FROM {table}")).await, before, "{table} is left as it was");

    assert!(!p.kiln(&["status"]).stderr.contains("hint:"), "no hint once adopted");
    let again = p.kiln(&["adopt"]);
    again.ok();
    assert!(again.stdout.contains("nothing to adopt"), "{}", again.stdout);
    let log = rows(p, "SELECT detail FROM kiln_log WHERE event = 'baseline'").await;
    assert_eq!(log.len(), 1, "{log:?}");
    assert!(log[0].contains(tool) && log[0].contains(table), "{log:?}");
}

#[tokio::test]
async fn diesel_database_switches_to_kiln_in_diesel_order() {
    let p = migrated_by("diesel").await;
    // A classic 14-digit folder dated after diesel's 18-digit one: diesel
    // runs it next (it compares version strings), and so must kiln.
    p.write("2025-12-01-000000_add_comments/up.sql", "CREATE TABLE comments (id serial PRIMARY KEY, post_id int REFERENCES posts(id));\n");
    p.write("2025-12-01-000000_add_comments/down.sql", "DROP TABLE comments;\n");
    take_over(&p, "diesel", "__diesel_schema_migrations", 3, "20251201000000").await;
    let states = p.states();
    let order: Vec<&str> = states.iter().map(|(v, _)| v.as_str()).collect();
    assert_eq!(order, ["00000000000000", "20240101000000", "202511190914440000", "20251201000000"]);
    assert_eq!(rows(&p, "SELECT count(*) FROM comments").await, ["0"]);
    // down reverts the new one only: the adopted ones are baselines.
    p.kiln(&["down"]).ok();
    assert_eq!(rows(&p, "SELECT count(*) FROM pg_tables WHERE tablename = 'comments'").await, ["0"]);
}

#[tokio::test]
async fn dbmate_database_switches_to_kiln() {
    let p = migrated_by("dbmate").await;
    p.write(
        "20240103000000_add_name.sql",
        "-- migrate:up\nALTER TABLE users ADD COLUMN name text;\n\n-- migrate:down\nALTER TABLE users DROP COLUMN name;\n",
    );
    take_over(&p, "dbmate", "schema_migrations", 2, "20240103000000").await;
    assert_eq!(rows(&p, "SELECT count(*) FROM information_schema.columns WHERE table_name = 'users' AND column_name = 'name'").await, ["1"]);
}

#[tokio::test]
async fn sql_migrate_database_switches_to_kiln() {
    let p = migrated_by("sql-migrate").await;
    p.write(
        "3_add_email.sql",
        "-- +migrate Up\nALTER TABLE accounts ADD COLUMN email text;\n-- +migrate Down\nALTER TABLE accounts DROP COLUMN email;\n",
    );
    take_over(&p, "sql-migrate", "gorp_migrations", 2, "3").await;
}

#[tokio::test]
async fn golang_migrate_dirty_database_is_refused_and_nothing_recorded() {
    // golang-migrate's table after a failed `migrate up` of version 2.
    let p = Project::new(Engine::Postgres).await;
    p.db.sql("CREATE TABLE schema_migrations (version bigint NOT NULL PRIMARY KEY, dirty boolean NOT NULL); INSERT INTO schema_migrations VALUES (2, true);")
        .await
        .unwrap();
    p.write("000001_init.up.sql", "CREATE TABLE a (id int);\n");
    p.write("000002_more.up.sql", "CREATE TABLE b (id int);\n");
    for args in [&["adopt"][..], &["up"][..]] {
        let r = p.kiln(args);
        r.fails_with(1);
        assert!(r.text().contains("dirty") && r.text().contains("migrate force 2"), "{args:?}: {}", r.text());
    }
    assert_eq!(rows(&p, "SELECT count(*) FROM pg_tables WHERE tablename IN ('kiln_history', 'a', 'b')").await, ["0"]);

    // Once forced clean, everything up to its version is adopted.
    p.db.sql("UPDATE schema_migrations SET dirty = false; CREATE TABLE a (id int); CREATE TABLE b (id int);").await.unwrap();
    p.write("000003_third.up.sql", "CREATE TABLE c (id int);\n");
    take_over(&p, "golang-migrate", "schema_migrations", 2, "000003").await;
}

#[tokio::test]
async fn adopt_without_another_tools_history_says_what_it_looked_for() {
    let p = Project::new(Engine::Postgres).await;
    p.write("0001_a.sql", "CREATE TABLE a (id int);\n");
    let r = p.kiln(&["adopt"]);
    r.fails_with(1);
    assert!(r.text().contains("no other tool's history") && r.text().contains("_sqlx_migrations"), "{}", r.text());
    // And `up` on such a database just runs.
    p.kiln(&["up"]).ok();
}

#[tokio::test]
async fn mariadb_and_sqlite_histories_are_read_alike() {
    for engine in [Engine::Mysql, Engine::Sqlite] {
        let p = Project::new(engine).await;
        // dbmate's table and what its two migrations made, as dbmate creates them on these engines.
        p.db.sql("CREATE TABLE schema_migrations (version varchar(128) NOT NULL PRIMARY KEY); INSERT INTO schema_migrations VALUES ('20240101000000'), ('20240102000000'); CREATE TABLE users (id int); CREATE TABLE posts (id int);")
            .await
            .unwrap();
        p.write("20240101000000_users.sql", "-- migrate:up\nCREATE TABLE users (id int);\n-- migrate:down\nDROP TABLE users;\n");
        p.write("20240102000000_posts.sql", "-- migrate:up\nCREATE TABLE posts (id int);\n-- migrate:down\nDROP TABLE posts;\n");
        p.write("20240103000000_tags.sql", "-- migrate:up\nCREATE TABLE tags (id int);\n-- migrate:down\nDROP TABLE tags;\n");
        take_over(&p, "dbmate", "schema_migrations", 2, "20240103000000").await;
    }
}

#[tokio::test]
async fn sqlx_database_switches_to_kiln_and_changed_files_are_reported() {
    let p = migrated_by("sqlx").await;
    // Edited after sqlx applied it: sqlx's checksum (SHA-384 of the up file) no longer matches.
    p.write("20240103000000_tags.up.sql", "CREATE TABLE tags (id int); -- edited later\n");
    let dry = p.kiln(&["adopt", "--dry-run"]);
    dry.ok();
    assert!(dry.stdout.contains("20240103000000_tags.up.sql changed since sqlx applied it"), "{}", dry.stdout);
    assert!(!dry.stdout.contains("create_items.up.sql changed"), "unchanged files are not reported: {}", dry.stdout);
    // `-- no-transaction`, as sqlx reads it.
    let r = p.kiln(&["status", "--json"]);
    r.ok();
    p.write("20240104000000_notes.up.sql", "CREATE TABLE notes (id int);\n");
    p.write("20240104000000_notes.down.sql", "DROP TABLE notes;\n");
    take_over(&p, "sqlx", "_sqlx_migrations", 3, "20240104000000").await;
}
