//! Shared helpers for the supervisor tests: temporary directories, a harness that records events, and a guard
//! that SIGKILLs every process a test started (by pid and start time) even when the test fails.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use procman::supervisor::{
    sys, ProcessDefinition, ProcessEvent, ProcessRecord, ProcessState, ReadinessProbe, Supervisor, SupervisorConfig,
    SupervisorHandle, ID_ENV, OWNER_ENV,
};
use tokio::sync::mpsc;

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "procman-test-{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Kills, on drop, every process group it was told about and every live process whose environment marks it as
/// one of `ids` — each only if its start time still matches, so a reused pid is never hit.
#[derive(Clone, Default)]
pub struct KillGuard {
    groups: Arc<Mutex<Vec<(i32, u64)>>>,
    ids: Arc<Mutex<Vec<String>>>,
    owners: Arc<Mutex<Vec<String>>>,
}

/// The owner marker a supervisor with this state directory gives its children (see `Supervisor::spawn`).
pub fn owner_of(state_dir: &Path) -> String {
    std::fs::canonicalize(state_dir)
        .unwrap_or_else(|_| state_dir.to_path_buf())
        .display()
        .to_string()
}

impl KillGuard {
    pub fn track_pid(&self, pid: i32) {
        if let Some(st) = sys::stat(pid) {
            self.groups.lock().unwrap().push((pid, st.start_ticks));
        }
    }

    pub fn track_id(&self, id: &str) {
        self.ids.lock().unwrap().push(id.to_owned());
    }

    /// Only processes of the supervisor with this state directory are ours: another suite on the same
    /// machine runs processes with the same ids.
    pub fn track_owner(&self, state_dir: &Path) {
        self.owners.lock().unwrap().push(owner_of(state_dir));
    }

    pub fn kill_all(&self) {
        let ids = self.ids.lock().unwrap().clone();
        let owners = self.owners.lock().unwrap().clone();
        for p in sys::all_processes() {
            if p.state == 'Z' {
                continue;
            }
            let ours = owners.is_empty()
                || owners
                    .iter()
                    .any(|o| sys::environ_has(p.pid, OWNER_ENV, o) == Some(true));
            if ours && ids.iter().any(|id| sys::environ_has(p.pid, ID_ENV, id) == Some(true)) {
                let _ = kill(Pid::from_raw(p.pid), Signal::SIGKILL);
            }
        }
        for (pid, ticks) in self.groups.lock().unwrap().iter() {
            match sys::stat(*pid) {
                Some(st) if st.start_ticks != *ticks => continue,
                _ => {
                    let _ = killpg(Pid::from_raw(*pid), Signal::SIGKILL);
                    let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
                }
            }
        }
    }
}

impl Drop for KillGuard {
    fn drop(&mut self) {
        if Arc::strong_count(&self.groups) == 1 {
            self.kill_all();
        }
    }
}

/// A supervisor under test, its recorded events and its kill guard.
pub struct Harness {
    pub sup: SupervisorHandle,
    pub events: Arc<Mutex<Vec<ProcessEvent>>>,
    pub guard: KillGuard,
    pub dir: TempDir,
}

pub fn config(dir: &Path) -> SupervisorConfig {
    SupervisorConfig::new(dir.join("state"), dir.join("log"))
}

impl Harness {
    pub fn start(tag: &str, defs: Vec<ProcessDefinition>) -> Harness {
        let dir = TempDir::new(tag);
        let cfg = config(dir.path());
        Self::start_with(dir, cfg, defs, None)
    }

    pub fn start_with(
        dir: TempDir,
        cfg: SupervisorConfig,
        defs: Vec<ProcessDefinition>,
        probe: Option<Arc<dyn ReadinessProbe>>,
    ) -> Harness {
        let guard = KillGuard::default();
        for d in &defs {
            guard.track_id(&d.id);
        }
        let (tx, mut rx) = mpsc::channel::<ProcessEvent>(10_000);
        let events = Arc::new(Mutex::new(Vec::new()));
        let state_dir = cfg.state_dir.clone();
        let sup = Supervisor::spawn(cfg, defs, tx, probe).expect("spawn supervisor");
        guard.track_owner(&state_dir);
        let (ev, g) = (events.clone(), guard.clone());
        tokio::spawn(async move {
            while let Some(e) = rx.recv().await {
                if let Some(pid) = e.pid {
                    g.track_pid(pid);
                }
                ev.lock().unwrap().push(e);
            }
        });
        Harness {
            sup,
            events,
            guard,
            dir,
        }
    }

    /// Polls the status table until `id` is in `state`.
    pub async fn wait_state(&self, id: &str, state: ProcessState, timeout: Duration) -> ProcessRecord {
        let t0 = Instant::now();
        loop {
            let r = self.sup.get(id).expect("known id");
            if r.state == state {
                // The table changes before its event reaches the recorder task: wait until every event up to
                // now is recorded, so that a test reading `events` next sees the one that made this state.
                let seq = self.sup.list().0;
                while self.events.lock().unwrap().last().map_or(0, |e| e.seq) < seq {
                    assert!(t0.elapsed() < timeout, "{id}: events up to seq {seq} never recorded");
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                return r;
            }
            assert!(
                t0.elapsed() < timeout,
                "{id}: waited {timeout:?} for {state}, still {r:#?}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Waits for an event matching `pred` and returns it.
    pub async fn wait_event(&self, timeout: Duration, pred: impl Fn(&ProcessEvent) -> bool) -> ProcessEvent {
        let t0 = Instant::now();
        loop {
            if let Some(e) = self.events.lock().unwrap().iter().find(|e| pred(e)) {
                return e.clone();
            }
            assert!(
                t0.elapsed() < timeout,
                "no matching event within {timeout:?}: {:#?}",
                self.events_of("")
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Events of one id ("" for all).
    pub fn events_of(&self, id: &str) -> Vec<ProcessEvent> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| id.is_empty() || e.id == id)
            .cloned()
            .collect()
    }
}

/// A definition with fast policies for tests.
pub fn def(id: &str, argv: &[&str]) -> ProcessDefinition {
    let mut d = ProcessDefinition::new(id, argv.iter().map(|s| s.to_string()).collect());
    d.stop_timeout = Duration::from_secs(2);
    d.backoff.initial = Duration::from_millis(100);
    d.autostart = false;
    d
}

/// Live (non-zombie) members of process group `pgid`.
pub fn group_alive_members(pgid: i32) -> Vec<i32> {
    sys::group_members(pgid)
}

/// Live processes running `argv` whose parent is this test process: another suite running on the same
/// machine (a CI run beside a local one) has processes with the same command lines, never with our pid as
/// parent.
pub fn count_our_children_running(argv: &[&str]) -> usize {
    let me = std::process::id() as i32;
    sys::all_processes()
        .into_iter()
        .filter(|p| p.state != 'Z' && p.ppid == me)
        .filter(|p| sys::cmdline(p.pid).map(|c| c == argv).unwrap_or(false))
        .count()
}

/// Blocks (briefly) until `cond` holds or `timeout` passes; returns whether it held.
pub async fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cond()
}

/// Runs this test binary again, filtered to its `helper_entry` test, with `env` set (in a process group of its
/// own with `own_group`), so that a supervisor can live in a process the test may SIGKILL like a crashed
/// daemon. Returns the helper's pid (tracked by `guard`) and its stdout lines as they come. The helper is
/// never waited for: the supervisor's reaper owns child exits in this process.
#[allow(dead_code)] // not every test binary uses every helper
pub fn spawn_helper(
    env: &[(&str, &std::ffi::OsStr)],
    own_group: bool,
    guard: &KillGuard,
) -> (i32, std::sync::mpsc::Receiver<String>) {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let exe = std::env::current_exe().expect("the test binary");
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", "helper_entry", "--nocapture", "--test-threads=1"])
        .envs(env.iter().map(|(k, v)| (*k, *v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if own_group {
        cmd.process_group(0);
    }
    let mut child = cmd.spawn().expect("spawn the helper");
    let helper = child.id() as i32;
    guard.track_pid(helper);
    let stdout = child.stdout.take().expect("the helper's stdout");
    drop(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (helper, rx)
}

/// `/proc/<pid>/cmdline` once the kernel has filled it in. A spawn returns as soon as exec has begun and the
/// new command line appears a moment later (on a loaded machine, visibly later): read once, it can be empty.
#[allow(dead_code)] // not every test binary uses every helper
pub fn settled_cmdline(pid: i32) -> Vec<String> {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        match procman::supervisor::sys::cmdline(pid) {
            Ok(c) if !c.is_empty() => return c,
            _ if Instant::now() > end => panic!("no command line for {pid} within 10 s"),
            _ => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}
