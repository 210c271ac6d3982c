//! Marker scans shared between the processes: one walk of `/proc` answers every process that asked for a
//! scan while the walk was pending.
//!
//! A stop asks for a scan when it begins and again when the process groups are empty (the marked processes
//! that left them, e.g. by `setsid`, must go too). A walk reads the environment of every process on the
//! machine, a few milliseconds of CPU; stopping 100 processes one scan at a time cost ~200 walks and most
//! of the stop's time. Here a request joins the next walk that starts after it (never one already under
//! way, whose view may predate the request), and one walk sorts what it finds by marker.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;

use super::sys::{self, ProcStat};

/// The scans of one supervisor (one owner marker).
pub(crate) struct MarkerScans {
    id_var: &'static str,
    owner_var: &'static str,
    owner: String,
    pending: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    /// Who waits for the next walk, and for which marker.
    waiters: Vec<(String, oneshot::Sender<Vec<ProcStat>>)>,
    /// A walker task is running (it takes every waiter before each walk).
    walking: bool,
    /// Walks done, for tests and logs.
    walks: u64,
}

impl MarkerScans {
    /// Scans for processes carrying `id_var=<id>` and `owner_var=owner`.
    pub(crate) fn new(id_var: &'static str, owner_var: &'static str, owner: String) -> Arc<MarkerScans> {
        Arc::new(MarkerScans {
            id_var,
            owner_var,
            owner,
            pending: Mutex::new(Pending::default()),
        })
    }

    /// The live processes (other than this one) marked with `id`, as seen by a walk that starts after this
    /// call. The walk runs on the blocking pool; the receiver yields an empty list if it failed.
    pub(crate) fn request(self: &Arc<Self>, id: &str) -> oneshot::Receiver<Vec<ProcStat>> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut p = self.lock();
            p.waiters.push((id.to_owned(), tx));
            !std::mem::replace(&mut p.walking, true)
        };
        if start {
            let me = self.clone();
            tokio::task::spawn_blocking(move || me.walk_until_idle());
        }
        rx
    }

    /// Walks done so far.
    #[cfg(test)]
    pub(crate) fn walks(&self) -> u64 {
        self.lock().walks
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn walk_until_idle(&self) {
        // Should a walk panic, the next request must start a walker again; waiters of a lost batch see their
        // sender dropped (an empty result) rather than waiting forever. Only then: on a normal return the flag
        // is cleared under the lock below, and clearing it again afterwards could clear a newer walker's.
        struct Idle<'a>(&'a MarkerScans);
        impl Drop for Idle<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.0.lock().walking = false;
                }
            }
        }
        let _idle = Idle(self);
        loop {
            let batch = {
                let mut p = self.lock();
                if p.waiters.is_empty() {
                    p.walking = false;
                    return;
                }
                p.walks += 1;
                std::mem::take(&mut p.waiters)
            };
            let found = sys::marked_processes_by_id(self.id_var, self.owner_var, &self.owner);
            for (id, tx) in batch {
                let _ = tx.send(found.get(&id).cloned().unwrap_or_default());
            }
        }
    }
}

impl std::fmt::Debug for MarkerScans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MarkerScans")
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// Many requests at once share walks, and each gets the processes of its own marker.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_at_once_share_walks_and_get_their_own_processes() {
        let owner = format!("/tmp/procman-scan-test-{}", std::process::id());
        let spawn = |id: &str| {
            Command::new("sleep")
                .arg("1000")
                .env("PROCMAN_SCAN_TEST_ID", id)
                .env("PROCMAN_SCAN_TEST_OWNER", &owner)
                .stdin(Stdio::null())
                .spawn()
                .unwrap()
        };
        let mut children = vec![spawn("a"), spawn("a"), spawn("b")];
        // `spawn` returns once the child's new program is mapped, a moment before the kernel records where its
        // environment is: until then `/proc/<pid>/environ` reads empty. Wait for the markers to show.
        for child in &children {
            let environ = format!("/proc/{}/environ", child.id());
            let shows = || std::fs::read(&environ).is_ok_and(|e| e.windows(20).any(|w| w == b"PROCMAN_SCAN_TEST_ID"));
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while !shows() && std::time::Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            assert!(shows(), "the marker of child {} never showed", child.id());
        }
        let scans = MarkerScans::new("PROCMAN_SCAN_TEST_ID", "PROCMAN_SCAN_TEST_OWNER", owner.clone());
        let ids = ["a", "b", "c"];
        let rxs: Vec<_> = (0..60).map(|i| scans.request(ids[i % 3])).collect();
        let mut counts = Vec::new();
        for rx in rxs {
            counts.push(rx.await.unwrap().len());
        }
        for child in &mut children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for (i, n) in counts.iter().enumerate() {
            assert_eq!(*n, [2, 1, 0][i % 3], "request {i}: {counts:?}");
        }
        // The first walk starts with the first request; the other 59 wait for at most one more.
        assert!(scans.walks() <= 2, "{} walks for 60 requests", scans.walks());
        // A request after the children are gone sees none of them.
        assert!(scans.request("a").await.unwrap().is_empty());
    }
}
