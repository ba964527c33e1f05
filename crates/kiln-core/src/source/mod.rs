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
use crate::split::Dialect;

mod commands;
pub mod nesting;
mod phased;
mod read;
mod sql;
mod tree;

use commands::commands_file;
pub use phased::literal_field_paths;
use read::read;
pub use read::{read_bounded, read_text, MAX_FILE_BYTES};
use sql::{load_diesel, sql_pair, sql_single};
use tree::{Disk, Tree};
pub use tree::{Embedded, EmbeddedFile};

/// A Flyway/refinery versioned file and Flyway's undo file of one version,
/// each with the stem kiln reads it by (`1_init`).
#[derive(Default)]
struct FlywayPair {
    versioned: Option<(PathBuf, String)>,
    undo: Option<(PathBuf, String)>,
}

/// A Flyway / refinery name: `V1__init`, `U1__init` (Flyway's undo), as
/// `(kind, version, digits, description)`. `Err` for Flyway names kiln does
/// not run (dotted versions, repeatable `R__` migrations), with the reason;
/// `None` for anything else.
fn flyway_name(stem: &str) -> Option<Result<(char, u64, String, String), String>> {
    let first = stem.chars().next()?;
    let kind = first.to_ascii_uppercase();
    let (version, desc) = stem[first.len_utf8()..].split_once("__")?;
    if kind == 'R' && version.is_empty() {
        return Some(Err(
            "a Flyway repeatable migration (R__…): kiln does not run repeatable migrations yet; run it with Flyway, or turn it into a versioned migration".into(),
        ));
    }
    if !matches!(kind, 'V' | 'U') || version.is_empty() || !version.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    if !version.bytes().all(|b| b.is_ascii_digit()) {
        if version.bytes().all(|b| b.is_ascii_digit() || b == b'.' || b == b'_') {
            return Some(Err(format!(
                "Flyway version {version:?} has parts (1.1, 1_1): kiln versions are whole numbers; rename it, e.g. V{}__{desc}.sql",
                version.replace(['.', '_'], "")
            )));
        }
        return None;
    }
    let number = version.parse().ok()?;
    Some(Ok((kind, number, version.to_string(), desc.to_string())))
}

/// Deepest folder nesting kiln walks below the migrations directory.
const MAX_DEPTH: usize = 16;

/// The default naming rule for migration files: version, `_`, lower-case snake description.
pub const DEFAULT_FILE_RULE: &str = r"^[0-9]+_[a-z0-9]+(_[a-z0-9]+)*$";
/// The default rule for diesel folders and `.up.sql`/`.down.sql` pairs: their
/// tools' own (any description, hyphens and dots included).
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
    Some((Version::new(number, digits), desc.to_string()))
}

/// Read every migration under `dir`, in the order they apply: by version, as
/// the tool whose layout they follow orders versions ([`VersionOrder`]).
///
/// Files are read and parsed on several threads: a no-op `kiln up` must read
/// and checksum every file, and that is most of its cost.
///
/// # Errors
/// Every problem found, in one error (see [`SourceError::collect`]): an
/// unreadable directory or file, a name that breaks the naming rule, a
/// duplicate version, content that cannot be parsed. Each names the file
/// (relative to `dir`) and, for content, the line.
pub fn load_dir(dir: &Path, opts: &LoadOptions) -> Result<Vec<Migration>, SourceError> {
    let (found, problems) = load_dir_lenient(dir, opts)?;
    match SourceError::collect(problems) {
        Some(e) => Err(e),
        None => Ok(found),
    }
}

/// [`load_dir`] for commands that show rather than run (`kiln status`): the
/// migrations that loaded, and every problem beside them (a second file with
/// a duplicate version is left out of the list and reported).
///
/// # Errors
/// Only what leaves nothing to show: an invalid naming rule or an unreadable
/// migrations directory.
pub fn load_dir_lenient(dir: &Path, opts: &LoadOptions) -> Result<(Vec<Migration>, Vec<SourceError>), SourceError> {
    load_tree(&Disk, dir, opts)
}

/// Load an embedded migrations directory (`kiln::embed_migrations!`) exactly
/// as [`load_dir`] loads the directory it was embedded from: the same
/// migrations, paths and checksums.
///
/// # Errors
/// As [`load_dir`]; paths in messages are relative to the embedded directory.
pub fn load_embedded(set: &Embedded, opts: &LoadOptions) -> Result<Vec<Migration>, SourceError> {
    let (found, problems) = load_embedded_lenient(set, opts)?;
    match SourceError::collect(problems) {
        Some(e) => Err(e),
        None => Ok(found),
    }
}

/// [`load_dir_lenient`] for an embedded set.
///
/// # Errors
/// Only an invalid naming rule.
pub fn load_embedded_lenient(set: &Embedded, opts: &LoadOptions) -> Result<(Vec<Migration>, Vec<SourceError>), SourceError> {
    load_tree(&tree::Memory::new(set), Path::new(""), opts)
}

/// The files `kiln::embed_migrations!` embeds from `dir`, relative to it, in
/// name order — after loading `dir` as [`load_dir`] does, so a directory kiln
/// would refuse is refused when the program is compiled.
///
/// Embedded are the files the loader can read (`.sql`, `.yaml`, `.yml`,
/// `.json`, and diesel's `metadata.toml`); hidden and `.retired` files are left
/// out, as the loader leaves them out.
///
/// # Errors
/// Every problem [`load_dir`] finds, each naming the file and line.
pub fn embeddable_files(dir: &Path, opts: &LoadOptions) -> Result<Vec<PathBuf>, SourceError> {
    load_dir(dir, opts)?;
    fn collect(dir: &Path, root: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<(), SourceError> {
        let mut problems = Vec::new();
        let entries = Disk.entries(root, dir, &mut problems).map_err(|e| SourceError::Dir { dir: dir.to_path_buf(), source: e })?;
        if let Some(e) = SourceError::collect(problems) {
            return Err(e);
        }
        for e in entries {
            if e.name.starts_with('.') || e.name.ends_with(".retired") {
                continue;
            }
            let lower = e.name.to_ascii_lowercase();
            if e.is_dir && depth < MAX_DEPTH {
                collect(&e.path, root, depth + 1, out)?;
            } else if e.is_file && [".sql", ".yaml", ".yml", ".json", ".toml"].iter().any(|x| lower.ends_with(x)) {
                out.push(e.path.strip_prefix(root).unwrap_or(&e.path).to_path_buf());
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    collect(dir, dir, 0, &mut out)?;
    out.sort();
    Ok(out)
}

/// What `kiln::embed_migrations!` does while the program compiles: the files
/// to embed from `dir` ([`embeddable_files`]), or the compile error to show —
/// every problem the loader finds, each as `WRITTEN/FILE:LINE: message`
/// (`written` is the directory as the macro was given it).
///
/// # Errors
/// The message of the compile error.
pub fn embed_check(dir: &Path, written: &str, opts: &LoadOptions) -> Result<Vec<PathBuf>, String> {
    if !dir.is_dir() {
        return Err(format!("embed_migrations!: {} is not a directory (the path is relative to the crate's Cargo.toml)", dir.display()));
    }
    embeddable_files(dir, opts).map_err(|e| {
        let written = written.trim_end_matches('/');
        let lines: Vec<String> = e
            .problems()
            .iter()
            .map(|p| {
                let text = p.to_string();
                match p.path() {
                    Some(file) if text.starts_with(&file.display().to_string()) => format!("{written}/{text}"),
                    _ => text,
                }
            })
            .collect();
        format!("kiln cannot load the migrations in {written}/ — fix them and build again:\n{}", lines.join("\n"))
    })
}

fn load_tree(tree: &dyn Tree, dir: &Path, opts: &LoadOptions) -> Result<(Vec<Migration>, Vec<SourceError>), SourceError> {
    let rules = Rules::new(opts)?;
    let mut walked = Found { tasks: Vec::new(), problems: Vec::new() };
    walk(tree, dir, dir, &rules, None, Scope::Public, 0, &mut walked);
    let Found { tasks, mut problems } = walked;
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(4);
    let results: Vec<Result<Migration, SourceError>> = if threads > 1 && tasks.len() >= 64 {
        let chunk = tasks.len().div_ceil(threads);
        std::thread::scope(|sc| {
            let handles: Vec<_> =
                tasks.chunks(chunk).map(|part| sc.spawn(move || part.iter().map(|t| t.load(tree, opts)).collect::<Vec<_>>())).collect();
            handles.into_iter().flat_map(|h| h.join().expect("loader thread panicked")).collect()
        })
    } else {
        tasks.iter().map(|t| t.load(tree, opts)).collect()
    };
    let mut found = Vec::with_capacity(results.len());
    for r in results {
        match r {
            Ok(m) => found.push(m),
            Err(e) => problems.push(e),
        }
    }
    // A set is applied in its tool's order: one holding diesel folders in
    // diesel's (version strings compared as text), every file of it included,
    // so the order is one total order.
    if found.iter().any(|m| m.version.order == VersionOrder::Text) {
        for m in &mut found {
            m.version.order = VersionOrder::Text;
        }
    }
    found.sort_by(|a, b| a.version.order_key().cmp(&b.version.order_key()).then(a.version.number.cmp(&b.version.number)));
    // One version number, one migration: kiln's history is keyed by it
    // (`001` and `1` are the same version even where text order tells them apart).
    let mut first_of: std::collections::HashMap<u64, PathBuf> = std::collections::HashMap::new();
    found.retain(|m| match first_of.get(&m.version.number) {
        Some(first) => {
            problems.push(SourceError::DuplicateVersion { version: m.version.clone(), first: first.clone(), second: m.path.clone() });
            false
        }
        None => {
            first_of.insert(m.version.number, m.path.clone());
            true
        }
    });
    if problems.iter().any(|p| matches!(p, SourceError::Dir { dir: d, .. } if d == dir)) {
        return Err(SourceError::collect(problems).expect("a problem"));
    }
    Ok((found, problems))
}

/// One migration to read, found by [`walk`]: names are checked while walking,
/// contents are read and parsed later, in parallel.
enum Task {
    Sql {
        stem: String,
        path: PathBuf,
        rel: PathBuf,
        group: Option<String>,
        scope: Scope,
    },
    Commands {
        stem: String,
        path: PathBuf,
        rel: PathBuf,
        json: bool,
        group: Option<String>,
        scope: Scope,
    },
    Pair {
        stem: String,
        up: PathBuf,
        down: Option<PathBuf>,
        rel_up: PathBuf,
        root: PathBuf,
        group: Option<String>,
        scope: Scope,
    },
    Diesel {
        path: PathBuf,
        rel: PathBuf,
        name: String,
        group: Option<String>,
        scope: Scope,
    },
    /// Prisma Migrate: `<timestamp>_<name>/migration.sql`, up only.
    Prisma {
        path: PathBuf,
        rel: PathBuf,
        name: String,
        group: Option<String>,
        scope: Scope,
    },
}

impl Task {
    fn load(&self, tree: &dyn Tree, opts: &LoadOptions) -> Result<Migration, SourceError> {
        match self {
            Task::Sql { stem, path, rel, group, scope } => {
                let text = read(tree, path, rel)?;
                sql_single(stem, rel, &text, opts, group.as_deref(), *scope)
            }
            Task::Commands { stem, path, rel, json, group, scope } => {
                let text = read(tree, path, rel)?;
                commands_file(stem, rel, &text, *json, group.as_deref(), *scope)
            }
            Task::Pair { stem, up, down, rel_up, root, group, scope } => {
                let up_text = read(tree, up, rel_up)?;
                let down_pair = match down {
                    Some(d) => {
                        let rel_d = d.strip_prefix(root).unwrap_or(d).to_path_buf();
                        let t = read(tree, d, &rel_d)?;
                        Some((rel_d, t))
                    }
                    None => None,
                };
                sql_pair(stem, rel_up, &up_text, down_pair, opts, group.as_deref(), *scope, None)
            }
            Task::Diesel { path, rel, name, group, scope } => load_diesel(tree, path, rel, name, opts, group.as_deref(), *scope),
            Task::Prisma { path, rel, name, group, scope } => {
                let rel_up = rel.join("migration.sql");
                let text = read(tree, &path.join("migration.sql"), &rel_up)?;
                let mut m = sql_pair(name, &rel_up, &text, None, opts, group.as_deref(), *scope, Some(rel))?;
                // Prisma applies its folders in the order of their names.
                m.version.order = VersionOrder::Text;
                Ok(m)
            }
        }
    }
}

/// Where [`walk`] puts what it finds: migrations to read, and every problem
/// with a name or a directory entry (the walk goes on after each).
struct Found {
    tasks: Vec<Task>,
    problems: Vec<SourceError>,
}

impl Found {
    fn check(&mut self, r: Result<(), SourceError>) -> bool {
        match r {
            Ok(()) => true,
            Err(e) => {
                self.problems.push(e);
                false
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn walk(tree: &dyn Tree, root: &Path, dir: &Path, rules: &Rules, group: Option<&str>, scope: Scope, depth: usize, out: &mut Found) {
    let rel_dir = || if dir == root { dir.to_path_buf() } else { dir.strip_prefix(root).unwrap_or(dir).to_path_buf() };
    let listed = match tree.entries(root, dir, &mut out.problems) {
        Ok(listed) => listed,
        Err(e) => return out.problems.push(SourceError::Dir { dir: rel_dir(), source: e }),
    };
    if depth > MAX_DEPTH {
        return out
            .problems
            .push(SourceError::Dir { dir: rel_dir(), source: std::io::Error::other(format!("nested more than {MAX_DEPTH} directories deep")) });
    }
    // (name, path, is a directory, is a regular file)
    let mut entries: Vec<(String, PathBuf, bool, bool)> = listed
        .into_iter()
        .filter(|e| !(e.name.starts_with('.') || e.name.ends_with(".retired")))
        .map(|e| (e.name, e.path, e.is_dir, e.is_file))
        .collect();
    entries.sort();
    // A directory of diesel migration folders: diesel ignores every entry that
    // is not a folder (crates.io keeps a data `.sql` file there), and so does
    // kiln for a file there whose name is not a migration's.
    let diesel_root = entries.iter().any(|(_, p, is_dir, _)| *is_dir && tree.is_file(&p.join("up.sql")));
    let group_owned = group.map(str::to_string);
    // Pair .up.sql / .down.sql files by stem.
    let mut pairs: BTreeMap<String, (Option<PathBuf>, Option<PathBuf>)> = BTreeMap::new();
    // Flyway / refinery `V1__init.sql` with Flyway's undo `U1__init.sql`, by version.
    let mut flyway: BTreeMap<u64, FlywayPair> = BTreeMap::new();
    for (name, path, is_dir, is_file) in entries {
        let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
        let migration_like = [".sql", ".yaml", ".yml", ".json"].iter().any(|x| name.to_ascii_lowercase().ends_with(x));
        if !is_dir && !is_file && migration_like {
            // A FIFO would block the run forever, /dev/zero would fill memory.
            out.problems.push(SourceError::Read {
                file: rel,
                source: std::io::Error::other("not a regular file (a FIFO, socket, device or broken link); kiln reads only regular files"),
            });
            continue;
        }
        if is_dir {
            if tree.is_file(&path.join("up.sql")) {
                if out.check(rules.check(&name, true, &rel)) {
                    out.tasks.push(Task::Diesel { path, rel, name, group: group_owned.clone(), scope });
                }
            } else if tree.is_file(&path.join("migration.sql")) && split_version(&name).is_some() {
                if out.check(rules.check(&name, true, &rel)) {
                    out.tasks.push(Task::Prisma { path, rel, name, group: group_owned.clone(), scope });
                }
            } else if depth == 0 && (name == "public" || name == "tenant") {
                let sc = if name == "tenant" { Scope::Tenant } else { Scope::Public };
                walk(tree, root, &path, rules, group, sc, depth + 1, out);
            } else {
                let g = group.map(str::to_string).unwrap_or_else(|| name.clone());
                walk(tree, root, &path, rules, Some(&g), scope, depth + 1, out);
            }
            continue;
        }
        if diesel_root && !is_dir {
            let stem = name.split('.').next().unwrap_or(&name);
            let stem = stem.trim_end_matches(".up").trim_end_matches(".down");
            if rules.check(stem, false, &rel).is_err() || split_version(stem).is_none() {
                tracing::debug!(file = %rel.display(), "not a migration: a file beside diesel migration folders that breaks the naming rule, which diesel ignores");
                continue;
            }
        }
        // Extensions are matched in any case (`0001_x.SQL` from a Windows
        // tool is a migration, not a file to skip in silence); the stem keeps its case.
        let lower = name.to_ascii_lowercase();
        let stem_of = |ext: &str| lower.ends_with(ext).then(|| name[..name.len() - ext.len()].to_string());
        if let Some(f) = stem_of(".sql").and_then(|stem| flyway_name(&stem)) {
            match f {
                Ok((kind, version, text, desc)) => {
                    let e = flyway.entry(version).or_default();
                    let slot = if kind == 'U' { &mut e.undo } else { &mut e.versioned };
                    if let Some(first) = slot.replace((path.clone(), format!("{text}_{desc}"))) {
                        let first = first.0.strip_prefix(root).unwrap_or(&first.0).to_path_buf();
                        out.problems.push(SourceError::DuplicateVersion { version: Version::new(version, text), first, second: rel });
                    }
                }
                Err(why) => out.problems.push(SourceError::Parse { file: rel, line: 1, message: why }),
            }
        } else if let Some(stem) = stem_of(".up.sql") {
            pairs.entry(stem).or_default().0 = Some(path);
        } else if let Some(stem) = stem_of(".down.sql") {
            pairs.entry(stem).or_default().1 = Some(path);
        } else if let Some(stem) = stem_of(".sql") {
            if out.check(rules.check(&stem, false, &rel)) {
                out.tasks.push(Task::Sql { stem, path, rel, group: group_owned.clone(), scope });
            }
        } else if let Some(stem) = stem_of(".yaml").or_else(|| stem_of(".yml")).or_else(|| stem_of(".json")) {
            let json = lower.ends_with(".json");
            if out.check(rules.check(&stem, false, &rel)) {
                out.tasks.push(Task::Commands { stem, path, rel, json, group: group_owned.clone(), scope });
            }
        }
        // Anything else (README.md, .gitkeep, diesel.toml, …) is not a migration.
    }
    for (_, f) in flyway {
        let Some((up, stem)) = f.versioned else {
            let (undo, _) = f.undo.expect("one of the two exists");
            let rel = undo.strip_prefix(root).unwrap_or(&undo).to_path_buf();
            out.problems.push(SourceError::Parse {
                file: rel,
                line: 1,
                message: "an undo migration with no versioned migration (V…__) of its version".into(),
            });
            continue;
        };
        let rel_up = up.strip_prefix(root).unwrap_or(&up).to_path_buf();
        out.tasks.push(Task::Pair { stem, up, down: f.undo.map(|u| u.0), rel_up, root: root.to_path_buf(), group: group_owned.clone(), scope });
    }
    for (stem, (up, down)) in pairs {
        let Some(up) = up else {
            let down = down.expect("one of the two exists");
            let rel = down.strip_prefix(root).unwrap_or(&down).to_path_buf();
            out.problems.push(SourceError::Parse { file: rel, line: 1, message: format!("has no matching {stem}.up.sql") });
            continue;
        };
        let rel_up = up.strip_prefix(root).unwrap_or(&up).to_path_buf();
        // Pairs keep golang-migrate's and sqlx's own rule (any description:
        // `000118_create-index`, `1_init.v2`), as diesel folders keep diesel's.
        if out.check(rules.check(&stem, true, &rel_up)) {
            out.tasks.push(Task::Pair { stem, up, down, rel_up, root: root.to_path_buf(), group: group_owned.clone(), scope });
        }
    }
}

#[cfg(test)]
mod tests;
