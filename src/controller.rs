//! The commanding table's process-management commands, answered from the supervisor.
//!
//! Compatible with the original replies, without its shell: a `StartCommand` starts
//! the managed definition of its device id (from the process table, by device id or by the Setup's
//! device class); only when there is none does it run the client's legacy launcher — and only a program
//! on the allow-list, split into argv, never through a shell. Status comes from the supervisor's state
//! plus a `Ping` of the control server, not from grepping CLI output.
//!
//! Client input is validated the same way on start, stop and device status: `cgse_cmd` must name a device
//! launcher (`cgse <name>`, `<name>` a `cgse.service.device_command` entry point of the configured Python or
//! listed in the table's `device_commands`, never `core`, `reg`, `admin`, …) and every device argument must be
//! a plain token. A client-created definition is capped and removed when its process ends; the client's
//! `device_args` never fill a table template (only the Setup's do).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tracing::{info, warn};

use crate::cgse::storage::HousekeepingSink;
use crate::codec::{PickleWriter, Value};
use crate::daemon::Lifecycle;
use crate::housekeeping::{CountProcesses, ProcessCounts};
use crate::probe::Pinger;
use crate::protocol::{from_json, py_repr};
use crate::server::{Call, CommandError, Handler, HandlerFuture, Reply};
use crate::setup::{device_ids_reply, devices_reply, Device, SetupSource};
use crate::supervisor::helper::cgse_entry_points;
use crate::supervisor::{
    definition::validate_client_args, validate_client_id, Desired, DeviceSpec, Launchers, ProcessDefinition,
    ProcessEvent, ProcessState, ProcessTable, RecordView, RestartPolicy, SupervisorError, SupervisorHandle,
};

/// How long the configured Python may take to list its entry points.
const ENTRY_POINTS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// The arguments of a `StartCommand` / `StopCommand` / `StatusCommand`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProcessCommand {
    /// `_device_id` (an int id as text).
    pub device_id: String,
    /// `_cgse_cmd`; None when absent, `None` or blank.
    pub cgse_cmd: Option<String>,
    /// `_device_args`, each as text (a non-string in its Python repr).
    pub device_args: Vec<String>,
    /// `_is_simulator_mode` is `True`.
    pub simulator: bool,
}

impl ProcessCommand {
    /// Read the state of a pickled process command. The class path is not trusted; the state keys are
    /// what matters (a dict with the same keys is accepted too).
    pub fn from_value(v: &Value, what: &str) -> Result<ProcessCommand, CommandError> {
        let items: &[(Value, Value)] = match v {
            Value::Object(o) => o.state_dict().unwrap_or(&[]),
            Value::Dict(items) => items,
            other => {
                return Err(CommandError::Type(format!("expected a {what}, got {}", py_repr(other))));
            }
        };
        let get = |k: &str| {
            crate::codec::dict_get(items, k).or_else(|| crate::codec::dict_get(items, k.trim_start_matches('_')))
        };
        let device_id = match get("_device_id") {
            Some(Value::Str(s)) if !s.trim().is_empty() => s.clone(),
            Some(Value::Int(i)) => i.to_string(),
            other => {
                return Err(CommandError::Value(format!(
                    "{what} needs a device id, got {}",
                    other.map(py_repr).unwrap_or_else(|| "nothing".into())
                )));
            }
        };
        let cgse_cmd = match get("_cgse_cmd") {
            Some(Value::Str(s)) if !s.trim().is_empty() => Some(s.clone()),
            Some(Value::Str(_)) | Some(Value::None) | None => None,
            Some(other) => {
                return Err(CommandError::Type(format!(
                    "cgse_cmd must be a str, got {}",
                    py_repr(other)
                )))
            }
        };
        let device_args = match get("_device_args") {
            Some(Value::List(a) | Value::Tuple(a)) => a
                .iter()
                .map(|x| match x {
                    Value::Str(s) => s.clone(),
                    other => py_repr(other),
                })
                .collect(),
            Some(Value::None) | None => Vec::new(),
            Some(Value::Str(s)) => vec![s.clone()],
            Some(other) => {
                return Err(CommandError::Type(format!(
                    "device_args must be a list, got {}",
                    py_repr(other)
                )));
            }
        };
        let simulator = matches!(get("_is_simulator_mode"), Some(Value::Bool(true)));
        Ok(ProcessCommand {
            device_id,
            cgse_cmd,
            device_args,
            simulator,
        })
    }
}

/// Where a definition came from, so `reload` only removes what the table or the Setup had given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Table,
    Setup,
}

/// The Process Manager controller.
pub struct Controller {
    /// `get_core_processes`: name → registry service type.
    core_processes: Vec<(String, String)>,
    setup: Arc<dyn SetupSource>,
    table: Mutex<Arc<ProcessTable>>,
    table_path: Option<PathBuf>,
    supervisor: SupervisorHandle,
    pinger: Pinger,
    /// Commanding endpoints of core services known from settings (name → endpoint).
    core_endpoints: HashMap<String, String>,
    /// Our own service type and core-service name: asking about ourselves needs no probe.
    self_names: Vec<String>,
    origins: Mutex<HashMap<String, Origin>>,
    /// What `get_integration_status` reports on: the lifecycle integrations (the registry) and storage.
    lifecycle: Vec<Arc<dyn Lifecycle>>,
    storage: Option<Arc<dyn HousekeepingSink>>,
    /// More integrations that say where they stand (key → text): the Logger, the Metrics Hub.
    peers: Vec<(String, PeerStatus)>,
    /// The device launchers a client may name; listed once (lazily) per table, again after `reload`.
    launchers: tokio::sync::Mutex<Option<Arc<Launchers>>>,
    /// False while [`Self::define_all_in_background`] runs: table commands wait for it (`Ping` does not).
    defined: tokio::sync::watch::Sender<bool>,
}

/// Where one integration stands now, as one line of text.
pub type PeerStatus = Arc<dyn Fn() -> String + Send + Sync>;

/// A serialisable value (the reload plan) as the wire carries it.
fn serde_value<T: Serialize>(r: &T) -> Value {
    serde_json::to_value(r).map(from_json).unwrap_or(Value::None)
}

/// A status record as the wire carries it: the same dict its serde form gives (a test checks that),
/// written straight into the reply because `list_processes` is the hot path of status polling.
fn write_record(w: &mut PickleWriter, v: RecordView<'_>) {
    fn opt_int(w: &mut PickleWriter, v: Option<i32>) {
        match v {
            Some(x) => w.int(i64::from(x)),
            None => w.none(),
        }
    }
    fn opt_float(w: &mut PickleWriter, v: Option<f64>) {
        match v {
            Some(x) => w.float(x),
            None => w.none(),
        }
    }
    fn opt_str(w: &mut PickleWriter, v: Option<&str>) {
        match v {
            Some(x) => w.str(x),
            None => w.none(),
        }
    }
    fn path(w: &mut PickleWriter, p: &std::path::Path) {
        w.str(&p.to_string_lossy());
    }
    let r = v.record;
    let d = &r.definition;
    w.dict(|e| {
        e.key("id").str(&r.id);
        e.key("state").str(r.state.as_str());
        opt_int(e.key("pid"), r.pid);
        opt_int(e.key("pgid"), r.pgid);
        opt_float(e.key("start_time"), r.start_time);
        opt_float(e.key("uptime_s"), v.uptime_s);
        opt_int(e.key("exit_code"), r.exit_code);
        opt_int(e.key("exit_signal"), r.exit_signal);
        e.key("restarts").int(i64::from(r.restarts));
        opt_str(e.key("last_error"), r.last_error.as_deref());
        e.key("argv").list(&r.argv, |w, a| w.str(a));
        match &r.cwd {
            Some(p) => path(e.key("cwd"), p),
            None => e.key("cwd").none(),
        }
        e.key("env")
            .dict(|env| r.env.iter().for_each(|(k, v)| env.key(k).str(v)));
        match r.ready {
            Some(b) => e.key("ready").bool(b),
            None => e.key("ready").none(),
        }
        path(e.key("stdout_log"), &r.stdout_log);
        path(e.key("stderr_log"), &r.stderr_log);
        e.key("log_dropped_bytes")
            .int(i64::try_from(v.log_dropped_bytes).unwrap_or(i64::MAX));
        e.key("adopted").bool(r.adopted);
        e.key("desired").str(if r.desired == Desired::Running {
            "running"
        } else {
            "stopped"
        });
        e.key("definition").dict(|e| {
            e.key("restart").str(match d.restart {
                RestartPolicy::Never => "never",
                RestartPolicy::OnFailure => "on-failure",
                RestartPolicy::Always => "always",
            });
            e.key("forking").bool(d.forking);
            e.key("simulator").bool(d.simulator);
            e.key("autostart").bool(d.autostart);
            e.key("stop_signal").str(&d.stop_signal);
            e.key("stop_timeout_s").float(d.stop_timeout_s);
            opt_str(e.key("readiness"), d.readiness.as_deref());
            opt_str(e.key("service_type"), d.service_type.as_deref());
            e.key("inherit_env").bool(d.inherit_env);
        });
    });
}

fn sup_err(e: SupervisorError) -> CommandError {
    match e {
        SupervisorError::UnknownProcess(id) => CommandError::Value(format!("no managed process {id:?}")),
        other => CommandError::Failed(other.to_string()),
    }
}

impl Controller {
    /// A controller of `supervisor`'s processes: the core services (`core_processes`, `core_endpoints`),
    /// the devices of `setup`, the definitions of `table` (read again from `table_path` on `reload`); `self_names`
    /// are our own service type and core-service name.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        core_processes: Vec<(String, String)>,
        setup: Arc<dyn SetupSource>,
        table: Arc<ProcessTable>,
        table_path: Option<PathBuf>,
        supervisor: SupervisorHandle,
        pinger: Pinger,
        core_endpoints: HashMap<String, String>,
        self_names: Vec<String>,
    ) -> Controller {
        Controller {
            core_processes,
            setup,
            table: Mutex::new(table),
            table_path,
            supervisor,
            pinger,
            core_endpoints,
            self_names,
            origins: Mutex::new(HashMap::new()),
            lifecycle: Vec::new(),
            storage: None,
            peers: Vec::new(),
            launchers: tokio::sync::Mutex::new(None),
            defined: tokio::sync::watch::Sender::new(true),
        }
    }

    /// Report on these integrations in `get_integration_status`.
    pub fn with_integration_status(
        mut self,
        lifecycle: Vec<Arc<dyn Lifecycle>>,
        storage: Arc<dyn HousekeepingSink>,
    ) -> Controller {
        self.lifecycle = lifecycle;
        self.storage = Some(storage);
        self
    }

    /// Also report `key` (e.g. `logger`, `metrics`) in `get_integration_status`.
    pub fn with_peer_status(mut self, key: &str, status: PeerStatus) -> Controller {
        self.peers.push((key.to_owned(), status));
        self
    }

    /// Where each integration stands: registered or retrying, where the Setup and housekeeping go now.
    fn integration_status(&self) -> Value {
        let registry: Vec<String> = self.lifecycle.iter().filter_map(|l| l.describe()).collect();
        let registry = if registry.is_empty() {
            "Service Registry: not configured".to_owned()
        } else {
            registry.join("; ")
        };
        let (_, records) = self.supervisor.list();
        let mut status = Value::dict([
            ("registry", Value::Str(registry)),
            ("setup", Value::Str(self.setup.describe())),
            (
                "storage",
                Value::Str(
                    self.storage
                        .as_ref()
                        .map(|s| s.describe())
                        .unwrap_or_else(|| "none".into()),
                ),
            ),
            ("processes", Value::Int(records.len() as i64)),
        ]);
        if let Value::Dict(items) = &mut status {
            for (key, describe) in &self.peers {
                items.push((Value::str(key), Value::Str(describe())));
            }
        }
        status
    }

    fn table(&self) -> Arc<ProcessTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn note_origin(&self, id: &str, origin: Origin) {
        self.origins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_owned(), origin);
    }

    /// Definitions from the table's core services and the Setup's devices (those with a table entry).
    async fn desired_definitions(&self) -> Vec<(ProcessDefinition, Origin)> {
        self.desired_from(&self.table()).await
    }

    /// [`Self::desired_definitions`] from a given table (a `reload` dry run reads the file without adopting it).
    async fn desired_from(&self, table: &ProcessTable) -> Vec<(ProcessDefinition, Origin)> {
        let mut out = Vec::new();
        match table.core_definitions() {
            Ok(defs) => out.extend(defs.into_iter().map(|d| (d, Origin::Table))),
            Err(e) => warn!(error = %e, "core service definitions unusable"),
        }
        if let Some(setup) = self.setup.current().await {
            for d in setup.devices() {
                let Some(spec) = device_spec(&d, false) else { continue };
                if let Ok(def) = table.resolve_device(&spec) {
                    if !out.iter().any(|(o, _)| o.id == def.id) {
                        out.push((def, Origin::Setup));
                    }
                }
            }
        }
        out
    }

    /// [`Self::define_all`] on a task of its own, so that the daemon serves (and answers `Ping`) while the
    /// Setup is asked from the Configuration Manager and the definitions are made: with the CGSE services up
    /// that was most of the start-up. Until it is done, every table command waits for it, so no reply ever
    /// shows a half-defined table.
    pub fn define_all_in_background(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        self.defined.send_replace(false);
        let me = self.clone();
        tokio::spawn(async move {
            // Released even if the definitions panic: a waiting command must not wait forever.
            struct Done<'a>(&'a tokio::sync::watch::Sender<bool>);
            impl Drop for Done<'_> {
                fn drop(&mut self) {
                    self.0.send_replace(true);
                }
            }
            let _done = Done(&me.defined);
            me.define_all().await;
        })
    }

    async fn wait_defined(&self) {
        // Every table command passes here: once defined, no receiver is made.
        if *self.defined.borrow() {
            return;
        }
        let mut rx = self.defined.subscribe();
        // The sender lives in `self`: the wait ends when the definitions are done.
        let _ = rx.wait_for(|done| *done).await;
    }

    /// Define everything the table and the Setup describe (at daemon start).
    pub async fn define_all(&self) {
        for (def, origin) in self.desired_definitions().await {
            let id = def.id.clone();
            match self.supervisor.define(def).await {
                Ok(_) => self.note_origin(&id, origin),
                Err(e) => warn!(process = %id, error = %e, "cannot define process"),
            }
        }
    }

    async fn find_device(&self, device_id: &str) -> Option<Device> {
        let setup = self.setup.current().await?;
        // As `find_device_ids`: every device node counts, and a later one with the same id wins.
        setup
            .device_nodes()
            .into_iter()
            .rev()
            .find(|d| d.id_text().as_deref() == Some(device_id))
    }

    /// The definition `start_process` starts for a device: the table's (by device id, or by the Setup's
    /// device class), else `None` when the process is already defined (a core service, or started
    /// before), else the client's legacy launcher.
    /// The origin is `None` for a client-created definition (a legacy launcher).
    async fn definition_for(
        &self,
        cmd: &ProcessCommand,
    ) -> Result<Option<(ProcessDefinition, Option<Origin>)>, CommandError> {
        let table = self.table();
        // A device not in the Setup has no device_args: the client's never fill a table template.
        let spec = match self.find_device(&cmd.device_id).await {
            Some(d) => device_spec(&d, cmd.simulator),
            None => None,
        }
        .unwrap_or_else(|| DeviceSpec {
            device_id: cmd.device_id.clone(),
            device_name: cmd.device_id.clone(),
            device_class: String::new(),
            device_args: Vec::new(),
            simulator: cmd.simulator,
        });
        if let Ok(def) = table.resolve_device(&spec) {
            return Ok(Some((def, Some(Origin::Setup))));
        }
        if self.supervisor.definition(&cmd.device_id).is_some() {
            return Ok(None);
        }
        let Some(cgse_cmd) = &cmd.cgse_cmd else {
            return Err(CommandError::Value(format!(
                "no process definition for device {:?} and no cgse_cmd to fall back on",
                cmd.device_id
            )));
        };
        validate_client_id(&cmd.device_id).map_err(|e| CommandError::Value(e.to_string()))?;
        let launchers = self.launchers().await;
        let def = table
            .legacy_definition(&cmd.device_id, cgse_cmd, &cmd.device_args, cmd.simulator, &launchers)
            .map_err(|e| CommandError::Value(format!("{e}")))?;
        Ok(Some((def, None)))
    }

    /// The device launchers a client may name: the table's `device_commands` and the configured Python's
    /// `cgse.service.device_command` entry points (listed once, by running that Python).
    async fn launchers(&self) -> Arc<Launchers> {
        let mut cached = self.launchers.lock().await;
        if let Some(l) = cached.as_ref() {
            return l.clone();
        }
        let table = self.table();
        let l = match cgse_entry_points(table.python(), ENTRY_POINTS_TIMEOUT).await {
            Ok((device, other)) => Launchers::new(
                table.device_commands(),
                &device,
                &other,
                format!(
                    "device_commands of the table and the entry points of {}",
                    table.python()
                ),
            ),
            Err(e) => {
                warn!(error = %e, "cannot list the device launchers of the configured Python; only the table's device_commands");
                Launchers::new(
                    table.device_commands(),
                    &[],
                    &[],
                    format!("device_commands of the table; the entry points are unknown: {e}"),
                )
            }
        };
        info!(launchers = ?l.permitted, "device launchers a client may name");
        let l = Arc::new(l);
        *cached = Some(l.clone());
        l
    }

    /// Validates a client's `cgse_cmd` and `device_args` — the same way on start, stop and status — and
    /// returns the words of `cgse_cmd` when one was given.
    async fn validate_client(&self, cmd: &ProcessCommand) -> Result<Option<Vec<String>>, CommandError> {
        let refused = |e: &dyn std::fmt::Display, table: &ProcessTable| {
            CommandError::Value(format!(
                "{e}. procman never runs a shell; allowed programs: [{}]",
                table.allowed_programs().join(", ")
            ))
        };
        let table = self.table();
        match &cmd.cgse_cmd {
            Some(c) => {
                let launchers = self.launchers().await;
                table
                    .check_launcher(c, &cmd.device_args, &launchers)
                    .map(Some)
                    .map_err(|e| refused(&e, &table))
            }
            None => validate_client_args(&cmd.device_args)
                .map(|()| None)
                .map_err(|e| refused(&e, &table)),
        }
    }

    async fn start_process(&self, cmd: ProcessCommand) -> Result<Value, CommandError> {
        // Client input is refused before anything else, even when a definition exists.
        self.validate_client(&cmd).await?;
        if let Some((def, origin)) = self.definition_for(&cmd).await? {
            let id = def.id.clone();
            match origin {
                Some(origin) => {
                    self.supervisor.define(def).await.map_err(sup_err)?;
                    self.note_origin(&id, origin);
                }
                None => {
                    self.supervisor.define_client(def).await.map_err(sup_err)?;
                }
            }
        }
        info!(process = %cmd.device_id, simulator = cmd.simulator, "start_process");
        self.supervisor.start(&cmd.device_id).await.map_err(sup_err)?;
        Ok(Value::None)
    }

    async fn stop_process(&self, cmd: ProcessCommand) -> Result<Value, CommandError> {
        self.validate_client(&cmd).await?;
        match self.supervisor.stop(&cmd.device_id).await {
            Ok(()) => {
                info!(process = %cmd.device_id, "stop_process");
                Ok(Value::None)
            }
            Err(SupervisorError::UnknownProcess(_)) => {
                // Not ours: a control server started by hand or by the original tools. Its own launcher
                // can stop it; run it once (argv from the validated cgse_cmd, no shell).
                let Some(c) = &cmd.cgse_cmd else {
                    return Err(CommandError::Value(format!(
                        "no managed process {:?} and no cgse_cmd to stop it with",
                        cmd.device_id
                    )));
                };
                validate_client_id(&cmd.device_id).map_err(|e| CommandError::Value(e.to_string()))?;
                let launchers = self.launchers().await;
                let mut argv = self
                    .table()
                    .launcher_argv(c, &cmd.device_args, &launchers)
                    .map_err(|e| CommandError::Value(e.to_string()))?;
                argv.push("stop".into());
                if let Some(a) = cmd.device_args.first() {
                    argv.push(a.clone());
                }
                let id = format!("{}.stop", cmd.device_id);
                let mut def = ProcessDefinition::new(&id, argv);
                def.restart = RestartPolicy::Never;
                self.supervisor.define_client(def).await.map_err(sup_err)?;
                self.supervisor.start(&id).await.map_err(sup_err)?;
                info!(process = %cmd.device_id, launcher = %id, "stop_process via the device's own launcher");
                Ok(Value::None)
            }
            Err(e) => Err(sup_err(e)),
        }
    }

    /// How to tell whether the control server of a managed or known process is answering.
    async fn cs_reach(&self, id: &str, service_type: &str) -> Reach {
        let managed = self.supervisor.get(id).ok();
        if let Some(r) = &managed {
            if !matches!(r.state, ProcessState::Running | ProcessState::Starting) {
                return Reach::Known(false);
            }
        }
        let endpoint = match self.supervisor.definition(id).and_then(|d| d.readiness.map(|r| r.ping)) {
            Some(t) => self.pinger.endpoint_of(&t).await,
            None => match self.core_endpoints.get(id) {
                Some(e) => Some(e.clone()),
                None => self.pinger.locator().commanding_endpoint(service_type).await,
            },
        };
        match (endpoint, &managed) {
            (Some(ep), _) => Reach::Ping(ep),
            // Managed and running, but no way to reach its control server: trust the process state.
            (None, Some(r)) => Reach::Known(r.state == ProcessState::Running),
            (None, None) => Reach::Known(false),
        }
    }

    /// Is the control server of a managed or known process answering?
    async fn cs_alive(&self, id: &str, service_type: &str) -> bool {
        match self.cs_reach(id, service_type).await {
            Reach::Ping(ep) => self.pinger.ping(&ep).await,
            Reach::Known(alive) => alive,
        }
    }

    async fn core_service_status(&self, cmd: ProcessCommand) -> Result<Value, CommandError> {
        let name = cmd.device_id.clone();
        // Asking about ourselves: we are answering, so we are active (the original deadlocked here).
        let active = if self.self_names.contains(&name) {
            true
        } else {
            let service_type = self
                .core_processes
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, t)| t.clone())
                .unwrap_or_else(|| name.to_uppercase());
            self.cs_alive(&name, &service_type).await
        };
        Ok(Value::dict([
            ("core_service_name", Value::Str(name)),
            ("core_service_is_active", Value::Bool(active)),
        ]))
    }

    async fn device_process_status(&self, cmd: ProcessCommand) -> Result<Value, CommandError> {
        self.validate_client(&cmd).await?;
        let id = cmd.device_id.clone();
        // A control server that announces these commands can say more than a Ping: one connection asks all.
        let (alive, answers) = match self.cs_reach(&id, &id.to_uppercase()).await {
            Reach::Known(alive) => (alive, vec![]),
            Reach::Ping(ep) => match self
                .pinger
                .ping_and_ask(&ep, &["is_connected", "is_simulator_mode"])
                .await
            {
                Some(answers) => (true, answers),
                None => (false, vec![]),
            },
        };
        if !alive {
            return Ok(Value::dict([
                ("device_id", Value::Str(id)),
                ("cs_is_active", Value::Bool(false)),
            ]));
        }
        let mut connected = true;
        let mut simulator = self
            .supervisor
            .get(&id)
            .map(|r| r.definition.simulator)
            .unwrap_or(false);
        if let Some(Some(Value::Bool(b))) = answers.first() {
            connected = *b;
        }
        if let Some(Some(Value::Bool(b))) = answers.get(1) {
            simulator = *b;
        }
        Ok(Value::dict([
            ("device_id", Value::Str(id)),
            ("cs_is_active", Value::Bool(true)),
            ("device_is_connected", Value::Bool(connected)),
            ("is_simulator_mode", Value::Bool(simulator)),
        ]))
    }

    /// Re-read the table and the Setup and apply the difference; with `dry_run` only compute it. The reply is
    /// the plan `{"added": [ids], "removed": [...], "changed": [...], "unchanged": [...], "dry_run": bool}`.
    async fn reload(&self, dry_run: bool) -> Result<Value, CommandError> {
        let table = match &self.table_path {
            Some(p) => Arc::new(ProcessTable::load(p).map_err(|e| CommandError::Failed(e.to_string()))?),
            None => self.table(),
        };
        if !dry_run {
            *self.table.lock().unwrap_or_else(|e| e.into_inner()) = table.clone();
        }
        if !dry_run {
            // The launchers are listed again on next use (the table or the Python may have changed).
            *self.launchers.lock().await = None;
        }
        let desired = self.desired_from(&table).await;
        let (_, records) = self.supervisor.list();
        let mut defs: Vec<ProcessDefinition> = desired.iter().map(|(d, _)| d.clone()).collect();
        // Client-created definitions survive a reload only while their process is alive (a running legacy
        // launcher's server is not stopped by an edit of the table); every other one is dropped.
        for r in &records {
            let keep = self.supervisor.is_client_defined(&r.id) && r.state.is_active();
            if keep && !defs.iter().any(|d| d.id == r.id) {
                if let Some(d) = self.supervisor.definition(&r.id) {
                    defs.push(d);
                }
            }
        }
        let plan = self.supervisor.apply(defs, dry_run).await.map_err(sup_err)?;
        let mut reply = serde_value(&plan);
        if let Value::Dict(items) = &mut reply {
            items.push((Value::str("dry_run"), Value::Bool(dry_run)));
        }
        if dry_run {
            info!(?plan, "reload dry run");
            return Ok(reply);
        }
        let mut origins = self.origins.lock().unwrap_or_else(|e| e.into_inner());
        origins.clear();
        for (d, o) in desired {
            origins.insert(d.id.clone(), o);
        }
        drop(origins);
        info!(?plan, "reload applied");
        Ok(reply)
    }

    /// `list_processes`: `{"seq": n, "processes": [record, ...]}`, written from the table in place.
    fn list_processes(&self) -> Vec<u8> {
        let mut w = PickleWriter::new();
        self.supervisor.visit_records(|seq, records| {
            w.dict(|e| {
                e.key("seq").int(i64::try_from(seq).unwrap_or(i64::MAX));
                e.key("processes").list(records, write_record);
            });
        });
        w.finish()
    }

    /// The table commands answered with a value (`list_processes` is answered in `handle`: it writes its own pickle).
    async fn call(&self, call: Call) -> Result<Value, CommandError> {
        match call.name.as_str() {
            "get_core_processes" => {
                call.bind(&[], 0)?;
                Ok(Value::Dict(
                    self.core_processes
                        .iter()
                        .map(|(k, v)| (Value::str(k), Value::str(v)))
                        .collect(),
                ))
            }
            "get_devices" => {
                call.bind(&[], 0)?;
                Ok(self
                    .setup
                    .current()
                    .await
                    .map(|n| devices_reply(&n.devices()))
                    .unwrap_or(Value::Dict(vec![])))
            }
            "get_device_ids" => {
                call.bind(&[], 0)?;
                Ok(self
                    .setup
                    .current()
                    .await
                    .map(|n| device_ids_reply(&n.device_nodes()))
                    .unwrap_or(Value::Dict(vec![])))
            }
            "start_process" => {
                let arg = one_arg(call, "start_cmd")?;
                self.start_process(ProcessCommand::from_value(&arg, "StartCommand")?)
                    .await
            }
            "stop_process" => {
                let arg = one_arg(call, "stop_cmd")?;
                self.stop_process(ProcessCommand::from_value(&arg, "StopCommand")?)
                    .await
            }
            "get_core_service_status" => {
                let arg = one_arg(call, "status_cmd")?;
                self.core_service_status(ProcessCommand::from_value(&arg, "StatusCommand")?)
                    .await
            }
            "get_device_process_status" => {
                let arg = one_arg(call, "status_cmd")?;
                self.device_process_status(ProcessCommand::from_value(&arg, "StatusCommand")?)
                    .await
            }
            "restart_process" => {
                let id = process_id(one_arg(call, "process_id")?)?;
                self.supervisor.restart(&id).await.map_err(sup_err)?;
                Ok(Value::None)
            }
            "get_process_log" => {
                let mut b = call.bind(&["process_id", "lines"], 2)?;
                let lines = b.pop().flatten().unwrap_or(Value::None);
                let id = process_id(b.pop().flatten().unwrap_or(Value::None))?;
                let n = match lines.as_i64() {
                    Some(n) if (0..=100_000).contains(&n) => n as usize,
                    _ => {
                        return Err(CommandError::Value(format!(
                            "lines must be 0..100000, got {}",
                            py_repr(&lines)
                        )))
                    }
                };
                let tail = self.supervisor.log_tail(&id, n).map_err(sup_err)?;
                Ok(Value::List(tail.into_iter().map(Value::Str).collect()))
            }
            "reload" => {
                let dry_run = match call.bind(&["dry_run"], 0)?.pop().flatten() {
                    None | Some(Value::None) | Some(Value::Bool(false)) => false,
                    Some(Value::Bool(true)) => true,
                    Some(other) => {
                        return Err(CommandError::Type(format!(
                            "dry_run must be a bool, got {}",
                            py_repr(&other)
                        )))
                    }
                };
                self.reload(dry_run).await
            }
            "get_integration_status" => {
                call.bind(&[], 0)?;
                Ok(self.integration_status())
            }
            other => Err(CommandError::Unknown(other.to_owned())),
        }
    }
}

fn one_arg(call: Call, name: &str) -> Result<Value, CommandError> {
    Ok(call.bind(&[name], 1)?.swap_remove(0).unwrap_or(Value::None))
}

fn process_id(v: Value) -> Result<String, CommandError> {
    match v {
        Value::Str(s) => Ok(s),
        other => Err(CommandError::Type(format!(
            "process_id must be a str, got {}",
            py_repr(&other)
        ))),
    }
}

/// The supervisor's view of a Setup device (devices without an id cannot be managed).
fn device_spec(d: &Device, simulator: bool) -> Option<DeviceSpec> {
    Some(DeviceSpec {
        device_id: d.id_text()?,
        device_name: d.name.clone(),
        device_class: d.device.as_str().unwrap_or_default().to_owned(),
        device_args: d.args_text(),
        simulator,
    })
}

impl Handler for Controller {
    fn handle(&self, call: Call) -> HandlerFuture<'_> {
        Box::pin(async move {
            self.wait_defined().await;
            if call.name == "list_processes" {
                call.bind(&[], 0)?;
                return Ok(Reply::Pickled(self.list_processes()));
            }
            self.call(call).await.map(Reply::from)
        })
    }
}

/// Process counts for housekeeping, from the supervisor's snapshot.
pub struct SupervisorCounts(pub SupervisorHandle);

impl CountProcesses for SupervisorCounts {
    fn counts(&self) -> ProcessCounts {
        let (_, records) = self.0.list();
        let mut c = ProcessCounts {
            total: records.len() as u64,
            ..Default::default()
        };
        for r in &records {
            c.restarts += u64::from(r.restarts);
            match r.state {
                ProcessState::Running => c.running += 1,
                ProcessState::Starting => c.starting += 1,
                ProcessState::Backoff => c.backoff += 1,
                ProcessState::Stopping => c.stopping += 1,
                ProcessState::Stopped => c.stopped += 1,
                ProcessState::Exited => c.exited += 1,
                ProcessState::Fatal => c.fatal += 1,
            }
        }
        c
    }
}

/// A process event as published on the monitoring socket: a dict with a sequence number, so a
/// subscriber can tell it missed one (a gap) and resynchronise with `list_processes`.
pub fn event_value(e: &ProcessEvent) -> Value {
    let opt = |v: Option<i32>| v.map(|x| Value::Int(i64::from(x))).unwrap_or(Value::None);
    Value::dict([
        ("event", Value::str("process_state")),
        ("seq", Value::Int(e.seq as i64)),
        (
            "kind",
            Value::str(if matches!(e.kind, crate::supervisor::EventKind::Removed) {
                "removed"
            } else {
                "state"
            }),
        ),
        ("id", Value::str(&e.id)),
        ("old_state", Value::str(e.old_state.as_str())),
        ("new_state", Value::str(e.new_state.as_str())),
        ("pid", opt(e.pid)),
        ("exit_code", opt(e.exit_code)),
        ("exit_signal", opt(e.exit_signal)),
        ("time", Value::Float(e.time)),
    ])
}

/// How a status command learns whether a control server answers.
enum Reach {
    /// `Ping` it here.
    Ping(String),
    /// Known without asking (not running, or nothing to ping: the process state decides).
    Known(bool),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::{DefinitionSummary, ProcessRecord};

    fn record(d: Desired, ready: Option<bool>) -> ProcessRecord {
        ProcessRecord {
            id: "DUMMY_01".into(),
            state: ProcessState::Running,
            pid: Some(1234),
            pgid: Some(1234),
            start_time: Some(1_795_691_412.25),
            uptime_s: Some(3.5),
            exit_code: None,
            exit_signal: Some(9),
            restarts: 2,
            last_error: Some("exited with signal 9".into()),
            argv: vec!["python3".into(), "-m".into(), "egse.dummy.dummy_cs".into()],
            cwd: Some("/tmp".into()),
            env: [("PROCMAN_ID".to_owned(), "DUMMY_01".to_owned())].into_iter().collect(),
            ready,
            stdout_log: "/log/DUMMY_01.stdout.log".into(),
            stderr_log: "/log/DUMMY_01.stderr.log".into(),
            log_dropped_bytes: 7,
            adopted: true,
            desired: d,
            definition: DefinitionSummary {
                restart: RestartPolicy::OnFailure,
                forking: false,
                simulator: true,
                autostart: false,
                stop_signal: "SIGTERM".into(),
                stop_timeout_s: 10.0,
                readiness: Some("registry DUMMY_01".into()),
                service_type: None,
                inherit_env: true,
            },
        }
    }

    /// A Setup source that answers only once told to: a Configuration Manager slow to answer.
    struct HeldSetup(tokio::sync::watch::Receiver<bool>);

    impl SetupSource for HeldSetup {
        fn current(&self) -> crate::setup::SetupFuture<'_> {
            Box::pin(async move {
                let mut rx = self.0.clone();
                let _ = rx.wait_for(|open| *open).await;
                None
            })
        }

        fn describe(&self) -> String {
            "held".into()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn table_commands_wait_for_the_definitions_made_in_the_background() {
        let dir = std::env::temp_dir().join(format!("procman-ctl-{}", uuid::Uuid::new_v4()));
        let table = ProcessTable::from_yaml(
            "python: python3\nallowed_programs: []\ncore_services:\n  HELD_01: {argv: [sleep, '1000'], autostart: false}\n",
            "test",
        )
        .expect("table");
        let (events, _rx) = tokio::sync::mpsc::channel(64);
        let supervisor = crate::supervisor::Supervisor::spawn(
            crate::supervisor::SupervisorConfig::new(dir.join("state"), dir.join("logs")),
            Vec::new(),
            events,
            None,
        )
        .expect("supervisor");
        let (open, held) = tokio::sync::watch::channel(false);
        let controller = Arc::new(Controller::new(
            Vec::new(),
            Arc::new(HeldSetup(held)),
            Arc::new(table),
            None,
            supervisor.clone(),
            Pinger::new(Arc::new(crate::probe::NoLocator), std::time::Duration::from_secs(1)),
            HashMap::new(),
            Vec::new(),
        ));
        let list = |c: Arc<Controller>| async move {
            let call = Call {
                name: "list_processes".into(),
                args: Vec::new(),
                kwargs: Vec::new(),
            };
            match c.handle(call).await {
                Ok(Reply::Pickled(bytes)) => crate::codec::decode(&bytes, &crate::codec::Limits::default()).ok(),
                _ => None,
            }
        };
        // Nothing to wait for before the background definitions begin.
        assert!(list(controller.clone()).await.is_some());

        let defining = controller.define_all_in_background();
        let waiting = tokio::spawn(list(controller.clone()));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "answered before the definitions were made");

        open.send_replace(true);
        defining.await.expect("definitions");
        let reply = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("answered once defined")
            .expect("task")
            .expect("a list_processes reply");
        let Value::Dict(items) = &reply else {
            panic!("not a dict: {reply:?}")
        };
        let Some(Value::List(records)) = crate::codec::dict_get(items, "processes") else {
            panic!("no processes in {reply:?}")
        };
        assert_eq!(records.len(), 1, "{records:?}");
        supervisor.shutdown(false).await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_written_record_equals_its_serde_form() {
        for r in [record(Desired::Running, Some(true)), record(Desired::Stopped, None)] {
            let mut w = PickleWriter::new();
            let view = RecordView {
                record: &r,
                uptime_s: r.uptime_s,
                log_dropped_bytes: r.log_dropped_bytes,
            };
            write_record(&mut w, view);
            let back = crate::codec::decode(&w.finish(), &crate::codec::Limits::default()).expect("decodes");
            assert_eq!(back, serde_value(&r));
        }
    }
}
