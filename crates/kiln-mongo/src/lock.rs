//! The migration lock: a lease document renewed by a heartbeat.
//!
//! MongoDB has no session-scoped lock that dies with the process, so the lock
//! is a document `{_id: <history collection>, owner, token, acquired, expires,
//! heartbeat}` in `kiln_lock`. Taking it is one atomic `findAndModify` with
//! `upsert`: the filter matches only an *expired* lease (which is taken over);
//! when the lease is live the upsert collides with the existing `_id` (error
//! 11000) and the lock is held by someone else; when there is no lease the
//! upsert inserts ours. There is no check-then-insert window. While held, a
//! background task pushes `expires` forward; a crashed holder stops renewing,
//! and its lease expires after the TTL.
//!
//! Times are the server's clock (local clock corrected by the skew measured at
//! connect), so runners on machines with different clocks agree on expiry.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bson::oid::ObjectId;
use bson::{doc, Document};
use kiln_core::EngineError;
use mongodb::options::ReturnDocument;
use mongodb::Collection;
use tokio::task::JoinHandle;

use crate::conn::{error_code, Conn};

/// The collection holding lease documents.
pub const LOCK_COLLECTION: &str = "kiln_lock";

/// Default lease time-to-live: a crashed runner blocks others at most this long.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);

/// Result of one attempt to take the lease.
#[derive(Debug)]
pub(crate) enum Attempt {
    /// Ours now; `previous` names the owner of the expired lease we took over.
    Taken { previous: Option<String> },
    /// Someone else holds a live lease.
    Held,
}

struct Held {
    task: JoinHandle<()>,
    lost: Arc<AtomicBool>,
}

/// One runner's view of the lease.
pub(crate) struct Lease {
    coll: Collection<Document>,
    id: String,
    owner: String,
    token: ObjectId,
    ttl: Duration,
    held: Option<Held>,
}

fn to_bson_time(t: chrono::DateTime<chrono::Utc>) -> bson::DateTime {
    bson::DateTime::from_chrono(t)
}

impl Lease {
    /// The lease guarding history collection `history` in `conn`'s database.
    pub fn new(conn: &Conn, history: &str) -> Lease {
        Lease {
            coll: conn.db.collection(LOCK_COLLECTION),
            id: history.to_string(),
            owner: format!("{} pid {}", kiln_core::current_actor(), std::process::id()),
            token: ObjectId::new(),
            ttl: DEFAULT_TTL,
            held: None,
        }
    }

    /// Change the time-to-live (renewed every third of it). Takes effect at the next acquisition.
    pub fn set_ttl(&mut self, ttl: Duration) {
        self.ttl = ttl.max(Duration::from_millis(300));
    }

    /// True while we hold the lease and the heartbeat has not lost it.
    pub fn is_held(&self) -> bool {
        self.held.as_ref().map(|h| !h.lost.load(Ordering::SeqCst)).unwrap_or(false)
    }

    /// True when we took the lease and the heartbeat found it gone or could not
    /// renew it in time: another runner may hold it now.
    pub fn is_lost(&self) -> bool {
        self.held.as_ref().map(|h| h.lost.load(Ordering::SeqCst)).unwrap_or(false)
    }

    fn ttl_chrono(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.ttl).unwrap_or(chrono::Duration::seconds(30))
    }

    /// Try once to take the lease. Taking a lease we hold renews it.
    pub async fn try_take(&mut self, conn: &Conn) -> Result<Attempt, EngineError> {
        if self.is_held() {
            let now = conn.now();
            let r = self
                .coll
                .update_one(
                    doc! { "_id": &self.id, "token": self.token },
                    doc! { "$set": { "expires": to_bson_time(now + self.ttl_chrono()), "heartbeat": to_bson_time(now) } },
                )
                .await
                .map_err(|e| conn.engine_error("renewing the migration lock", &e))?;
            if r.matched_count == 1 {
                return Ok(Attempt::Taken { previous: None });
            }
        }
        self.stop();
        let now = conn.now();
        let filter = doc! { "_id": &self.id, "expires": { "$lt": to_bson_time(now) } };
        let update = doc! { "$set": {
            "owner": &self.owner,
            "token": self.token,
            "acquired": to_bson_time(now),
            "expires": to_bson_time(now + self.ttl_chrono()),
            "heartbeat": to_bson_time(now),
        } };
        let previous = match self.coll.find_one_and_update(filter, update).upsert(true).return_document(ReturnDocument::Before).await {
            Ok(prev) => prev,
            Err(e) if error_code(&e) == Some(11000) => return Ok(Attempt::Held),
            Err(e) => return Err(conn.engine_error("taking the migration lock", &e)),
        };
        self.start_heartbeat(conn);
        Ok(Attempt::Taken { previous: previous.map(|p| p.get_str("owner").unwrap_or("an unknown owner").to_string()) })
    }

    fn start_heartbeat(&mut self, conn: &Conn) {
        let lost = Arc::new(AtomicBool::new(false));
        let (coll, id, token, ttl, skew) = (self.coll.clone(), self.id.clone(), self.token, self.ttl, conn.skew);
        let flag = lost.clone();
        let task = tokio::spawn(async move {
            let every = ttl / 3;
            let ttl_c = chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::seconds(30));
            let mut last_ok = std::time::Instant::now();
            loop {
                tokio::time::sleep(every).await;
                let now = chrono::Utc::now() + skew;
                let r = coll
                    .update_one(
                        doc! { "_id": &id, "token": token },
                        doc! { "$set": { "expires": to_bson_time(now + ttl_c), "heartbeat": to_bson_time(now) } },
                    )
                    .await;
                match r {
                    Ok(r) if r.matched_count == 1 => last_ok = std::time::Instant::now(),
                    Ok(_) => {
                        tracing::warn!(lock = %id, "the migration lock lease was taken over by another runner");
                        flag.store(true, Ordering::SeqCst);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(lock = %id, error = %e, "could not renew the migration lock lease");
                        if last_ok.elapsed() >= ttl {
                            // Expired as far as other runners can tell: stop trusting it.
                            flag.store(true, Ordering::SeqCst);
                            return;
                        }
                    }
                }
            }
        });
        self.held = Some(Held { task, lost });
    }

    fn stop(&mut self) {
        if let Some(h) = self.held.take() {
            h.task.abort();
        }
    }

    /// Stop renewing and delete the lease if it is still ours. Not holding it is not an error.
    pub async fn release(&mut self, conn: &Conn) -> Result<(), EngineError> {
        if self.held.is_none() {
            return Ok(());
        }
        self.stop();
        self.coll
            .delete_one(doc! { "_id": &self.id, "token": self.token })
            .await
            .map_err(|e| conn.engine_error("releasing the migration lock", &e))?;
        Ok(())
    }

    /// A release that needs no `&mut self`: stops renewing at once and deletes
    /// the lease (if still ours) on the current Tokio runtime in the
    /// background. Without a runtime the lease simply expires after its TTL.
    pub fn detached_release(&self) -> Box<dyn FnOnce() + Send> {
        let abort = self.held.as_ref().map(|h| h.task.abort_handle());
        let (coll, id, token) = (self.coll.clone(), self.id.clone(), self.token);
        Box::new(move || {
            let Some(abort) = abort else { return };
            abort.abort();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    if let Err(e) = coll.delete_one(doc! { "_id": &id, "token": token }).await {
                        tracing::warn!(lock = %id, error = %e, "could not release the migration lock lease; it expires after its TTL");
                    }
                });
            }
        })
    }

    /// Who holds the lease, for messages: owner, since when, and when it expires.
    pub async fn holder(&self, conn: &Conn) -> Option<String> {
        let d = self.coll.find_one(doc! { "_id": &self.id }).await.ok()??;
        let owner = d.get_str("owner").unwrap_or("unknown owner");
        let now = conn.now();
        let when = |k: &str| d.get_datetime(k).ok().map(|t| t.to_chrono());
        let mut s = format!("held by {owner}");
        if let Some(a) = when("acquired") {
            s.push_str(&format!(" since {}", a.format("%Y-%m-%d %H:%M:%S UTC")));
        }
        if let Some(e) = when("expires") {
            let left = (e - now).num_milliseconds() as f64 / 1000.0;
            if left >= 0.0 {
                s.push_str(&format!(", lease expires at {} (in {left:.0}s unless renewed)", e.format("%H:%M:%S UTC")));
            } else {
                s.push_str(&format!(", lease expired at {} ({:.0}s ago; the next runner takes it over)", e.format("%H:%M:%S UTC"), -left));
            }
        }
        Some(s)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Without a runtime to delete the document, stop renewing so the lease
        // expires on its own.
        self.stop();
    }
}
