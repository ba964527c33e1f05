//! The migration lock: `GET_LOCK('kiln:<database>:<history table>')`, held by
//! the session, so it dies with the process or the connection.
//!
//! The core waits by polling [`Locker::try_lock`] ([`kiln_core::lock::acquire`]).
//! [`Locker::detached_unlock`] cannot reach the connection (it runs without
//! `&mut self`, from a guard's `Drop`): it sets a flag, and every method of the
//! engine releases a flagged lock first ([`MysqlEngine::settle_lock`]).
//! Dropping or closing the engine closes the session, which releases the lock
//! in any case.

use std::sync::atomic::Ordering;

use async_trait::async_trait;
use kiln_core::engine::Locker;
use kiln_core::EngineError;
use sqlx::Row;

use super::MysqlEngine;

impl MysqlEngine {
    /// Release the lock if a dropped guard asked for it (module docs). Called
    /// first by every method of the engine.
    pub(super) async fn settle_lock(&mut self) -> Result<(), EngineError> {
        if self.release_lock.swap(false, Ordering::AcqRel) {
            self.release().await?;
        }
        Ok(())
    }

    async fn release(&mut self) -> Result<(), EngineError> {
        if self.locked {
            sqlx::query("SELECT RELEASE_LOCK(?)")
                .bind(&self.lock_name)
                .execute(&mut self.conn)
                .await
                .map_err(|e| self.err("releasing the migration lock", e))?;
            self.locked = false;
        }
        Ok(())
    }

    async fn ask_holder(&mut self) -> Result<Option<String>, sqlx::Error> {
        let id: Option<i64> =
            sqlx::query("SELECT CAST(IS_USED_LOCK(?) AS SIGNED)").bind(&self.lock_name).fetch_one(&mut self.conn).await?.try_get(0)?;
        let Some(id) = id else { return Ok(None) };
        // PROCESSLIST shows other users' sessions only with the PROCESS privilege.
        let who = sqlx::query("SELECT USER, HOST FROM information_schema.PROCESSLIST WHERE ID = ?")
            .bind(id)
            .fetch_optional(&mut self.conn)
            .await?
            .map(|r| -> Result<String, sqlx::Error> { Ok(format!("{}@{}", r.try_get::<String, _>(0)?, r.try_get::<String, _>(1)?)) })
            .transpose()?;
        Ok(Some(match who {
            Some(w) => format!("MySQL connection {id} ({w}) holds lock {:?}", self.lock_name),
            None => format!("MySQL connection {id} holds lock {:?}", self.lock_name),
        }))
    }
}

#[async_trait]
impl Locker for MysqlEngine {
    async fn try_lock(&mut self) -> Result<bool, EngineError> {
        self.settle_lock().await?;
        // GET_LOCK is re-entrant and counted; asking twice would need two releases.
        if self.locked {
            return Ok(true);
        }
        let got = sqlx::query("SELECT CAST(GET_LOCK(?, 0) AS SIGNED)")
            .bind(&self.lock_name)
            .fetch_one(&mut self.conn)
            .await
            .and_then(|r| r.try_get::<Option<i64>, _>(0));
        match got {
            Ok(Some(1)) => {
                self.locked = true;
                Ok(true)
            }
            Ok(_) => Ok(false),
            Err(e) => Err(self.err("taking the migration lock", e)),
        }
    }

    async fn holder(&mut self) -> Option<String> {
        if let Err(e) = self.settle_lock().await {
            tracing::debug!("{e}");
        }
        match self.ask_holder().await {
            Ok(h) => h,
            Err(e) => {
                tracing::debug!("cannot tell who holds the lock: {e}");
                None
            }
        }
    }

    async fn unlock(&mut self) -> Result<(), EngineError> {
        self.release_lock.store(false, Ordering::Release);
        self.release().await
    }

    /// Marks the lock for release at the engine's next use (module docs).
    fn detached_unlock(&self) -> Box<dyn FnOnce() + Send> {
        let flag = self.release_lock.clone();
        Box::new(move || flag.store(true, Ordering::Release))
    }
}
