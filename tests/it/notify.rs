//! systemd's notify protocol end to end: `pm_cs start` with `NOTIFY_SOCKET` pointing at a datagram socket
//! this test owns sends READY=1 (once serving), STATUS=…, WATCHDOG=1 (WATCHDOG_USEC is set) and, on
//! SIGTERM, STOPPING=1.

use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Kills the child on drop, so a failing test leaves nothing behind.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Collect datagrams until `done` holds for what arrived, within `limit`.
fn collect_until(s: &UnixDatagram, seen: &mut Vec<String>, limit: Duration, done: impl Fn(&[String]) -> bool) {
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    while !done(seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "not all notifications within {limit:?}: {seen:?}");
        s.set_read_timeout(Some(left)).unwrap();
        if let Ok(n) = s.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
}

fn has(seen: &[String], line: &str) -> bool {
    seen.iter().any(|m| m.lines().any(|l| l.starts_with(line)))
}

#[test]
fn ready_status_watchdog_and_stopping_reach_the_notify_socket() {
    let dir = std::env::temp_dir().join(format!("procman-notify-it-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let settings = dir.join("local.yaml");
    std::fs::write(
        &settings,
        format!(
            "Process Manager Control Server:\n    COMMANDING_PORT: 0\n    MONITORING_PORT: 0\n    SERVICE_PORT: 0\n\
             Service Registry:\n    HOSTNAME: 127.0.0.1\n    REQUESTER_PORT: 1\n    HEARTBEAT_PORT: 1\n    PUBLISHER_PORT: 1\n\
             Storage Manager Control Server:\n    HOSTNAME: 127.0.0.1\n    COMMANDING_PORT: 1\n\
             Configuration Manager Control Server:\n    HOSTNAME: 127.0.0.1\n    COMMANDING_PORT: 1\n\
             Notify Hub:\n    HOSTNAME: 127.0.0.1\n    PUBLISHER_PORT: 1\n\
             Procman:\n    BIND_ADDRESS: 127.0.0.1\n    STATE_DIR: {}\n",
            dir.display()
        ),
    )
    .unwrap();
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_pm_cs"))
        .args(["start", "--settings"])
        .arg(&settings)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .env("CGSE_LOG_FILE_LOCATION", dir.join("log"))
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut g = Guard(child);
    let mut seen = Vec::new();
    collect_until(&sock, &mut seen, Duration::from_secs(20), |s| {
        has(s, "READY=1") && has(s, "STATUS=serving") && has(s, "WATCHDOG=1")
    });
    let ready = seen.iter().position(|m| m.contains("READY=1")).unwrap();
    assert!(
        !seen[..ready].iter().any(|m| m.contains("WATCHDOG=1")),
        "READY first: {seen:?}"
    );
    kill(Pid::from_raw(g.0.id() as i32), Signal::SIGTERM).unwrap();
    collect_until(&sock, &mut seen, Duration::from_secs(20), |s| has(s, "STOPPING=1"));
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = g.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the daemon did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    std::fs::remove_dir_all(dir).ok();
}
