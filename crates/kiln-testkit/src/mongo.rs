//! The MongoDB test server: `KILN_TEST_MONGODB_URL`, or a SecantusDB server
//! started by the harness (being written).

/// URL of the MongoDB test server (without a database).
pub async fn server_url() -> String {
    std::env::var("KILN_TEST_MONGODB_URL").unwrap_or_else(|_| panic!("MongoDB test server: not implemented yet"))
}

/// `base` with the database `db`.
pub fn with_db(base: &str, db: &str) -> String {
    let mut u = url::Url::parse(base).expect("valid MongoDB URL");
    u.set_path(&format!("/{db}"));
    u.to_string()
}

/// Drop a test database.
pub async fn drop_db(_base: &str, _name: &str) {}
