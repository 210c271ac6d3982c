//! Process definitions and the process table (`settings/procman.yaml`, documented in `docs/PROCESSES.md`).
//!
//! A [`ProcessDefinition`] is what the supervisor runs: an argv (never a shell string), its environment and its
//! policies. The [`ProcessTable`] is the operator's file; it holds layered, partial entries (`defaults` <
//! `device_classes` < `devices`) with templates, and resolves them into definitions with pure functions. Client
//! input (`StartCommand.cgse_cmd`) only ever reaches [`validate_cgse_cmd`], which refuses anything a shell would
//! interpret and any program that is not on the allow-list.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::error::{CommandError, DefinitionError};

/// Interpreter substituted for `{python}` when the table does not say otherwise.
pub const DEFAULT_PYTHON: &str = "python3";

/// The environment variable every child gets, naming its process id. Forking launchers pass it on to the
/// daemon they spawn, which lets the supervisor tell whose orphan a re-parented process is.
pub const ID_ENV: &str = "PROCMAN_ID";

/// The environment variable every child gets, naming the supervisor that owns it (its state directory). The
/// `/proc` scans (stop, forking launchers, re-adoption) only touch processes carrying both variables.
pub const OWNER_ENV: &str = "PROCMAN_SUPERVISOR";

/// `cgse` sub-commands a client may never name, whatever the entry points say: the core services, the
/// registry, administration and the CLI's own commands. Only device launchers may be run for a client.
pub const NEVER_LAUNCHERS: &[&str] = &[
    "core", "reg", "log", "nh", "cm", "sm", "pm", "mh", "admin", "init", "show", "top", "check", "clock", "version",
    "explore", "dev-x",
];

/// Longest client-supplied device id or argument.
pub const MAX_CLIENT_TOKEN: usize = 128;

/// Most `device_args` a client may send.
pub const MAX_CLIENT_ARGS: usize = 32;

/// The device launchers a client's `cgse_cmd` may name: `<program> <sub-command>`, where the sub-command is a
/// registered `cgse.service.device_command` entry point of the configured Python (what the PM GUI derives
/// its `cgse_cmd` from) or listed in the table's `device_commands`, and never one of [`NEVER_LAUNCHERS`] or
/// a name another `cgse` command group registers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Launchers {
    /// Permitted sub-commands.
    pub permitted: std::collections::BTreeSet<String>,
    /// Where they came from, for error messages.
    pub source: String,
    /// The `PATH` the launcher program is resolved with; `None`: the daemon's.
    pub search_path: Option<String>,
}

impl Launchers {
    /// The table's explicit list plus the entry points (`device`), minus every name in `other` (the
    /// entry points of the other `cgse` command groups) and in [`NEVER_LAUNCHERS`].
    pub fn new(table: &[String], device: &[String], other: &[String], source: String) -> Launchers {
        let permitted = table
            .iter()
            .chain(device)
            .filter(|n| is_plain_token(n) && !NEVER_LAUNCHERS.contains(&n.as_str()) && !other.contains(n))
            .cloned()
            .collect();
        Launchers {
            permitted,
            source,
            search_path: None,
        }
    }
}

fn is_plain_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_CLIENT_TOKEN
        && !s.starts_with('-')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '@' | '+' | ','))
}

/// Validates one client-supplied device argument: at most [`MAX_CLIENT_TOKEN`] characters of
/// `A-Z a-z 0-9 _ - . : @ + ,`, not starting with `-` (no option injection into a launcher).
///
/// # Errors
/// [`CommandError::BadArgument`] naming the argument.
pub fn validate_client_arg(arg: &str) -> Result<(), CommandError> {
    if is_plain_token(arg) {
        Ok(())
    } else {
        Err(CommandError::BadArgument {
            argument: arg.chars().take(MAX_CLIENT_TOKEN + 8).collect(),
        })
    }
}

/// Validates a device id a client wants a new definition for: the same rule as [`validate_client_arg`].
///
/// # Errors
/// [`CommandError::BadArgument`].
pub fn validate_client_id(id: &str) -> Result<(), CommandError> {
    validate_client_arg(id)
}

/// Resolves a bare program name to an absolute path through `path` (a `PATH` value), skipping empty and
/// relative elements (an empty element would mean the daemon's working directory). A name with a `/` is
/// returned as it is. `None` for `path` searches `/usr/local/bin:/usr/bin:/bin`.
///
/// # Errors
/// A message naming the program and the directories searched.
pub fn resolve_program_in(program: &str, path: Option<&str>) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    if program.is_empty() {
        return Err("empty program name".into());
    }
    let path = path.unwrap_or("/usr/local/bin:/usr/bin:/bin");
    let dirs: Vec<&str> = path.split(':').filter(|d| d.starts_with('/')).collect();
    for dir in &dirs {
        let candidate = Path::new(dir).join(program);
        if let Ok(m) = std::fs::metadata(&candidate) {
            if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                return Ok(candidate);
            }
        }
    }
    Err(format!(
        "{program:?} not found in the absolute PATH directories [{}] (empty and relative PATH elements are ignored)",
        dirs.join(", ")
    ))
}

/// [`resolve_program_in`] with the `PATH` the child will have: the definition's `env.PATH`, else the
/// daemon's (when the environment is inherited).
///
/// # Errors
/// As [`resolve_program_in`].
pub fn resolve_program(program: &str, def: &ProcessDefinition) -> Result<PathBuf, String> {
    let own = std::env::var("PATH").ok();
    let path = match def.env.get("PATH") {
        Some(p) => Some(p.as_str()),
        None if def.inherit_env => own.as_deref(),
        None => None,
    };
    resolve_program_in(program, path)
}

/// When an exited process is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Never restart; the process ends in `EXITED`.
    Never,
    /// Restart after a non-zero exit or a signal (the default).
    #[default]
    #[serde(alias = "on_failure")]
    OnFailure,
    /// Restart after every exit that was not requested.
    Always,
}

/// Exponential restart delay (Pebble model): `initial`, times `factor` per consecutive failure, capped at `max`,
/// back to `initial` once the process ran for `reset_after`. `jitter` spreads restarts by ±that fraction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Backoff {
    /// First delay.
    #[serde(with = "secs")]
    pub initial: Duration,
    /// Growth per consecutive failure (≥ 1).
    pub factor: f64,
    /// Largest delay.
    #[serde(with = "secs")]
    pub max: Duration,
    /// Uptime after which the delay starts again at `initial`.
    #[serde(with = "secs")]
    pub reset_after: Duration,
    /// Relative jitter in [0, 1).
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(500),
            factor: 2.0,
            max: Duration::from_secs(30),
            reset_after: Duration::from_secs(60),
            jitter: 0.1,
        }
    }
}

impl Backoff {
    /// The delay that follows `current` (before jitter).
    pub fn next(&self, current: Duration) -> Duration {
        let next = current.as_secs_f64() * self.factor;
        Duration::from_secs_f64(next.min(self.max.as_secs_f64()).max(0.0))
    }

    /// `delay` spread by ±`jitter`, with `unit` a uniform sample in [0, 1).
    pub fn jittered(&self, delay: Duration, unit: f64) -> Duration {
        let spread = 1.0 + self.jitter * (2.0 * unit - 1.0);
        Duration::from_secs_f64((delay.as_secs_f64() * spread).max(0.0))
    }
}

/// Crash-loop limit: `max_starts` starts within `window` end in `FATAL` (0 disables the limit).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CrashLoop {
    /// Starts allowed inside the window.
    pub max_starts: u32,
    /// The sliding window.
    #[serde(with = "secs")]
    pub window: Duration,
}

impl Default for CrashLoop {
    fn default() -> Self {
        CrashLoop {
            max_starts: 5,
            window: Duration::from_secs(60),
        }
    }
}

/// Where the readiness ping goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PingTarget {
    /// A fixed ZeroMQ endpoint, e.g. `tcp://127.0.0.1:6666`.
    Endpoint(String),
    /// Look the endpoint up in the CGSE service registry under this service type.
    Registry {
        /// Registry service type, e.g. `DUMMY_01` or `SM_CS`.
        service_type: String,
    },
    /// A TCP connection accepted on `host:port`, for services that do not answer a CGSE `Ping` (the Service
    /// Registry).
    Tcp {
        /// Host name or address (default `127.0.0.1`).
        host: String,
        /// TCP port.
        port: u16,
    },
}

/// How `STARTING` becomes `RUNNING`: a ping answered within `timeout`, retried every `interval`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Readiness {
    /// What to ping.
    pub ping: PingTarget,
    /// Give up (stop the process, count a failure) after this long.
    #[serde(with = "secs")]
    pub timeout: Duration,
    /// Pause between attempts.
    #[serde(with = "secs")]
    pub interval: Duration,
}

/// One process the supervisor can run. Build it with [`ProcessDefinition::new`] or resolve it from a
/// [`ProcessTable`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessDefinition {
    /// Unique name: the device id, or the core-service name.
    pub id: String,
    /// Program and arguments, executed directly (no shell).
    pub argv: Vec<String>,
    /// Working directory; the supervisor's when `None`.
    pub cwd: Option<PathBuf>,
    /// Variables set for the child, shown in the status.
    pub env: BTreeMap<String, String>,
    /// Start from the supervisor's environment (true) or from an empty one (false).
    pub inherit_env: bool,
    /// Restart policy.
    pub restart: RestartPolicy,
    /// Restart delay.
    pub backoff: Backoff,
    /// Crash-loop limit.
    pub crash_loop: CrashLoop,
    /// Signal sent to the process group to stop it.
    #[serde(with = "signal_name")]
    pub stop_signal: Signal,
    /// Wait this long after `stop_signal`, then SIGKILL the group.
    #[serde(with = "secs")]
    pub stop_timeout: Duration,
    /// Optional readiness check.
    pub readiness: Option<Readiness>,
    /// Set `PYTHONUNBUFFERED=1` unless `env` sets it, so Python output reaches the log at once.
    pub python_unbuffered: bool,
    /// The program is a legacy launcher that starts the real process detached and exits 0.
    pub forking: bool,
    /// Arguments appended to `argv` when `simulator` is set.
    pub sim_args: Vec<String>,
    /// Simulator mode was requested.
    pub simulator: bool,
    /// Start when the supervisor starts (or when the definition is added).
    pub autostart: bool,
    /// CGSE registry service type (core services, e.g. `SM_CS`).
    pub service_type: Option<String>,
    /// Ids of the processes that must be `RUNNING` (hence ready) before this one starts.
    #[serde(default)]
    pub depends_on: Vec<String>,
}

impl ProcessDefinition {
    /// A definition with the default policies (see `docs/PROCESSES.md`).
    pub fn new(id: impl Into<String>, argv: Vec<String>) -> Self {
        ProcessDefinition {
            id: id.into(),
            argv,
            cwd: None,
            env: BTreeMap::new(),
            inherit_env: true,
            restart: RestartPolicy::default(),
            backoff: Backoff::default(),
            crash_loop: CrashLoop::default(),
            stop_signal: Signal::SIGTERM,
            stop_timeout: Duration::from_secs(10),
            readiness: None,
            python_unbuffered: true,
            forking: false,
            sim_args: Vec::new(),
            simulator: false,
            autostart: false,
            service_type: None,
            depends_on: Vec::new(),
        }
    }

    /// The argv actually executed: `argv` plus `sim_args` in simulator mode.
    pub fn effective_argv(&self) -> Vec<String> {
        let mut argv = self.argv.clone();
        if self.simulator {
            argv.extend(self.sim_args.iter().cloned());
        }
        argv
    }

    /// The explicit variables set for the child (before [`ID_ENV`]): `env`, plus `PYTHONUNBUFFERED=1`.
    pub fn effective_env(&self) -> BTreeMap<String, String> {
        let mut env = self.env.clone();
        if self.python_unbuffered && !env.contains_key("PYTHONUNBUFFERED") {
            env.insert("PYTHONUNBUFFERED".to_owned(), "1".to_owned());
        }
        env
    }

    /// Checks what the type system cannot.
    ///
    /// # Errors
    /// [`DefinitionError::Invalid`] naming the field.
    pub fn validate(&self) -> Result<(), DefinitionError> {
        let bad = |key: &str, message: &str| DefinitionError::Invalid {
            origin: "<definition>".to_owned(),
            key: format!("{}.{key}", self.id),
            message: message.to_owned(),
        };
        if self.id.trim().is_empty() {
            return Err(bad("id", "must not be empty"));
        }
        if self.id.contains('\0') || self.id.contains('/') {
            return Err(bad("id", "must not contain '/' or NUL"));
        }
        match self.argv.first() {
            None => return Err(bad("argv", "must name a program")),
            Some(p) if p.is_empty() => return Err(bad("argv", "the program must not be empty")),
            Some(_) => {}
        }
        if self.effective_argv().iter().any(|a| a.contains('\0')) {
            return Err(bad("argv", "must not contain NUL"));
        }
        if self
            .env
            .keys()
            .any(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
        {
            return Err(bad("env", "names must be non-empty, without '=' or NUL"));
        }
        if !(self.backoff.factor.is_finite() && self.backoff.factor >= 1.0) {
            return Err(bad("backoff.factor", "must be a number ≥ 1"));
        }
        if !(self.backoff.jitter.is_finite() && (0.0..1.0).contains(&self.backoff.jitter)) {
            return Err(bad("backoff.jitter", "must be in [0, 1)"));
        }
        Ok(())
    }
}

/// The device a definition is resolved for: what the Setup walk gives (`get_device_ids`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceSpec {
    /// `device_id`, also the process id.
    pub device_id: String,
    /// `device_name`.
    pub device_name: String,
    /// The raw `device` string (`class//egse.dummy.DummyProxy`) or the bare class path.
    pub device_class: String,
    /// `device_args` as strings.
    pub device_args: Vec<String>,
    /// Simulator mode requested.
    pub simulator: bool,
}

/// The operator's process table, parsed from YAML. See `docs/PROCESSES.md`.
#[derive(Debug, Clone, Default)]
pub struct ProcessTable {
    origin: String,
    python: String,
    allowed_programs: Vec<String>,
    device_commands: Vec<String>,
    defaults: RawDefinition,
    core_services: Vec<(String, RawDefinition)>,
    device_classes: BTreeMap<String, RawDefinition>,
    devices: BTreeMap<String, RawDefinition>,
}

impl ProcessTable {
    /// Reads and validates a table file.
    ///
    /// # Errors
    /// [`DefinitionError`] naming the file and the key.
    pub fn load(path: &Path) -> Result<Self, DefinitionError> {
        let text = std::fs::read_to_string(path).map_err(|source| DefinitionError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_yaml(&text, &path.display().to_string())
    }

    /// Parses and validates a table; `origin` names the source in errors.
    ///
    /// # Errors
    /// [`DefinitionError`] naming `origin` and the key.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Self, DefinitionError> {
        let raw: RawTable = if text.trim().is_empty() {
            RawTable::default()
        } else {
            serde_saphyr::from_str(text).map_err(|e| DefinitionError::Syntax {
                origin: origin.to_owned(),
                message: e.to_string(),
            })?
        };
        let table = ProcessTable {
            origin: origin.to_owned(),
            python: raw.python.unwrap_or_else(|| DEFAULT_PYTHON.to_owned()),
            allowed_programs: raw.allowed_programs.unwrap_or_default(),
            device_commands: raw.device_commands.unwrap_or_default(),
            defaults: raw.defaults.unwrap_or_default(),
            core_services: raw.core_services.map(|m| m.0).unwrap_or_default(),
            device_classes: raw.device_classes.unwrap_or_default(),
            devices: raw.devices.unwrap_or_default(),
        };
        table.check()?;
        Ok(table)
    }

    /// The allow-list for client-supplied `cgse_cmd` programs.
    pub fn allowed_programs(&self) -> &[String] {
        &self.allowed_programs
    }

    /// Device launchers (`cgse <name>`) a client may name besides the configured Python's entry points.
    pub fn device_commands(&self) -> &[String] {
        &self.device_commands
    }

    /// The interpreter substituted for `{python}`.
    pub fn python(&self) -> &str {
        &self.python
    }

    /// Core services in table order: `(name, registry service type)`, as `get_core_processes` reports them.
    pub fn core_service_types(&self) -> Vec<(String, Option<String>)> {
        self.core_services
            .iter()
            .map(|(name, raw)| {
                let mut merged = self.defaults.clone();
                merged.overlay(raw);
                (name.clone(), merged.service_type)
            })
            .collect()
    }

    /// Definitions of every core service, in table order.
    ///
    /// # Errors
    /// [`DefinitionError::Invalid`] for an entry without argv or with bad templates.
    pub fn core_definitions(&self) -> Result<Vec<ProcessDefinition>, DefinitionError> {
        self.core_services
            .iter()
            .map(|(name, raw)| {
                let mut merged = self.defaults.clone();
                merged.overlay(raw);
                let ctx = Templates {
                    python: &self.python,
                    device: None,
                };
                merged.build(name, &self.origin, &format!("core_services.{name}"), &ctx)
            })
            .collect()
    }

    /// Resolves the definition of a Setup device: `devices[device_id]` over `device_classes[class]` over
    /// `defaults`. Pure: reads nothing but the table.
    ///
    /// # Errors
    /// [`DefinitionError::NoDefinition`] when neither entry exists; [`DefinitionError::Invalid`] when the
    /// merged entry is incomplete.
    pub fn resolve_device(&self, device: &DeviceSpec) -> Result<ProcessDefinition, DefinitionError> {
        let class = class_path(&device.device_class);
        let by_class = self.device_classes.get(class);
        let by_id = self.devices.get(&device.device_id);
        if by_class.is_none() && by_id.is_none() {
            return Err(DefinitionError::NoDefinition {
                device_id: device.device_id.clone(),
                device_class: class.to_owned(),
            });
        }
        let mut merged = self.defaults.clone();
        let mut key = String::new();
        if let Some(raw) = by_class {
            merged.overlay(raw);
            key = format!("device_classes.{class}");
        }
        if let Some(raw) = by_id {
            merged.overlay(raw);
            key = format!("devices.{}", device.device_id);
        }
        let ctx = Templates {
            python: &self.python,
            device: Some(device),
        };
        let mut def = merged.build(&device.device_id, &self.origin, &key, &ctx)?;
        def.simulator = device.simulator;
        Ok(def)
    }

    /// A definition for a legacy self-daemonizing launcher named by a client (`StartCommand` with no table
    /// entry): `<cgse_cmd> start [device_args[0]] [--sim]`, run directly with `forking: true` and the table
    /// defaults. The command is validated by [`validate_cgse_cmd`] first.
    ///
    /// # Errors
    /// [`DefinitionError::Command`] when the command or the argument is refused.
    pub fn legacy_definition(
        &self,
        device_id: &str,
        cgse_cmd: &str,
        device_args: &[String],
        simulator: bool,
        launchers: &Launchers,
    ) -> Result<ProcessDefinition, DefinitionError> {
        let mut argv = self.launcher_argv(cgse_cmd, device_args, launchers)?;
        argv.push("start".to_owned());
        if let Some(arg0) = device_args.first() {
            argv.push(arg0.clone());
        }
        let mut merged = self.defaults.clone();
        merged.argv = Some(argv);
        merged.forking = Some(true);
        merged.sim_args = Some(vec!["--sim".to_owned()]);
        merged.readiness = None;
        let ctx = Templates {
            python: &self.python,
            device: None,
        };
        // The argv holds client text: never template-expand it.
        let mut def = merged.build_literal(device_id, &self.origin, "legacy", &ctx)?;
        def.simulator = simulator;
        Ok(def)
    }

    /// Validates a client's launcher request the same way on every path (start, stop, status): `cgse_cmd`
    /// is `<allowed program> <permitted launcher>` and every device argument is a plain token; the device
    /// id must be one too. Returns the launcher's argv, its program resolved to an absolute path through the
    /// daemon's `PATH` without empty or relative elements.
    ///
    /// # Errors
    /// [`DefinitionError::Command`] naming what was refused.
    pub fn launcher_argv(
        &self,
        cgse_cmd: &str,
        device_args: &[String],
        launchers: &Launchers,
    ) -> Result<Vec<String>, DefinitionError> {
        let mut argv = self.check_launcher(cgse_cmd, device_args, launchers)?;
        let path = launchers.search_path.clone().or_else(|| std::env::var("PATH").ok());
        let program = resolve_program_in(&argv[0], path.as_deref()).map_err(|message| CommandError::NotFound {
            program: argv[0].clone(),
            message,
        })?;
        argv[0] = program.display().to_string();
        Ok(argv)
    }

    /// The checks of [`ProcessTable::launcher_argv`] without resolving the program (which only matters where
    /// the launcher is run): the words of `cgse_cmd`.
    ///
    /// # Errors
    /// [`DefinitionError::Command`] naming what was refused.
    pub fn check_launcher(
        &self,
        cgse_cmd: &str,
        device_args: &[String],
        launchers: &Launchers,
    ) -> Result<Vec<String>, DefinitionError> {
        let argv = validate_launcher(cgse_cmd, &self.allowed_programs, launchers)?;
        validate_client_args(device_args)?;
        Ok(argv)
    }

    /// Validates every entry as far as possible without a device (templates, signals, durations, readiness).
    fn check(&self) -> Result<(), DefinitionError> {
        let dummy = DeviceSpec {
            device_id: "X".to_owned(),
            device_name: "X".to_owned(),
            device_class: "x".to_owned(),
            device_args: vec!["a".to_owned()],
            simulator: false,
        };
        let bad = |key: String, message: String| DefinitionError::Invalid {
            origin: self.origin.clone(),
            key,
            message,
        };
        for p in &self.allowed_programs {
            if p.is_empty() || p.chars().any(|c| c.is_whitespace() || is_metacharacter(c)) {
                return Err(bad(
                    "allowed_programs".into(),
                    format!("{p:?} is not a plain program name"),
                ));
            }
        }
        for d in &self.device_commands {
            if !is_plain_token(d) || NEVER_LAUNCHERS.contains(&d.as_str()) {
                return Err(bad(
                    "device_commands".into(),
                    format!(
                        "{d:?} is not a device launcher a client may run (never: {})",
                        NEVER_LAUNCHERS.join(", ")
                    ),
                ));
            }
        }
        let entries = std::iter::once(("defaults".to_owned(), &self.defaults, true))
            .chain(
                self.core_services
                    .iter()
                    .map(|(k, r)| (format!("core_services.{k}"), r, false)),
            )
            .chain(
                self.device_classes
                    .iter()
                    .map(|(k, r)| (format!("device_classes.{k}"), r, true)),
            )
            .chain(self.devices.iter().map(|(k, r)| (format!("devices.{k}"), r, true)));
        for (key, raw, is_device) in entries {
            let ctx = Templates {
                python: &self.python,
                device: is_device.then_some(&dummy),
            };
            raw.check(&self.origin, &key, &ctx)?;
        }
        // Core services must be complete: they are started without any device information.
        self.core_definitions()?;
        self.check_dependencies()?;
        Ok(())
    }

    /// `depends_on`: not in `defaults` (every process would depend on it, itself included); class entries
    /// name known ids; the core services and `devices` entries form a graph without cycles.
    fn check_dependencies(&self) -> Result<(), DefinitionError> {
        if self.defaults.depends_on.is_some() {
            return Err(DefinitionError::Invalid {
                origin: self.origin.clone(),
                key: "defaults.depends_on".to_owned(),
                message: "not allowed in defaults (give it per entry)".to_owned(),
            });
        }
        let nodes = self.dependency_nodes()?;
        for (class, raw) in &self.device_classes {
            for d in raw.depends_on.iter().flatten() {
                if !nodes.iter().any(|(id, _)| id == d) {
                    return Err(DefinitionError::Invalid {
                        origin: self.origin.clone(),
                        key: format!("device_classes.{class}.depends_on"),
                        message: format!("{d} is not defined (core services and `devices` entries are)"),
                    });
                }
            }
        }
        self.dependency_graph().map(|_| ())
    }

    /// The file or text the table came from, for messages.
    pub(crate) fn origin(&self) -> &str {
        &self.origin
    }

    /// The key of a process's entry in the file, for messages: `core_services.X` or `devices.X`.
    pub(crate) fn entry_key(&self, id: &str) -> String {
        if self.core_services.iter().any(|(n, _)| n == id) {
            format!("core_services.{id}")
        } else {
            format!("devices.{id}")
        }
    }

    /// `(id, depends_on)` of the core services (table order), then of the `devices` entries, each layered over
    /// `defaults` (a device's class entry is only known with the Setup; its own entry is used).
    pub(crate) fn dependency_nodes(&self) -> Result<Vec<(String, Vec<String>)>, DefinitionError> {
        let mut nodes = Vec::new();
        for (id, raw) in self
            .core_services
            .iter()
            .map(|(k, v)| (k, v))
            .chain(self.devices.iter())
        {
            if nodes.iter().any(|(n, _): &(String, Vec<String>)| n == id) {
                return Err(DefinitionError::Invalid {
                    origin: self.origin.clone(),
                    key: format!("devices.{id}"),
                    message: "a core service has the same id".to_owned(),
                });
            }
            nodes.push((id.clone(), raw.depends_on.clone().unwrap_or_default()));
        }
        Ok(nodes)
    }
}

/// Strips the Setup's `class//` directive: `class//egse.dummy.DummyProxy` → `egse.dummy.DummyProxy`.
pub fn class_path(device: &str) -> &str {
    device.strip_prefix("class//").unwrap_or(device).trim()
}

/// Characters refused in client-supplied commands: everything a POSIX shell gives a meaning to. No shell is
/// ever run, so this only keeps the legacy CLIs from seeing surprising input.
fn is_metacharacter(c: char) -> bool {
    matches!(
        c,
        ';' | '|'
            | '&'
            | '$'
            | '`'
            | '('
            | ')'
            | '<'
            | '>'
            | '\''
            | '"'
            | '\\'
            | '*'
            | '?'
            | '['
            | ']'
            | '{'
            | '}'
            | '~'
            | '#'
            | '!'
            | '='
    ) || (c.is_control() && c != ' ')
}

/// Validates a client-supplied command string such as `cgse puna` and splits it on whitespace.
///
/// Refuses every shell metacharacter (`; | & $ \` ( ) < > ' " \ * ? [ ] { } ~ # ! =` and control characters,
/// which covers `$(…)`, backticks, pipes, `&&` and newlines) and any program that is not on `allowed`.
///
/// # Errors
/// [`CommandError`], naming the allow-list when the program is refused.
pub fn validate_cgse_cmd(cmd: &str, allowed: &[String]) -> Result<Vec<String>, CommandError> {
    if let Some(character) = cmd.chars().find(|c| is_metacharacter(*c) && !matches!(c, '\t')) {
        return Err(CommandError::Metacharacter {
            command: cmd.to_owned(),
            character,
        });
    }
    let words: Vec<String> = cmd.split_whitespace().map(str::to_owned).collect();
    let Some(program) = words.first() else {
        return Err(CommandError::Empty);
    };
    if !allowed.iter().any(|a| a == program) {
        return Err(CommandError::NotAllowed {
            command: cmd.to_owned(),
            program: program.clone(),
            allowed: allowed.to_vec(),
        });
    }
    Ok(words)
}

/// Validates a client's `device_args`: at most [`MAX_CLIENT_ARGS`], each per [`validate_client_arg`].
///
/// # Errors
/// [`CommandError::BadArgument`] or [`CommandError::TooManyArguments`].
pub fn validate_client_args(args: &[String]) -> Result<(), CommandError> {
    if args.len() > MAX_CLIENT_ARGS {
        return Err(CommandError::TooManyArguments {
            count: args.len(),
            max: MAX_CLIENT_ARGS,
        });
    }
    args.iter().try_for_each(|a| validate_client_arg(a))
}

/// Validates a client's `cgse_cmd` as a device launcher: [`validate_cgse_cmd`] (no shell metacharacter, an
/// allowed program), then exactly one more word, a permitted launcher of `launchers`.
///
/// # Errors
/// [`CommandError`], naming the permitted launchers when the sub-command is refused.
pub fn validate_launcher(cmd: &str, allowed: &[String], launchers: &Launchers) -> Result<Vec<String>, CommandError> {
    let words = validate_cgse_cmd(cmd, allowed)?;
    let refused = || CommandError::NotALauncher {
        command: cmd.to_owned(),
        permitted: launchers.permitted.iter().cloned().collect(),
        source_: launchers.source.clone(),
    };
    match words.as_slice() {
        [_, sub] if launchers.permitted.contains(sub) && !NEVER_LAUNCHERS.contains(&sub.as_str()) => Ok(words),
        _ => Err(refused()),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The YAML side: partial entries, layered and then built.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    python: Option<String>,
    allowed_programs: Option<Vec<String>>,
    device_commands: Option<Vec<String>>,
    defaults: Option<RawDefinition>,
    core_services: Option<OrderedMap<RawDefinition>>,
    device_classes: Option<BTreeMap<String, RawDefinition>>,
    devices: Option<BTreeMap<String, RawDefinition>>,
}

/// A YAML mapping that keeps the file's order (start order of core services).
#[derive(Debug, Default)]
struct OrderedMap<V>(Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for OrderedMap<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V_<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for V_<V> {
            type Value = OrderedMap<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping of names to definitions")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out: Vec<(String, V)> = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, V>()? {
                    if out.iter().any(|(existing, _)| *existing == k) {
                        return Err(de::Error::custom(format!("duplicate name {k:?}")));
                    }
                    out.push((k, v));
                }
                Ok(OrderedMap(out))
            }
        }
        deserializer.deserialize_map(V_(std::marker::PhantomData))
    }
}

/// An environment value: YAML scalars of any kind become strings (`SITE_ID: 42`).
#[derive(Debug, Clone, PartialEq)]
struct EnvValue(String);

impl<'de> Deserialize<'de> for EnvValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Vis;
        impl Visitor<'_> for Vis {
            type Value = EnvValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_owned()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_string()))
            }
        }
        deserializer.deserialize_any(Vis)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackoff {
    initial: Option<f64>,
    factor: Option<f64>,
    max: Option<f64>,
    reset_after: Option<f64>,
    jitter: Option<f64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCrashLoop {
    max_starts: Option<u32>,
    window: Option<f64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPing {
    endpoint: Option<String>,
    registry: Option<bool>,
    service_type: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTcp {
    port: u16,
    host: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReadiness {
    ping: Option<RawPing>,
    tcp: Option<RawTcp>,
    timeout: Option<f64>,
    interval: Option<f64>,
}

/// A partial definition: every field optional, so entries can be layered.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefinition {
    argv: Option<Vec<String>>,
    cwd: Option<String>,
    env: Option<BTreeMap<String, EnvValue>>,
    inherit_env: Option<bool>,
    restart: Option<RestartPolicy>,
    backoff: Option<RawBackoff>,
    crash_loop: Option<RawCrashLoop>,
    stop_signal: Option<String>,
    stop_timeout: Option<f64>,
    readiness: Option<RawReadiness>,
    python_unbuffered: Option<bool>,
    forking: Option<bool>,
    sim_args: Option<Vec<String>>,
    autostart: Option<bool>,
    service_type: Option<String>,
    depends_on: Option<Vec<String>>,
}

macro_rules! take {
    ($dst:expr, $src:expr, $($f:ident),+) => { $( if $src.$f.is_some() { $dst.$f = $src.$f.clone(); } )+ };
}

impl RawDefinition {
    /// Lays `top` over `self`: set fields replace, `env` maps merge, `backoff`/`crash_loop` merge per field.
    fn overlay(&mut self, top: &RawDefinition) {
        take!(
            self,
            top,
            argv,
            cwd,
            inherit_env,
            restart,
            stop_signal,
            stop_timeout,
            readiness,
            python_unbuffered,
            forking,
            sim_args,
            autostart,
            service_type,
            depends_on
        );
        if let Some(env) = &top.env {
            let mine = self.env.get_or_insert_with(BTreeMap::new);
            mine.extend(env.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        if let Some(b) = &top.backoff {
            let mine = self.backoff.get_or_insert_with(RawBackoff::default);
            take!(mine, b, initial, factor, max, reset_after, jitter);
        }
        if let Some(c) = &top.crash_loop {
            let mine = self.crash_loop.get_or_insert_with(RawCrashLoop::default);
            take!(mine, c, max_starts, window);
        }
    }

    /// Validates the fields that are set, expanding templates against `ctx`.
    fn check(&self, origin: &str, key: &str, ctx: &Templates<'_>) -> Result<(), DefinitionError> {
        let mut probe = self.clone();
        if probe.argv.is_none() {
            probe.argv = Some(vec!["x".to_owned()]);
        }
        probe.build("check", origin, key, ctx).map(|_| ())
    }

    fn build(
        &self,
        id: &str,
        origin: &str,
        key: &str,
        ctx: &Templates<'_>,
    ) -> Result<ProcessDefinition, DefinitionError> {
        self.build_inner(id, origin, key, ctx, true)
    }

    fn build_literal(
        &self,
        id: &str,
        origin: &str,
        key: &str,
        ctx: &Templates<'_>,
    ) -> Result<ProcessDefinition, DefinitionError> {
        self.build_inner(id, origin, key, ctx, false)
    }

    fn build_inner(
        &self,
        id: &str,
        origin: &str,
        key: &str,
        ctx: &Templates<'_>,
        expand_argv: bool,
    ) -> Result<ProcessDefinition, DefinitionError> {
        let bad = |field: &str, message: String| DefinitionError::Invalid {
            origin: origin.to_owned(),
            key: format!("{key}.{field}"),
            message,
        };
        let secs = |field: &str, v: Option<f64>, default: Duration| -> Result<Duration, DefinitionError> {
            match v {
                None => Ok(default),
                Some(s) if s.is_finite() && (0.0..=1.0e9).contains(&s) => Ok(Duration::from_secs_f64(s)),
                Some(s) => Err(bad(field, format!("{s} is not a duration in seconds (≥ 0)"))),
            }
        };
        let mut def = ProcessDefinition::new(id, Vec::new());
        let argv = self
            .argv
            .clone()
            .ok_or_else(|| bad("argv", "missing: no entry gives a program".into()))?;
        def.argv = if expand_argv {
            let mut out = Vec::new();
            for (i, item) in argv.iter().enumerate() {
                out.extend(ctx.expand_item(item).map_err(|m| bad(&format!("argv[{i}]"), m))?);
            }
            out
        } else {
            argv
        };
        if let Some(sim) = &self.sim_args {
            let mut out = Vec::new();
            for (i, item) in sim.iter().enumerate() {
                out.extend(ctx.expand_item(item).map_err(|m| bad(&format!("sim_args[{i}]"), m))?);
            }
            def.sim_args = out;
        }
        if let Some(cwd) = &self.cwd {
            def.cwd = Some(PathBuf::from(ctx.expand_str(cwd).map_err(|m| bad("cwd", m))?));
        }
        if let Some(env) = &self.env {
            for (k, v) in env {
                let value = ctx.expand_str(&v.0).map_err(|m| bad(&format!("env.{k}"), m))?;
                def.env.insert(k.clone(), value);
            }
        }
        def.inherit_env = self.inherit_env.unwrap_or(def.inherit_env);
        def.restart = self.restart.unwrap_or(def.restart);
        if let Some(b) = &self.backoff {
            def.backoff.initial = secs("backoff.initial", b.initial, def.backoff.initial)?;
            def.backoff.max = secs("backoff.max", b.max, def.backoff.max)?;
            def.backoff.reset_after = secs("backoff.reset_after", b.reset_after, def.backoff.reset_after)?;
            def.backoff.factor = b.factor.unwrap_or(def.backoff.factor);
            def.backoff.jitter = b.jitter.unwrap_or(def.backoff.jitter);
        }
        if let Some(c) = &self.crash_loop {
            def.crash_loop.max_starts = c.max_starts.unwrap_or(def.crash_loop.max_starts);
            def.crash_loop.window = secs("crash_loop.window", c.window, def.crash_loop.window)?;
        }
        if let Some(s) = &self.stop_signal {
            def.stop_signal = parse_signal(s).map_err(|m| bad("stop_signal", m))?;
        }
        def.stop_timeout = secs("stop_timeout", self.stop_timeout, def.stop_timeout)?;
        if let Some(r) = &self.readiness {
            let ping = match (&r.ping, &r.tcp) {
                (None, Some(t)) => {
                    let host = match &t.host {
                        Some(h) => ctx.expand_str(h).map_err(|m| bad("readiness.tcp.host", m))?,
                        None => "127.0.0.1".to_owned(),
                    };
                    if host.trim().is_empty() || t.port == 0 {
                        return Err(bad("readiness.tcp", "needs a non-empty host and a port > 0".into()));
                    }
                    PingTarget::Tcp { host, port: t.port }
                }
                (Some(p), None) => self.ping_target(p, ctx, &bad)?,
                _ => return Err(bad("readiness", "give exactly one of `ping` or `tcp`".into())),
            };
            def.readiness = Some(Readiness {
                ping,
                timeout: secs("readiness.timeout", r.timeout, Duration::from_secs(30))?,
                interval: secs("readiness.interval", r.interval, Duration::from_millis(500))?,
            });
        }
        def.depends_on = self.depends_on.clone().unwrap_or_default();
        def.python_unbuffered = self.python_unbuffered.unwrap_or(def.python_unbuffered);
        def.forking = self.forking.unwrap_or(def.forking);
        def.autostart = self.autostart.unwrap_or(def.autostart);
        def.service_type = self.service_type.clone();
        def.validate().map_err(|e| match e {
            DefinitionError::Invalid { key: k, message, .. } => DefinitionError::Invalid {
                origin: origin.to_owned(),
                key: format!("{key}.{}", k.split_once('.').map_or(k.as_str(), |(_, f)| f)),
                message,
            },
            other => other,
        })?;
        Ok(def)
    }

    /// The `ping` readiness target: a fixed endpoint, or the registry under a service type.
    fn ping_target(
        &self,
        ping: &RawPing,
        ctx: &Templates<'_>,
        bad: &dyn Fn(&str, String) -> DefinitionError,
    ) -> Result<PingTarget, DefinitionError> {
        match (&ping.endpoint, ping.registry.unwrap_or(false)) {
            (Some(ep), false) => Ok(PingTarget::Endpoint(
                ctx.expand_str(ep).map_err(|m| bad("readiness.ping.endpoint", m))?,
            )),
            (None, true) => {
                let st = match &ping.service_type {
                    Some(st) => ctx.expand_str(st).map_err(|m| bad("readiness.ping.service_type", m))?,
                    None => match (ctx.device, &self.service_type) {
                        (_, Some(st)) => st.clone(),
                        (Some(d), None) => d.device_id.to_uppercase(),
                        (None, None) => {
                            return Err(bad(
                                "readiness.ping",
                                "registry: true needs a service_type (or a device id)".into(),
                            ))
                        }
                    },
                };
                Ok(PingTarget::Registry { service_type: st })
            }
            _ => Err(bad(
                "readiness.ping",
                "give exactly one of `endpoint` or `registry: true`".into(),
            )),
        }
    }
}

fn parse_signal(s: &str) -> Result<Signal, String> {
    let upper = s.trim().to_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<Signal>().map_err(|_| format!("unknown signal {s:?}"))
}

/// Template values: `{python}` always, the device ones only for device entries.
struct Templates<'a> {
    python: &'a str,
    device: Option<&'a DeviceSpec>,
}

const TEMPLATE_NAMES: &str = "{python}, {device_id}, {device_name}, {device_args}, {arg0}";

impl Templates<'_> {
    /// Expands one argv item into zero or more items: `{device_args}` alone becomes one item per argument,
    /// `{arg0}` alone disappears when there are no arguments.
    fn expand_item(&self, item: &str) -> Result<Vec<String>, String> {
        match item {
            "{device_args}" => Ok(self.device()?.device_args.clone()),
            "{arg0}" => Ok(self.device()?.device_args.first().cloned().into_iter().collect()),
            _ => Ok(vec![self.expand_str(item)?]),
        }
    }

    /// Expands `{name}` inside a string; `{{` and `}}` are literal braces.
    fn expand_str(&self, s: &str) -> Result<String, String> {
        let mut out = String::with_capacity(s.len());
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    out.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    out.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(ch) => name.push(ch),
                            None => return Err(format!("unclosed '{{' in {s:?}")),
                        }
                    }
                    out.push_str(&self.value(&name, s)?);
                }
                '}' => return Err(format!("unmatched '}}' in {s:?} (write '}}}}' for a brace)")),
                _ => out.push(c),
            }
        }
        Ok(out)
    }

    fn value(&self, name: &str, whole: &str) -> Result<String, String> {
        match name {
            "python" => Ok(self.python.to_owned()),
            "device_id" => Ok(self.device()?.device_id.clone()),
            "device_name" => Ok(self.device()?.device_name.clone()),
            "arg0" => Ok(self.device()?.device_args.first().cloned().unwrap_or_default()),
            "device_args" => Err(format!(
                "{{device_args}} must be a whole argv item, not part of {whole:?}"
            )),
            other => Err(format!("unknown template {{{other}}} (known: {TEMPLATE_NAMES})")),
        }
    }

    fn device(&self) -> Result<&DeviceSpec, String> {
        self.device
            .ok_or_else(|| "device templates are only allowed in device entries".to_owned())
    }
}

/// `Duration` as seconds (`f64`) in YAML and JSON.
pub(crate) mod secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = f64::deserialize(d)?;
        if v.is_finite() && (0.0..=1.0e9).contains(&v) {
            Ok(Duration::from_secs_f64(v))
        } else {
            Err(serde::de::Error::custom(format!("{v} is not a duration in seconds")))
        }
    }
}

/// A signal as its name (`SIGTERM`).
pub(crate) mod signal_name {
    use nix::sys::signal::Signal;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(sig: &Signal, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(sig.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Signal, D::Error> {
        let name = String::deserialize(d)?;
        super::parse_signal(&name).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(id: &str, class: &str, args: &[&str], sim: bool) -> DeviceSpec {
        DeviceSpec {
            device_id: id.into(),
            device_name: format!("{id} name"),
            device_class: class.into(),
            device_args: args.iter().map(|s| s.to_string()).collect(),
            simulator: sim,
        }
    }

    const TABLE: &str = r#"
python: /opt/venv/bin/python
allowed_programs: [cgse]
defaults:
  restart: on-failure
  stop_timeout: 5
  env: {SITE_ID: LAB42, N: 3}
core_services:
  Storage Manager:
    service_type: SM_CS
    argv: ["{python}", -m, egse.storage.storage_cs, start]
  Configuration Manager:
    service_type: CM_CS
    argv: ["{python}", -m, egse.confman.confman_cs, start]
device_classes:
  egse.dummy.DummyProxy:
    argv: ["{python}", -m, egse.dummy.dummy_cs, start, "{device_args}"]
    sim_args: [--sim]
    readiness:
      ping: {registry: true}
      timeout: 20
devices:
  DUMMY_02:
    env: {EXTRA: "{device_name}"}
    stop_signal: INT
"#;

    #[test]
    fn resolves_class_and_device_layers() {
        let t = ProcessTable::from_yaml(TABLE, "t.yaml").unwrap();
        let d = t
            .resolve_device(&device("DUMMY_01", "class//egse.dummy.DummyProxy", &["a", "b"], true))
            .unwrap();
        assert_eq!(
            d.argv,
            ["/opt/venv/bin/python", "-m", "egse.dummy.dummy_cs", "start", "a", "b"]
        );
        assert_eq!(d.effective_argv().last().map(String::as_str), Some("--sim"));
        assert_eq!(d.stop_timeout, Duration::from_secs(5));
        assert_eq!(d.env.get("N").map(String::as_str), Some("3"));
        assert_eq!(
            d.readiness.as_ref().map(|r| r.ping.clone()),
            Some(PingTarget::Registry {
                service_type: "DUMMY_01".into()
            })
        );
        let d2 = t
            .resolve_device(&device("DUMMY_02", "egse.dummy.DummyProxy", &[], false))
            .unwrap();
        assert_eq!(d2.stop_signal, Signal::SIGINT);
        assert_eq!(d2.env.get("EXTRA").map(String::as_str), Some("DUMMY_02 name"));
        assert_eq!(d2.env.get("SITE_ID").map(String::as_str), Some("LAB42"));
        assert_eq!(d2.effective_argv().len(), 4);
        let err = t
            .resolve_device(&device("PUNA_01", "class//egse.hexapod.Puna", &[], false))
            .unwrap_err();
        assert!(err.to_string().contains("no definition for device PUNA_01"), "{err}");
    }

    #[test]
    fn core_services_keep_file_order() {
        let t = ProcessTable::from_yaml(TABLE, "t.yaml").unwrap();
        let names: Vec<_> = t.core_service_types().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["Storage Manager", "Configuration Manager"]);
        let defs = t.core_definitions().unwrap();
        assert_eq!(defs[0].service_type.as_deref(), Some("SM_CS"));
    }

    #[test]
    fn errors_name_file_and_key() {
        let e = ProcessTable::from_yaml("devices:\n  X:\n    argvs: [a]\n", "f.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("f.yaml:") && e.contains("argvs"), "{e}");
        let e = ProcessTable::from_yaml("devices:\n  X:\n    argv: [\"{nope}\"]\n", "f.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("devices.X.argv[0]") && e.contains("unknown template"), "{e}");
        let e = ProcessTable::from_yaml("devices:\n  X:\n    stop_signal: SIGFOO\n", "f.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("devices.X.stop_signal"), "{e}");
        let e = ProcessTable::from_yaml("core_services:\n  A:\n    argv: [\"{device_id}\"]\n", "f.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("core_services.A.argv[0]"), "{e}");
        let e = ProcessTable::from_yaml("devices:\n  X:\n    argv: [\"a{device_args}\"]\n", "f.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("whole argv item"), "{e}");
        let e = ProcessTable::from_yaml("devices:\n  X:\n    backoff: {factor: 0.5}\n", "f.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("devices.X.backoff.factor"), "{e}");
    }

    #[test]
    fn arg0_disappears_without_args() {
        let t = ProcessTable::from_yaml(
            "device_classes:\n  c.P:\n    argv: [cgse, p, start, \"{arg0}\", \"x{arg0}\"]\n",
            "t",
        )
        .unwrap();
        assert_eq!(
            t.resolve_device(&device("P", "c.P", &[], false)).unwrap().argv,
            ["cgse", "p", "start", "x"]
        );
        assert_eq!(
            t.resolve_device(&device("P", "c.P", &["P1", "z"], false)).unwrap().argv,
            ["cgse", "p", "start", "P1", "xP1"]
        );
    }

    #[test]
    fn validator_refuses_shell_strings() {
        let allowed = vec!["cgse".to_owned()];
        for bad in [
            "sh -c 'touch /tmp/x'",
            "cgse dummy; rm -rf /",
            "cgse $(id)",
            "cgse `id`",
            "cgse dummy | tee x",
            "cgse dummy && reboot",
            "cgse dummy\nreboot",
            "cgse dummy > /etc/passwd",
            "",
            "   ",
            "python3 -m egse.dummy",
            "/usr/bin/cgse dummy",
        ] {
            let r = validate_cgse_cmd(bad, &allowed);
            assert!(r.is_err(), "{bad:?} accepted");
        }
        let e = validate_cgse_cmd("sh -x", &allowed).unwrap_err().to_string();
        assert!(e.contains("allowed programs: cgse"), "{e}");
        assert_eq!(validate_cgse_cmd(" cgse  dummy ", &allowed).unwrap(), ["cgse", "dummy"]);
    }

    #[test]
    fn legacy_definition_is_forking_and_literal() {
        let t = ProcessTable::from_yaml(TABLE, "t").unwrap();
        let mut l = Launchers::new(&["puna".into(), "core".into()], &[], &[], "test".into());
        // `cgse` must resolve: give it a directory holding one.
        let dir = std::env::temp_dir().join(format!("procman-legacy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cgse = dir.join("cgse");
        std::fs::write(&cgse, "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cgse, std::fs::Permissions::from_mode(0o755)).unwrap();
        let resolved = resolve_program_in("cgse", Some(&format!("::.:{}", dir.display()))).unwrap();
        assert_eq!(resolved, cgse);
        assert!(resolve_program_in("cgse", Some("::.:relative")).is_err());
        l.search_path = Some(format!(":relative:{}", dir.display()));
        let d = t
            .legacy_definition("PUNA_01", "cgse puna", &["PUNA_01".into()], true, &l)
            .unwrap();
        assert!(d.forking);
        let cg = cgse.display().to_string();
        assert_eq!(d.effective_argv(), [cg.as_str(), "puna", "start", "PUNA_01", "--sim"]);
        assert!(t
            .legacy_definition("P", "cgse puna", &["a;b".into()], false, &l)
            .is_err());
        assert!(t
            .legacy_definition("P", "cgse puna", &["--help".into()], false, &l)
            .is_err());
        assert!(t.legacy_definition("P", "bash puna", &[], false, &l).is_err());
        assert!(
            t.legacy_definition("P", "cgse core", &[], false, &l).is_err(),
            "core is never a launcher"
        );
        assert!(t.legacy_definition("P", "cgse reg", &[], false, &l).is_err());
        assert!(t.legacy_definition("P", "cgse puna extra", &[], false, &l).is_err());
        assert!(t.legacy_definition("P", "cgse", &[], false, &l).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn durations_roundtrip_as_seconds() {
        let d = ProcessDefinition::new("a", vec!["sleep".into(), "1".into()]);
        let j = serde_json::to_string(&d).unwrap();
        assert!(
            j.contains("\"stop_timeout\":10.0") && j.contains("\"stop_signal\":\"SIGTERM\""),
            "{j}"
        );
        let back: ProcessDefinition = serde_json::from_str(&j).unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn backoff_grows_and_caps() {
        let b = Backoff::default();
        let mut d = b.initial;
        for _ in 0..10 {
            d = b.next(d);
        }
        assert_eq!(d, Duration::from_secs(30));
        let j = b.jittered(Duration::from_secs(1), 0.0);
        assert!((j.as_secs_f64() - 0.9).abs() < 1e-9);
    }
}
