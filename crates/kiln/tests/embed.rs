//! Migrations embedded in the program (`kiln::embed_migrations!`): the same
//! migrations and checksums as the directory on disk, applied at start-up by
//! many instances at once, each migration exactly once.

use kiln_testkit::{Engine, TestDb};

static SQL: kiln::Embedded = kiln::embed_migrations!("tests/fixtures/embed_sql");
static SQL_PG: kiln::Embedded = kiln::embed_migrations!("tests/fixtures/embed_sql", dialect = "postgres");
static MONGO: kiln::Embedded = kiln::embed_migrations!("tests/fixtures/embed_mongo");

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

#[test]
fn embedded_migrations_equal_the_directory_on_disk() {
    for (set, dir, url) in [
        (SQL, "embed_sql", "postgres://x@localhost/db"),
        (SQL_PG, "embed_sql", "postgres://x@localhost/db"),
        (SQL, "embed_sql", "mysql://x@localhost/db"),
        (SQL, "embed_sql", "sqlite://x.db"),
        (MONGO, "embed_mongo", "mongodb://localhost/db"),
    ] {
        let from_disk = kiln::Kiln::new(url).dir(fixture(dir)).load().unwrap();
        let embedded = kiln::Kiln::new(url).embedded(set).load().unwrap();
        assert!(!from_disk.is_empty());
        assert_eq!(serde_json::to_value(&from_disk).unwrap(), serde_json::to_value(&embedded).unwrap(), "{dir} on {url}");
        let sums = |ms: &[kiln::Migration]| ms.iter().map(|m| (m.name(), m.checksum.0.clone(), m.path.clone())).collect::<Vec<_>>();
        assert_eq!(sums(&from_disk), sums(&embedded));
    }
    assert_eq!(SQL.dir, "tests/fixtures/embed_sql");
    assert_eq!(SQL.files.len(), 25, "24 migrations, one of them an up/down pair");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_instances_apply_an_embedded_set_each_migration_once() {
    let db = TestDb::new(Engine::Postgres).await;
    let runs = (0..8).map(|_| {
        let url = db.url.clone();
        tokio::spawn(async move { kiln::Kiln::new(url).embedded(SQL).up_at_startup(kiln::StartupPolicy::Refuse).await })
    });
    let mut applied = Vec::new();
    for r in futures::future::join_all(runs).await {
        applied.extend(r.unwrap().unwrap().expect("a report").steps.into_iter().map(|s| s.version.parse::<u64>().unwrap()));
    }
    applied.sort();
    assert_eq!(applied, (1..=24).collect::<Vec<u64>>(), "every migration exactly once across the 8 instances");
    // One history row per migration, each with the checksum of the file on disk.
    let rows = db.query_strings("SELECT version || ' ' || checksum FROM kiln_history ORDER BY version").await.unwrap();
    let on_disk = kiln::Kiln::new(&db.url).dir(fixture("embed_sql")).load().unwrap();
    assert_eq!(rows, on_disk.iter().map(|m| format!("{} {}", m.version.number, m.checksum)).collect::<Vec<_>>());
    assert_eq!(db.objects("schedules").await.unwrap(), ["schedules"]);
    // The directory on disk and the embedded set are interchangeable: the
    // CLI's view of the same database sees nothing pending and nothing changed.
    let gate = kiln::Kiln::new(&db.url).dir(fixture("embed_sql")).check().await.unwrap();
    assert!(gate.ok, "{gate:?}");
    let gate = kiln::Kiln::new(&db.url).embedded(SQL).check().await.unwrap();
    assert!(gate.ok, "{gate:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_embedded_mongodb_set_applies_and_matches_the_directory() {
    let db = TestDb::new(Engine::Mongodb).await;
    let report = kiln::Kiln::new(&db.url).embedded(MONGO).up().await.unwrap();
    assert_eq!(report.steps.len(), 2);
    assert_eq!(kiln_testkit::mongo::index_names(&db.url, "users").await, ["_id_", "email_1"]);
    let gate = kiln::Kiln::new(&db.url).dir(fixture("embed_mongo")).check().await.unwrap();
    assert!(gate.ok, "{gate:?}");
}

#[tokio::test]
async fn a_group_whose_dependencies_are_pending_is_refused_with_the_list() {
    let db = TestDb::new(Engine::Postgres).await;
    let group = |g: &str| kiln::Kiln::new(&db.url).embedded(SQL).group(g);
    let err = group("schedules").up().await.expect_err("users, assistants and clients are pending");
    let kiln::Error::Run(kiln::RunError::Plan(problems)) = &err else { panic!("{err:?}") };
    let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(problems.len(), 3, "{text:#?}");
    for g in ["users", "assistants", "clients"] {
        assert!(text.iter().any(|t| t.contains(&format!("`kiln up --group {g}`"))), "{g}: {text:#?}");
    }
    assert!(problems.iter().all(|p| p.code() == "unmet_dependency"));
    assert_eq!(err.code(), "plan_refused");
    assert!(db.objects("schedules").await.unwrap().is_empty(), "nothing ran");
    for g in ["users", "assistants", "clients"] {
        group(g).up().await.unwrap();
    }
    let r = group("schedules").up().await.unwrap();
    assert_eq!(r.steps.iter().map(|s| s.version.as_str()).collect::<Vec<_>>(), ["0005"]);
    // calls depends on schedules, now applied.
    assert_eq!(group("calls").up().await.unwrap().steps.len(), 2);
}

/// 1,000 migrations as `embed_migrations!` would embed them (a static slice of
/// files; built here at run time so the repository does not carry 1,000 files).
fn thousand() -> kiln::Embedded {
    let files: Vec<kiln::EmbeddedFile> = (1..=1000)
        .map(|n| kiln::EmbeddedFile {
            path: Box::leak(format!("g{}/{n:04}_table_{n}.sql", n % 50).into_boxed_str()),
            bytes: Box::leak(
                format!("-- kiln:up\nCREATE TABLE t_{n} (id BIGINT PRIMARY KEY, name TEXT);\n-- kiln:down\nDROP TABLE t_{n};\n")
                    .into_bytes()
                    .into_boxed_slice(),
            ),
        })
        .collect();
    kiln::Embedded::new("thousand", Box::leak(files.into_boxed_slice()))
}

/// The start-up figure of docs/benchmarks.md: `up` with 1,000 embedded
/// migrations and nothing pending — its time (direct connection) and its
/// round trips (through a counting proxy). Prints the figures
/// (`cargo test -p kiln --test embed startup -- --nocapture`, or bench/embed-startup.sh).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_with_nothing_pending_reads_the_history_once() {
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};
    let set = thousand();
    let db = TestDb::new(Engine::Postgres).await;
    let report = kiln::Kiln::new(&db.url).embedded(set).up().await.unwrap();
    assert_eq!(report.steps.len(), 1000);

    // Loading alone (parse + checksum from memory).
    let opts = kiln::load_options(&db.url, None);
    let mut load = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        assert_eq!(kiln::load_embedded(&set, &opts).unwrap().len(), 1000);
        load.push(t.elapsed());
    }
    // The whole start-up call, connection included.
    let mut up = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let r = kiln::Kiln::new(&db.url).embedded(set).up_at_startup(kiln::StartupPolicy::Refuse).await.unwrap().unwrap();
        up.push(t.elapsed());
        assert!(r.steps.is_empty());
    }
    // A bare connection, for comparison: what the start-up costs beyond it.
    let mut connect = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let b = kiln::connect(&kiln::BackendConfig::new(&db.url)).await.unwrap();
        let _ = b.close().await;
        connect.push(t.elapsed());
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (load, up, connect) = (median(&mut load), median(&mut up), median(&mut connect));

    // Round trips, through a proxy that counts the client's turns.
    let u = url::Url::parse(&db.url).unwrap();
    let server = tokio::net::lookup_host((u.host_str().unwrap(), u.port().unwrap_or(5432))).await.unwrap().next().unwrap();
    let (proxy, turns) = kiln_testkit::proxy::latency_proxy(server, Duration::from_millis(20)).await;
    let via = format!("postgres://{}@{}{}?sslmode=disable", u.username(), proxy, u.path());
    // A loaded machine can split a message into two turns: the fewest turns
    // over a few tries is the protocol's count.
    let (mut connecting, mut total) = (usize::MAX, usize::MAX);
    for _ in 0..5 {
        let from = turns.load(Ordering::SeqCst);
        let b = kiln::connect(&kiln::BackendConfig::new(&via)).await.unwrap();
        let _ = b.close().await;
        connecting = connecting.min(turns.load(Ordering::SeqCst) - from);
        let from = turns.load(Ordering::SeqCst);
        kiln::Kiln::new(&via).embedded(set).up().await.unwrap();
        total = total.min(turns.load(Ordering::SeqCst) - from);
    }
    println!(
        "embedded start-up, 1,000 migrations, nothing pending (PostgreSQL): load from memory {load:?}, up() {up:?} \
         (a bare connect+close {connect:?}); round trips: {total} in all, {connecting} of them connecting"
    );
    // The turn count of a connection varies by one with timing; the locked
    // path (lock, read, unlock) would add three.
    assert!(total <= connecting + 1, "nothing pending costs one round trip beyond the connection: {total} in all, {connecting} connecting");
}
