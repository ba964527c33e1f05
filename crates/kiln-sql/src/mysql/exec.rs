//! Running migration bodies: one statement per round trip over the text
//! protocol (`CREATE PROCEDURE` and friends cannot be prepared), MySQL's
//! implicit commits, and what a failure leaves behind.
//!
//! A transactional body (the default) runs inside a transaction of the
//! engine's own, committed by the next [`HistoryStore::commit`] together with
//! the migration's finish:
//!
//! - a statement that commits implicitly (DDL, …) is sent as
//!   `<statement>\n;BEGIN` ([`REOPEN`]): the server runs `BEGIN` only if the
//!   statement succeeded, so what follows it — later DML and kiln's finish —
//!   is transactional again, at no extra round trip (the newline ends a
//!   trailing `--`/`#` comment);
//! - any other statement run while no transaction is open (the first DML of a
//!   body) is sent as `BEGIN;<statement>` ([`OPEN`]), also in one round trip.
//!
//! A body with `-- kiln:transaction off` runs in autocommit: every statement
//! commits on its own.
//!
//! [`HistoryStore::commit`]: kiln_core::engine::HistoryStore::commit

use async_trait::async_trait;
use kiln_core::engine::{AtomicFailure, ExecFailure, Executor, Left, Record, SchemaCheck, Step};
use kiln_core::{Body, Direction, EngineError, StatementError, TxMode};
use sqlx::AssertSqlSafe;

use super::{describe, error_number, is_connection_error, MysqlEngine};

/// Appended to a body statement that commits implicitly (module docs).
const REOPEN: &str = "\n;BEGIN";

/// Put before a transactional statement when no transaction is open (module docs).
const OPEN: &str = "BEGIN;";

#[async_trait]
impl Executor for MysqlEngine {
    /// Refuses bodies that are not SQL (MongoDB commands, code migrations).
    async fn prepare(&mut self, step: &Step<'_>) -> Result<(), StatementError> {
        if step.code().is_some() {
            return Ok(());
        }
        match step.sql("mysql") {
            Ok(_) => Ok(()),
            Err(e) => Err(StatementError { file: step.migration.display_path(), statement: 1, line: 1, message: e.to_string(), code: None }),
        }
    }

    /// Never called: MySQL declares neither transactional DDL nor transactions
    /// on request, so the core sends every migration down the intent path.
    /// Runs nothing and commits nothing, as the contract of an `Err` requires.
    async fn run_atomic(&mut self, step: &Step<'_>, _record: &Record, _check: Option<&SchemaCheck>) -> Result<(), AtomicFailure> {
        Err(AtomicFailure::Engine(EngineError::Refused(format!(
            "{}: MySQL/MariaDB cannot run a migration and its history entry in one transaction (its DDL commits implicitly); \
             nothing was run. This is a bug in kiln: this engine only takes the intent path",
            step.migration.display_path()
        ))))
    }

    async fn run_one(&mut self, step: &Step<'_>, index: usize) -> Result<(), ExecFailure> {
        self.settle_lock().await.map_err(ExecFailure::Engine)?;
        let m = step.migration;
        if let Some(code) = step.code() {
            // Autocommit: whatever the code's statements do commits as they run.
            if let Err(e) = code.run(step.direction, &mut super::code::MysqlCode { conn: &mut self.conn }).await {
                if let Err(re) = self.roll_back().await {
                    return Err(ExecFailure::Engine(self.err(format!("rolling back after the code of {} failed ({e})", m.name()), re)));
                }
                return Err(ExecFailure::Statement { error: kiln_core::code::failure(&m.display_path(), e), left: crate::common::code_left() });
            }
            return Ok(());
        }
        let (file, statements) = step.sql("mysql").map_err(ExecFailure::Engine)?;
        let file = file.display().to_string();
        let Some(st) = statements.get(index) else {
            return Err(ExecFailure::Engine(EngineError::Refused(format!(
                "{file} has {} statements; there is no statement {}",
                statements.len(),
                index + 1
            ))));
        };
        let tx = m.directives.transaction != TxMode::Off;
        let implicit = commits_implicitly(&st.sql);
        let r = if tx && implicit {
            sqlx::raw_sql(AssertSqlSafe(format!("{}{REOPEN}", st.sql))).execute(&mut self.conn).await
        } else if tx && !self.in_tx {
            sqlx::raw_sql(AssertSqlSafe(format!("{OPEN}{}", st.sql))).execute(&mut self.conn).await
        } else {
            sqlx::raw_sql(AssertSqlSafe(st.sql.as_str())).execute(&mut self.conn).await
        };
        let error = match r {
            Ok(_) => {
                self.in_tx = tx;
                return Ok(());
            }
            Err(e) => e,
        };
        if is_connection_error(&error) {
            // The session, its transaction and its lock are gone; the `running`
            // entry is committed and blocks the next run.
            self.in_tx = false;
            return Err(ExecFailure::Engine(self.err(format!("running {file} statement {}", index + 1), error)));
        }
        if let Err(e) = self.roll_back().await {
            return Err(ExecFailure::Engine(
                self.err(format!("rolling back {} after statement {} failed ({})", m.name(), index + 1, describe(&error)), e),
            ));
        }
        // A syntax error quotes the text it was sent; show the user's statement only.
        let message = describe(&error).replace(REOPEN, "");
        let code = error_number(&error).map(|n| n.to_string());
        let error = StatementError { file, statement: index + 1, line: st.line, message, code };

        // How many leading statements MySQL committed: with `transaction off`
        // all before the failing one; a failing DDL statement commits
        // everything before it as it starts; otherwise everything up to the
        // last implicitly committing statement (after which kiln reopened a
        // transaction that the ROLLBACK undid).
        let committed =
            if !tx || implicit { index } else { statements[..index].iter().rposition(|s| commits_implicitly(&s.sql)).map_or(0, |k| k + 1) };
        if committed == 0 {
            return Err(ExecFailure::Statement { error, left: Left::Nothing });
        }
        let which = if committed == 1 { "statement 1".to_string() } else { format!("statements 1–{committed}") };
        let cause = if !tx {
            "the migration runs with `-- kiln:transaction off`, so every statement commits on its own".to_string()
        } else if implicit && is_ddl(&st.sql) {
            format!("statement {} is DDL, and MySQL commits implicitly before running DDL, even DDL that fails", index + 1)
        } else if implicit {
            // `EXECUTE`, `CALL`, an executable comment: kiln cannot tell whether
            // it is DDL, so it counts it as committing (the safe mistake) and says so.
            format!(
                "statement {} (`{}`) may run DDL, before which MySQL commits implicitly, so kiln counts what came before it as committed",
                index + 1,
                first_word(&st.sql)
            )
        } else {
            "DDL commits implicitly and cannot be rolled back".to_string()
        };
        let what = if step.direction == Direction::Down { "the down migration's earlier changes" } else { "those changes" };
        let why = format!("MySQL had already committed {which} ({cause}), so {what} remain in the database");
        Err(ExecFailure::Statement { error, left: Left::Committed(why) })
    }

    /// When nothing of the body was committed implicitly, roll back the open
    /// transaction (the whole body); otherwise keep it, so the failure record
    /// commits the rest of the body with it and the migration stays whole.
    async fn abandon(&mut self, step: &Step<'_>) -> Result<Left, EngineError> {
        if step.code().is_some() {
            // The code ran in autocommit: everything it did is committed.
            return Ok(crate::common::code_left());
        }
        let statements = match step.body {
            Body::Sql { statements, .. } => statements.as_slice(),
            _ => &[],
        };
        let tx = step.migration.directives.transaction != TxMode::Off;
        let committed = if tx { statements.iter().rposition(|s| commits_implicitly(&s.sql)).map_or(0, |k| k + 1) } else { statements.len() };
        if committed == 0 {
            self.roll_back().await.map_err(|e| self.err(format!("rolling back {}", step.migration.name()), e))?;
            return Ok(Left::Nothing);
        }
        let which = if committed == 1 { "statement 1".to_string() } else { format!("statements 1–{committed}") };
        Ok(Left::Committed(format!(
            "MySQL had already committed {which} (DDL commits implicitly and cannot be rolled back), so the migration stays applied in full"
        )))
    }
}

/// The statement's first keyword (after comments), for messages.
fn first_word(sql: &str) -> String {
    let mut rest = sql;
    loop {
        rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == '(');
        if let Some(r) = rest.strip_prefix("--").or_else(|| rest.strip_prefix('#')) {
            rest = r.find('\n').map(|i| &r[i..]).unwrap_or("");
        } else if let Some(r) = rest.strip_prefix("/*").filter(|r| !r.starts_with('!') && !r.starts_with("M!")) {
            rest = r.find("*/").map(|i| &r[i + 2..]).unwrap_or("");
        } else {
            break;
        }
    }
    rest.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).next().unwrap_or("").chars().take(24).collect::<String>().to_ascii_uppercase()
}

/// Whether `sql` is DDL proper (its first keyword says so), as opposed to a
/// statement kiln only counts as committing because it cannot see into it.
fn is_ddl(sql: &str) -> bool {
    matches!(first_word(sql).as_str(), "CREATE" | "ALTER" | "DROP" | "RENAME" | "TRUNCATE")
}

/// Whether MySQL may commit implicitly around `sql` (and so end kiln's
/// transaction): DDL, account and lock statements, transaction control, …
///
/// Decided by the leading keywords. Only statements known to be transactional
/// (DML, SELECT, SET, …) are exempt: anything unknown — `CALL`, `EXECUTE`,
/// executable `/*! … */` comments — counts as committing, because wrongly
/// reporting "nothing remains" is the dangerous mistake.
pub(crate) fn commits_implicitly(sql: &str) -> bool {
    let mut rest = sql;
    let mut words: Vec<String> = Vec::with_capacity(3);
    while words.len() < 3 {
        rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == '(');
        if rest.starts_with("/*!") || rest.starts_with("/*M!") {
            return true;
        }
        if let Some(r) = rest.strip_prefix("--").or_else(|| rest.strip_prefix('#')) {
            rest = r.find('\n').map(|i| &r[i..]).unwrap_or("");
            continue;
        }
        if let Some(r) = rest.strip_prefix("/*") {
            rest = r.find("*/").map(|i| &r[i + 2..]).unwrap_or("");
            continue;
        }
        let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '@')).unwrap_or(rest.len());
        if end == 0 {
            break;
        }
        words.push(rest[..end].to_ascii_uppercase());
        rest = &rest[end..];
    }
    let w = |i: usize| words.get(i).map(String::as_str).unwrap_or("");
    match w(0) {
        "" => false,
        "SELECT" | "INSERT" | "UPDATE" | "DELETE" | "REPLACE" | "WITH" | "VALUES" | "TABLE" | "DO" | "HANDLER" | "SAVEPOINT" | "SHOW"
        | "DESCRIBE" | "DESC" | "EXPLAIN" | "HELP" | "SIGNAL" | "RESIGNAL" | "GET" | "USE" => false,
        // ROLLBACK TO SAVEPOINT stays inside the transaction; RELEASE SAVEPOINT too.
        "ROLLBACK" => !(w(1) == "TO" || (w(1) == "WORK" && w(2) == "TO")),
        "RELEASE" => w(1) != "SAVEPOINT",
        // LOAD DATA is transactional on InnoDB; LOAD INDEX INTO CACHE commits.
        "LOAD" => w(1) != "DATA" && w(1) != "XML",
        // SET PASSWORD and SET autocommit commit; other SETs do not.
        "SET" => {
            let all = sql.to_ascii_uppercase();
            w(1) == "PASSWORD" || all.contains("AUTOCOMMIT")
        }
        // Temporary tables are not DDL in this sense (no implicit commit).
        "CREATE" | "DROP" => w(1) != "TEMPORARY",
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// issue 13.7: an `EXECUTE` (or `CALL`) counts as committing, but is not called DDL.
    #[test]
    fn only_ddl_is_called_ddl() {
        assert!(is_ddl("CREATE TABLE a (id int)") && is_ddl("-- why\n  alter table a add b int") && is_ddl("/* x */ DROP TABLE a"));
        assert!(!is_ddl("EXECUTE stmt") && !is_ddl("CALL p()") && !is_ddl("/*!50001 CREATE VIEW v AS SELECT 1 */"));
        assert!(commits_implicitly("EXECUTE stmt"));
        assert_eq!(first_word("-- note\nexecute stmt USING @a"), "EXECUTE");
    }

    #[test]
    fn implicit_commit_classification() {
        for s in [
            "CREATE TABLE t (id int)",
            "-- note; with a semicolon\nALTER TABLE t ADD c int",
            "/* x */ drop table t",
            "RENAME TABLE a TO b",
            "TRUNCATE t",
            "GRANT SELECT ON *.* TO u",
            "LOCK TABLES t WRITE",
            "START TRANSACTION",
            "BEGIN",
            "COMMIT",
            "ROLLBACK",
            "CALL p()",
            "/*!40101 SET NAMES utf8 */",
            "CREATE PROCEDURE p() BEGIN SELECT 1; END",
            "SET autocommit = 0",
        ] {
            assert!(commits_implicitly(s), "{s}");
        }
        for s in [
            "INSERT INTO t VALUES (1)",
            "# hash comment\nupdate t set a = 1",
            "(SELECT 1) UNION (SELECT 2)",
            "SET @x = 1",
            "CREATE TEMPORARY TABLE t (id int)",
            "DROP TEMPORARY TABLE t",
            "ROLLBACK TO SAVEPOINT a",
            "LOAD DATA INFILE 'x' INTO TABLE t",
            "with x as (select 1) select * from x",
        ] {
            assert!(!commits_implicitly(s), "{s}");
        }
    }
}
