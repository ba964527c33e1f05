//! Output for people and for pipes: no colour codes reach a pipe.

mod support;

use support::*;

#[tokio::test]
async fn no_colour_codes_in_a_pipe_even_without_no_color() {
    let p = Project::new(Engine::Sqlite).await;
    p.write("0001_ok.sql", "CREATE TABLE a (id INT);\n");
    p.write("0002_half.sql", "-- kiln:transaction off\n-- kiln:up\nCREATE TABLE b (id INT);\nINSERT INTO nope VALUES (1);\n");
    p.kiln(&["up"]).fails_with(1);
    for args in [&["status"][..], &["up"][..], &["check"][..]] {
        let mut c = kiln_cmd(p.root.path());
        c.env_remove("NO_COLOR").args(args).arg("--url").arg(&p.db.url).arg("--dir").arg(p.dir());
        let run = output_to_run(c.output().unwrap());
        assert!(run.text().contains("0002"), "{args:?} names the failed migration:\n{}", run.text());
        assert!(!run.stdout.contains('\x1b') && !run.stderr.contains('\x1b'), "{args:?} printed colour codes into a pipe:\n{:?}", run.text());
    }
}
