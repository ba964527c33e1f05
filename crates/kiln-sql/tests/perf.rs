//! PostgreSQL schema inspection with many schemas in one database (issue #10):
//! the inspection of one tenant's schema reads that schema only — also when
//! other schemas hold tables of the same names — and tables moved in or out
//! with `ALTER TABLE … SET SCHEMA`, partitions and tables created in the
//! still-open migration transaction are seen as they are. Real server, a
//! fresh database per test.

use kiln_core::engine::SchemaStore as _;
use kiln_core::BackendConfig;
use kiln_sql::postgres::PgBackend;
use kiln_testkit::{Engine, TestDb};

async fn inspect(db: &TestDb, schema: Option<&str>) -> kiln_core::schema::Snapshot {
    let mut cfg = BackendConfig::new(db.url.clone());
    cfg.schema = schema.map(str::to_string);
    let mut b = PgBackend::connect(&cfg).await.expect("connect");
    b.inspect().await.expect("inspect")
}

fn names(s: &kiln_core::schema::Snapshot) -> Vec<&str> {
    s.objects.keys().map(String::as_str).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspecting_one_schema_reads_only_that_schema_among_many() {
    let db = TestDb::new(Engine::Postgres).await;
    // Forty tenant schemas with the same table names, each with its own column,
    // plus the public schema with a `users` of its own.
    let mut ddl = String::from("CREATE TABLE public.users (id INT PRIMARY KEY, public_only TEXT);\n");
    for i in 0..40 {
        ddl.push_str(&format!(
            "CREATE SCHEMA tenant_{i};\n\
             CREATE TABLE tenant_{i}.users (id BIGINT PRIMARY KEY, col_{i} TEXT NOT NULL);\n\
             CREATE TABLE tenant_{i}.orders (id BIGINT PRIMARY KEY, user_id BIGINT REFERENCES tenant_{i}.users (id));\n\
             CREATE INDEX orders_user_{i} ON tenant_{i}.orders (user_id);\n\
             CREATE TABLE tenant_{i}.kiln_history (version BIGINT PRIMARY KEY);\n"
        ));
    }
    db.sql(&ddl).await.unwrap();

    for i in [0, 17, 39] {
        let s = inspect(&db, Some(&format!("tenant_{i}"))).await;
        assert_eq!(names(&s), ["orders", "users"], "kiln's own table is left out; no other schema's tables");
        let users = &s.objects["users"];
        assert_eq!(users.columns.keys().cloned().collect::<Vec<_>>(), [format!("col_{i}"), "id".to_string()]);
        assert_eq!(users.columns["id"].data_type, "bigint");
        assert!(!users.columns[&format!("col_{i}")].nullable);
        let orders = &s.objects["orders"];
        assert_eq!(orders.indexes.keys().collect::<Vec<_>>(), [&format!("orders_user_{i}")]);
        assert_eq!(orders.indexes[&format!("orders_user_{i}")].columns, ["user_id"]);
        assert_eq!(
            orders.constraints["orders_user_id_fkey"].definition.as_deref(),
            Some("references users (id) on update no action on delete no action"),
            "the referenced table is this schema's, named without qualification"
        );
        assert_eq!(orders.constraints["orders_pkey"].columns, ["id"]);
    }
    // The default schema (public) sees its own `users` only.
    let s = inspect(&db, None).await;
    assert_eq!(names(&s), ["users"]);
    assert_eq!(s.objects["users"].columns.keys().map(String::as_str).collect::<Vec<_>>(), ["id", "public_only"]);
    // A schema that does not exist has nothing.
    assert!(inspect(&db, Some("tenant_missing")).await.objects.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_moved_between_schemas_and_partitions_are_seen_where_they_are() {
    let db = TestDb::new(Engine::Postgres).await;
    db.sql(
        "CREATE SCHEMA a; CREATE SCHEMA b;\n\
         CREATE TABLE a.stays (id INT);\n\
         CREATE TABLE a.moves (id INT);\n\
         CREATE TABLE b.arrives (id INT);\n\
         CREATE TABLE a.events (at DATE NOT NULL, v INT) PARTITION BY RANGE (at);\n\
         CREATE TABLE a.events_2026 PARTITION OF a.events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');\n\
         CREATE VIEW a.not_a_table AS SELECT 1 AS one;\n\
         CREATE SEQUENCE a.not_a_table_either;\n",
    )
    .await
    .unwrap();
    assert_eq!(names(&inspect(&db, Some("a")).await), ["events", "events_2026", "moves", "stays"]);
    db.sql("ALTER TABLE a.moves SET SCHEMA b; ALTER TABLE b.arrives SET SCHEMA a;").await.unwrap();
    assert_eq!(names(&inspect(&db, Some("a")).await), ["arrives", "events", "events_2026", "stays"]);
    assert_eq!(names(&inspect(&db, Some("b")).await), ["moves"]);
}
