//! kiln-testkit: a fresh database for every test, on real servers.
//!
//! [`TestDb::new`] creates an empty database (PostgreSQL, MySQL/MariaDB,
//! MongoDB) or SQLite file with a unique name and drops it when the value is
//! dropped, so tests run in parallel and never see each other's state. A server
//! that cannot be reached is a test failure with a message saying how to start
//! it: tests never pass by skipping.
//!
//! Servers: `KILN_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`),
//! `KILN_TEST_MYSQL_URL` (default `mysql://root@127.0.0.1:3306/mysql`),
//! `KILN_TEST_MONGODB_URL` (default: a SecantusDB server started by [`mongo`]).

use std::sync::atomic::{AtomicU64, Ordering};

pub mod case;
pub mod compat;
pub mod fake;
pub mod mongo;
pub mod proxy;

/// The engines a test can ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// PostgreSQL.
    Postgres,
    /// MySQL / MariaDB.
    Mysql,
    /// SQLite (a file in a temporary directory).
    Sqlite,
    /// MongoDB.
    Mongodb,
}

impl Engine {
    /// All SQL engines.
    pub const SQL: [Engine; 3] = [Engine::Postgres, Engine::Mysql, Engine::Sqlite];
}

/// A fresh, empty database, dropped on drop.
pub struct TestDb {
    /// The engine.
    pub engine: Engine,
    /// URL of the fresh database.
    pub url: String,
    /// Database name (file path for SQLite).
    pub name: String,
    admin_url: String,
    _dir: Option<tempfile::TempDir>,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name no other test (in this or another process) uses.
pub fn unique_name(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{prefix}_{}_{}_{:x}", std::process::id(), n, nanos)
}

/// The PostgreSQL server's admin URL.
pub fn postgres_admin_url() -> String {
    std::env::var("KILN_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The MySQL/MariaDB server's admin URL.
pub fn mysql_admin_url() -> String {
    std::env::var("KILN_TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/mysql".into())
}

fn with_db(url: &str, db: &str) -> String {
    let mut u = url::Url::parse(url).expect("valid admin URL");
    u.set_path(&format!("/{db}"));
    u.to_string()
}

impl TestDb {
    /// Create a fresh database on `engine`'s server.
    ///
    /// # Panics
    /// When the server cannot be reached, with a message saying which server and how to start it.
    pub async fn new(engine: Engine) -> TestDb {
        match engine {
            Engine::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let path = dir.path().join("test.db");
                TestDb {
                    engine,
                    url: format!("sqlite://{}", path.display()),
                    name: path.display().to_string(),
                    admin_url: String::new(),
                    _dir: Some(dir),
                }
            }
            Engine::Postgres => {
                let admin = postgres_admin_url();
                let name = unique_name("kiln_t");
                let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls).await.unwrap_or_else(|e| {
                    panic!("PostgreSQL test server not reachable at {admin}: {e}. Start it (`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`) or set KILN_TEST_POSTGRES_URL")
                });
                let h = tokio::spawn(conn);
                client.batch_execute(&format!("CREATE DATABASE \"{name}\"")).await.expect("create test database");
                drop(client);
                let _ = h.await;
                TestDb { engine, url: with_db(&admin, &name), name, admin_url: admin, _dir: None }
            }
            Engine::Mysql => {
                use sqlx::Connection;
                let admin = mysql_admin_url();
                let name = unique_name("kiln_t");
                let mut c = sqlx::MySqlConnection::connect(&admin).await.unwrap_or_else(|e| {
                    panic!("MySQL/MariaDB test server not reachable at {admin}: {e}. Start it (`start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd`) or set KILN_TEST_MYSQL_URL")
                });
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE `{name}`"))).execute(&mut c).await.expect("create test database");
                let _ = c.close().await;
                TestDb { engine, url: with_db(&admin, &name), name, admin_url: admin, _dir: None }
            }
            Engine::Mongodb => {
                let base = mongo::server_url().await;
                let name = unique_name("kiln_t");
                TestDb { engine, url: mongo::with_db(&base, &name), name, admin_url: base, _dir: None }
            }
        }
    }

    /// A handle on an existing test database (e.g. for a task that outlives a
    /// borrow); dropping it drops nothing.
    pub fn attach(engine: Engine, url: &str) -> TestDb {
        TestDb { engine, url: url.to_string(), name: String::new(), admin_url: String::new(), _dir: None }
    }

    /// Names of the tables (SQL) or collections (MongoDB) whose name starts with
    /// `prefix`, sorted: what a migration created, seen without kiln.
    pub async fn objects(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        let mut names = match self.engine {
            Engine::Postgres => self.query_strings("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()").await?,
            Engine::Mysql => {
                self.query_strings("SELECT CAST(table_name AS CHAR) FROM information_schema.tables WHERE table_schema = DATABASE()").await?
            }
            Engine::Sqlite => self.query_strings("SELECT name FROM sqlite_master WHERE type = 'table'").await?,
            Engine::Mongodb => {
                let client = mongodb::Client::with_uri_str(&self.url).await?;
                let db = client.default_database().ok_or_else(|| anyhow::anyhow!("test URL names no database"))?;
                db.list_collection_names().await?
            }
        };
        names.retain(|n| n.starts_with(prefix));
        names.sort();
        Ok(names)
    }

    /// Run SQL (or, for MongoDB, nothing) directly against the test database,
    /// bypassing kiln: to inspect or tamper with what kiln did.
    pub async fn sql(&self, sql: &str) -> anyhow::Result<()> {
        match self.engine {
            Engine::Postgres => {
                let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls).await?;
                let h = tokio::spawn(conn);
                client.batch_execute(sql).await?;
                drop(client);
                let _ = h.await;
                Ok(())
            }
            Engine::Mysql => {
                use sqlx::Connection;
                let mut c = sqlx::MySqlConnection::connect(&self.url).await?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string())).execute(&mut c).await?;
                c.close().await?;
                Ok(())
            }
            Engine::Sqlite => {
                let path = self.url.trim_start_matches("sqlite://");
                let status = std::process::Command::new("sqlite3").arg(path).arg(sql).status();
                match status {
                    Ok(s) if s.success() => Ok(()),
                    _ => anyhow::bail!("sqlite3 failed on {sql}"),
                }
            }
            Engine::Mongodb => anyhow::bail!("use the mongodb driver for MongoDB test databases"),
        }
    }

    /// Run a query returning one text/number column and return its values as strings.
    pub async fn query_strings(&self, sql: &str) -> anyhow::Result<Vec<String>> {
        match self.engine {
            Engine::Postgres => {
                let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls).await?;
                let h = tokio::spawn(conn);
                let rows = client.simple_query(sql).await?;
                let mut out = Vec::new();
                for r in rows {
                    if let tokio_postgres::SimpleQueryMessage::Row(row) = r {
                        out.push(row.get(0).unwrap_or("").to_string());
                    }
                }
                drop(client);
                let _ = h.await;
                Ok(out)
            }
            Engine::Mysql => {
                use sqlx::{Connection, Row};
                let mut c = sqlx::MySqlConnection::connect(&self.url).await?;
                let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string())).fetch_all(&mut c).await?;
                let mut out = Vec::new();
                for r in rows {
                    let v: Option<String> = r.try_get(0).or_else(|_| r.try_get::<Option<i64>, _>(0).map(|x| x.map(|n| n.to_string())))?;
                    out.push(v.unwrap_or_default());
                }
                c.close().await?;
                Ok(out)
            }
            Engine::Sqlite => {
                let path = self.url.trim_start_matches("sqlite://");
                let o = std::process::Command::new("sqlite3").arg(path).arg(sql).output()?;
                anyhow::ensure!(o.status.success(), "sqlite3: {}", String::from_utf8_lossy(&o.stderr));
                Ok(String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).collect())
            }
            Engine::Mongodb => anyhow::bail!("use the mongodb driver for MongoDB test databases"),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if std::env::var_os("KILN_TEST_KEEP").is_some() {
            eprintln!("keeping test database {}", self.url);
            return;
        }
        let (engine, admin, name) = (self.engine, self.admin_url.clone(), self.name.clone());
        if engine == Engine::Sqlite || admin.is_empty() {
            return;
        }
        // Drop runs inside async tests: do the async cleanup on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                match engine {
                    Engine::Postgres => {
                        if let Ok((client, conn)) = tokio_postgres::connect(&admin, tokio_postgres::NoTls).await {
                            let h = tokio::spawn(conn);
                            let _ = client.batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).await;
                            drop(client);
                            let _ = h.await;
                        }
                    }
                    Engine::Mysql => {
                        use sqlx::Connection;
                        if let Ok(mut c) = sqlx::MySqlConnection::connect(&admin).await {
                            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS `{name}`"))).execute(&mut c).await;
                            let _ = c.close().await;
                        }
                    }
                    Engine::Mongodb => mongo::drop_db(&admin, &name).await,
                    Engine::Sqlite => {}
                }
            })
        })
        .join();
    }
}
