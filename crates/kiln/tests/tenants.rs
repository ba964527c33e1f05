//! Multi-tenant fleets through the binary: public first, then every tenant,
//! failure-isolated, filters, dry runs, status over the fleet, two runners
//! sharing one fleet, and configuration errors.

mod support;

use support::*;

/// A project whose tenants are SQLite files under tenants/ (one per tenant)
/// or PostgreSQL schemas in the test database.
fn fleet(p: &Project, tenants: &[&str], placement: &str) {
    let list = tenants.iter().map(|t| format!("{t:?}")).collect::<Vec<_>>().join(", ");
    std::fs::create_dir_all(p.root.path().join("tenants")).unwrap();
    std::fs::write(p.root.path().join("kiln.toml"), format!("[tenants]\nlist = [{list}]\n{placement}\nconcurrency = 4\n")).unwrap();
    p.write("0001_public.sql", "-- kiln:up\nCREATE TABLE t_public (id INT);\n-- kiln:down\nDROP TABLE t_public;\n");
    p.write("tenant/0002_users.sql", "-- kiln:up\nCREATE TABLE t_users (id INT);\n-- kiln:down\nDROP TABLE t_users;\n");
}

fn sqlite_tenant(p: &Project, t: &str) -> rusqlite::Connection {
    rusqlite::Connection::open(p.root.path().join(format!("tenants/{t}.db"))).unwrap()
}

fn tables(c: &rusqlite::Connection) -> Vec<String> {
    let mut st = c.prepare("SELECT name FROM sqlite_master WHERE type='table' AND name LIKE 't_%' ORDER BY name").unwrap();
    st.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
}

#[tokio::test]
async fn one_broken_tenant_never_stops_the_others_and_a_rerun_finishes_it() {
    let p = Project::new(Engine::Sqlite).await;
    let names: Vec<String> = (0..20).map(|i| format!("t{i:02}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    fleet(&p, &refs, "url = \"sqlite://tenants/{tenant}.db\"");
    // t07 already has the table 0002 creates: its migration fails there.
    sqlite_tenant(&p, "t07").execute_batch("CREATE TABLE t_users (id INT);").unwrap();
    let r = p.kiln(&["up"]);
    r.fails_with(1);
    assert!(r.stderr.contains("tenant t07") && r.stderr.contains("t_users"), "{}", r.stderr);
    assert!(r.stdout.contains("20 database(s) done (20 migration(s)), 1 failed"), "public + 19 tenants: {}", r.stdout);
    for t in &names {
        assert_eq!(tables(&sqlite_tenant(&p, t)), ["t_users"], "{t}");
    }
    let json = p.kiln(&["up", "--json"]);
    json.fails_with(1);
    let v = json.json();
    assert_eq!(v["ok"], false);
    let failed: Vec<String> = v["targets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["status"] == "failed")
        .map(|t| t["target"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(failed, ["t07"], "only the broken tenant fails again; the others are up to date");
    let t07 = v["targets"].as_array().unwrap().iter().find(|t| t["target"]["name"] == "t07").unwrap().clone();
    assert_eq!(t07["error"]["code"], "migration_failed", "{t07}");
    // The fleet check names it and fails.
    let check = p.kiln(&["check"]);
    check.fails_with(1);
    assert!(check.stdout.contains("tenant t07: 1 pending"), "rolled back, so pending again: {}", check.stdout);
    assert!(check.stdout.contains("1 of 21 database(s) need attention"), "{}", check.stdout);
    // Fixed by hand: the re-run finishes it and touches nobody else.
    sqlite_tenant(&p, "t07").execute_batch("DROP TABLE t_users;").unwrap();
    let again = p.kiln(&["up", "--json"]);
    again.ok();
    let applied: Vec<(String, usize)> = again.json()["targets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| !t["report"]["steps"].as_array().unwrap().is_empty())
        .map(|t| (t["target"]["name"].as_str().unwrap_or("public").to_string(), t["report"]["steps"].as_array().unwrap().len()))
        .collect();
    assert_eq!(applied, [("t07".to_string(), 1)]);
    p.kiln(&["check"]).ok();
    assert_eq!(p.kiln(&["check", "--tenant", "t07", "--json"]).json()["targets"].as_array().unwrap().len(), 1);
    // The public database has only the public migration.
    assert_eq!(p.db.objects("t_").await.unwrap(), ["t_public"]);
}

#[tokio::test]
async fn filters_dry_run_and_status_over_the_fleet() {
    let p = Project::new(Engine::Sqlite).await;
    fleet(&p, &["acme", "globex", "initech"], "url = \"sqlite://tenants/{tenant}.db\"");
    p.kiln(&["up", "--dry-run"]).ok();
    assert!(!p.root.path().join("tenants/acme.db").exists(), "a dry run creates nothing");
    p.kiln(&["up", "--public-only"]).ok();
    assert!(!p.root.path().join("tenants/acme.db").exists());
    p.kiln(&["up", "--tenant", "globex"]).ok();
    assert_eq!(tables(&sqlite_tenant(&p, "globex")), ["t_users"]);
    assert!(!p.root.path().join("tenants/acme.db").exists());
    let st = p.kiln(&["status", "--tenants", "--json"]);
    st.ok();
    let rows: Vec<(String, u64, u64)> = st.json()["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["target"]["name"].as_str().unwrap_or("public").to_string(), t["applied"].as_u64().unwrap(), t["pending"].as_u64().unwrap()))
        .collect();
    assert_eq!(rows, [("public".into(), 1, 0), ("acme".into(), 0, 1), ("globex".into(), 1, 0), ("initech".into(), 0, 1)], "{}", st.stdout);
    p.kiln(&["up", "--tenants-only"]).ok();
    assert_eq!(tables(&sqlite_tenant(&p, "acme")), ["t_users"]);
    let unknown = p.kiln(&["up", "--tenant", "nope"]);
    unknown.fails_with(2);
    assert!(unknown.stderr.contains("nope") && unknown.stderr.contains("acme, globex, initech"), "{}", unknown.stderr);
    // Single-database commands act on the public database with its migrations.
    let status = p.kiln(&["status", "--json"]);
    status.ok();
    assert_eq!(status.json()["migrations"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_schema_per_tenant_and_two_runners_share_the_fleet() {
    let p = Project::new(Engine::Postgres).await;
    let names: Vec<String> = (0..12).map(|i| format!("acme-{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    fleet(&p, &refs, "schema = \"tenant_{tenant}\"");
    // Each tenant migration also counts its runs in the public database.
    p.write("0001_public.sql", "-- kiln:up\nCREATE TABLE public.t_runs (tenant text);\n-- kiln:down\nDROP TABLE public.t_runs;\n");
    p.write(
        "tenant/0002_users.sql",
        "-- kiln:up\nCREATE TABLE t_users (id INT);\nINSERT INTO public.t_runs SELECT current_schema();\nSELECT pg_sleep(0.05);\n",
    );
    p.kiln(&["up", "--public-only"]).ok();
    let (a, b) = {
        let run = || kiln_cmd(p.root.path()).args(["up", "--tenants-only", "--json", "--url", &p.db.url, "--dir"]).arg(p.dir()).spawn().unwrap();
        let (mut a, mut b) = (run(), run());
        (a.wait().unwrap(), b.wait().unwrap())
    };
    assert!(a.success() && b.success(), "both runners succeed: {a:?} {b:?}");
    let runs = p.db.query_strings("SELECT tenant FROM public.t_runs ORDER BY tenant").await.unwrap();
    let mut want: Vec<String> = names.iter().map(|n| format!("tenant_{n}")).collect();
    want.sort();
    assert_eq!(runs, want, "every tenant migrated exactly once");
    let st = p.kiln(&["status", "--tenants", "--json"]);
    assert!(st.json()["targets"].as_array().unwrap().iter().all(|t| t["pending"] == 0 && t["failed"] == 0), "{}", st.stdout);
}

#[tokio::test]
async fn fleet_configuration_errors_are_clear() {
    let p = Project::new(Engine::Sqlite).await;
    p.add_create(1);
    for (toml, needle) in [
        (
            "[tenants]\nquery = \"SELECT name FROM tenants\"\nlist = [\"a\"]\nschema = \"{tenant}\"\n",
            "set one source of tenant names, not list and query",
        ),
        ("[tenants]\npattern = \"tenant_[\"\nschema = \"{tenant}\"\n", "is not a valid pattern"),
        ("[tenants]\nfind = { collection = \"c\", field = \"f\", filter = 3 }\nschema = \"{tenant}\"\n", "must be a table"),
        ("[tenants]\nfind = { collection = \"c\", field = \"f\" }\nurl = \"sqlite://t/{tenant}.db\"\n", "`find` reads a MongoDB collection"),
        ("[tenants]\nquery = \"SELECT name FROM no_such_table\"\nurl = \"sqlite://t/{tenant}.db\"\n", "no_such_table"),
        ("[tenants]\npattern = \"*\"\nurl = \"sqlite://t/{tenant}/app.db\"\n", "must be in the file name"),
        ("[tenants]\nlist = [\"a'; DROP TABLE x; --\"]\nschema = \"{tenant}\"\n", "cannot name a database or schema safely"),
        ("[tenants]\nlist = [\"a\"]\nschema = \"fixed\"\n", "must contain `{tenant}`"),
        ("[tenants]\nlist = [\"a\", \"a\"]\nschema = \"{tenant}\"\n", "listed twice"),
        ("[tenants]\nlist = [\"a\"]\n", "needs `schema"),
    ] {
        std::fs::write(p.root.path().join("kiln.toml"), toml).unwrap();
        let r = p.kiln(&["up"]);
        r.fails_with(2);
        assert!(r.stderr.contains(needle) && r.stderr.contains("kiln.toml"), "{toml}: {}", r.stderr);
    }
    std::fs::remove_file(p.root.path().join("kiln.toml")).unwrap();
    p.kiln(&["up", "--tenants-only"]).fails_with(2);
}

/// A database per tenant on MySQL/MariaDB and MongoDB: the URL template names
/// `<test db>_<tenant>`. One tenant's database is missing on MySQL: that tenant
/// fails (kiln does not create databases) and the others are migrated.
async fn database_per_tenant(engine: Engine) {
    let p = Project::new(engine).await;
    let template = p.db.url.replacen(&format!("/{}", p.db.name), &format!("/{}_{{tenant}}", p.db.name), 1);
    assert_ne!(template, p.db.url);
    let tenants = ["a", "b", "c"];
    let list = tenants.iter().map(|t| format!("{t:?}")).collect::<Vec<_>>().join(", ");
    std::fs::write(p.root.path().join("kiln.toml"), format!("[tenants]\nlist = [{list}]\nurl = \"{template}\"\n")).unwrap();
    if engine == Engine::Mongodb {
        p.write("0001_public.yaml", "up:\n  - create: t_public\n");
        p.write(
            "tenant/0002_users.yaml",
            "up:\n  - create: t_users\n  - createIndexes: t_users\n    indexes: [ { key: { email: 1 }, name: email_1, unique: true } ]\n",
        );
    } else {
        p.write("0001_public.sql", "CREATE TABLE t_public (id INT);\n");
        p.write("tenant/0002_users.sql", "CREATE TABLE t_users (id INT);\n");
        for t in ["a", "b"] {
            p.db.sql(&format!("CREATE DATABASE `{}_{t}`", p.db.name)).await.unwrap();
        }
    }
    let r = p.kiln(&["up", "--json"]);
    let v = r.json();
    let status = |name: &str| v["targets"].as_array().unwrap().iter().find(|t| t["target"]["name"] == name).unwrap()["status"].clone();
    assert_eq!(status("a"), "done", "{}", r.stdout);
    assert_eq!(status("b"), "done", "{}", r.stdout);
    if engine == Engine::Mongodb {
        r.ok();
        assert_eq!(status("c"), "done");
        let client = mongodb::Client::with_uri_str(&p.db.url).await.unwrap();
        for t in tenants {
            let names = client.database(&format!("{}_{t}", p.db.name)).list_collection_names().await.unwrap();
            assert!(names.contains(&"t_users".to_string()), "{t}: {names:?}");
            client.database(&format!("{}_{t}", p.db.name)).drop().await.unwrap();
        }
    } else {
        r.fails_with(1);
        assert_eq!(status("c"), "failed", "c's database does not exist: {}", r.stdout);
        // Asked to, kiln creates the missing database and migrates it.
        std::fs::write(p.root.path().join("kiln.toml"), format!("[tenants]\nlist = [{list}]\nurl = \"{template}\"\ncreate = true\n")).unwrap();
        let again = p.kiln(&["up", "--json"]);
        again.ok();
        let c = again.json()["targets"].as_array().unwrap().iter().find(|t| t["target"]["name"] == "c").unwrap().clone();
        assert_eq!(c["report"]["steps"].as_array().unwrap().len(), 1, "{c}");
        for t in ["a", "b", "c"] {
            p.db.sql(&format!("DROP DATABASE `{}_{t}`", p.db.name)).await.unwrap();
        }
    }
    assert_eq!(p.db.objects("t_").await.unwrap(), ["t_public"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_database_per_tenant() {
    database_per_tenant(Engine::Mysql).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_database_per_tenant() {
    database_per_tenant(Engine::Mongodb).await;
}

/// Zero-downtime migrations are not honoured per tenant yet: a tenant-scoped one
/// is refused before anything runs (its backfill would have no worker), and
/// `up --wait` / `--contract` over a fleet are usage errors.
#[tokio::test]
async fn zero_downtime_is_refused_where_no_worker_would_serve_it() {
    let p = Project::new(Engine::Sqlite).await;
    fleet(&p, &["a", "b"], "url = \"sqlite://tenants/{tenant}.db\"");
    let wait = p.kiln(&["up", "--wait"]);
    wait.fails_with(2);
    assert!(wait.stderr.contains("--wait and --contract"), "{}", wait.stderr);
    p.write(
        "tenant/0003_backfill.sql",
        "-- kiln:expand\nALTER TABLE t_users ADD COLUMN n INT;\n-- kiln:backfill table=t_users key=id\nUPDATE t_users SET n = 1 WHERE id BETWEEN :lo AND :hi AND n IS NULL;\n",
    );
    let r = p.kiln(&["up"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("tenant/0003_backfill.sql") && r.stderr.contains("public database only"), "{}", r.stderr);
    assert!(tables(&sqlite_tenant(&p, "a")).is_empty(), "nothing ran on any tenant");
}

/// The tenants of a PostgreSQL fleet come from a query on the public
/// database, read after the public migrations ran (they create and fill the
/// registry): inactive rows are left out, a hostile name fails on its own
/// without reaching SQL, and a tenant added later is picked up by the next run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_tenants_from_a_query_and_from_a_pattern() {
    let p = Project::new(Engine::Postgres).await;
    std::fs::write(
        p.root.path().join("kiln.toml"),
        "[tenants]\nquery = \"SELECT name FROM public.registry WHERE active ORDER BY name\"\nschema = \"shop_{tenant}\"\n",
    )
    .unwrap();
    p.write(
        "0001_registry.sql",
        "CREATE TABLE public.registry (name text, active bool);\nINSERT INTO public.registry VALUES ('acme', true), ('globex', true), ('gone', false), ('x\"; DROP TABLE public.registry; --', true);\n",
    );
    p.write("tenant/0002_users.sql", "CREATE TABLE t_users (id INT);\n");
    let r = p.kiln(&["up", "--json"]);
    r.fails_with(1);
    let v = r.json();
    let by_name = |n: &str| v["targets"].as_array().unwrap().iter().find(|t| t["target"]["name"] == n).cloned();
    assert_eq!(by_name("acme").unwrap()["status"], "done", "{}", r.stdout);
    assert_eq!(by_name("globex").unwrap()["status"], "done");
    assert!(by_name("gone").is_none(), "inactive tenants are not selected");
    let hostile = v["targets"].as_array().unwrap().iter().find(|t| t["status"] == "failed").unwrap().clone();
    assert_eq!(hostile["error"]["code"], "bad_tenant_name", "{hostile}");
    assert!(hostile["target"]["name"].as_str().unwrap().contains("DROP TABLE"));
    assert_eq!(p.db.query_strings("SELECT count(*)::text FROM public.registry").await.unwrap(), ["4"], "the name never reached SQL");
    let schemas = p.db.query_strings("SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'shop\\_%' ORDER BY 1").await.unwrap();
    assert_eq!(schemas, ["shop_acme", "shop_globex"]);
    // A new tenant is migrated by the next run; the others are up to date.
    p.db.sql("UPDATE public.registry SET active = true WHERE name = 'gone'; DELETE FROM public.registry WHERE name LIKE 'x%'").await.unwrap();
    let again = p.kiln(&["up", "--json"]);
    again.ok();
    let ran: Vec<String> = again.json()["targets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| !t["report"]["steps"].as_array().unwrap().is_empty())
        .map(|t| t["target"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ran, ["gone"]);
    // The same fleet found by its schemas' names.
    std::fs::write(p.root.path().join("kiln.toml"), "[tenants]\npattern = \"shop_*\"\nschema = \"shop_{tenant}\"\n").unwrap();
    let st = p.kiln(&["status", "--tenants", "--json"]);
    st.ok();
    let names: Vec<String> =
        st.json()["targets"].as_array().unwrap().iter().filter_map(|t| t["target"]["name"].as_str().map(str::to_string)).collect();
    assert_eq!(names, ["acme", "globex", "gone"], "{}", st.stdout);
    p.kiln(&["check"]).ok();
    // A query that fails names the source and changes nothing.
    std::fs::write(p.root.path().join("kiln.toml"), "[tenants]\nquery = \"SELECT name FROM public.nope\"\nschema = \"shop_{tenant}\"\n").unwrap();
    let bad = p.kiln(&["status", "--tenants"]);
    bad.fails_with(2);
    assert!(bad.stderr.contains("cannot read the tenants") && bad.stderr.contains("public.nope"), "{}", bad.stderr);
}

/// MongoDB: tenants from a find on `client_configs` (the field naming each
/// tenant's database), then the same fleet found by a database-name pattern.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_tenants_from_a_find_and_from_a_pattern() {
    let p = Project::new(Engine::Mongodb).await;
    let template = p.db.url.replacen(&format!("/{}", p.db.name), &format!("/{}_{{tenant}}", p.db.name), 1);
    std::fs::write(
        p.root.path().join("kiln.toml"),
        format!(
            "[tenants]\nfind = {{ collection = \"client_configs\", field = \"tenant.db\", filter = {{ active = true }} }}\nurl = \"{template}\"\n"
        ),
    )
    .unwrap();
    p.write(
        "0001_registry.yaml",
        "up:\n  - insert: client_configs\n    documents:\n      - { _id: 1, tenant: { db: acme }, active: true }\n      - { _id: 2, tenant: { db: globex }, active: true }\n      - { _id: 3, tenant: { db: old }, active: false }\n      - { _id: 4, active: true }\n",
    );
    p.write("tenant/0002_conversations.yaml", "up:\n  - create: conversations\n");
    let r = p.kiln(&["up", "--json"]);
    r.fails_with(1);
    let v = r.json();
    let status: Vec<(String, String)> = v["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["target"]["name"].as_str().unwrap_or("public").to_string(), t["status"].as_str().unwrap().to_string()))
        .collect();
    assert!(status.contains(&("acme".into(), "done".into())) && status.contains(&("globex".into(), "done".into())), "{status:?}");
    assert!(status.contains(&("#3".into(), "failed".into())), "the document without the field fails on its own: {status:?}");
    assert!(!status.iter().any(|(n, _)| n == "old"));
    std::fs::write(p.root.path().join("kiln.toml"), format!("[tenants]\npattern = \"{}_*\"\nurl = \"{template}\"\n", p.db.name)).unwrap();
    let st = p.kiln(&["status", "--tenants", "--json"]);
    st.ok();
    let names: Vec<String> =
        st.json()["targets"].as_array().unwrap().iter().filter_map(|t| t["target"]["name"].as_str().map(str::to_string)).collect();
    assert_eq!(names, ["acme", "globex"], "{}", st.stdout);
    let client = mongodb::Client::with_uri_str(&p.db.url).await.unwrap();
    for t in ["acme", "globex"] {
        client.database(&format!("{}_{t}", p.db.name)).drop().await.unwrap();
    }
}

/// MySQL: tenants from a query and from the server's database names; SQLite:
/// from the files in the template's directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_and_sqlite_tenants_from_queries_and_patterns() {
    let p = Project::new(Engine::Mysql).await;
    let template = p.db.url.replacen(&format!("/{}", p.db.name), &format!("/{}_{{tenant}}", p.db.name), 1);
    for t in ["a", "b"] {
        p.db.sql(&format!("CREATE DATABASE `{}_{t}`", p.db.name)).await.unwrap();
    }
    p.write("0001_registry.sql", "CREATE TABLE registry (name VARCHAR(64));\nINSERT INTO registry VALUES ('a'), ('b');\n");
    p.write("tenant/0002_users.sql", "CREATE TABLE t_users (id INT);\n");
    std::fs::write(p.root.path().join("kiln.toml"), format!("[tenants]\nquery = \"SELECT name FROM registry\"\nurl = \"{template}\"\n")).unwrap();
    p.kiln(&["up"]).ok();
    std::fs::write(p.root.path().join("kiln.toml"), format!("[tenants]\npattern = \"{}_*\"\nurl = \"{template}\"\n", p.db.name)).unwrap();
    let st = p.kiln(&["status", "--tenants", "--json"]);
    st.ok();
    let rows: Vec<(String, u64)> = st.json()["targets"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| Some((t["target"]["name"].as_str()?.to_string(), t["applied"].as_u64().unwrap())))
        .collect();
    assert_eq!(rows, [("a".into(), 1), ("b".into(), 1)], "{}", st.stdout);
    for t in ["a", "b"] {
        p.db.sql(&format!("DROP DATABASE `{}_{t}`", p.db.name)).await.unwrap();
    }

    let lite = Project::new(Engine::Sqlite).await;
    std::fs::create_dir_all(lite.root.path().join("tenants")).unwrap();
    for t in ["north", "south"] {
        std::fs::write(lite.root.path().join(format!("tenants/{t}.db")), "").unwrap();
    }
    std::fs::write(lite.root.path().join("tenants/notes.txt"), "not a tenant").unwrap();
    std::fs::write(lite.root.path().join("kiln.toml"), "[tenants]\npattern = \"*.db\"\nurl = \"sqlite://tenants/{tenant}.db\"\n").unwrap();
    lite.write("tenant/0002_users.sql", "CREATE TABLE t_users (id INT);\n");
    let r = lite.kiln(&["up", "--json"]);
    r.ok();
    let names: Vec<String> =
        r.json()["targets"].as_array().unwrap().iter().filter_map(|t| t["target"]["name"].as_str().map(str::to_string)).collect();
    assert_eq!(names.len(), 2, "{}", r.stdout);
    assert!(names.contains(&"north".to_string()) && names.contains(&"south".to_string()));
    assert_eq!(tables(&sqlite_tenant(&lite, "north")), ["t_users"]);
}

/// A copy of `examples/<name>` in `p`'s directory, with `from → to` replaced in its kiln.toml.
fn example(p: &Project, name: &str, replace: &[(&str, String)]) {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples").join(name);
    let mut stack = vec![src.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            let to = p.root.path().join(path.strip_prefix(&src).unwrap());
            if path.is_dir() {
                std::fs::create_dir_all(&to).unwrap();
                stack.push(path);
            } else {
                std::fs::copy(&path, &to).unwrap();
            }
        }
    }
    let toml = p.root.path().join("kiln.toml");
    let mut text = std::fs::read_to_string(&toml).unwrap();
    for (from, to) in replace {
        assert!(text.contains(from), "{from} in {name}/kiln.toml");
        text = text.replace(from, to);
    }
    std::fs::write(toml, text).unwrap();
}

fn tenant_runs(r: &Run) -> Vec<(String, usize)> {
    let mut v: Vec<(String, usize)> = r.json()["targets"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| Some((t["target"]["name"].as_str()?.to_string(), t["report"]["steps"].as_array()?.len())))
        .collect();
    v.sort();
    v
}

/// examples/tenants-postgres as its README runs it: the registry the public
/// migration creates gives three tenants; activating a fourth migrates it alone.
#[tokio::test]
async fn the_postgres_tenants_example_runs() {
    let p = Project::new(Engine::Postgres).await;
    example(&p, "tenants-postgres", &[("postgres://postgres@127.0.0.1:5432/kiln_tenants_example", p.db.url.clone())]);
    let r = kiln_cmd(p.root.path()).args(["up", "--json"]).output().map(output_to_run).unwrap();
    r.ok();
    assert_eq!(tenant_runs(&r), [("acme".into(), 2), ("globex".into(), 2), ("initech".into(), 2)], "{}", r.stdout);
    p.db.sql("UPDATE public.tenants SET active = true WHERE slug = 'hooli'").await.unwrap();
    let again = kiln_cmd(p.root.path()).args(["up", "--json"]).output().map(output_to_run).unwrap();
    again.ok();
    assert_eq!(tenant_runs(&again), [("acme".into(), 0), ("globex".into(), 0), ("hooli".into(), 2), ("initech".into(), 0)]);
    let orders = p.db.query_strings("SELECT count(*)::text FROM information_schema.tables WHERE table_name = 'orders'").await.unwrap();
    assert_eq!(orders, ["4"]);
}

/// examples/tenants-mongodb: the active clients of client_configs, each with
/// the seed's indexes; the inactive one is left alone.
#[tokio::test]
async fn the_mongodb_tenants_example_runs() {
    let p = Project::new(Engine::Mongodb).await;
    let template = p.db.url.replacen(&format!("/{}", p.db.name), &format!("/{}_{{tenant}}", p.db.name), 1);
    example(
        &p,
        "tenants-mongodb",
        &[
            ("mongodb://127.0.0.1:27017/chat_public?directConnection=true", p.db.url.clone()),
            ("mongodb://127.0.0.1:27017/{tenant}?directConnection=true", template),
        ],
    );
    let r = kiln_cmd(p.root.path()).args(["up", "--json"]).output().map(output_to_run).unwrap();
    r.ok();
    assert_eq!(tenant_runs(&r), [("chat_acme".into(), 3), ("chat_globex".into(), 3), ("chat_initech".into(), 3)], "{}", r.stdout);
    let client = mongodb::Client::with_uri_str(&p.db.url).await.unwrap();
    let messages = client.database(&format!("{}_chat_acme", p.db.name)).collection::<mongodb::bson::Document>("messages");
    let names = messages.list_index_names().await.unwrap();
    assert_eq!(names.len(), 13, "_id_ and the 12 seed indexes: {names:?}");
    let public_config = client.database(&p.db.name).collection::<mongodb::bson::Document>("config").list_index_names().await.unwrap();
    assert!(public_config.contains(&"idx_whatsapp_display_phone".to_string()), "{public_config:?}");
    for t in ["chat_acme", "chat_globex", "chat_initech"] {
        client.database(&format!("{}_{t}", p.db.name)).drop().await.unwrap();
    }
}

/// PostgreSQL, a database per tenant: missing databases fail their tenant,
/// unless `create = true`, when kiln creates them (quoted) and migrates them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_creates_missing_tenant_databases_when_asked() {
    let p = Project::new(Engine::Postgres).await;
    let template = p.db.url.replacen(&format!("/{}", p.db.name), &format!("/{}_{{tenant}}", p.db.name), 1);
    p.write("tenant/0001_users.sql", "CREATE TABLE t_users (id INT);\n");
    std::fs::write(p.root.path().join("kiln.toml"), format!("[tenants]\nlist = [\"North-1\", \"south\"]\nurl = \"{template}\"\n")).unwrap();
    let r = p.kiln(&["up", "--tenants-only"]);
    r.fails_with(1);
    assert!(r.stderr.contains("does not exist"), "{}", r.stderr);
    std::fs::write(p.root.path().join("kiln.toml"), format!("[tenants]\nlist = [\"North-1\", \"south\"]\nurl = \"{template}\"\ncreate = true\n"))
        .unwrap();
    p.kiln(&["up", "--tenants-only"]).ok();
    p.kiln(&["check", "--tenants-only"]).ok();
    for t in ["North-1", "south"] {
        let db = format!("{}_{t}", p.db.name);
        assert_eq!(
            p.db.query_strings(&format!("SELECT datname::text FROM pg_database WHERE datname = '{db}'")).await.unwrap(),
            std::slice::from_ref(&db)
        );
        p.db.sql(&format!("DROP DATABASE \"{db}\" WITH (FORCE)")).await.unwrap();
    }
}

/// kill -9 in the middle of a fleet run: the re-run finishes the fleet and
/// no tenant is migrated twice (each tenant's migration counts its runs in
/// the public database inside its own transaction).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_run_killed_midway_is_finished_by_the_next_run() {
    let p = Project::new(Engine::Postgres).await;
    let names: Vec<String> = (0..30).map(|i| format!("k{i:02}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    fleet(&p, &refs, "schema = \"tenant_{tenant}\"");
    p.write("0001_public.sql", "CREATE TABLE public.t_runs (tenant text);\n");
    p.write("tenant/0002_users.sql", "CREATE TABLE t_users (id INT);\nINSERT INTO public.t_runs SELECT current_schema();\nSELECT pg_sleep(0.15);\n");
    let mut child =
        kiln_cmd(p.root.path()).args(["up", "--url", &p.db.url, "--dir"]).arg(p.dir()).stdout(std::process::Stdio::null()).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let n: usize = p.db.query_strings("SELECT count(*)::text FROM public.t_runs").await.map(|v| v[0].parse().unwrap()).unwrap_or(0);
        if n >= 6 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the fleet run never got going");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let done: usize = p.db.query_strings("SELECT count(*)::text FROM public.t_runs").await.unwrap()[0].parse().unwrap();
    assert!(done < names.len(), "killed midway: {done} of {} tenants done", names.len());
    // A tenant whose session the server has not yet ended is "running elsewhere"
    // for a moment: the next run skips it, and the one after finishes it.
    for _ in 0..5 {
        let r = p.kiln(&["up", "--json"]);
        r.ok();
        if p.kiln(&["check"]).code == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    p.kiln(&["check"]).ok();
    let runs = p.db.query_strings("SELECT tenant FROM public.t_runs ORDER BY tenant").await.unwrap();
    let want: Vec<String> = names.iter().map(|n| format!("tenant_{n}")).collect();
    assert_eq!(runs, want, "every tenant migrated exactly once");
}

/// `down`, `repair` (and `redo`, `baseline`) with `--tenant NAME` act on that
/// tenant alone, with the tenant-scoped migrations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_and_repair_act_on_one_tenant() {
    let p = Project::new(Engine::Postgres).await;
    fleet(&p, &["acme", "globex"], "schema = \"tenant_{tenant}\"");
    p.kiln(&["up"]).ok();
    let users = || p.db.query_strings("SELECT table_schema::text FROM information_schema.tables WHERE table_name = 't_users' ORDER BY 1");
    assert_eq!(users().await.unwrap(), ["tenant_acme", "tenant_globex"]);
    let down = p.kiln(&["down", "--tenant", "acme"]);
    down.ok();
    assert!(down.stdout.contains("0002"), "{}", down.stdout);
    assert_eq!(users().await.unwrap(), ["tenant_globex"], "only acme reverted");
    assert_eq!(p.db.objects("t_").await.unwrap(), ["t_public"], "the public database is untouched");
    // A migration without a transaction fails half-way on globex only.
    p.db.sql("CREATE TABLE tenant_globex.t_extra (id INT)").await.unwrap();
    p.write("tenant/0003_extra.sql", "-- kiln:transaction off\n-- kiln:up\nCREATE TABLE t_extra2 (id INT);\nCREATE TABLE t_extra (id INT);\n");
    let r = p.kiln(&["up"]);
    r.fails_with(1);
    assert!(r.stderr.contains("tenant globex"), "{}", r.stderr);
    let blocked = p.kiln(&["up", "--tenant", "globex"]);
    blocked.fails_with(1);
    assert!(blocked.stderr.contains("repair"), "a failed migration blocks the tenant until repair: {}", blocked.stderr);
    // Fixed by hand, then repaired on that tenant alone.
    p.db.sql("DROP TABLE tenant_globex.t_extra2; DROP TABLE tenant_globex.t_extra").await.unwrap();
    p.kiln(&["repair", "0003", "--tenant", "globex", "--reason", "cleaned up by hand"]).ok();
    p.kiln(&["up"]).ok();
    p.kiln(&["check"]).ok();
    let unknown = p.kiln(&["down", "--tenant", "nope"]);
    unknown.fails_with(2);
    assert!(unknown.stderr.contains("acme, globex"), "{}", unknown.stderr);
    std::fs::remove_file(p.root.path().join("kiln.toml")).unwrap();
    let nofleet = p.kiln(&["repair", "--tenant", "acme", "--reason", "x"]);
    nofleet.fails_with(2);
    assert!(nofleet.stderr.contains("[tenants]"), "{}", nofleet.stderr);
}

/// `kiln sync` over a MongoDB fleet: the public database against indexes/,
/// every tenant against indexes/tenant/ (the seed's `config` collection has
/// different indexes in each scope), with the fleet filters and --dry-run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_sync_over_a_mongodb_fleet() {
    let p = Project::new(Engine::Mongodb).await;
    let template = p.db.url.replacen(&format!("/{}", p.db.name), &format!("/{}_{{tenant}}", p.db.name), 1);
    std::fs::write(p.root.path().join("kiln.toml"), format!("[tenants]\nlist = [\"a\", \"b\"]\nurl = \"{template}\"\n")).unwrap();
    p.write("0001_public.yaml", "up:\n  - create: config\n");
    p.write("tenant/0002_config.yaml", "up:\n  - create: config\n");
    std::fs::create_dir_all(p.root.path().join("indexes/tenant")).unwrap();
    std::fs::write(
        p.root.path().join("indexes/config.yaml"),
        "- { key: { id: 1 }, name: idx_config_id, unique: true }\n- { key: { whatsappPhone: 1 }, name: idx_whatsapp_display_phone }\n",
    )
    .unwrap();
    std::fs::write(
        p.root.path().join("indexes/tenant/config.yaml"),
        "- { key: { id: 1 }, name: idx_config_id, unique: true }\n- { key: { updatedAt: -1 }, name: idx_config_updated }\n",
    )
    .unwrap();
    p.kiln(&["up"]).ok();
    let client = mongodb::Client::with_uri_str(&p.db.url).await.unwrap();
    let indexes = |db: String| {
        let c = client.database(&db).collection::<mongodb::bson::Document>("config");
        async move {
            let mut v = c.list_index_names().await.unwrap();
            v.sort();
            v
        }
    };
    let dry = p.kiln(&["sync", "--dry-run", "--json"]);
    dry.ok();
    assert_eq!(dry.json()["targets"].as_array().unwrap().len(), 3, "{}", dry.stdout);
    assert_eq!(indexes(format!("{}_a", p.db.name)).await, ["_id_"], "a dry run changes nothing");
    p.kiln(&["sync", "--tenant", "a"]).ok();
    assert_eq!(indexes(format!("{}_a", p.db.name)).await, ["_id_", "idx_config_id", "idx_config_updated"]);
    assert_eq!(indexes(format!("{}_b", p.db.name)).await, ["_id_"], "only tenant a");
    assert_eq!(indexes(p.db.name.clone()).await, ["_id_"], "not the public database");
    let all = p.kiln(&["sync"]);
    all.ok();
    assert!(all.stdout.contains("3 database(s), 0 with problems"), "{}", all.stdout);
    assert_eq!(indexes(p.db.name.clone()).await, ["_id_", "idx_config_id", "idx_whatsapp_display_phone"]);
    assert_eq!(indexes(format!("{}_b", p.db.name)).await, ["_id_", "idx_config_id", "idx_config_updated"]);
    p.kiln(&["check"]).ok();
    // A differing index on one tenant is that tenant's problem alone.
    client.database(&format!("{}_b", p.db.name)).collection::<mongodb::bson::Document>("config").drop_index("idx_config_updated").await.unwrap();
    client
        .database(&format!("{}_b", p.db.name))
        .run_command(mongodb::bson::doc! {"createIndexes": "config", "indexes": [{"key": {"updatedAt": 1}, "name": "idx_config_updated"}]})
        .await
        .unwrap();
    let differs = p.kiln(&["sync", "--tenants-only", "--json"]);
    differs.fails_with(1);
    let bad: Vec<String> = differs.json()["targets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["ok"] != true)
        .map(|t| t["target"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(bad, ["b"], "{}", differs.stdout);
    for t in ["a", "b"] {
        client.database(&format!("{}_{t}", p.db.name)).drop().await.unwrap();
    }
}

/// 50 tenants with one broken one, on PostgreSQL (schemas), MySQL (databases
/// kiln creates) and MongoDB (databases): 49 migrated, the broken one named,
/// exit 1 — and the tenants really ran side by side (the sum of their run
/// times is well above the wall time of the whole run).
async fn fifty_tenants_one_broken(engine: Engine) {
    let p = Project::new(engine).await;
    let names: Vec<String> = (0..50).map(|i| format!("t{i:02}")).collect();
    let list = names.iter().map(|t| format!("{t:?}")).collect::<Vec<_>>().join(", ");
    let db_template = p.db.url.replacen(&format!("/{}", p.db.name), &format!("/{}_{{tenant}}", p.db.name), 1);
    let placement = match engine {
        Engine::Postgres => "schema = \"tenant_{tenant}\"".to_string(),
        Engine::Mysql => format!("url = \"{db_template}\"\ncreate = true"),
        _ => format!("url = \"{db_template}\""),
    };
    std::fs::write(p.root.path().join("kiln.toml"), format!("[tenants]\nlist = [{list}]\n{placement}\nconcurrency = 8\n")).unwrap();
    let client = if engine == Engine::Mongodb { Some(mongodb::Client::with_uri_str(&p.db.url).await.unwrap()) } else { None };
    match engine {
        Engine::Mongodb => {
            p.write("tenant/0001_users.yaml", "up:\n  - create: t_users\n  - insert: t_users\n    documents: [ { _id: 1 } ]\n");
            // t13 already holds the document the migration inserts: duplicate key (11000).
            let t13 = client.as_ref().unwrap().database(&format!("{}_t13", p.db.name));
            t13.collection::<mongodb::bson::Document>("t_users").insert_one(mongodb::bson::doc! {"_id": 1}).await.unwrap();
        }
        Engine::Postgres => {
            p.write("tenant/0001_users.sql", "CREATE TABLE t_users (id INT);\nINSERT INTO t_users VALUES (1);\n");
            p.db.sql("CREATE SCHEMA tenant_t13; CREATE TABLE tenant_t13.t_users (id INT)").await.unwrap();
        }
        _ => {
            p.write("tenant/0001_users.sql", "CREATE TABLE t_users (id INT);\nINSERT INTO t_users VALUES (1);\n");
            p.db.sql(&format!("CREATE DATABASE `{}_t13`", p.db.name)).await.unwrap();
            p.db.sql(&format!("CREATE TABLE `{}_t13`.t_users (id INT)", p.db.name)).await.unwrap();
        }
    }
    let r = p.kiln(&["up", "--tenants-only", "--json"]);
    r.fails_with(1);
    let v = r.json();
    let targets = v["targets"].as_array().unwrap();
    let failed: Vec<&str> = targets.iter().filter(|t| t["status"] == "failed").map(|t| t["target"]["name"].as_str().unwrap()).collect();
    assert_eq!(failed, ["t13"], "{}", r.stdout);
    assert_eq!(targets.iter().filter(|t| t["status"] == "done").count(), 49);
    let busy: u64 = targets.iter().map(|t| t["duration_ms"].as_u64().unwrap()).sum();
    let wall = v["duration_ms"].as_u64().unwrap().max(1);
    assert!(busy as f64 > 2.0 * wall as f64, "tenants overlap: {busy} ms of tenant runs in {wall} ms");
    let text = p.kiln(&["up", "--tenants-only"]);
    text.fails_with(1);
    assert!(text.stderr.contains("tenant t13"), "{}", text.stderr);
    match engine {
        Engine::Mongodb => {
            let c = client.unwrap();
            for n in &names {
                c.database(&format!("{}_{n}", p.db.name)).drop().await.unwrap();
            }
        }
        Engine::Mysql => {
            for n in &names {
                p.db.sql(&format!("DROP DATABASE IF EXISTS `{}_{n}`", p.db.name)).await.unwrap();
            }
        }
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_tenants_one_broken_on_postgres() {
    fifty_tenants_one_broken(Engine::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_tenants_one_broken_on_mysql() {
    fifty_tenants_one_broken(Engine::Mysql).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_tenants_one_broken_on_mongodb() {
    fifty_tenants_one_broken(Engine::Mongodb).await;
}
