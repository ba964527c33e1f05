//! Taking the migration lock: a bounded wait that names the holder, and a
//! guard released on every path.
//!
//! [`acquire`] returns a [`LockGuard`]. Release it with
//! [`LockGuard::release`] when the work is done; if the guard is dropped
//! instead — an early `?`, a panic, or the whole future dropped by its caller
//! (a time-out, a cancelled request) — its `Drop` runs the engine's
//! [`Locker::detached_unlock`], so the lock never outlives the work that took
//! it (sqlx's early return that skipped `unlock()` is the bug this prevents).

use std::time::{Duration, Instant};

use crate::engine::Locker;
use crate::error::EngineError;

/// Proof that the lock is held. See the module docs.
#[must_use = "the lock is released when the guard is dropped"]
pub struct LockGuard {
    detached: Option<Box<dyn FnOnce() + Send>>,
}

impl LockGuard {
    /// A guard for a lock `locker` has just taken.
    pub fn new(locker: &dyn Locker) -> Self {
        LockGuard { detached: Some(locker.detached_unlock()) }
    }

    /// A guard that runs `unlock` if dropped without [`LockGuard::release`] or
    /// [`LockGuard::disarm`].
    pub fn from_fn(unlock: Box<dyn FnOnce() + Send>) -> Self {
        LockGuard { detached: Some(unlock) }
    }

    /// Forget the detached unlock: the caller releases the lock itself, now.
    pub fn disarm(mut self) {
        self.detached = None;
    }

    /// Release the lock through `locker` and wait for it.
    ///
    /// # Errors
    /// The engine's unlock error (the lock is then released when the
    /// connection closes).
    pub async fn release(mut self, locker: &mut dyn Locker) -> Result<(), EngineError> {
        self.detached = None;
        locker.unlock().await
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(unlock) = self.detached.take() {
            tracing::debug!("lock guard dropped without release: releasing in the background");
            unlock();
        }
    }
}

impl std::fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockGuard").field("held", &self.detached.is_some()).finish()
    }
}

/// Take the lock, waiting up to `wait` with a growing pause (20 ms doubling to
/// 250 ms). `on_wait` is called once, with the holder, when the first attempt
/// finds the lock taken.
///
/// # Errors
/// [`EngineError::LockTimeout`] naming the holder after `wait`; the engine's
/// error when it cannot ask.
pub async fn acquire(locker: &mut dyn Locker, target: &str, wait: Duration, on_wait: impl FnOnce(&str)) -> Result<LockGuard, EngineError> {
    if locker.try_lock().await? {
        return Ok(LockGuard::new(locker));
    }
    let holder = locker.holder().await.unwrap_or_else(|| "holder unknown".into());
    on_wait(&holder);
    let start = Instant::now();
    let mut pause = Duration::from_millis(20);
    loop {
        let left = wait.saturating_sub(start.elapsed());
        if left.is_zero() {
            let holder = locker.holder().await.unwrap_or_else(|| "holder unknown".into());
            return Err(EngineError::LockTimeout { target: target.to_string(), holder, waited: start.elapsed() });
        }
        tokio::time::sleep(pause.min(left).max(Duration::from_millis(1))).await;
        pause = (pause * 2).min(Duration::from_millis(250));
        if locker.try_lock().await? {
            return Ok(LockGuard::new(locker));
        }
    }
}
