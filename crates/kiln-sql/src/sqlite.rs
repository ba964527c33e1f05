//! The sqlite engine (being written).

use kiln_core::{BackendConfig, EngineError};

/// The sqlite backend.
pub struct SqliteBackend;

impl SqliteBackend {
    /// Connect.
    pub async fn connect(_cfg: &BackendConfig) -> Result<Self, EngineError> {
        Err(EngineError::Unsupported("sqlite engine not built yet".into()))
    }
}
