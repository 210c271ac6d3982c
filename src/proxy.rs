//! The client side of a CGSE proxy (what `egse.proxy.Proxy` does), without Python.
//!
//! The Python bindings wrap [`ProxyCore`] in `ProcessManagerProxy` and `ServiceProxy`; everything they
//! decide — when a request counts as off-line, what the `Failure` text says, how the announced commands
//! validate their arguments, where a proxy connects — is here and tested with `cargo test`.
//!
//! Connection model: like the original, "connecting" only marks the proxy as ready; the socket is
//! created by the next request. After a timeout the socket is dropped (a REQ socket that missed a reply
//! is unusable) and the next request connects afresh, so a timed-out proxy stays usable.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::client::{self, ClientError, ControlClient};
use crate::codec::Value;
use crate::config::PmSettings;
use crate::daemon::DaemonConfig;
use crate::protocol;
use crate::transport;

/// How long `ping()` waits for its `Pong`.
pub const PING_TIMEOUT: Duration = Duration::from_secs(1);

/// The `ConnectionError` text of a context entry without a `Pong` (the original's wording).
pub const NOT_CONNECTED_IN_CONTEXT: &str = "Proxy is not connected when entering the context.";

/// The `Failure` message of a request that got no reply.
pub fn offline_message(request: &str) -> String {
    format!("Control Server seems to be off-line, abandoning ({request})")
}

/// How the original prints a `CommandExecution` in that message: `[Class] name(arg, key=value)`.
pub fn execution_text(class_name: &str, name: &str, args: &[String], kwargs: &[(String, String)]) -> String {
    let mut parts: Vec<String> = args.to_vec();
    parts.extend(kwargs.iter().map(|(k, v)| format!("{k}={v}")));
    format!("[{class_name}] {name}({})", parts.join(", "))
}

/// Why a request has no reply value.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No reply within the timeout (or the connection failed): the caller gets a `Failure` with this text.
    #[error("{0}")]
    Offline(String),
    /// A reply came but is not a pickle we can read.
    #[error("{0}")]
    Decode(String),
}

/// The endpoint a proxy shows (`get_endpoint()`, e.g. `tcp://localhost:6120`) and the one it connects to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The endpoint as written (`get_endpoint()`).
    pub display: String,
    /// The endpoint the socket connects to, with the host resolved when it resolves.
    pub connect: String,
}

impl Endpoint {
    /// `protocol://hostname:port`; the connect address has the host resolved (IPv4 first, like libzmq).
    /// A host that does not resolve is kept as written: the requests then fail as off-line.
    pub fn new(protocol: &str, hostname: &str, port: u16) -> Endpoint {
        let display = format!("{protocol}://{hostname}:{port}");
        let connect = transport::client_endpoint(protocol, hostname, port).unwrap_or_else(|_| display.clone());
        Endpoint { display, connect }
    }

    /// Split `protocol://host:port` as the original's `split_address` does.
    pub fn split(endpoint: &str) -> Option<(String, String, u16)> {
        let (protocol, rest) = endpoint.split_once("://")?;
        let (host, port) = rest.rsplit_once(':')?;
        Some((protocol.to_owned(), host.to_owned(), port.parse().ok()?))
    }
}

/// Why no endpoint could be determined for a proxy.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The settings could not be loaded.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Dynamic ports and the registry could not tell where the server is.
    #[error(transparent)]
    Discovery(#[from] crate::assemble::DiscoveryError),
    /// A service type other than the Process Manager's (the only one we can find).
    #[error("No service registered as {0}")]
    UnknownServiceType(String),
    /// A port outside 0-65535.
    #[error("port {0} is not a TCP port (0-65535)")]
    Port(i64),
}

/// Where a Process Manager proxy connects: the given port, or, for port 0, the commanding endpoint
/// the Service Registry knows (through [`crate::assemble::discover_pm`]).
pub async fn process_manager_endpoint(
    protocol: &str,
    hostname: &str,
    port: i64,
    config: impl FnOnce() -> Result<DaemonConfig, crate::config::ConfigError>,
) -> Result<Endpoint, EndpointError> {
    let port = u16::try_from(port).map_err(|_| EndpointError::Port(port))?;
    if port != 0 {
        return Ok(Endpoint::new(protocol, hostname, port));
    }
    let config = config()?;
    let (commanding, _) = crate::assemble::discover_pm(&config).await?;
    Ok(Endpoint {
        display: commanding.clone(),
        connect: commanding,
    })
}

/// Where a service proxy connects when it is given a service type instead of host and port. We can
/// only find the Process Manager (the registry client lives in `assemble`).
pub async fn service_endpoint_for_type(service_type: &str, config: &DaemonConfig) -> Result<Endpoint, EndpointError> {
    if !service_type.eq_ignore_ascii_case(&config.pm.service_type) {
        return Err(EndpointError::UnknownServiceType(service_type.to_owned()));
    }
    let pm = &config.pm;
    let (_, service) = if pm.service_port != 0 && pm.commanding_port != 0 {
        let e = Endpoint::new(&pm.protocol, &pm.hostname, pm.service_port);
        (String::new(), e.display)
    } else {
        crate::assemble::discover_pm(config).await?
    };
    let connect = match Endpoint::split(&service) {
        Some((p, h, port)) => Endpoint::new(&p, &h, port).connect,
        None => service.clone(),
    };
    Ok(Endpoint {
        display: service,
        connect,
    })
}

/// `is_process_manager_active`: find the Process Manager (configured ports, or the registry when they
/// are 0), then one `Ping` within `timeout`.
pub async fn process_manager_active(config: &DaemonConfig, timeout: Duration) -> bool {
    let pm: &PmSettings = &config.pm;
    let endpoint = if pm.commanding_port != 0 {
        Endpoint::new(&pm.protocol, &pm.hostname, pm.commanding_port).connect
    } else {
        match crate::assemble::discover_pm(config).await {
            Ok((commanding, _)) => commanding,
            Err(_) => return false,
        }
    };
    control_server_active(&endpoint, timeout).await
}

/// `is_control_server_active`: a fresh REQ socket, one `Ping`, `Pong` within `timeout`.
pub async fn control_server_active(endpoint: &str, timeout: Duration) -> bool {
    ControlClient::new(endpoint, timeout).ping(timeout).await
}

/// Arguments that do not fit a command's template; the text is the original's, word for word.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgumentsError {
    /// Not as many arguments as the template has.
    #[error("Expected {expected} arguments for command {command}, got {got} arguments.")]
    Count {
        /// The template's count.
        expected: i64,
        /// The command.
        command: String,
        /// Given, positional and by keyword.
        got: i64,
    },
    /// The right count, split wrongly between positional and keyword arguments.
    #[error(
        "Expected {positional} positional arguments and {keyword} keyword arguments for command {command}, got \
         {got_positional} positional and {got_keyword} keyword arguments instead."
    )]
    Kinds {
        /// The template's positional count.
        positional: i64,
        /// The template's keyword count.
        keyword: i64,
        /// The command.
        command: String,
        /// Given positionally.
        got_positional: i64,
        /// Given by keyword.
        got_keyword: i64,
    },
}

/// What a proxy keeps of one command announced by `send_commands`.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandInfo {
    /// The command's name (`_name`).
    pub name: String,
    /// The argument template (`_cmd`).
    pub cmd: String,
    /// The help text (`__doc__`).
    pub doc: Option<String>,
    /// All placeholders of the template (`_tot_n_args`).
    pub tot_n_args: i64,
    /// Positional placeholders (`_n_args`).
    pub n_args: i64,
    /// Named placeholders (`_n_kwargs`).
    pub n_kwargs: i64,
    /// The class name of the command object, for messages (`ProcessManagerCommand`).
    pub class_name: String,
    /// The object itself, sent back inside every `CommandExecution`.
    pub object: Value,
}

impl CommandInfo {
    /// Read a command object; missing counts are taken as 0 (a command without arguments).
    pub fn from_value(name: &str, object: &Value) -> CommandInfo {
        let o = object.as_object();
        let attr = |key: &str| o.and_then(|o| o.attr(key));
        let int = |key: &str| attr(key).and_then(Value::as_i64).unwrap_or(0);
        CommandInfo {
            name: attr("_name").and_then(Value::as_str).unwrap_or(name).to_owned(),
            cmd: attr("_cmd").and_then(Value::as_str).unwrap_or("").to_owned(),
            doc: attr("__doc__").and_then(Value::as_str).map(str::to_owned),
            tot_n_args: int("_tot_n_args"),
            n_args: int("_n_args"),
            n_kwargs: int("_n_kwargs"),
            class_name: o
                .and_then(|o| o.class_path())
                .map(|(_, q)| q.rsplit('.').next().unwrap_or(q).to_owned())
                .unwrap_or_else(|| "Command".to_owned()),
            object: object.clone(),
        }
    }

    /// The original's client-side check (`Command.validate_arguments`): the count must match the
    /// template and the arguments must be all positional, all by keyword, or positional in place of
    /// the named placeholders. Templates `*` and `**` accept anything.
    pub fn validate(&self, nargs: usize, nkwargs: usize) -> Result<(), ArgumentsError> {
        if self.cmd == "*" || self.cmd == "**" {
            return Ok(());
        }
        let (nargs, nkwargs) = (nargs as i64, nkwargs as i64);
        if self.tot_n_args != nargs + nkwargs {
            return Err(ArgumentsError::Count {
                expected: self.tot_n_args,
                command: self.name.clone(),
                got: nargs + nkwargs,
            });
        }
        let ok = self.tot_n_args == 0
            || (nargs != 0 && nargs == self.n_args)
            || (nkwargs != 0 && nkwargs == self.n_kwargs)
            || (nargs == self.n_kwargs && nkwargs == 0);
        if ok {
            Ok(())
        } else {
            Err(ArgumentsError::Kinds {
                positional: self.n_args,
                keyword: self.n_kwargs,
                command: self.name.clone(),
                got_positional: nargs,
                got_keyword: nkwargs,
            })
        }
    }

    /// The `CommandExecution` that calls this command.
    pub fn execution(&self, args: Vec<Value>, kwargs: Vec<(Value, Value)>) -> Value {
        client::command_execution(self.object.clone(), args, kwargs)
    }
}

/// What `load_commands` found.
#[derive(Debug, Clone, PartialEq)]
pub enum LoadOutcome {
    /// The command names, in the server's order.
    Loaded(Vec<String>),
    /// No `Pong`: nothing was asked.
    NotConnected,
    /// `send_commands` answered with a `Failure` (its message) or something that is no command table.
    Failed(String),
}

/// One proxy's connection, timeout and announced commands.
pub struct ProxyCore {
    client: ControlClient,
    endpoint: Endpoint,
    timeout: Duration,
    connected: bool,
    commands: Vec<CommandInfo>,
}

impl ProxyCore {
    /// A proxy for `endpoint` with a default request timeout (not connected yet).
    pub fn new(endpoint: Endpoint, timeout: Duration) -> ProxyCore {
        ProxyCore {
            client: ControlClient::new(endpoint.connect.clone(), timeout),
            endpoint,
            timeout,
            connected: false,
            commands: Vec::new(),
        }
    }

    /// The endpoint as configured (`tcp://localhost:6120`).
    pub fn endpoint(&self) -> &str {
        &self.endpoint.display
    }

    /// The default reply timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Ready the connection (the socket itself is created by the next request).
    pub fn connect(&mut self) {
        self.client.reset();
        self.connected = true;
    }

    /// Drop the connection; a later request reconnects.
    pub fn disconnect(&mut self) {
        self.client.reset();
        self.connected = false;
    }

    /// True between `connect` and `disconnect` (or a failed request): the original's "has a socket".
    pub fn has_connection(&self) -> bool {
        self.connected
    }

    /// Forget a request that was interrupted half-way: its socket may still expect a reply.
    pub fn abandon(&mut self) {
        self.disconnect();
    }

    /// Send `request` and return the decoded reply. `timeout` `None` (or 0) means the proxy's timeout.
    /// After `retries` further attempts without a reply, [`SendError::Offline`] carries the original's
    /// message built from `request_text`.
    pub async fn send(
        &mut self,
        request: &Value,
        retries: u32,
        timeout: Option<Duration>,
        request_text: &str,
    ) -> Result<Value, SendError> {
        let timeout = timeout.filter(|t| !t.is_zero()).unwrap_or(self.timeout);
        let mut left = retries;
        if !self.connected {
            self.connect();
        }
        loop {
            match self.client.request_with_timeout(request, timeout).await {
                Ok(v) => return Ok(v),
                Err(e @ ClientError::Decode { .. }) => return Err(SendError::Decode(e.to_string())),
                Err(e) => {
                    tracing::debug!(endpoint = self.endpoint(), error = %e, retries_left = left, "no reply");
                    self.disconnect();
                    if left == 0 {
                        return Err(SendError::Offline(offline_message(request_text)));
                    }
                    left -= 1;
                    self.connect();
                }
            }
        }
    }

    /// `Ping` with the 1 s ping timeout; true on `Pong`.
    pub async fn ping(&mut self) -> bool {
        matches!(
            self.send(&Value::str("Ping"), 0, Some(PING_TIMEOUT), "Ping").await,
            Ok(Value::Str(s)) if s == "Pong"
        )
    }

    /// `load_commands`: `Ping`, then `send_commands`; keeps the command objects.
    pub async fn load_commands(&mut self) -> LoadOutcome {
        if !self.ping().await {
            return LoadOutcome::NotConnected;
        }
        self.request_commands().await
    }

    /// `send_commands` alone (the caller has checked the connection).
    pub async fn request_commands(&mut self) -> LoadOutcome {
        let reply = match self.send(&Value::str("send_commands"), 0, None, "send_commands").await {
            Ok(v) => v,
            Err(e) => return LoadOutcome::Failed(e.to_string()),
        };
        if let Some(message) = protocol::failure_message(&reply) {
            return LoadOutcome::Failed(message);
        }
        let Value::Dict(items) = reply else {
            return LoadOutcome::Failed(format!(
                "send_commands returned {}, not a command table",
                protocol::py_repr(&reply)
            ));
        };
        self.commands = items
            .iter()
            .filter_map(|(k, v)| k.as_str().map(|name| CommandInfo::from_value(name, v)))
            .collect();
        LoadOutcome::Loaded(self.command_names())
    }

    /// The loaded commands' names, in the server's order.
    pub fn command_names(&self) -> Vec<String> {
        self.commands.iter().map(|c| c.name.clone()).collect()
    }

    /// True when commands are loaded.
    pub fn has_commands(&self) -> bool {
        !self.commands.is_empty()
    }

    /// A loaded command by name.
    pub fn command(&self, name: &str) -> Option<&CommandInfo> {
        self.commands.iter().find(|c| c.name == name)
    }

    /// The loaded commands, in the server's order.
    pub fn commands(&self) -> &[CommandInfo] {
        &self.commands
    }
}

/// Why `ProcessManagerProxy.get_status()` has no answer.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The request got no reply value.
    #[error(transparent)]
    Send(#[from] SendError),
    /// The server did not announce the command (not loaded, or not our daemon).
    #[error("the Process Manager does not announce '{0}' (commands not loaded, or it is not procman)")]
    NotAnnounced(&'static str),
    /// The server answered with a `Failure`.
    #[error("{0} failed: {1}")]
    Failed(&'static str, String),
    /// The reply has the wrong shape.
    #[error("{0} returned {1}")]
    Shape(&'static str, String),
}

/// The address requests of `pm_cs status`, in the order (and with the keys) of [`status_dict`].
pub const STATUS_ADDRESS: [(&str, &str); 4] = [
    ("hostname", "get_ip_address"),
    ("commanding_port", "get_commanding_port"),
    ("monitoring_port", "get_monitoring_port"),
    ("service_port", "get_service_port"),
];

/// What `pm_cs status` shows, as one dict: `hostname`, the three ports, `registry` (the registration line),
/// `setup` (where the Setup comes from), `housekeeping` (where the housekeeping goes), `processes` (managed
/// processes by state, e.g. `{"RUNNING": 2}`), `process_count`, and `logger` / `metrics` (the CGSE Logger's and
/// Metrics Hub's sender: connected or not, sent and dropped; None when the daemon has none). `address` holds the replies to
/// [`STATUS_ADDRESS`]; `integration` the reply to `get_integration_status`; `listing` to `list_processes`.
pub fn status_dict(address: [Value; 4], integration: &Value, listing: &Value) -> Result<Value, StatusError> {
    let Value::Dict(integration) = integration else {
        return Err(StatusError::Shape(
            "get_integration_status",
            protocol::py_repr(integration),
        ));
    };
    let text = |key: &str| match crate::codec::dict_get(integration, key) {
        Some(Value::Str(s)) => Ok(Value::Str(s.clone())),
        other => Err(StatusError::Shape(
            "get_integration_status",
            format!(
                "no text under '{key}': {}",
                other.map(protocol::py_repr).unwrap_or_default()
            ),
        )),
    };
    let records = match listing {
        Value::Dict(items) => match crate::codec::dict_get(items, "processes") {
            Some(Value::List(records)) => records,
            _ => {
                return Err(StatusError::Shape(
                    "list_processes",
                    "a dict without a 'processes' list".into(),
                ))
            }
        },
        other => return Err(StatusError::Shape("list_processes", protocol::py_repr(other))),
    };
    let mut by_state: BTreeMap<String, i64> = BTreeMap::new();
    for record in records {
        let state = match record {
            Value::Dict(fields) => crate::codec::dict_get(fields, "state").and_then(Value::as_str),
            _ => None,
        };
        let state = state.ok_or_else(|| StatusError::Shape("list_processes", "a record without a state".into()))?;
        *by_state.entry(state.to_owned()).or_default() += 1;
    }
    let optional = |key: &str| match crate::codec::dict_get(integration, key) {
        Some(Value::Str(s)) => Value::Str(s.clone()),
        _ => Value::None,
    };
    let [hostname, commanding, monitoring, service] = address;
    Ok(Value::dict([
        ("hostname", hostname),
        ("commanding_port", commanding),
        ("monitoring_port", monitoring),
        ("service_port", service),
        ("registry", text("registry")?),
        ("setup", text("setup")?),
        ("housekeeping", text("storage")?),
        (
            "processes",
            Value::dict(by_state.into_iter().map(|(k, n)| (k, Value::Int(n)))),
        ),
        ("process_count", Value::Int(records.len() as i64)),
        ("logger", optional("logger")),
        ("metrics", optional("metrics")),
    ]))
}

impl ProxyCore {
    /// `get_status()`: the four address requests, `get_integration_status` and `list_processes` (as announced by
    /// the server), assembled by [`status_dict`].
    pub async fn process_manager_status(&mut self) -> Result<Value, StatusError> {
        let mut address = [Value::None, Value::None, Value::None, Value::None];
        for (slot, (_, name)) in address.iter_mut().zip(STATUS_ADDRESS) {
            *slot = self.checked(&Value::str(name), name).await?;
        }
        let mut table = [Value::None, Value::None];
        for (slot, name) in table.iter_mut().zip(["get_integration_status", "list_processes"]) {
            let request = self
                .command(name)
                .ok_or(StatusError::NotAnnounced(name))?
                .execution(vec![], vec![]);
            *slot = self.checked(&request, name).await?;
        }
        let [integration, listing] = table;
        status_dict(address, &integration, &listing)
    }

    async fn checked(&mut self, request: &Value, name: &'static str) -> Result<Value, StatusError> {
        let reply = self.send(request, 0, None, name).await?;
        match protocol::failure_message(&reply) {
            Some(message) => Err(StatusError::Failed(name, message)),
            None => Ok(reply),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{self, Limits};
    use crate::transport::{bind_router, frames, message};
    use bytes::Bytes;
    use zeromq::{SocketRecv, SocketSend};

    fn integration() -> Value {
        Value::dict([
            ("registry", Value::str("Service Registry: registered as PM_CS")),
            ("setup", Value::str("Configuration Manager (setup 3)")),
            ("storage", Value::str("Storage Manager at tcp://localhost:6100")),
            ("processes", Value::Int(3)),
            (
                "metrics",
                Value::str("Metrics Hub: connected to tcp://127.0.0.1:6130 (4 sent, 0 dropped)"),
            ),
        ])
    }

    fn record(id: &str, state: &str) -> Value {
        Value::dict([
            ("id", Value::str(id)),
            ("state", Value::str(state)),
            ("pid", Value::None),
        ])
    }

    fn address() -> [Value; 4] {
        [
            Value::str("127.0.0.1"),
            Value::Int(6120),
            Value::Int(6121),
            Value::Int(6122),
        ]
    }

    #[test]
    fn status_dict_has_what_pm_cs_status_shows_and_counts_by_state() {
        let listing = Value::dict([
            ("seq", Value::Int(7)),
            (
                "processes",
                Value::List(vec![
                    record("a", "RUNNING"),
                    record("b", "FATAL"),
                    record("c", "RUNNING"),
                ]),
            ),
        ]);
        let got = status_dict(address(), &integration(), &listing).unwrap();
        let expected = Value::dict([
            ("hostname", Value::str("127.0.0.1")),
            ("commanding_port", Value::Int(6120)),
            ("monitoring_port", Value::Int(6121)),
            ("service_port", Value::Int(6122)),
            ("registry", Value::str("Service Registry: registered as PM_CS")),
            ("setup", Value::str("Configuration Manager (setup 3)")),
            ("housekeeping", Value::str("Storage Manager at tcp://localhost:6100")),
            (
                "processes",
                Value::dict([("FATAL", Value::Int(1)), ("RUNNING", Value::Int(2))]),
            ),
            ("process_count", Value::Int(3)),
            // No Logger sender here: None, not an error.
            ("logger", Value::None),
            (
                "metrics",
                Value::str("Metrics Hub: connected to tcp://127.0.0.1:6130 (4 sent, 0 dropped)"),
            ),
        ]);
        assert_eq!(got, expected);
    }

    #[test]
    fn status_dict_rejects_replies_of_the_wrong_shape() {
        let empty = Value::dict([("seq", Value::Int(0)), ("processes", Value::List(vec![]))]);
        let err = status_dict(address(), &Value::None, &empty).unwrap_err();
        assert!(matches!(err, StatusError::Shape("get_integration_status", _)), "{err}");
        let no_setup = Value::dict([("registry", Value::str("x")), ("storage", Value::str("y"))]);
        let err = status_dict(address(), &no_setup, &empty).unwrap_err();
        assert!(err.to_string().contains("'setup'"), "{err}");
        let err = status_dict(address(), &integration(), &Value::List(vec![])).unwrap_err();
        assert!(matches!(err, StatusError::Shape("list_processes", _)), "{err}");
        let stateless = Value::dict([("processes", Value::List(vec![Value::dict([("id", Value::str("a"))])]))]);
        assert!(status_dict(address(), &integration(), &stateless).is_err());
    }

    fn info(name: &str) -> CommandInfo {
        let (table, svc) = protocol::load_tables().unwrap();
        let spec = table.get(name).or_else(|| svc.get(name)).unwrap();
        CommandInfo::from_value(name, &spec.object)
    }

    #[test]
    fn command_info_reads_the_announced_object() {
        let c = info("start_process");
        assert_eq!(
            (c.cmd.as_str(), c.tot_n_args, c.n_args, c.n_kwargs),
            ("{start_cmd}", 1, 0, 1)
        );
        assert_eq!(c.class_name, "ProcessManagerCommand");
        assert!(c.doc.as_deref().unwrap().starts_with("usage: start_process(nargs=1"));
        let e = c.execution(vec![Value::Int(1)], vec![]);
        let r = protocol::Request::from_value(e);
        assert_eq!((r.name.as_deref(), r.args.len()), (Some("start_process"), 1));
    }

    #[test]
    fn validation_follows_the_original() {
        let none = info("get_core_processes");
        assert!(none.validate(0, 0).is_ok());
        assert_eq!(
            none.validate(2, 0).unwrap_err().to_string(),
            "Expected 0 arguments for command get_core_processes, got 2 arguments."
        );
        let one = info("start_process");
        assert!(
            one.validate(1, 0).is_ok(),
            "positional in place of the named placeholder"
        );
        assert!(one.validate(0, 1).is_ok());
        assert!(one.validate(0, 0).is_err());
        let two = info("set_logging_level");
        assert!(two.validate(2, 0).is_ok());
        assert!(two.validate(0, 2).is_ok());
        assert_eq!(
            two.validate(1, 1).unwrap_err().to_string(),
            "Expected 0 positional arguments and 2 keyword arguments for command set_logging_level, got 1 \
             positional and 1 keyword arguments instead."
        );
        let mut star = one.clone();
        star.cmd = "*".into();
        assert!(star.validate(5, 3).is_ok());
    }

    #[test]
    fn texts_of_the_original() {
        assert_eq!(
            offline_message("Ping"),
            "Control Server seems to be off-line, abandoning (Ping)"
        );
        assert_eq!(
            execution_text("ProcessManagerCommand", "get_devices", &[], &[]),
            "[ProcessManagerCommand] get_devices()"
        );
        assert_eq!(
            execution_text(
                "ServiceCommand",
                "set_logging_level",
                &["a".into()],
                &[("level".into(), "10".into())]
            ),
            "[ServiceCommand] set_logging_level(a, level=10)"
        );
        assert_eq!(
            Endpoint::split("tcp://localhost:6122"),
            Some(("tcp".into(), "localhost".into(), 6122))
        );
        let e = Endpoint::new("tcp", "localhost", 6120);
        assert_eq!(e.display, "tcp://localhost:6120");
        assert_eq!(e.connect, "tcp://127.0.0.1:6120");
    }

    /// A one-shot server: answers each request with `reply(request)`, or not at all for `None`.
    async fn server(
        mut router: transport::RouterSocket,
        n: usize,
        reply: impl Fn(&Value) -> Option<Value> + Send + 'static,
    ) {
        for _ in 0..n {
            let Ok(msg) = router.recv().await else { return };
            let mut f = frames(msg);
            let Some(body) = f.pop() else { return };
            let req = codec::decode(&body, &Limits::default()).unwrap();
            if let Some(r) = reply(&req) {
                f.push(Bytes::from(codec::encode(&r)));
                router.send(message(f).unwrap()).await.unwrap();
            }
        }
    }

    #[tokio::test]
    async fn timeout_gives_the_offline_failure_and_the_proxy_recovers() {
        let (router, port) = bind_router("tcp", "127.0.0.1", 0, "commanding").await.unwrap();
        // First request unanswered, then everything answered with Pong/commands.
        let srv = tokio::spawn(server(router, 4, {
            let first = std::sync::atomic::AtomicBool::new(true);
            move |req| {
                if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
                    return None;
                }
                match req.as_str() {
                    Some("Ping") => Some(Value::str("Pong")),
                    Some("send_commands") => Some(protocol::load_tables().unwrap().0.send_commands_reply()),
                    _ => Some(protocol::invalid_command("x")),
                }
            }
        }));
        let mut p = ProxyCore::new(Endpoint::new("tcp", "127.0.0.1", port), Duration::from_millis(300));
        p.connect();
        let r = p.send(&Value::str("get_devices"), 0, None, "get_devices").await;
        assert_eq!(
            r.unwrap_err().to_string(),
            "Control Server seems to be off-line, abandoning (get_devices)"
        );
        assert!(!p.has_connection(), "a timeout drops the connection");
        assert_eq!(
            p.load_commands().await,
            LoadOutcome::Loaded(protocol::load_tables().unwrap().0.names().map(str::to_owned).collect())
        );
        assert!(p.has_commands() && p.has_connection());
        assert!(p.command("get_device_ids").is_some());
        let r = p.send(&Value::str("foo"), 0, None, "foo").await.unwrap();
        assert_eq!(protocol::failure_message(&r).as_deref(), Some("Invalid command: x"));
        srv.await.unwrap();
    }

    #[tokio::test]
    async fn retries_resend_after_a_timeout() {
        let (router, port) = bind_router("tcp", "127.0.0.1", 0, "commanding").await.unwrap();
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c2 = count.clone();
        let srv = tokio::spawn(server(router, 2, move |_| {
            (c2.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 1).then_some(Value::Int(6120))
        }));
        let mut p = ProxyCore::new(Endpoint::new("tcp", "127.0.0.1", port), Duration::from_secs(5));
        let r = p
            .send(
                &Value::str("get_commanding_port"),
                1,
                Some(Duration::from_millis(300)),
                "x",
            )
            .await;
        assert_eq!(r.unwrap(), Value::Int(6120));
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 2);
        srv.await.unwrap();
    }

    #[tokio::test]
    async fn nobody_listening_is_off_line_not_an_error() {
        // A port nobody listens on.
        let reserved = crate::cgse::testing::ReservedPort::new();
        let port = reserved.port();
        let mut p = ProxyCore::new(Endpoint::new("tcp", "127.0.0.1", port), Duration::from_millis(200));
        let started = std::time::Instant::now();
        assert!(!p.ping().await);
        assert_eq!(p.load_commands().await, LoadOutcome::NotConnected);
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "a hang guard, not a timing"
        );
        assert!(!control_server_active(&p.endpoint.connect, Duration::from_millis(200)).await);
    }

    #[tokio::test]
    async fn static_port_needs_no_registry() {
        let e = process_manager_endpoint("tcp", "localhost", 7000, || unreachable!("no config needed"))
            .await
            .unwrap();
        assert_eq!(e.display, "tcp://localhost:7000");
        assert!(matches!(
            process_manager_endpoint("tcp", "localhost", 70000, || unreachable!()).await,
            Err(EndpointError::Port(70000))
        ));
    }
}
