//! Every command kiln suggests runs as printed: each backticked `kiln …` in an
//! error is pasted (shell-split, as a shell would) and must succeed. Before the
//! fix, a failed migration suggested `kiln repair 0002`, which exits 2 for lack
//! of `--reason`.

mod support;

use support::*;

/// The backticked `kiln …` commands in a text.
fn suggestions(text: &str) -> Vec<String> {
    text.split('`').skip(1).step_by(2).filter(|s| s.starts_with("kiln ")).map(str::to_string).collect()
}

/// Build the scenario, collect its suggestions from `probe`'s output, then for
/// each suggestion rebuild the scenario and run it as printed.
async fn each_suggestion_runs<F>(engine: Engine, setup: F, probe: &[&str], expect_any: &str)
where
    F: Fn(&Project),
{
    let p = Project::new(engine).await;
    setup(&p);
    let out = p.kiln(probe);
    let cmds = suggestions(&out.text());
    assert!(cmds.iter().any(|c| c.contains(expect_any)), "{probe:?} should suggest `{expect_any} …`:\n{}", out.text());
    for cmd in cmds {
        if cmd.contains('<') || cmd.contains('…') {
            panic!("suggestion with a placeholder that does not run: `{cmd}`");
        }
        let p = Project::new(engine).await;
        setup(&p);
        let words = shlex::split(&cmd).unwrap_or_else(|| panic!("`{cmd}` is not valid shell"));
        let args: Vec<&str> = words.iter().skip(1).map(String::as_str).collect();
        let run = p.kiln(&args);
        assert_eq!(run.code, 0, "`{cmd}` as printed failed:\n{}", run.text());
        // Afterwards the project is no longer blocked.
        p.kiln(&["status"]).ok();
    }
}

fn failed_migration(p: &Project) {
    p.add_create(1);
    p.add_failing_after_create(2);
    p.kiln(&["up"]).fails_with(1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_failed_migration() {
    // MySQL DDL is not transactional: the failure is recorded and blocks.
    each_suggestion_runs(Engine::Mysql, failed_migration, &["up"], "kiln repair 0002").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_failed_migration() {
    each_suggestion_runs(Engine::Mongodb, failed_migration, &["up"], "kiln repair 0002").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_failed_migration_without_transaction() {
    let setup = |p: &Project| {
        p.add_create(1);
        p.write("0002_half.sql", "-- kiln:transaction off\n-- kiln:up\nCREATE TABLE t_2 (id INT);\nINSERT INTO nope VALUES (1);\n");
        p.kiln(&["up"]).fails_with(1);
    };
    each_suggestion_runs(Engine::Sqlite, setup, &["up"], "kiln repair 0002").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_changed_and_missing_files() {
    let changed = |p: &Project| {
        p.add_create(1);
        p.kiln(&["up"]).ok();
        p.write("0001_create_t_1.sql", "-- kiln:up\nCREATE TABLE t_1 (id bigint primary key, v text, w text);\n-- kiln:down\nDROP TABLE t_1;\n");
    };
    each_suggestion_runs(Engine::Postgres, changed, &["up"], "kiln repair 0001").await;
    let missing = |p: &Project| {
        p.add_create(1);
        p.add_create(2);
        p.kiln(&["up"]).ok();
        std::fs::remove_file(p.dir().join("0001_create_t_1.sql")).unwrap();
    };
    each_suggestion_runs(Engine::Postgres, missing, &["up"], "kiln retire 0001").await;
}
