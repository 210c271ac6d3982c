//! The one child reaper of the process.
//!
//! On first use the process becomes a child subreaper (`PR_SET_CHILD_SUBREAPER`), so orphaned grandchildren
//! are re-parented to it instead of to PID 1 (which, in containers, often never reaps them). A dedicated thread
//! with its own single-threaded tokio runtime waits for SIGCHLD and then calls `waitpid(-1, WNOHANG)` until
//! nothing is left. A reaped pid with a route (a managed child) has its exit status sent to its state machine at
//! once; any other pid (an orphaned grandchild) is only reaped.
//!
//! It is one per process, not one per supervisor, because `waitpid(-1)` reaps every child of the process:
//! two reapers would steal each other's exits. The thread also keeps reaping if the runtime that created a
//! supervisor is shut down. The consequence: nothing else in the process may wait for its own children
//! (`tokio::process`, `std::process::Child::wait`, `Command::status`/`output`), because the reaper would take
//! their exit status first.
//!
//! Spawning happens under the same lock the reaper holds while reaping, so a child that dies instantly is
//! never reaped before its route is registered (and `std`'s own `waitpid` after a failed `exec` still finds
//! its child).

use std::collections::HashMap;
use std::io;
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::mpsc;

use super::error::{ReaperError, SupervisorError};

/// How a reaped process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ExitReport {
    pub pid: i32,
    /// Exit code, when it exited normally.
    pub code: Option<i32>,
    /// Signal number, when a signal killed it.
    pub signal: Option<i32>,
}

pub(crate) type ExitSender = mpsc::UnboundedSender<ExitReport>;

/// The process-wide reaper: routes from pid to the state machine that owns it.
pub(crate) struct Reaper {
    routes: Mutex<HashMap<i32, ExitSender>>,
}

static REAPER: OnceLock<Result<Reaper, ReaperError>> = OnceLock::new();

/// The reaper, installed on first call.
pub(crate) fn global() -> Result<&'static Reaper, SupervisorError> {
    let installed = REAPER.get_or_init(|| {
        nix::sys::prctl::set_child_subreaper(true).map_err(ReaperError::Subreaper)?;
        Ok(Reaper {
            routes: Mutex::new(HashMap::new()),
        })
    });
    let reaper = installed.as_ref().map_err(|e| SupervisorError::Reaper(e.clone()))?;
    start_thread(reaper)?;
    Ok(reaper)
}

/// Starts the SIGCHLD thread once; waits until its signal handler is installed so no exit is missed.
fn start_thread(reaper: &'static Reaper) -> Result<(), SupervisorError> {
    static STARTED: OnceLock<Result<(), ReaperError>> = OnceLock::new();
    STARTED
        .get_or_init(|| {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), ReaperError>>();
            std::thread::Builder::new()
                .name("procman-reaper".into())
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread().enable_io().build() {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = ready_tx.send(Err(ReaperError::Runtime(Arc::new(e))));
                            return;
                        }
                    };
                    rt.block_on(async move {
                        use tokio::signal::unix::{signal, SignalKind};
                        let mut sigchld = match signal(SignalKind::child()) {
                            Ok(s) => s,
                            Err(e) => {
                                let _ = ready_tx.send(Err(ReaperError::Handler(Arc::new(e))));
                                return;
                            }
                        };
                        let _ = ready_tx.send(Ok(()));
                        loop {
                            // Reap first: children may have exited before the handler was installed, and
                            // several SIGCHLDs can coalesce into one wake-up.
                            reaper.reap_all();
                            if sigchld.recv().await.is_none() {
                                break;
                            }
                        }
                    });
                })
                .map_err(|e| ReaperError::Thread(Arc::new(e)))?;
            ready_rx.recv().map_err(|_| ReaperError::Died)?
        })
        .clone()
        .map_err(SupervisorError::Reaper)
}

impl Reaper {
    fn routes(&self) -> MutexGuard<'_, HashMap<i32, ExitSender>> {
        self.routes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Spawns `cmd` and registers its exit route before the reaper can see it.
    pub(crate) fn spawn(&self, cmd: &mut Command, route: ExitSender) -> io::Result<i32> {
        let mut routes = self.routes();
        let child = cmd.spawn()?;
        let pid = i32::try_from(child.id()).map_err(|_| io::Error::other("pid out of range"))?;
        routes.insert(pid, route);
        // The `Child` is dropped without waiting: its exit arrives through the route.
        drop(child);
        Ok(pid)
    }

    /// Spawns `cmd` like [`Reaper::spawn`] but hands back the `Child` for its pipes. The caller must never
    /// wait on it: the exit arrives through `route`.
    pub(crate) fn spawn_child(&self, cmd: &mut Command, route: ExitSender) -> io::Result<(i32, std::process::Child)> {
        let mut routes = self.routes();
        let child = cmd.spawn()?;
        let pid = i32::try_from(child.id()).map_err(|_| io::Error::other("pid out of range"))?;
        routes.insert(pid, route);
        Ok((pid, child))
    }

    /// Routes the exit of `pid` (an adopted process) if it turns out to be our child. Returns false when
    /// another state machine already owns the pid.
    pub(crate) fn claim(&self, pid: i32, route: ExitSender) -> bool {
        let mut routes = self.routes();
        match routes.get(&pid) {
            Some(existing) if !existing.same_channel(&route) && !existing.is_closed() => false,
            _ => {
                routes.insert(pid, route);
                true
            }
        }
    }

    /// Whether some state machine owns `pid`.
    pub(crate) fn is_routed(&self, pid: i32) -> bool {
        self.routes().get(&pid).is_some_and(|r| !r.is_closed())
    }

    /// Forgets a route (process given up or not ours any more).
    pub(crate) fn release(&self, pid: i32, route: &ExitSender) {
        let mut routes = self.routes();
        if routes.get(&pid).is_some_and(|r| r.same_channel(route)) {
            routes.remove(&pid);
        }
    }

    fn reap_all(&self) {
        let mut routes = self.routes();
        loop {
            let (pid, code, signal) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid.as_raw(), Some(code), None),
                Ok(WaitStatus::Signaled(pid, sig, _core)) => (pid.as_raw(), None, Some(sig as i32)),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                // Stop/continue notifications are not requested; skip anything else.
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "waitpid failed");
                    break;
                }
            };
            match routes.remove(&pid) {
                Some(route) => {
                    let _ = route.send(ExitReport { pid, code, signal });
                }
                None => {
                    tracing::debug!(pid, ?code, ?signal, "reaped an orphaned descendant");
                }
            }
        }
    }
}
