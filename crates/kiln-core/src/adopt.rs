//! Taking over another tool's history (`kiln adopt`, issue 13).
//!
//! A database that diesel, sqlx, golang-migrate, dbmate, goose, refinery,
//! Prisma or sql-migrate has been migrating keeps that tool's table. kiln
//! reads it (never changes it), and records the migrations it lists as
//! `baseline` in kiln's own history with the checksums of today's files, so
//! `kiln up` runs only what the old tool had not. This module is pure: it
//! turns the rows an engine read ([`ForeignTable`]) into a [`ForeignHistory`]
//! and compares it with the files; the runner does the locking and writing.

use std::collections::HashMap;

use async_trait::async_trait;
use serde::Serialize;
use sha2::{Digest, Sha256, Sha384};

use crate::error::EngineError;
use crate::model::Migration;

/// Rows of another tool's table, every value as text (binary values as
/// lower-case hex, NULL as `None`).
#[derive(Clone, Debug, Default)]
pub struct ForeignTable {
    /// Column names, lower case.
    pub columns: Vec<String>,
    /// Rows, values in the order of `columns`.
    pub rows: Vec<Vec<Option<String>>>,
}

impl ForeignTable {
    fn col(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.eq_ignore_ascii_case(name))
    }
    fn get<'a>(&self, row: &'a [Option<String>], name: &str) -> Option<&'a str> {
        self.col(name).and_then(|i| row.get(i)).and_then(|v| v.as_deref())
    }
}

/// Reading other tools' tables, for `kiln adopt`.
///
/// Contract: reads only; never creates, changes or locks anything; the
/// table is looked up where the engine keeps kiln's own history (its
/// connection's database and schema).
#[async_trait]
pub trait ForeignReader: Send {
    /// Every row of `table`, or `Ok(None)` when there is no such table.
    async fn read_foreign_table(&mut self, table: &str) -> Result<Option<ForeignTable>, EngineError>;
}

/// The tools whose history kiln can adopt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tool {
    /// diesel: `__diesel_schema_migrations (version, run_on)`.
    Diesel,
    /// sqlx: `_sqlx_migrations (version, description, success, checksum, …)`.
    Sqlx,
    /// Flyway: `flyway_schema_history`.
    Flyway,
    /// refinery: `refinery_schema_history (version, name, applied_on, checksum)`.
    Refinery,
    /// goose: `goose_db_version (id, version_id, is_applied, tstamp)`.
    Goose,
    /// Prisma Migrate: `_prisma_migrations`.
    Prisma,
    /// sql-migrate: `gorp_migrations (id, applied_at)`.
    SqlMigrate,
    /// golang-migrate (and morph's compatible mode): `schema_migrations (version, dirty)`, one row.
    GolangMigrate,
    /// dbmate: `schema_migrations (version)`, one row per migration.
    Dbmate,
}

impl Tool {
    /// The tool's name as users know it.
    pub fn name(self) -> &'static str {
        match self {
            Tool::Diesel => "diesel",
            Tool::Sqlx => "sqlx",
            Tool::Flyway => "Flyway",
            Tool::Refinery => "refinery",
            Tool::Goose => "goose",
            Tool::Prisma => "Prisma",
            Tool::SqlMigrate => "sql-migrate",
            Tool::GolangMigrate => "golang-migrate",
            Tool::Dbmate => "dbmate",
        }
    }
}

/// The tables kiln looks for, in this order; `schema_migrations` is
/// golang-migrate's when it has a `dirty` column, else dbmate's.
pub const FOREIGN_TABLES: [&str; 8] = [
    "__diesel_schema_migrations",
    "_sqlx_migrations",
    "flyway_schema_history",
    "refinery_schema_history",
    "goose_db_version",
    "_prisma_migrations",
    "gorp_migrations",
    "schema_migrations",
];

/// How the other tool fingerprinted a migration, where it did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "kebab-case")]
pub enum ForeignChecksum {
    /// sqlx: SHA-384 of the up file as it was (hex).
    Sha384(String),
    /// Prisma: SHA-256 of `migration.sql` (hex).
    Sha256(String),
    /// Flyway: CRC-32 of the file's lines (a signed 32-bit number).
    Crc32Lines(i32),
}

impl ForeignChecksum {
    /// Whether today's file content still has this fingerprint.
    fn matches(&self, up_file: &str) -> bool {
        match self {
            ForeignChecksum::Sha384(h) => hex(&Sha384::digest(up_file.as_bytes())) == *h,
            ForeignChecksum::Sha256(h) => {
                hex(&Sha256::digest(up_file.as_bytes())) == *h || hex(&Sha256::digest(up_file.replace("\r\n", "\n").as_bytes())) == *h
            }
            ForeignChecksum::Crc32Lines(c) => flyway_crc32(up_file) == *c,
        }
    }
}

/// One migration the other tool recorded as applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ForeignApplied {
    /// Its version number.
    pub version: u64,
    /// The version as the tool wrote it.
    pub text: String,
    /// Its name, where the tool kept one.
    pub name: Option<String>,
    /// Its fingerprint, where the tool kept one.
    pub checksum: Option<ForeignChecksum>,
}

/// What another tool's table says is applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ForeignHistory {
    /// The tool.
    pub tool: Tool,
    /// The table read.
    pub table: String,
    /// The migrations it lists as applied. For golang-migrate, which keeps
    /// only the current version, `upto` is set instead.
    pub applied: Vec<ForeignApplied>,
    /// golang-migrate: every migration up to this version is applied.
    pub upto: Option<u64>,
}

/// Why another tool's history cannot be adopted as it is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ForeignError {
    /// golang-migrate's `dirty` flag: a migration failed half-way.
    #[error(
        "golang-migrate marked version {version} dirty in schema_migrations: it failed half-way, and what it changed is unknown. \
         Fix the database by hand, then `migrate force {version}` (if the migration's changes are all there) or `migrate force <the version before it>`, and run `kiln adopt` again; kiln adopts nothing from a dirty database"
    )]
    Dirty {
        /// The dirty version.
        version: String,
    },
    /// A failed entry (sqlx `success = false`, Flyway `success = false`, a Prisma
    /// migration that started and never finished).
    #[error(
        "{tool} recorded {what} as failed in {table}: it ran only in part. Fix the database and that tool's entry (or remove the entry) first, then run `kiln adopt` again; kiln adopts nothing while it is there"
    )]
    Failed {
        /// The tool.
        tool: &'static str,
        /// The table.
        table: String,
        /// Which migration.
        what: String,
    },
    /// A row kiln cannot read.
    #[error("{table}: cannot read the row {row}: {why}; kiln adopted nothing")]
    BadRow {
        /// The table.
        table: String,
        /// The row, as read.
        row: String,
        /// What is wrong with it.
        why: String,
    },
}

fn digits_version(text: &str) -> Option<u64> {
    let head = text.split('_').next().unwrap_or("");
    let head = head.split('.').next().unwrap_or("");
    let digits: String = head.chars().filter(|c| *c != '-').collect();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn truthy(v: Option<&str>) -> bool {
    matches!(v.map(|s| s.trim().to_ascii_lowercase()).as_deref(), Some("t" | "true" | "1" | "yes" | "y"))
}

/// Read `rows` of `table` as `tool`'s history.
///
/// # Errors
/// A dirty golang-migrate database, a failed entry, or a row whose version is
/// not a number; see [`ForeignError`].
pub fn parse_foreign(tool: Tool, table: &str, t: &ForeignTable) -> Result<ForeignHistory, ForeignError> {
    let bad = |row: &[Option<String>], why: &str| ForeignError::BadRow {
        table: table.to_string(),
        row: row.iter().map(|v| v.as_deref().unwrap_or("NULL")).collect::<Vec<_>>().join(", "),
        why: why.to_string(),
    };
    let mut applied = Vec::new();
    let mut upto = None;
    let version_of = |row: &[Option<String>], col: &str| -> Result<(u64, String), ForeignError> {
        let text = t.get(row, col).ok_or_else(|| bad(row, &format!("no {col}")))?.trim().to_string();
        let n = digits_version(&text).ok_or_else(|| bad(row, &format!("{col} {text:?} is not a version number kiln can read")))?;
        Ok((n, text))
    };
    match tool {
        Tool::Diesel | Tool::Dbmate => {
            for row in &t.rows {
                let (version, text) = version_of(row, "version")?;
                applied.push(ForeignApplied { version, text, name: None, checksum: None });
            }
        }
        Tool::Sqlx => {
            for row in &t.rows {
                let (version, text) = version_of(row, "version")?;
                let name = t.get(row, "description").map(str::to_string);
                if !truthy(t.get(row, "success")) {
                    return Err(ForeignError::Failed {
                        tool: "sqlx",
                        table: table.into(),
                        what: format!("version {text} ({})", name.as_deref().unwrap_or("")),
                    });
                }
                let checksum = t.get(row, "checksum").map(|h| ForeignChecksum::Sha384(h.trim_start_matches("\\x").to_ascii_lowercase()));
                applied.push(ForeignApplied { version, text, name, checksum });
            }
        }
        Tool::Flyway => {
            for row in &t.rows {
                // Repeatable migrations (no version) and the schema-creation row are not versioned migrations.
                let Some(v) = t.get(row, "version") else { continue };
                let kind = t.get(row, "type").unwrap_or("");
                if kind.eq_ignore_ascii_case("SCHEMA") || kind.eq_ignore_ascii_case("DELETE") {
                    continue;
                }
                let name = t.get(row, "description").map(str::to_string);
                if !truthy(t.get(row, "success")) {
                    return Err(ForeignError::Failed { tool: "Flyway", table: table.into(), what: format!("version {v}") });
                }
                if !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad(row, "a dotted or non-numeric Flyway version (kiln versions are whole numbers)"));
                }
                let (version, text) = version_of(row, "version")?;
                let checksum = match t.get(row, "checksum") {
                    Some(c) => Some(ForeignChecksum::Crc32Lines(c.trim().parse().map_err(|_| bad(row, "checksum is not a number"))?)),
                    None => None,
                };
                if kind.eq_ignore_ascii_case("BASELINE") {
                    applied.push(ForeignApplied { version, text, name, checksum: None });
                } else {
                    applied.push(ForeignApplied { version, text, name, checksum });
                }
            }
        }
        Tool::Refinery => {
            for row in &t.rows {
                let (version, text) = version_of(row, "version")?;
                applied.push(ForeignApplied { version, text, name: t.get(row, "name").map(str::to_string), checksum: None });
            }
        }
        Tool::Goose => {
            // goose appends a row per up (is_applied true) and per down (false);
            // the latest row of a version says where it stands. Version 0 is goose's own first row.
            let mut rows: Vec<(i64, u64, String, bool)> = Vec::new();
            for row in &t.rows {
                let id: i64 = t.get(row, "id").and_then(|s| s.trim().parse().ok()).ok_or_else(|| bad(row, "no id"))?;
                let (version, text) = version_of(row, "version_id")?;
                rows.push((id, version, text, truthy(t.get(row, "is_applied"))));
            }
            rows.sort_by_key(|r| r.0);
            let mut state: HashMap<u64, (String, bool)> = HashMap::new();
            let mut order: Vec<u64> = Vec::new();
            for (_, v, text, up) in rows {
                if v == 0 {
                    continue;
                }
                if !state.contains_key(&v) {
                    order.push(v);
                }
                state.insert(v, (text, up));
            }
            for v in order {
                let (text, up) = state.remove(&v).expect("recorded");
                if up {
                    applied.push(ForeignApplied { version: v, text, name: None, checksum: None });
                }
            }
        }
        Tool::Prisma => {
            for row in &t.rows {
                let name = t.get(row, "migration_name").ok_or_else(|| bad(row, "no migration_name"))?.to_string();
                if t.get(row, "rolled_back_at").is_some() {
                    continue;
                }
                if t.get(row, "finished_at").is_none() {
                    return Err(ForeignError::Failed { tool: "Prisma", table: table.into(), what: name });
                }
                let version = digits_version(&name).ok_or_else(|| bad(row, "migration_name does not start with a number"))?;
                let text = name.split('_').next().unwrap_or("").to_string();
                let checksum = t.get(row, "checksum").map(|c| ForeignChecksum::Sha256(c.to_ascii_lowercase()));
                applied.push(ForeignApplied { version, text, name: Some(name), checksum });
            }
        }
        Tool::SqlMigrate => {
            for row in &t.rows {
                let (version, text) = version_of(row, "id")?;
                let text = text.split('_').next().unwrap_or("").to_string();
                applied.push(ForeignApplied { version, text, name: t.get(row, "id").map(str::to_string), checksum: None });
            }
        }
        Tool::GolangMigrate => {
            if let Some(row) = t.rows.first() {
                let (version, text) = version_of(row, "version")?;
                if truthy(t.get(row, "dirty")) {
                    return Err(ForeignError::Dirty { version: text });
                }
                upto = Some(version);
            }
        }
    }
    Ok(ForeignHistory { tool, table: table.to_string(), applied, upto })
}

/// Which tool `table` (with these columns) belongs to.
pub fn tool_of(table: &str, columns: &[String]) -> Option<Tool> {
    Some(match table {
        "__diesel_schema_migrations" => Tool::Diesel,
        "_sqlx_migrations" => Tool::Sqlx,
        "flyway_schema_history" => Tool::Flyway,
        "refinery_schema_history" => Tool::Refinery,
        "goose_db_version" => Tool::Goose,
        "_prisma_migrations" => Tool::Prisma,
        "gorp_migrations" => Tool::SqlMigrate,
        "schema_migrations" if columns.iter().any(|c| c.eq_ignore_ascii_case("dirty")) => Tool::GolangMigrate,
        "schema_migrations" => Tool::Dbmate,
        _ => return None,
    })
}

/// Find and read the first other tool's history in the database.
///
/// # Errors
/// The engine's, and [`ForeignError`] wrapped in a message.
pub async fn read_foreign(reader: &mut dyn ForeignReader) -> Result<Option<Result<ForeignHistory, ForeignError>>, EngineError> {
    for table in FOREIGN_TABLES {
        if let Some(t) = reader.read_foreign_table(table).await? {
            let Some(tool) = tool_of(table, &t.columns) else { continue };
            return Ok(Some(parse_foreign(tool, table, &t)));
        }
    }
    Ok(None)
}

/// A file whose content changed since the other tool applied it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChangedSince {
    /// Version.
    pub version: String,
    /// The file (relative to the migrations directory).
    pub file: String,
}

/// What `kiln adopt` records, or would.
#[derive(Clone, Debug, Serialize)]
pub struct AdoptPlan<'a> {
    /// The tool and table read.
    pub tool: Tool,
    /// The table.
    pub table: String,
    /// Migrations to record as baseline, in the files' order.
    #[serde(skip)]
    pub adopt: Vec<&'a Migration>,
    /// Versions kiln's history already records (a second `kiln adopt`).
    pub already: usize,
    /// Files the other tool fingerprinted and that changed since.
    pub changed: Vec<ChangedSince>,
    /// Versions the other tool applied with no file here.
    pub missing: Vec<String>,
}

/// One migration `kiln adopt` recorded as baseline.
#[derive(Clone, Debug, Serialize)]
pub struct Adopted {
    /// Version as the file writes it.
    pub version: String,
    /// Description.
    pub name: String,
    /// The file (relative to the migrations directory).
    pub file: String,
}

/// What `kiln adopt` did (or, with `dry_run`, would do).
#[derive(Clone, Debug, Serialize)]
pub struct AdoptReport {
    /// The tool whose history was read.
    pub tool: Tool,
    /// Its table (left as it was).
    pub table: String,
    /// Recorded as baseline, in the files' order.
    pub adopted: Vec<Adopted>,
    /// Already in kiln's history (adopted before).
    pub already: usize,
    /// Files the other tool fingerprinted that changed since it applied them.
    pub changed: Vec<ChangedSince>,
    /// Migrations the other tool applied that have no file here.
    pub missing: Vec<String>,
    /// Nothing was recorded.
    pub dry_run: bool,
}

/// Compare `foreign` with the files of `local`, read from `dir` where the
/// other tool kept a fingerprint; `recorded` are the versions kiln's history
/// already holds.
pub fn plan_adopt<'a>(local: &'a [Migration], dir: &std::path::Path, foreign: &ForeignHistory, recorded: &[u64]) -> AdoptPlan<'a> {
    let by_number: HashMap<u64, &Migration> = local.iter().map(|m| (m.version.number, m)).collect();
    let mut adopt: Vec<&Migration> = Vec::new();
    let mut changed = Vec::new();
    let mut missing = Vec::new();
    let mut already = 0;
    let mut take = |m: &'a Migration, checksum: Option<&ForeignChecksum>| {
        if recorded.contains(&m.version.number) {
            already += 1;
            return;
        }
        if let Some(c) = checksum {
            if !up_text(m, dir).is_some_and(|t| c.matches(&t)) {
                changed.push(ChangedSince { version: m.version.to_string(), file: m.display_path() });
            }
        }
        adopt.push(m);
    };
    if let Some(upto) = foreign.upto {
        for m in local.iter().filter(|m| m.version.number <= upto) {
            take(m, None);
        }
        if upto > 0 && !by_number.contains_key(&upto) {
            missing.push(upto.to_string());
        }
    }
    for a in &foreign.applied {
        match by_number.get(&a.version) {
            Some(m) => take(m, a.checksum.as_ref()),
            None => missing.push(a.name.clone().unwrap_or_else(|| a.text.clone())),
        }
    }
    let position: HashMap<u64, usize> = local.iter().enumerate().map(|(i, m)| (m.version.number, i)).collect();
    adopt.sort_by_key(|m| position[&m.version.number]);
    adopt.dedup_by_key(|m| m.version.number);
    AdoptPlan { tool: foreign.tool, table: foreign.table.clone(), adopt, already, changed, missing }
}

/// The text of the file the other tool fingerprinted: the up file of a pair
/// or folder, the whole single file (a [`Migration`] keeps parsed
/// statements, not its text).
fn up_text(m: &Migration, dir: &std::path::Path) -> Option<String> {
    match &m.up {
        crate::model::Body::Sql { file, .. } | crate::model::Body::Commands { file, .. } => std::fs::read_to_string(dir.join(file)).ok(),
        crate::model::Body::Code { .. } => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    bytes.iter().flat_map(|b| [HEX[(b >> 4) as usize] as char, HEX[(b & 15) as usize] as char]).collect()
}

/// Flyway's checksum: CRC-32 over the file's lines without their line ends
/// (a leading byte-order mark dropped), as a signed 32-bit number.
pub fn flyway_crc32(text: &str) -> i32 {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut crc: u32 = !0;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
    };
    for line in text.split('\n') {
        feed(line.strip_suffix('\r').unwrap_or(line).as_bytes());
    }
    (!crc) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(cols: &[&str], rows: &[&[Option<&str>]]) -> ForeignTable {
        ForeignTable {
            columns: cols.iter().map(|c| c.to_string()).collect(),
            rows: rows.iter().map(|r| r.iter().map(|v| v.map(str::to_string)).collect()).collect(),
        }
    }

    #[test]
    fn golang_migrate_dirty_is_refused_with_what_to_do() {
        let t = table(&["version", "dirty"], &[&[Some("3"), Some("t")]]);
        assert_eq!(tool_of("schema_migrations", &t.columns), Some(Tool::GolangMigrate));
        let e = parse_foreign(Tool::GolangMigrate, "schema_migrations", &t).unwrap_err().to_string();
        assert!(e.contains("version 3 dirty") && e.contains("migrate force 3"), "{e}");
        let t = table(&["version", "dirty"], &[&[Some("3"), Some("f")]]);
        assert_eq!(parse_foreign(Tool::GolangMigrate, "schema_migrations", &t).unwrap().upto, Some(3));
        assert_eq!(tool_of("schema_migrations", &["version".to_string()]), Some(Tool::Dbmate));
    }

    #[test]
    fn goose_latest_row_wins() {
        let t = table(
            &["id", "version_id", "is_applied", "tstamp"],
            &[
                &[Some("1"), Some("0"), Some("t"), None],
                &[Some("2"), Some("1"), Some("t"), None],
                &[Some("3"), Some("2"), Some("t"), None],
                &[Some("4"), Some("2"), Some("f"), None],
            ],
        );
        let h = parse_foreign(Tool::Goose, "goose_db_version", &t).unwrap();
        assert_eq!(h.applied.iter().map(|a| a.version).collect::<Vec<_>>(), [1]);
    }

    #[test]
    fn flyway_crc32_known_value() {
        // CRC-32 of "abc" (no line end) is 0x352441C2.
        assert_eq!(flyway_crc32("abc"), 0x352441C2u32 as i32);
        assert_eq!(flyway_crc32("ab\r\nc"), flyway_crc32("ab\nc"));
    }
}
