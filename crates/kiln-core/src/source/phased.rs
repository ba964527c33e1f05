//! Zero-downtime migrations (DESIGN §4): SQL files with `-- kiln:expand`,
//! `-- kiln:backfill …`, `-- kiln:remaining`, `-- kiln:contract` and
//! `-- kiln:rollback` sections, and the MongoDB keys `expand`, `backfill`,
//! `contract`, `rollback`.
//!
//! The result is an ordinary [`Migration`] whose `up` is the expand part and
//! whose `down` is the rollback part, with the rest in [`Phases`]: the runner
//! and the engines run expand and rollback as they run any step.

use std::path::Path;

use crate::error::SourceError;
use crate::jobs::{derive_remaining, uses_range, Backfill, MongoBackfill, MongoChange, Phases, SqlBackfill};
use crate::model::*;

/// The sections of a zero-downtime SQL file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Section {
    Expand,
    Backfill,
    Remaining,
    Contract,
    Rollback,
}

impl Section {
    pub(super) fn parse(word: &str) -> Option<Section> {
        Some(match word.to_ascii_lowercase().as_str() {
            "expand" => Section::Expand,
            "backfill" => Section::Backfill,
            "remaining" => Section::Remaining,
            "contract" => Section::Contract,
            "rollback" => Section::Rollback,
            _ => return None,
        })
    }
    pub(super) fn name(self) -> &'static str {
        match self {
            Section::Expand => "expand",
            Section::Backfill => "backfill",
            Section::Remaining => "remaining",
            Section::Contract => "contract",
            Section::Rollback => "rollback",
        }
    }
}

/// `-- kiln:SECTION args` on `line`: the section and its arguments.
pub(super) fn section_marker(line: &str) -> Option<(Section, &str)> {
    let rest = line.trim().strip_prefix("--")?.trim();
    if !rest.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("kiln:")) {
        return None;
    }
    let rest = &rest[5..];
    let (word, args) = match rest.find(char::is_whitespace) {
        Some(p) => (&rest[..p], rest[p..].trim()),
        None => (rest, ""),
    };
    Section::parse(word).map(|s| (s, args))
}

/// A SQL file with zero-downtime sections. `split` turns a section's text
/// (starting at a 1-based line) into its body.
pub(super) fn sql_phased(
    rel: &Path,
    text: &str,
    header_end: usize,
    split: &dyn Fn(&str, usize) -> Result<Body, SourceError>,
) -> Result<(Body, Option<Body>, Phases), SourceError> {
    let err = |line: usize, message: String| SourceError::Parse { file: rel.to_path_buf(), line, message };
    // (section, args, marker line, body start byte, body first line)
    let mut found: Vec<(Section, String, usize, usize, usize)> = Vec::new();
    let mut pos = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let lineno = i + 1;
        if let Some((section, args)) = section_marker(line) {
            if found.is_empty() && pos > header_end && !only_comments(&text[header_end..pos]) {
                return Err(err(
                    lineno,
                    format!("statements before the first section (`-- kiln:{}`); every statement belongs to a section", section.name()),
                ));
            }
            if let Some(prev) = found.iter().find(|f| f.0 == section) {
                return Err(err(lineno, format!("a second `-- kiln:{}` section (the first is on line {})", section.name(), prev.2)));
            }
            if let Some(last) = found.last() {
                if last.0 > section {
                    return Err(err(
                        lineno,
                        format!(
                            "`-- kiln:{}` must come before `-- kiln:{}` (order: expand, backfill, remaining, contract, rollback)",
                            section.name(),
                            last.0.name()
                        ),
                    ));
                }
            }
            if section != Section::Backfill && !args.is_empty() {
                return Err(err(lineno, format!("`-- kiln:{}` takes no arguments (found {args:?})", section.name())));
            }
            found.push((section, args.to_string(), lineno, pos + line.len(), lineno + 1));
        } else if let Some(word) = up_down_marker(line) {
            return Err(err(
                lineno,
                format!("`-- kiln:{word}` in a zero-downtime migration: its parts are `-- kiln:expand`, `-- kiln:backfill`, `-- kiln:contract` and `-- kiln:rollback` (rollback is what `kiln down` runs)"),
            ));
        }
        pos += line.len();
    }
    let Some(first) = found.first() else {
        return Err(err(1, "no `-- kiln:expand` section".into()));
    };
    if first.0 != Section::Expand {
        return Err(err(first.2, format!("a zero-downtime migration starts with `-- kiln:expand` (found `-- kiln:{}` first)", first.0.name())));
    }
    let mut bodies: Vec<(Section, String, usize, Body)> = Vec::new();
    for (i, (section, args, marker_line, start, line)) in found.iter().enumerate() {
        let end = found.get(i + 1).map(|n| n.3 - marker_len(text, n.3)).unwrap_or(text.len());
        let body = split(&text[*start..end.max(*start)], *line)?;
        bodies.push((*section, args.clone(), *marker_line, body));
    }
    let take = |s: Section| bodies.iter().find(|b| b.0 == s);
    let expand = take(Section::Expand).map(|b| b.3.clone()).expect("checked above");
    let rollback = take(Section::Rollback).map(|b| b.3.clone());
    let contract = take(Section::Contract).map(|b| b.3.clone());
    let backfill = match take(Section::Backfill) {
        None => {
            if let Some(r) = take(Section::Remaining) {
                return Err(err(r.2, "`-- kiln:remaining` without a `-- kiln:backfill` section: it counts what the backfill has left".into()));
            }
            None
        }
        Some((_, args, line, body)) => {
            let remaining = take(Section::Remaining).map(|r| (r.2, r.3.clone()));
            Some(Backfill::Sql(sql_backfill(rel, args, *line, body, remaining)?))
        }
    };
    Ok((expand, rollback, Phases { backfill, contract }))
}

/// Bytes of the marker line that ends at byte `body_start`.
fn marker_len(text: &str, body_start: usize) -> usize {
    let before = &text[..body_start];
    let trimmed = before.strip_suffix('\n').unwrap_or(before);
    match trimmed.rfind('\n') {
        Some(p) => body_start - (p + 1),
        None => body_start,
    }
}

fn only_comments(s: &str) -> bool {
    s.lines().all(|l| {
        let t = l.trim();
        t.is_empty() || t.starts_with("--")
    })
}

fn up_down_marker(line: &str) -> Option<&'static str> {
    let rest = line.trim().strip_prefix("--")?.trim();
    if rest.eq_ignore_ascii_case("kiln:up") {
        Some("up")
    } else if rest.eq_ignore_ascii_case("kiln:down") {
        Some("down")
    } else {
        None
    }
}

fn sql_backfill(rel: &Path, args: &str, line: usize, body: &Body, remaining: Option<(usize, Body)>) -> Result<SqlBackfill, SourceError> {
    let err = |line: usize, message: String| SourceError::Parse { file: rel.to_path_buf(), line, message };
    let (mut table, mut key, mut batch, mut parts) = (None, None, 1000u32, 1u32);
    for arg in args.split_whitespace() {
        let Some((k, v)) = arg.split_once('=') else {
            return Err(err(line, format!("`-- kiln:backfill` arguments are key=value (table=users key=id batch=5000), not {arg:?}")));
        };
        let number = |what: &str, max: u32| -> Result<u32, SourceError> {
            match v.parse::<u32>() {
                Ok(n) if (1..=max).contains(&n) => Ok(n),
                _ => Err(err(line, format!("`{what}={v}`: {what} must be a whole number from 1 to {max}"))),
            }
        };
        match k {
            "table" if !v.is_empty() => table = Some(v.to_string()),
            "key" if !v.is_empty() => key = Some(v.to_string()),
            "batch" => batch = number("batch", 1_000_000)?,
            "parts" => parts = number("parts", 256)?,
            other => return Err(err(line, format!("unknown `-- kiln:backfill` argument `{other}` (known: table, key, batch, parts)"))),
        }
    }
    let Some(table) = table else {
        return Err(err(line, "`-- kiln:backfill` needs `table=NAME`: the table whose rows the backfill walks".into()));
    };
    let Some(key) = key else {
        return Err(err(
            line,
            format!("`-- kiln:backfill` needs `key=COLUMN`: a unique, ordered column of {table} (usually the primary key) that batches walk in order, e.g. `key=id`; kiln never uses OFFSET"),
        ));
    };
    let Body::Sql { statements, .. } = body else { unreachable!("SQL sections") };
    let statement = match statements.as_slice() {
        [one] => one.clone(),
        [] => return Err(err(line, "`-- kiln:backfill` has no statement; write one statement over the key range `:lo`..`:hi`".into())),
        [_, second, ..] => {
            return Err(err(
                second.line,
                "`-- kiln:backfill` takes exactly one statement (it runs once per batch, over the key range `:lo`..`:hi`)".into(),
            ))
        }
    };
    if !uses_range(&statement.sql) {
        return Err(err(
            statement.line,
            format!("the backfill statement must use both `:lo` and `:hi` (the key range of one batch), e.g. `… WHERE {key} BETWEEN :lo AND :hi AND …`; without them every batch would run over the whole table"),
        ));
    }
    let (remaining, derived) = match remaining {
        Some((rline, Body::Sql { statements, .. })) => match statements.as_slice() {
            [one] => (one.clone(), false),
            _ => return Err(err(rline, "`-- kiln:remaining` takes exactly one statement: a `SELECT count(*) …` of the rows still to convert".into())),
        },
        Some(_) => unreachable!("SQL sections"),
        None => match derive_remaining(&statement.sql, &table) {
            Some(sql) => (Statement { sql, line: statement.line }, true),
            None => {
                return Err(err(
                    statement.line,
                    format!("kiln cannot tell from this statement which rows are still to convert (it derives that from an `UPDATE … WHERE` condition besides the key range); add `-- kiln:remaining` with `SELECT count(*) FROM {table} WHERE …` counting them — contract waits for it to be 0"),
                ))
            }
        },
    };
    Ok(SqlBackfill { file: rel.to_path_buf(), table, key, batch, parts, statement, remaining, remaining_derived: derived })
}

/// The `backfill:` mapping of a MongoDB migration.
pub(super) fn mongo_backfill(rel: &Path, line: usize, v: serde_json::Value) -> Result<Backfill, SourceError> {
    let err = |message: String| SourceError::Parse { file: rel.to_path_buf(), line, message };
    let serde_json::Value::Object(map) = v else {
        return Err(err("`backfill` must be a mapping: {collection, filter, update (or pipeline), batch_size}".into()));
    };
    let (mut collection, mut filter, mut update, mut pipeline, mut batch, mut parts) = (None, None, None, None, 1000u32, 1u32);
    for (k, v) in map {
        let number = |max: u64| match v.as_u64() {
            Some(n) if (1..=max).contains(&n) => Ok(n as u32),
            _ => Err(err(format!("`backfill.{k}` must be a whole number from 1 to {max}, not {v}"))),
        };
        match k.as_str() {
            "collection" => match v.as_str() {
                Some(s) if !s.is_empty() => collection = Some(s.to_string()),
                _ => return Err(err(format!("`backfill.collection` must be a collection name, not {v}"))),
            },
            "filter" => match v {
                serde_json::Value::Object(_) => filter = Some(v),
                _ => return Err(err(format!("`backfill.filter` must be a query document, not {v}"))),
            },
            "update" => match &v {
                serde_json::Value::Object(o) if !o.is_empty() => update = Some(v),
                serde_json::Value::Array(a) if !a.is_empty() => update = Some(v),
                _ => return Err(err(format!("`backfill.update` must be an update document or a pipeline (a list of stages), not {v}"))),
            },
            "pipeline" => match v {
                serde_json::Value::Array(a) if !a.is_empty() && a.iter().all(|s| s.is_object()) => pipeline = Some(a),
                _ => return Err(err("`backfill.pipeline` must be a list of aggregation stages".into())),
            },
            "batch_size" | "batch" => batch = number(1_000_000)?,
            "parts" => parts = number(256)?,
            other => return Err(err(format!("unknown key `backfill.{other}` (known: collection, filter, update, pipeline, batch_size, parts)"))),
        }
    }
    let collection = collection.ok_or_else(|| err("`backfill` needs `collection`: the collection whose documents it walks by `_id`".into()))?;
    let filter = filter.ok_or_else(|| {
        err("`backfill` needs `filter`: the documents still to convert (e.g. `{displayName: {$exists: false}}`); batches skip the rest, and contract waits until it counts 0".into())
    })?;
    let change = match (update, pipeline) {
        (Some(u), None) => {
            literal_field_paths(&u).into_iter().for_each(|(field, value)| {
                tracing::warn!(
                    "{}:{line}: `backfill.update` sets {field} to the literal string {value:?}: an update document does not read fields; to copy a field write a pipeline: update: [{{$set: {{{field}: {value:?}}}}}]",
                    rel.display()
                );
            });
            MongoChange::Update(u)
        }
        (None, Some(p)) => {
            if p.iter().any(|s| s.get("$merge").is_some() || s.get("$out").is_some()) {
                return Err(err("`backfill.pipeline` must not end in $merge or $out: kiln adds the batch's $match before it and a $merge into the same collection after it".into()));
            }
            MongoChange::Pipeline(p)
        }
        (Some(_), Some(_)) => return Err(err("`backfill` takes `update` or `pipeline`, not both".into())),
        (None, None) => {
            return Err(err(
                "`backfill` needs `update` (an update document or pipeline for updateMany) or `pipeline` (stages whose output is merged back by _id)"
                    .into(),
            ))
        }
    };
    Ok(Backfill::Mongo(MongoBackfill { file: rel.to_path_buf(), collection, filter, change, batch, parts }))
}

/// Fields an update *document* sets to a string starting with `$`: the
/// classic mistake of `{$set: {b: "$a"}}`, which writes the text "$a".
pub fn literal_field_paths(update: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let serde_json::Value::Object(ops) = update {
        for (op, fields) in ops {
            if !matches!(op.as_str(), "$set" | "$setOnInsert") {
                continue;
            }
            if let serde_json::Value::Object(fields) = fields {
                for (f, v) in fields {
                    if let Some(s) = v.as_str().filter(|s| s.starts_with('$') && s.len() > 1) {
                        out.push((f.clone(), s.to_string()));
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::commands::commands_file;
    use crate::source::sql::sql_single;
    use crate::source::LoadOptions;

    const RENAME: &str = "-- kiln:depends 0001\n\
-- kiln:expand\n\
ALTER TABLE users ADD COLUMN display_name text;\n\
-- kiln:backfill table=users key=id batch=500 parts=2\n\
UPDATE users SET display_name = full_name\n\
 WHERE id BETWEEN :lo AND :hi AND display_name IS NULL AND full_name IS NOT NULL;\n\
-- kiln:contract\n\
ALTER TABLE users DROP COLUMN full_name;\n\
-- kiln:rollback\n\
ALTER TABLE users DROP COLUMN display_name;\n";

    fn sql(text: &str) -> Result<Migration, SourceError> {
        sql_single("0002_rename", Path::new("0002_rename.sql"), text, &LoadOptions::default(), None, Scope::Public)
    }

    fn line_of(e: SourceError) -> (usize, String) {
        match e {
            SourceError::Parse { line, message, .. } => (line, message),
            other => panic!("expected a parse error, got {other}"),
        }
    }

    #[test]
    fn a_sql_zero_downtime_file_has_its_parts() {
        let m = sql(RENAME).unwrap();
        assert_eq!(m.directives.depends.len(), 1);
        let Body::Sql { statements, .. } = &m.up else { panic!() };
        assert_eq!((statements.len(), statements[0].line), (1, 3));
        let Some(Body::Sql { statements, .. }) = &m.down else { panic!("rollback is the down") };
        assert!(statements[0].sql.contains("DROP COLUMN display_name"));
        let phases = m.phases.unwrap();
        assert!(matches!(&phases.contract, Some(Body::Sql { statements, .. }) if statements[0].sql.contains("DROP COLUMN full_name")));
        let Some(Backfill::Sql(b)) = phases.backfill else { panic!() };
        assert_eq!((b.table.as_str(), b.key.as_str(), b.batch, b.parts, b.statement.line), ("users", "id", 500, 2, 5));
        assert!(b.remaining_derived);
        assert_eq!(b.remaining.sql, "SELECT count(*) FROM users WHERE (display_name IS NULL) AND (full_name IS NOT NULL)");
    }

    #[test]
    fn an_explicit_remaining_count_is_kept() {
        let text = "-- kiln:expand\nSELECT 1;\n-- kiln:backfill table=t key=id\nUPDATE t SET a = b WHERE id BETWEEN :lo AND :hi;\n-- kiln:remaining\nSELECT count(*) FROM t WHERE a IS NULL;\n";
        let Some(Backfill::Sql(b)) = sql(text).unwrap().phases.unwrap().backfill else { panic!() };
        assert!(!b.remaining_derived);
        assert_eq!((b.remaining.sql.as_str(), b.remaining.line, b.batch), ("SELECT count(*) FROM t WHERE a IS NULL", 6, 1000));
    }

    #[test]
    fn bad_sql_zero_downtime_files_are_refused_with_their_line() {
        let cases: &[(&str, usize, &str)] = &[
            ("-- kiln:expand\nSELECT 1;\n-- kiln:backfill table=t\nUPDATE t SET a=1 WHERE id BETWEEN :lo AND :hi AND a IS NULL;\n", 3, "key=COLUMN"),
            ("-- kiln:expand\nSELECT 1;\n-- kiln:backfill key=id\nUPDATE t SET a=1 WHERE id BETWEEN :lo AND :hi AND a IS NULL;\n", 3, "table=NAME"),
            ("-- kiln:expand\nSELECT 1;\n-- kiln:backfill table=t key=id\nUPDATE t SET a=1 WHERE a IS NULL;\n", 4, "`:lo` and `:hi`"),
            ("-- kiln:expand\nSELECT 1;\n-- kiln:backfill table=t key=id\nUPDATE t SET a=b WHERE id BETWEEN :lo AND :hi;\n", 4, "kiln:remaining"),
            ("-- kiln:expand\nSELECT 1;\n-- kiln:backfill table=t key=id batch=0\nUPDATE t SET a=1 WHERE id BETWEEN :lo AND :hi AND a IS NULL;\n", 3, "batch must be"),
            ("-- kiln:expand\nSELECT 1;\n-- kiln:backfill table=t key=id\nUPDATE t SET a=1 WHERE id BETWEEN :lo AND :hi AND a IS NULL;\nSELECT 2;\n", 5, "exactly one statement"),
            ("-- kiln:contract\nSELECT 1;\n-- kiln:expand\nSELECT 1;\n", 3, "must come before"),
            ("-- kiln:expand\nSELECT 1;\n-- kiln:down\nSELECT 1;\n", 3, "kiln:rollback"),
            ("-- kiln:expand\nSELECT 1;\n-- kiln:expand\nSELECT 1;\n", 3, "second"),
            ("-- kiln:expand\nSELECT 1;\n-- kiln:remaining\nSELECT 1;\n", 3, "without a `-- kiln:backfill`"),
            ("-- kiln:expand\nSELECT 1;\n-- kiln:contract now\nSELECT 1;\n", 3, "takes no arguments"),
        ];
        for (text, line, needle) in cases {
            let (l, msg) = line_of(sql(text).unwrap_err());
            assert_eq!(l, *line, "{text:?}: {msg}");
            assert!(msg.contains(needle), "{text:?}: {msg}");
        }
    }

    #[test]
    fn sections_are_refused_in_up_down_pairs() {
        let e = crate::source::sql::sql_pair(
            "0003_x",
            Path::new("0003_x.up.sql"),
            "SELECT 1;\n-- kiln:expand\nSELECT 2;\n",
            None,
            &LoadOptions::default(),
            None,
            Scope::Public,
            None,
        )
        .unwrap_err();
        assert_eq!(line_of(e).0, 2);
    }

    fn yaml(text: &str) -> Result<Migration, SourceError> {
        commands_file("0002_rename", Path::new("0002_rename.yaml"), text, false, None, Scope::Public)
    }

    #[test]
    fn a_mongo_zero_downtime_file_has_its_parts() {
        let m = yaml(
            "expand: []\nbackfill:\n  collection: users\n  filter: { displayName: { $exists: false } }\n  update: [ { $set: { displayName: \"$fullName\" } } ]\n  batch_size: 200\ncontract:\n  - update: users\n    updates: [ { q: {}, u: { $unset: { fullName: \"\" } }, multi: true } ]\nrollback:\n  - update: users\n    updates: [ { q: {}, u: { $unset: { displayName: \"\" } }, multi: true } ]\n",
        )
        .unwrap();
        assert_eq!(m.up.len(), 0);
        assert_eq!(m.down.as_ref().unwrap().len(), 1);
        let p = m.phases.unwrap();
        let Some(Backfill::Mongo(b)) = p.backfill else { panic!() };
        assert_eq!((b.collection.as_str(), b.batch), ("users", 200));
        assert!(matches!(b.change, MongoChange::Update(serde_json::Value::Array(_))));
        let m = yaml("expand: []\nbackfill:\n  collection: projects\n  filter: { ownerName: { $exists: false } }\n  pipeline:\n    - $lookup: { from: users, localField: ownerId, foreignField: _id, as: o }\n    - $project: { ownerName: { $first: \"$o.name\" } }\n").unwrap();
        assert!(matches!(m.phases.unwrap().backfill, Some(Backfill::Mongo(MongoBackfill { change: MongoChange::Pipeline(_), .. }))));
    }

    #[test]
    fn bad_mongo_zero_downtime_files_are_refused() {
        let cases: &[(&str, &str)] = &[
            ("backfill: { collection: u, filter: {}, update: { $set: { a: 1 } } }\n", "needs `expand:`"),
            ("expand: []\nbackfill: { filter: {}, update: { $set: { a: 1 } } }\n", "needs `collection`"),
            ("expand: []\nbackfill: { collection: u, update: { $set: { a: 1 } } }\n", "needs `filter`"),
            ("expand: []\nbackfill: { collection: u, filter: {} }\n", "needs `update`"),
            ("expand: []\nup: []\n", "zero-downtime"),
            ("expand: []\nbackfill: { collection: u, filter: {}, pipeline: [ { $merge: { into: u } } ] }\n", "must not end in $merge"),
            ("expand: []\nbackfill: { collection: u, filter: {}, update: { $set: { a: 1 } }, batch_size: -1 }\n", "batch_size"),
        ];
        for (text, needle) in cases {
            let msg = yaml(text).unwrap_err().to_string();
            assert!(msg.contains(needle), "{text:?}: {msg}");
        }
    }

    #[test]
    fn literal_dollar_strings_are_found_only_in_update_documents() {
        let u = serde_json::json!({"$set": {"displayName": "$fullName", "n": "plain"}});
        assert_eq!(literal_field_paths(&u), vec![("displayName".to_string(), "$fullName".to_string())]);
        let p = serde_json::json!([{"$set": {"displayName": "$fullName"}}]);
        assert!(literal_field_paths(&p).is_empty());
    }
}
