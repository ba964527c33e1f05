//! Scratch databases for `kiln verify`: [`ScratchAdmin`] for SQLite. A
//! scratch database is a file `<name>.db` next to the configured database (in
//! the system's temporary directory for `sqlite::memory:`).

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use kiln_core::engine::ScratchAdmin;
use kiln_core::EngineError;

use super::{Location, SqliteEngine};

/// Scratch databases are named `kiln_verify_…` by `kiln verify`. Anything else
/// is refused, so neither a typo nor a caller's bug can create or delete a
/// real database file; letters, digits and `_` only, so the name cannot
/// reach outside the directory.
fn check_scratch_name(name: &str) -> Result<(), EngineError> {
    crate::common::check_scratch_name(name, 200)
}

impl SqliteEngine {
    /// `<dir of the configured database>/<name>.db`, for a valid scratch name.
    fn scratch_path(&self, name: &str) -> Result<PathBuf, EngineError> {
        check_scratch_name(name)?;
        let dir = match &self.location {
            Location::File(p) => p.parent().map(Path::to_path_buf).unwrap_or_default(),
            Location::Memory => std::env::temp_dir(),
        };
        Ok(dir.join(format!("{name}.db")))
    }
}

#[async_trait]
impl ScratchAdmin for SqliteEngine {
    /// A new, empty database file `<name>.db` next to the configured one (in
    /// the system's temporary directory for `sqlite::memory:`); returns its
    /// `sqlite://` URL. Refuses names [`ScratchAdmin::drop_scratch`] would refuse,
    /// and an existing file: a scratch database must start empty.
    async fn create_scratch(&mut self, name: &str) -> Result<String, EngineError> {
        let path = self.scratch_path(name)?;
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| EngineError::Query { context: format!("creating the scratch database {}", path.display()), message: e.to_string() })?;
        Ok(format!("sqlite://{}", path.display()))
    }

    /// Deletes the file made by [`ScratchAdmin::create_scratch`] and its companions
    /// (`-wal`, `-shm`, `-journal`, `-kiln.lock`); files already gone are not
    /// an error. Refuses any name that `kiln verify` does not make
    /// (`kiln_verify_…`), so a wrong argument can never delete a real database.
    async fn drop_scratch(&mut self, name: &str) -> Result<(), EngineError> {
        let path = self.scratch_path(name)?;
        for suffix in ["", "-wal", "-shm", "-journal", "-kiln.lock"] {
            let mut file = path.clone().into_os_string();
            file.push(suffix);
            let file = PathBuf::from(file);
            match std::fs::remove_file(&file) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(EngineError::Query {
                        context: format!("dropping the scratch database: removing {}", file.display()),
                        message: e.to_string(),
                    })
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_names() {
        assert!(check_scratch_name("kiln_verify_123_abc").is_ok());
        for bad in ["kiln_verify_", "app", "kiln_verify_../x", "kiln_verify_a/b", "kiln_verify_a.db"] {
            assert!(check_scratch_name(bad).is_err(), "{bad}");
        }
    }
}
