//! Where migration files come from: a directory on disk, or files embedded in
//! the program at compile time (`kiln::embed_migrations!`).
//!
//! The loader walks a [`Tree`], so both sources go through the very same
//! layout rules and parsers: an embedded set loads into the same
//! [`Migration`](crate::model::Migration)s, with the same checksums, as the
//! directory it was embedded from.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::error::SourceError;

/// One entry of a directory, as the walker sees it.
pub(super) struct Entry {
    pub name: String,
    pub path: PathBuf,
    pub is_dir: bool,
    pub is_file: bool,
}

/// A read-only file tree the loader walks.
pub(super) trait Tree: Sync {
    /// The entries of `dir` (hidden and `.retired` ones included; the walker
    /// skips them). Entries that cannot be used (a symlink loop) are reported
    /// in `problems` and left out.
    fn entries(&self, root: &Path, dir: &Path, problems: &mut Vec<SourceError>) -> std::io::Result<Vec<Entry>>;
    /// True when `path` is a regular file.
    fn is_file(&self, path: &Path) -> bool;
    /// The bytes of the file at `path`, at most `max` of them.
    fn read(&self, path: &Path, max: usize) -> std::io::Result<Vec<u8>>;
}

/// The file system.
pub(super) struct Disk;

impl Tree for Disk {
    fn entries(&self, root: &Path, dir: &Path, problems: &mut Vec<SourceError>) -> std::io::Result<Vec<Entry>> {
        let mut entries = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
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
                        problems.push(SourceError::Dir {
                            dir: rel,
                            source: std::io::Error::other(format!(
                                "symlink loop: it points at {}, which contains it; remove the link",
                                target.display()
                            )),
                        });
                        continue;
                    }
                }
            }
            entries.push(Entry { name, path, is_dir, is_file });
        }
        Ok(entries)
    }

    fn is_file(&self, path: &Path) -> bool {
        path.is_file()
    }

    fn read(&self, path: &Path, max: usize) -> std::io::Result<Vec<u8>> {
        super::read::read_bounded(path, max)
    }
}

/// One file of an embedded migrations directory: its path relative to that
/// directory (`/`-separated) and its bytes. `kiln::embed_migrations!` writes
/// these; nothing else needs to.
#[derive(Clone, Copy, Debug)]
pub struct EmbeddedFile {
    /// Path relative to the migrations directory, e.g. `users/0001_create.sql`.
    pub path: &'static str,
    /// The file's content as it was when the program was compiled.
    pub bytes: &'static [u8],
}

/// A migrations directory embedded in the program (`kiln::embed_migrations!`):
/// loaded with the same rules, into the same migrations and checksums, as the
/// directory on disk.
#[derive(Clone, Copy, Debug)]
pub struct Embedded {
    /// The directory as named to the macro (for messages).
    pub dir: &'static str,
    /// Every file the loader reads from it.
    pub files: &'static [EmbeddedFile],
}

impl Embedded {
    /// An embedded set; `kiln::embed_migrations!` calls this.
    pub const fn new(dir: &'static str, files: &'static [EmbeddedFile]) -> Self {
        Embedded { dir, files }
    }

    /// The content of the file at `path` (relative to the directory), if embedded.
    pub fn file(&self, path: &Path) -> Option<&'static [u8]> {
        self.files.iter().find(|f| Path::new(f.path) == path).map(|f| f.bytes)
    }
}

/// An [`Embedded`] set indexed as a tree rooted at the empty path.
pub(super) struct Memory {
    files: BTreeMap<PathBuf, &'static [u8]>,
    dirs: BTreeMap<PathBuf, BTreeSet<(String, bool)>>,
}

impl Memory {
    pub fn new(set: &Embedded) -> Self {
        let mut files = BTreeMap::new();
        let mut dirs: BTreeMap<PathBuf, BTreeSet<(String, bool)>> = BTreeMap::new();
        dirs.insert(PathBuf::new(), BTreeSet::new());
        for f in set.files {
            let path = PathBuf::from(f.path);
            // Every ancestor is a directory holding the next component.
            let mut child = path.as_path();
            let mut is_dir = false;
            while let Some(parent) = child.parent() {
                let name = child.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                dirs.entry(parent.to_path_buf()).or_default().insert((name, is_dir));
                child = parent;
                is_dir = true;
            }
            files.insert(path, f.bytes);
        }
        Memory { files, dirs }
    }
}

impl Tree for Memory {
    fn entries(&self, _root: &Path, dir: &Path, _problems: &mut Vec<SourceError>) -> std::io::Result<Vec<Entry>> {
        let names = self.dirs.get(dir).ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "not an embedded directory"))?;
        Ok(names.iter().map(|(name, is_dir)| Entry { name: name.clone(), path: dir.join(name), is_dir: *is_dir, is_file: !*is_dir }).collect())
    }

    fn is_file(&self, path: &Path) -> bool {
        self.files.contains_key(path)
    }

    fn read(&self, path: &Path, max: usize) -> std::io::Result<Vec<u8>> {
        let bytes = self.files.get(path).ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "not embedded"))?;
        if bytes.len() > max {
            return Err(std::io::Error::other(format!("larger than {max} bytes; kiln reads files up to that size")));
        }
        Ok(bytes.to_vec())
    }
}
