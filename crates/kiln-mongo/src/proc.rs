//! Who this process is, and whether the process named in a lease still runs.
//!
//! A lease records its holder's host name, pid, and — on Linux — the boot id,
//! the pid namespace and the process start time. A runner on the **same
//! host, boot and pid namespace** can then prove the holder dead: its pid no
//! longer exists, or now belongs to a process started at another time (the
//! pid was reused). Anything less than that proof (another host, another
//! container sharing the host name, a field missing from an older kiln's
//! lease, a platform without `/proc`) is "maybe alive", and the lease is only
//! taken over once it expires.

use bson::{doc, Document};

/// This process, as recorded in the lease it takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Identity {
    pub host: String,
    pub pid: u32,
    /// `/proc/sys/kernel/random/boot_id` (Linux): pids are only comparable within one boot.
    pub boot_id: Option<String>,
    /// `readlink /proc/self/ns/pid` (Linux): pids are only comparable within one namespace.
    pub pid_ns: Option<String>,
    /// Field 22 of `/proc/<pid>/stat` (clock ticks since boot): tells a reused pid apart.
    pub started: Option<u64>,
}

impl Identity {
    /// The identity of the running process.
    pub fn current() -> Identity {
        let pid = std::process::id();
        Identity {
            host: gethostname::gethostname().to_string_lossy().into_owned(),
            pid,
            boot_id: read_trimmed("/proc/sys/kernel/random/boot_id"),
            pid_ns: std::fs::read_link("/proc/self/ns/pid").ok().map(|p| p.to_string_lossy().into_owned()),
            started: start_time(pid),
        }
    }

    /// The fields stored in the lease document.
    pub fn to_doc(&self) -> Document {
        let mut d = doc! { "host": &self.host, "pid": self.pid as i64 };
        if let Some(b) = &self.boot_id {
            d.insert("boot_id", b);
        }
        if let Some(n) = &self.pid_ns {
            d.insert("pid_ns", n);
        }
        if let Some(s) = self.started {
            d.insert("started", s as i64);
        }
        d
    }

    /// Why the holder recorded in lease document `lease` is provably dead, or
    /// `None` when it may be alive (see the module docs).
    pub fn dead_holder(&self, lease: &Document) -> Option<String> {
        let host = lease.get_str("host").ok()?;
        let pid = lease.get_i64("pid").ok().or_else(|| lease.get_i32("pid").ok().map(i64::from))?;
        let pid = u32::try_from(pid).ok()?;
        if host != self.host || pid == 0 {
            return None;
        }
        // Same host name is not enough: containers may share it, and a reboot reuses pids.
        let same = |key: &str, ours: &Option<String>| matches!((lease.get_str(key).ok(), ours), (Some(a), Some(b)) if a == b);
        if !same("boot_id", &self.boot_id) || !same("pid_ns", &self.pid_ns) {
            return None;
        }
        if pid == self.pid {
            // Ourselves (another engine of this process): alive by definition.
            return None;
        }
        let recorded_start = lease.get_i64("started").ok().map(|s| s as u64);
        match (stat(pid), recorded_start) {
            (None, _) if !std::path::Path::new(&format!("/proc/{pid}")).exists() => {
                Some(format!("its process (pid {pid} on {host}) no longer exists"))
            }
            (Some(('Z', _)), _) => Some(format!("its process (pid {pid} on {host}) has exited (a zombie waiting for its parent)")),
            (Some((_, now)), Some(then)) if now != then => {
                Some(format!("its process (pid {pid} on {host}) no longer exists: pid {pid} now belongs to a process started later"))
            }
            _ => None,
        }
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    let s = std::fs::read_to_string(path).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

/// Start time of process `pid` in clock ticks since boot (field 22 of
/// `/proc/<pid>/stat`); `None` when it does not exist or there is no `/proc`.
fn start_time(pid: u32) -> Option<u64> {
    stat(pid).map(|(_, started)| started)
}

/// State (field 3) and start time (field 22) of `/proc/<pid>/stat`.
fn stat(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces or parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // `rest` starts at field 3 (state): field 22 is the 20th from here.
    let state = fields.next()?.chars().next()?;
    Some((state, fields.nth(18)?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_finished_child_is_dead() {
        let me = Identity::current();
        if me.boot_id.is_none() {
            return; // no /proc: nothing is ever provably dead, which the next asserts would not show
        }
        assert!(me.started.is_some());
        assert_eq!(me.dead_holder(&me.to_doc()), None, "this process");

        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        let child_id = Identity { pid: child.id(), started: start_time(child.id()), ..me.clone() };
        assert_eq!(me.dead_holder(&child_id.to_doc()), None, "a running process is alive");
        child.kill().unwrap();
        child.wait().unwrap();
        let why = me.dead_holder(&child_id.to_doc()).expect("a reaped child is dead");
        assert!(why.contains(&format!("pid {}", child_id.pid)), "{why}");

        // Another host, boot or namespace, or a lease without the fields: maybe alive.
        let mut other = child_id.to_doc();
        other.insert("host", "elsewhere");
        assert_eq!(me.dead_holder(&other), None);
        let mut other = child_id.to_doc();
        other.insert("boot_id", "another-boot");
        assert_eq!(me.dead_holder(&other), None);
        let mut old = child_id.to_doc();
        old.remove("pid_ns");
        assert_eq!(me.dead_holder(&old), None);

        // A reused pid: a live process there, but started at another time than recorded.
        let mut live = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        let reused = Identity { pid: live.id(), started: start_time(live.id()).map(|s| s + 1), ..me.clone() };
        let why = me.dead_holder(&reused.to_doc());
        live.kill().unwrap();
        live.wait().unwrap();
        assert!(why.expect("a reused pid is dead").contains("started later"));
    }
}
