//! The MongoDB test server: `KILN_TEST_MONGODB_URL` when set (a real `mongod`,
//! e.g. `mongodb://127.0.0.1:27017/?directConnection=true`), otherwise a
//! SecantusDB server (a MongoDB-compatible server from PyPI, pinned in
//! `scripts/install-mongo-test-server.sh`) started once per test process.
//!
//! The harness installs SecantusDB into `<repo>/.venv-test` itself (the script
//! is a quick no-op once installed; concurrent test binaries are serialised by
//! a file lock), or uses `KILN_SECANTUSD=/path/to/secantusd-py`. The server
//! runs in memory on a free port under a small shell watchdog that stops it
//! when the test process is gone, so it never outlives the tests. When it
//! cannot be started the test panics with the reason: tests never skip.
//!
//! Every test works in its own database ([`crate::TestDb`]), and must create
//! its own [`mongodb::Client`] ([`client`]): a client belongs to the tokio
//! runtime that created it, and every `#[tokio::test]` has its own runtime.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use mongodb::bson::{doc, Document};

/// The SecantusDB version the harness installs (keep in step with the script).
pub const SECANTUSDB_PIN: &str = "secantusdb==0.7.0b3";

static REPLICA_SET: OnceLock<Result<String, String>> = OnceLock::new();
static STANDALONE: OnceLock<Result<String, String>> = OnceLock::new();

/// URL of the MongoDB test server (without a database).
///
/// # Panics
/// When SecantusDB cannot be installed or started, with the reason and its log.
pub async fn server_url() -> String {
    if let Some(url) = env_url("KILN_TEST_MONGODB_URL") {
        return url;
    }
    started(&REPLICA_SET, false)
}

/// URL of a *standalone* server (no replica set: no transactions), for tests of
/// what kiln does without transaction support: `KILN_TEST_MONGODB_STANDALONE_URL`
/// when set, else a SecantusDB server started with `--standalone`.
///
/// # Panics
/// As [`server_url`].
pub async fn standalone_server_url() -> String {
    if let Some(url) = env_url("KILN_TEST_MONGODB_STANDALONE_URL") {
        return url;
    }
    started(&STANDALONE, true)
}

fn env_url(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|u| !u.trim().is_empty())
}

fn started(cell: &'static OnceLock<Result<String, String>>, standalone: bool) -> String {
    // Start on a thread of its own: the readiness probe runs its own tokio
    // runtime, which cannot be nested in the test's.
    let r = cell
        .get_or_init(|| std::thread::spawn(move || start(standalone)).join().unwrap_or_else(|_| Err("the server start-up thread panicked".into())));
    match r {
        Ok(url) => url.clone(),
        Err(e) => panic!("MongoDB test server: {e}"),
    }
}

/// `base` with the database `db`.
pub fn with_db(base: &str, db: &str) -> String {
    let mut u = url::Url::parse(base).expect("valid MongoDB URL");
    u.set_path(&format!("/{db}"));
    u.to_string()
}

/// Drop a test database.
pub async fn drop_db(base: &str, name: &str) {
    if let Ok(c) = mongodb::Client::with_uri_str(base).await {
        let _ = c.database(name).drop().await;
    }
}

/// A client for `url` (created in the calling test's runtime).
///
/// # Panics
/// When the URL is invalid.
pub async fn client(url: &str) -> mongodb::Client {
    mongodb::Client::with_uri_str(url).await.unwrap_or_else(|e| panic!("MongoDB client for {url}: {e}"))
}

/// The database `url` names, through a fresh client.
///
/// # Panics
/// When the URL is invalid or names no database.
pub async fn database(url: &str) -> mongodb::Database {
    client(url).await.default_database().unwrap_or_else(|| panic!("{url} names no database"))
}

/// Names of the collections of the database `url` names, sorted.
pub async fn collection_names(url: &str) -> Vec<String> {
    let mut names = database(url).await.list_collection_names().await.expect("listCollections");
    names.sort();
    names
}

/// The index specs (`listIndexes`) of a collection; empty when it does not exist.
pub async fn indexes(url: &str, collection: &str) -> Vec<Document> {
    use futures::TryStreamExt as _;
    let db = database(url).await;
    match db.run_cursor_command(doc! { "listIndexes": collection }).await {
        Ok(c) => c.try_collect().await.expect("listIndexes"),
        Err(e) if matches!(&*e.kind, mongodb::error::ErrorKind::Command(c) if c.code == 26) => vec![],
        Err(e) => panic!("listIndexes {collection}: {e}"),
    }
}

/// Names of the indexes of a collection, in the server's order.
pub async fn index_names(url: &str, collection: &str) -> Vec<String> {
    indexes(url, collection).await.iter().filter_map(|d| d.get_str("name").ok().map(str::to_string)).collect()
}

/// All documents of a collection, in `_id` order.
pub async fn documents(url: &str, collection: &str) -> Vec<Document> {
    use futures::TryStreamExt as _;
    let db = database(url).await;
    db.collection::<Document>(collection).find(doc! {}).sort(doc! { "_id": 1 }).await.expect("find").try_collect().await.expect("find")
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repository root")
}

/// The `secantusd-py` to run: `KILN_SECANTUSD`, or the pinned one installed
/// (if needed) into `<repo>/.venv-test`.
fn secantusd() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("KILN_SECANTUSD") {
        let p = PathBuf::from(p);
        return if p.is_file() { Ok(p) } else { Err(format!("KILN_SECANTUSD={} does not exist", p.display())) };
    }
    let root = repo_root();
    let script = root.join("scripts/install-mongo-test-server.sh");
    // One installer at a time across test binaries running in parallel.
    let lock_path = std::env::temp_dir().join(format!("kiln-venv-test-{:x}.lock", fnv(root.to_string_lossy().as_bytes())));
    let lock =
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(|e| format!("{}: {e}", lock_path.display()))?;
    lock.lock().map_err(|e| format!("locking {}: {e}", lock_path.display()))?;
    let out = Command::new("bash").arg(&script).stdin(Stdio::null()).output().map_err(|e| format!("running {}: {e}", script.display()))?;
    drop(lock);
    if !out.status.success() {
        return Err(format!(
            "{} failed ({}): {}{}\nInstall Python 3 with venv and network access to PyPI, or set KILN_TEST_MONGODB_URL to a running mongod",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let bin = root.join(".venv-test/bin/secantusd-py");
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!("{} ran but {} is missing", script.display(), bin.display()))
    }
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100000001b3))
}

/// Runs the server and stops it when the test process ($3) is gone or the
/// watchdog itself is told to stop. Arguments are passed, never spliced in.
const WATCHDOG: &str = r#"
"$1" --host 127.0.0.1 --port "$2" --storage-path :memory: $4 &
srv=$!
trap 'kill "$srv" 2>/dev/null; exit 0' TERM INT HUP
while kill -0 "$3" 2>/dev/null && kill -0 "$srv" 2>/dev/null; do sleep 1; done
kill "$srv" 2>/dev/null
sleep 3
kill -9 "$srv" 2>/dev/null
exit 0
"#;

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("finding a free port: {e}"))?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

fn start(standalone: bool) -> Result<String, String> {
    let bin = secantusd()?;
    let mut last = String::new();
    // A port found free can be taken before the server binds it: try a few.
    for _ in 0..3 {
        let port = free_port()?;
        let log = tempfile::Builder::new().prefix("kiln-secantusd-").suffix(".log").tempfile().map_err(|e| e.to_string())?;
        let (log_file, log_path) = log.keep().map_err(|e| e.to_string())?;
        let err_file = log_file.try_clone().map_err(|e| e.to_string())?;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("kiln-secantusd-watchdog")
            .arg(&bin)
            .arg(port.to_string())
            .arg(std::process::id().to_string())
            .arg(if standalone { "--standalone" } else { "" })
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(err_file)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        let url = format!("mongodb://127.0.0.1:{port}/?directConnection=true");
        let deadline = Instant::now() + Duration::from_secs(60);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        let ready = rt.block_on(async {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return false;
                }
                if ping(&url).await {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            false
        });
        if ready {
            let _ = std::fs::remove_file(&log_path);
            return Ok(url);
        }
        let _ = child.kill();
        let _ = child.wait();
        let mut text = String::new();
        let _ = std::fs::File::open(&log_path).and_then(|mut f| f.read_to_string(&mut text));
        let tail: Vec<&str> = text.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect();
        last = format!("{} did not answer ping on port {port} within 60 s; its log ({}):\n{}", bin.display(), log_path.display(), tail.join("\n"));
    }
    Err(last)
}

async fn ping(url: &str) -> bool {
    let Ok(mut opts) = mongodb::options::ClientOptions::parse(url).await else { return false };
    opts.server_selection_timeout = Some(Duration::from_millis(500));
    opts.connect_timeout = Some(Duration::from_millis(500));
    let Ok(c) = mongodb::Client::with_options(opts) else { return false };
    c.database("admin").run_command(doc! { "ping": 1 }).await.is_ok()
}
