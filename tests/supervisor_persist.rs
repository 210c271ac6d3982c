//! Surviving a supervisor restart: re-adoption by pid + start time + command line, never a reused pid.
//!
//! Supervisor A runs in a helper process (this test binary re-executed with `PERSIST_HELPER_DIR` set and
//! filtered to `helper_entry`), so it can be SIGKILLed like a crashed daemon.

mod supervisor_util;

use std::process::{Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use procman::supervisor::{install_reaper, sys, ProcessDefinition, ProcessState, RestartPolicy, STATE_FILE};
use supervisor_util::{config, count_our_children_running, def, eventually, spawn_helper, Harness, KillGuard, TempDir};

const T: Duration = Duration::from_secs(10);
const HELPER_ENV: &str = "PERSIST_HELPER_DIR";
const MODE_ENV: &str = "PERSIST_HELPER_MODE";

/// Three sleeps with command lines unique to `tag`.
fn three(tag: &str) -> Vec<ProcessDefinition> {
    (0..3)
        .map(|i| {
            let mut d = def(
                &format!("{tag}-{i}"),
                &["sleep", &format!("1000.{tag_num}{i}", tag_num = tag.len())],
            );
            d.autostart = true;
            d.restart = RestartPolicy::Always;
            d
        })
        .collect()
}

/// Runs supervisor A when this binary is started as the helper; a no-op in a normal test run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helper_entry() {
    let Ok(dir) = std::env::var(HELPER_ENV) else {
        return;
    };
    let tag = std::env::var(MODE_ENV).unwrap_or_default();
    let dir = std::path::PathBuf::from(dir);
    let (tx, _rx) = tokio::sync::mpsc::channel(1000);
    let sup = procman::supervisor::Supervisor::spawn(config(&dir), three(&tag), tx, None).unwrap();
    let mut pids = Vec::new();
    for i in 0..3 {
        let id = format!("{tag}-{i}");
        for _ in 0..2000 {
            let r = sup.get(&id).unwrap();
            if r.state == ProcessState::Running {
                pids.push(r.pid.unwrap());
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    if tag == "detach" {
        // Shut down without stopping the children: they stay children of this (still living) process.
        sup.shutdown(false).await;
    } else {
        sup.flush_state().await;
    }
    println!(
        "READY {}",
        pids.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(" ")
    );
    // Bounded: the test kills us long before this.
    tokio::time::sleep(Duration::from_secs(60)).await;
}

/// Starts the helper and returns its pid and the pids of its three children.
fn run_helper(dir: &std::path::Path, tag: &str, guard: &KillGuard) -> (i32, Vec<i32>) {
    let (helper, lines) = spawn_helper(&[(HELPER_ENV, dir.as_os_str()), (MODE_ENV, tag.as_ref())], false, guard);
    // libtest prints `test helper_entry ... ` on the same line as READY.
    let (tx, rx) = std_mpsc::channel();
    std::thread::spawn(move || {
        for line in lines {
            if let Some((_, rest)) = line.split_once("READY ") {
                let _ = tx.send(
                    rest.split_whitespace()
                        .filter_map(|p| p.parse::<i32>().ok())
                        .collect::<Vec<_>>(),
                );
            }
        }
    });
    let pids = rx.recv_timeout(Duration::from_secs(30)).expect("helper ready");
    assert_eq!(pids.len(), 3);
    for p in &pids {
        guard.track_pid(*p);
    }
    (helper, pids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readopts_after_supervisor_is_killed() {
    if std::env::var(HELPER_ENV).is_ok() {
        return;
    }
    // Orphans of the killed helper must come to us (not to PID 1, which may never reap them).
    install_reaper().unwrap();
    let dir = TempDir::new("readopt");
    let guard = KillGuard::default();
    let tag = "kill";
    for d in three(tag) {
        guard.track_id(&d.id);
    }
    let (helper, pids) = run_helper(dir.path(), tag, &guard);
    guard.track_owner(&dir.path().join("state"));
    kill(Pid::from_raw(helper), Signal::SIGKILL).unwrap();
    assert!(eventually(T, || sys::stat(helper).is_none()).await, "helper gone");
    for p in &pids {
        assert!(sys::stat(*p).is_some(), "child {p} survived the supervisor");
    }

    // Supervisor B, same state directory and definitions (autostart!): adopts, starts nothing new.
    let h = Harness::start_with(TempDir::new("readopt-b"), config(dir.path()), three(tag), None);
    for (i, p) in pids.iter().enumerate() {
        let r = h.wait_state(&format!("{tag}-{i}"), ProcessState::Running, T).await;
        assert_eq!(r.pid, Some(*p));
        assert!(r.adopted);
        assert_eq!(sys::stat(*p).unwrap().ppid, std::process::id() as i32);
    }
    // Each record decides once, in its start-up, between adopting and spawning: adopted means nothing was
    // (or will be) spawned for it. No STARTING event, and one process per command line.
    assert!(
        h.events_of(tag).iter().all(|e| e.new_state != ProcessState::Starting),
        "{:?}",
        h.events_of(tag)
    );
    for i in 0..3 {
        let argv = format!("1000.{}{i}", tag.len());
        assert_eq!(
            count_our_children_running(&["sleep", &argv]),
            1,
            "no duplicate of {tag}-{i}"
        );
    }
    // An adopted child (re-parented to us) is watched by the reaper: its crash is seen, with the signal.
    kill(Pid::from_raw(pids[0]), Signal::SIGKILL).unwrap();
    let ev = h
        .wait_event(T, |e| e.id == "kill-0" && e.new_state == ProcessState::Backoff)
        .await;
    assert_eq!((ev.pid, ev.exit_signal), (Some(pids[0]), Some(9)));
    h.wait_event(T, |e| {
        e.id == "kill-0" && e.new_state == ProcessState::Running && e.pid != Some(pids[0])
    })
    .await;
    // Adopted processes stop like our own: group signalled, STOPPED when empty.
    h.sup.shutdown(true).await;
    for p in &pids {
        assert!(sys::stat(*p).is_none(), "{p} stopped");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readopts_non_children_through_pidfd() {
    if std::env::var(HELPER_ENV).is_ok() {
        return;
    }
    let dir = TempDir::new("pidfd");
    let guard = KillGuard::default();
    let tag = "detach";
    for d in three(tag) {
        guard.track_id(&d.id);
    }
    // The helper's supervisor shuts down without stopping; the helper stays alive as their parent.
    let (helper, pids) = run_helper(dir.path(), tag, &guard);
    guard.track_owner(&dir.path().join("state"));
    let h = Harness::start_with(TempDir::new("pidfd-b"), config(dir.path()), three(tag), None);
    for (i, p) in pids.iter().enumerate() {
        let r = h.wait_state(&format!("{tag}-{i}"), ProcessState::Running, T).await;
        assert_eq!(r.pid, Some(*p));
        assert_eq!(sys::stat(*p).unwrap().ppid, helper, "not our child");
    }
    // Killed behind our back: the pidfd reports the exit, status unknown; the policy restarts it.
    kill(Pid::from_raw(pids[1]), Signal::SIGKILL).unwrap();
    let ev = h
        .wait_event(T, |e| e.id == "detach-1" && e.new_state == ProcessState::Backoff)
        .await;
    assert_eq!((ev.pid, ev.exit_code, ev.exit_signal), (Some(pids[1]), None, None));
    let r = h.sup.get("detach-1").unwrap();
    assert!(r.last_error.unwrap().contains("exit status unknown"));
    // Stop of a non-child: STOPPED once its group is empty (the helper reaps it).
    h.sup.stop("detach-2").await.unwrap();
    h.wait_state("detach-2", ProcessState::Stopped, T).await;
    assert!(sys::stat(pids[2]).is_none() || sys::stat(pids[2]).is_some_and(|s| s.state == 'Z'));
    h.sup.shutdown(true).await;
    let _ = kill(Pid::from_raw(helper), Signal::SIGKILL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_pid_is_never_adopted() {
    if std::env::var(HELPER_ENV).is_ok() {
        return;
    }
    install_reaper().unwrap();
    let dir = TempDir::new("reuse");
    let guard = KillGuard::default();
    // A live process the state file will wrongly claim.
    let stranger = Command::new("sleep")
        .arg("1000.77")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let pid = stranger.id() as i32;
    drop(stranger);
    guard.track_pid(pid);
    let real = sys::stat(pid).unwrap();

    let mut d = def("reuse-a", &["sleep", "1000.77"]);
    d.restart = RestartPolicy::Never;
    let mut d2 = def("reuse-b", &["sleep", "1000.77"]);
    d2.restart = RestartPolicy::Never;
    guard.track_id("reuse-a");
    guard.track_id("reuse-b");
    let state = serde_json::json!({
        "version": 1, "supervisor_pid": 1, "saved_at": 0.0,
        "processes": [
            {   // Same pid and command line, different start time: a reused pid.
                "definition": serde_json::to_value(&d).unwrap(), "desired": "running", "state": "RUNNING",
                "process": {"pid": pid, "pgid": pid, "groups": [pid], "start_ticks": real.start_ticks + 1,
                            "cmdline": ["sleep", "1000.77"], "argv": ["sleep", "1000.77"]},
                "start_time": 1.0, "restarts": 0, "last_error": null
            },
            {   // Same pid and start time, different command line.
                "definition": serde_json::to_value(&d2).unwrap(), "desired": "running", "state": "RUNNING",
                "process": {"pid": pid, "pgid": pid, "groups": [pid], "start_ticks": real.start_ticks,
                            "cmdline": ["sleep", "9"], "argv": ["sleep", "9"]},
                "start_time": 1.0, "restarts": 0, "last_error": null
            }
        ]
    });
    let cfg = config(dir.path());
    std::fs::create_dir_all(&cfg.state_dir).unwrap();
    std::fs::write(cfg.state_dir.join(STATE_FILE), serde_json::to_vec(&state).unwrap()).unwrap();

    let h = Harness::start_with(TempDir::new("reuse-b"), cfg, vec![d, d2], None);
    for id in ["reuse-a", "reuse-b"] {
        let r = h.wait_state(id, ProcessState::Exited, T).await;
        assert_eq!(r.pid, None);
        assert!(!r.adopted);
        assert!(r.last_error.unwrap().contains("not adopted"));
    }
    h.sup.shutdown(true).await;
    // Never signalled: still alive with its own start time.
    let now = sys::stat(pid).unwrap();
    assert_eq!((now.start_ticks, now.state == 'Z'), (real.start_ticks, false));
    guard.kill_all();
}

/// A supervised `sh` that waits for a flag file, then `exec`s `sleep <arg>`: (the harness, the flag, the pid).
async fn wrapper_that_execs(tag: &str, arg: &str) -> (Harness, std::path::PathBuf, i32) {
    let dir = TempDir::new(tag);
    let flag = dir.path().join("go");
    // The child waits for the test's flag file (its own short polling), then becomes `sleep <arg>`.
    let script = format!(r#"while [ ! -e "$0" ]; do sleep 0.01; done; exec sleep {arg}"#);
    let mut d = def("wrapped", &["sh", "-c", &script, flag.to_str().unwrap()]);
    d.autostart = true;
    let cfg = config(dir.path());
    let h = Harness::start_with(dir, cfg, vec![d], None);
    let pid = h.wait_state("wrapped", ProcessState::Running, T).await.pid.unwrap();
    (h, flag, pid)
}

/// The command line of the first process in the state file, if the file reads.
fn saved_cmdline(h: &Harness) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(h.dir.path().join("state").join(STATE_FILE)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(v["processes"][0]["process"]["cmdline"].clone())
}

/// A wrapper that `exec`s its real program once it is RUNNING: the next save writes the command line it
/// ends with (what a restarted supervisor compares), not the one read at the spawn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_after_a_wrapper_execs_holds_its_new_command_line() {
    let (h, flag, pid) = wrapper_that_execs("persist-wrapper", "1000.93").await;
    h.sup.flush_state().await;
    assert_eq!(saved_cmdline(&h).unwrap()[0], "sh", "{:?}", saved_cmdline(&h));
    std::fs::write(&flag, b"").unwrap();
    let execd = eventually(T, || sys::cmdline(pid).is_ok_and(|c| c == ["sleep", "1000.93"])).await;
    assert!(execd, "the wrapper never exec'd: {:?}", sys::cmdline(pid));
    h.sup.flush_state().await;
    assert_eq!(saved_cmdline(&h), Some(serde_json::json!(["sleep", "1000.93"])));
    h.sup.shutdown(true).await;
    h.guard.kill_all();
}

/// A wrapper that `exec`s soon after its spawn: its state machine reads the command line again, and the
/// state file gets the new one without anyone asking for a flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrapper_exec_reaches_the_state_file_without_a_flush() {
    let (h, flag, pid) = wrapper_that_execs("persist-exec", "1000.94").await;
    let spawned = std::time::Instant::now();
    std::fs::write(&flag, b"").unwrap();
    let execd = eventually(T, || sys::cmdline(pid).is_ok_and(|c| c == ["sleep", "1000.94"])).await;
    assert!(execd, "the wrapper never exec'd: {:?}", sys::cmdline(pid));
    // The last re-reading is 2 s after the spawn: an exec after it is only seen by a flush.
    if spawned.elapsed() < Duration::from_millis(1500) {
        let new = Some(serde_json::json!(["sleep", "1000.94"]));
        assert!(
            eventually(T, || saved_cmdline(&h) == new).await,
            "state file still holds {:?}",
            saved_cmdline(&h)
        );
    } else {
        println!(
            "the exec came {:?} after RUNNING, later than the re-readings; not judged",
            spawned.elapsed()
        );
    }
    h.sup.shutdown(true).await;
    h.guard.kill_all();
}
