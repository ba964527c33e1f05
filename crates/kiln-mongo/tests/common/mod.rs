//! Shared set-up of the MongoDB integration tests: a fresh database per test
//! (kiln_testkit), a migrations directory in a tempdir, and the runner.

#![allow(dead_code)]

use std::path::Path;

#[allow(unused_imports)]
use kiln_core::engine::{Engine as _, Locker as _};
use kiln_core::{load_dir, BackendConfig, DownTarget, LoadOptions, Migration, Policy, RunError, RunReport, Runner, RunnerSettings, UpTarget};
use kiln_mongo::MongoEngine;
use kiln_testkit::compat::Protocol;
use kiln_testkit::{Engine, TestDb};
use mongodb::bson::Document;

/// One test's database and migrations directory.
pub struct Env {
    pub db: TestDb,
    pub dir: tempfile::TempDir,
    pub cfg: BackendConfig,
}

impl Env {
    pub async fn new() -> Env {
        let db = TestDb::new(Engine::Mongodb).await;
        let cfg = BackendConfig::new(db.url.clone());
        Env { db, dir: tempfile::tempdir().unwrap(), cfg }
    }

    /// Write a migration file.
    pub fn write(&self, name: &str, text: &str) {
        std::fs::write(self.dir.path().join(name), text).unwrap();
    }

    pub fn remove(&self, name: &str) {
        std::fs::remove_file(self.dir.path().join(name)).unwrap();
    }

    pub fn load(&self) -> Vec<Migration> {
        load_dir(self.dir.path(), &LoadOptions::default()).unwrap()
    }

    /// An engine whose lease lives `ttl` (renewed every third of it).
    #[allow(dead_code)]
    pub async fn backend_with_ttl(&self, ttl: std::time::Duration) -> Protocol {
        let mut engine = MongoEngine::connect(&self.cfg).await.unwrap();
        engine.set_lease_ttl(ttl);
        Protocol::new(engine)
    }

    pub async fn backend(&self) -> Protocol {
        Protocol::new(MongoEngine::connect(&self.cfg).await.unwrap())
    }

    pub async fn up(&self) -> Result<RunReport, RunError> {
        let local = self.load();
        let mut b = self.backend().await;
        let r = Runner::new(&mut b, settings()).up(&local, &UpTarget::Latest, &Policy::default(), false).await;
        r
    }

    pub async fn down(&self) -> Result<RunReport, RunError> {
        let local = self.load();
        let mut b = self.backend().await;
        let r = Runner::new(&mut b, settings()).down(&local, &DownTarget::LastBatch, false).await;
        r
    }

    pub async fn status(&self) -> Vec<kiln_core::StatusRow> {
        let local = self.load();
        let mut b = self.backend().await;
        let r = Runner::new(&mut b, settings()).status(&local).await.unwrap();
        r
    }

    /// `state` of every row of `kiln status`, as `version:state`.
    pub async fn states(&self) -> Vec<String> {
        self.status().await.iter().map(|r| format!("{}:{}", r.version, r.state)).collect()
    }

    pub async fn repair(&self, version: Option<&str>) -> kiln_core::AdminReport {
        let local = self.load();
        let mut b = self.backend().await;
        let v = version.map(|v| kiln_core::Version::parse_arg(v).unwrap());
        let r = Runner::new(&mut b, settings()).repair(&local, v.as_ref(), false, "test").await.unwrap();
        r
    }

    pub async fn docs(&self, collection: &str) -> Vec<Document> {
        kiln_testkit::mongo::documents(&self.db.url, collection).await
    }

    pub async fn collections(&self) -> Vec<String> {
        kiln_testkit::mongo::collection_names(&self.db.url).await
    }

    pub async fn index_names(&self, collection: &str) -> Vec<String> {
        kiln_testkit::mongo::index_names(&self.db.url, collection).await
    }

    pub async fn database(&self) -> mongodb::Database {
        kiln_testkit::mongo::database(&self.db.url).await
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

pub fn settings() -> RunnerSettings {
    RunnerSettings { lock_timeout: std::time::Duration::from_secs(20), actor: "tester@test".into() }
}

/// The MongoDB error code a failed run reports.
pub fn code_of(e: &RunError) -> Option<String> {
    match e {
        RunError::Migration { error, .. } => error.code.clone(),
        _ => None,
    }
}
