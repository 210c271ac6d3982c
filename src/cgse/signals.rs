//! CGSE file signals: command files a CGSE tool drops in a directory for one process.
//!
//! `cgse core … re-register` (cgse-core's `cgse_core.services`) writes `<dir>/<PROCESS_NAME>_reregister.json`
//! (`egse.signal.create_signal_command_file`: a temporary file renamed into place) with
//! `{"action": "reregister", "params": {"force": <bool>}}`; every CGSE control server polls `<dir>` and acts
//! on its files. So do we: [`SignalWatcher`] polls `<dir>` for `<PROCESS_NAME>_*.json` off the request
//! path, asks the registration to re-register (forced when asked), and removes each file it read.
//!
//! The directory is `/tmp/cgse_signals` in CGSE (a constant there, no setting or variable); ours is the
//! `Procman.SIGNAL_DIR` setting with that default, so parallel test runs do not collide. Unlike the
//! original, a file that is not a valid command is logged and removed (the original logs it every 0.1 s
//! and leaves it); nothing a file holds can stop the daemon.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value as Json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::daemon::{HookFuture, Lifecycle};
use crate::server::Ports;

/// The original's signal directory (`egse.signal.DEFAULT_SIGNAL_DIR`).
pub const DEFAULT_SIGNAL_DIR: &str = "/tmp/cgse_signals";
/// Larger files are not commands.
const MAX_FILE_BYTES: u64 = 64 * 1024;
/// How often the directory is read (the original: every 0.1 s).
pub const POLL: Duration = Duration::from_millis(200);

/// What a signal can ask of us.
pub trait SignalTarget: Send + Sync {
    /// `reregister`: re-register with the Service Registry (deregistering first when `force`).
    fn reregister(&self, force: bool);
}

impl SignalTarget for super::registry::Registration {
    fn reregister(&self, force: bool) {
        super::registry::Registration::reregister(self, force);
    }
}

/// One command read from a file.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// `reregister`: register with the Service Registry again.
    Reregister {
        /// `params.force`: deregister first, even when the registry still has our record.
        force: bool,
    },
    /// A valid command with an action we do not handle (the original's `reload` only logs too).
    Other(String),
}

/// Why a command file was not acted on (it is removed all the same, and the reason logged).
#[derive(Debug, thiserror::Error)]
pub enum SignalFileError {
    /// A directory, a symlink, a device: not something we read.
    #[error("not a regular file")]
    NotAFile,
    /// Larger than any command.
    #[error("{0} bytes, more than a command")]
    TooLarge(u64),
    /// Reading failed.
    #[error("cannot read: {0}")]
    Read(#[from] std::io::Error),
    /// Not JSON.
    #[error("not JSON: {0}")]
    NotJson(#[from] serde_json::Error),
    /// JSON without an `"action"` string.
    #[error("no \"action\" string")]
    NoAction,
    /// `"params"` present but not an object.
    #[error("\"params\" is not an object")]
    ParamsNotAnObject,
    /// A parameter of the wrong type or one the action does not take.
    #[error("{0}")]
    BadParameter(String),
}

impl PartialEq for SignalFileError {
    fn eq(&self, other: &Self) -> bool {
        self.to_string() == other.to_string()
    }
}

/// Parse one command file's content.
pub fn parse(text: &str) -> Result<Command, SignalFileError> {
    let v: Json = serde_json::from_str(text)?;
    let action = v
        .get("action")
        .and_then(Json::as_str)
        .ok_or(SignalFileError::NoAction)?;
    let params = match v.get("params") {
        None | Some(Json::Null) => serde_json::Map::new(),
        Some(Json::Object(m)) => m.clone(),
        Some(_) => return Err(SignalFileError::ParamsNotAnObject),
    };
    match action {
        "reregister" => {
            let force = match params.get("force") {
                None => false,
                Some(Json::Bool(b)) => *b,
                Some(other) => {
                    return Err(SignalFileError::BadParameter(format!(
                        "\"force\" is not a boolean: {other}"
                    )))
                }
            };
            if let Some(k) = params.keys().find(|k| *k != "force") {
                return Err(SignalFileError::BadParameter(format!(
                    "unexpected parameter {k:?} for reregister"
                )));
            }
            Ok(Command::Reregister { force })
        }
        other => Ok(Command::Other(other.to_owned())),
    }
}

/// Read, act on and remove this process's command files in `dir`; returns the commands acted on.
pub fn scan(dir: &Path, process_name: &str, target: &dyn SignalTarget) -> Vec<Command> {
    let prefix = format!("{process_name}_");
    let mut names: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".json"))
            })
            .collect(),
        Err(_) => return Vec::new(),
    };
    names.sort();
    let mut done = Vec::new();
    for path in names {
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(_) => continue,
        };
        let outcome = if !meta.is_file() {
            Err(SignalFileError::NotAFile)
        } else if meta.len() > MAX_FILE_BYTES {
            Err(SignalFileError::TooLarge(meta.len()))
        } else {
            std::fs::read_to_string(&path)
                .map_err(SignalFileError::from)
                .and_then(|t| parse(&t))
        };
        if let Err(e) = std::fs::remove_file(&path) {
            warn!(file = %path.display(), error = %e, "cannot remove a signal file");
        }
        match outcome {
            Ok(Command::Reregister { force }) => {
                info!(file = %path.display(), force, "signal: re-register with the Service Registry");
                target.reregister(force);
                done.push(Command::Reregister { force });
            }
            Ok(Command::Other(action)) => {
                warn!(file = %path.display(), action = %action, "signal: no handler for this action; ignored");
                done.push(Command::Other(action));
            }
            Err(e) => warn!(file = %path.display(), error = %e, "signal file is not a valid command; removed"),
        }
    }
    done
}

/// Polls the signal directory while the daemon runs (a [`Lifecycle`] hook).
pub struct SignalWatcher {
    dir: PathBuf,
    process_name: String,
    target: Arc<dyn SignalTarget>,
    cancel: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl SignalWatcher {
    /// Watches `dir` for `<process_name>_*.json` command files and hands their commands to `target`.
    pub fn new(dir: PathBuf, process_name: String, target: Arc<dyn SignalTarget>) -> SignalWatcher {
        SignalWatcher {
            dir,
            process_name,
            target,
            cancel: CancellationToken::new(),
            task: Mutex::new(None),
        }
    }
}

impl Lifecycle for SignalWatcher {
    fn started(&self, _ports: Ports) -> HookFuture<'_> {
        if let Err(e) = std::fs::create_dir_all(&self.dir) {
            warn!(dir = %self.dir.display(), error = %e, "cannot create the signal directory; watching it anyway");
        }
        info!(dir = %self.dir.display(), files = %format!("{}_*.json", self.process_name), "watching for CGSE signal files");
        let (dir, name, target, cancel) = (
            self.dir.clone(),
            self.process_name.clone(),
            self.target.clone(),
            self.cancel.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let (d, n, t) = (dir.clone(), name.clone(), target.clone());
                // File system work off the runtime threads.
                let _ = tokio::task::spawn_blocking(move || scan(&d, &n, t.as_ref())).await;
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(POLL) => {}
                }
            }
        });
        if let Ok(mut t) = self.task.lock() {
            *t = Some(task);
        }
        Box::pin(async {})
    }

    fn stopping(&self) -> HookFuture<'_> {
        self.cancel.cancel();
        Box::pin(async {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Seen(Mutex<Vec<bool>>);
    impl SignalTarget for Seen {
        fn reregister(&self, force: bool) {
            self.0.lock().unwrap().push(force);
        }
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("procman-signals-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn parses_what_cgse_writes() {
        // json.dump(command, fd, indent=2) of {"action": "reregister", "params": {"force": force}}
        let text = "{\n  \"action\": \"reregister\",\n  \"params\": {\n    \"force\": true\n  }\n}";
        assert_eq!(parse(text), Ok(Command::Reregister { force: true }));
        assert_eq!(
            parse(r#"{"action": "reregister"}"#),
            Ok(Command::Reregister { force: false })
        );
        assert_eq!(
            parse(r#"{"action": "reload", "params": {}}"#),
            Ok(Command::Other("reload".into()))
        );
        assert!(parse("{'action': 'reregister'}").is_err());
        assert!(parse(r#"{"action": "reregister", "params": {"force": "yes"}}"#).is_err());
        assert!(parse(r#"{"action": "reregister", "params": {"bogus": 1}}"#).is_err());
        assert!(parse(r#"[1, 2]"#).is_err());
    }

    #[test]
    fn acts_on_own_files_removes_bad_ones_and_leaves_others() {
        let dir = tempdir("scan");
        std::fs::write(
            dir.join("pm_cs_reregister.json"),
            r#"{"action": "reregister", "params": {"force": true}}"#,
        )
        .unwrap();
        std::fs::write(dir.join("pm_cs_garbage.json"), "not json").unwrap();
        std::fs::write(dir.join("cm_cs_reregister.json"), r#"{"action": "reregister"}"#).unwrap();
        std::fs::write(dir.join("pm_cs_pending.tmp"), "{").unwrap();
        let seen = Seen::default();
        let done = scan(&dir, "pm_cs", &seen);
        assert_eq!(done, vec![Command::Reregister { force: true }]);
        assert_eq!(*seen.0.lock().unwrap(), vec![true]);
        assert!(!dir.join("pm_cs_reregister.json").exists());
        assert!(!dir.join("pm_cs_garbage.json").exists());
        assert!(
            dir.join("cm_cs_reregister.json").exists(),
            "another process's file stays"
        );
        assert!(dir.join("pm_cs_pending.tmp").exists(), "a file being written stays");
        assert!(scan(&dir, "pm_cs", &seen).is_empty());
        std::fs::remove_dir_all(dir).ok();
    }

    #[tokio::test]
    async fn the_watcher_polls_until_stopped() {
        let dir = tempdir("watch");
        let seen = Arc::new(Seen::default());
        let w = SignalWatcher::new(dir.clone(), "pm_cs".into(), seen.clone());
        w.started(Ports::default()).await;
        std::fs::write(
            dir.join("pm_cs_reregister.json"),
            r#"{"action": "reregister", "params": {"force": false}}"#,
        )
        .unwrap();
        let s = seen.clone();
        crate::cgse::testing::wait_until(Duration::from_secs(10), move || !s.0.lock().unwrap().is_empty()).await;
        assert_eq!(*seen.0.lock().unwrap(), vec![false]);
        w.stopping().await;
        std::fs::remove_dir_all(dir).ok();
    }
}
