//! The journal mode: WAL, so that nobody waits on a running migration.
//!
//! In SQLite's default rollback-journal mode a writer that commits — or that
//! spills its cache in the middle of a large migration — locks every reader
//! out; a `kiln status` or a second `kiln up` (which reads the history before
//! it asks for the lock) then waits on the busy time-out and fails with
//! "database is locked" long before kiln's own lock wait could name the
//! holder. In WAL mode readers never wait on the writer and the writer never
//! waits on readers, so `status` answers during a ten-minute migration and a
//! second runner waits for kiln's lock, as on the other engines.
//!
//! kiln switches a database to WAL the first time it takes the migration
//! lock on it ([`SqliteEngine::settle_journal`]): under the lock, so no other
//! runner is writing, and only for commands that write (a read-only command
//! never changes the file). The mode is stored in the file and stays; SQLite
//! 3.7 (2010) and later open such a database as before. It is *not* switched
//!
//! - on a network filesystem (NFS, SMB/CIFS, …: WAL needs shared memory that
//!   only processes on one host can share), detected from `/proc/self/mountinfo`;
//! - when the URL says `?journal_mode=keep`;
//! - for `sqlite::memory:`.
//!
//! In WAL mode kiln's commits honour [`Record::durable`] (see
//! [`SqliteEngine::settle_journal`]).
//!
//! [`Record::durable`]: kiln_core::engine::Record::durable
//!
//! What WAL means for users is in docs/engines.md: `-wal` and `-shm` files
//! beside the database while it is open (copy all three, or use
//! `sqlite3 app.db ".backup copy.db"`), and one host only.

use std::path::Path;

use kiln_core::EngineError;

use super::{Location, SqliteEngine};

/// What kiln does with the journal mode (`?journal_mode=` in the URL).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Journal {
    /// Switch to WAL when kiln first takes the lock (the default).
    Wal,
    /// Leave the journal mode as it is (`?journal_mode=keep`).
    Keep,
}

impl Journal {
    /// The `journal_mode` parameter of a URL's query string (others are ignored).
    pub(super) fn from_query(query: &str, shown: &str) -> Result<Journal, EngineError> {
        let mut journal = Journal::Wal;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if key == "journal_mode" {
                journal = match value.to_ascii_lowercase().as_str() {
                    "wal" => Journal::Wal,
                    "keep" => Journal::Keep,
                    _ => {
                        return Err(EngineError::BadUrl {
                            url: shown.into(),
                            message: "journal_mode must be `wal` (the default: kiln switches the database to WAL) or `keep` (kiln leaves the journal mode as it is)"
                                .into(),
                        })
                    }
                };
            }
        }
        Ok(journal)
    }
}

/// Filesystems where WAL's shared memory does not work across hosts.
const NETWORK_FILESYSTEMS: &[&str] = &[
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "ncpfs",
    "9p",
    "afs",
    "ceph",
    "coda",
    "lustre",
    "gfs2",
    "ocfs2",
    "glusterfs",
    "fuse.sshfs",
    "fuse.glusterfs",
    "fuse.s3fs",
    "fuse.rclone",
    "fuse.ceph",
];

impl SqliteEngine {
    /// Put the database in WAL mode, once per connection, unless the URL or the
    /// filesystem says otherwise (see the module docs). Called with the
    /// migration lock held. A database that cannot switch (another process
    /// keeps a transaction open past the busy time-out, a read-only file)
    /// stays as it is, with a warning: the migration itself is unaffected.
    ///
    /// In WAL mode the connection then commits with `synchronous = NORMAL`:
    /// a step's commit is atomic and survives a killed process, but reaches
    /// the disk with the next durable commit ([`Record::durable`], the end of
    /// every run), which is made with `synchronous = FULL`
    /// ([`SqliteEngine::begin`]). This is the contract PostgreSQL keeps with
    /// `synchronous_commit = off`, and it makes a step's commit cost what its
    /// statements cost, so the duration recorded in the history (measured
    /// before `COMMIT`) is the duration `kiln up` prints. In rollback-journal
    /// mode `NORMAL` could corrupt the file on power loss, so it stays `FULL`.
    ///
    /// [`Record::durable`]: kiln_core::engine::Record::durable
    pub(super) fn settle_journal(&mut self) {
        if std::mem::replace(&mut self.journal_settled, true) {
            return;
        }
        let Location::File(path) = &self.location else { return };
        let switch = match (self.journal, network_filesystem(path)) {
            (Journal::Keep, _) => false,
            (Journal::Wal, Some(fs)) => {
                tracing::debug!(target = %self.target, "on a {fs} filesystem: the journal mode is left as it is (WAL needs one host)");
                false
            }
            (Journal::Wal, None) => true,
        };
        let sql = if switch { "PRAGMA journal_mode = WAL" } else { "PRAGMA journal_mode" };
        let mode = match self.conn.query_row(sql, [], |r| r.get::<_, String>(0)) {
            Ok(mode) => mode.to_ascii_lowercase(),
            Err(e) => {
                tracing::warn!(target = %self.target, "could not switch the database to WAL ({e}): readers may wait on a running migration");
                return;
            }
        };
        if switch && mode != "wal" {
            tracing::warn!(target = %self.target, "the database stays in journal mode {mode}: readers may wait on a running migration");
        }
        self.wal = mode == "wal" && self.conn.execute_batch("PRAGMA synchronous = NORMAL").is_ok();
    }

    /// `BEGIN IMMEDIATE` for a commit that must be on disk when it returns
    /// (`durable`) or not; pair it with [`SqliteEngine::end`].
    pub(super) fn begin(&mut self, durable: bool) -> rusqlite::Result<()> {
        if self.wal && durable {
            self.conn.execute_batch("PRAGMA synchronous = FULL")?;
            self.synced_commit = true;
        }
        self.conn.execute_batch("BEGIN IMMEDIATE")
    }

    /// After the `COMMIT` or `ROLLBACK` of a transaction from [`SqliteEngine::begin`]:
    /// back to `synchronous = NORMAL` after a durable commit.
    pub(super) fn end(&mut self) {
        if std::mem::take(&mut self.synced_commit) {
            if let Err(e) = self.conn.execute_batch("PRAGMA synchronous = NORMAL") {
                tracing::debug!(target = %self.target, "PRAGMA synchronous = NORMAL failed ({e}); commits stay synchronous");
            }
        }
    }
}

/// The filesystem type of `db_file`'s directory when it is a network
/// filesystem (Linux; `None` elsewhere or when it cannot tell).
fn network_filesystem(db_file: &Path) -> Option<String> {
    let dir = db_file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let dir = std::fs::canonicalize(dir).ok()?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mount_type(&mountinfo, &dir).filter(|t| NETWORK_FILESYSTEMS.contains(&t.as_str()))
}

/// The type of the filesystem mounted at the longest mount point containing
/// `dir`, from the text of `/proc/self/mountinfo` (`id parent major:minor
/// root mount-point options … - type source options`). A later line for the
/// same mount point shadows an earlier one, as the later mount does.
fn mount_type(mountinfo: &str, dir: &Path) -> Option<String> {
    let mut best: Option<(usize, &str)> = None;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let (Some(point), Some(fstype)) = (left.split(' ').nth(4), right.split(' ').next()) else { continue };
        let point = unescape(point);
        if dir.starts_with(&point) && best.is_none_or(|(len, _)| point.len() >= len) {
            best = Some((point.len(), fstype));
        }
    }
    best.map(|(_, t)| t.to_string())
}

/// mountinfo writes space, tab, newline and backslash in paths as `\ooo`.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(c as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:25 / /mnt/shared rw,relatime shared:2 - nfs4 server:/export rw,vers=4.2
31 30 0:26 / /mnt/shared/local\\040disk rw shared:3 - ext4 /dev/vdb rw
32 22 0:27 / /tmp rw shared:4 - tmpfs tmpfs rw
33 32 0:28 / /tmp rw shared:5 - cifs //nas/tmp rw
";

    #[test]
    fn the_longest_mount_point_wins_and_a_later_mount_shadows_an_earlier_one() {
        let t = |p: &str| mount_type(MOUNTINFO, Path::new(p));
        assert_eq!(t("/var/lib/app").as_deref(), Some("ext4"));
        assert_eq!(t("/mnt/shared/app").as_deref(), Some("nfs4"));
        assert_eq!(t("/mnt/shared").as_deref(), Some("nfs4"));
        assert_eq!(t("/mnt/shared/local disk/x").as_deref(), Some("ext4"), "\\040 is a space");
        assert_eq!(t("/mnt/sharedness").as_deref(), Some("ext4"), "whole components only");
        assert_eq!(t("/tmp/x").as_deref(), Some("cifs"));
        assert_eq!(mount_type("garbage\n", Path::new("/x")), None);
    }

    #[test]
    fn journal_mode_parameter() {
        let j = |q: &str| Journal::from_query(q, "sqlite://x.db");
        assert_eq!(j("").unwrap(), Journal::Wal);
        assert_eq!(j("mode=rwc").unwrap(), Journal::Wal);
        assert_eq!(j("journal_mode=keep").unwrap(), Journal::Keep);
        assert_eq!(j("a=1&journal_mode=WAL").unwrap(), Journal::Wal);
        let e = j("journal_mode=delete").unwrap_err().to_string();
        assert!(e.contains("journal_mode") && e.contains("keep"), "{e}");
    }
}
