//! `Proxy`, `ProcessManagerProxy`, `ServiceProxy` and the methods built from `send_commands`.
//!
//! Each proxy owns a [`ProxyCore`] and a current-thread tokio runtime. Every request runs through
//! [`block_on`]: without the GIL, in slices of [`SLICE`], with `check_signals()` between slices so that
//! Ctrl-C interrupts a request that waits for a silent server.

use std::future::Future;
use std::time::Duration;

use pyo3::exceptions::{PyConnectionError, PyNotImplementedError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use pyo3::{PyTraverseError, PyVisit};
use tokio::runtime::Runtime;

use super::convert::{from_py, to_py};
use super::errors::{config_error, endpoint_error, log};
use crate::codec::Value;
use crate::config::{Env, PmSettings, Settings};
use crate::daemon::DaemonConfig;
use crate::objects::PROCMAN_MODULE;
use crate::proxy::{
    self as core, Endpoint, LoadOutcome, ProxyCore, SendError, StatusError, NOT_CONNECTED_IN_CONTEXT, PING_TIMEOUT,
};

/// How long a request runs without the GIL before signals are checked.
pub const SLICE: Duration = Duration::from_millis(50);

/// The commanding-table commands a `ProcessManagerProxy` declares before they are loaded.
const PM_INTERFACE: [&str; 12] = [
    "get_core_processes",
    "get_devices",
    "get_device_ids",
    "start_process",
    "stop_process",
    "get_core_service_status",
    "get_device_process_status",
    "list_processes",
    "restart_process",
    "get_process_log",
    "reload",
    "get_integration_status",
];

/// The service commands a `ServiceProxy` declares before they are loaded.
const SERVICE_INTERFACE: [&str; 12] = [
    "set_monitoring_frequency",
    "set_hk_frequency",
    "set_logging_level",
    "quit_server",
    "get_process_status",
    "get_cs_module",
    "get_average_execution_times",
    "get_storage_mnemonic",
    "add_listener",
    "remove_listener",
    "get_listener_names",
    "register_to_storage",
];

/// A runtime for one proxy (or one blocking call).
pub fn runtime() -> PyResult<Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start an I/O runtime: {e}")))
}

/// Drive `fut` to completion on `rt` with the GIL released; between slices of [`SLICE`] run Python's
/// signal handlers, and give up (dropping `fut`) if one raises, e.g. `KeyboardInterrupt`.
pub fn block_on<F>(py: Python<'_>, rt: &Runtime, fut: F) -> PyResult<F::Output>
where
    F: Future + Send,
    F::Output: Send,
{
    let mut fut = std::pin::pin!(fut);
    loop {
        let slice = py.detach(|| rt.block_on(async { tokio::time::timeout(SLICE, fut.as_mut()).await }));
        match slice {
            Ok(out) => return Ok(out),
            Err(_) => py.check_signals()?,
        }
    }
}

/// A number of seconds from Python.
fn seconds(value: f64, what: &str) -> PyResult<Duration> {
    if (0.0..1e9).contains(&value) {
        Ok(Duration::from_secs_f64(value))
    } else {
        Err(PyValueError::new_err(format!(
            "{what} must be a number of seconds >= 0, got {value}"
        )))
    }
}

/// A new `egse.procman.Failure(message)`.
fn failure<'py>(py: Python<'py>, message: &str) -> PyResult<Bound<'py, PyAny>> {
    py.import(PROCMAN_MODULE)?.getattr("Failure")?.call1((message,))
}

fn is_failure(obj: &Bound<'_, PyAny>) -> PyResult<bool> {
    let cls = obj.py().import(PROCMAN_MODULE)?.getattr("Failure")?;
    obj.is_instance(&cls)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Generic,
    ProcessManager,
    Service,
}

impl Kind {
    fn interface(self) -> &'static [&'static str] {
        match self {
            Kind::Generic => &[],
            Kind::ProcessManager => &PM_INTERFACE,
            Kind::Service => &SERVICE_INTERFACE,
        }
    }
}

/// A proxy for any CGSE control server: `Proxy(endpoint, timeout=30.0)`.
#[pyclass(name = "Proxy", module = "egse.procman", subclass, dict, weakref)]
pub struct PyProxy {
    // Dropped before the runtime it was used with.
    core: ProxyCore,
    rt: Runtime,
    kind: Kind,
}

impl PyProxy {
    fn build(rt: Runtime, endpoint: Endpoint, timeout: f64, kind: Kind) -> PyResult<PyProxy> {
        let timeout = seconds(timeout, "timeout")?;
        Ok(PyProxy {
            core: ProxyCore::new(endpoint, timeout),
            rt,
            kind,
        })
    }

    fn class_name(slf: &Bound<'_, Self>) -> String {
        slf.get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "Proxy".into())
    }

    /// One request; an unanswered one gives the original's `Failure` (logged as critical).
    fn send_value<'py>(
        slf: &Bound<'py, Self>,
        request: &Value,
        retries: u32,
        timeout: Option<Duration>,
        text: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let outcome = {
            let mut guard = slf.try_borrow_mut()?;
            let this = &mut *guard;
            let r = block_on(py, &this.rt, this.core.send(request, retries, timeout, text));
            if r.is_err() {
                this.core.abandon();
            }
            r?
        };
        match outcome {
            Ok(v) => to_py(py, &v),
            Err(SendError::Offline(message)) => {
                log(py, "critical", &message);
                failure(py, &message)
            }
            Err(SendError::Decode(message)) => Err(PyValueError::new_err(message)),
        }
    }

    fn send_name<'py>(slf: &Bound<'py, Self>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        Self::send_value(slf, &Value::str(name), 0, None, name)
    }

    /// What the constructor does after `__new__`: connect, `Ping`, load the commands if it answers.
    fn handshake(slf: &Bound<'_, Self>) -> PyResult<()> {
        slf.try_borrow_mut()?.core.connect();
        if Self::ping(slf)? {
            Self::load_commands(slf)?;
        } else {
            let endpoint = slf.try_borrow()?.core.endpoint().to_owned();
            log(
                slf.py(),
                "warning",
                &format!(
                    "{} could not connect to its control server at {endpoint}. No commands have been loaded.",
                    Self::class_name(slf)
                ),
            );
        }
        Ok(())
    }

    /// Make the loaded commands methods of this instance (`__name__`/`__doc__` from the command).
    fn install_commands(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let (commands, kind) = {
            let this = slf.try_borrow()?;
            let commands: Vec<(String, Option<String>)> = this
                .core
                .commands()
                .iter()
                .map(|c| (c.name.clone(), c.doc.clone()))
                .collect();
            (commands, this.kind)
        };
        let ty = slf.get_type();
        for (name, doc) in commands {
            if ty.hasattr(name.as_str())? && !kind.interface().contains(&name.as_str()) {
                log(
                    py,
                    "warning",
                    &format!(
                        "{} already has an attribute '{name}', not overwriting.",
                        Self::class_name(slf)
                    ),
                );
                continue;
            }
            let method = Bound::new(
                py,
                DynamicCommand {
                    proxy: Some(slf.clone().unbind()),
                    name: name.clone(),
                },
            )?;
            method.setattr("__name__", name.as_str())?;
            method.setattr("__doc__", doc)?;
            slf.setattr(name.as_str(), method)?;
        }
        Ok(())
    }

    /// Call a loaded command: validate the arguments like the original (log and return None when they
    /// do not fit), then send a `CommandExecution`.
    fn call_command<'py>(
        slf: &Bound<'py, Self>,
        name: &str,
        args: &Bound<'py, PyTuple>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let info = slf.try_borrow()?.core.command(name).cloned().ok_or_else(|| {
            PyNotImplementedError::new_err(format!("the control server did not announce the command '{name}'"))
        })?;
        let nkwargs = kwargs.map(|k| k.len()).unwrap_or(0);
        if let Err(message) = info.validate(args.len(), nkwargs) {
            log(py, "error", &message.to_string());
            return Ok(py.None().into_bound(py));
        }
        let mut arg_values = Vec::with_capacity(args.len());
        let mut arg_texts = Vec::with_capacity(args.len());
        for a in args.iter() {
            arg_values.push(from_py(&a)?);
            arg_texts.push(a.str()?.to_string());
        }
        let mut kw_values = Vec::with_capacity(nkwargs);
        let mut kw_texts = Vec::with_capacity(nkwargs);
        if let Some(kwargs) = kwargs {
            for (k, v) in kwargs.iter() {
                let key = k.str()?.to_string();
                kw_values.push((Value::Str(key.clone()), from_py(&v)?));
                kw_texts.push((key, v.str()?.to_string()));
            }
        }
        let text = core::execution_text(&info.class_name, name, &arg_texts, &kw_texts);
        Self::send_value(slf, &info.execution(arg_values, kw_values), 0, None, &text)
    }
}

#[pymethods]
impl PyProxy {
    #[new]
    #[pyo3(signature = (endpoint, timeout = 30.0))]
    fn new(py: Python<'_>, endpoint: &str, timeout: f64) -> PyResult<PyProxy> {
        let e = match Endpoint::split(endpoint) {
            // A hostname goes to the system resolver: without the GIL, so other Python threads go on.
            Some((protocol, host, port)) => py.detach(|| Endpoint::new(&protocol, &host, port)),
            None => {
                return Err(PyValueError::new_err(format!(
                    "endpoint '{endpoint}' is not of the form <protocol>://<host>:<port>"
                )))
            }
        };
        PyProxy::build(runtime()?, e, timeout, Kind::Generic)
    }

    /// Connect, `Ping`, and load the commands when the server answers (as the original constructor).
    #[pyo3(signature = (*args, **kwargs))]
    fn __init__(slf: &Bound<'_, Self>, args: &Bound<'_, PyTuple>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<()> {
        let _ = (args, kwargs);
        Self::handshake(slf)
    }

    fn __enter__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, Self>> {
        {
            let mut this = slf.try_borrow_mut()?;
            if !this.core.has_connection() {
                this.core.connect();
            }
        }
        if !Self::ping(slf)? {
            return Err(PyConnectionError::new_err(NOT_CONNECTED_IN_CONTEXT));
        }
        if !slf.try_borrow()?.core.has_commands() {
            Self::load_commands(slf)?;
        }
        Ok(slf.clone())
    }

    #[pyo3(signature = (*exc_info))]
    fn __exit__(slf: &Bound<'_, Self>, exc_info: &Bound<'_, PyTuple>) -> PyResult<()> {
        let _ = exc_info;
        slf.try_borrow_mut()?.core.disconnect();
        Ok(())
    }

    fn __repr__(slf: &Bound<'_, Self>) -> PyResult<String> {
        Ok(format!(
            "<{} {}>",
            Self::class_name(slf),
            slf.try_borrow()?.core.endpoint()
        ))
    }

    /// Ready the connection to the control server.
    fn connect_cs(&mut self) {
        self.core.connect();
    }

    /// Close the connection (a later request connects again).
    fn disconnect_cs(&mut self) {
        self.core.disconnect();
    }

    /// Close and open the connection.
    fn reconnect_cs(&mut self) {
        self.core.connect();
    }

    /// Close and open the connection.
    fn reset_cs_connection(&mut self) {
        self.core.disconnect();
        self.core.connect();
    }

    /// True if the control server answers a `Ping`.
    fn is_cs_connected(slf: &Bound<'_, Self>) -> PyResult<bool> {
        Self::ping(slf)
    }

    /// `Ping` with a 1 s timeout; True on `Pong`.
    fn ping(slf: &Bound<'_, Self>) -> PyResult<bool> {
        let reply = Self::send_value(slf, &Value::str("Ping"), 0, Some(PING_TIMEOUT), "Ping")?;
        Ok(reply.extract::<String>().map(|s| s == "Pong").unwrap_or(false))
    }

    /// Send any value and return the decoded reply, or a `Failure` when no reply comes in time.
    #[pyo3(signature = (data, retries = 0, timeout = None))]
    fn send<'py>(
        slf: &Bound<'py, Self>,
        data: &Bound<'py, PyAny>,
        retries: u32,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let request = from_py(data)?;
        let timeout = timeout.map(|t| seconds(t, "timeout")).transpose()?;
        let text = data.str()?.to_string();
        Self::send_value(slf, &request, retries, timeout, &text)
    }

    /// The endpoint, e.g. `tcp://localhost:6120`.
    fn get_endpoint(&self) -> String {
        self.core.endpoint().to_owned()
    }

    fn get_commanding_port<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        Self::send_name(slf, "get_commanding_port")
    }

    fn get_monitoring_port<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        Self::send_name(slf, "get_monitoring_port")
    }

    fn get_service_port<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        Self::send_name(slf, "get_service_port")
    }

    fn get_ip_address<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        Self::send_name(slf, "get_ip_address")
    }

    /// A `ServiceProxy` for the same host and the service port the server reports.
    fn get_service_proxy<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let port = Self::send_name(slf, "get_service_port")?;
        if is_failure(&port)? {
            return Err(PyErr::from_value(port));
        }
        let endpoint = slf.try_borrow()?.core.endpoint().to_owned();
        let (protocol, host, _) = Endpoint::split(&endpoint)
            .ok_or_else(|| PyValueError::new_err(format!("cannot split the endpoint '{endpoint}'")))?;
        let kwargs = PyDict::new(py);
        kwargs.set_item("protocol", protocol)?;
        kwargs.set_item("hostname", host)?;
        kwargs.set_item("port", port)?;
        py.get_type::<ServiceProxy>().call((), Some(&kwargs))
    }

    /// Ask the server for its commands and make them methods of this proxy.
    fn load_commands(slf: &Bound<'_, Self>) -> PyResult<bool> {
        let py = slf.py();
        if !Self::ping(slf)? {
            log(
                py,
                "warning",
                &format!("{} is not connected, try to reconnect.", Self::class_name(slf)),
            );
            return Ok(false);
        }
        let outcome = {
            let mut guard = slf.try_borrow_mut()?;
            let this = &mut *guard;
            let r = block_on(py, &this.rt, this.core.request_commands());
            if r.is_err() {
                this.core.abandon();
            }
            r?
        };
        match outcome {
            LoadOutcome::Loaded(_) => {
                Self::install_commands(slf)?;
                Ok(true)
            }
            LoadOutcome::NotConnected => Ok(false),
            LoadOutcome::Failed(message) => {
                log(
                    py,
                    "warning",
                    &format!("Failed to request commands for {}: {message}", Self::class_name(slf)),
                );
                Ok(false)
            }
        }
    }

    /// The names of the loaded commands.
    fn get_commands(&self) -> Vec<String> {
        self.core.command_names()
    }

    /// True if commands have been loaded.
    fn has_commands(&self) -> bool {
        self.core.has_commands()
    }

    fn __traverse__(&self, _visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        Ok(())
    }
}

fn not_loaded(class: &str, name: &str) -> PyErr {
    PyNotImplementedError::new_err(format!(
        "{class}.{name}() is not available: the commands were not loaded from the control server (is it running? \
         call load_commands())"
    ))
}

/// The client of the Process Manager's commanding port.
#[pyclass(module = "egse.procman", extends = PyProxy, subclass)]
pub struct ProcessManagerProxy;

#[pymethods]
impl ProcessManagerProxy {
    /// Defaults come from the settings (`PROTOCOL`, `HOSTNAME`, `COMMANDING_PORT`, `PROXY_TIMEOUT`);
    /// port 0 asks the Service Registry.
    #[new]
    #[pyo3(signature = (protocol = None, hostname = None, port = None, timeout = None))]
    fn new(
        py: Python<'_>,
        protocol: Option<String>,
        hostname: Option<String>,
        port: Option<i64>,
        timeout: Option<f64>,
    ) -> PyResult<PyClassInitializer<Self>> {
        let pm = if protocol.is_none() || hostname.is_none() || port.is_none() || timeout.is_none() {
            let settings = Settings::load(None, &Env::from_process()).map_err(config_error)?;
            Some(PmSettings::from_settings(&settings).map_err(config_error)?)
        } else {
            None
        };
        let protocol = protocol
            .or_else(|| pm.as_ref().map(|p| p.protocol.clone()))
            .unwrap_or_default();
        let hostname = hostname
            .or_else(|| pm.as_ref().map(|p| p.hostname.clone()))
            .unwrap_or_default();
        let port = port
            .or_else(|| pm.as_ref().map(|p| i64::from(p.commanding_port)))
            .unwrap_or(0);
        let timeout = timeout
            .or_else(|| pm.as_ref().map(|p| p.proxy_timeout.as_secs_f64()))
            .unwrap_or(10.0);
        let rt = runtime()?;
        let endpoint = block_on(
            py,
            &rt,
            core::process_manager_endpoint(&protocol, &hostname, port, || DaemonConfig::load(None)),
        )?
        .map_err(endpoint_error)?;
        Ok(PyClassInitializer::from(PyProxy::build(rt, endpoint, timeout, Kind::ProcessManager)?).add_subclass(Self))
    }

    /// Connect, `Ping`, and load the commands when the server answers.
    #[pyo3(signature = (*args, **kwargs))]
    fn __init__(slf: &Bound<'_, Self>, args: &Bound<'_, PyTuple>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<()> {
        let _ = (args, kwargs);
        PyProxy::handshake(slf.as_super())
    }

    /// The core CGSE services: name → registry service type.
    fn get_core_processes(&self) -> PyResult<Py<PyAny>> {
        Err(not_loaded("ProcessManagerProxy", "get_core_processes"))
    }

    /// The devices of the current Setup: name → (device, device id, device args).
    fn get_devices(&self) -> PyResult<Py<PyAny>> {
        Err(not_loaded("ProcessManagerProxy", "get_devices"))
    }

    /// The devices of the current Setup by id: id → (name, device, device args).
    fn get_device_ids(&self) -> PyResult<Py<PyAny>> {
        Err(not_loaded("ProcessManagerProxy", "get_device_ids"))
    }

    /// Start a process (a `StartCommand`).
    fn start_process(&self, start_cmd: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let _ = start_cmd;
        Err(not_loaded("ProcessManagerProxy", "start_process"))
    }

    /// Stop a process (a `StopCommand`).
    fn stop_process(&self, stop_cmd: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let _ = stop_cmd;
        Err(not_loaded("ProcessManagerProxy", "stop_process"))
    }

    /// The status of a core service (a `StatusCommand`).
    fn get_core_service_status(&self, status_cmd: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let _ = status_cmd;
        Err(not_loaded("ProcessManagerProxy", "get_core_service_status"))
    }

    /// The status of a device process (a `StatusCommand`).
    fn get_device_process_status(&self, status_cmd: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let _ = status_cmd;
        Err(not_loaded("ProcessManagerProxy", "get_device_process_status"))
    }

    /// Every managed process with its state record, and the event sequence number of the snapshot.
    fn list_processes(&self) -> PyResult<Py<PyAny>> {
        Err(not_loaded("ProcessManagerProxy", "list_processes"))
    }

    /// Stop (if needed) and start a managed process with its current definition.
    fn restart_process(&self, process_id: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let _ = process_id;
        Err(not_loaded("ProcessManagerProxy", "restart_process"))
    }

    /// The last `lines` lines of a managed process's output.
    fn get_process_log(&self, process_id: &Bound<'_, PyAny>, lines: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let _ = (process_id, lines);
        Err(not_loaded("ProcessManagerProxy", "get_process_log"))
    }

    /// Re-read the process definitions and the Setup, apply the differences, return the plan.
    fn reload(&self) -> PyResult<Py<PyAny>> {
        Err(not_loaded("ProcessManagerProxy", "reload"))
    }

    /// Where the registry registration, the Setup and the housekeeping stand now.
    fn get_integration_status(&self) -> PyResult<Py<PyAny>> {
        Err(not_loaded("ProcessManagerProxy", "get_integration_status"))
    }

    /// What `pm_cs status` shows, as a dict: `hostname`, `commanding_port`, `monitoring_port`, `service_port`,
    /// `registry`, `setup`, `housekeeping`, `processes` (count by state), `process_count`. A `Failure` when the
    /// server does not answer, or does not announce `get_integration_status`/`list_processes`.
    fn get_status<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let outcome = {
            let mut guard = slf.as_super().try_borrow_mut()?;
            let this = &mut *guard;
            let r = block_on(py, &this.rt, this.core.process_manager_status());
            if r.is_err() {
                this.core.abandon();
            }
            r?
        };
        match outcome {
            Ok(v) => to_py(py, &v),
            Err(StatusError::Send(SendError::Decode(message))) => Err(PyValueError::new_err(message)),
            Err(e) => {
                let message = e.to_string();
                if matches!(e, StatusError::Send(SendError::Offline(_))) {
                    log(py, "critical", &message);
                }
                failure(py, &message)
            }
        }
    }
}

/// The client of a control server's service port.
#[pyclass(module = "egse.procman", extends = PyProxy, subclass)]
pub struct ServiceProxy;

#[pymethods]
impl ServiceProxy {
    #[new]
    #[pyo3(signature = (service_type = None, protocol = "tcp", hostname = None, port = None, timeout = 30.0))]
    fn new(
        py: Python<'_>,
        service_type: Option<String>,
        protocol: &str,
        hostname: Option<String>,
        port: Option<i64>,
        timeout: f64,
    ) -> PyResult<PyClassInitializer<Self>> {
        let rt = runtime()?;
        let endpoint = match (hostname, port) {
            (Some(h), Some(p)) => {
                let p = u16::try_from(p).map_err(|_| PyValueError::new_err(format!("port {p} is not a TCP port")))?;
                py.detach(|| Endpoint::new(protocol, &h, p))
            }
            _ => {
                let Some(service_type) = service_type else {
                    return Err(PyValueError::new_err(
                        "No service_type or hostname/port information provided.\nI need either the service_type or \
                         the endpoint information to create a ServiceProxy.\n",
                    ));
                };
                let config = DaemonConfig::load(None).map_err(config_error)?;
                block_on(py, &rt, core::service_endpoint_for_type(&service_type, &config))?.map_err(endpoint_error)?
            }
        };
        Ok(PyClassInitializer::from(PyProxy::build(rt, endpoint, timeout, Kind::Service)?).add_subclass(Self))
    }

    /// Connect, `Ping`, and load the commands when the server answers.
    #[pyo3(signature = (*args, **kwargs))]
    fn __init__(slf: &Bound<'_, Self>, args: &Bound<'_, PyTuple>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<()> {
        let _ = (args, kwargs);
        PyProxy::handshake(slf.as_super())
    }

    fn set_monitoring_frequency(&self, freq: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let _ = freq;
        Err(not_loaded("ServiceProxy", "set_monitoring_frequency"))
    }

    fn set_hk_frequency(&self, freq: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let _ = freq;
        Err(not_loaded("ServiceProxy", "set_hk_frequency"))
    }

    fn set_logging_level(&self, name: &Bound<'_, PyAny>, level: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let _ = (name, level);
        Err(not_loaded("ServiceProxy", "set_logging_level"))
    }

    fn quit_server(&self) -> PyResult<Py<PyAny>> {
        Err(not_loaded("ServiceProxy", "quit_server"))
    }

    fn get_process_status(&self) -> PyResult<Py<PyAny>> {
        Err(not_loaded("ServiceProxy", "get_process_status"))
    }

    fn get_cs_module(&self) -> PyResult<Py<PyAny>> {
        Err(not_loaded("ServiceProxy", "get_cs_module"))
    }

    fn get_average_execution_times(&self) -> PyResult<Py<PyAny>> {
        Err(not_loaded("ServiceProxy", "get_average_execution_times"))
    }

    fn get_storage_mnemonic(&self) -> PyResult<Py<PyAny>> {
        Err(not_loaded("ServiceProxy", "get_storage_mnemonic"))
    }

    fn add_listener(&self, listener: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let _ = listener;
        Err(not_loaded("ServiceProxy", "add_listener"))
    }

    fn remove_listener(&self, listener: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let _ = listener;
        Err(not_loaded("ServiceProxy", "remove_listener"))
    }

    fn get_listener_names(&self) -> PyResult<Py<PyAny>> {
        Err(not_loaded("ServiceProxy", "get_listener_names"))
    }

    fn register_to_storage(&self) -> PyResult<Py<PyAny>> {
        Err(not_loaded("ServiceProxy", "register_to_storage"))
    }
}

/// A command announced by the control server, bound to its proxy: calling it validates the arguments
/// and sends a `CommandExecution`. `__name__` and `__doc__` come from the command object.
#[pyclass(module = "egse.procman", dict)]
pub struct DynamicCommand {
    proxy: Option<Py<PyProxy>>,
    name: String,
}

#[pymethods]
impl DynamicCommand {
    #[pyo3(signature = (*args, **kwargs))]
    fn __call__<'py>(
        &self,
        py: Python<'py>,
        args: &Bound<'py, PyTuple>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let proxy = self
            .proxy
            .as_ref()
            .ok_or_else(|| PyRuntimeError::new_err("the proxy of this command is gone"))?
            .bind(py)
            .clone();
        PyProxy::call_command(&proxy, &self.name, args, kwargs)
    }

    fn __repr__(&self) -> String {
        format!("<command {}>", self.name)
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        if let Some(p) = &self.proxy {
            visit.call(p)?;
        }
        Ok(())
    }

    fn __clear__(&mut self) {
        self.proxy = None;
    }
}
