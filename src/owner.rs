//! Who owns a piece of shared state (a staging directory, the results
//! directory's lock, a sweep's coordinator lease), and whether that owner
//! is provably gone.
//!
//! Why not the PID alone: PIDs are reused, and a results directory or a
//! Redis may be shared by several machines. An owner is the host, the PID
//! and the process's start time (from /proc), so a PID that now belongs to
//! another process does not pass for the old owner, and a process on
//! another host is never judged from this one.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The environment variable that names this process's host. A pod's
/// hostname is its name already; the worker Job passes it explicitly too
/// (downward API), which is how a dead pod's tasks are found.
pub const HOST_ENV: &str = "QSWEEP_WORKER_HOST";

/// A process on a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub host: String,
    pub pid: u32,
    /// When the process started, in clock ticks since boot (0 if unknown).
    pub started: u64,
}

impl Owner {
    /// This process.
    pub fn current() -> Self {
        let pid = std::process::id();
        Self { host: host(), pid, started: start_time(pid).unwrap_or(0) }
    }

    pub fn is_this_host(&self) -> bool {
        self.host == host()
    }

    /// Whether the owner lives on this host and its process has ended.
    /// Owners on other hosts are never judged gone from here.
    pub fn is_gone_from_this_host(&self) -> bool {
        self.is_this_host() && !is_running(self.pid, self.started)
    }

    /// A compact form that fits in a file name: `PID.START@HOST`.
    pub fn tag(&self) -> String {
        format!("{}.{}@{}", self.pid, self.started, self.host)
    }

    /// Reads a `tag` back.
    pub fn from_tag(tag: &str) -> Option<Self> {
        let (process, host) = tag.split_once('@')?;
        let (pid, started) = process.split_once('.')?;
        Some(Self { host: host.to_string(), pid: pid.parse().ok()?, started: started.parse().ok()? })
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {} on host {}", self.pid, self.host)
    }
}

/// This machine's name: the pod's name in a worker Job, else the hostname.
pub fn host() -> String {
    std::env::var(HOST_ENV)
        .ok()
        .filter(|host| !host.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string()))
        .unwrap_or_else(|| "localhost".to_string())
}

/// Whether `pid` is a live process that started at `started` (0: any).
fn is_running(pid: u32, started: u64) -> bool {
    match start_time(pid) {
        Some(now) => started == 0 || now == started,
        None => false,
    }
}

/// Field 22 of /proc/PID/stat: the start time in clock ticks since boot.
/// A zombie still has its entry, but it runs nothing: count it as ended.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_tags_round_trip() {
        let me = Owner::current();
        assert!(me.started > 0);
        assert!(!me.is_gone_from_this_host());
        assert_eq!(Owner::from_tag(&me.tag()), Some(me));
    }

    #[test]
    fn an_ended_process_is_gone_and_a_reused_pid_is_not_its_owner() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let ended = Owner { host: host(), pid, started: 1 };
        assert!(ended.is_gone_from_this_host());
        // Our own PID, but another start time: the owner was an earlier process.
        let reused = Owner { started: Owner::current().started + 1, ..Owner::current() };
        assert!(reused.is_gone_from_this_host());
    }

    #[test]
    fn owners_on_other_hosts_are_never_judged_gone() {
        let elsewhere = Owner { host: "another-host".into(), pid: u32::MAX, started: 1 };
        assert!(!elsewhere.is_gone_from_this_host());
    }
}
