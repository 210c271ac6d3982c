//! Short-lived helper programs of the daemon (e.g. listing the configured Python's entry points).
//!
//! A helper is spawned through the reaper (nothing else may wait for children), in a process group of its
//! own, from `/`, with stdin from `/dev/null` and stderr discarded; its stdout is read (bounded) on the
//! blocking pool. One that outlives its timeout is SIGKILLed with its group — a group it created, never ours.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::mpsc;

use super::definition::resolve_program_in;
use super::error::SupervisorError;
use super::{reaper, sys};

/// Most bytes of a helper's output that are kept.
const MAX_OUTPUT: u64 = 1024 * 1024;

/// Runs `argv` to completion (at most `timeout`) and returns its stdout when it exits 0.
///
/// # Errors
/// [`SupervisorError::Helper`] when it cannot be started, times out, or exits otherwise.
pub async fn run_helper(argv: &[String], timeout: Duration) -> Result<Vec<u8>, SupervisorError> {
    let program_name = argv.first().cloned().unwrap_or_default();
    let fail = |message: String| SupervisorError::Helper {
        program: program_name.clone(),
        message,
    };
    let Some((program, args)) = argv.split_first() else {
        return Err(fail("empty argv".into()));
    };
    let path = std::env::var("PATH").ok();
    let program = resolve_program_in(program, path.as_deref()).map_err(|e| fail(e.to_string()))?;
    let reaper = reaper::global()?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut cmd = Command::new(&program);
    cmd.args(args)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0);
    let (pid, mut child) = reaper.spawn_child(&mut cmd, tx).map_err(|e| fail(e.to_string()))?;
    let stdout = child.stdout.take();
    drop(child);
    let reader = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        if let Some(s) = stdout {
            let _ = s.take(MAX_OUTPUT).read_to_end(&mut out);
        }
        out
    });
    let done = async {
        let out = reader.await.unwrap_or_default();
        (out, rx.recv().await)
    };
    match tokio::time::timeout(timeout, done).await {
        Ok((out, Some(exit))) if exit.code == Some(0) => Ok(out),
        Ok((_, exit)) => Err(fail(format!("ended with {exit:?}"))),
        Err(_) => {
            // Its own group (process_group(0) above), so never one the daemon belongs to.
            let _ = sys::signal_group(pid, Signal::SIGKILL);
            Err(fail(format!("no answer within {timeout:?}; killed")))
        }
    }
}

/// Lists the `cgse` entry points of `python`'s environment: `(device launchers, other cgse commands)` — the
/// names of the `cgse.service.device_command` group (what `cgse` dispatches a device sub-command to and
/// what the PM GUI derives its `cgse_cmd` from), and the names of every other `cgse.command` /
/// `cgse.service.*` group (refused as launchers even if a device package reuses one).
///
/// # Errors
/// [`SupervisorError::Helper`] when the interpreter cannot be run or answers garbage.
pub async fn cgse_entry_points(python: &str, timeout: Duration) -> Result<(Vec<String>, Vec<String>), SupervisorError> {
    const SCRIPT: &str = r#"
import json
import importlib.metadata as m
eps = m.entry_points()
def names(group):
    return sorted({e.name for e in eps.select(group=group)})
groups = sorted(eps.groups)
device = names("cgse.service.device_command")
other = sorted({n for g in groups
                if g == "cgse.command" or (g.startswith("cgse.service") and g != "cgse.service.device_command")
                for n in names(g)})
print(json.dumps({"device_command": device, "other": other}))
"#;
    let argv = [python.to_owned(), "-c".to_owned(), SCRIPT.to_owned()];
    let out = run_helper(&argv, timeout).await?;
    #[derive(serde::Deserialize)]
    struct Listing {
        device_command: Vec<String>,
        other: Vec<String>,
    }
    let listing: Listing = serde_json::from_slice(&out).map_err(|e| SupervisorError::Helper {
        program: python.to_owned(),
        message: format!("unreadable entry-point listing: {e}"),
    })?;
    Ok((listing.device_command, listing.other))
}
