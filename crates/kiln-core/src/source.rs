//! Loading migrations from a directory (DESIGN §2).
//!
//! Three SQL layouts are read as they are: a single file with `-- kiln:up` /
//! `-- kiln:down` sections, golang-migrate/sqlx `.up.sql` + `.down.sql` pairs,
//! and diesel folders holding `up.sql` + `down.sql`. MongoDB migrations are YAML
//! or JSON files with `up:` and `down:` lists of database commands.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use regex::Regex;

use crate::error::SourceError;
use crate::model::*;
use crate::split::{split_statements, Dialect};

/// The default naming rule for migration files: version, `_`, lower-case snake description.
pub const DEFAULT_FILE_RULE: &str = r"^[0-9]+_[a-z0-9]+(_[a-z0-9]+)*$";
/// The default rule for diesel folders: diesel's own (any description, hyphens included).
pub const DEFAULT_DIESEL_RULE: &str = r"^[0-9][0-9-]*_.+$";

/// How to read a migrations directory.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// SQL lexical rules for splitting statements.
    pub dialect: Dialect,
    /// A naming rule (regex on the name without extension) that replaces both defaults.
    pub name_rule: Option<String>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { dialect: Dialect::GENERIC, name_rule: None }
    }
}

struct Rules {
    file: Regex,
    diesel: Regex,
    custom: Option<String>,
}

impl Rules {
    fn new(opts: &LoadOptions) -> Result<Self, SourceError> {
        match &opts.name_rule {
            Some(r) => {
                let re = Regex::new(r).map_err(|e| SourceError::BadRule { rule: r.clone(), message: e.to_string() })?;
                Ok(Rules { file: re.clone(), diesel: re, custom: Some(r.clone()) })
            }
            None => Ok(Rules {
                file: Regex::new(DEFAULT_FILE_RULE).expect("valid"),
                diesel: Regex::new(DEFAULT_DIESEL_RULE).expect("valid"),
                custom: None,
            }),
        }
    }
    fn check(&self, stem: &str, diesel: bool, file: &Path) -> Result<(), SourceError> {
        let (re, text) = if diesel {
            (&self.diesel, self.custom.as_deref().unwrap_or(DEFAULT_DIESEL_RULE))
        } else {
            (&self.file, self.custom.as_deref().unwrap_or(DEFAULT_FILE_RULE))
        };
        if re.is_match(stem) {
            Ok(())
        } else {
            Err(SourceError::BadName { file: file.to_path_buf(), rule: text.to_string() })
        }
    }
}

/// Check a would-be migration name (without extension) against the naming rule,
/// as `kiln create` does before writing a file.
pub fn check_name(stem: &str, opts: &LoadOptions) -> Result<(), SourceError> {
    let rules = Rules::new(opts)?;
    rules.check(stem, false, Path::new(stem))?;
    split_version(stem)
        .map(|_| ())
        .ok_or_else(|| SourceError::BadName { file: PathBuf::from(stem), rule: rules.custom.clone().unwrap_or_else(|| DEFAULT_FILE_RULE.into()) })
}

/// Split `0001_create_users` into its version and description.
pub fn split_version(stem: &str) -> Option<(Version, String)> {
    let (head, desc) = match stem.find('_') {
        Some(i) => (&stem[..i], &stem[i + 1..]),
        None => (stem, ""),
    };
    let digits: String = head.chars().filter(|c| *c != '-').collect();
    if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) || !head.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    let number: u64 = digits.parse().ok()?;
    Some((Version { number, text: digits }, desc.to_string()))
}

/// Read every migration under `dir`, sorted by version.
///
/// Files are read and parsed on several threads: a no-op `kiln up` must read
/// and checksum every file, and that is most of its cost.
///
/// # Errors
/// The first problem found: an unreadable directory or file, a name that breaks
/// the naming rule, a duplicate version, or content that cannot be parsed. Each
/// error names the file (relative to `dir`) and, for content, the line.
pub fn load_dir(dir: &Path, opts: &LoadOptions) -> Result<Vec<Migration>, SourceError> {
    let rules = Rules::new(opts)?;
    let mut tasks: Vec<Task> = Vec::new();
    walk(dir, dir, &rules, None, Scope::Public, 0, &mut tasks)?;
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(4);
    let results: Vec<Result<Migration, SourceError>> = if threads > 1 && tasks.len() >= 64 {
        let chunk = tasks.len().div_ceil(threads);
        std::thread::scope(|sc| {
            let handles: Vec<_> = tasks.chunks(chunk).map(|part| sc.spawn(move || part.iter().map(|t| t.load(opts)).collect::<Vec<_>>())).collect();
            handles.into_iter().flat_map(|h| h.join().expect("loader thread panicked")).collect()
        })
    } else {
        tasks.iter().map(|t| t.load(opts)).collect()
    };
    let mut found = Vec::with_capacity(results.len());
    for r in results {
        found.push(r?);
    }
    found.sort_by(|a, b| a.version.cmp(&b.version));
    for w in found.windows(2) {
        if w[0].version == w[1].version {
            return Err(SourceError::DuplicateVersion { version: w[1].version.clone(), first: w[0].path.clone(), second: w[1].path.clone() });
        }
    }
    Ok(found)
}

/// One migration to read, found by [`walk`]: names are checked while walking,
/// contents are read and parsed later, in parallel.
enum Task {
    Sql { stem: String, path: PathBuf, rel: PathBuf, group: Option<String>, scope: Scope },
    Commands { stem: String, path: PathBuf, rel: PathBuf, json: bool, group: Option<String>, scope: Scope },
    Pair { stem: String, up: PathBuf, down: Option<PathBuf>, rel_up: PathBuf, root: PathBuf, group: Option<String>, scope: Scope },
    Diesel { path: PathBuf, rel: PathBuf, name: String, group: Option<String>, scope: Scope },
}

impl Task {
    fn load(&self, opts: &LoadOptions) -> Result<Migration, SourceError> {
        match self {
            Task::Sql { stem, path, rel, group, scope } => {
                let text = read(path, rel)?;
                sql_single(stem, rel, &text, opts, group.as_deref(), *scope)
            }
            Task::Commands { stem, path, rel, json, group, scope } => {
                let text = read(path, rel)?;
                commands_file(stem, rel, &text, *json, group.as_deref(), *scope)
            }
            Task::Pair { stem, up, down, rel_up, root, group, scope } => {
                let up_text = read(up, rel_up)?;
                let down_pair = match down {
                    Some(d) => {
                        let rel_d = d.strip_prefix(root).unwrap_or(d).to_path_buf();
                        let t = read(d, &rel_d)?;
                        Some((rel_d, t))
                    }
                    None => None,
                };
                sql_pair(stem, rel_up, &up_text, down_pair, opts, group.as_deref(), *scope, None)
            }
            Task::Diesel { path, rel, name, group, scope } => load_diesel(path, rel, name, opts, group.as_deref(), *scope),
        }
    }
}

fn walk(root: &Path, dir: &Path, rules: &Rules, group: Option<&str>, scope: Scope, depth: usize, out: &mut Vec<Task>) -> Result<(), SourceError> {
    let rd = std::fs::read_dir(dir).map_err(|e| SourceError::Dir { dir: dir.to_path_buf(), source: e })?;
    if depth > MAX_DEPTH {
        return Err(SourceError::Dir {
            dir: dir.to_path_buf(),
            source: std::io::Error::other(format!("nested more than {MAX_DEPTH} directories deep")),
        });
    }
    // (name, path, is a directory, is a regular file)
    let mut entries: Vec<(String, PathBuf, bool, bool)> = Vec::new();
    for e in rd {
        let e = e.map_err(|e| SourceError::Dir { dir: dir.to_path_buf(), source: e })?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name.ends_with(".retired") {
            continue;
        }
        let path = e.path();
        // The directory entry's type costs no system call; only a symlink needs a
        // stat. Symlinks are followed (to a shared file or folder), except into
        // a directory that contains them (a loop).
        let (is_dir, is_file) = match e.file_type() {
            Ok(t) if !t.is_symlink() => (t.is_dir(), t.is_file()),
            _ => match std::fs::metadata(&path) {
                Ok(m) => (m.is_dir(), m.is_file()),
                Err(_) => (false, false),
            },
        };
        if is_dir && e.file_type().is_ok_and(|t| t.is_symlink()) {
            if let (Ok(target), Ok(here)) = (std::fs::canonicalize(&path), std::fs::canonicalize(dir)) {
                if here.starts_with(&target) {
                    let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
                    return Err(SourceError::Dir {
                        dir: rel,
                        source: std::io::Error::other(format!("symlink loop: it points at {}, which contains it; remove the link", target.display())),
                    });
                }
            }
        }
        entries.push((name, path, is_dir, is_file));
    }
    entries.sort();
    let group_owned = group.map(str::to_string);
    // Pair .up.sql / .down.sql files by stem.
    let mut pairs: BTreeMap<String, (Option<PathBuf>, Option<PathBuf>)> = BTreeMap::new();
    for (name, path, is_dir, is_file) in entries {
        let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
        let migration_like = [".sql", ".yaml", ".yml", ".json"].iter().any(|x| name.ends_with(x));
        if !is_dir && !is_file && migration_like {
            // A FIFO would block the run forever, /dev/zero would fill memory.
            return Err(SourceError::Read {
                file: rel,
                source: std::io::Error::other("not a regular file (a FIFO, socket, device or broken link); kiln reads only regular files"),
            });
        }
        if is_dir {
            if path.join("up.sql").is_file() {
                rules.check(&name, true, &rel)?;
                out.push(Task::Diesel { path, rel, name, group: group_owned.clone(), scope });
            } else if depth == 0 && (name == "public" || name == "tenant") {
                let sc = if name == "tenant" { Scope::Tenant } else { Scope::Public };
                walk(root, &path, rules, group, sc, depth + 1, out)?;
            } else {
                let g = group.map(str::to_string).unwrap_or_else(|| name.clone());
                walk(root, &path, rules, Some(&g), scope, depth + 1, out)?;
            }
            continue;
        }
        if let Some(stem) = name.strip_suffix(".up.sql") {
            pairs.entry(stem.to_string()).or_default().0 = Some(path);
        } else if let Some(stem) = name.strip_suffix(".down.sql") {
            pairs.entry(stem.to_string()).or_default().1 = Some(path);
        } else if let Some(stem) = name.strip_suffix(".sql") {
            rules.check(stem, false, &rel)?;
            out.push(Task::Sql { stem: stem.to_string(), path, rel, group: group_owned.clone(), scope });
        } else if let Some(stem) = name.strip_suffix(".yaml").or_else(|| name.strip_suffix(".yml")).or_else(|| name.strip_suffix(".json")) {
            rules.check(stem, false, &rel)?;
            let json = name.ends_with(".json");
            out.push(Task::Commands { stem: stem.to_string(), path, rel, json, group: group_owned.clone(), scope });
        }
        // Anything else (README.md, .gitkeep, diesel.toml, …) is not a migration.
    }
    for (stem, (up, down)) in pairs {
        let Some(up) = up else {
            let down = down.expect("one of the two exists");
            let rel = down.strip_prefix(root).unwrap_or(&down).to_path_buf();
            return Err(SourceError::Parse { file: rel, line: 1, message: format!("has no matching {stem}.up.sql") });
        };
        let rel_up = up.strip_prefix(root).unwrap_or(&up).to_path_buf();
        rules.check(&stem, false, &rel_up)?;
        out.push(Task::Pair { stem, up, down, rel_up, root: root.to_path_buf(), group: group_owned.clone(), scope });
    }
    Ok(())
}

/// Deepest folder nesting kiln walks below the migrations directory.
const MAX_DEPTH: usize = 16;

/// Largest migration file kiln reads.
pub const MAX_FILE_BYTES: usize = 16 << 20;

fn read(path: &Path, rel: &Path) -> Result<String, SourceError> {
    // A plain read loop: `fs::read` and `read_to_end` stat the file first to size
    // the buffer, one more system call per file for files that fit in 8 KiB anyway.
    use std::io::Read;
    let err = |e| SourceError::Read { file: rel.to_path_buf(), source: e };
    let mut f = std::fs::File::open(path).map_err(err)?;
    let mut bytes = vec![0u8; 8192];
    let mut len = 0;
    loop {
        if len == bytes.len() {
            if len >= MAX_FILE_BYTES {
                return Err(err(std::io::Error::other(format!("larger than {} MiB; a migration file must be smaller", MAX_FILE_BYTES >> 20))));
            }
            bytes.resize((len * 2).min(MAX_FILE_BYTES + 1), 0);
        }
        let want = bytes.len() - len;
        match f.read(&mut bytes[len..]) {
            Ok(0) => break,
            // A regular file returns less than asked for only at its end (reads
            // of local files are not cut short by signals), so a short read
            // saves the system call that would return 0.
            Ok(n) if n < want => {
                len += n;
                break;
            }
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(err(e)),
        }
    }
    bytes.truncate(len);
    String::from_utf8(bytes).map_err(|e| SourceError::Parse {
        file: rel.to_path_buf(),
        line: 1 + e.as_bytes()[..e.utf8_error().valid_up_to()].iter().filter(|b| **b == b'\n').count(),
        message: "the file is not valid UTF-8".into(),
    })
}

fn version_of(stem: &str, rel: &Path) -> Result<(Version, String), SourceError> {
    split_version(stem)
        .ok_or_else(|| SourceError::BadName { file: rel.to_path_buf(), rule: "a leading version number, e.g. 0001_create_users".into() })
}

fn load_diesel(path: &Path, rel: &Path, name: &str, opts: &LoadOptions, group: Option<&str>, scope: Scope) -> Result<Migration, SourceError> {
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
fn sql_pair(
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
    let (directives, body_start) = parse_header(up, rel_up, 1)?;
    let up_body = sql_body(up, body_start, rel_up, opts)?;
    let checksum = match &down {
        Some((_, d)) => Checksum::of_parts(&[up, d]),
        None => Checksum::of_parts(&[up]),
    };
    let down_body = match &down {
        Some((rel_d, d)) => Some(sql_body(d, 0, rel_d, opts)?),
        None => None,
    };
    let mut directives = directives;
    if directives.group.is_none() {
        directives.group = group.map(str::to_string);
    }
    if scope == Scope::Tenant {
        directives.scope = Scope::Tenant;
    }
    Ok(Migration {
        version,
        description,
        path: folder.map(Path::to_path_buf).unwrap_or_else(|| rel_up.to_path_buf()),
        kind: Kind::Sql,
        checksum,
        directives,
        up: up_body,
        down: down_body,
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

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Marker {
    Up,
    Down,
}

fn marker(line: &str) -> Option<Marker> {
    let rest = line.trim().strip_prefix("--")?.trim();
    let any = |ks: &[&str]| ks.iter().any(|k| rest.eq_ignore_ascii_case(k));
    if any(&["kiln:up", "migrate:up", "+goose up", "+migrate up"]) {
        Some(Marker::Up)
    } else if any(&["kiln:down", "migrate:down", "+goose down", "+migrate down"]) {
        Some(Marker::Down)
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
            d.transaction = match value.to_ascii_lowercase().as_str() {
                "off" | "false" | "no" => TxMode::Off,
                "on" | "true" | "yes" => TxMode::On,
                other => return Err(err(format!("`-- kiln:transaction` takes on or off, not {other:?}"))),
            }
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
        "expand" | "backfill" | "contract" | "rollback" | "remaining" => {
            return Err(err(format!("`-- kiln:{name}` (expand/backfill/contract migrations) is not supported by this version of kiln")))
        }
        other => return Err(err(format!("unknown directive `-- kiln:{other}` (known: up, down, depends, transaction, scope, group)"))),
    }
    Ok(())
}

fn add_depends(d: &mut Directives, written: &str, rel: &Path, line: usize) -> Result<(), SourceError> {
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

fn sql_single(stem: &str, rel: &Path, text: &str, opts: &LoadOptions, group: Option<&str>, scope: Scope) -> Result<Migration, SourceError> {
    let (version, description) = version_of(stem, rel)?;
    let (mut directives, header_end) = parse_header(text, rel, 1)?;
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
    let (up, down) = match up_range {
        None => (sql_body(text, header_end, rel, opts)?, None),
        Some((start, line)) => {
            let up = sql_section(&text[start..up_end], line, rel, opts)?;
            let down = match down_range {
                Some((ds, dl)) => Some(sql_section(&text[ds..], dl, rel, opts)?),
                None => None,
            };
            (up, down)
        }
    };
    if directives.group.is_none() {
        directives.group = group.map(str::to_string);
    }
    if scope == Scope::Tenant {
        directives.scope = Scope::Tenant;
    }
    Ok(Migration { version, description, path: rel.to_path_buf(), kind: Kind::Sql, checksum: Checksum::of_parts(&[text]), directives, up, down })
}

fn only_comments(s: &str) -> bool {
    s.lines().all(|l| {
        let t = l.trim();
        t.is_empty() || t.starts_with("--")
    })
}

fn commands_file(stem: &str, rel: &Path, text: &str, json: bool, group: Option<&str>, scope: Scope) -> Result<Migration, SourceError> {
    let (version, description) = version_of(stem, rel)?;
    let perr = |line: usize, message: String| SourceError::Parse { file: rel.to_path_buf(), line, message };
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
    for (k, v) in map {
        let key_line = key_line(text, &k);
        match k.as_str() {
            "up" | "down" => {
                let serde_json::Value::Array(items) = v else {
                    return Err(perr(key_line, format!("`{k}` must be a list of commands")));
                };
                let lines = item_lines(text, &k, items.len());
                let mut cmds = Vec::with_capacity(items.len());
                for (i, item) in items.into_iter().enumerate() {
                    let line = lines.get(i).copied().unwrap_or(key_line);
                    match &item {
                        serde_json::Value::Object(o) if !o.is_empty() => {}
                        _ => {
                            return Err(perr(
                                line,
                                format!("`{k}` command #{}: a command must be a document such as {{createIndexes: coll, …}}", i + 1),
                            ))
                        }
                    }
                    cmds.push(Command { doc: item, line });
                }
                let body = Body::Commands { file: rel.to_path_buf(), commands: cmds };
                if k == "up" {
                    up = Some(body);
                } else {
                    down = Some(body);
                }
            }
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
            "expand" | "backfill" | "contract" | "rollback" => {
                return Err(perr(key_line, format!("`{k}` (expand/backfill/contract migrations) is not supported by this version of kiln")))
            }
            other => return Err(perr(key_line, format!("unknown key `{other}` (known: up, down, depends, transaction, scope, group, description)"))),
        }
    }
    let Some(up) = up else {
        return Err(perr(1, "missing `up:` list of commands".into()));
    };
    if directives.group.is_none() {
        directives.group = group.map(str::to_string);
    }
    if scope == Scope::Tenant {
        directives.scope = Scope::Tenant;
    }
    Ok(Migration { version, description, path: rel.to_path_buf(), kind: Kind::Commands, checksum: Checksum::of_parts(&[text]), directives, up, down })
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (name, content) in files {
            let p = d.path().join(name);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, content).unwrap();
        }
        d
    }

    fn load(d: &tempfile::TempDir) -> Result<Vec<Migration>, SourceError> {
        load_dir(d.path(), &LoadOptions::default())
    }

    #[test]
    fn three_sql_layouts() {
        let d = dir_with(&[
            ("0001_one.sql", "-- kiln:up\ncreate table a (id int);\n-- kiln:down\ndrop table a;\n"),
            ("0002_two.up.sql", "create table b (id int);"),
            ("0002_two.down.sql", "drop table b;"),
            ("2019-02-26-002946_create-user/up.sql", "create table c (id int);"),
            ("2019-02-26-002946_create-user/down.sql", "drop table c;"),
            ("README.md", "not a migration"),
        ]);
        let ms = load(&d).unwrap();
        assert_eq!(ms.len(), 3);
        assert_eq!(ms[0].name(), "0001_one");
        assert_eq!(ms[0].up.len(), 1);
        assert!(ms[0].down.is_some());
        assert_eq!(ms[1].name(), "0002_two");
        assert_eq!(ms[2].version.number, 20190226002946);
        assert_eq!(ms[2].description, "create-user");
        assert!(ms[2].down.is_some());
    }

    #[test]
    fn no_markers_is_irreversible_up() {
        let d = dir_with(&[("0001_x.sql", "create table a (id int);\ncreate table b (id int);")]);
        let ms = load(&d).unwrap();
        assert_eq!(ms[0].up.len(), 2);
        assert!(ms[0].down.is_none());
    }

    #[test]
    fn directives() {
        let d = dir_with(&[
            ("0001_core_tables.sql", "create table a (id int);"),
            (
                "0002_x.sql",
                "-- kiln:depends 0001_core_tables\n-- kiln:transaction off\n-- kiln:group users\n-- kiln:up\ncreate index concurrently i on a (id);\n-- kiln:down\ndrop index i;",
            ),
            ("0003_y.sql", "-- DEPENDS: 0001_core_tables.sql\nselect 1;"),
        ]);
        let ms = load(&d).unwrap();
        assert_eq!(ms[1].directives.depends[0].version.number, 1);
        assert_eq!(ms[1].directives.transaction, TxMode::Off);
        assert_eq!(ms[1].directives.group.as_deref(), Some("users"));
        assert_eq!(ms[2].directives.depends[0].version.number, 1);
    }

    #[test]
    fn unknown_directive_names_line() {
        let d = dir_with(&[("0001_x.sql", "-- kiln:transacton off\nselect 1;")]);
        let e = load(&d).unwrap_err().to_string();
        assert!(e.contains("0001_x.sql:1"), "{e}");
        assert!(e.contains("transacton"), "{e}");
    }

    #[test]
    fn bad_name_and_duplicate() {
        let d = dir_with(&[("0001_Bad-Name.sql", "select 1;")]);
        assert!(matches!(load(&d), Err(SourceError::BadName { .. })));
        let d = dir_with(&[("0001_a.sql", "select 1;"), ("001_b.sql", "select 1;")]);
        assert!(matches!(load(&d), Err(SourceError::DuplicateVersion { .. })));
        let d = dir_with(&[("create_users.sql", "select 1;")]);
        assert!(matches!(load(&d), Err(SourceError::BadName { .. })));
    }

    #[test]
    fn custom_rule() {
        let d = dir_with(&[("V1_Init.sql", "select 1;")]);
        let opts = LoadOptions { name_rule: Some(r"^V?[0-9]+_.+$".into()), ..Default::default() };
        // V1 does not start with a digit: still refused, with the version explanation.
        assert!(load_dir(d.path(), &opts).is_err());
        let d = dir_with(&[("1_Init.sql", "select 1;")]);
        assert_eq!(load_dir(d.path(), &opts).unwrap().len(), 1);
    }

    #[test]
    fn groups_scopes_and_retired() {
        let d = dir_with(&[("users/0001_a.sql", "select 1;"), ("tenant/0002_b.sql", "select 1;"), ("0003_c.sql.retired", "select 1;")]);
        let ms = load(&d).unwrap();
        assert_eq!(ms.len(), 2);
        assert_eq!(ms[0].directives.group.as_deref(), Some("users"));
        assert_eq!(ms[1].directives.scope, Scope::Tenant);
        assert_eq!(ms[1].directives.group, None);
    }

    #[test]
    fn yaml_commands() {
        let y = "up:\n  - createIndexes: creatorprofiles\n    indexes:\n      - key: { role: 1, verified: 1, rating.avg: -1 }\n        name: idx\n  - update: users\n    updates:\n      - q: { isMfaRequired: { $exists: false } }\n        u: { $set: { isMfaRequired: false } }\n        multi: true\ndown:\n  - dropIndexes: creatorprofiles\n    index: idx\n";
        let d = dir_with(&[("20251101_add_index.yaml", y)]);
        let ms = load(&d).unwrap();
        let Body::Commands { commands, .. } = &ms[0].up else { panic!() };
        assert_eq!(commands.len(), 2);
        assert_eq!(commands[0].line, 2);
        assert_eq!(commands[1].line, 6);
        assert_eq!(commands[0].doc["indexes"][0]["key"]["rating.avg"], -1);
        assert_eq!(ms[0].kind, Kind::Commands);
    }

    #[test]
    fn bad_yaml_names_line() {
        let d = dir_with(&[("0001_x.yaml", "up:\n  - create: a\n  bad: [\n")]);
        let e = load(&d).unwrap_err().to_string();
        assert!(e.starts_with("0001_x.yaml:"), "{e}");
        let d = dir_with(&[("0001_x.yaml", "up:\n  - 5\n")]);
        let e = load(&d).unwrap_err().to_string();
        assert!(e.contains("command #1"), "{e}");
    }

    #[test]
    fn down_without_up_and_delimiter() {
        let d = dir_with(&[("0001_x.down.sql", "drop table a;")]);
        assert!(load(&d).unwrap_err().to_string().contains("no matching"));
        let d = dir_with(&[("0001_x.sql", "DELIMITER //\ncreate procedure p() begin select 1; end//\n")]);
        assert!(load(&d).unwrap_err().to_string().contains("DELIMITER"));
    }

    #[test]
    fn statement_lines_refer_to_file() {
        let d = dir_with(&[(
            "0001_x.sql",
            "-- kiln:up\ncreate table a (id int);\n\ncreate table b (id int);\n-- kiln:down\ndrop table b;\ndrop table a;\n",
        )]);
        let ms = load(&d).unwrap();
        let Body::Sql { statements, .. } = &ms[0].up else { panic!() };
        assert_eq!(statements[0].line, 2);
        assert_eq!(statements[1].line, 4);
        let Body::Sql { statements, .. } = ms[0].down.as_ref().unwrap() else { panic!() };
        assert_eq!(statements[1].line, 7);
    }

    #[test]
    fn parallel_load_is_ordered_and_reports_the_first_bad_file() {
        let d = tempfile::tempdir().unwrap();
        for n in 1..=300 {
            fs::write(d.path().join(format!("{n:04}_t_{n}.sql")), format!("create table t_{n} (id int);")).unwrap();
        }
        let ms = load_dir(d.path(), &LoadOptions::default()).unwrap();
        assert_eq!(ms.len(), 300);
        assert!(ms.windows(2).all(|w| w[0].version < w[1].version));
        fs::write(d.path().join("0150_t_150.sql"), "select 'unterminated;").unwrap();
        fs::write(d.path().join("0250_t_250.sql"), "select 'also unterminated;").unwrap();
        let e = load_dir(d.path(), &LoadOptions::default()).unwrap_err().to_string();
        assert!(e.starts_with("0150_t_150.sql:1"), "{e}");
    }

    #[test]
    fn statements_before_up_marker_refused() {
        let d = dir_with(&[("0001_x.sql", "select 1;\n-- kiln:up\nselect 2;\n")]);
        assert!(load(&d).unwrap_err().to_string().contains("before the first"));
    }
}
