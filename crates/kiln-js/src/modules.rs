//! Module resolution as Node.js does it, for what a migration can reach:
//! kiln's built-in modules (`mongodb`, `bson`, `dotenv`, and a few Node.js
//! built-ins), files relative to the importing file (extensions and
//! `index` files tried in Node's order, plus `.ts`), and packages in a
//! `node_modules` folder above it.

use std::path::{Path, PathBuf};

/// Modules the prelude provides (src/prelude.js, `BUILTIN`).
pub const BUILTINS: &[&str] = &["mongodb", "bson", "util", "assert", "path", "dotenv", "dotenv/config"];

/// Node.js built-ins kiln does not provide: named so the error says so.
const NODE_BUILTINS: &[&str] = &[
    "fs",
    "fs/promises",
    "crypto",
    "child_process",
    "http",
    "https",
    "net",
    "os",
    "stream",
    "events",
    "zlib",
    "url",
    "readline",
    "worker_threads",
    "cluster",
    "dns",
    "tls",
    "vm",
    "buffer",
    "querystring",
    "timers",
    "perf_hooks",
    "string_decoder",
    "process",
];

/// Where a specifier leads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolved {
    /// A built-in module (its name).
    Builtin(String),
    /// A file.
    File(PathBuf),
}

/// The name of a built-in (`node:path` → `path`), when `spec` is one.
pub fn builtin(spec: &str) -> Option<&'static str> {
    let bare = spec.strip_prefix("node:").unwrap_or(spec);
    BUILTINS.iter().copied().find(|b| *b == bare)
}

/// Resolve `spec` as imported by the file `from`.
///
/// # Errors
/// What was looked for, and what to do.
pub fn resolve(from: &Path, spec: &str) -> Result<Resolved, String> {
    if let Some(b) = builtin(spec) {
        return Ok(Resolved::Builtin(b.to_string()));
    }
    let base = from.parent().unwrap_or(Path::new("/"));
    if spec.starts_with("./") || spec.starts_with("../") || spec.starts_with('/') || spec == "." || spec == ".." {
        let target = base.join(spec);
        return file_or_dir(&target).map(Resolved::File).ok_or_else(|| {
            format!("Cannot find module '{spec}': no file {} (tried the extensions .ts, .js, .mjs, .cjs, .json and an index file)", target.display())
        });
    }
    let bare = spec.strip_prefix("node:").unwrap_or(spec);
    let package = package_name(bare);
    for dir in base.ancestors() {
        let root = dir.join("node_modules").join(package);
        if root.is_dir() {
            let sub = &bare[package.len()..];
            let found = if sub.is_empty() { package_entry(&root) } else { file_or_dir(&root.join(sub.trim_start_matches('/'))) };
            if let Some(f) = found {
                return Ok(Resolved::File(f));
            }
        }
    }
    if NODE_BUILTINS.contains(&bare) || spec.starts_with("node:") {
        return Err(format!(
            "Cannot find module '{spec}': the Node.js module '{bare}' is not available in kiln's JavaScript engine (provided: {}); do this step with database commands instead",
            BUILTINS.join(", ")
        ));
    }
    Err(format!(
        "Cannot find module '{spec}': the npm package '{package}' is not installed in a node_modules folder above this file, and kiln provides only {}; run `npm install` in the project (a pure-JavaScript package then loads), or remove the dependency",
        BUILTINS.join(", ")
    ))
}

fn package_name(spec: &str) -> &str {
    let mut parts = spec.splitn(3, '/');
    let first = parts.next().unwrap_or(spec);
    if first.starts_with('@') {
        match parts.next() {
            Some(second) => &spec[..first.len() + 1 + second.len()],
            None => first,
        }
    } else {
        first
    }
}

const EXTENSIONS: &[&str] = &["", ".ts", ".js", ".mjs", ".cjs", ".json"];

fn file_or_dir(target: &Path) -> Option<PathBuf> {
    for ext in EXTENSIONS {
        let mut p = target.as_os_str().to_owned();
        p.push(ext);
        let p = PathBuf::from(p);
        if p.is_file() {
            return Some(std::fs::canonicalize(&p).unwrap_or(p));
        }
    }
    if target.is_dir() {
        return package_entry(target);
    }
    None
}

/// The entry file of a package folder: `package.json`'s `exports` (`.`,
/// preferring `require`, then `default`) or `main`, else `index`.
fn package_entry(root: &Path) -> Option<PathBuf> {
    if let Ok(text) = std::fs::read_to_string(root.join("package.json")) {
        if let Ok(pkg) = serde_json::from_str::<serde_json::Value>(&text) {
            let exports = pkg.get("exports").map(|e| e.get(".").unwrap_or(e));
            let from_exports = exports.and_then(|e| match e {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => ["require", "node", "default", "import"].iter().find_map(|k| match o.get(*k) {
                    Some(serde_json::Value::String(s)) => Some(s.clone()),
                    Some(serde_json::Value::Object(inner)) => inner.get("default").and_then(|d| d.as_str()).map(str::to_string),
                    _ => None,
                }),
                _ => None,
            });
            for entry in from_exports.into_iter().chain(pkg.get("main").and_then(|m| m.as_str()).map(str::to_string)) {
                if let Some(f) = file_or_dir_no_pkg(&root.join(entry)) {
                    return Some(f);
                }
            }
        }
    }
    file_or_dir_no_pkg(&root.join("index"))
}

fn file_or_dir_no_pkg(target: &Path) -> Option<PathBuf> {
    for ext in EXTENSIONS {
        let mut p = target.as_os_str().to_owned();
        p.push(ext);
        let p = PathBuf::from(p);
        if p.is_file() {
            return Some(std::fs::canonicalize(&p).unwrap_or(p));
        }
    }
    let index = target.join("index");
    for ext in &EXTENSIONS[1..] {
        let mut p = index.as_os_str().to_owned();
        p.push(ext);
        let p = PathBuf::from(p);
        if p.is_file() {
            return Some(std::fs::canonicalize(&p).unwrap_or(p));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_files_packages_and_builtins() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir_all(root.join("migrations")).unwrap();
        std::fs::create_dir_all(root.join("lib/util")).unwrap();
        std::fs::write(root.join("lib/helper.ts"), "").unwrap();
        std::fs::write(root.join("lib/util/index.js"), "").unwrap();
        std::fs::create_dir_all(root.join("node_modules/left-pad")).unwrap();
        std::fs::write(root.join("node_modules/left-pad/package.json"), r#"{"main": "lib.js"}"#).unwrap();
        std::fs::write(root.join("node_modules/left-pad/lib.js"), "").unwrap();
        let from = root.join("migrations/20240101-a.js");
        assert_eq!(resolve(&from, "../lib/helper").unwrap(), Resolved::File(root.join("lib/helper.ts")));
        assert_eq!(resolve(&from, "../lib/util").unwrap(), Resolved::File(root.join("lib/util/index.js")));
        assert_eq!(resolve(&from, "left-pad").unwrap(), Resolved::File(root.join("node_modules/left-pad/lib.js")));
        assert_eq!(resolve(&from, "node:path").unwrap(), Resolved::Builtin("path".into()));
        let e = resolve(&from, "lodash").unwrap_err();
        assert!(e.contains("'lodash'") && e.contains("npm install"), "{e}");
        assert!(resolve(&from, "fs").unwrap_err().contains("Node.js module 'fs'"));
        assert!(resolve(&from, "./nope").unwrap_err().contains("no file"));
        assert_eq!(package_name("@scope/pkg/sub"), "@scope/pkg");
    }
}
