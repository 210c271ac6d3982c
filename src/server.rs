//! The REQ-REP side of a control server: one dispatcher per socket and the loop that feeds it.
//!
//! Each socket is a ROUTER, so requests from different clients are served concurrently (a REQ client
//! still gets exactly one reply per request): a slow command never delays another client's `Ping`.
//! Every request ends in exactly one reply — undecodable frames, unknown names, handler errors and even
//! handler panics become an `egse.response.Failure` — and the loop itself never stops on bad input.

use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use bytes::Bytes;
use futures_util::FutureExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use zeromq::{SocketRecv, SocketSend};

use crate::codec::{self, Limits, Value};
use crate::protocol::{self, CommandTable, PyExc, Request, RequestForm, SocketKind};
use crate::transport::{self, RouterSocket};

/// The bound ports, as the getters and the registry report them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ports {
    /// The commanding (REQ-REP) port.
    pub commanding: u16,
    /// The monitoring (PUB) port.
    pub monitoring: u16,
    /// The service (REQ-REP) port.
    pub service: u16,
}

/// What the built-in requests answer.
#[derive(Debug)]
pub struct ServerInfo {
    /// The bound ports (`get_commanding_port` and the other getters).
    pub ports: Ports,
    /// `get_storage_mnemonic`.
    pub storage_mnemonic: String,
    /// Refreshed in the background: resolving it may block, the request path must not.
    ip: RwLock<Option<String>>,
}

impl ServerInfo {
    /// With `ip` as the first `get_ip_address` answer.
    pub fn new(ports: Ports, storage_mnemonic: String, ip: Option<String>) -> ServerInfo {
        ServerInfo {
            ports,
            storage_mnemonic,
            ip: RwLock::new(ip),
        }
    }

    /// What `get_ip_address` answers now (None: `None`).
    pub fn ip(&self) -> Option<String> {
        self.ip.read().map(|g| g.clone()).unwrap_or(None)
    }

    /// Replace the address `get_ip_address` answers.
    pub fn set_ip(&self, ip: Option<String>) {
        if let Ok(mut g) = self.ip.write() {
            *g = ip;
        }
    }
}

/// One command call, with the arguments as the client sent them.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// The command's name.
    pub name: String,
    /// Positional arguments.
    pub args: Vec<Value>,
    /// Keyword arguments, (name, value) in the order sent.
    pub kwargs: Vec<(Value, Value)>,
}

impl Call {
    /// Match the arguments to parameter names (the first `required` must be present).
    pub fn bind(self, params: &[&str], required: usize) -> Result<Vec<Option<Value>>, CommandError> {
        protocol::bind_arguments(&self.name, params, required, self.args, self.kwargs).map_err(CommandError::Type)
    }
}

/// A command that could not be carried out; the reply is a `Failure` whose cause is the matching
/// Python exception.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CommandError {
    /// Wrong arguments (count, names, types): `TypeError`.
    #[error("{0}")]
    Type(String),
    /// An argument with a bad value: `ValueError`.
    #[error("{0}")]
    Value(String),
    /// The command ran and failed: `RuntimeError`.
    #[error("{0}")]
    Failed(String),
    /// Not in this socket's table.
    #[error("Invalid command: {0}")]
    Unknown(String),
}

/// What a handler answers: a value, or a pickle it wrote itself on a hot path ([`codec::PickleWriter`]).
#[derive(Debug)]
pub enum Reply {
    /// A value, pickled by the dispatcher.
    Value(Value),
    /// A complete pickle (`PickleWriter::finish`), sent as is.
    Pickled(Vec<u8>),
}

impl From<Value> for Reply {
    fn from(v: Value) -> Reply {
        Reply::Value(v)
    }
}

/// A boxed future returned by handlers.
pub type HandlerFuture<'a> = crate::util::BoxFuture<'a, Result<Reply, CommandError>>;

/// The meaning of a socket's table commands.
pub trait Handler: Send + Sync + 'static {
    /// Carry out one table command; an error becomes a `Failure` reply.
    fn handle(&self, call: Call) -> HandlerFuture<'_>;
}

/// Commands that change state; only peers in `Procman.CONTROL_ALLOW` may send them. Everything else
/// (the built-ins, status, lists, logs, getters) stays open to any peer, as in CGSE.
pub const CONTROL_COMMANDS: &[&str] = &[
    "start_process",
    "stop_process",
    "restart_process",
    "reload",
    "quit_server",
    "add_listener",
    "remove_listener",
    "register_to_storage",
];

/// Is `name` a state-changing command (the list above, and every `set_*`)?
pub fn is_control_command(name: &str) -> bool {
    name.starts_with("set_") || CONTROL_COMMANDS.contains(&name)
}

/// Who may send state-changing commands: networks (address, prefix length), or everyone.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessControl {
    nets: Option<Vec<(IpAddr, u8)>>,
}

impl AccessControl {
    /// No restriction (a dispatcher that is not behind a socket: tests, the fuzzer).
    pub fn everyone() -> AccessControl {
        AccessControl { nets: None }
    }

    /// From the `CONTROL_ALLOW` items: `a.b.c.d`, `a.b.c.d/n`, IPv6 (with `/n`), or host names (all
    /// their addresses). An empty list means this host's own addresses (loopback included). Returns the
    /// rule and the items that could not be used (a name that does not resolve, a bad prefix): those
    /// allow nothing, and are for the log.
    pub fn from_list(items: &[String]) -> (AccessControl, Vec<String>) {
        let mut nets = Vec::new();
        let mut unusable = Vec::new();
        if items.is_empty() {
            nets.extend(this_host());
        }
        for item in items {
            match parse_net(item) {
                Some(mut n) => nets.append(&mut n),
                None => unusable.push(item.clone()),
            }
        }
        (AccessControl { nets: Some(nets) }, unusable)
    }

    /// May a peer at `ip` (None: unknown) change state?
    pub fn allows(&self, ip: Option<IpAddr>) -> bool {
        let Some(nets) = &self.nets else { return true };
        let Some(ip) = ip.map(canonical) else { return false };
        nets.iter().any(|(net, prefix)| in_net(ip, *net, *prefix))
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) compare as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

fn in_net(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix.min(32)))
            };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix.min(128)))
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

fn parse_net(item: &str) -> Option<Vec<(IpAddr, u8)>> {
    let item = item.trim();
    if let Some((addr, prefix)) = item.split_once('/') {
        let ip = canonical(addr.trim().parse::<IpAddr>().ok()?);
        let prefix: u8 = prefix.trim().parse().ok()?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        return (prefix <= max).then(|| vec![(ip, prefix)]);
    }
    if let Ok(ip) = item.parse::<IpAddr>() {
        let ip = canonical(ip);
        return Some(vec![(ip, if ip.is_ipv4() { 32 } else { 128 })]);
    }
    let addrs: Vec<(IpAddr, u8)> = std::net::ToSocketAddrs::to_socket_addrs(&(item, 0))
        .ok()?
        .map(|a| canonical(a.ip()))
        .map(|ip| (ip, if ip.is_ipv4() { 32 } else { 128 }))
        .collect();
    (!addrs.is_empty()).then_some(addrs)
}

/// This host: loopback, the address of the default route, and what the host name resolves to.
fn this_host() -> Vec<(IpAddr, u8)> {
    let mut nets = vec![
        (IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 0)), 8),
        (IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), 128),
    ];
    if let Some(ip) = crate::util::host_ip().and_then(|s| s.parse::<IpAddr>().ok()) {
        nets.push((canonical(ip), if ip.is_ipv4() { 32 } else { 128 }));
    }
    if let Some(mut n) = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .and_then(|h| parse_net(&h))
    {
        nets.append(&mut n);
    }
    nets
}

/// Decodes a request, answers built-ins, routes table commands to the handler, encodes the reply.
pub struct Dispatcher {
    kind: SocketKind,
    table: CommandTable,
    send_commands: Bytes,
    handler: Arc<dyn Handler>,
    info: Arc<ServerInfo>,
    limits: Limits,
    access: AccessControl,
}

/// What a dispatch did, for the log.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The command's name, or `<undecodable>` / `<multipart>` for a frame that names none.
    pub name: String,
    /// False when the request was refused or the command failed (the reply is a `Failure`).
    pub ok: bool,
}

impl Dispatcher {
    /// A dispatcher for `kind`'s socket: built-ins, then `table`'s commands through `handler`; everyone may send control commands.
    pub fn new(
        kind: SocketKind,
        table: CommandTable,
        handler: Arc<dyn Handler>,
        info: Arc<ServerInfo>,
        limits: Limits,
    ) -> Dispatcher {
        let send_commands = Bytes::from(codec::encode(&table.send_commands_reply()));
        Dispatcher {
            kind,
            table,
            send_commands,
            handler,
            info,
            limits,
            access: AccessControl::everyone(),
        }
    }

    /// Restrict the state-changing commands to the peers `access` allows.
    pub fn with_access(mut self, access: AccessControl) -> Dispatcher {
        self.access = access;
        self
    }

    /// Which socket this dispatcher serves.
    pub fn kind(&self) -> SocketKind {
        self.kind
    }

    /// The socket's command table.
    pub fn table(&self) -> &CommandTable {
        &self.table
    }

    /// Answer one request frame from an unknown peer (see [`Dispatcher::dispatch_from`]).
    pub async fn dispatch(&self, frame: &[u8]) -> (Bytes, Outcome) {
        self.dispatch_from(frame, None).await
    }

    /// Answer one request frame from the peer at `peer`. Never fails and never panics: every problem
    /// becomes a `Failure`.
    pub async fn dispatch_from(&self, frame: &[u8], peer: Option<IpAddr>) -> (Bytes, Outcome) {
        let value = match codec::decode(frame, &self.limits) {
            Ok(v) => v,
            Err(e) => {
                let msg = match e {
                    codec::CodecError::Empty => "Invalid command: empty request frame".to_owned(),
                    e => format!("Invalid command: cannot decode the request ({e})"),
                };
                return (
                    encode(protocol::failure(&msg)),
                    Outcome {
                        name: "<undecodable>".into(),
                        ok: false,
                    },
                );
            }
        };
        let req = Request::from_value(value);
        let name = req.display_name().to_owned();
        if let Some(reply) = self.builtin(&req) {
            return (reply, Outcome { name, ok: true });
        }
        let in_table = req.name.as_deref().is_some_and(|n| self.table.get(n).is_some());
        // A bare string carries no arguments and, as in CGSE, only names built-ins.
        if !in_table || req.form == RequestForm::Str || req.form == RequestForm::Other {
            return (encode(protocol::invalid_command(&name)), Outcome { name, ok: false });
        }
        if is_control_command(&name) && !self.access.allows(peer) {
            let who = peer.map_or_else(|| "an unknown address".to_owned(), |ip| ip.to_string());
            info!(command = %name, peer = %who, "state-changing command refused (not in Procman.CONTROL_ALLOW)");
            let msg = format!(
                "Executing {name} failed: {who} may not change state: add it to the setting Procman.CONTROL_ALLOW"
            );
            return (encode(protocol::failure(&msg)), Outcome { name, ok: false });
        }
        let call = Call {
            name: name.clone(),
            args: req.args,
            kwargs: req.kwargs,
        };
        let result = std::panic::AssertUnwindSafe(self.handler.handle(call))
            .catch_unwind()
            .await;
        let reply = match result {
            Ok(Ok(Reply::Value(v))) => return (encode(v), Outcome { name, ok: true }),
            Ok(Ok(Reply::Pickled(p))) => return (Bytes::from(p), Outcome { name, ok: true }),
            Ok(Err(CommandError::Unknown(n))) => protocol::invalid_command(&n),
            Ok(Err(e)) => {
                let exc = match &e {
                    CommandError::Type(_) => PyExc::TypeError,
                    CommandError::Value(_) => PyExc::ValueError,
                    _ => PyExc::RuntimeError,
                };
                protocol::failure_with_cause(&format!("Executing {name} failed"), exc, &e.to_string())
            }
            Err(_) => {
                warn!(command = %name, socket = %self.kind, "handler panicked; replying with a Failure");
                protocol::failure_with_cause(
                    &format!("Executing {name} failed"),
                    PyExc::RuntimeError,
                    "internal error",
                )
            }
        };
        (encode(reply), Outcome { name, ok: false })
    }

    fn builtin(&self, req: &Request) -> Option<Bytes> {
        let name = req.name.as_deref()?;
        let p = &self.info.ports;
        let v = match name {
            "Ping" => Value::str("Pong"),
            "send_commands" => return Some(self.send_commands.clone()),
            "get_commanding_port" => Value::Int(i64::from(p.commanding)),
            "get_monitoring_port" => Value::Int(i64::from(p.monitoring)),
            "get_service_port" => Value::Int(i64::from(p.service)),
            "get_ip_address" => self.info.ip().map(Value::Str).unwrap_or(Value::None),
            // In the table this name has a handler with the same answer; the built-in wins, as in CGSE.
            "get_storage_mnemonic" => Value::str(&self.info.storage_mnemonic),
            _ => return None,
        };
        Some(encode(v))
    }
}

fn encode(v: Value) -> Bytes {
    Bytes::from(codec::encode(&v))
}

/// Serve one ROUTER socket until `cancel` fires. In-flight requests are tracked by `tracker`, so the
/// caller can wait for their replies before closing the socket. A client that has sent nothing for
/// `idle_timeout` (if any) is disconnected: its file descriptor and queues are freed, and a libzmq
/// REQ or DEALER client reconnects by itself when it next sends.
pub async fn serve(
    socket: RouterSocket,
    dispatcher: Arc<Dispatcher>,
    max_in_flight: usize,
    idle_timeout: Option<std::time::Duration>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let kind = dispatcher.kind();
    let (send, mut recv) = socket.split();
    if let Some(idle) = idle_timeout.filter(|d| !d.is_zero()) {
        let sweeper = send.clone();
        let stop = cancel.clone();
        // Checked four times per timeout (at most every 30 s, at least every 10 ms).
        let every = (idle / 4).clamp(std::time::Duration::from_millis(10), std::time::Duration::from_secs(30));
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(every) => {}
                }
                let n = sweeper.close_idle_peers(idle);
                if n > 0 {
                    debug!(socket = %kind, closed = n, "idle connections closed");
                }
            }
        });
    }
    let slots = Arc::new(Semaphore::new(max_in_flight.max(1)));
    info!(socket = %kind, "serving requests");
    loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => break,
            m = recv.recv() => m,
        };
        let frames = match msg {
            Ok(m) => transport::frames(m),
            Err(e) => {
                // A misbehaving peer is its own problem: log it and keep serving the others.
                debug!(socket = %kind, error = %e, "receive error");
                continue;
            }
        };
        let Some((envelope, payload)) = split_envelope(frames) else {
            continue;
        };
        let peer = envelope.first().and_then(|id| send.peer_address(id)).map(|a| a.ip());
        let permit = tokio::select! {
            _ = cancel.cancelled() => break,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let dispatcher = dispatcher.clone();
        let mut send = send.clone();
        tracker.spawn(async move {
            let started = Instant::now();
            let (reply, outcome) = match payload {
                Ok(frame) => dispatcher.dispatch_from(&frame, peer).await,
                Err(n) => (
                    encode(protocol::failure(&format!("Invalid command: expected a request of 1 frame, got {n}"))),
                    Outcome { name: "<multipart>".into(), ok: false },
                ),
            };
            let mut out = envelope;
            out.push(reply);
            if let Some(msg) = transport::message(out) {
                if let Err(e) = send.send(msg).await {
                    debug!(socket = %kind, error = %e, "reply not delivered (client gone?)");
                }
            }
            debug!(socket = %kind, command = %outcome.name, ok = outcome.ok, elapsed_us = started.elapsed().as_micros() as u64, "request");
            drop(permit);
        });
    }
    info!(socket = %kind, "stopped accepting requests");
}

/// Split `[identity, …, b"", payload]` into the routing envelope and the single payload frame.
/// A DEALER client may omit the empty delimiter. `Err(n)` reports a payload of `n` frames.
fn split_envelope(mut frames: Vec<Bytes>) -> Option<(Vec<Bytes>, Result<Bytes, usize>)> {
    if frames.is_empty() {
        return None;
    }
    let cut = match frames.iter().skip(1).position(|f| f.is_empty()) {
        Some(i) => i + 2,
        None => 1,
    };
    if cut > frames.len() {
        return None;
    }
    let payload = frames.split_off(cut);
    let payload = match payload.len() {
        1 => Ok(payload.into_iter().next().unwrap_or_default()),
        n => Err(n),
    };
    Some((frames, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl Handler for Echo {
        fn handle(&self, call: Call) -> HandlerFuture<'_> {
            Box::pin(async move {
                match call.name.as_str() {
                    "get_devices" => Ok(Value::Dict(vec![]).into()),
                    "stop_process" => panic!("boom"),
                    "start_process" => Err(CommandError::Value("no definition for device X".into())),
                    other => Err(CommandError::Unknown(other.to_owned())),
                }
            })
        }
    }

    fn dispatcher() -> Dispatcher {
        let (cmd, _) = protocol::load_tables().unwrap();
        let info = Arc::new(ServerInfo::new(
            Ports {
                commanding: 1,
                monitoring: 2,
                service: 3,
            },
            "PM".into(),
            Some("127.0.0.1".into()),
        ));
        Dispatcher::new(SocketKind::Commanding, cmd, Arc::new(Echo), info, Limits::default())
    }

    #[test]
    fn access_control() {
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let items: Vec<String> = [
            "10.1.0.0/16",
            "192.0.2.7",
            "2001:db8::/32",
            "localhost",
            "300.1.1.1",
            "1.2.3.4/40",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (a, unusable) = AccessControl::from_list(&items);
        assert_eq!(unusable, vec!["300.1.1.1".to_owned(), "1.2.3.4/40".to_owned()]);
        assert!(a.allows(ip("10.1.200.3")));
        assert!(!a.allows(ip("10.2.0.1")));
        assert!(a.allows(ip("192.0.2.7")));
        assert!(!a.allows(ip("192.0.2.8")));
        assert!(
            a.allows(ip("::ffff:192.0.2.7")),
            "IPv4-mapped addresses compare as IPv4"
        );
        assert!(a.allows(ip("2001:db8:1::5")));
        assert!(!a.allows(ip("2001:db9::1")));
        assert!(a.allows(ip("127.0.0.1")), "localhost resolves to loopback");
        assert!(!a.allows(None), "an unknown peer is refused");
        let (here, _) = AccessControl::from_list(&[]);
        assert!(here.allows(ip("127.0.0.53")) && here.allows(ip("::1")));
        assert!(!here.allows(ip("192.0.2.1")));
        assert!(AccessControl::everyone().allows(None));
        assert!(is_control_command("set_hk_frequency") && is_control_command("quit_server"));
        assert!(!is_control_command("list_processes") && !is_control_command("get_process_log"));
    }

    #[tokio::test]
    async fn refused_control_command_names_the_setting() {
        let d = dispatcher().with_access(AccessControl::from_list(&["192.0.2.0/24".to_owned()]).0);
        let req = codec::encode(&Value::dict([("cmd", Value::str("stop_process"))]));
        let (r, o) = d.dispatch_from(&req, Some("127.0.0.1".parse().unwrap())).await;
        let f = codec::decode(&r, &Limits::default()).unwrap();
        assert!(!o.ok);
        assert!(protocol::failure_message(&f).unwrap().contains("Procman.CONTROL_ALLOW"));
        let ok = codec::encode(&Value::dict([("cmd", Value::str("get_devices"))]));
        let (r, _) = d.dispatch_from(&ok, Some("127.0.0.1".parse().unwrap())).await;
        assert_eq!(codec::decode(&r, &Limits::default()).unwrap(), Value::Dict(vec![]));
    }

    #[test]
    fn envelope_split() {
        let f = |v: &[&'static [u8]]| v.iter().map(|b| Bytes::from_static(b)).collect::<Vec<_>>();
        let (env, p) = split_envelope(f(&[b"id", b"", b"x"])).unwrap();
        assert_eq!((env.len(), p.unwrap().as_ref()), (2, &b"x"[..]));
        let (env, p) = split_envelope(f(&[b"id", b"x"])).unwrap();
        assert_eq!((env.len(), p.unwrap().as_ref()), (1, &b"x"[..]));
        let (_, p) = split_envelope(f(&[b"id", b"", b""])).unwrap();
        assert_eq!(p.unwrap().len(), 0);
        let (_, p) = split_envelope(f(&[b"id", b"", b"a", b"b"])).unwrap();
        assert_eq!(p.unwrap_err(), 2);
    }

    #[tokio::test]
    async fn builtins_and_errors() {
        let d = dispatcher();
        let ask = |v: Value| {
            let d = &d;
            async move { codec::decode(&d.dispatch(&codec::encode(&v)).await.0, &Limits::default()).unwrap() }
        };
        assert_eq!(ask(Value::str("Ping")).await, Value::str("Pong"));
        assert_eq!(
            ask(Value::dict([("cmd", Value::str("get_service_port"))])).await,
            Value::Int(3)
        );
        assert_eq!(ask(Value::str("get_ip_address")).await, Value::str("127.0.0.1"));
        let f = ask(Value::str("foo")).await;
        assert_eq!(protocol::failure_message(&f).unwrap(), "Invalid command: foo");
        let f = ask(Value::Int(42)).await;
        assert_eq!(protocol::failure_message(&f).unwrap(), "Invalid command: None");
        // Table commands through the dict form work (a deliberate fix of the original).
        assert_eq!(
            ask(Value::dict([("cmd", Value::str("get_devices"))])).await,
            Value::Dict(vec![])
        );
        let f = ask(Value::dict([("cmd", Value::str("stop_process"))])).await;
        assert_eq!(
            protocol::failure_message(&f).unwrap(),
            "Executing stop_process failed: internal error"
        );
        let f = ask(Value::dict([("cmd", Value::str("start_process"))])).await;
        assert_eq!(
            protocol::failure_message(&f).unwrap(),
            "Executing start_process failed: no definition for device X"
        );
        let (r, _) = d.dispatch(b"").await;
        let f = codec::decode(&r, &Limits::default()).unwrap();
        assert_eq!(
            protocol::failure_message(&f).unwrap(),
            "Invalid command: empty request frame"
        );
    }
}
