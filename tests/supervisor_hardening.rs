//! Hardening of the supervisor against a hostile peer or a tampered state directory (issue 13): client
//! definitions are capped and removed when they end, a `setsid` grandchild is stopped with its process, the
//! daemon never signals its own group nor a group a state file lists without matching it, only marked
//! processes are adopted, programs are never found through an empty `PATH` element, and symlinks planted at
//! the files the daemon writes are not followed. Every wait is an event or a bounded poll.

// The supervisor's reaper collects every child exit in this process (waitpid(-1)): the test never wait()s on
// what it spawns, it tracks the pids and kills them.
#![allow(clippy::zombie_processes)]
mod supervisor_util;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use procman::cgse::storage::{daily_file, HkRecord, HkValue, LocalCsv};
use procman::supervisor::{install_reaper, sys, ProcessState, RestartPolicy, ID_ENV, OWNER_ENV, STATE_FILE};
use supervisor_util::{config, def, eventually, settled_cmdline, spawn_helper, Harness, KillGuard, TempDir};

const T: Duration = Duration::from_secs(15);
const HELPER_ENV: &str = "HARDENING_HELPER_DIR";

/// Live processes of the supervisor with `state_dir` carrying `PROCMAN_ID=<id>` (another suite on the same
/// machine has processes with the same id, never with our owner).
fn marked(state_dir: &std::path::Path, id: &str) -> Vec<i32> {
    let owner = supervisor_util::owner_of(state_dir);
    sys::all_processes()
        .into_iter()
        .filter(|p| p.state != 'Z' && sys::environ_has(p.pid, ID_ENV, id) == Some(true))
        .filter(|p| sys::environ_has(p.pid, OWNER_ENV, &owner) == Some(true))
        .map(|p| p.pid)
        .collect()
}

/// Finding 9: a grandchild that calls `setsid()` leaves the process group but keeps our marker; the stop
/// finds it and stops it with its process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_reaches_a_grandchild_that_called_setsid() {
    let id = "setsid-tree";
    let mut d = def(id, &["bash", "-c", "setsid sleep 1000 & wait"]);
    d.stop_timeout = Duration::from_secs(2);
    let h = Harness::start("setsid", vec![d]);
    let state_dir = h.dir.path().join("state");
    h.sup.start(id).await.unwrap();
    let leader = h.wait_state(id, ProcessState::Running, T).await.pid.unwrap();
    // The sleep: marked, in a session (and group) of its own.
    let mut escaped = 0;
    assert!(
        eventually(T, || {
            escaped = marked(&state_dir, id)
                .into_iter()
                .find(|p| *p != leader && sys::stat(*p).is_some_and(|s| s.session == *p && s.pgrp == *p))
                .unwrap_or(0);
            escaped != 0
        })
        .await,
        "the setsid grandchild started"
    );
    h.guard.track_pid(escaped);
    h.sup.stop(id).await.unwrap();
    h.wait_state(id, ProcessState::Stopped, T).await;
    assert!(
        sys::stat(escaped).is_none_or(|s| s.state == 'Z'),
        "the setsid grandchild {escaped} survived the stop"
    );
    assert!(
        marked(&state_dir, id).is_empty(),
        "marked processes left: {:?}",
        marked(&state_dir, id)
    );
    h.sup.shutdown(true).await;
}

/// Findings 11 and 14, run in a helper process (this binary re-executed) in a process group of its own, so
/// that a supervisor signalling its own group kills only the helper. The helper writes a state file whose
/// adoptable entry lists, besides its process, an unrelated group (the decoy) and the helper's own group;
/// re-adopts; stops; and prints `SURVIVED` if it is still alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helper_entry() {
    let Ok(dir) = std::env::var(HELPER_ENV) else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let decoy: i32 = std::env::var("HARDENING_DECOY").unwrap().parse().unwrap();
    let victim: i32 = std::env::var("HARDENING_VICTIM").unwrap().parse().unwrap();
    let me = std::process::id() as i32;
    let st = sys::stat(victim).unwrap();
    let mut d = def("tamper", &["sleep", "1000.11"]);
    d.restart = RestartPolicy::Never;
    let state = serde_json::json!({
        "version": 1, "supervisor_pid": 1, "saved_at": 0.0,
        "processes": [{
            "transient": false,
            "definition": d,
            "desired": "running", "state": "RUNNING",
            "process": {
                "pid": victim, "pgid": victim, "groups": [victim, decoy, me],
                "start_ticks": st.start_ticks,
                "cmdline": settled_cmdline(victim), "argv": ["sleep", "1000.11"],
            },
            "start_time": 0.0, "restarts": 0, "last_error": null,
        }],
    });
    let state_dir = dir.join("state");
    std::fs::create_dir_all(&state_dir).unwrap();
    std::fs::write(state_dir.join(STATE_FILE), serde_json::to_vec(&state).unwrap()).unwrap();
    let (tx, _rx) = tokio::sync::mpsc::channel(1000);
    let sup = procman::supervisor::Supervisor::spawn(config(&dir), vec![d], tx, None).unwrap();
    // The state machine starts as a task: wait (bounded) for its first transition.
    let mut r = sup.get("tamper").unwrap();
    for _ in 0..3000 {
        if r.state != ProcessState::Stopped {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        r = sup.get("tamper").unwrap();
    }
    println!("ADOPTED {} {:?}", r.adopted, r.state);
    sup.stop("tamper").await.unwrap();
    for _ in 0..3000 {
        if sup.get("tamper").unwrap().state == ProcessState::Stopped {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("SURVIVED {:?}", sup.get("tamper").unwrap().state);
    sup.shutdown(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_state_groups_and_own_group_are_never_signalled() {
    if std::env::var(HELPER_ENV).is_ok() {
        return;
    }
    install_reaper().unwrap();
    let dir = TempDir::new("tamper");
    let guard = KillGuard::default();
    let owner = std::fs::canonicalize(dir.path())
        .unwrap()
        .join("state")
        .display()
        .to_string();
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    // An unrelated process group, and the process the state file says is ours (it carries our marker).
    let decoy = Command::new("sleep")
        .arg("1000.12")
        .process_group(0)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let decoy = decoy.id() as i32;
    guard.track_pid(decoy);
    let victim = Command::new("sleep")
        .arg("1000.11")
        .process_group(0)
        .env(ID_ENV, "tamper")
        .env(OWNER_ENV, &owner)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let victim = victim.id() as i32;
    guard.track_pid(victim);
    let (decoy_s, victim_s) = (decoy.to_string(), victim.to_string());
    let (_helper, rx) = spawn_helper(
        &[
            (HELPER_ENV, dir.path().as_os_str()),
            ("HARDENING_DECOY", decoy_s.as_ref()),
            ("HARDENING_VICTIM", victim_s.as_ref()),
        ],
        true,
        &guard,
    );
    let mut lines = Vec::new();
    let mut survived = false;
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) {
        lines.push(line.clone());
        if line.contains("SURVIVED") {
            survived = true;
            break;
        }
    }
    assert!(
        lines.iter().any(|l| l.contains("ADOPTED true")),
        "the marked process is adopted: {lines:?}"
    );
    assert!(survived, "the supervisor signalled its own process group: {lines:?}");
    assert!(
        lines.iter().any(|l| l.contains("SURVIVED Stopped")),
        "the stop completed: {lines:?}"
    );
    assert!(
        sys::stat(decoy).is_some_and(|s| s.state != 'Z'),
        "the decoy group was signalled"
    );
    assert!(
        eventually(T, || sys::stat(victim).is_none_or(|s| s.state == 'Z')).await,
        "the adopted process was stopped"
    );
    let _ = kill(Pid::from_raw(decoy), Signal::SIGKILL);
}

/// Finding 14 (root cause): a forking launcher that exits 0 leaving nothing marked must not adopt an
/// unrelated, unmarked orphan that happens to have been re-parented to the daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forking_launcher_never_adopts_an_unmarked_orphan() {
    if std::env::var(HELPER_ENV).is_ok() {
        return;
    }
    let dir = TempDir::new("orphan");
    let go = dir.path().join("go");
    let script = format!("while [ ! -e '{}' ]; do sleep 0.01; done; exit 0", go.display());
    let mut d = def("launcher-x", &["sh", "-c", &script]);
    d.forking = true;
    d.restart = RestartPolicy::Never;
    let cfg = config(dir.path());
    let h = Harness::start_with(dir, cfg, vec![d], None);
    h.sup.start("launcher-x").await.unwrap();
    h.wait_state("launcher-x", ProcessState::Starting, T).await;
    // An unmarked orphan of ours, started after the launcher, in a group of its own.
    let parent = Command::new("sh")
        .args(["-c", "sleep 1000.13 >/dev/null & echo $!"])
        .env_remove(ID_ENV)
        .env_remove(OWNER_ENV)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = String::new();
    let mut stdout = parent.stdout.unwrap();
    std::io::Read::read_to_string(&mut stdout, &mut out).unwrap();
    let orphan: i32 = out.trim().parse().unwrap();
    h.guard.track_pid(orphan);
    assert!(
        eventually(T, || sys::stat(orphan)
            .is_some_and(|s| s.ppid == std::process::id() as i32))
        .await,
        "orphan re-parented to us"
    );
    std::fs::write(&go, b"").unwrap();
    let r = h.wait_state("launcher-x", ProcessState::Exited, T).await;
    assert_ne!(r.pid, Some(orphan));
    assert!(
        r.last_error.as_deref().unwrap_or("").contains("left no process"),
        "{:?}",
        r.last_error
    );
    assert!(
        sys::stat(orphan).is_some_and(|s| s.state != 'Z'),
        "the orphan was not touched"
    );
    let _ = kill(Pid::from_raw(orphan), Signal::SIGKILL);
    h.sup.shutdown(true).await;
}

/// Finding 13: a program is never found through an empty (or relative) `PATH` element, which would mean the
/// working directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_path_element_does_not_run_the_working_directory() {
    let work = TempDir::new("path-cwd");
    let evil = work.path().join("procman-evil-prog");
    let proof = work.path().join("ran");
    std::fs::write(&evil, format!("#!/bin/sh\ntouch '{}'\n", proof.display())).unwrap();
    std::fs::set_permissions(&evil, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut d = def("path-evil", &["procman-evil-prog"]);
    d.cwd = Some(work.path().to_owned());
    d.env.insert("PATH".into(), ":.:/usr/bin:/bin".into());
    d.restart = RestartPolicy::Never;
    let h = Harness::start("path", vec![d]);
    h.sup.start("path-evil").await.unwrap();
    let r = h.wait_state("path-evil", ProcessState::Exited, T).await;
    assert!(!proof.exists(), "ran ./procman-evil-prog from the working directory");
    assert!(
        r.last_error.as_deref().unwrap_or("").contains("not found"),
        "{:?}",
        r.last_error
    );
    h.sup.shutdown(true).await;
}

/// Finding 10: symlinks planted at a managed process's log file and at the state file's temporary file are
/// not followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinks_at_log_and_state_files_are_not_followed() {
    let dir = TempDir::new("symlink");
    let outside = TempDir::new("symlink-target");
    let target_log = outside.path().join("victim-log");
    let target_state = outside.path().join("victim-state");
    std::fs::write(&target_log, b"precious\n").unwrap();
    std::fs::write(&target_state, b"precious\n").unwrap();
    let log_dir = dir.path().join("log");
    let state_dir = dir.path().join("state");
    std::fs::create_dir_all(&log_dir).unwrap();
    std::fs::create_dir_all(&state_dir).unwrap();
    std::os::unix::fs::symlink(&target_log, log_dir.join("sym-out.stdout.log")).unwrap();
    std::os::unix::fs::symlink(&target_state, state_dir.join("supervisor.json.tmp")).unwrap();
    let mut d = def("sym-out", &["echo", "written through the link"]);
    d.restart = RestartPolicy::Never;
    let cfg = config(dir.path());
    let h = Harness::start_with(dir, cfg, vec![d], None);
    h.sup.start("sym-out").await.unwrap();
    h.wait_state("sym-out", ProcessState::Exited, T).await;
    // The output reached the reader (tail) and its write to the file was refused (counted as dropped).
    assert!(
        eventually(T, || h.sup.get("sym-out").unwrap().log_dropped_bytes > 0).await,
        "the write through the link was not refused: {:?}",
        std::fs::read_to_string(&target_log)
    );
    assert_eq!(h.sup.log_tail("sym-out", 5).unwrap(), ["written through the link"]);
    h.sup.flush_state().await;
    assert_eq!(std::fs::read(&target_log).unwrap(), b"precious\n");
    assert_eq!(std::fs::read(&target_state).unwrap(), b"precious\n");
    assert!(state_dir.join(STATE_FILE).is_file(), "the state file is still written");
    h.sup.shutdown(true).await;
}

/// Finding 10: the daily housekeeping CSV file is not written through a planted symlink.
#[test]
fn housekeeping_csv_is_not_written_through_a_symlink() {
    let dir = TempDir::new("csv-link");
    let outside = TempDir::new("csv-target");
    let target = outside.path().join("victim");
    std::fs::write(&target, b"precious\n").unwrap();
    let csv = LocalCsv::new(dir.path().to_owned(), "LAB".into(), "PM".into());
    let when = std::time::SystemTime::now();
    let path = daily_file(dir.path(), "LAB", "PM", when);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&target, &path).unwrap();
    let record = HkRecord {
        when,
        fields: vec![("timestamp".into(), HkValue::Str("now".into()))],
    };
    assert!(csv.append(&record).is_err(), "appended through the link");
    assert!(csv.contains(&record).is_err(), "read through the link");
    assert_eq!(std::fs::read(&target).unwrap(), b"precious\n");
    // A real file is still appended to.
    std::fs::remove_file(&path).unwrap();
    csv.append(&record).unwrap();
    assert!(csv.contains(&record).unwrap());
}
