//! MongoDB migration files: YAML or JSON with `up:` and `down:` lists of
//! database commands.

use std::path::Path;

use super::nesting::{check_nesting, MAX_NESTING};
use super::phased::mongo_backfill;
use super::sql::{add_depends, version_of};
use crate::error::SourceError;
use crate::model::*;

pub(super) fn commands_file(stem: &str, rel: &Path, raw: &str, json: bool, group: Option<&str>, scope: Scope) -> Result<Migration, SourceError> {
    let (version, description) = version_of(stem, rel)?;
    let perr = |line: usize, message: String| SourceError::Parse { file: rel.to_path_buf(), line, message };
    let text = raw.strip_prefix('\u{feff}').unwrap_or(raw);
    // Before the parser: it is quadratic in the depth of flow collections.
    check_nesting(text, MAX_NESTING).map_err(|d| perr(d.line, d.to_string()))?;
    let value: serde_json::Value = if json {
        serde_json::from_str(text).map_err(|e| perr(e.line(), format!("invalid JSON: {e}")))?
    } else {
        serde_yaml_ng::from_str(text).map_err(|e| {
            let line = e.location().map(|l| l.line()).unwrap_or(1);
            perr(line, format!("invalid YAML: {e}"))
        })?
    };
    let serde_json::Value::Object(map) = value else {
        return Err(perr(1, "a migration must be a mapping with `up:` (and usually `down:`) lists of commands".into()));
    };
    let mut directives = Directives::default();
    let mut up = None;
    let mut down = None;
    let (mut expand, mut backfill, mut contract, mut rollback) = (None, None, None, None);
    for (k, v) in map {
        let key_line = key_line(text, &k);
        match k.as_str() {
            "up" | "down" | "expand" | "contract" | "rollback" => {
                let body = command_list(text, rel, &k, v, key_line)?;
                match k.as_str() {
                    "up" => up = Some(body),
                    "down" => down = Some(body),
                    "expand" => expand = Some((key_line, body)),
                    "contract" => contract = Some(body),
                    _ => rollback = Some(body),
                }
            }
            "backfill" => backfill = Some(mongo_backfill(rel, key_line, v)?),
            "depends" => {
                let list = match v {
                    serde_json::Value::Array(a) => a,
                    other => vec![other],
                };
                for item in list {
                    let w = match item {
                        serde_json::Value::String(s) => s,
                        serde_json::Value::Number(n) => n.to_string(),
                        other => return Err(perr(key_line, format!("`depends` entries are names or versions, not {other}"))),
                    };
                    add_depends(&mut directives, &w, rel, key_line)?;
                }
            }
            "transaction" => {
                directives.transaction = match v {
                    serde_json::Value::Bool(true) => TxMode::On,
                    serde_json::Value::Bool(false) => TxMode::Off,
                    other => return Err(perr(key_line, format!("`transaction` must be true or false, not {other}"))),
                }
            }
            "scope" => {
                directives.scope = match v.as_str() {
                    Some("public") => Scope::Public,
                    Some("tenant") => Scope::Tenant,
                    _ => return Err(perr(key_line, format!("`scope` must be public or tenant, not {v}"))),
                }
            }
            "group" | "collection" => match v {
                serde_json::Value::String(s) if !s.is_empty() => directives.group = Some(s),
                other => return Err(perr(key_line, format!("`{k}` must be a name, not {other}"))),
            },
            "description" | "comment" => {}
            other => {
                return Err(perr(
                    key_line,
                    format!("unknown key `{other}` (known: up, down, depends, transaction, scope, group, description; zero-downtime: expand, backfill, contract, rollback)"),
                ))
            }
        }
    }
    let phased = expand.is_some() || backfill.is_some() || contract.is_some() || rollback.is_some();
    let (up, down, phases) = match (up, phased) {
        (Some(up), false) => (up, down, None),
        (None, false) => return Err(perr(1, "missing `up:` list of commands".into())),
        (up, true) if up.is_some() || down.is_some() => {
            let k = if up.is_some() { "up" } else { "down" };
            return Err(perr(
                key_line(text, k),
                format!("`{k}` in a zero-downtime migration: its parts are `expand`, `backfill`, `contract` and `rollback` (rollback is what `kiln down` runs)"),
            ));
        }
        _ => {
            let Some((_, expand)) = expand else {
                return Err(perr(1, "a zero-downtime migration needs `expand:` (a list of commands, `[]` when there is nothing to add)".into()));
            };
            (expand, rollback, Some(Box::new(crate::jobs::Phases { backfill, contract })))
        }
    };
    let directives = directives.placed(group, scope);
    Ok(Migration {
        version,
        description,
        path: rel.to_path_buf(),
        kind: Kind::Commands,
        checksum: Checksum::of_parts(&[raw]),
        directives,
        up,
        down,
        phases,
    })
}

/// A top-level list of commands (`up`, `down`, `expand`, …) as a body.
fn command_list(text: &str, rel: &Path, k: &str, v: serde_json::Value, key_line: usize) -> Result<Body, SourceError> {
    let perr = |line: usize, message: String| SourceError::Parse { file: rel.to_path_buf(), line, message };
    let serde_json::Value::Array(items) = v else {
        return Err(perr(key_line, format!("`{k}` must be a list of commands")));
    };
    let lines = item_lines(text, k, items.len());
    let mut cmds = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let line = lines.get(i).copied().unwrap_or(key_line);
        match &item {
            serde_json::Value::Object(o) if !o.is_empty() => {}
            _ => return Err(perr(line, format!("`{k}` command #{}: a command must be a document such as {{createIndexes: coll, …}}", i + 1))),
        }
        cmds.push(Command { doc: item, line });
    }
    Ok(Body::Commands { file: rel.to_path_buf(), commands: cmds })
}

/// Line of a top-level key in a YAML/JSON file (1 if not found).
fn key_line(text: &str, key: &str) -> usize {
    for (i, l) in text.lines().enumerate() {
        let t = l.trim_start_matches(['{', ' ']);
        if l.starts_with(key) || t.starts_with(&format!("\"{key}\"")) {
            let rest = l.strip_prefix(key).unwrap_or("");
            if l.starts_with(key) && !rest.trim_start().starts_with(':') {
                continue;
            }
            return i + 1;
        }
    }
    1
}

/// Lines where the items of a top-level block list start (YAML block style).
/// Returns fewer entries than `n` when the list is not in block style.
fn item_lines(text: &str, key: &str, n: usize) -> Vec<usize> {
    let start = key_line(text, key);
    let mut out = Vec::new();
    let mut indent: Option<usize> = None;
    for (i, l) in text.lines().enumerate().skip(start) {
        if l.trim().is_empty() || l.trim_start().starts_with('#') {
            continue;
        }
        let ind = l.len() - l.trim_start().len();
        if ind == 0 && !l.starts_with('-') {
            break; // next top-level key
        }
        if l.trim_start().starts_with("- ") || l.trim() == "-" {
            match indent {
                None => {
                    indent = Some(ind);
                    out.push(i + 1);
                }
                Some(x) if x == ind => out.push(i + 1),
                _ => {}
            }
        }
        if out.len() == n {
            break;
        }
    }
    out
}
