//! The HTTP API (`kiln::api::router`, `kiln serve`) against real databases:
//! every endpoint, auth (none / wrong / right), concurrent runs, the error
//! codes, unknown groups, /ready's states, and a database that is down.
//! Requests go over real TCP to a real server, with a minimal HTTP/1.1 client.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use kiln::api::{router, ApiOptions};
use kiln_testkit::{Engine, TestDb};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "s3cret-token-for-tests";

/// users/0001 (table + index + 3 rows), assistants/0002, and 0003 without a group.
fn project(dir: &Path) {
    std::fs::create_dir_all(dir.join("users")).unwrap();
    std::fs::create_dir_all(dir.join("assistants")).unwrap();
    std::fs::write(
        dir.join("users/0001_users.sql"),
        "CREATE TABLE users (id INTEGER PRIMARY KEY, email VARCHAR(200) NOT NULL);\n\
         CREATE INDEX users_email ON users (email);\n\
         INSERT INTO users (id, email) VALUES (1, 'a@x'), (2, 'b@x'), (3, 'c@x');\n",
    )
    .unwrap();
    std::fs::write(dir.join("assistants/0002_assistants.sql"), "CREATE TABLE assistants (id INTEGER PRIMARY KEY, name VARCHAR(50));\n").unwrap();
    std::fs::write(dir.join("0003_calls.sql"), "CREATE TABLE calls (id INTEGER PRIMARY KEY);\n").unwrap();
}

struct Server {
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

async fn start(url: &str, opts: ApiOptions, lock_timeout: Duration) -> Server {
    let dir = tempfile::tempdir().unwrap();
    project(dir.path());
    let kiln = kiln::Kiln::new(url).dir(dir.path()).lock_timeout(lock_timeout);
    let app = router(kiln, opts);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Server { addr, _dir: dir }
}

struct Reply {
    status: u16,
    headers: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    fn code(&self) -> String {
        self.json()["error"]["code"].as_str().unwrap_or_else(|| panic!("no error code in {}", self.body)).to_string()
    }
}

/// One request over a fresh connection (`Connection: close`).
async fn http(addr: SocketAddr, method: &str, path: &str, token: Option<&str>, body: &[u8]) -> Reply {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    // A refused oversized body may close the connection before it is all sent.
    let _ = s.write_all(body).await;
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (headers, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP response: {text:?}"));
    let status = headers.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("bad status line: {headers}"));
    Reply { status, headers: headers.to_string(), body: body.to_string() }
}

fn states(status: &Value) -> Vec<(String, String)> {
    status["migrations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["version"].as_str().unwrap().to_string(), m["state"].as_str().unwrap().to_string()))
        .collect()
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

/// The whole tour on one engine: reads, auth, bad input, a group, a full run.
async fn tour(engine: Engine) {
    let db = TestDb::new(engine).await;
    let srv = start(&db.url, ApiOptions::new(TOKEN), Duration::from_secs(10)).await;
    let a = srv.addr;

    let r = http(a, "GET", "/health", None, b"").await;
    assert_eq!((r.status, r.json()["status"].as_str()), (200, Some("ok")));

    let r = http(a, "GET", "/migrations/status", None, b"").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let st = r.json();
    assert_eq!(states(&st), pairs(&[("0001", "pending"), ("0002", "pending"), ("0003", "pending")]));
    assert_eq!(st["groups"], serde_json::json!(["assistants", "users"]));
    assert_eq!(st["summary"]["pending"], 3);
    assert_eq!(st["objects"], serde_json::json!([]));

    let r = http(a, "GET", "/ready", None, b"").await;
    assert_eq!(r.status, 503, "pending migrations: not ready: {}", r.body);
    assert_eq!(r.json()["pending"].as_array().unwrap().len(), 3);

    // Auth: nothing runs without the right token.
    let r = http(a, "POST", "/migrations/run", None, b"").await;
    assert_eq!((r.status, r.code()), (401, "unauthorized".into()));
    assert!(r.headers.to_ascii_lowercase().contains("www-authenticate: bearer"), "{}", r.headers);
    let r = http(a, "POST", "/migrations/run", Some("wrong"), b"").await;
    assert_eq!((r.status, r.code()), (401, "unauthorized".into()));
    assert!(!r.body.contains(TOKEN));
    let r = http(a, "POST", &format!("/migrations/run?token={TOKEN}"), None, b"").await;
    assert_eq!((r.status, r.code()), (400, "token_in_query".into()));
    let r = http(a, "POST", "/migrations/run/users", Some("wrong"), b"").await;
    assert_eq!(r.status, 401);
    let st = http(a, "GET", "/migrations/status", None, b"").await.json();
    assert_eq!(st["summary"]["pending"], 3, "a refused request ran nothing");

    // Bad input.
    let r = http(a, "POST", "/migrations/run", Some(TOKEN), b"{\"dry_run\": tru").await;
    assert_eq!((r.status, r.code()), (400, "bad_request".into()), "{}", r.body);
    let r = http(a, "POST", "/migrations/run", Some(TOKEN), b"[]").await;
    assert_eq!((r.status, r.code()), (400, "bad_request".into()), "an array is not the body: {}", r.body);
    let r = http(a, "POST", "/migrations/run", Some(TOKEN), b"{\"bogus\": 1}").await;
    assert_eq!((r.status, r.code()), (400, "bad_request".into()), "{}", r.body);
    let huge = vec![b' '; 200 * 1024];
    let r = http(a, "POST", "/migrations/run", Some(TOKEN), &huge).await;
    assert_eq!((r.status, r.code()), (413, "payload_too_large".into()), "{}", r.body);
    let r = http(a, "POST", "/migrations/run/nope", Some(TOKEN), b"").await;
    assert_eq!((r.status, r.code()), (404, "unknown_group".into()));
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("assistants, users"), "the 404 lists the groups: {msg}");
    let r = http(a, "GET", "/nowhere", None, b"").await;
    assert_eq!((r.status, r.code()), (404, "not_found".into()));
    let r = http(a, "DELETE", "/migrations/run", Some(TOKEN), b"").await;
    assert_eq!((r.status, r.code()), (405, "method_not_allowed".into()));

    // `null` is an empty body; a dry run changes nothing.
    let r = http(a, "POST", "/migrations/run/nope", Some(TOKEN), b"null").await;
    assert_eq!((r.status, r.code()), (404, "unknown_group".into()), "a null body is accepted: {}", r.body);
    let r = http(a, "POST", "/migrations/run", Some(TOKEN), b"{\"dry_run\": true}").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!((r.json()["dry_run"].as_bool(), r.json()["steps"].as_array().unwrap().len()), (Some(true), 3));

    // One group.
    let r = http(a, "POST", "/migrations/run/users", Some(TOKEN), b"").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let steps: Vec<String> = r.json()["steps"].as_array().unwrap().iter().map(|s| s["version"].as_str().unwrap().to_string()).collect();
    assert_eq!(steps, ["0001"]);
    let st = http(a, "GET", "/migrations/status", None, b"").await.json();
    assert_eq!(states(&st), pairs(&[("0001", "applied"), ("0002", "pending"), ("0003", "pending")]));
    let users = st["objects"].as_array().unwrap().iter().find(|o| o["name"] == "users").expect("users table listed").clone();
    assert_eq!((users["exists"].as_bool(), users["rows"].as_u64(), users["exact"].as_bool()), (Some(true), Some(3), Some(true)), "{users}");
    let idx: Vec<&str> = users["indexes"].as_array().unwrap().iter().map(|i| i.as_str().unwrap()).collect();
    assert!(idx.contains(&"users_email"), "{users}");
    assert_eq!(users["index_count"].as_u64(), Some(idx.len() as u64));
    assert!(st["migrations"][0]["applied_at"].is_string() && st["migrations"][0]["checksum"].is_string(), "{}", st["migrations"][0]);

    // Everything else; then nothing is left and /ready says so.
    let r = http(a, "POST", "/migrations/run", Some(TOKEN), b"{}").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["steps"].as_array().unwrap().len(), 2);
    let r = http(a, "POST", "/migrations/run", Some(TOKEN), b"").await;
    assert_eq!((r.status, r.json()["steps"].as_array().unwrap().len()), (200, 0));
    let r = http(a, "GET", "/ready", None, b"").await;
    assert_eq!(r.status, 200, "{}", r.body);

    // The dashboard and the document.
    let r = http(a, "GET", "/", None, b"").await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("<table id=\"migrations\"") && !r.body.contains("http://") && !r.body.contains("https://"), "self-contained page");
    let doc = http(a, "GET", "/openapi.json", None, b"").await.json();
    for p in ["/migrations/status", "/migrations/run", "/migrations/run/{group}", "/health", "/ready", "/openapi.json", "/"] {
        assert!(doc["paths"][p].is_object(), "{p} missing from the OpenAPI document");
    }
    assert!(doc["components"]["schemas"]["StatusRow"].is_object() && doc["components"]["schemas"]["ErrorReport"].is_object());
}

#[tokio::test]
async fn sqlite_every_endpoint() {
    tour(Engine::Sqlite).await;
}

#[tokio::test]
async fn postgres_every_endpoint() {
    tour(Engine::Postgres).await;
}

#[tokio::test]
async fn mysql_every_endpoint() {
    tour(Engine::Mysql).await;
}

#[tokio::test]
async fn reads_can_be_protected() {
    let db = TestDb::new(Engine::Sqlite).await;
    let srv = start(&db.url, ApiOptions::new(TOKEN).protect_reads(true), Duration::from_secs(5)).await;
    for p in ["/migrations/status", "/ready", "/openapi.json"] {
        let r = http(srv.addr, "GET", p, None, b"").await;
        assert_eq!((r.status, r.code()), (401, "unauthorized".into()), "{p}");
    }
    assert_eq!(http(srv.addr, "GET", "/migrations/status", Some(TOKEN), b"").await.status, 200);
    // Liveness and the page itself stay open (the page asks for the token).
    assert_eq!(http(srv.addr, "GET", "/health", None, b"").await.status, 200);
    assert_eq!(http(srv.addr, "GET", "/", None, b"").await.status, 200);
}

#[tokio::test]
async fn without_a_token_nothing_can_run() {
    let db = TestDb::new(Engine::Sqlite).await;
    let srv = start(&db.url, ApiOptions::new(""), Duration::from_secs(5)).await;
    for t in [None, Some(""), Some("anything")] {
        let r = http(srv.addr, "POST", "/migrations/run", t, b"").await;
        assert_eq!((r.status, r.code()), (401, "unauthorized".into()));
    }
    assert_eq!(http(srv.addr, "GET", "/migrations/status", None, b"").await.json()["summary"]["pending"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_runs_apply_each_migration_once() {
    let db = TestDb::new(Engine::Postgres).await;
    let srv = start(&db.url, ApiOptions::new(TOKEN), Duration::from_secs(60)).await;
    let calls = (0..8).map(|_| tokio::spawn(http(srv.addr, "POST", "/migrations/run", Some(TOKEN), b"")));
    let mut applied = Vec::new();
    for c in calls {
        let r = c.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        applied.extend(r.json()["steps"].as_array().unwrap().iter().map(|s| s["version"].as_str().unwrap().to_string()));
    }
    applied.sort();
    assert_eq!(applied, ["0001", "0002", "0003"], "each migration reported by exactly one call");
    let history = db.query_strings("SELECT version::text FROM kiln_history ORDER BY version").await.unwrap();
    assert_eq!(history.len(), 3, "{history:?}");
    let users = db.query_strings("SELECT count(*)::text FROM users").await.unwrap();
    assert_eq!(users, ["3"], "0001's inserts ran once");
}

#[tokio::test]
async fn a_held_lock_is_a_409_naming_the_holder() {
    let db = TestDb::new(Engine::Postgres).await;
    let mut holder = kiln::connect(&kiln::BackendConfig::new(db.url.clone())).await.unwrap();
    assert!(holder.try_lock().await.unwrap());
    let srv = start(&db.url, ApiOptions::new(TOKEN), Duration::from_millis(700)).await;
    let r = http(srv.addr, "POST", "/migrations/run", Some(TOKEN), b"").await;
    assert_eq!((r.status, r.code()), (409, "lock_timeout".into()), "{}", r.body);
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("kiln "), "names the holder (its application_name): {msg}");
    holder.unlock().await.unwrap();
    let r = http(srv.addr, "POST", "/migrations/run", Some(TOKEN), b"").await;
    assert_eq!((r.status, r.json()["steps"].as_array().unwrap().len()), (200, 3));
}

#[tokio::test]
async fn database_down_is_503_and_health_still_answers() {
    // Nothing listens on port 1; the password must never come back.
    let srv = start("postgres://app:hunter2@127.0.0.1:1/app", ApiOptions::new(TOKEN), Duration::from_secs(2)).await;
    let r = http(srv.addr, "GET", "/health", None, b"").await;
    assert_eq!(r.status, 200);
    for (method, path, token) in [("GET", "/migrations/status", None), ("GET", "/ready", None), ("POST", "/migrations/run", Some(TOKEN))] {
        let r = http(srv.addr, method, path, token, b"").await;
        assert_eq!((r.status, r.code()), (503, "connect_failed".into()), "{path}: {}", r.body);
        assert!(r.body.contains("database is down"), "{}", r.body);
        assert!(!r.body.contains("hunter2"), "password leaked: {}", r.body);
    }
}

#[tokio::test]
async fn mongodb_status_lists_collections() {
    let db = TestDb::new(Engine::Mongodb).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("users")).unwrap();
    std::fs::write(
        dir.path().join("users/0001_users.json"),
        r#"{"up": [{"create": "users"}, {"createIndexes": "users", "indexes": [{"key": {"email": 1}, "name": "email_1", "unique": true}]}, {"insert": "users", "documents": [{"email": "a"}, {"email": "b"}]}]}"#,
    )
    .unwrap();
    let app = router(kiln::Kiln::new(&db.url).dir(dir.path()), ApiOptions::new(TOKEN));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let r = http(addr, "POST", "/migrations/run/users", Some(TOKEN), b"").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let st = http(addr, "GET", "/migrations/status", None, b"").await.json();
    assert_eq!(st["engine"], "mongodb");
    let users = st["objects"].as_array().unwrap().iter().find(|o| o["name"] == "users").expect("users listed").clone();
    assert_eq!((users["rows"].as_u64(), users["exact"].as_bool(), users["index_count"].as_u64()), (Some(2), Some(true), Some(2)), "{users}");
    assert_eq!(http(addr, "GET", "/ready", None, b"").await.status, 200);
}

#[test]
fn kiln_serve_needs_a_token_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    project(&dir.path().join("migrations"));
    let url = format!("sqlite://{}", dir.path().join("app.db").display());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["serve", "--listen", "127.0.0.1:0", "--url", &url])
        .current_dir(dir.path())
        .env_remove("KILN_API_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "no token: usage error");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("KILN_API_TOKEN") && err.contains("--token-file"), "{err}");

    // A free port, then the binary on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    std::fs::write(dir.path().join("token"), format!("{TOKEN}\n")).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--url", &url, "--token-file", "token"])
        .current_dir(dir.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let ready = rt.block_on(async {
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    });
    assert!(ready, "kiln serve did not listen");
    let r = rt.block_on(http(addr, "POST", "/migrations/run", Some(TOKEN), b""));
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["steps"].as_array().unwrap().len(), 3);
}

/// The migrations are cached between status reads, but a file added after the
/// server started shows up (within the re-check interval), and so does an
/// edited one (its checksum changes: a changed applied migration).
#[tokio::test]
async fn status_sees_a_migration_file_added_after_the_server_started() {
    let db = TestDb::new(Engine::Sqlite).await;
    let srv = start(&db.url, ApiOptions::new(TOKEN), Duration::from_secs(10)).await;
    let st = http(srv.addr, "GET", "/migrations/status", None, b"").await.json();
    assert_eq!(st["summary"]["pending"], 3);
    let r = http(srv.addr, "POST", "/migrations/run", Some(TOKEN), b"").await;
    assert_eq!(r.status, 200, "{}", r.body);

    std::fs::write(srv._dir.path().join("0004_later.sql"), "CREATE TABLE later (id INTEGER PRIMARY KEY);\n").unwrap();
    let t0 = std::time::Instant::now();
    let seen = loop {
        let st = http(srv.addr, "GET", "/migrations/status", None, b"").await.json();
        if states(&st).len() == 4 || t0.elapsed() > Duration::from_secs(10) {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(states(&seen), pairs(&[("0001", "applied"), ("0002", "applied"), ("0003", "applied"), ("0004", "pending")]));
    assert_eq!(seen["summary"]["pending"], 1);
    assert!(t0.elapsed() < kiln::api::RECHECK_INTERVAL + Duration::from_secs(3), "took {:?}", t0.elapsed());

    // Applied through the API, the new file's table is listed too.
    let r = http(srv.addr, "POST", "/migrations/run", Some(TOKEN), b"").await;
    assert_eq!((r.status, r.json()["steps"].as_array().unwrap().len()), (200, 1), "{}", r.body);
    let st = http(srv.addr, "GET", "/migrations/status", None, b"").await.json();
    assert_eq!(st["summary"]["applied"], 4);
    assert!(st["objects"].as_array().unwrap().iter().any(|o| o["name"] == "later"), "{}", st["objects"]);

    // A removed file is noticed as well (the history still has it).
    std::fs::remove_file(srv._dir.path().join("0004_later.sql")).unwrap();
    let t0 = std::time::Instant::now();
    loop {
        let st = http(srv.addr, "GET", "/migrations/status", None, b"").await.json();
        let row = st["migrations"].as_array().unwrap().iter().find(|m| m["version"] == "0004").cloned().expect("still in the history");
        if row["state"] != "applied" {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "the removed file was not noticed: {row}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The status reads reuse one connection; when the database ends it (a
/// restart, `pg_terminate_backend`), the next read connects again and answers.
#[tokio::test]
async fn status_reconnects_after_the_database_dropped_its_connection() {
    let db = TestDb::new(Engine::Postgres).await;
    let srv = start(&db.url, ApiOptions::new(TOKEN), Duration::from_secs(10)).await;
    let r = http(srv.addr, "POST", "/migrations/run", Some(TOKEN), b"").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let kiln_sessions = || async {
        db.query_strings(
            "SELECT pid::text FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name LIKE 'kiln %'",
        )
        .await
        .unwrap()
    };

    let first = http(srv.addr, "GET", "/migrations/status", None, b"").await;
    assert_eq!(first.status, 200, "{}", first.body);
    let pids = kiln_sessions().await;
    assert_eq!(pids.len(), 1, "one kept session: {pids:?}");
    let again = http(srv.addr, "GET", "/migrations/status", None, b"").await;
    assert_eq!(again.json(), first.json());
    assert_eq!(kiln_sessions().await, pids, "the same connection is reused");

    // The server ends the session, as a restart would.
    db.sql(&format!("SELECT pg_terminate_backend({})", pids[0])).await.unwrap();
    for _ in 0..100 {
        if kiln_sessions().await.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = http(srv.addr, "GET", "/migrations/status", None, b"").await;
    assert_eq!(after.status, 200, "reconnected: {}", after.body);
    assert_eq!(after.json(), first.json());
    let new_pids = kiln_sessions().await;
    assert_eq!(new_pids.len(), 1, "{new_pids:?}");
    assert_ne!(new_pids, pids, "a new connection");
}

/// Zero-downtime jobs through the API: `GET /jobs` shows the queued backfill
/// and the status row carries its progress; `POST /jobs/{id}/pause` needs the
/// token, then pauses it; an unknown action is a 404 naming the actions.
#[tokio::test]
async fn jobs_are_listed_and_controlled() {
    let db = TestDb::new(Engine::Sqlite).await;
    let s = start(&db.url, ApiOptions::new(TOKEN), Duration::from_secs(5)).await;
    std::fs::write(
        s._dir.path().join("0004_backfill.sql"),
        "-- kiln:expand\nALTER TABLE users ADD COLUMN handle VARCHAR(200);\n\
         -- kiln:backfill table=users key=id batch=2\nUPDATE users SET handle = email WHERE id BETWEEN :lo AND :hi AND handle IS NULL;\n\
         -- kiln:rollback\nALTER TABLE users DROP COLUMN handle;\n",
    )
    .unwrap();
    let run = http(s.addr, "POST", "/migrations/run", Some(TOKEN), b"").await;
    assert_eq!(run.status, 200, "{}", run.body);
    let jobs = http(s.addr, "GET", "/jobs", None, b"").await;
    assert_eq!(jobs.status, 200, "{}", jobs.body);
    let j = &jobs.json()["jobs"][0];
    assert_eq!((j["version"].as_str(), j["state"].as_str(), j["rows_total"].as_i64()), (Some("0004"), Some("queued"), Some(3)), "{j}");
    let status = http(s.addr, "GET", "/migrations/status", None, b"").await.json();
    let row = status["migrations"].as_array().unwrap().iter().find(|m| m["version"] == "0004").unwrap().clone();
    assert_eq!((row["state"].as_str(), row["job"]["rows_total"].as_i64()), (Some("expanded"), Some(3)), "{row}");
    let denied = http(s.addr, "POST", "/jobs/0004/pause", None, b"").await;
    assert_eq!(denied.status, 401, "{}", denied.body);
    let paused = http(s.addr, "POST", "/jobs/0004/pause", Some(TOKEN), b"").await;
    assert_eq!((paused.status, paused.json()["state"].as_str()), (200, Some("paused")), "{}", paused.body);
    let again = http(s.addr, "POST", "/jobs/0004/pause", Some(TOKEN), b"").await;
    assert_eq!(again.status, 409, "pausing a paused job changes nothing: {}", again.body);
    let unknown = http(s.addr, "POST", "/jobs/0004/explode", Some(TOKEN), b"").await;
    assert_eq!((unknown.status, unknown.code()), (404, "unknown_action".to_string()), "{}", unknown.body);
}

/// A `[tenants]` fleet over HTTP: `GET /tenants` lists every database,
/// `POST /tenants/run` migrates the public one then the tenants (token
/// required), one broken tenant fails alone; without a fleet both are 404.
#[tokio::test]
async fn tenants_are_listed_and_run() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("migrations");
    std::fs::create_dir_all(m.join("tenant")).unwrap();
    std::fs::create_dir_all(dir.path().join("tenants")).unwrap();
    std::fs::write(m.join("0001_public.sql"), "CREATE TABLE p (id INT);\n").unwrap();
    std::fs::write(m.join("tenant/0002_users.sql"), "CREATE TABLE users (id INT);\n").unwrap();
    std::fs::write(
        dir.path().join("kiln.toml"),
        "url = \"sqlite://app.db\"\n[tenants]\nlist = [\"acme\", \"globex\", \"broken\"]\nurl = \"sqlite://tenants/{tenant}.db\"\n",
    )
    .unwrap();
    rusqlite::Connection::open(dir.path().join("tenants/broken.db")).unwrap().execute_batch("CREATE TABLE users (id INT);").unwrap();
    let cfg = kiln::config::Config::load(&kiln::config::Overrides { config: Some(dir.path().join("kiln.toml")), ..Default::default() }).unwrap();
    let app = router(kiln::Kiln::from_config(&cfg), ApiOptions::new(TOKEN).tenants(cfg.tenants.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let before = http(addr, "GET", "/tenants", None, b"").await;
    assert_eq!(before.status, 200, "{}", before.body);
    let pending: Vec<u64> = before.json()["targets"].as_array().unwrap().iter().map(|t| t["pending"].as_u64().unwrap()).collect();
    assert_eq!(pending, [1, 1, 1, 1], "public and three tenants, one pending each: {}", before.body);
    assert_eq!(http(addr, "POST", "/tenants/run", None, b"").await.status, 401);
    let unknown = http(addr, "POST", "/tenants/run", Some(TOKEN), br#"{"tenants": ["nope"]}"#).await;
    assert_eq!((unknown.status, unknown.code()), (400, "unknown_tenant".to_string()), "{}", unknown.body);
    let run = http(addr, "POST", "/tenants/run", Some(TOKEN), b"{}").await;
    assert_eq!(run.status, 200, "{}", run.body);
    let outcome: Vec<(String, String)> = run.json()["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["target"]["name"].as_str().unwrap_or("public").to_string(), t["status"].as_str().unwrap().to_string()))
        .collect();
    assert!(outcome.contains(&("broken".into(), "failed".into())), "{outcome:?}");
    assert_eq!(outcome.iter().filter(|(_, s)| s == "done").count(), 3, "{outcome:?}");
    let after = http(addr, "GET", "/tenants", None, b"").await;
    let applied: Vec<u64> = after.json()["targets"].as_array().unwrap().iter().map(|t| t["applied"].as_u64().unwrap()).collect();
    assert_eq!(applied.iter().sum::<u64>(), 3, "{}", after.body);

    let single = start(&format!("sqlite://{}", dir.path().join("other.db").display()), ApiOptions::new(TOKEN), Duration::from_secs(5)).await;
    let none = http(single.addr, "GET", "/tenants", None, b"").await;
    assert_eq!((none.status, none.code()), (404, "no_fleet".to_string()));
}
