//! Process definitions and the process table (`settings/procman.yaml`, documented in `docs/PROCESSES.md`).
//!
//! A [`ProcessDefinition`] is what the supervisor runs: an argv (never a shell string), its environment and its
//! policies. The [`ProcessTable`] is the operator's file; it holds layered, partial entries (`defaults` <
//! `device_classes` < `devices`) with templates, and resolves them into definitions with pure functions. Client
//! input (`StartCommand.cgse_cmd`) only ever reaches [`validate_cgse_cmd`], which refuses anything a shell would
//! interpret and any program that is not on the allow-list.

mod client;
mod raw;
mod table;

pub use client::*;
pub(crate) use raw::parse_signal;
pub use raw::{TemplateError, UnknownSignal};
pub use table::ProcessTable;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use super::error::DefinitionError;

/// Interpreter substituted for `{python}` when the table does not say otherwise.
pub const DEFAULT_PYTHON: &str = "python3";

/// The environment variable every child gets, naming its process id. Forking launchers pass it on to the
/// daemon they spawn, which lets the supervisor tell whose orphan a re-parented process is.
pub const ID_ENV: &str = "PROCMAN_ID";

/// The environment variable every child gets, naming the supervisor that owns it (its state directory). The
/// `/proc` scans (stop, forking launchers, re-adoption) only touch processes carrying both variables.
pub const OWNER_ENV: &str = "PROCMAN_SUPERVISOR";

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
