//! Pieces the SQL engines share: identifier quoting, lock keys, and turning
//! history rows into [`AppliedMigration`]s.

use kiln_core::{AppliedMigration, Checksum, FailureInfo, State, Version};

/// Quote an identifier for PostgreSQL and SQLite (`"name"`, `"` doubled).
pub fn quote_double(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Quote an identifier for MySQL/MariaDB (`` `name` ``, backtick doubled).
pub fn quote_backtick(ident: &str) -> String {
    format!("`{}`", ident.replace('`', "``"))
}

/// A stable 64-bit key for an advisory lock, from the text naming what is locked
/// (FNV-1a: stable across builds and platforms, unlike `DefaultHasher`).
pub fn lock_key(name: &str) -> i64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h as i64
}

/// Scratch databases are named `kiln_verify_…` by `kiln verify`; anything else
/// is refused, so a wrong argument can never create or drop a real database.
/// `max_len` is the engine's identifier limit.
pub fn check_scratch_name(name: &str, max_len: usize) -> Result<(), kiln_core::EngineError> {
    let rest = name.strip_prefix("kiln_verify_").unwrap_or("");
    if rest.is_empty() || name.len() > max_len || !rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(kiln_core::EngineError::Refused(format!(
            "refusing scratch database name {name:?}: kiln only creates and drops scratch databases named kiln_verify_<letters, digits, _> (at most {max_len} bytes)"
        )));
    }
    Ok(())
}

/// The event-log name of a finished step: `applied` or `reverted`.
pub fn step_event(dir: kiln_core::Direction) -> &'static str {
    match dir {
        kiln_core::Direction::Up => "applied",
        kiln_core::Direction::Down => "reverted",
    }
}

/// The raw columns of one history row, as every SQL engine reads them.
#[allow(missing_docs)]
pub struct RawHistoryRow {
    pub version: i64,
    pub description: String,
    pub script: String,
    pub group: Option<String>,
    pub checksum: String,
    pub state: String,
    pub batch: i64,
    pub applied_at: chrono::DateTime<chrono::Utc>,
    pub duration_ms: i64,
    pub applied_by: String,
    pub kiln_version: String,
    pub error: Option<String>,
    pub error_statement: Option<i64>,
    pub error_line: Option<i64>,
}

impl RawHistoryRow {
    /// Convert; an unknown state string is read as `failed` so it blocks runs
    /// rather than being silently ignored.
    pub fn into_applied(self) -> AppliedMigration {
        let state = State::parse(&self.state).unwrap_or(State::Failed);
        let error = if self.error.is_some() || state.is_blocking() {
            Some(FailureInfo {
                message: self.error.unwrap_or_else(|| format!("unknown state {:?}", self.state)),
                statement: self.error_statement.map(|v| v as u32),
                line: self.error_line.map(|v| v as u32),
            })
        } else {
            None
        };
        AppliedMigration {
            version: Version::from_number(self.version as u64),
            description: self.description,
            script: self.script,
            group: self.group,
            checksum: Checksum(self.checksum),
            state,
            batch: self.batch,
            applied_at: self.applied_at,
            duration_ms: self.duration_ms,
            applied_by: self.applied_by,
            kiln_version: self.kiln_version,
            error,
        }
    }
}

/// The column list of the history table, in the order every engine selects it.
pub const HISTORY_COLUMNS: &str = "version, description, script, migration_group, checksum, state, batch, applied_at, duration_ms, applied_by, kiln_version, error, error_statement, error_line";

/// The column list of the event log, without the generated `id`.
pub const LOG_COLUMNS: &str = "at, event, version, name, batch, actor, reason, detail";

/// What a code migration that failed outside a transaction leaves: kiln
/// cannot know what the code changed before it failed, so it assumes the worst
/// (the entry becomes `failed` and blocks runs until `kiln repair`).
pub fn code_left() -> kiln_core::engine::Left {
    kiln_core::engine::Left::Committed(
        "the code ran outside a transaction, so whatever it changed remains in the database; check it, fix the database, then run `kiln repair`"
            .into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_double("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_backtick("a`b"), "`a``b`");
    }

    #[test]
    fn lock_key_is_stable() {
        assert_eq!(lock_key("kiln"), lock_key("kiln"));
        assert_ne!(lock_key("kiln:a"), lock_key("kiln:b"));
        // FNV-1a of the empty string is the offset basis.
        assert_eq!(lock_key("") as u64, 0xcbf29ce484222325);
    }
}
