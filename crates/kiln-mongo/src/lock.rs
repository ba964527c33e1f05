//! The migration lock: a fenced lease document renewed by a heartbeat.
//!
//! MongoDB has no session-scoped lock that dies with the process, so the lock
//! is a document `{_id: <history collection>, owner, token, epoch, acquired,
//! expires, heartbeat, host, pid, boot_id, pid_ns, started}` in `kiln_lock`.
//!
//! **Taking it** is one atomic `findAndModify` with `upsert`: the filter
//! matches only an *expired* lease (which is taken over); when the lease is
//! live the upsert collides with the existing `_id` (error 11000) and the lock
//! is held by someone else; when there is no lease the upsert inserts ours.
//! Every acquisition gets a new `token` (the fencing token) and the next
//! `epoch`. A live lease whose holder is **provably dead** — same host, boot
//! and pid namespace, and its pid gone (see [`crate::proc`]) — is taken over at
//! once instead of after its TTL, with a `lock-takeover` event.
//!
//! **Fencing.** A runner whose lease expired (it was frozen, or cut off) and
//! was taken over must not write anything more. Every history and log write of
//! the holder therefore carries the *fence*: an update of the lease document
//! filtered on our token that renews it, sent in the same ordered `bulkWrite`
//! as the writes it guards (store.rs). When the token no longer matches, the
//! fence's upsert fails (`$setOnInsert` on `token.lost` cannot be applied to
//! the token: error 28; or the `_id` collides: 11000), and the ordered command
//! stops before the writes after it. Because the fence renews the lease, no
//! other runner can take it between the fence and the writes that follow it.
//!
//! **Before each command** of a migration the lease is checked: it is
//! provably ours while less than half a TTL has passed since a renewal was
//! sent and acknowledged (measured on the local monotonic clock, which keeps
//! running while the process is frozen); otherwise the check renews it through
//! the fence first. A renewal that fails for any reason stops the run: the
//! heartbeat fails closed.
//!
//! Times are the server's clock (local clock corrected by the skew measured at
//! connect), so runners on machines with different clocks agree on expiry.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bson::oid::ObjectId;
use bson::{doc, Document};
use kiln_core::EngineError;
use mongodb::options::ReturnDocument;
use mongodb::Collection;
use tokio::task::JoinHandle;

use crate::conn::{error_code, Conn};
use crate::proc::Identity;

/// The collection holding lease documents.
pub const LOCK_COLLECTION: &str = "kiln_lock";

/// Default lease time-to-live: a crashed runner blocks others at most this long.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);

/// Result of one attempt to take the lease.
#[derive(Debug)]
pub(crate) enum Attempt {
    /// Ours now; `previous` says whose lease we took over, and why we could.
    Taken { previous: Option<String> },
    /// Someone else holds a live lease.
    Held,
}

/// What the runner knows about its lease, shared with the heartbeat task.
#[derive(Default)]
struct Shared {
    /// Until when the lease is provably ours (local monotonic clock).
    valid_until: Mutex<Option<Instant>>,
    /// The lease was taken over by another runner (or deleted): final.
    lost: AtomicBool,
}

impl Shared {
    fn renewed(&self, until: Instant) {
        let mut v = self.valid_until.lock().expect("not poisoned");
        *v = Some(v.map_or(until, |old| old.max(until)));
    }

    fn valid(&self) -> bool {
        !self.lost.load(Ordering::SeqCst) && self.valid_until.lock().expect("not poisoned").is_some_and(|t| Instant::now() < t)
    }
}

/// One runner's view of the lease.
pub(crate) struct Lease {
    coll: Collection<Document>,
    id: String,
    owner: String,
    me: Identity,
    token: ObjectId,
    epoch: i64,
    ttl: Duration,
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
    /// Writes carry the fence: set by an acquisition, cleared by releasing a
    /// lease that is still ours (a lost lease stays fenced: nothing more is written).
    fenced: bool,
}

fn to_bson_time(t: chrono::DateTime<chrono::Utc>) -> bson::DateTime {
    bson::DateTime::from_chrono(t)
}

/// Whether a fence (or renewal) failure means the token no longer matches.
pub(crate) fn is_fence_code(code: i32) -> bool {
    code == 28 || code == 11000
}

impl Lease {
    /// The lease guarding history collection `history` in `conn`'s database.
    pub fn new(conn: &Conn, history: &str) -> Lease {
        let me = Identity::current();
        Lease {
            coll: conn.db.collection(LOCK_COLLECTION),
            id: history.to_string(),
            owner: format!("{} pid {}", kiln_core::current_actor(), me.pid),
            me,
            token: ObjectId::new(),
            epoch: 0,
            ttl: DEFAULT_TTL,
            shared: Arc::new(Shared::default()),
            task: None,
            fenced: false,
        }
    }

    /// Change the time-to-live (renewed every third of it). Takes effect at the next acquisition.
    pub fn set_ttl(&mut self, ttl: Duration) {
        self.ttl = ttl.max(Duration::from_millis(300));
    }

    /// True when this runner took the lease and has not released it: its
    /// writes must carry the fence.
    pub fn is_fenced(&self) -> bool {
        self.fenced
    }

    /// True when the lease we took was found taken over (or deleted).
    pub fn is_lost(&self) -> bool {
        self.fenced && self.shared.lost.load(Ordering::SeqCst)
    }

    fn ttl_chrono(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.ttl).unwrap_or(chrono::Duration::seconds(30))
    }

    /// How long after a renewal is *sent* the lease is still provably ours:
    /// half the TTL, leaving the other half for clock error between runners.
    fn safe_for(&self) -> Duration {
        self.ttl / 2
    }

    /// The fence: filter and update of the lease document (see the module docs).
    pub fn fence(&self, conn: &Conn) -> (Document, Document) {
        let now = conn.now();
        (
            doc! { "_id": &self.id, "token": self.token },
            doc! {
                "$set": { "expires": to_bson_time(now + self.ttl_chrono()), "heartbeat": to_bson_time(now) },
                "$setOnInsert": { "token.lost": true },
            },
        )
    }

    /// The namespace of the lease collection, for `bulkWrite`.
    pub fn namespace(&self, conn: &Conn) -> String {
        format!("{}.{LOCK_COLLECTION}", conn.db_name)
    }

    /// A fence sent at `sent` was acknowledged: the lease is ours for a while.
    pub fn fence_passed(&self, sent: Instant) {
        self.shared.renewed(sent + self.safe_for());
    }

    /// A fence failed: another runner holds the lease (or it was deleted).
    pub fn fence_failed(&self) {
        self.shared.lost.store(true, Ordering::SeqCst);
    }

    /// Renew through the fence on its own. `Ok(false)`: the lease is lost.
    async fn renew(&self, conn: &Conn) -> Result<bool, EngineError> {
        let sent = Instant::now();
        let (filter, update) = self.fence(conn);
        match self.coll.update_one(filter, update).upsert(true).await {
            Ok(_) => {
                self.fence_passed(sent);
                Ok(true)
            }
            Err(e) if error_code(&e).is_some_and(is_fence_code) => {
                self.fence_failed();
                Ok(false)
            }
            Err(e) => Err(conn.engine_error("renewing the migration lock lease", &e)),
        }
    }

    /// Make sure the lease is still ours before doing `what`: free while it
    /// is provably ours, else one renewal through the fence. Not holding a
    /// lease at all (an engine driven without the lock) passes.
    ///
    /// # Errors
    /// [`EngineError::LockLost`] naming the new holder when another runner
    /// took the lease; the renewal's error (e.g. a lost connection) otherwise.
    pub async fn check(&self, conn: &Conn, what: &str) -> Result<(), EngineError> {
        if !self.fenced || self.shared.valid() {
            return Ok(());
        }
        if !self.is_lost() {
            match self.renew(conn).await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    return Err(match e {
                        EngineError::ConnectionLost { context, message } => EngineError::ConnectionLost {
                            context: format!("{context} before {what} (the lease could not be confirmed, so kiln stopped)"),
                            message,
                        },
                        EngineError::Query { context, message } => EngineError::Query {
                            context: format!("{context} before {what} (the lease could not be confirmed, so kiln stopped)"),
                            message,
                        },
                        other => other,
                    })
                }
            }
        }
        Err(self.lost_error(conn, what).await)
    }

    /// The error of a runner that lost its lease, naming the new holder.
    pub async fn lost_error(&self, conn: &Conn, what: &str) -> EngineError {
        let holder = self.holder(conn).await.unwrap_or_else(|| "free: the lease was deleted by another runner or by hand".into());
        EngineError::LockLost {
            target: format!("{} (lease {} in {LOCK_COLLECTION}, ours was epoch {})", conn.target, self.id, self.epoch),
            holder,
            context: what.to_string(),
        }
    }

    /// The lease fields written by an acquisition.
    fn acquisition(&self, conn: &Conn, token: ObjectId) -> Document {
        let now = conn.now();
        let mut set = doc! {
            "owner": &self.owner,
            "token": token,
            "acquired": to_bson_time(now),
            "expires": to_bson_time(now + self.ttl_chrono()),
            "heartbeat": to_bson_time(now),
        };
        set.extend(self.me.to_doc());
        doc! { "$set": set, "$inc": { "epoch": 1_i64 } }
    }

    /// Try once to take the lease. Taking a lease we hold renews it.
    pub async fn try_take(&mut self, conn: &Conn) -> Result<Attempt, EngineError> {
        if self.task.is_some() && !self.is_lost() {
            let sent = Instant::now();
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
                self.fence_passed(sent);
                return Ok(Attempt::Taken { previous: None });
            }
        }
        self.stop();
        let token = ObjectId::new();
        let sent = Instant::now();
        let filter = doc! { "_id": &self.id, "expires": { "$lt": to_bson_time(conn.now()) } };
        let taken = self.coll.find_one_and_update(filter, self.acquisition(conn, token)).upsert(true).return_document(ReturnDocument::Before).await;
        let (previous, why) = match taken {
            Ok(prev) => (prev, "its lease expired".to_string()),
            Err(e) if error_code(&e) == Some(11000) => match self.take_from_dead(conn, token).await? {
                Some((prev, why)) => (Some(prev), why),
                None => return Ok(Attempt::Held),
            },
            Err(e) => return Err(conn.engine_error("taking the migration lock", &e)),
        };
        self.token = token;
        self.epoch = previous.as_ref().and_then(|p| p.get_i64("epoch").ok()).unwrap_or(0) + 1;
        self.shared = Arc::new(Shared::default());
        self.fence_passed(sent);
        self.fenced = true;
        self.start_heartbeat(conn);
        Ok(Attempt::Taken {
            previous: previous.map(|p| {
                let owner = p.get_str("owner").unwrap_or("an unknown owner");
                let epoch = p.get_i64("epoch").map(|e| format!(" (epoch {e})")).unwrap_or_default();
                format!("{owner}{epoch}: {why}")
            }),
        })
    }

    /// The live lease blocking us, taken over when its holder is provably
    /// dead: `Some((previous lease, why))`, or `None` when it may be alive.
    async fn take_from_dead(&self, conn: &Conn, token: ObjectId) -> Result<Option<(Document, String)>, EngineError> {
        let Some(current) = self.coll.find_one(doc! { "_id": &self.id }).await.map_err(|e| conn.engine_error("reading the migration lock", &e))?
        else {
            return Ok(None);
        };
        let Some(why) = self.me.dead_holder(&current) else { return Ok(None) };
        let Ok(their_token) = current.get_object_id("token") else { return Ok(None) };
        // Only that very lease: if it changed meanwhile, someone else acted first.
        let prev = self
            .coll
            .find_one_and_update(doc! { "_id": &self.id, "token": their_token }, self.acquisition(conn, token))
            .return_document(ReturnDocument::Before)
            .await
            .map_err(|e| conn.engine_error("taking over the migration lock of a process that no longer runs", &e))?;
        tracing::info!(lock = %self.id, "{why}: took over its lease without waiting for it to expire");
        Ok(prev.map(|p| (p, why)))
    }

    fn start_heartbeat(&mut self, conn: &Conn) {
        let (coll, id, token, ttl, skew, safe) = (self.coll.clone(), self.id.clone(), self.token, self.ttl, conn.skew, self.safe_for());
        let shared = self.shared.clone();
        let task = tokio::spawn(async move {
            let every = ttl / 3;
            let ttl_c = chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::seconds(30));
            loop {
                tokio::time::sleep(every).await;
                let sent = Instant::now();
                let now = chrono::Utc::now() + skew;
                let r = coll
                    .update_one(
                        doc! { "_id": &id, "token": token },
                        doc! { "$set": { "expires": to_bson_time(now + ttl_c), "heartbeat": to_bson_time(now) } },
                    )
                    .await;
                match r {
                    Ok(r) if r.matched_count == 1 => shared.renewed(sent + safe),
                    Ok(_) => {
                        tracing::warn!(lock = %id, "the migration lock lease was taken over by another runner");
                        shared.lost.store(true, Ordering::SeqCst);
                        return;
                    }
                    // Fail closed: without a renewal the lease stops being
                    // provably ours, and the next command or write renews it
                    // through the fence first (or stops).
                    Err(e) => tracing::warn!(lock = %id, error = %e, "could not renew the migration lock lease"),
                }
            }
        });
        self.task = Some(task);
    }

    fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// Stop renewing and delete the lease if it is still ours. Not holding it is not an error.
    pub async fn release(&mut self, conn: &Conn) -> Result<(), EngineError> {
        if !self.fenced {
            return Ok(());
        }
        self.stop();
        if self.is_lost() {
            return Ok(()); // not ours to delete; stay fenced: this runner writes nothing more
        }
        self.fenced = false;
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
        let abort = self.task.as_ref().map(|h| h.abort_handle());
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

    /// Who holds the lease, for messages: owner, epoch, since when, and when it expires.
    pub async fn holder(&self, conn: &Conn) -> Option<String> {
        let d = self.coll.find_one(doc! { "_id": &self.id }).await.ok()??;
        let owner = d.get_str("owner").unwrap_or("unknown owner");
        let now = conn.now();
        let when = |k: &str| d.get_datetime(k).ok().map(|t| t.to_chrono());
        let mut s = format!("held by {owner}");
        if let Ok(e) = d.get_i64("epoch") {
            s.push_str(&format!(" (lease epoch {e})"));
        }
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
