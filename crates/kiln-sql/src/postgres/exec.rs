//! Running migration bodies: the one-pipeline atomic step, statements one at
//! a time for `-- kiln:transaction off`, what a body may contain, and how a
//! failing statement is named.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use async_trait::async_trait;
use futures::future::{maybe_done, MaybeDone};
use kiln_core::engine::{AtomicFailure, Engine, ExecFailure, Executor, Left, Record, SchemaCheck, Step};
use kiln_core::step::{path, Path};
use kiln_core::{EngineError, Statement, StatementError};
use tokio_postgres::error::{DbError, ErrorPosition};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Client;

use super::code::PgCode;
use super::conn::{db_message, error_text, is_connection_loss};
use super::history::RecordVals;
use super::PgBackend;

#[async_trait]
impl Executor for PgBackend {
    /// Refuses, before anything runs: a body that is not SQL; `COPY … STDIN`
    /// anywhere; on the atomic path, a `BEGIN`/`COMMIT`/`ROLLBACK` that would
    /// end kiln's transaction (see [`BodyPlan::transactional`]).
    async fn prepare(&mut self, step: &Step<'_>) -> Result<(), StatementError> {
        if step.code().is_some() {
            return Ok(());
        }
        let (file, statements) = sql_body(step)?;
        let refused = match path(&self.capabilities(), step.migration) {
            Path::Atomic => BodyPlan::transactional(statements).err(),
            Path::Intent => refused_anywhere(statements),
        };
        match refused {
            Some((index, message)) => Err(statement_error(&file, statements, index, message, None)),
            None => Ok(()),
        }
    }

    /// One pipeline, one round trip (see the module docs of `postgres`):
    /// `BEGIN; SET LOCAL synchronous_commit TO off; <search_path>`, the body,
    /// `record`, `COMMIT`. Rows of the step's own version take `applied_at`
    /// and `duration_ms` from the server clock.
    ///
    /// With `check`, the pipeline stops short of `COMMIT`: the schema is
    /// inspected inside the still-open transaction (it sees the body's
    /// uncommitted DDL), and violations roll everything back — body, history
    /// row and event alike. That costs two round trips more (inspection, then
    /// `COMMIT`/`ROLLBACK`).
    async fn run_atomic(&mut self, step: &Step<'_>, record: &Record, check: Option<&SchemaCheck>) -> Result<(), AtomicFailure> {
        if let Some(code) = step.code() {
            return self.code_atomic(step, code, record, check).await;
        }
        let m = step.migration;
        let (file, statements) = sql_body(step).map_err(AtomicFailure::Body)?;
        let plan =
            BodyPlan::transactional(statements).map_err(|(i, message)| AtomicFailure::Body(statement_error(&file, statements, i, message, None)))?;
        let prelude = format!("BEGIN; SET LOCAL synchronous_commit TO {}; {}", if record.durable { "on" } else { "off" }, self.search_path_sql());
        let vals = RecordVals::new(record);
        let mut items: Vec<(Tag, Item<'_>)> = Vec::with_capacity(plan.run.len() + record.changes.len() + record.events.len() + 2);
        items.push((Tag::Prelude, Item::Simple(&prelude)));
        for &i in &plan.run {
            items.push((Tag::Statement(i), Item::Simple(&statements[i].sql)));
        }
        vals.push(&self.sql, Some(m.version.number), &mut items);
        if check.is_none() {
            items.push((Tag::Commit, Item::Simple("COMMIT")));
        }

        let mut result = run_items(&self.client, &items, plan.pipelined).await;
        drop(items);
        if let (Ok(()), Some(check)) = (&result, check) {
            self.check_in_transaction(m, check).await?;
            result = self.client.batch_execute("COMMIT").await.map_err(|e| (Tag::Commit, e));
        }
        let Err((tag, e)) = result else {
            return Ok(());
        };
        if is_connection_loss(&e) {
            return Err(AtomicFailure::Engine(self.engine_error(&format!("running {} ({})", m.name(), step.word()), &e)));
        }
        if (check.is_some() || !plan.pipelined) && tag != Tag::Commit {
            // Without COMMIT in the pipeline (sequential runs, or a check still to
            // come), a failure leaves the aborted transaction open.
            if let Err(re) = self.client.batch_execute("ROLLBACK").await {
                return Err(AtomicFailure::Engine(self.engine_error("rolling back a failed migration", &re)));
            }
        }
        match (tag, e.as_db_error()) {
            (Tag::Statement(i), Some(db)) => Err(AtomicFailure::Body(statement_error(&file, statements, i, db_message(db), Some(db)))),
            (Tag::Commit, Some(db)) => {
                // Deferred constraints and serialization failures surface at COMMIT.
                let last = statements.len().saturating_sub(1);
                Err(AtomicFailure::Body(statement_error(&file, statements, last, format!("at COMMIT: {}", db_message(db)), None)))
            }
            _ => {
                let what = match tag {
                    Tag::Prelude => "starting the transaction of",
                    _ => "recording",
                };
                Err(AtomicFailure::Engine(self.engine_error(&format!("{what} {} ({}); it was rolled back", m.name(), step.word()), &e)))
            }
        }
    }

    /// Statement `index` on its own, in autocommit: without a transaction,
    /// nothing may run after a failure, so there is no pipelining across
    /// statements. The first statement is preceded by the search_path reset
    /// (pipelined with it: a `SET`/`RESET search_path` fails only with the
    /// session, and then the statement fails too).
    async fn run_one(&mut self, step: &Step<'_>, index: usize) -> Result<(), ExecFailure> {
        let m = step.migration;
        if let Some(code) = step.code() {
            let context = format!("running {} ({}) outside a transaction", m.name(), step.word());
            self.client.batch_execute(&self.search_path_sql()).await.map_err(|e| ExecFailure::Engine(self.engine_error(&context, &e)))?;
            if let Err(e) = code.run(step.direction, &mut PgCode { client: &self.client }).await {
                if self.client.is_closed() {
                    return Err(ExecFailure::Engine(EngineError::Query { context, message: format!("the connection was lost: {e}") }));
                }
                // The code may have opened a transaction of its own; do not leave it aborted.
                let _ = self.client.batch_execute("ROLLBACK").await;
                return Err(ExecFailure::Statement { error: kiln_core::code::failure(&m.display_path(), e), left: crate::common::code_left() });
            }
            return Ok(());
        }
        let (file, statements) = sql_body(step).map_err(|error| ExecFailure::Statement { error, left: Left::Nothing })?;
        let context = format!("running {} ({}) outside a transaction", m.name(), step.word());
        let Some(st) = statements.get(index) else {
            return Err(ExecFailure::Engine(EngineError::Query { context, message: format!("the body has no statement {}", index + 1) }));
        };
        let set_path = self.search_path_sql();
        let mut items = Vec::with_capacity(2);
        if index == 0 {
            items.push((Tag::Prelude, Item::Simple(&set_path)));
        }
        items.push((Tag::Statement(index), Item::Simple(&st.sql)));
        let Err((tag, e)) = run_items(&self.client, &items, true).await else {
            return Ok(());
        };
        if is_connection_loss(&e) || tag == Tag::Prelude {
            // The entry stays `running`: nobody knows what the statement did.
            return Err(ExecFailure::Engine(self.engine_error(&context, &e)));
        }
        let db = e.as_db_error();
        let message = db.map(db_message).unwrap_or_else(|| error_text(&e));
        let error = statement_error(&file, statements, index, message, db);
        // A body may open its own transaction; do not leave it aborted.
        let _ = self.client.batch_execute("ROLLBACK").await;
        Err(ExecFailure::Statement { error, left: Left::autocommit(index) })
    }
}

impl PgBackend {
    /// The schema contract checked inside the open transaction of `m`: on
    /// violations (or when the schema cannot be read) the transaction is
    /// rolled back, so nothing of the migration stays.
    async fn check_in_transaction(&self, m: &kiln_core::Migration, check: &SchemaCheck) -> Result<(), AtomicFailure> {
        let violations = match self.inspect_in(true).await {
            Ok(snapshot) => check(&snapshot),
            Err(e) => {
                // The transaction is aborted (or the session gone): nothing of the migration may stay.
                let _ = self.client.batch_execute("ROLLBACK").await;
                return Err(AtomicFailure::Engine(e));
            }
        };
        if violations.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.client.batch_execute("ROLLBACK").await {
            return Err(AtomicFailure::Engine(self.engine_error(&format!("rolling back {}, which breaks the schema contract", m.name()), &e)));
        }
        Err(AtomicFailure::Invalid(violations))
    }

    /// The atomic path of a code migration: `BEGIN` (with the session
    /// settings), the code on this session, `record`, then the optional check
    /// and `COMMIT`. Any failure rolls everything back.
    async fn code_atomic(
        &mut self,
        step: &Step<'_>,
        code: &kiln_core::code::CodeRef,
        record: &Record,
        check: Option<&SchemaCheck>,
    ) -> Result<(), AtomicFailure> {
        let m = step.migration;
        let prelude = format!("BEGIN; SET LOCAL synchronous_commit TO {}; {}", if record.durable { "on" } else { "off" }, self.search_path_sql());
        if let Err(e) = self.client.batch_execute(&prelude).await {
            let _ = self.client.batch_execute("ROLLBACK").await;
            return Err(AtomicFailure::Engine(self.engine_error(&format!("starting the transaction of {}", m.name()), &e)));
        }
        if let Err(e) = code.run(step.direction, &mut PgCode { client: &self.client }).await {
            if let Err(re) = self.client.batch_execute("ROLLBACK").await {
                return Err(AtomicFailure::Engine(self.engine_error(&format!("rolling back {} after its code failed ({e})", m.name()), &re)));
            }
            return Err(AtomicFailure::Body(kiln_core::code::failure(&m.display_path(), e)));
        }
        let vals = RecordVals::new(record);
        let mut items: Vec<(Tag, Item<'_>)> = Vec::with_capacity(record.changes.len() + record.events.len());
        vals.push(&self.sql, Some(m.version.number), &mut items);
        let written = run_items(&self.client, &items, true).await;
        drop(items);
        if let Err((_, e)) = written {
            let _ = self.client.batch_execute("ROLLBACK").await;
            return Err(AtomicFailure::Engine(self.engine_error(&format!("recording {} ({}); it was rolled back", m.name(), step.word()), &e)));
        }
        if let Some(check) = check {
            self.check_in_transaction(m, check).await?;
        }
        match self.client.batch_execute("COMMIT").await {
            Ok(()) => Ok(()),
            Err(e) => match e.as_db_error() {
                // Deferred constraints and serialization failures surface at COMMIT.
                Some(db) if !is_connection_loss(&e) => {
                    Err(AtomicFailure::Body(kiln_core::code::failure(&m.display_path(), format!("at COMMIT: {}", db_message(db)))))
                }
                _ => Err(AtomicFailure::Engine(self.engine_error(&format!("committing {} ({})", m.name(), step.word()), &e))),
            },
        }
    }
}

// ---------------------------------------------------------------------------
// Running requests: pipelined or one by one.

/// What a request of a migration's pipeline is, to interpret its error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Tag {
    /// `BEGIN` and session settings.
    Prelude,
    /// Body statement (0-based index into the body).
    Statement(usize),
    /// kiln's own history / event-log writes.
    Record,
    /// The `INSERT` of a new history entry of this version (a unique
    /// violation there means another runner recorded it).
    Insert(u64),
    /// The final `COMMIT`.
    Commit,
}

/// One request: simple-query text, or a statement with typed bound parameters
/// (sent as Parse/Bind/Execute/Sync at once, so it needs no prepare round trip
/// and can be pipelined).
pub(super) enum Item<'a> {
    Simple(&'a str),
    Typed(&'a str, Vec<(&'a (dyn ToSql + Sync), Type)>),
}

async fn exec(client: &Client, item: &Item<'_>) -> Result<(), tokio_postgres::Error> {
    match item {
        Item::Simple(sql) => client.batch_execute(sql).await,
        Item::Typed(sql, params) => client.execute_typed(sql, params).await.map(|_| ()),
    }
}

/// Run `items` in order and return the first failure.
///
/// Pipelined: every request is written before any answer is awaited. A
/// tokio-postgres future hands its request to the connection task during its
/// first poll, so polling them once each, in order, puts them on the wire in
/// order; the answers are then collected in the same order.
pub(super) async fn run_items(client: &Client, items: &[(Tag, Item<'_>)], pipelined: bool) -> Result<(), (Tag, tokio_postgres::Error)> {
    if !pipelined {
        for (tag, item) in items {
            exec(client, item).await.map_err(|e| (*tag, e))?;
        }
        return Ok(());
    }
    let mut futs: Vec<Pin<Box<MaybeDone<_>>>> = items.iter().map(|(_, item)| Box::pin(maybe_done(exec(client, item)))).collect();
    futures::future::poll_fn(|cx| {
        for f in futs.iter_mut() {
            let _ = f.as_mut().poll(cx);
        }
        Poll::Ready(())
    })
    .await;
    let mut first = None;
    for (f, (tag, _)) in futs.iter_mut().zip(items) {
        f.as_mut().await;
        if let Some(Err(e)) = f.as_mut().take_output() {
            if first.is_none() {
                first = Some((*tag, e));
            }
        }
    }
    first.map_or(Ok(()), Err)
}

// ---------------------------------------------------------------------------
// Bodies.

/// The SQL statements of `step`'s body; any other body is refused before
/// anything runs.
fn sql_body<'b>(step: &Step<'b>) -> Result<(String, &'b [Statement]), StatementError> {
    match step.sql("postgres") {
        Ok((file, statements)) => Ok((file.display().to_string(), statements)),
        Err(e) => Err(StatementError { file: step.migration.display_path(), statement: 1, line: 1, message: e.to_string(), code: None }),
    }
}

/// How a body's statement changes the transaction state, if it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TxControl {
    None,
    /// `BEGIN`, `START TRANSACTION`.
    Begin,
    /// `COMMIT`, `END`.
    Commit,
    /// `ROLLBACK`, `ABORT`.
    Rollback,
    /// `SAVEPOINT`, `RELEASE`, `ROLLBACK TO`: stays inside the transaction but
    /// can revive an aborted one, so such bodies are not pipelined.
    Savepoint,
    /// Two-phase commit commands.
    Prepared,
}

/// The first few keywords of a statement, upper-cased, leading comments skipped.
fn leading_words(sql: &str, n: usize) -> Vec<String> {
    let b = sql.as_bytes();
    let mut i = 0;
    let mut words = Vec::new();
    while i < b.len() && words.len() < n {
        if b[i].is_ascii_whitespace() {
            i += 1;
        } else if b[i..].starts_with(b"--") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if b[i].is_ascii_alphabetic() || b[i] == b'_' {
            let s = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            words.push(sql[s..i].to_ascii_uppercase());
        } else {
            break;
        }
    }
    words
}

fn tx_control(sql: &str) -> TxControl {
    let w = leading_words(sql, 4);
    let w: Vec<&str> = w.iter().map(String::as_str).collect();
    match w.as_slice() {
        ["BEGIN", ..] | ["START", "TRANSACTION", ..] => TxControl::Begin,
        ["COMMIT", "PREPARED", ..] | ["ROLLBACK", "PREPARED", ..] | ["PREPARE", "TRANSACTION", ..] => TxControl::Prepared,
        ["COMMIT", ..] | ["END", ..] => TxControl::Commit,
        ["ROLLBACK", rest @ ..] if rest.iter().take(2).any(|x| *x == "TO") => TxControl::Savepoint,
        ["ROLLBACK", ..] | ["ABORT", ..] => TxControl::Rollback,
        ["SAVEPOINT", ..] | ["RELEASE", ..] => TxControl::Savepoint,
        _ => TxControl::None,
    }
}

/// `COPY … FROM STDIN` / `TO STDOUT` need a data stream a migration file does
/// not carry (psql's `\copy`), and would leave the protocol mid-copy.
fn is_copy_stream(sql: &str) -> bool {
    leading_words(sql, 1).first().is_some_and(|w| w == "COPY") && {
        let u = sql.to_ascii_uppercase();
        u.contains("STDIN") || u.contains("STDOUT")
    }
}

/// A statement no mode can run, with the reason.
fn refused_anywhere(statements: &[Statement]) -> Option<(usize, String)> {
    statements.iter().position(|s| is_copy_stream(&s.sql)).map(|i| {
        (i, "COPY … FROM STDIN / TO STDOUT needs a client data stream (psql's \\copy) and cannot run from a migration; use INSERT, or COPY from a file on the server".to_string())
    })
}

/// What to run of a body in the default (transactional) mode, and how.
#[derive(Debug)]
struct BodyPlan {
    /// Indices of the statements to send, in order.
    run: Vec<usize>,
    /// Whether the whole transaction can be sent as one pipeline.
    pipelined: bool,
}

impl BodyPlan {
    /// Plan a body that runs inside kiln's transaction.
    ///
    /// - A `BEGIN` … `COMMIT` pair wrapping the whole file (common in
    ///   golang-migrate projects) is dropped: kiln's transaction does the same job.
    /// - Any other `BEGIN`/`COMMIT`/`ROLLBACK` (or two-phase command) would end
    ///   kiln's transaction early and break "the migration and its history
    ///   row commit together", so the migration is refused before anything runs,
    ///   naming the statement (`Err((index, message))`).
    /// - `SAVEPOINT`/`ROLLBACK TO` can revive a transaction after a failed
    ///   statement, so a pipeline could run statements after a failure: such
    ///   bodies run one statement at a time instead.
    fn transactional(statements: &[Statement]) -> Result<BodyPlan, (usize, String)> {
        if let Some(refused) = refused_anywhere(statements) {
            return Err(refused);
        }
        let kinds: Vec<TxControl> = statements.iter().map(|s| tx_control(&s.sql)).collect();
        let n = kinds.len();
        let wrapped = n >= 2
            && kinds[0] == TxControl::Begin
            && kinds[n - 1] == TxControl::Commit
            && kinds[1..n - 1].iter().all(|k| matches!(k, TxControl::None | TxControl::Savepoint));
        let range = if wrapped { 1..n - 1 } else { 0..n };
        if let Some(i) = range.clone().find(|&i| !matches!(kinds[i], TxControl::None | TxControl::Savepoint)) {
            let word = leading_words(&statements[i].sql, 1).pop().unwrap_or_default();
            return Err((
                i,
                format!(
                    "{word} would end kiln's transaction: kiln runs each migration in one transaction together with its history entry, \
                     so a migration must not BEGIN, COMMIT or ROLLBACK itself (a BEGIN … COMMIT pair around the whole file is accepted). \
                     Remove it, or add `-- kiln:transaction off` to run the file statement by statement without a transaction"
                ),
            ));
        }
        let pipelined = !range.clone().any(|i| kinds[i] == TxControl::Savepoint);
        Ok(BodyPlan { run: range.collect(), pipelined })
    }
}

/// The error of body statement `index` (0-based), its line moved to the
/// server's error position within the statement when there is one.
fn statement_error(file: &str, statements: &[Statement], index: usize, message: String, db: Option<&DbError>) -> StatementError {
    let (line, code) = match statements.get(index) {
        Some(st) => {
            let line = match db.and_then(DbError::position) {
                Some(ErrorPosition::Original(pos)) => line_at(st, *pos as usize),
                _ => st.line,
            };
            (line, db.map(|d| d.code().code().to_string()))
        }
        None => (0, db.map(|d| d.code().code().to_string())),
    };
    StatementError { file: file.to_string(), statement: index + 1, line, message, code }
}

/// The file line of the 1-based character position `pos` of statement `st`
/// (PostgreSQL reports error positions in characters of the query text).
fn line_at(st: &Statement, pos: usize) -> usize {
    st.line + st.sql.chars().take(pos.saturating_sub(1)).filter(|c| *c == '\n').count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(sql: &str) -> Statement {
        Statement { sql: sql.into(), line: 1 }
    }

    #[test]
    fn recognises_transaction_control() {
        assert_eq!(tx_control("begin"), TxControl::Begin);
        assert_eq!(tx_control("-- c; x\n/* y */ START TRANSACTION ISOLATION LEVEL SERIALIZABLE"), TxControl::Begin);
        assert_eq!(tx_control("COMMIT"), TxControl::Commit);
        assert_eq!(tx_control("end"), TxControl::Commit);
        assert_eq!(tx_control("rollback"), TxControl::Rollback);
        assert_eq!(tx_control("ROLLBACK TO SAVEPOINT a"), TxControl::Savepoint);
        assert_eq!(tx_control("rollback work to a"), TxControl::Savepoint);
        assert_eq!(tx_control("savepoint a"), TxControl::Savepoint);
        assert_eq!(tx_control("COMMIT PREPARED 'x'"), TxControl::Prepared);
        assert_eq!(tx_control("DO $$ BEGIN PERFORM 1; END $$"), TxControl::None);
        assert_eq!(tx_control("CREATE FUNCTION f() RETURNS int BEGIN ATOMIC SELECT 1; END"), TxControl::None);
        assert_eq!(tx_control("prepare q as select 1"), TxControl::None);
    }

    #[test]
    fn body_plans() {
        let p = BodyPlan::transactional(&[st("create table a (id int)"), st("insert into a values (1)")]).unwrap();
        assert_eq!((p.run, p.pipelined), (vec![0, 1], true));
        let p = BodyPlan::transactional(&[st("BEGIN"), st("create table a (id int)"), st("COMMIT")]).unwrap();
        assert_eq!((p.run, p.pipelined), (vec![1], true));
        let p = BodyPlan::transactional(&[st("savepoint s"), st("create table a (id int)"), st("release s")]).unwrap();
        assert_eq!((p.run, p.pipelined), (vec![0, 1, 2], false));
        let e = BodyPlan::transactional(&[st("create table a (id int)"), st("commit"), st("create table b (id int)")]).unwrap_err();
        assert_eq!(e.0, 1);
        assert!(e.1.contains("COMMIT"), "{}", e.1);
        assert_eq!(BodyPlan::transactional(&[st("BEGIN"), st("select 1"), st("ROLLBACK")]).unwrap_err().0, 0);
        assert_eq!(BodyPlan::transactional(&[st("select 1"), st("COPY t FROM stdin")]).unwrap_err().0, 1);
    }

    #[test]
    fn error_line_follows_the_position() {
        let sts = [Statement { sql: "create table t (\n  id int,\n  x nosuchtype\n)".into(), line: 10 }];
        assert_eq!(line_at(&sts[0], 1), 10);
        assert_eq!(line_at(&sts[0], 17), 10);
        assert_eq!(line_at(&sts[0], 18), 11);
        assert_eq!(line_at(&sts[0], 32), 12);
        let e = statement_error("f.sql", &sts, 0, "m".into(), None);
        assert_eq!((e.statement, e.line, e.code), (1, 10, None));
    }
}
