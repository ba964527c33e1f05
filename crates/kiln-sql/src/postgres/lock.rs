//! The migration lock: a session advisory lock on a key derived from the
//! history table's schema and name, so it dies with the session (a killed
//! runner never leaves it behind) and tenants in other schemas do not share it.

use std::fmt::Write as _;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Context;

use async_trait::async_trait;
use kiln_core::engine::Locker;
use kiln_core::EngineError;
use tokio_postgres::types::Type;

use super::conn::error_text;
use super::PgBackend;

#[async_trait]
impl Locker for PgBackend {
    async fn try_lock(&mut self) -> Result<bool, EngineError> {
        // A session advisory lock is re-entrant and counted; taking it once per
        // backend keeps one unlock enough to release it.
        if self.locked.load(Ordering::SeqCst) {
            // Already ours, as far as this backend knows; make sure the session
            // still has it (the connection may have died, or a migration may have
            // run pg_advisory_unlock_all()) rather than trusting the flag.
            let (hi, lo) = self.lock_halves();
            let held: bool = self
                .client
                .query_typed_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid() \
                     AND classid = $1 AND objid = $2 AND objsubid = 1)",
                    &[(&hi, Type::OID), (&lo, Type::OID)],
                )
                .await
                .and_then(|r| r.try_get(0))
                .map_err(|e| self.engine_error("checking the migration lock", &e))?;
            if held {
                return Ok(true);
            }
            self.locked.store(false, Ordering::SeqCst);
        }
        let row = self
            .client
            .query_typed_one("SELECT pg_try_advisory_lock($1)", &[(&self.lock_key, Type::INT8)])
            .await
            .map_err(|e| self.engine_error("taking the migration lock (pg_try_advisory_lock)", &e))?;
        let got: bool = row.try_get(0).map_err(|e| self.engine_error("reading pg_try_advisory_lock", &e))?;
        self.locked.store(got, Ordering::SeqCst);
        Ok(got)
    }

    async fn holder(&mut self) -> Option<String> {
        let (hi, lo) = self.lock_halves();
        let sql = "SELECT a.pid, a.application_name, host(a.client_addr), a.usename::text, \
                   to_char(a.backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') \
                   FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                   WHERE l.locktype = 'advisory' AND l.granted AND l.classid = $1 AND l.objid = $2 AND l.objsubid = 1 \
                   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                   AND a.pid <> pg_backend_pid() LIMIT 1";
        let row = self.client.query_typed_opt(sql, &[(&hi, Type::OID), (&lo, Type::OID)]).await.ok()??;
        let pid: i32 = row.try_get(0).ok()?;
        let app: Option<String> = row.try_get(1).ok()?;
        let addr: Option<String> = row.try_get(2).ok()?;
        let user: Option<String> = row.try_get(3).ok()?;
        let since: Option<String> = row.try_get(4).ok()?;
        let mut s = match app.filter(|a| !a.is_empty()) {
            Some(a) => format!("{a}, server pid {pid}"),
            None => format!("server pid {pid}"),
        };
        if let Some(u) = user {
            let _ = write!(s, ", user {u}");
        }
        let _ = write!(s, ", from {}", addr.as_deref().unwrap_or("a local socket"));
        if let Some(t) = since {
            let _ = write!(s, ", connected since {t} UTC");
        }
        Some(s)
    }

    async fn unlock(&mut self) -> Result<(), EngineError> {
        if !self.locked.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.client
            .query_typed("SELECT pg_advisory_unlock($1)", &[(&self.lock_key, Type::INT8)])
            .await
            .map_err(|e| self.engine_error("releasing the migration lock (pg_advisory_unlock)", &e))?;
        self.locked.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Puts `pg_advisory_unlock` on the session's queue *synchronously* — a
    /// tokio-postgres request is handed to the connection at its first poll —
    /// so any request this engine sends afterwards (a new `try_lock`) is
    /// ordered after it; the answer is awaited on the runtime when there is
    /// one, else dropped (the server runs the request all the same). Holds the
    /// client weakly: an engine already closed or dropped has ended its
    /// session, and with it the lock.
    fn detached_unlock(&self) -> Box<dyn FnOnce() + Send> {
        let client = Arc::downgrade(&self.client);
        let locked = self.locked.clone();
        let key = self.lock_key;
        Box::new(move || {
            if !locked.swap(false, Ordering::SeqCst) {
                return;
            }
            let Some(client) = client.upgrade() else { return };
            let mut unlock = Box::pin(async move {
                if let Err(e) = client.batch_execute(&format!("SELECT pg_advisory_unlock({key}::bigint)")).await {
                    tracing::warn!(target: "kiln::postgres", error = %error_text(&e), "releasing the migration lock in the background failed; it is released when the session ends");
                }
            });
            let mut cx = Context::from_waker(futures::task::noop_waker_ref());
            if unlock.as_mut().poll(&mut cx).is_pending() {
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(unlock);
                }
            }
        })
    }
}

impl PgBackend {
    /// A bigint advisory key shows in pg_locks as classid = high 32 bits,
    /// objid = low 32 bits, objsubid = 1.
    fn lock_halves(&self) -> (u32, u32) {
        let k = self.lock_key as u64;
        ((k >> 32) as u32, (k & 0xffff_ffff) as u32)
    }
}
