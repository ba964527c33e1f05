//! The mysql engine (being written).

use kiln_core::{BackendConfig, EngineError};

/// The mysql backend.
pub struct MysqlBackend;

impl MysqlBackend {
    /// Connect.
    pub async fn connect(_cfg: &BackendConfig) -> Result<Self, EngineError> {
        Err(EngineError::Unsupported("mysql engine not built yet".into()))
    }
}
