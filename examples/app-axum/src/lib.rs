//! An axum service that carries its migrations in its binary (PostgreSQL and
//! MongoDB, in the five groups users, assistants, clients, schedules — which
//! depends on the first three — and calls, which depends on all), applies them
//! at start-up under kiln's lock, and mounts kiln's HTTP API.

use std::sync::Arc;

use axum::routing::get;
use axum::{Json, Router};
use kiln::{CodeContext, CodeError, CodeMigration, Kiln, StartupPolicy};

/// The PostgreSQL migrations, checked and embedded at compile time.
pub static POSTGRES: kiln::Embedded = kiln::embed_migrations!("migrations/postgres", dialect = "postgres");
/// The MongoDB migrations, checked and embedded at compile time.
pub static MONGODB: kiln::Embedded = kiln::embed_migrations!("migrations/mongodb");

/// 0006 (group users), in Rust: every user gets a display name derived from
/// the e-mail address — on PostgreSQL with SQL, on MongoDB with commands.
pub struct DisplayNames;

#[kiln::async_trait]
impl CodeMigration for DisplayNames {
    fn version(&self) -> &str {
        "0006"
    }
    fn name(&self) -> &str {
        "user_display_names"
    }
    fn checksum(&self) -> &str {
        "display name = the part of the e-mail before @, v1"
    }
    fn group(&self) -> Option<&str> {
        Some("users")
    }
    async fn up(&self, db: &mut dyn CodeContext) -> Result<(), CodeError> {
        if db.engine() == "mongodb" {
            let reply = db.run_command(serde_json::json!({ "find": "users", "filter": { "displayName": { "$exists": false } } })).await?;
            for u in reply["cursor"]["firstBatch"].as_array().cloned().unwrap_or_default() {
                let name = u["email"].as_str().unwrap_or_default().split('@').next().unwrap_or_default().to_string();
                db.run_command(serde_json::json!({
                    "update": "users",
                    "updates": [{ "q": { "_id": u["_id"] }, "u": { "$set": { "displayName": name } } }]
                }))
                .await?;
            }
        } else {
            db.execute("ALTER TABLE users ADD COLUMN display_name TEXT").await?;
            db.execute("UPDATE users SET display_name = split_part(email, '@', 1)").await?;
        }
        Ok(())
    }
}

/// Where the service's databases are and how it starts.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `postgres://…`
    pub postgres_url: String,
    /// `mongodb://…/db`
    pub mongodb_url: String,
    /// Bearer token for kiln's mutating endpoints.
    pub api_token: String,
    /// What to do when migrating at start-up fails.
    pub policy: StartupPolicy,
}

impl Settings {
    /// From `DATABASE_URL`, `MONGODB_URL`, `KILN_API_TOKEN` and
    /// `KILN_STARTUP_POLICY` (`refuse`, the default, or `continue`).
    pub fn from_env() -> Result<Settings, String> {
        let var = |k: &str| std::env::var(k).map_err(|_| format!("set {k}"));
        let policy = match std::env::var("KILN_STARTUP_POLICY").as_deref() {
            Err(_) | Ok("refuse") => StartupPolicy::Refuse,
            Ok("continue") => StartupPolicy::LogAndContinue,
            Ok(other) => return Err(format!("KILN_STARTUP_POLICY={other}: expected `refuse` or `continue`")),
        };
        Ok(Settings {
            postgres_url: var("DATABASE_URL")?,
            mongodb_url: var("MONGODB_URL")?,
            api_token: var("KILN_API_TOKEN").unwrap_or_default(),
            policy,
        })
    }

    /// kiln for the PostgreSQL database: embedded files plus the code migration.
    pub fn postgres(&self) -> Kiln {
        Kiln::new(&self.postgres_url).embedded(POSTGRES).code(DisplayNames)
    }

    /// kiln for the MongoDB database.
    pub fn mongodb(&self) -> Kiln {
        Kiln::new(&self.mongodb_url).embedded(MONGODB).code(DisplayNames)
    }
}

/// Migrate both databases (each under its own lock: many instances may start
/// at once) and build the service's router, with kiln's API under
/// `/kiln/postgres` and `/kiln/mongodb`.
///
/// # Errors
/// Under [`StartupPolicy::Refuse`], the first database that could not be migrated.
pub async fn start(settings: &Settings) -> Result<Router, kiln::Error> {
    let (pg_kiln, mongo_kiln) = (settings.postgres(), settings.mongodb());
    let (pg, mongo) = tokio::join!(pg_kiln.up_at_startup(settings.policy), mongo_kiln.up_at_startup(settings.policy));
    let applied = |r: &Option<kiln::RunReport>| r.as_ref().map(|r| r.steps.len());
    let (pg, mongo) = (pg?, mongo?);
    tracing::info!(postgres = ?applied(&pg), mongodb = ?applied(&mongo), "migrations applied at start-up");
    let opts = kiln::api::ApiOptions::new(settings.api_token.clone());
    let info = Arc::new(serde_json::json!({
        "service": "app-axum",
        "kiln": { "postgres": "/kiln/postgres/", "mongodb": "/kiln/mongodb/" },
    }));
    Ok(Router::new()
        .route("/", get(move || async move { Json((*info).clone()) }))
        .nest("/kiln/postgres", kiln::api::router(settings.postgres(), opts.clone()))
        .nest("/kiln/mongodb", kiln::api::router(settings.mongodb(), opts)))
}
