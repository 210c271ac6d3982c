//! The CGSE Service Registry: a client, the daemon's registration, and discovery.
//!
//! Wire: requests are `[b"REQ", json]` on a DEALER to the request port, replies
//! `[b"RESPONSE", json]`; heartbeats are one JSON frame on a DEALER to the heartbeat port. JSON is written
//! the way Python's `json.dumps` writes it (`", "` and `": "`, ASCII only, our key order), so a registry log
//! or a capture shows the same bytes as for the original.
//!
//! Replies carry no request id. Correlation is by construction ([`DealerClient`]): a socket that timed out
//! is dropped with whatever reply might still come, and a kept socket is drained before the next request.
//!
//! [`Registration`] (in `registration.rs`) is the daemon's [`Lifecycle`](crate::daemon::Lifecycle) hook.
//! Unlike the original, the daemon never waits for the registry: `started()` spawns a task that registers
//! (retrying every second while the registry is absent), renews every ttl/3, re-registers with the same id as
//! soon as a renew fails and the registry answers again, and deregisters at shutdown. The service id is kept
//! in the state directory, so a daemon restarted after a crash updates its own record in place instead of
//! being refused for the ttl as a duplicate.

mod registration;

pub use registration::*;

use std::time::Duration;

use bytes::Bytes;
use serde_json::{Map, Value as Json};
use tracing::{debug, info, warn};

use crate::config::RegistrySettings;
use crate::transport::{self, DealerClient, TransportError};

/// Why a registry call gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry could not be reached or did not answer in time.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A reply that is not the JSON object the request calls for.
    #[error("unexpected reply from the registry at {endpoint}: {detail}")]
    BadReply {
        /// The registry's endpoint.
        endpoint: String,
        /// What was wrong with the reply.
        detail: String,
    },
    /// The registry answered `"success": false`.
    #[error("the registry refused '{action}': {error}{}", message.as_deref().map(|m| format!(" ({m})")).unwrap_or_default())]
    Refused {
        /// The request's `action`.
        action: String,
        /// The reply's `error`.
        error: String,
        /// The reply's `message`, if any.
        message: Option<String>,
        /// The whole reply, e.g. for `existing_service_id`.
        reply: Box<Map<String, Json>>,
    },
    /// The service id could not be written to its file.
    #[error("cannot keep the service id in {path}: {reason}")]
    IdFile {
        /// The id file.
        path: String,
        /// The I/O error.
        reason: String,
    },
}

impl RegistryError {
    /// True when the registry did not answer at all (down or unreachable).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, RegistryError::Transport(_))
    }
}

/// `json.dumps(v)` with Python's defaults: `", "` / `": "` separators, `ensure_ascii=True`, keys in order.
pub fn py_json(v: &Json) -> String {
    let mut out = String::new();
    write_json(v, &mut out);
    out
}

fn write_json(v: &Json, out: &mut String) {
    match v {
        Json::Null => out.push_str("null"),
        Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Json::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => out.push_str(&i.to_string()),
            (None, Some(u), _) => out.push_str(&u.to_string()),
            (None, None, Some(f)) if f.is_finite() => out.push_str(&crate::codec::float_repr(f)),
            (None, None, Some(f)) if f.is_nan() => out.push_str("NaN"),
            (None, None, Some(f)) => out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" }),
            _ => out.push_str(&n.to_string()),
        },
        Json::String(s) => write_json_str(s, out),
        Json::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_json(item, out);
            }
            out.push(']');
        }
        Json::Object(map) => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_json_str(k, out);
                out.push_str(": ");
                write_json(item, out);
            }
            out.push('}');
        }
    }
}

fn write_json_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
        }
    }
    out.push('"');
}

/// What a service registers (`service_info`).
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceInfo {
    /// `name`: the process name.
    pub name: String,
    /// `host`: the address clients connect to.
    pub host: String,
    /// `port`: the commanding port.
    pub port: u16,
    /// A known id: the registry then updates that record in place.
    pub id: Option<String>,
    /// `type` (also the only tag).
    pub service_type: String,
    /// `metadata`, in this order (e.g. the other ports).
    pub metadata: Vec<(String, Json)>,
}

impl ServiceInfo {
    /// `service_info` in the key order of CGSE's `RegistryClient.register`.
    pub fn to_json(&self) -> Json {
        let mut m = Map::new();
        m.insert("name".into(), Json::from(self.name.clone()));
        m.insert("host".into(), Json::from(self.host.clone()));
        m.insert("port".into(), Json::from(self.port));
        if let Some(id) = &self.id {
            m.insert("id".into(), Json::from(id.clone()));
        }
        m.insert("type".into(), Json::from(self.service_type.clone()));
        m.insert(
            "metadata".into(),
            Json::Object(self.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
        );
        m.insert("tags".into(), Json::Array(vec![Json::from(self.service_type.clone())]));
        Json::Object(m)
    }
}

/// A record as `get`, `list` and `discover` return it.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceRecord {
    /// The record's id.
    pub id: String,
    /// The registered name (empty when absent).
    pub name: String,
    /// The registered host.
    pub host: String,
    /// The registered (commanding) port.
    pub port: u16,
    /// The registered metadata (empty when absent).
    pub metadata: Map<String, Json>,
    /// The registry's health of the record, when it reports one.
    pub health: Option<String>,
}

impl ServiceRecord {
    /// A record from the registry's JSON; None when `id`, `host` or a valid `port` is missing.
    pub fn from_json(v: &Json) -> Option<ServiceRecord> {
        let port = v.get("port")?.as_u64().and_then(|p| u16::try_from(p).ok())?;
        Some(ServiceRecord {
            id: v.get("id")?.as_str()?.to_owned(),
            name: v.get("name").and_then(Json::as_str).unwrap_or_default().to_owned(),
            host: v.get("host")?.as_str()?.to_owned(),
            port,
            metadata: v.get("metadata").and_then(Json::as_object).cloned().unwrap_or_default(),
            health: v.get("health").and_then(Json::as_str).map(str::to_owned),
        })
    }

    /// A port from the metadata (`service_port`, `monitoring_port`).
    pub fn metadata_port(&self, key: &str) -> Option<u16> {
        self.metadata
            .get(key)
            .and_then(|p| p.as_u64().or_else(|| p.as_str().and_then(|s| s.trim().parse().ok())))
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
    }

    /// `tcp://<host>:<port>` (the registry stores no protocol; CGSE assumes tcp).
    pub async fn endpoint(&self, port: u16) -> Result<String, TransportError> {
        transport::client_endpoint_async("tcp", &self.host, port).await
    }
}

/// A client of the registry's request port.
pub struct RegistryClient {
    req: DealerClient,
    timeout: Duration,
}

impl RegistryClient {
    /// A client of `endpoint`; a refused connection fails at once.
    pub fn new(endpoint: impl Into<String>, timeout: Duration) -> RegistryClient {
        let mut req = DealerClient::new(endpoint);
        // Nothing listening = no registry: say so now rather than after the timeout.
        req.set_refused_is_final(true);
        RegistryClient { req, timeout }
    }

    /// The request port of the configured registry.
    pub async fn from_settings(s: &RegistrySettings, timeout: Duration) -> Result<RegistryClient, RegistryError> {
        Ok(RegistryClient::new(
            transport::client_endpoint_async("tcp", &s.hostname, s.requester_port).await?,
            timeout,
        ))
    }

    /// The registry endpoint this client talks to.
    pub fn endpoint(&self) -> &str {
        self.req.endpoint()
    }

    /// One request; the reply object whether it says success or not.
    ///
    /// Every request connects afresh: a zmq.rs socket neither reconnects nor notices, while idle, that
    /// its peer is gone, so a kept one would send into a restarted registry's void and wait out the
    /// timeout. On loopback the extra connection costs about a millisecond.
    pub async fn request(&mut self, body: &Json) -> Result<Map<String, Json>, RegistryError> {
        let frames = vec![Bytes::from_static(b"REQ"), Bytes::from(py_json(body))];
        let reply = self.req.request(frames, self.timeout).await;
        self.req.reset();
        let reply = reply?;
        let parsed = match reply.as_slice() {
            [kind, json] if kind.as_ref() == b"RESPONSE" => {
                serde_json::from_slice::<Json>(json).map_err(|e| e.to_string())
            }
            other => Err(format!("{} frames, expected [RESPONSE, json]", other.len())),
        };
        match parsed {
            Ok(Json::Object(m)) => Ok(m),
            Ok(other) => self.bad(format!("not a JSON object: {other}")),
            Err(detail) => self.bad(detail),
        }
    }

    fn bad<T>(&mut self, detail: String) -> Result<T, RegistryError> {
        // Whatever made the reply bad may leave more behind: start afresh.
        self.req.reset();
        Err(RegistryError::BadReply {
            endpoint: self.endpoint().to_owned(),
            detail,
        })
    }

    /// A request that must succeed.
    pub async fn call(&mut self, body: Json) -> Result<Map<String, Json>, RegistryError> {
        let action = body.get("action").and_then(Json::as_str).unwrap_or("?").to_owned();
        let reply = self.request(&body).await?;
        if reply.get("success").and_then(Json::as_bool) == Some(true) {
            return Ok(reply);
        }
        Err(RegistryError::Refused {
            action,
            error: reply
                .get("error")
                .and_then(Json::as_str)
                .unwrap_or("no reason given")
                .to_owned(),
            message: reply.get("message").and_then(Json::as_str).map(str::to_owned),
            reply: Box::new(reply),
        })
    }

    /// `health`: true when the registry answers ok.
    pub async fn health(&mut self) -> bool {
        self.call(action("health", [])).await.is_ok()
    }

    /// `register`; returns the service id.
    pub async fn register(&mut self, info: &ServiceInfo, ttl: Duration) -> Result<String, RegistryError> {
        let body = action(
            "register",
            [("service_info", info.to_json()), ("ttl", Json::from(ttl_seconds(ttl)))],
        );
        let reply = self.call(body).await?;
        match reply.get("service_id").and_then(Json::as_str) {
            Some(id) if valid_id(id) => Ok(id.to_owned()),
            _ => self.bad(format!("register reply without a usable service_id: {reply:?}")),
        }
    }

    /// `deregister`.
    pub async fn deregister(&mut self, service_id: &str) -> Result<(), RegistryError> {
        self.call(action("deregister", [("service_id", Json::from(service_id))]))
            .await
            .map(|_| ())
    }

    /// `get` one record by id.
    pub async fn get(&mut self, service_id: &str) -> Result<ServiceRecord, RegistryError> {
        let reply = self
            .call(action("get", [("service_id", Json::from(service_id))]))
            .await?;
        self.record(&reply)
    }

    /// `discover`: a healthy record of `service_type`.
    pub async fn discover(&mut self, service_type: &str) -> Result<ServiceRecord, RegistryError> {
        let reply = self
            .call(action("discover", [("service_type", Json::from(service_type))]))
            .await?;
        self.record(&reply)
    }

    fn record(&mut self, reply: &Map<String, Json>) -> Result<ServiceRecord, RegistryError> {
        match reply.get("service").and_then(ServiceRecord::from_json) {
            Some(r) => Ok(r),
            None => self.bad(format!("no usable 'service' record in {reply:?}")),
        }
    }
}

/// A client of the heartbeat port: one JSON frame out, one back.
pub struct HeartbeatClient {
    dealer: DealerClient,
    timeout: Duration,
}

impl HeartbeatClient {
    /// A client of `endpoint`; a refused connection fails at once.
    pub fn new(endpoint: impl Into<String>, timeout: Duration) -> HeartbeatClient {
        let mut dealer = DealerClient::new(endpoint);
        dealer.set_refused_is_final(true);
        HeartbeatClient { dealer, timeout }
    }

    /// `renew`: Ok when the registry renewed our record.
    pub async fn renew(&mut self, service_id: &str) -> Result<(), RegistryError> {
        let body = action("renew", [("service_id", Json::from(service_id))]);
        let endpoint = self.dealer.endpoint().to_owned();
        // A fresh connection per beat, for the reason given at `RegistryClient::request`.
        let reply = self
            .dealer
            .request(vec![Bytes::from(py_json(&body))], self.timeout)
            .await;
        self.dealer.reset();
        let reply = reply?;
        let parsed = match reply.as_slice() {
            [json] => serde_json::from_slice::<Json>(json).ok(),
            _ => None,
        };
        let Some(Json::Object(m)) = parsed else {
            self.dealer.reset();
            return Err(RegistryError::BadReply {
                endpoint,
                detail: format!("heartbeat reply of {} frames is not one JSON object", reply.len()),
            });
        };
        if m.get("success").and_then(Json::as_bool) == Some(true) {
            return Ok(());
        }
        Err(RegistryError::Refused {
            action: "renew".into(),
            error: m
                .get("error")
                .and_then(Json::as_str)
                .unwrap_or("no reason given")
                .to_owned(),
            message: m.get("message").and_then(Json::as_str).map(str::to_owned),
            reply: Box::new(m),
        })
    }
}

fn action<const N: usize>(name: &str, fields: [(&str, Json); N]) -> Json {
    let mut m = Map::new();
    m.insert("action".into(), Json::from(name));
    for (k, v) in fields {
        m.insert(k.into(), v);
    }
    Json::Object(m)
}

/// The registry keeps ttl in whole seconds.
fn ttl_seconds(ttl: Duration) -> u64 {
    ttl.as_secs_f64().ceil().max(1.0) as u64
}

/// The heartbeat period: ttl/3 in whole seconds, at least 1 s (as CGSE's client).
pub fn heartbeat_interval(ttl: Duration) -> Duration {
    Duration::from_secs((ttl_seconds(ttl) / 3).max(1))
}

/// Ids we accept from the registry or from our id file: what CGSE generates, nothing a path or a log
/// line could be abused with.
fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 200 && id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
}

/// Find a healthy service of `service_type` in the configured registry.
pub async fn discover(
    settings: &RegistrySettings,
    service_type: &str,
    timeout: Duration,
) -> Result<ServiceRecord, RegistryError> {
    RegistryClient::from_settings(settings, timeout)
        .await?
        .discover(service_type)
        .await
}

/// Locates control servers by service type in the registry (readiness probes of managed devices,
/// whose control servers register under their device id).
pub struct RegistryLocator {
    settings: RegistrySettings,
    timeout: Duration,
}

impl RegistryLocator {
    /// Looks up in the registry of `settings`, `timeout` per request.
    pub fn new(settings: RegistrySettings, timeout: Duration) -> RegistryLocator {
        RegistryLocator { settings, timeout }
    }
}

impl crate::probe::Locator for RegistryLocator {
    fn commanding_endpoint(&self, service_type: &str) -> crate::probe::BoxFuture<'_, Option<String>> {
        let service_type = service_type.to_owned();
        Box::pin(async move {
            match discover(&self.settings, &service_type, self.timeout).await {
                Ok(r) => r.endpoint(r.port).await.ok(),
                Err(e) => {
                    debug!(service_type = %service_type, error = %e, "not found in the registry");
                    None
                }
            }
        })
    }
}
// ---------------------------------------------------------------------------------------------------------------
// Stale records of supervised CGSE services.

impl RegistryClient {
    /// `list`: every record of `service_type`, healthy or not.
    pub async fn list(&mut self, service_type: &str) -> Result<Vec<ServiceRecord>, RegistryError> {
        let reply = self
            .call(action("list", [("service_type", Json::from(service_type))]))
            .await?;
        match reply.get("services").and_then(Json::as_array) {
            Some(items) => Ok(items.iter().filter_map(ServiceRecord::from_json).collect()),
            None => self.bad(format!("list reply without 'services': {reply:?}")),
        }
    }
}

/// A record removed by [`clear_stale_records`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClearedRecord {
    /// The id of the deregistered record.
    pub service_id: String,
    /// Its `host:port`, which refused the connection.
    pub endpoint: String,
}

/// Deregisters the records of `service_type` whose endpoint refuses a TCP connection: the records of dead
/// instances (the kernel closes a killed process's listening sockets at once), which a registry that enforces
/// unique service types would otherwise hold against a restarted one until their TTL runs out. A record whose
/// endpoint accepts the connection is live, whatever protocol it speaks (the hubs answer no CGSE `Ping`), and
/// is left alone; so is one that cannot be reached within `timeout` (we cannot tell). Each removal is logged
/// with its reason.
///
/// # Errors
/// The registry does not answer or refuses `list`; a refused `deregister` is logged and skipped.
pub async fn clear_stale_records(
    registry: &RegistrySettings,
    service_type: &str,
    timeout: Duration,
) -> Result<Vec<ClearedRecord>, RegistryError> {
    let mut client = RegistryClient::from_settings(registry, timeout).await?;
    let records = client.list(service_type).await?;
    let mut cleared = Vec::new();
    for record in records {
        let endpoint = format!("{}:{}", record.host, record.port);
        let connect = tokio::net::TcpStream::connect((record.host.as_str(), record.port));
        match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(_)) => {
                debug!(service_id = %record.id, %endpoint, service_type, "record's endpoint accepts connections: live, kept");
                continue;
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            Ok(Err(e)) => {
                debug!(service_id = %record.id, %endpoint, error = %e, "record's endpoint unreachable; left alone");
                continue;
            }
            Err(_) => {
                debug!(service_id = %record.id, %endpoint, "record's endpoint does not answer in time; left alone");
                continue;
            }
        }
        match client.deregister(&record.id).await {
            Ok(()) => {
                info!(service_id = %record.id, %endpoint, service_type,
                    "deregistered a stale record: its endpoint refuses connections (the instance was reaped)");
                cleared.push(ClearedRecord {
                    service_id: record.id,
                    endpoint,
                });
            }
            Err(e) => warn!(service_id = %record.id, error = %e, "could not deregister a stale record"),
        }
    }
    Ok(cleared)
}

/// The supervisor's [`RestartHook`](crate::supervisor::RestartHook): before a CGSE service is restarted,
/// [`clear_stale_records`] of its service type, so the new instance can register at once.
pub struct StaleRecordCleaner {
    registry: RegistrySettings,
    timeout: Duration,
}

impl StaleRecordCleaner {
    /// Clears records in the registry of `registry`, `timeout` per request and connection.
    pub fn new(registry: RegistrySettings, timeout: Duration) -> StaleRecordCleaner {
        StaleRecordCleaner { registry, timeout }
    }
}

impl crate::supervisor::RestartHook for StaleRecordCleaner {
    fn before_restart(&self, def: &crate::supervisor::ProcessDefinition) -> crate::util::BoxFuture<'static, ()> {
        let registry = self.registry.clone();
        let timeout = self.timeout;
        let id = def.id.clone();
        let service_type = def.service_type.clone();
        Box::pin(async move {
            let Some(service_type) = service_type else { return };
            match clear_stale_records(&registry, &service_type, timeout).await {
                Ok(cleared) if !cleared.is_empty() => {
                    info!(process = %id, %service_type, records = cleared.len(), "cleared before the restart");
                }
                Ok(_) => debug!(process = %id, %service_type, "no stale registry record before the restart"),
                Err(e) => debug!(process = %id, %service_type, error = %e, "registry not asked before the restart"),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgse::testing::ReservedPort;
    use crate::daemon::Lifecycle;
    use crate::server::Ports;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Instant;
    use tokio::sync::watch;
    use tokio::task::JoinHandle;
    use zeromq::{SocketRecv, SocketSend, ZmqMessage};

    type Handler = Arc<dyn Fn(&Json) -> Option<Json> + Send + Sync>;

    /// A scripted registry: a request ROUTER and a heartbeat ROUTER, recording every JSON body.
    struct FakeRegistry {
        settings: RegistrySettings,
        seen: Arc<Mutex<Vec<Json>>>,
        tasks: Vec<JoinHandle<()>>,
    }

    impl FakeRegistry {
        async fn start(handler: Handler) -> FakeRegistry {
            Self::start_on(0, 0, handler).await
        }

        async fn start_on(req_port: u16, hb_port: u16, handler: Handler) -> FakeRegistry {
            let seen = Arc::new(Mutex::new(Vec::new()));
            let (mut req, req_port) = transport::bind_router("tcp", "127.0.0.1", req_port, "req")
                .await
                .unwrap();
            let (mut hb, hb_port) = transport::bind_router("tcp", "127.0.0.1", hb_port, "hb").await.unwrap();
            let (h1, s1) = (handler.clone(), seen.clone());
            let t1 = tokio::spawn(async move {
                while let Ok(m) = req.recv().await {
                    let f = m.into_vec();
                    let body: Json = serde_json::from_slice(&f[2]).unwrap();
                    assert_eq!(f[1].as_ref(), b"REQ");
                    lock(&s1).push(body.clone());
                    if let Some(r) = h1(&body) {
                        let out = vec![f[0].clone(), Bytes::from_static(b"RESPONSE"), Bytes::from(py_json(&r))];
                        let _ = req.send(ZmqMessage::try_from(out).unwrap()).await;
                    }
                }
            });
            let (h2, s2) = (handler, seen.clone());
            let t2 = tokio::spawn(async move {
                while let Ok(m) = hb.recv().await {
                    let f = m.into_vec();
                    let body: Json = serde_json::from_slice(&f[1]).unwrap();
                    lock(&s2).push(body.clone());
                    if let Some(r) = h2(&body) {
                        let out = vec![f[0].clone(), Bytes::from(py_json(&r))];
                        let _ = hb.send(ZmqMessage::try_from(out).unwrap()).await;
                    }
                }
            });
            FakeRegistry {
                settings: RegistrySettings {
                    hostname: "127.0.0.1".into(),
                    requester_port: req_port,
                    publisher_port: 0,
                    heartbeat_port: hb_port,
                },
                seen,
                tasks: vec![t1, t2],
            }
        }

        fn actions(&self, name: &str) -> Vec<Json> {
            lock(&self.seen)
                .iter()
                .filter(|b| b["action"] == name)
                .cloned()
                .collect()
        }

        fn stop(self) {
            for t in self.tasks {
                t.abort();
            }
        }
    }

    /// A registry that accepts everything and keeps one record per id.
    fn accepting(renew_ok: Arc<AtomicBool>) -> Handler {
        Arc::new(move |b: &Json| {
            Some(match b["action"].as_str() {
                Some("register") => {
                    let id = b["service_info"]["id"].as_str().unwrap_or("pm_cs-fresh-1").to_owned();
                    serde_json::json!({"success": true, "service_id": id, "message": "Service registered successfully"})
                }
                Some("renew") if renew_ok.load(Ordering::SeqCst) => {
                    serde_json::json!({"success": true, "message": "Service renewed successfully"})
                }
                Some("renew") => {
                    serde_json::json!({"success": false, "error": "Service not found or could not be renewed"})
                }
                _ => serde_json::json!({"success": true, "message": "ok"}),
            })
        })
    }

    fn config(reg: &RegistrySettings, id_file: PathBuf) -> RegistrationConfig {
        RegistrationConfig {
            registry: reg.clone(),
            name: "pm_cs".into(),
            service_type: "PM_CS".into(),
            ttl: Duration::from_secs(3),
            timeout: Duration::from_millis(300),
            id_file,
            retry: Duration::from_millis(100),
            host_ip: Arc::new(|| Some("127.0.0.1".to_owned())),
        }
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("procman-registry-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    async fn wait_for(
        rx: &mut watch::Receiver<RegistrationState>,
        limit: Duration,
        pred: impl Fn(&RegistrationState) -> bool,
    ) -> RegistrationState {
        tokio::time::timeout(limit, async {
            loop {
                let s = rx.borrow_and_update().clone();
                if pred(&s) {
                    return s;
                }
                rx.changed().await.unwrap();
            }
        })
        .await
        .unwrap_or_else(|_| panic!("state not reached within {limit:?}; now {}", *rx.borrow()))
    }

    const PORTS: Ports = Ports {
        commanding: 38953,
        monitoring: 38537,
        service: 39091,
    };

    #[test]
    fn json_is_written_like_python() {
        let info = ServiceInfo {
            name: "pm_cs".into(),
            host: "127.0.0.1".into(),
            port: 6120,
            id: None,
            service_type: "PM_CS".into(),
            metadata: vec![
                ("service_port".into(), Json::from(6122)),
                ("monitoring_port".into(), Json::from(6121)),
            ],
        };
        let body = action("register", [("service_info", info.to_json()), ("ttl", Json::from(30))]);
        // Byte for byte what the original ControlServer sends.
        assert_eq!(
            py_json(&body),
            r#"{"action": "register", "service_info": {"name": "pm_cs", "host": "127.0.0.1", "port": 6120, "type": "PM_CS", "metadata": {"service_port": 6122, "monitoring_port": 6121}, "tags": ["PM_CS"]}, "ttl": 30}"#
        );
        let again = ServiceInfo {
            id: Some("pm_cs-721a".into()),
            ..info
        };
        let body = action("register", [("service_info", again.to_json()), ("ttl", Json::from(30))]);
        assert_eq!(
            py_json(&body),
            r#"{"action": "register", "service_info": {"name": "pm_cs", "host": "127.0.0.1", "port": 6120, "id": "pm_cs-721a", "type": "PM_CS", "metadata": {"service_port": 6122, "monitoring_port": 6121}, "tags": ["PM_CS"]}, "ttl": 30}"#
        );
        assert_eq!(
            py_json(&serde_json::json!({"s": "é\"\\\n😀", "n": null, "f": 0.5, "b": [true, {}], "e": []})),
            r#"{"s": "\u00e9\"\\\n\ud83d\ude00", "n": null, "f": 0.5, "b": [true, {}], "e": []}"#
        );
        assert_eq!(heartbeat_interval(Duration::from_secs(30)), Duration::from_secs(10));
        assert_eq!(heartbeat_interval(Duration::from_secs(2)), Duration::from_secs(1));
    }

    #[tokio::test]
    async fn records_and_ids() {
        let v: Json = serde_json::from_str(r#"{"id": "pm_cs-ceefb116", "name": "pm_cs", "host": "127.0.0.1", "port": 38953, "metadata": {"service_port": 39091, "monitoring_port": 38537, "type": "PM_CS"}, "ttl": 30, "last_heartbeat": 1795691579, "tags": ["PM_CS"], "health": "passing"}"#).unwrap();
        let r = ServiceRecord::from_json(&v).unwrap();
        assert_eq!(r.metadata_port("service_port"), Some(39091));
        assert_eq!(r.metadata_port("nope"), None);
        assert_eq!(r.endpoint(r.port).await.unwrap(), "tcp://127.0.0.1:38953");
        assert!(ServiceRecord::from_json(&serde_json::json!({"id": "x", "host": "h", "port": 70000})).is_none());
        assert!(valid_id("pm_cs-e8e1ffb7-04fb-447d-804a-b61d994dbe85"));
        assert!(!valid_id("../../etc/passwd") && !valid_id("") && !valid_id("a b"));
    }

    #[tokio::test]
    async fn a_late_reply_never_answers_the_next_request() {
        let (mut router, port) = transport::bind_router("tcp", "127.0.0.1", 0, "req").await.unwrap();
        let mut c = RegistryClient::new(format!("tcp://127.0.0.1:{port}"), Duration::from_millis(200));
        let reply_to = |f: &[Bytes], echo: &str| {
            let body = py_json(&serde_json::json!({"success": true, "echo": echo}));
            ZmqMessage::try_from(vec![f[0].clone(), Bytes::from_static(b"RESPONSE"), Bytes::from(body)]).unwrap()
        };
        let (body_one, body_two, body_three, body_four) = (
            action("one", []),
            action("two", []),
            action("three", []),
            action("four", []),
        );
        // 1. The registry is slow: the client gives up; the reply comes after that.
        let (r, first) = tokio::join!(c.request(&body_one), async { router.recv().await.unwrap().into_vec() });
        assert!(
            matches!(r, Err(RegistryError::Transport(TransportError::Timeout { .. }))),
            "{r:?}"
        );
        let _ = router.send(reply_to(&first, "one")).await;
        // 2. The next request gets its own reply.
        let (r, _) = tokio::join!(c.request(&body_two), async {
            let f = router.recv().await.unwrap().into_vec();
            assert_eq!(serde_json::from_slice::<Json>(&f[2]).unwrap()["action"], "two");
            router.send(reply_to(&f, "two")).await.unwrap();
        });
        assert_eq!(r.unwrap()["echo"], "two");
        // 3. A registry that answers twice: the extra reply is never taken for the next request.
        let (r, _) = tokio::join!(c.request(&body_three), async {
            let f = router.recv().await.unwrap().into_vec();
            router.send(reply_to(&f, "three")).await.unwrap();
            let _ = router.send(reply_to(&f, "three-again")).await;
        });
        assert_eq!(r.unwrap()["echo"], "three");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (r, _) = tokio::join!(c.request(&body_four), async {
            let f = router.recv().await.unwrap().into_vec();
            router.send(reply_to(&f, "four")).await.unwrap();
        });
        assert_eq!(r.unwrap()["echo"], "four");
    }

    #[tokio::test]
    async fn registers_renews_deregisters_and_keeps_the_id() {
        let renew_ok = Arc::new(AtomicBool::new(true));
        let fake = FakeRegistry::start(accepting(renew_ok.clone())).await;
        let dir = tempdir();
        let id_file = dir.join("id");
        let reg = Registration::new(config(&fake.settings, id_file.clone()));
        let mut rx = reg.subscribe();
        let t0 = Instant::now();
        reg.started(PORTS).await;
        // Bounded by the first attempt's wait, never by the registration as a whole (the margin is for a
        // loaded machine; a start-up that waited for the registry would hang here, not be late).
        assert!(
            t0.elapsed() < FIRST_ATTEMPT_WAIT + Duration::from_secs(5),
            "started() must not wait for the registry"
        );
        wait_for(&mut rx, Duration::from_secs(2), |s| {
            matches!(s, RegistrationState::Registered { .. })
        })
        .await;
        let sent = &fake.actions("register")[0];
        assert_eq!(sent["service_info"]["port"], 38953);
        assert_eq!(
            sent["service_info"]["metadata"],
            serde_json::json!({"service_port": 39091, "monitoring_port": 38537})
        );
        assert_eq!(sent["service_info"]["tags"], serde_json::json!(["PM_CS"]));
        assert_eq!(sent["ttl"], 3);
        assert!(sent["service_info"].get("id").is_none());
        assert_eq!(std::fs::read_to_string(&id_file).unwrap().trim(), "pm_cs-fresh-1");
        // ttl 3 s: a heartbeat every second, on the heartbeat port.
        tokio::time::sleep(Duration::from_millis(1300)).await;
        assert_eq!(fake.actions("renew")[0]["service_id"], "pm_cs-fresh-1");
        // The registry forgot us: the next heartbeat fails and we register again with the same id.
        renew_ok.store(false, Ordering::SeqCst);
        let n = fake.actions("register").len();
        tokio::time::timeout(Duration::from_secs(3), async {
            while fake.actions("register").len() == n {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap();
        assert_eq!(fake.actions("register")[n]["service_info"]["id"], "pm_cs-fresh-1");
        renew_ok.store(true, Ordering::SeqCst);
        wait_for(&mut rx, Duration::from_secs(2), |s| {
            matches!(s, RegistrationState::Registered { .. })
        })
        .await;
        reg.stopping().await;
        assert_eq!(fake.actions("deregister")[0]["service_id"], "pm_cs-fresh-1");
        assert_eq!(reg.state(), RegistrationState::Deregistered);
        // A restart (after a crash too) registers with the kept id: the registry updates its record.
        let again = Registration::new(config(&fake.settings, id_file));
        let mut rx = again.subscribe();
        again.started(PORTS).await;
        wait_for(&mut rx, Duration::from_secs(2), |s| {
            matches!(s, RegistrationState::Registered { .. })
        })
        .await;
        assert_eq!(
            fake.actions("register").last().unwrap()["service_info"]["id"],
            "pm_cs-fresh-1"
        );
        again.stopping().await;
        fake.stop();
        std::fs::remove_dir_all(dir).ok();
    }

    #[tokio::test]
    async fn registers_once_the_registry_appears() {
        // Ports with nothing behind them yet.
        let (req, hb) = (ReservedPort::new(), ReservedPort::new());
        let (req_port, hb_port) = (req.port(), hb.port());
        let settings = RegistrySettings {
            hostname: "127.0.0.1".into(),
            requester_port: req_port,
            publisher_port: 0,
            heartbeat_port: hb_port,
        };
        let dir = tempdir();
        let reg = Registration::new(config(&settings, dir.join("id")));
        let mut rx = reg.subscribe();
        let t0 = Instant::now();
        reg.started(PORTS).await;
        assert!(
            t0.elapsed() < FIRST_ATTEMPT_WAIT + Duration::from_secs(5),
            "no registry: started() returns after the first attempt"
        );
        let s = wait_for(
            &mut rx,
            Duration::from_secs(3),
            |s| matches!(s, RegistrationState::Registering { attempts, .. } if *attempts >= 2),
        )
        .await;
        assert!(s.to_string().contains("retrying"), "{s}");
        let fake = FakeRegistry::start_on(req_port, hb_port, accepting(Arc::new(AtomicBool::new(true)))).await;
        // Registered by the retries (every 100 ms), without a restart.
        wait_for(&mut rx, Duration::from_secs(10), |s| {
            matches!(s, RegistrationState::Registered { .. })
        })
        .await;
        reg.stopping().await;
        fake.stop();
        std::fs::remove_dir_all(dir).ok();
    }

    /// A control server that answers `Ping` (a live Process Manager).
    async fn live_control_server() -> (u16, crate::cgse::testing::ScriptedServer) {
        let server = crate::cgse::testing::ScriptedServer::start(0, |_| Some(crate::codec::Value::str("Pong"))).await;
        (server.port, server)
    }

    fn holding(existing_port: u16) -> Handler {
        Arc::new(move |b: &Json| {
            let held = "pm_cs-old";
            Some(match b["action"].as_str() {
                Some("register") if b["service_info"]["id"] == held => {
                    serde_json::json!({"success": true, "service_id": held, "message": "Service registered successfully"})
                }
                Some("register") => serde_json::json!({"success": false, "error": "duplicate_service_type",
                    "message": "Service type 'PM_CS' is already registered by service_id 'pm_cs-old'.",
                    "service_type": "PM_CS", "existing_service_id": held}),
                Some("get") => serde_json::json!({"success": true, "service": {"id": held, "name": "pm_cs",
                    "host": "127.0.0.1", "port": existing_port, "metadata": {"service_port": 1, "type": "PM_CS"},
                    "ttl": 30, "last_heartbeat": 1, "tags": ["PM_CS"], "health": "passing"}}),
                _ => serde_json::json!({"success": true}),
            })
        })
    }

    #[tokio::test]
    async fn takes_over_a_dead_holder_but_not_a_live_one() {
        let dir = tempdir();
        // A stale record (a crashed Process Manager): nothing answers at its port.
        let dead = ReservedPort::new();
        let dead_port = dead.port();
        let fake = FakeRegistry::start(holding(dead_port)).await;
        let reg = Registration::new(config(&fake.settings, dir.join("a")));
        let mut rx = reg.subscribe();
        reg.started(PORTS).await;
        let s = wait_for(&mut rx, Duration::from_secs(3), |s| {
            matches!(s, RegistrationState::Registered { .. })
        })
        .await;
        assert_eq!(
            s,
            RegistrationState::Registered {
                service_id: "pm_cs-old".into(),
                host: "127.0.0.1".into()
            }
        );
        reg.stopping().await;
        fake.stop();
        // A live holder: we stay unregistered (and say why).
        let (live_port, server) = live_control_server().await;
        let fake = FakeRegistry::start(holding(live_port)).await;
        let reg = Registration::new(config(&fake.settings, dir.join("b")));
        let mut rx = reg.subscribe();
        reg.started(PORTS).await;
        let s = wait_for(&mut rx, Duration::from_secs(3), |s| {
            matches!(s, RegistrationState::Conflict { .. })
        })
        .await;
        assert!(s.to_string().contains("pm_cs-old"), "{s}");
        assert!(fake
            .actions("register")
            .iter()
            .all(|b| b["service_info"].get("id").is_none()));
        reg.stopping().await;
        assert!(
            fake.actions("deregister").is_empty(),
            "never deregister someone else's record"
        );
        server.stop();
        fake.stop();
        std::fs::remove_dir_all(dir).ok();
    }

    #[tokio::test]
    async fn stale_records_are_cleared_and_live_ones_kept() {
        let (live_port, live) = live_control_server().await;
        let dead = ReservedPort::new();
        let dead_port = dead.port();
        let record = |id: &str, port: u16| {
            serde_json::json!({"id": id, "name": "sm_cs", "host": "127.0.0.1", "port": port,
                "type": "SM_CS", "metadata": {}, "health": "passing"})
        };
        let services = serde_json::json!([record("sm_cs-dead", dead_port), record("sm_cs-live", live_port)]);
        let reg = FakeRegistry::start(Arc::new(move |b: &Json| {
            Some(match b["action"].as_str() {
                Some("list") => serde_json::json!({"success": true, "services": services.clone()}),
                _ => serde_json::json!({"success": true, "message": "ok"}),
            })
        }))
        .await;
        let cleared = clear_stale_records(&reg.settings, "SM_CS", Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(
            cleared,
            [ClearedRecord {
                service_id: "sm_cs-dead".into(),
                endpoint: format!("127.0.0.1:{dead_port}"),
            }]
        );
        let lists = reg.actions("list");
        assert_eq!(lists.len(), 1);
        assert_eq!(lists[0]["service_type"], "SM_CS");
        let deregs = reg.actions("deregister");
        assert_eq!(deregs.len(), 1, "the live record is left alone: {deregs:?}");
        assert_eq!(deregs[0]["service_id"], "sm_cs-dead");
        live.stop();
        reg.stop();
    }

    #[tokio::test]
    async fn no_registry_is_an_error_not_a_hang() {
        let reserved = ReservedPort::new();
        let port = reserved.port();
        let settings = RegistrySettings {
            hostname: "127.0.0.1".into(),
            requester_port: port,
            publisher_port: 0,
            heartbeat_port: 0,
        };
        let err = clear_stale_records(&settings, "SM_CS", Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(err.is_unreachable(), "{err}");
    }
}
