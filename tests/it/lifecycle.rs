//! The `pm_cs` binary's lifecycle: SIGINT and SIGTERM shut it down in order with exit code 0 within 2 s; a
//! port in use makes it exit non-zero with a message naming the port.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn settings(dir: &std::path::Path, commanding: u16) -> std::path::PathBuf {
    let f = dir.join("local.yaml");
    std::fs::write(
        &f,
        format!(
            "Process Manager Control Server:\n    COMMANDING_PORT: {commanding}\n    MONITORING_PORT: 0\n    SERVICE_PORT: 0\n\
             Procman:\n    BIND_ADDRESS: 127.0.0.1\n    STATE_DIR: {}\n",
            dir.display()
        ),
    )
    .unwrap();
    f
}

fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("procman-life-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Kills the child on drop, so a failing test leaves nothing behind.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(settings: &std::path::Path) -> Guard {
    let child = Command::new(env!("CARGO_BIN_EXE_pm_cs"))
        .args(["start", "--settings"])
        .arg(settings)
        .env("PROCMAN_LOG", "info")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Guard(child)
}

/// Read stderr until the "listening" line (or the process ends); returns what was read.
fn wait_listening(g: &mut Guard) -> String {
    let stderr = g.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
                if line.contains("listening") {
                    return seen;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return seen,
        }
    }
    seen
}

fn exits_cleanly_on(signal: Signal) {
    let dir = tempdir();
    let mut g = spawn(&settings(&dir, 0));
    let log = wait_listening(&mut g);
    assert!(log.contains("listening"), "{log}");
    let started = Instant::now();
    kill(Pid::from_raw(g.0.id() as i32), signal).unwrap();
    let status = loop {
        if let Some(s) = g.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{signal} did not stop the daemon within 30 s (a hang guard, not a timing)"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(0), "{signal}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn sigterm_stops_the_daemon_with_exit_code_0() {
    exits_cleanly_on(Signal::SIGTERM);
}

#[test]
fn sigint_stops_the_daemon_with_exit_code_0() {
    exits_cleanly_on(Signal::SIGINT);
}

#[test]
fn a_port_in_use_exits_non_zero_naming_the_port() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let dir = tempdir();
    let out = Command::new(env!("CARGO_BIN_EXE_pm_cs"))
        .args(["start", "--settings"])
        .arg(settings(&dir, port))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("tcp://127.0.0.1:{port}")) && stderr.contains("commanding"),
        "{stderr}"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn a_missing_settings_file_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_pm_cs"))
        .args(["start", "--settings", "/nonexistent/procman-local.yaml"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/procman-local.yaml"), "{stderr}");
}
