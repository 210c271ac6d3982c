//! What the supervisor reports: states, status records, events and reload plans (all serde-serializable).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::definition::{PingTarget, ProcessDefinition, RestartPolicy};

/// Life-cycle state of one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ProcessState {
    /// Not running, by request (or never started).
    Stopped,
    /// Spawned, waiting for readiness (or for a forking launcher to hand over).
    Starting,
    /// Running (and ready, if a readiness check is configured).
    Running,
    /// Exited unexpectedly; a restart is scheduled.
    Backoff,
    /// Stop signal sent; waiting for the whole process group to go.
    Stopping,
    /// Exited and not restarted (policy), or found dead after a supervisor restart.
    Exited,
    /// Crash loop: no more restarts until an operator starts it.
    Fatal,
}

impl ProcessState {
    /// The upper-case name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ProcessState::Stopped => "STOPPED",
            ProcessState::Starting => "STARTING",
            ProcessState::Running => "RUNNING",
            ProcessState::Backoff => "BACKOFF",
            ProcessState::Stopping => "STOPPING",
            ProcessState::Exited => "EXITED",
            ProcessState::Fatal => "FATAL",
        }
    }

    /// Whether a process (group) of ours may be alive in this state.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            ProcessState::Starting | ProcessState::Running | ProcessState::Stopping
        )
    }
}

impl fmt::Display for ProcessState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the operator last asked for; persisted so a restarted supervisor keeps the intent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    /// Keep it running.
    Running,
    /// Leave it stopped.
    Stopped,
}

/// The policies of a definition, as shown in a status record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DefinitionSummary {
    /// Restart policy.
    pub restart: RestartPolicy,
    /// Legacy self-daemonizing launcher.
    pub forking: bool,
    /// Simulator mode requested.
    pub simulator: bool,
    /// Started with the supervisor.
    pub autostart: bool,
    /// Stop signal name.
    pub stop_signal: String,
    /// Seconds before SIGKILL.
    pub stop_timeout_s: f64,
    /// `ping <endpoint>` or `registry <service type>`, when a readiness check is configured.
    pub readiness: Option<String>,
    /// Registry service type (core services).
    pub service_type: Option<String>,
    /// Whether the supervisor's environment is inherited.
    pub inherit_env: bool,
}

impl DefinitionSummary {
    pub(crate) fn of(def: &ProcessDefinition) -> Self {
        DefinitionSummary {
            restart: def.restart,
            forking: def.forking,
            simulator: def.simulator,
            autostart: def.autostart,
            stop_signal: def.stop_signal.as_str().to_owned(),
            stop_timeout_s: def.stop_timeout.as_secs_f64(),
            readiness: def.readiness.as_ref().map(|r| match &r.ping {
                PingTarget::Endpoint(e) => format!("ping {e}"),
                PingTarget::Registry { service_type } => format!("registry {service_type}"),
                PingTarget::Tcp { host, port } => format!("tcp {host}:{port}"),
            }),
            service_type: def.service_type.clone(),
            inherit_env: def.inherit_env,
        }
    }
}

/// Status of one process (a snapshot).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessRecord {
    /// Process id (device id or core-service name).
    pub id: String,
    /// Current state.
    pub state: ProcessState,
    /// Pid of the running process.
    pub pid: Option<i32>,
    /// Its process group.
    pub pgid: Option<i32>,
    /// UNIX time (s) of the current or last start.
    pub start_time: Option<f64>,
    /// Seconds since `start_time` while running or starting.
    pub uptime_s: Option<f64>,
    /// Exit code of the last exit (None if killed by a signal or unknown).
    pub exit_code: Option<i32>,
    /// Signal number that ended the last run.
    pub exit_signal: Option<i32>,
    /// Automatic restarts so far.
    pub restarts: u32,
    /// Why the last run failed, or why the process is FATAL.
    pub last_error: Option<String>,
    /// The argv executed.
    pub argv: Vec<String>,
    /// Working directory.
    pub cwd: Option<PathBuf>,
    /// The explicit environment set for the child.
    pub env: BTreeMap<String, String>,
    /// Result of the last readiness probe (None: no probe ran).
    pub ready: Option<bool>,
    /// The stdout log file.
    pub stdout_log: PathBuf,
    /// The stderr log file.
    pub stderr_log: PathBuf,
    /// Bytes of output dropped because the log file could not keep up or failed.
    pub log_dropped_bytes: u64,
    /// Re-adopted after a supervisor restart (exit codes of such processes are unknown).
    pub adopted: bool,
    /// Operator intent.
    pub desired: Desired,
    /// Policies of the definition.
    pub definition: DefinitionSummary,
}

/// Kind of a [`ProcessEvent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// A state change (or, with `old_state == new_state`, a new pid after a forking hand-over).
    State,
    /// The definition was removed; the process is stopped and no longer listed.
    Removed,
}

/// One state change, sent on the supervisor's event channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessEvent {
    /// Monotonic per supervisor, from 1. A gap means events were dropped (full channel).
    pub seq: u64,
    /// Event kind.
    pub kind: EventKind,
    /// Process id.
    pub id: String,
    /// State before.
    pub old_state: ProcessState,
    /// State after.
    pub new_state: ProcessState,
    /// The pid concerned (the exited one for exits).
    pub pid: Option<i32>,
    /// Exit code, for exits.
    pub exit_code: Option<i32>,
    /// Signal number, for exits by signal.
    pub exit_signal: Option<i32>,
    /// UNIX time (s).
    pub time: f64,
}

/// Outcome of [`apply`](super::SupervisorHandle::apply): ids by what happens to them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// New definitions (started if `autostart`).
    pub added: Vec<String>,
    /// Definitions gone (stopped, then forgotten).
    pub removed: Vec<String>,
    /// Definitions that differ (restarted if running).
    pub changed: Vec<String>,
    /// Identical definitions (untouched).
    pub unchanged: Vec<String>,
}

/// Outcome of [`define`](super::SupervisorHandle::define) for one definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    /// It was new.
    Added,
    /// It replaced a different one (restarted if running).
    Changed,
    /// It was identical.
    Unchanged,
}

/// Current UNIX time in seconds.
pub(crate) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
