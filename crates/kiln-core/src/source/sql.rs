//! SQL migration files: the single file with `-- kiln:up` / `-- kiln:down`
//! sections, `.up.sql` + `.down.sql` pairs, diesel folders, and the
//! directives in their headers.

use std::path::{Path, PathBuf};

use super::phased::{section_marker, sql_phased};
use super::read::read;
use super::{split_version, LoadOptions};
use crate::error::SourceError;
use crate::model::*;
use crate::split::split_statements;

pub(super) fn version_of(stem: &str, rel: &Path) -> Result<(Version, String), SourceError> {
    split_version(stem).ok_or_else(|| {
        let head = stem.split('_').next().unwrap_or(stem);
        let digits: String = head.chars().filter(|c| *c != '-').collect();
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            // Only digits, so it did not fit in 64 bits.
            return SourceError::VersionTooLarge { file: rel.to_path_buf(), version: digits };
        }
        SourceError::BadName { file: rel.to_path_buf(), rule: "a leading version number, e.g. 0001_create_users".into() }
    })
}

pub(super) fn load_diesel(
    tree: &dyn super::tree::Tree,
    path: &Path,
    rel: &Path,
    name: &str,
    opts: &LoadOptions,
    group: Option<&str>,
    scope: Scope,
) -> Result<Migration, SourceError> {
    let rel_up = rel.join("up.sql");
    let up = read(tree, &path.join("up.sql"), &rel_up)?;
    let down_path = path.join("down.sql");
    let down = if tree.is_file(&down_path) {
        let rel_d = rel.join("down.sql");
        let t = read(tree, &down_path, &rel_d)?;
        Some((rel_d, t))
    } else {
        None
    };
    // diesel's metadata.toml can say `run_in_transaction = false`.
    let meta = path.join("metadata.toml");
    let mut no_tx = false;
    if tree.is_file(&meta) {
        let t = read(tree, &meta, &rel.join("metadata.toml"))?;
        no_tx = t.lines().any(|l| {
            let l: String = l.chars().filter(|c| !c.is_whitespace()).collect();
            l == "run_in_transaction=false"
        });
    }
    let mut m = sql_pair(name, &rel_up, &up, down, opts, group, scope, Some(rel))?;
    // diesel orders versions as strings (its 18-digit names among 14-digit ones).
    m.version.order = VersionOrder::Text;
    if no_tx {
        m.directives.transaction = TxMode::Off;
    }
    Ok(m)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn sql_pair(
    stem: &str,
    rel_up: &Path,
    up: &str,
    down: Option<(PathBuf, String)>,
    opts: &LoadOptions,
    group: Option<&str>,
    scope: Scope,
    folder: Option<&Path>,
) -> Result<Migration, SourceError> {
    let (version, description) = version_of(stem, rel_up)?;
    let up_text = strip_bom(up);
    let (mut directives, body_start) = parse_header(up_text, rel_up, 1)?;
    apply_foreign_no_transaction(&mut directives, up_text, rel_up)?;
    if let Some((rel_d, d)) = &down {
        apply_foreign_no_transaction(&mut directives, strip_bom(d), rel_d)?;
    }
    let up_body = sql_body(up_text, body_start, rel_up, opts)?;
    let checksum = match &down {
        Some((_, d)) => Checksum::of_parts(&[up, d]),
        None => Checksum::of_parts(&[up]),
    };
    let down_body = match &down {
        Some((rel_d, d)) => Some(sql_body(strip_bom(d), 0, rel_d, opts)?),
        None => None,
    };
    let directives = directives.placed(group, scope);
    Ok(Migration {
        version,
        description,
        path: folder.map(Path::to_path_buf).unwrap_or_else(|| rel_up.to_path_buf()),
        kind: Kind::Sql,
        checksum,
        directives,
        up: up_body,
        down: down_body,
        phases: None,
    })
}

fn sql_body(text: &str, from_byte: usize, rel: &Path, opts: &LoadOptions) -> Result<Body, SourceError> {
    let first_line = 1 + text[..from_byte].matches('\n').count();
    sql_section(&text[from_byte..], first_line, rel, opts)
}

fn sql_section(text: &str, first_line: usize, rel: &Path, opts: &LoadOptions) -> Result<Body, SourceError> {
    // `DELIMITER` is a command of the mysql client, not SQL; say so instead of
    // letting the server reject a half-split procedure.
    for (i, l) in text.lines().enumerate() {
        if let Some((section, _)) = section_marker(l) {
            return Err(SourceError::Parse {
                file: rel.to_path_buf(),
                line: first_line + i,
                message: format!(
                    "`-- kiln:{}`: zero-downtime sections are read in a single-file migration (NNNN_name.sql) that starts with `-- kiln:expand`, not in `.up.sql`/`.down.sql` pairs or diesel folders",
                    section.name()
                ),
            });
        }
        if let Some(name) = late_directive(l) {
            return Err(SourceError::Parse {
                file: rel.to_path_buf(),
                line: first_line + i,
                message: format!(
                    "`-- kiln:{name}` comes after the first statement or section marker, where kiln does not read directives; move it to the header at the top of the file (before `-- kiln:up`)"
                ),
            });
        }
        if l.trim_start().get(..10).is_some_and(|p| p.eq_ignore_ascii_case("DELIMITER ")) {
            return Err(SourceError::Parse {
                file: rel.to_path_buf(),
                line: first_line + i,
                message: "DELIMITER is a mysql client command, not SQL; write the procedure with plain `;` (kiln understands BEGIN … END bodies)"
                    .into(),
            });
        }
    }
    let split = |t: &str, line: usize| {
        split_statements(t, line, opts.dialect).map_err(|e| SourceError::Parse { file: rel.to_path_buf(), line: e.line, message: e.message })
    };
    // goose's and sql-migrate's `StatementBegin` … `StatementEnd`: the lines
    // between are one statement, sent as written (its last `;` dropped).
    let mut statements = Vec::new();
    let mut seg_start = 0; // byte offset of the text not yet split
    let mut seg_line = first_line;
    let mut block: Option<(usize, usize)> = None; // (byte start, line) inside a block
    let mut pos = 0;
    for (i, l) in text.split_inclusive('\n').enumerate() {
        let lineno = first_line + i;
        match statement_block_marker(l) {
            Some(true) => {
                if block.is_some() {
                    return Err(SourceError::Parse {
                        file: rel.to_path_buf(),
                        line: lineno,
                        message: "a second StatementBegin before StatementEnd".into(),
                    });
                }
                statements.extend(split(&text[seg_start..pos], seg_line)?);
                block = Some((pos + l.len(), lineno + 1));
            }
            Some(false) => {
                let Some((start, line)) = block.take() else {
                    return Err(SourceError::Parse {
                        file: rel.to_path_buf(),
                        line: lineno,
                        message: "StatementEnd without a StatementBegin before it".into(),
                    });
                };
                let body = &text[start..pos];
                let skipped = body.len() - body.trim_start().len();
                let line = line + body[..skipped].matches('\n').count();
                let sql = body.trim().trim_end_matches(';').trim_end().to_string();
                if !sql.is_empty() {
                    statements.push(Statement { sql, line });
                }
                seg_start = pos + l.len();
                seg_line = lineno + 1;
            }
            None => {}
        }
        pos += l.len();
    }
    if let Some((_, line)) = block {
        return Err(SourceError::Parse {
            file: rel.to_path_buf(),
            line: line - 1,
            message: "StatementBegin without a StatementEnd; end the statement with `-- +goose StatementEnd`".into(),
        });
    }
    statements.extend(split(&text[seg_start..], seg_line)?);
    Ok(Body::Sql { file: rel.to_path_buf(), statements })
}

/// `Some(true)` for a `-- +goose StatementBegin` (or `-- +migrate …`) line,
/// `Some(false)` for its `StatementEnd`.
fn statement_block_marker(line: &str) -> Option<bool> {
    let c = line.trim().strip_prefix("--")?.trim();
    let mut w = c.split_whitespace();
    let tool = w.next()?;
    if !(tool.eq_ignore_ascii_case("+goose") || tool.eq_ignore_ascii_case("+migrate")) {
        return None;
    }
    let what = w.next()?;
    if w.next().is_some() {
        return None;
    }
    if what.eq_ignore_ascii_case("StatementBegin") {
        Some(true)
    } else if what.eq_ignore_ascii_case("StatementEnd") {
        Some(false)
    } else {
        None
    }
}

/// The name of a `-- kiln:NAME` directive on `line` that is not a section
/// marker: in a body, such a line would be a comment silently ignored.
fn late_directive(line: &str) -> Option<String> {
    let c = line.trim_start().strip_prefix("--")?.trim_start_matches('-').trim();
    if !c.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("kiln:")) || marker(line).is_some() {
        return None;
    }
    let name: String = c[5..].split_whitespace().next().unwrap_or("").chars().take(40).collect();
    Some(name)
}

/// `text` without a leading UTF-8 byte-order mark (editors on Windows add one).
/// The checksum still covers the file as it is.
fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Marker {
    Up,
    Down,
    /// A zero-downtime section (`-- kiln:expand`, `-- kiln:backfill …`, …).
    Phase,
}

fn marker(line: &str) -> Option<Marker> {
    let rest = line.trim().strip_prefix("--")?.trim();
    // dbmate's `-- migrate:up transaction:false` and sql-migrate's
    // `-- +migrate Up notransaction` carry an option after the marker
    // (read by [`foreign_no_transaction`]).
    let rest = match rest.split_whitespace().collect::<Vec<_>>().as_slice() {
        [m, opt] if m.eq_ignore_ascii_case("migrate:up") || m.eq_ignore_ascii_case("migrate:down") => {
            if opt.to_ascii_lowercase().starts_with("transaction:") {
                *m
            } else {
                rest
            }
        }
        ["+migrate", dir, opt] if opt.eq_ignore_ascii_case("notransaction") => {
            return if dir.eq_ignore_ascii_case("up") {
                Some(Marker::Up)
            } else if dir.eq_ignore_ascii_case("down") {
                Some(Marker::Down)
            } else {
                None
            };
        }
        _ => rest,
    };
    let any = |ks: &[&str]| ks.iter().any(|k| rest.eq_ignore_ascii_case(k));
    if any(&["kiln:up", "migrate:up", "+goose up", "+migrate up"]) {
        Some(Marker::Up)
    } else if any(&["kiln:down", "migrate:down", "+goose down", "+migrate down"]) {
        Some(Marker::Down)
    } else if section_marker(line).is_some() {
        Some(Marker::Phase)
    } else {
        None
    }
}

/// Where a file written for another tool asks to run outside a transaction,
/// as that tool reads it: the 1-based line and the annotation.
///
/// - sqlx: `-- no-transaction` and golang-migrate/morph:
///   `-- morph:nontransactional`, in the header (sqlx and morph read them at
///   the very top; kiln in the comment header before the first statement);
/// - goose: `-- +goose NO TRANSACTION`, on any line, as goose reads it;
/// - dbmate: `-- migrate:up transaction:false` (or on `migrate:down`);
/// - sql-migrate: `-- +migrate Up notransaction` (or on `Down`).
///
/// kiln has one transaction mode per migration, so an option on either
/// section turns the transaction off for the whole migration (docs/adopting.md).
fn foreign_no_transaction(text: &str) -> Result<Option<(usize, String)>, (usize, String)> {
    let mut in_header = true;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim().trim_start_matches('\u{feff}');
        if t.is_empty() {
            continue;
        }
        let Some(c) = t.strip_prefix("--") else {
            in_header = false;
            continue;
        };
        let c = c.trim();
        let lower = c.to_ascii_lowercase();
        let words: Vec<&str> = lower.split_whitespace().collect();
        let hit = match words.as_slice() {
            ["no-transaction"] | ["morph:nontransactional"] => in_header,
            ["+goose", "no", "transaction"] => true,
            ["migrate:up" | "migrate:down", opt] if opt.starts_with("transaction:") => match &opt["transaction:".len()..] {
                "false" => true,
                "true" => false,
                other => return Err((i + 1, format!("`{c}`: dbmate's transaction option is true or false, not {other:?}"))),
            },
            ["+migrate", "up" | "down", "notransaction"] => true,
            _ => false,
        };
        if hit {
            return Ok(Some((i + 1, c.to_string())));
        }
        if marker(t).is_some() {
            in_header = false;
        }
    }
    Ok(None)
}

/// Turn the transaction off when the file says so in another tool's words
/// ([`foreign_no_transaction`]); `-- kiln:transaction on` beside it is a contradiction.
fn apply_foreign_no_transaction(d: &mut Directives, text: &str, rel: &Path) -> Result<(), SourceError> {
    match foreign_no_transaction(text) {
        Ok(None) => Ok(()),
        Ok(Some((line, what))) => {
            if d.transaction == TxMode::On {
                return Err(SourceError::Parse {
                    file: rel.to_path_buf(),
                    line,
                    message: format!("`-- {what}` runs the migration outside a transaction, which contradicts `-- kiln:transaction on`; keep one"),
                });
            }
            d.transaction = TxMode::Off;
            Ok(())
        }
        Err((line, message)) => Err(SourceError::Parse { file: rel.to_path_buf(), line, message }),
    }
}

/// Parse header directives at the top of `text` (comment lines before the first
/// statement or section). Returns them and the byte offset where the header ends.
fn parse_header(text: &str, rel: &Path, first_line: usize) -> Result<(Directives, usize), SourceError> {
    let mut d = Directives::default();
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let lineno = first_line + i;
        let t = line.trim();
        if t.is_empty() {
            offset += line.len();
            continue;
        }
        if !t.starts_with("--") || marker(t).is_some() {
            break;
        }
        let c = t.trim_start_matches('-').trim();
        let lower = c.to_ascii_lowercase();
        if let Some(rest) = lower.strip_prefix("kiln:") {
            let (name, value) = match rest.find(char::is_whitespace) {
                Some(p) => (&rest[..p], c[5 + p..].trim()),
                None => (rest, ""),
            };
            apply_directive(&mut d, name, value, rel, lineno)?;
        } else if let Some(rest) = lower.strip_prefix("depends:") {
            let value = c["depends:".len()..].trim();
            for part in value.split([',', ' ']).filter(|s| !s.is_empty()) {
                add_depends(&mut d, part, rel, lineno)?;
            }
            let _ = rest;
        }
        offset += line.len();
    }
    Ok((d, offset))
}

fn apply_directive(d: &mut Directives, name: &str, value: &str, rel: &Path, line: usize) -> Result<(), SourceError> {
    let err = |m: String| SourceError::Parse { file: rel.to_path_buf(), line, message: m };
    match name {
        "depends" => {
            if value.is_empty() {
                return Err(err("`-- kiln:depends` needs a migration name or version".into()));
            }
            for part in value.split([',', ' ']).filter(|s| !s.is_empty()) {
                add_depends(d, part, rel, line)?;
            }
        }
        "transaction" => {
            let mode = match value.to_ascii_lowercase().as_str() {
                "off" | "false" | "no" => TxMode::Off,
                "on" | "true" | "yes" => TxMode::On,
                other => return Err(err(format!("`-- kiln:transaction` takes on or off, not {other:?}"))),
            };
            if d.transaction != TxMode::Default && d.transaction != mode {
                return Err(err(format!(
                    "`-- kiln:transaction {value}` contradicts the earlier `-- kiln:transaction {}`; keep one",
                    if d.transaction == TxMode::Off { "off" } else { "on" }
                )));
            }
            d.transaction = mode;
        }
        "scope" => {
            d.scope = match value.to_ascii_lowercase().as_str() {
                "public" => Scope::Public,
                "tenant" => Scope::Tenant,
                other => return Err(err(format!("`-- kiln:scope` takes public or tenant, not {other:?}"))),
            }
        }
        "group" => {
            if value.is_empty() {
                return Err(err("`-- kiln:group` needs a name".into()));
            }
            d.group = Some(value.to_string());
        }
        other => return Err(err(format!(
            "unknown directive `-- kiln:{other}` (known: up, down, depends, transaction, scope, group; sections expand, backfill, remaining, contract, rollback)"
        ))),
    }
    Ok(())
}

pub(super) fn add_depends(d: &mut Directives, written: &str, rel: &Path, line: usize) -> Result<(), SourceError> {
    let stem = written.trim_end_matches(".sql").trim_end_matches(".up").trim_end_matches(".yaml").trim_end_matches(".yml").trim_end_matches(".json");
    let stem = stem.rsplit('/').next().unwrap_or(stem);
    let version = Version::parse_arg(stem).ok_or_else(|| SourceError::Parse {
        file: rel.to_path_buf(),
        line,
        message: format!("depends on {written:?}, which is not a migration name or version"),
    })?;
    d.depends.push(DependsOn { version, written: written.to_string(), line });
    Ok(())
}

pub(super) fn sql_single(stem: &str, rel: &Path, raw: &str, opts: &LoadOptions, group: Option<&str>, scope: Scope) -> Result<Migration, SourceError> {
    let (version, description) = version_of(stem, rel)?;
    let text = strip_bom(raw);
    let (mut directives, header_end) = parse_header(text, rel, 1)?;
    apply_foreign_no_transaction(&mut directives, text, rel)?;
    let (up, down, phases) = if text.lines().any(|l| section_marker(l).is_some()) {
        let split = |t: &str, line: usize| sql_section(t, line, rel, opts);
        let (up, down, phases) = sql_phased(rel, text, header_end, &split)?;
        (up, down, Some(Box::new(phases)))
    } else {
        let (up, down) = up_down(text, header_end, rel, opts)?;
        (up, down, None)
    };
    let directives = directives.placed(group, scope);
    Ok(Migration {
        version,
        description,
        path: rel.to_path_buf(),
        kind: Kind::Sql,
        checksum: Checksum::of_parts(&[raw]),
        directives,
        up,
        down,
        phases,
    })
}

/// The `-- kiln:up` / `-- kiln:down` sections of a single-file migration
/// (none: the whole body is up, irreversible).
fn up_down(text: &str, header_end: usize, rel: &Path, opts: &LoadOptions) -> Result<(Body, Option<Body>), SourceError> {
    // Find section markers.
    let mut up_range: Option<(usize, usize)> = None; // byte start, line
    let mut down_range: Option<(usize, usize)> = None;
    let mut up_end = text.len();
    let mut pos = 0;
    let mut saw_marker = false;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let lineno = i + 1;
        if let Some(m) = marker(line) {
            let err = |msg: &str| SourceError::Parse { file: rel.to_path_buf(), line: lineno, message: msg.to_string() };
            if !saw_marker && pos < header_end {
                // markers inside the header region are fine; header parsing stops at them
            }
            if !saw_marker && text[header_end.min(pos)..pos].trim() != "" && !only_comments(&text[header_end.min(pos)..pos]) {
                return Err(err("statements before the first `-- kiln:up` / `-- kiln:down` section"));
            }
            saw_marker = true;
            match m {
                // Files with zero-downtime sections were handled above.
                Marker::Phase => {}
                Marker::Up => {
                    if up_range.is_some() {
                        return Err(err("a second `-- kiln:up` section"));
                    }
                    if down_range.is_some() {
                        return Err(err("`-- kiln:up` must come before `-- kiln:down`"));
                    }
                    up_range = Some((pos + line.len(), lineno + 1));
                }
                Marker::Down => {
                    if down_range.is_some() {
                        return Err(err("a second `-- kiln:down` section"));
                    }
                    if up_range.is_none() {
                        return Err(err("`-- kiln:down` without a `-- kiln:up` section before it"));
                    }
                    up_end = pos;
                    down_range = Some((pos + line.len(), lineno + 1));
                }
            }
        }
        pos += line.len();
    }
    Ok(match up_range {
        None => (sql_body(text, header_end, rel, opts)?, None),
        Some((start, line)) => {
            let up = sql_section(&text[start..up_end], line, rel, opts)?;
            let down = match down_range {
                Some((ds, dl)) => Some(sql_section(&text[ds..], dl, rel, opts)?),
                None => None,
            };
            (up, down)
        }
    })
}

fn only_comments(s: &str) -> bool {
    s.lines().all(|l| {
        let t = l.trim();
        t.is_empty() || t.starts_with("--")
    })
}
