//! `cargo run -p app-axum` — see examples/app-axum/README.md.

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into())).init();
    let settings = app_axum::Settings::from_env()?;
    let app = app_axum::start(&settings).await?;
    let listen = std::env::var("APP_LISTEN").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    tracing::info!(%listen, "listening; kiln's dashboard at /kiln/postgres/ and /kiln/mongodb/");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
