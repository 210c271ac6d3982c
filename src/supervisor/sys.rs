//! Thin wrappers over the Linux process primitives the supervisor needs: `/proc` parsing, process-group
//! signalling and liveness, and `pidfd_open`. Everything here is synchronous and cheap.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// The fields of `/proc/<pid>/stat` the supervisor uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Process id.
    pub pid: i32,
    /// State letter (`R`, `S`, `Z`, …).
    pub state: char,
    /// Parent process id.
    pub ppid: i32,
    /// Process group id.
    pub pgrp: i32,
    /// Session id.
    pub session: i32,
    /// Field 22: start time in clock ticks after boot. With the pid it identifies a process for life.
    pub start_ticks: u64,
}

/// Parses the text of `/proc/<pid>/stat`. The command name (field 2) may contain spaces and parentheses, so
/// the fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let pid = text.get(..open)?.trim().parse().ok()?;
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3 (state); field n is rest[n - 3].
    Some(ProcStat {
        pid,
        state: rest.first()?.chars().next()?,
        ppid: rest.get(1)?.parse().ok()?,
        pgrp: rest.get(2)?.parse().ok()?,
        session: rest.get(3)?.parse().ok()?,
        start_ticks: rest.get(19)?.parse().ok()?,
    })
}

/// Reads `/proc/<pid>/stat`; `None` when the process does not exist (or is unreadable).
pub fn stat(pid: i32) -> Option<ProcStat> {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|t| parse_stat(&t))
}

/// Reads `/proc/<pid>/cmdline` as a list of arguments (empty for zombies and kernel threads).
pub fn cmdline(pid: i32) -> io::Result<Vec<String>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline"))?;
    Ok(raw
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect())
}

/// Whether `/proc/<pid>/environ` holds `name=value` (false when unreadable).
pub fn environ_has(pid: i32, name: &str, value: &str) -> Option<bool> {
    let raw = fs::read(format!("/proc/{pid}/environ")).ok()?;
    let mut marker = Vec::with_capacity(name.len() + value.len() + 1);
    marker.extend_from_slice(name.as_bytes());
    marker.push(b'=');
    let mut has_name = false;
    for entry in raw.split(|b| *b == 0) {
        if entry.starts_with(&marker) {
            has_name = true;
            if &entry[marker.len()..] == value.as_bytes() {
                return Some(true);
            }
        }
    }
    // Some(false): marked for another process; None: not marked at all.
    has_name.then_some(false)
}

/// Whether process `pid` carries the supervisor's marker for process `id`: `id_var=id`, and `owner_var`
/// equal to `owner` when the process has it (processes started before the owner variable existed lack it).
pub fn carries_marker(pid: i32, id_var: &str, id: &str, owner_var: &str, owner: &str) -> bool {
    let Ok(raw) = fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let mut has_id = false;
    let mut owner_ok = true;
    for entry in raw.split(|b| *b == 0) {
        if let Some(v) = strip_var(entry, id_var) {
            has_id = v == id.as_bytes();
        } else if let Some(v) = strip_var(entry, owner_var) {
            owner_ok = v == owner.as_bytes();
        }
    }
    has_id && owner_ok
}

fn strip_var<'a>(entry: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let rest = entry.strip_prefix(name.as_bytes())?;
    rest.strip_prefix(b"=")
}

/// Live (non-zombie) processes other than this one that carry `owner_var=owner`, by the value of their
/// `id_var` (both variables required), in one walk that reads each environment once. A `/proc` scan: call it
/// off the async runtime (see `scan.rs`).
///
/// The environment is read first, into one reused buffer, and `stat` only for the few processes that carry
/// the marker: four system calls per process instead of about fourteen (`fs::read` sizes its buffer with a
/// `statx` that `/proc` answers with 0, then grows it read by read), and a burst of stops walks many times.
pub fn marked_processes_by_id(id_var: &str, owner_var: &str, owner: &str) -> HashMap<String, Vec<ProcStat>> {
    use std::fmt::Write;
    use std::io::Read;
    let me = std::process::id() as i32;
    let mut out: HashMap<String, Vec<ProcStat>> = HashMap::new();
    let mut raw = Vec::with_capacity(16 * 1024);
    let mut path = String::with_capacity(32);
    for pid in pids() {
        if pid == me {
            continue;
        }
        path.clear();
        let _ = write!(path, "/proc/{pid}/environ");
        raw.clear();
        // A zombie or a kernel thread reads empty; another user's process is unreadable: neither is ours.
        if fs::File::open(&path).and_then(|mut f| f.read_to_end(&mut raw)).is_err() {
            continue;
        }
        let (mut id, mut owner_ok) = (None, false);
        for entry in raw.split(|b| *b == 0) {
            if let Some(v) = strip_var(entry, id_var) {
                id = Some(String::from_utf8_lossy(v).into_owned());
            } else if let Some(v) = strip_var(entry, owner_var) {
                owner_ok = v == owner.as_bytes();
            }
        }
        if let (Some(id), true) = (id, owner_ok) {
            if let Some(p) = stat(pid).filter(|p| p.state != 'Z') {
                out.entry(id).or_default().push(p);
            }
        }
    }
    out
}

/// The pids listed in `/proc` (none if it cannot be read).
fn pids() -> impl Iterator<Item = i32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
}

/// Every process visible in `/proc`.
pub fn all_processes() -> Vec<ProcStat> {
    pids().filter_map(stat).collect()
}

/// Pids of the live (non-zombie) members of process group `pgid`, by a `/proc` scan.
pub fn group_members(pgid: i32) -> Vec<i32> {
    all_processes()
        .into_iter()
        .filter(|p| p.pgrp == pgid && p.state != 'Z')
        .map(|p| p.pid)
        .collect()
}

/// Process groups this daemon must never signal: its own group, its own pid and its session's group. A
/// recorded group id that turns out to be one of these (a stale `/proc` read, a reused id, a tampered state
/// file) would otherwise make the daemon signal itself and whatever shares its group.
pub fn protected_groups() -> [i32; 3] {
    let me = std::process::id() as i32;
    let pgrp = nix::unistd::getpgrp().as_raw();
    let sid = nix::unistd::getsid(None).map(|p| p.as_raw()).unwrap_or(pgrp);
    [pgrp, me, sid]
}

/// Whether `pgid` is one of [`protected_groups`].
pub fn is_protected_group(pgid: i32) -> bool {
    protected_groups().contains(&pgid)
}

/// Whether any process is in group `pgid` (`kill(-pgid, 0)`; EPERM still means "exists"). A protected group
/// never counts: it is never signalled, so nothing waits for it to empty.
pub fn group_alive(pgid: i32) -> bool {
    if pgid <= 1 || is_protected_group(pgid) {
        return false;
    }
    !matches!(killpg(Pid::from_raw(pgid), None), Err(Errno::ESRCH))
}

/// Signals a whole process group; an empty group is not an error. A protected group (ours) is refused with
/// `EPERM` and logged: nothing the supervisor records may ever make it signal itself.
pub fn signal_group(pgid: i32, signal: Signal) -> Result<(), Errno> {
    if pgid <= 1 {
        return Err(Errno::EINVAL);
    }
    if is_protected_group(pgid) {
        tracing::error!(
            pgid,
            ?signal,
            "refusing to signal the daemon's own process group or session"
        );
        return Err(Errno::EPERM);
    }
    match killpg(Pid::from_raw(pgid), signal) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Signals one process; a vanished process is not an error. The daemon itself is refused.
pub fn signal_pid(pid: i32, signal: Signal) -> Result<(), Errno> {
    if pid <= 1 || pid == std::process::id() as i32 {
        return Err(Errno::EINVAL);
    }
    match kill(Pid::from_raw(pid), signal) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether `pid` is alive, not a zombie, and still the process that started at `start_ticks`.
pub fn same_process(pid: i32, start_ticks: u64) -> bool {
    stat(pid).is_some_and(|s| s.start_ticks == start_ticks && s.state != 'Z')
}

/// A pidfd for `pid`, registered with the tokio reactor: it becomes readable when the process exits, which
/// lets the supervisor watch a process that is not its child (an adopted one) without polling. Must be called
/// inside a runtime.
#[allow(unsafe_code)]
pub fn pidfd_watch(pid: i32) -> io::Result<AsyncFd<OwnedFd>> {
    let fd = pidfd_open(pid)?;
    // SAFETY: `fd` is an `OwnedFd` moved into the `AsyncFd`: it stays open and names the same pidfd until the
    // `AsyncFd` (its only owner) is dropped, which is what `register_with_interest` requires.
    let watched = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) };
    watched.map_err(io::Error::from)
}

/// Opens a pidfd for `pid` (`pidfd_open(2)`, Linux ≥ 5.3).
#[allow(unsafe_code)]
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: `pidfd_open(2)` takes a pid and flags and returns a new file descriptor or -1; it touches no
    // memory of ours. A non-negative return value is a descriptor nobody else owns, so wrapping it in an
    // `OwnedFd` (which closes it once) is sound.
    unsafe {
        let fd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = i32::try_from(fd).map_err(|_| io::Error::other("pidfd out of range"))?;
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_command_name() {
        let text = "4242 (we ird) (x)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        let s = parse_stat(text).unwrap();
        assert_eq!(
            (s.pid, s.state, s.ppid, s.pgrp, s.session, s.start_ticks),
            (4242, 'S', 1, 4242, 4242, 987654)
        );
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn own_process_is_readable() {
        let me = std::process::id() as i32;
        let s = stat(me).unwrap();
        assert!(same_process(me, s.start_ticks));
        assert!(!same_process(me, s.start_ticks + 1));
        assert!(!cmdline(me).unwrap().is_empty());
    }
}
