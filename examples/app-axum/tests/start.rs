//! The example service starts against fresh databases: four instances at once
//! migrate both databases (each migration exactly once), and the mounted kiln
//! API reports everything applied.

use kiln_testkit::{Engine, TestDb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, serde_json::Value) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let status = buf[9..12].parse().unwrap();
    let body = buf.split("\r\n\r\n").nth(1).unwrap_or_default();
    (status, serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {buf}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_instances_start_and_the_api_shows_every_migration_applied() {
    let pg = TestDb::new(Engine::Postgres).await;
    let mongo = TestDb::new(Engine::Mongodb).await;
    let settings = app_axum::Settings {
        postgres_url: pg.url.clone(),
        mongodb_url: mongo.url.clone(),
        api_token: "t".into(),
        policy: kiln::StartupPolicy::Refuse,
    };
    let starts = (0..4).map(|_| {
        let s = settings.clone();
        tokio::spawn(async move { app_axum::start(&s).await })
    });
    let mut routers = Vec::new();
    for r in futures::future::join_all(starts).await {
        routers.push(r.unwrap().expect("the instance starts"));
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = routers.pop().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    for db in ["postgres", "mongodb"] {
        let (status, body) = get(addr, &format!("/kiln/{db}/migrations/status")).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["summary"]["applied"], 6, "{db}: {body}");
        assert_eq!(body["summary"]["pending"], 0, "{db}: {body}");
        let groups: Vec<&str> = body["groups"].as_array().unwrap().iter().map(|g| g.as_str().unwrap()).collect();
        assert_eq!(groups, ["assistants", "calls", "clients", "schedules", "users"], "{db}");
        let (status, _) = get(addr, &format!("/kiln/{db}/ready")).await;
        assert_eq!(status, 200, "{db} is ready");
    }
    // Each migration ran once: one history row per version.
    let rows = pg.query_strings("SELECT version::text FROM kiln_history ORDER BY version").await.unwrap();
    assert_eq!(rows, ["1", "2", "3", "4", "5", "6"]);
    assert_eq!(
        pg.query_strings("SELECT column_name::text FROM information_schema.columns WHERE table_name = 'users' AND column_name = 'display_name'")
            .await
            .unwrap(),
        ["display_name"]
    );
    let idx = kiln_testkit::mongo::index_names(&mongo.url, "schedules").await;
    assert_eq!(idx, ["_id_", "at_1", "userId_1_at_1"]);
}
