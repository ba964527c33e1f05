//! The migration lock: an OS file lock on the sidecar file `<db file>-kiln.lock`.
//!
//! The OS releases it when the process dies, so a crashed runner never blocks
//! the next one. While held, the file says who holds it (for messages). The
//! database file itself is never opened a second time for locking: closing
//! another descriptor on it would drop SQLite's own POSIX locks on it.
//!
//! An in-memory database (`sqlite::memory:`) cannot be reached by any other
//! connection, so its lock is a flag.
//!
//! The held lock lives in an `Arc<Mutex<…>>` that the closures of
//! [`Locker::detached_unlock`] reach (weakly), so a guard dropped without
//! `release` unlocks it without the engine: closing the file releases the OS
//! lock. Dropping the engine closes the file too, guards or not.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use chrono::{SecondsFormat, Utc};
use kiln_core::engine::Locker;
use kiln_core::EngineError;

use super::SqliteEngine;

/// What is held while the lock is taken.
enum Held {
    /// The locked sidecar file: closing it releases the lock.
    File(File),
    /// The lock of an in-memory database.
    Memory,
}

/// The lock of one engine (see the module docs).
pub(super) struct SidecarLock {
    /// `<db file>-kiln.lock`; `None` for an in-memory database.
    path: Option<PathBuf>,
    held: Arc<Mutex<Option<Held>>>,
}

impl SidecarLock {
    pub(super) fn file(path: PathBuf) -> Self {
        SidecarLock { path: Some(path), held: Arc::default() }
    }

    pub(super) fn memory() -> Self {
        SidecarLock { path: None, held: Arc::default() }
    }

    fn try_lock(&self) -> Result<bool, EngineError> {
        let mut held = lock(&self.held);
        if held.is_some() {
            return Ok(true);
        }
        let Some(path) = &self.path else {
            *held = Some(Held::Memory);
            return Ok(true);
        };
        let lock_err = |e: std::io::Error| EngineError::Query { context: format!("taking the lock file {}", path.display()), message: e.to_string() };
        // Not truncated on open: the holder's note must survive until we hold the lock.
        let mut f = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(lock_err)?;
        match f.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Ok(false),
            Err(std::fs::TryLockError::Error(e)) => return Err(lock_err(e)),
        }
        let note =
            format!("pid {} {} since {}", std::process::id(), kiln_core::current_actor(), Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true));
        // The note is only for messages; the lock is what matters, so a failed write is not fatal.
        let _ = f.set_len(0).and_then(|_| f.write_all(note.as_bytes())).and_then(|_| f.flush());
        *held = Some(Held::File(f));
        Ok(true)
    }

    fn holder(&self) -> Option<String> {
        let path = self.path.as_ref()?;
        let mut s = String::new();
        File::open(path).ok()?.read_to_string(&mut s).ok()?;
        let s = s.trim();
        (!s.is_empty()).then(|| format!("{s} (lock file {})", path.display()))
    }
}

/// The held lock, also after a panic while it was borrowed (the state is a
/// plain `Option`, always consistent).
fn lock(held: &Mutex<Option<Held>>) -> MutexGuard<'_, Option<Held>> {
    held.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Release what is held, if anything. Never blocks on the OS: clearing the
/// note and closing the file are immediate.
fn release(held: &Mutex<Option<Held>>) {
    if let Some(Held::File(f)) = lock(held).take() {
        // Clear the note so a stale one is never shown; closing the file releases the lock.
        let _ = f.set_len(0);
        let _ = f.unlock();
    }
}

#[async_trait]
impl Locker for SqliteEngine {
    /// Taking the lock also settles the journal mode (WAL, see
    /// [`super::journal`]), once per connection: under the lock, no other
    /// runner is writing.
    async fn try_lock(&mut self) -> Result<bool, EngineError> {
        let taken = self.lock.try_lock()?;
        if taken {
            self.settle_journal();
        }
        Ok(taken)
    }

    async fn holder(&mut self) -> Option<String> {
        self.lock.holder()
    }

    async fn unlock(&mut self) -> Result<(), EngineError> {
        release(&self.lock.held);
        Ok(())
    }

    /// Releases through a weak reference: a guard that outlives the engine
    /// does not keep the file (and so the lock) open, since dropping the
    /// engine closes it.
    fn detached_unlock(&self) -> Box<dyn FnOnce() + Send> {
        let held = Arc::downgrade(&self.lock.held);
        Box::new(move || {
            if let Some(held) = held.upgrade() {
                release(&held);
            }
        })
    }
}
