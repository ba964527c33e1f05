//! Running migration bodies: [`Executor`] for SQLite.
//!
//! On the atomic path (every migration but `-- kiln:transaction off` ones) the
//! statements, the optional schema check and the record commit in one
//! `BEGIN IMMEDIATE … COMMIT`; on the intent path each statement runs on its
//! own in autocommit. Which path a step takes is [`kiln_core::step`]'s choice.

use std::path::Path;
use std::time::Instant;

use async_trait::async_trait;
use chrono::Utc;
use kiln_core::engine::{AtomicFailure, Engine, ExecFailure, Executor, Left, Record, SchemaCheck, Step};
use kiln_core::step::{path, Path as StepPath};
use kiln_core::{EngineError, Statement, StatementError};

use super::code::SqliteCode;
use super::history::Clock;
use super::SqliteEngine;
use crate::common::code_left;

/// The file and statements of `step`'s body, or why SQLite cannot run it.
fn sql_body<'a>(step: &Step<'a>) -> Result<(&'a Path, &'a [Statement]), EngineError> {
    step.sql("sqlite")
}

#[async_trait]
impl Executor for SqliteEngine {
    /// On the atomic path, refuses a body with a statement that begins or ends
    /// a transaction itself: it would make the history write land outside
    /// kiln's transaction.
    ///
    /// A body SQLite cannot run (MongoDB commands, code) is refused here on
    /// the intent path, before its `running` entry is written; on the atomic
    /// path [`Executor::run_atomic`] reports it as
    /// [`EngineError::Refused`], before anything runs.
    async fn prepare(&mut self, step: &Step<'_>) -> Result<(), StatementError> {
        if step.code().is_some() {
            return Ok(());
        }
        let atomic = path(&self.capabilities(), step.migration) == StepPath::Atomic;
        let (file, statements) = match sql_body(step) {
            Ok(body) => body,
            Err(_) if atomic => return Ok(()),
            Err(e) => {
                return Err(StatementError { file: step.migration.display_path(), statement: 1, line: 1, message: e.to_string(), code: None });
            }
        };
        if !atomic {
            return Ok(());
        }
        match statements.iter().enumerate().find(|(_, s)| controls_transaction(&s.sql)) {
            Some((i, st)) => Err(StatementError {
                file: file.display().to_string(),
                statement: i + 1,
                line: st.line,
                message: "the statement controls the transaction itself, but kiln runs every SQLite migration in its own transaction; \
                          remove BEGIN/COMMIT/END/ROLLBACK from the file, or add `-- kiln:transaction off` to manage transactions yourself"
                    .into(),
                code: None,
            }),
            None => Ok(()),
        }
    }

    /// `BEGIN IMMEDIATE`, the statements, `check` on the schema the
    /// transaction would commit (same connection, uncommitted DDL included),
    /// then `record` and `COMMIT`. The rows of the step's own version get the
    /// finish time and the duration from here (everything but the `COMMIT`,
    /// which costs no disk flush in WAL mode unless `record` is durable, see
    /// [`super::journal`]). Any failure rolls everything back.
    async fn run_atomic(&mut self, step: &Step<'_>, record: &Record, check: Option<&SchemaCheck>) -> Result<(), AtomicFailure> {
        if let Some(code) = step.code() {
            // The code runs inside the transaction, then check, record and
            // COMMIT as for statements.
            let started = Instant::now();
            if let Err(e) = self.begin(record.durable) {
                self.end();
                return Err(AtomicFailure::Engine(self.query_err(format!("starting the transaction of {}", step.migration.name()), e)));
            }
            let ran = code.run(step.direction, &mut SqliteCode { conn: &mut self.conn }).await;
            let r = match ran {
                Ok(()) => self.atomic(step, Path::new(""), &[], record, check, started),
                Err(e) => {
                    self.rollback();
                    Err(AtomicFailure::Body(kiln_core::code::failure(&step.migration.display_path(), e)))
                }
            };
            self.end();
            return r;
        }
        let (file, statements) = sql_body(step).map_err(AtomicFailure::Engine)?;
        let started = Instant::now();
        let r = match self.begin(record.durable) {
            Ok(()) => self.atomic(step, file, statements, record, check, started),
            Err(e) => Err(AtomicFailure::Engine(self.query_err(format!("starting the transaction of {}", step.migration.name()), e))),
        };
        self.end();
        r
    }

    /// Statement `index` in autocommit. On failure, whatever the statement
    /// left open is rolled back, and the statements before it remain.
    async fn run_one(&mut self, step: &Step<'_>, index: usize) -> Result<(), ExecFailure> {
        if let Some(code) = step.code() {
            if let Err(e) = code.run(step.direction, &mut SqliteCode { conn: &mut self.conn }).await {
                self.rollback();
                return Err(ExecFailure::Statement { error: kiln_core::code::failure(&step.migration.display_path(), e), left: code_left() });
            }
            return Ok(());
        }
        let (file, statements) = sql_body(step).map_err(ExecFailure::Engine)?;
        let st = statements.get(index).ok_or_else(|| {
            ExecFailure::Engine(EngineError::Query {
                context: format!("running {}", step.migration.name()),
                message: format!("statement {} asked for, but the body has {}", index + 1, statements.len()),
            })
        })?;
        if let Err(e) = self.conn.execute_batch(&st.sql) {
            self.rollback();
            return Err(ExecFailure::Statement { error: statement_error(file, index, st, &e), left: Left::autocommit(index) });
        }
        Ok(())
    }
}

impl SqliteEngine {
    /// The rest of [`Executor::run_atomic`], inside the transaction it began.
    /// The rows of the step's own version get the finish time and the
    /// duration from `started` to just before `COMMIT`.
    fn atomic(
        &mut self,
        step: &Step<'_>,
        file: &Path,
        statements: &[Statement],
        record: &Record,
        check: Option<&SchemaCheck>,
        started: Instant,
    ) -> Result<(), AtomicFailure> {
        let m = step.migration;
        for (i, st) in statements.iter().enumerate() {
            if let Err(e) = self.conn.execute_batch(&st.sql) {
                self.rollback();
                return Err(AtomicFailure::Body(statement_error(file, i, st, &e)));
            }
        }
        if let Some(check) = check {
            let violations = match self.inspect_sync() {
                Ok(snapshot) => check(&snapshot),
                Err(e) => {
                    // Unchecked changes must not stay.
                    self.rollback();
                    return Err(AtomicFailure::Engine(e));
                }
            };
            if !violations.is_empty() {
                self.conn
                    .execute_batch("ROLLBACK")
                    .map_err(|e| AtomicFailure::Engine(self.query_err(format!("rolling back {}, which breaks the schema contract", m.name()), e)))?;
                return Err(AtomicFailure::Invalid(violations));
            }
        }
        let at = Utc::now();
        let clock = Clock { version: m.version.number, at: &at, ms: started.elapsed().as_millis() as i64 };
        let written = self.write_record(record, Some(&clock)).and_then(|()| {
            self.conn.execute_batch("COMMIT").map_err(|e| self.query_err(format!("committing {} and its history entry", m.name()), e))
        });
        if let Err(e) = written {
            self.rollback();
            return Err(AtomicFailure::Engine(e));
        }
        Ok(())
    }
}

/// True for statements that begin or end a transaction (savepoints excepted).
fn controls_transaction(sql: &str) -> bool {
    let mut words = leading_words(sql);
    match words.next().as_deref() {
        Some("BEGIN" | "COMMIT" | "END") => true,
        // `ROLLBACK [TRANSACTION] TO [SAVEPOINT] x` only rewinds to a savepoint.
        Some("ROLLBACK") => {
            let next = words.next();
            let to = if next.as_deref() == Some("TRANSACTION") { words.next() } else { next };
            to.as_deref() != Some("TO")
        }
        _ => false,
    }
}

/// Upper-cased words at the start of a statement, skipping comments.
fn leading_words(sql: &str) -> impl Iterator<Item = String> + '_ {
    let mut rest = sql;
    std::iter::from_fn(move || loop {
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix("--") {
            rest = r.find('\n').map(|i| &r[i..]).unwrap_or("");
        } else if let Some(r) = rest.strip_prefix("/*") {
            rest = r.find("*/").map(|i| &r[i + 2..]).unwrap_or("");
        } else {
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
            if end == 0 {
                return None;
            }
            let w = rest[..end].to_ascii_uppercase();
            rest = &rest[end..];
            return Some(w);
        }
    })
}

fn statement_error(file: &Path, index: usize, st: &Statement, e: &rusqlite::Error) -> StatementError {
    let (message, code) = match e {
        rusqlite::Error::SqliteFailure(err, msg) => {
            let text = msg.clone().unwrap_or_else(|| err.to_string());
            (format!("{text} (SQLite error {})", err.extended_code), Some(err.extended_code.to_string()))
        }
        other => (other.to_string(), None),
    };
    StatementError { file: file.display().to_string(), statement: index + 1, line: st.line, message, code }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_control() {
        assert!(controls_transaction("BEGIN"));
        assert!(controls_transaction("-- c\ncommit"));
        assert!(controls_transaction("END TRANSACTION"));
        assert!(controls_transaction("ROLLBACK"));
        assert!(!controls_transaction("ROLLBACK TO sp1"));
        assert!(!controls_transaction("CREATE TRIGGER t AFTER INSERT ON a BEGIN SELECT 1; END"));
        assert!(!controls_transaction("SAVEPOINT a"));
    }
}
