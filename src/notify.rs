//! systemd's notify protocol (`sd_notify`), for `Type=notify` units: one datagram per message to the Unix
//! socket named by `$NOTIFY_SOCKET` (a path, or an abstract name written with a leading `@`).
//!
//! The daemon says `READY=1` once its three sockets serve, keeps `STATUS=` up to date with the process
//! counts, sends `WATCHDOG=1` at half of `$WATCHDOG_USEC` when systemd asks for a watchdog, and `STOPPING=1`
//! when the orderly shutdown begins. Without `$NOTIFY_SOCKET` nothing is sent. A failed send is logged once
//! and otherwise ignored: systemd being gone must not stop the daemon.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::housekeeping::{CountProcesses, ProcessCounts};

/// How often `STATUS=` is refreshed (only sent when its text changed).
const STATUS_PERIOD: Duration = Duration::from_secs(2);

/// Where notifications go, and the watchdog interval systemd asked for.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    watchdog: Option<Duration>,
    warned: AtomicBool,
}

impl Notifier {
    /// From `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` of this process; `None` when not under
    /// systemd (or the socket name is unusable, which is logged).
    pub fn from_env() -> Option<Notifier> {
        let var = |k: &str| std::env::var(k).ok();
        Notifier::from_values(
            var("NOTIFY_SOCKET").as_deref(),
            var("WATCHDOG_USEC").as_deref(),
            var("WATCHDOG_PID").as_deref(),
            std::process::id(),
        )
    }

    /// [`Notifier::from_env`] with the values given. The watchdog applies only when `WATCHDOG_PID` is unset
    /// or names `pid`, as `sd_watchdog_enabled` does.
    pub fn from_values(
        socket: Option<&str>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
        pid: u32,
    ) -> Option<Notifier> {
        let name = socket.filter(|s| !s.is_empty())?;
        let addr = match address(name) {
            Ok(a) => a,
            Err(e) => {
                warn!(socket = name, error = %e, "NOTIFY_SOCKET unusable; no systemd notifications");
                return None;
            }
        };
        let socket = match UnixDatagram::unbound() {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot create the systemd notification socket");
                return None;
            }
        };
        let ours = watchdog_pid.is_none_or(|p| p.trim().parse::<u32>().ok() == Some(pid));
        let watchdog = watchdog_usec
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|u| *u > 0 && ours)
            .map(|u| Duration::from_micros(u / 2).max(Duration::from_millis(1)));
        Some(Notifier {
            socket,
            addr,
            watchdog,
            warned: AtomicBool::new(false),
        })
    }

    /// The `WATCHDOG=1` interval (half of `WATCHDOG_USEC`), if a watchdog is on.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Send one notification (`KEY=value` lines). Errors are logged once.
    pub fn notify(&self, message: &str) {
        match self.socket.send_to_addr(message.as_bytes(), &self.addr) {
            Ok(_) => debug!(message, "systemd notified"),
            Err(e) => {
                if !self.warned.swap(true, Ordering::Relaxed) {
                    warn!(error = %e, "cannot notify systemd (further failures are not logged)");
                }
            }
        }
    }
}

/// A path, or `@name` for the abstract namespace.
fn address(name: &str) -> std::io::Result<SocketAddr> {
    match name.strip_prefix('@') {
        Some(abstract_name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(abstract_name.as_bytes())
        }
        None => SocketAddr::from_pathname(name),
    }
}

/// The `STATUS=` text: how many processes, by state (states with none are left out).
pub fn status_text(c: &ProcessCounts) -> String {
    let parts: Vec<String> = [
        (c.running, "running"),
        (c.starting, "starting"),
        (c.backoff, "backoff"),
        (c.stopping, "stopping"),
        (c.stopped, "stopped"),
        (c.exited, "exited"),
        (c.fatal, "fatal"),
    ]
    .iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, s)| format!("{n} {s}"))
    .collect();
    let plural = if c.total == 1 { "" } else { "es" };
    if parts.is_empty() {
        format!("serving; {} process{plural}", c.total)
    } else {
        format!("serving; {} process{plural}: {}", c.total, parts.join(", "))
    }
}

/// Run for the daemon's life: `READY=1` with the first status at once (the caller spawns this when the
/// sockets serve), then status updates and watchdog pings until `shutdown`, then `STOPPING=1`.
pub async fn run(notifier: Arc<Notifier>, counts: Option<Arc<dyn CountProcesses>>, shutdown: CancellationToken) {
    let status = || {
        counts
            .as_ref()
            .map(|c| status_text(&c.counts()))
            .unwrap_or_else(|| "serving".into())
    };
    let mut last = status();
    notifier.notify(&format!("READY=1\nSTATUS={last}"));
    let mut status_tick = tokio::time::interval(STATUS_PERIOD);
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watchdog = notifier.watchdog_interval().map(|p| {
        let mut t = tokio::time::interval(p);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    loop {
        let ping = async {
            match watchdog.as_mut() {
                Some(t) => t.tick().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ping => notifier.notify("WATCHDOG=1"),
            _ = status_tick.tick() => {
                let now = status();
                if now != last {
                    notifier.notify(&format!("STATUS={now}"));
                    last = now;
                }
            }
        }
    }
    notifier.notify("STOPPING=1\nSTATUS=stopping");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(s: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = s.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_to_a_path_and_to_an_abstract_name() {
        let dir = std::env::temp_dir().join(format!("procman-notify-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = Notifier::from_values(path.to_str(), None, None, 1).unwrap();
        n.notify("READY=1");
        assert_eq!(recv(&server), "READY=1");
        std::fs::remove_dir_all(dir).ok();

        use std::os::linux::net::SocketAddrExt;
        let name = format!("procman-notify-{}", uuid::Uuid::new_v4());
        let server = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = Notifier::from_values(Some(&format!("@{name}")), None, None, 1).unwrap();
        n.notify("WATCHDOG=1");
        assert_eq!(recv(&server), "WATCHDOG=1");
    }

    #[test]
    fn watchdog_only_for_this_pid_and_at_half_the_period() {
        let p = Some("/nonexistent/notify");
        assert!(Notifier::from_values(None, Some("1000"), None, 1).is_none());
        assert!(Notifier::from_values(Some(""), None, None, 1).is_none());
        let w = |usec, pid| Notifier::from_values(p, usec, pid, 42).unwrap().watchdog_interval();
        assert_eq!(w(Some("10000000"), None), Some(Duration::from_secs(5)));
        assert_eq!(w(Some("10000000"), Some("42")), Some(Duration::from_secs(5)));
        assert_eq!(w(Some("10000000"), Some("43")), None);
        assert_eq!(w(Some("0"), None), None);
        assert_eq!(w(Some("x"), None), None);
        assert_eq!(w(None, None), None);
    }

    /// The counts a test sets.
    struct Counts(std::sync::Mutex<ProcessCounts>);

    impl CountProcesses for Counts {
        fn counts(&self) -> ProcessCounts {
            self.0.lock().map(|c| *c).unwrap_or_default()
        }
    }

    /// Everything the socket holds now.
    fn drain(s: &UnixDatagram) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = [0u8; 512];
        while let Ok(n) = s.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        out
    }

    /// The whole schedule on tokio's paused clock: the virtual minute below takes no real time, and what is
    /// sent when does not depend on how busy the machine is.
    #[tokio::test(start_paused = true)]
    async fn ready_watchdog_status_and_stopping_on_a_paused_clock() {
        let dir = std::env::temp_dir().join(format!("procman-notify-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        server.set_nonblocking(true).unwrap();
        // WATCHDOG_USEC of 20 s: a ping every 10 s.
        let n = Arc::new(Notifier::from_values(path.to_str(), Some("20000000"), None, 1).unwrap());
        let counts = Arc::new(Counts(std::sync::Mutex::new(ProcessCounts {
            total: 1,
            running: 1,
            ..Default::default()
        })));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(n, Some(counts.clone()), shutdown.clone()));
        let second = Duration::from_secs(1);

        tokio::time::sleep(second).await;
        assert_eq!(
            drain(&server),
            ["READY=1\nSTATUS=serving; 1 process: 1 running", "WATCHDOG=1"]
        );
        // Until 25 s: pings at 10 and 20 s; the status did not change, so it is not repeated.
        tokio::time::sleep(24 * second).await;
        assert_eq!(drain(&server), ["WATCHDOG=1", "WATCHDOG=1"]);
        // A change is sent at the next status period (26 s), once.
        if let Ok(mut c) = counts.0.lock() {
            c.running = 0;
            c.stopped = 1;
        }
        tokio::time::sleep(2 * second).await;
        assert_eq!(drain(&server), ["STATUS=serving; 1 process: 1 stopped"]);
        tokio::time::sleep(4 * second).await;
        assert_eq!(drain(&server), ["WATCHDOG=1"]);
        shutdown.cancel();
        task.await.unwrap();
        assert_eq!(drain(&server), ["STOPPING=1\nSTATUS=stopping"]);
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn status_counts_by_state() {
        let c = ProcessCounts {
            total: 3,
            running: 2,
            fatal: 1,
            ..Default::default()
        };
        assert_eq!(status_text(&c), "serving; 3 processes: 2 running, 1 fatal");
        assert_eq!(status_text(&ProcessCounts::default()), "serving; 0 processes");
    }
}
