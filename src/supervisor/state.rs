//! The state file that lets a restarted supervisor find its processes again.
//!
//! `<state_dir>/supervisor.json` holds, per process, the definition in effect, the desired state, and the
//! identity of the running process: pid, process group(s), start time (field 22 of `/proc/<pid>/stat`, in clock
//! ticks since boot) and command line. It is rewritten after every transition by one writer task (a burst of
//! transitions is one write every 10 ms), atomically: write a temporary file, fsync it, rename it over the old
//! one, fsync the directory.
//!
//! A new supervisor re-adopts a process only if pid, start time and command line all still match; a pid that
//! was reused by another process fails the start-time check and is never signalled.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};

use super::definition::ProcessDefinition;
use super::record::{Desired, ProcessState};
use super::sys;

/// Format version of `supervisor.json`.
pub(crate) const STATE_VERSION: u32 = 1;

/// Name of the state file inside the state directory.
pub const STATE_FILE: &str = "supervisor.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StateFile {
    pub version: u32,
    /// Pid of the supervisor that wrote the file (informational).
    pub supervisor_pid: i32,
    /// UNIX time of the write.
    pub saved_at: f64,
    pub processes: Vec<SavedProcess>,
}

/// Identity of a running process, enough to recognise it after a supervisor restart.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Identity {
    pub pid: i32,
    /// The main process group (the pid for processes we spawned).
    pub pgid: i32,
    /// Every group that belongs to the process (forking launchers can leave more than one).
    pub groups: Vec<i32>,
    /// `(pgid, start ticks of its leader)` for the groups whose leader was seen: a group whose leader pid
    /// is alive with another start time is a reused id and is never signalled.
    #[serde(default)]
    pub group_leaders: Vec<(i32, u64)>,
    pub start_ticks: u64,
    /// `/proc/<pid>/cmdline` as last seen.
    pub cmdline: Vec<String>,
    /// The argv we executed (a program may exec itself into another command line; either matches).
    pub argv: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SavedProcess {
    /// Created by a client (a legacy launcher); an entry written before the flag existed counts as one, so a
    /// state file filled by clients is not carried forward (the table and the Setup define theirs again).
    #[serde(default = "yes")]
    pub transient: bool,
    pub definition: ProcessDefinition,
    pub desired: Desired,
    pub state: ProcessState,
    pub process: Option<Identity>,
    /// UNIX time the process was started.
    pub start_time: Option<f64>,
    pub restarts: u32,
    pub last_error: Option<String>,
}

fn yes() -> bool {
    true
}

/// Result of checking a saved identity against `/proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Recognized {
    /// Same pid, start time and command line: safe to adopt.
    Alive,
    /// No such process (or a zombie).
    Gone,
    /// The pid is alive but is another process; never touch it.
    Reused(String),
}

/// Compares a saved identity with the live process table; `marker` checks that the live process carries the
/// supervisor's marker for this process id (a process without it is never adopted).
pub(crate) fn recognize(id: &Identity, marker: impl Fn(i32) -> bool) -> Recognized {
    let Some(stat) = sys::stat(id.pid) else {
        return Recognized::Gone;
    };
    if stat.state == 'Z' {
        return Recognized::Gone;
    }
    if stat.start_ticks != id.start_ticks {
        return Recognized::Reused(format!(
            "pid {} now belongs to another process (start time {} ≠ saved {}); not adopted",
            id.pid, stat.start_ticks, id.start_ticks
        ));
    }
    let cmdline = sys::cmdline(id.pid).unwrap_or_default();
    if cmdline != id.cmdline && cmdline != id.argv {
        return Recognized::Reused(format!(
            "pid {} has command line {:?}, saved {:?}; not adopted",
            id.pid, cmdline, id.cmdline
        ));
    }
    if !marker(id.pid) {
        return Recognized::Reused(format!(
            "pid {} does not carry this supervisor's marker for the process; not adopted",
            id.pid
        ));
    }
    Recognized::Alive
}

impl Identity {
    /// Whether group `g` may still be signalled for this process: never a protected group (ours), and not
    /// when its recorded leader pid now names another process (start time differs: a reused id).
    pub(crate) fn group_trusted(&self, g: i32) -> bool {
        if g <= 1 || sys::is_protected_group(g) {
            return false;
        }
        match self.group_leaders.iter().find(|(pg, _)| *pg == g) {
            Some((_, ticks)) => match sys::stat(g) {
                Some(st) => st.start_ticks == *ticks,
                // The leader is gone; the id cannot be reused while the group still has members.
                None => true,
            },
            None => true,
        }
    }

    /// Records a group and its leader's start time (when the leader is alive).
    pub(crate) fn add_group(&mut self, g: i32) {
        if g <= 1 || sys::is_protected_group(g) || self.groups.contains(&g) {
            return;
        }
        self.groups.push(g);
        if let Some(st) = sys::stat(g) {
            self.group_leaders.push((g, st.start_ticks));
        }
    }

    /// For a process re-adopted from the state file: keeps only the groups that match the adopted process —
    /// its current group, and other recorded groups whose every live member carries `marker` — and never a
    /// protected group. A tampered or stale state file cannot make the supervisor signal anything else.
    pub(crate) fn verify_groups(&mut self, marker: impl Fn(i32) -> bool) {
        let Some(live) = sys::stat(self.pid) else {
            self.groups.clear();
            self.group_leaders.clear();
            return;
        };
        let recorded = std::mem::take(&mut self.groups);
        let leaders = std::mem::take(&mut self.group_leaders);
        self.pgid = live.pgrp;
        let all = sys::all_processes();
        for g in std::iter::once(live.pgrp).chain(recorded) {
            if g <= 1 || sys::is_protected_group(g) || self.groups.contains(&g) {
                continue;
            }
            if g != live.pgrp {
                let members: Vec<i32> = all
                    .iter()
                    .filter(|p| p.pgrp == g && p.state != 'Z')
                    .map(|p| p.pid)
                    .collect();
                if members.is_empty() || !members.iter().all(|m| marker(*m)) {
                    tracing::warn!(
                        pid = self.pid,
                        pgid = g,
                        "recorded process group does not match the adopted process; dropped"
                    );
                    continue;
                }
            }
            let leader = leaders.iter().find(|(pg, _)| *pg == g).copied();
            match (leader, sys::stat(g)) {
                (Some((_, ticks)), Some(st)) if st.start_ticks != ticks => {
                    tracing::warn!(
                        pgid = g,
                        "recorded group leader was replaced by another process; group dropped"
                    );
                    continue;
                }
                _ => {}
            }
            self.groups.push(g);
            match leader {
                Some(l) => self.group_leaders.push(l),
                None => {
                    if let Some(st) = sys::stat(g) {
                        self.group_leaders.push((g, st.start_ticks));
                    }
                }
            }
        }
        if sys::is_protected_group(self.pgid) {
            self.pgid = 0;
        }
    }
}

/// Reads the state file. `Ok(None)` when there is none.
///
/// A file that cannot be parsed is renamed to `supervisor.json.corrupt` and reported as an error string, so
/// the caller can log it and start empty rather than refuse to start.
pub(crate) fn load(path: &Path) -> Result<Option<StateFile>, String> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    match serde_json::from_slice::<StateFile>(&bytes) {
        Ok(s) if s.version == STATE_VERSION => Ok(Some(s)),
        Ok(s) => Err(format!("{}: unsupported version {}", path.display(), s.version)),
        Err(e) => {
            let aside = path.with_extension("json.corrupt");
            let _ = fs::rename(path, &aside);
            Err(format!("{}: {e} (moved to {})", path.display(), aside.display()))
        }
    }
}

/// Writes `bytes` to `path` atomically and durably: tmp + fsync + rename + fsync(dir).
///
/// The temporary file gets a fresh random name and is created exclusively (`O_CREAT | O_EXCL`, which never
/// follows a symlink), mode 0600: a link planted in the state directory cannot make us write elsewhere.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The least time between two writes of the state file that no flush waits for.
const MIN_WRITE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);

/// Coalescing writer: transitions mark the state dirty; one task writes the newest snapshot.
pub(crate) struct Persister {
    path: PathBuf,
    requested: AtomicU64,
    /// The newest request made by a [`Persister::flush`]: its write re-reads `/proc` (a fresh snapshot).
    fresh_requested: AtomicU64,
    wake: Notify,
    /// Wakes the writer out of its pause between two writes: a flush does not wait.
    flush_wake: Notify,
    /// The newest request written, and the newest written with a fresh snapshot.
    written: watch::Sender<(u64, u64)>,
}

impl Persister {
    pub(crate) fn new(path: PathBuf) -> Arc<Self> {
        Arc::new(Persister {
            path,
            requested: AtomicU64::new(0),
            fresh_requested: AtomicU64::new(0),
            wake: Notify::new(),
            flush_wake: Notify::new(),
            written: watch::Sender::new((0, 0)),
        })
    }

    /// Asks for a write of the current state.
    pub(crate) fn dirty(&self) {
        self.requested.fetch_add(1, Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// Waits until a write with a fresh snapshot, started after this call, has finished.
    pub(crate) async fn flush(&self) {
        let target = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        self.fresh_requested.fetch_max(target, Ordering::SeqCst);
        self.wake.notify_one();
        self.flush_wake.notify_one();
        let mut rx = self.written.subscribe();
        let _ = rx.wait_for(|w| w.1 >= target).await;
    }

    /// The writer loop: `snapshot` is called without any lock held by us and returns the serialized state;
    /// its argument says a flush is waiting (re-read `/proc`). It runs on the blocking pool with the write.
    pub(crate) async fn run<F>(self: Arc<Self>, snapshot: F, stop: tokio_util::sync::CancellationToken)
    where
        F: Fn(bool) -> Vec<u8> + Send + Sync + 'static,
    {
        let snapshot = Arc::new(snapshot);
        let mut last_error: Option<String> = None;
        let mut last_write: Option<tokio::time::Instant> = None;
        loop {
            let mut stopping = tokio::select! {
                _ = self.wake.notified() => false,
                _ = stop.cancelled() => true,
            };
            // A burst of transitions (100 starts) is one write every MIN_WRITE_INTERVAL, not one per transition:
            // each write serializes the whole table and syncs it to disk. A flush does not wait.
            let flush_waiting = || self.fresh_requested.load(Ordering::SeqCst) > self.written.borrow().1;
            if let Some(due) = last_write.map(|t| t + MIN_WRITE_INTERVAL) {
                if !stopping && !flush_waiting() {
                    stopping = tokio::select! {
                        () = tokio::time::sleep_until(due) => false,
                        _ = self.flush_wake.notified() => false,
                        _ = stop.cancelled() => true,
                    };
                }
            }
            // A flush seen here has its request counted in `target` (it counts before it asks for fresh).
            let fresh_wanted = self.fresh_requested.load(Ordering::SeqCst);
            let target = self.requested.load(Ordering::SeqCst);
            let (written, fresh_written) = *self.written.borrow();
            let fresh = fresh_wanted > fresh_written;
            if target > written || fresh {
                last_write = Some(tokio::time::Instant::now());
                let path = self.path.clone();
                let snapshot = Arc::clone(&snapshot);
                let result = tokio::task::spawn_blocking(move || write_atomic(&path, &snapshot(fresh))).await;
                match result {
                    Ok(Ok(())) => last_error = None,
                    Ok(Err(e)) => {
                        let msg = e.to_string();
                        if last_error.as_deref() != Some(msg.as_str()) {
                            tracing::error!(path = %self.path.display(), error = %msg, "cannot write the state file");
                        }
                        last_error = Some(msg);
                    }
                    Err(e) => tracing::error!(error = %e, "state writer task failed"),
                }
                // Marked written even on error, so `flush` never hangs; the error is logged.
                self.written
                    .send_replace((target, if fresh { target } else { fresh_written }));
            }
            if stopping {
                break;
            }
        }
    }
}
