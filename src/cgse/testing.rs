//! Test peers for the CGSE clients in this folder: one scripted control server (receive → decode → reply)
//! and one PULL receiver, instead of a hand-made socket loop in every test.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::task::JoinHandle;
use zeromq::{PullSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::cgse::push::{PushConfig, PushTarget};
use crate::codec::{self, Limits, Value};
use crate::config::RegistrySettings;
use crate::transport;

/// Registry settings that lead nowhere (port 1 on loopback): for a client whose peer has a fixed port.
pub fn no_registry() -> RegistrySettings {
    RegistrySettings {
        hostname: "127.0.0.1".into(),
        requester_port: 1,
        publisher_port: 1,
        heartbeat_port: 1,
    }
}

/// A PUSH channel to `peer` (registry type `service_type`, port key `metadata_key`) on loopback `port`,
/// queueing at most `queue` messages; connect and send bounded by `timeout`.
pub fn push_config(
    peer: &str,
    service_type: &str,
    metadata_key: &str,
    port: u16,
    queue: usize,
    timeout: Duration,
) -> PushConfig {
    PushConfig {
        target: PushTarget {
            peer: peer.into(),
            hostname: "127.0.0.1".into(),
            port,
            service_type: service_type.into(),
            metadata_key: metadata_key.into(),
            registry: no_registry(),
            registry_timeout: Duration::from_millis(200),
        },
        queue,
        connect_timeout: timeout,
        send_timeout: timeout,
        retry: Duration::from_millis(50),
    }
}

/// A loopback port held for one test, from the OS: bound, so that no other socket of the machine can take
/// it, and never listening, so that connections to it are refused, for as long as this lives. A server of
/// the test may still bind and listen on it (`SO_REUSEADDR` on both sides, and this socket never listens):
/// "a peer that appears later", without a bind-drop-rebind window in which a stranger could take the port.
pub struct ReservedPort {
    _socket: tokio::net::TcpSocket,
    port: u16,
}

impl ReservedPort {
    /// Reserve a port (panics when it cannot: the test fails).
    pub fn new() -> ReservedPort {
        let socket = tokio::net::TcpSocket::new_v4().expect("a TCP socket");
        socket.set_reuseaddr(true).expect("SO_REUSEADDR");
        socket
            .bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind a loopback port");
        let port = socket.local_addr().expect("local address").port();
        ReservedPort { _socket: socket, port }
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Default for ReservedPort {
    fn default() -> Self {
        ReservedPort::new()
    }
}

/// Poll `cond` until it holds or `limit` passes (the caller asserts afterwards).
pub async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !cond() && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What the scripted server does with one decoded request: `Some(reply)`, or `None` to stay silent.
pub type Script = Arc<dyn Fn(&Value) -> Option<Value> + Send + Sync>;

/// A CGSE control server (pickle over ROUTER) that answers by script and records what it received.
pub struct ScriptedServer {
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    /// The requests received, decoded, in order.
    pub seen: Arc<Mutex<Vec<Value>>>,
    task: JoinHandle<()>,
}

impl ScriptedServer {
    /// Bind on `port` (0 = a free one) and serve until dropped.
    pub async fn start(port: u16, script: impl Fn(&Value) -> Option<Value> + Send + Sync + 'static) -> ScriptedServer {
        ScriptedServer::serve(port, None, Arc::new(script)).await
    }

    /// [`ScriptedServer::start`], but every reply waits for a permit of `gate` (a server that answers when
    /// the test says so: what a client does in the meantime can be checked without timing it). The
    /// request is recorded and the script run at once (the reply is what the server would have said on
    /// receipt); requests are answered in order.
    pub async fn start_gated(
        port: u16,
        gate: Arc<tokio::sync::Semaphore>,
        script: impl Fn(&Value) -> Option<Value> + Send + Sync + 'static,
    ) -> ScriptedServer {
        ScriptedServer::serve(port, Some(gate), Arc::new(script)).await
    }

    async fn serve(port: u16, gate: Option<Arc<tokio::sync::Semaphore>>, script: Script) -> ScriptedServer {
        let (mut router, port) = transport::bind_router("tcp", "127.0.0.1", port, "scripted")
            .await
            .expect("bind the scripted server");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok(m) = router.recv().await {
                let mut frames = m.into_vec();
                let Some(last) = frames.pop() else { continue };
                let request = codec::decode(&last, &Limits::default()).expect("a request we can decode");
                log.lock().expect("seen").push(request.clone());
                let reply = script(&request);
                if let Some(gate) = &gate {
                    match gate.acquire().await {
                        Ok(permit) => permit.forget(),
                        Err(_) => return,
                    }
                }
                if let Some(reply) = reply {
                    frames.push(Bytes::from(codec::encode(&reply)));
                    if let Ok(msg) = ZmqMessage::try_from(frames) {
                        let _ = router.send(msg).await;
                    }
                }
            }
        });
        ScriptedServer { port, seen, task }
    }

    /// The requests received so far.
    pub fn seen(&self) -> Vec<Value> {
        self.seen.lock().expect("seen").clone()
    }

    /// Stop serving (abort the task).
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for ScriptedServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A PULL receiver (the Logger's or the Metrics Hub's side of a PUSH channel).
pub struct PullPeer {
    socket: PullSocket,
}

impl PullPeer {
    /// Bind on 127.0.0.1:`port` (panics when it cannot: the test fails).
    pub async fn bind(port: u16) -> PullPeer {
        let mut socket = PullSocket::new();
        socket
            .bind(&format!("tcp://127.0.0.1:{port}"))
            .await
            .expect("bind the PULL peer");
        PullPeer { socket }
    }

    /// The next message's single frame, within `limit` (panics otherwise: the test fails).
    pub async fn recv(&mut self, limit: Duration) -> Vec<u8> {
        let m = tokio::time::timeout(limit, self.socket.recv())
            .await
            .expect("a message within the limit")
            .expect("a message");
        m.get(0).map(|b| b.to_vec()).unwrap_or_default()
    }

    /// Receive until `done` says the collected messages suffice, within `limit`.
    pub async fn recv_until(&mut self, limit: Duration, mut done: impl FnMut(&[Vec<u8>]) -> bool) -> Vec<Vec<u8>> {
        let end = Instant::now() + limit;
        let mut out = Vec::new();
        while !done(&out) {
            let left = end.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.socket.recv()).await {
                Ok(Ok(m)) => out.push(m.get(0).map(|b| b.to_vec()).unwrap_or_default()),
                _ => break,
            }
        }
        out
    }
}

/// Run `f` with a deadline; panic with `what` when it does not finish.
pub async fn within<T>(limit: Duration, what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: not done within {limit:?}"),
    }
}
