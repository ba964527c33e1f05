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
    path: &Path,
    rel: &Path,
    name: &str,
    opts: &LoadOptions,
    group: Option<&str>,
    scope: Scope,
) -> Result<Migration, SourceError> {
    let rel_up = rel.join("up.sql");
    let up = read(&path.join("up.sql"), &rel_up)?;
    let down_path = path.join("down.sql");
    let down = if down_path.is_file() {
        let rel_d = rel.join("down.sql");
        let t = read(&down_path, &rel_d)?;
        Some((rel_d, t))
    } else {
        None
    };
    // diesel's metadata.toml can say `run_in_transaction = false`.
    let meta = path.join("metadata.toml");
    let mut no_tx = false;
    if meta.is_file() {
        let t = read(&meta, &rel.join("metadata.toml"))?;
        no_tx = t.lines().any(|l| {
            let l: String = l.chars().filter(|c| !c.is_whitespace()).collect();
            l == "run_in_transaction=false"
        });
    }
    let mut m = sql_pair(name, &rel_up, &up, down, opts, group, scope, Some(rel))?;
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
    let (directives, body_start) = parse_header(up_text, rel_up, 1)?;
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
    let statements = split_statements(text, first_line, opts.dialect).map_err(|e| SourceError::Parse {
        file: rel.to_path_buf(),
        line: e.line,
        message: e.message,
    })?;
    Ok(Body::Sql { file: rel.to_path_buf(), statements })
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
    let (directives, header_end) = parse_header(text, rel, 1)?;
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
