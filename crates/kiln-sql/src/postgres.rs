//! The postgres engine (being written).

use kiln_core::{BackendConfig, EngineError};

/// The postgres backend.
pub struct PgBackend;

impl PgBackend {
    /// Connect.
    pub async fn connect(_cfg: &BackendConfig) -> Result<Self, EngineError> {
        Err(EngineError::Unsupported("postgres engine not built yet".into()))
    }
}
