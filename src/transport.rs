//! ZeroMQ sockets (zmq.rs), behind a few functions so that no other module depends on the library.
//!
//! zmq.rs has no socket options for timeouts, linger or high-water marks, and its `tcp://*:port` goes to
//! DNS. So: we bind the TCP listener ourselves (the wildcard becomes `0.0.0.0`, a bind failure names the
//! port, port 0 reports the real port), bound every wait with `tokio::time::timeout`, and recreate client
//! sockets after any error or timeout (the "lazy pirate" pattern CGSE's own proxies use).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, ToSocketAddrs};
use std::time::Duration;

use bytes::Bytes;
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

pub use zeromq::{PubSocket, RouterSocket};

/// Transport-level failures.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A server socket's address could not be bound (in use, not local, no permission).
    #[error("cannot bind the {role} socket to {endpoint}: {source}")]
    Bind {
        /// Which socket (`commanding`, `service`, `monitoring`, …).
        role: String,
        /// The address it was to listen on.
        endpoint: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A protocol other than `tcp` was configured.
    #[error("protocol '{0}' is not supported (procman speaks tcp)")]
    Protocol(String),
    /// A host name did not resolve to an address.
    #[error("cannot resolve host '{0}'")]
    Resolve(String),
    /// zmq.rs failed to take over a bound listener or to receive a reply.
    #[error("zeromq error on {endpoint}: {reason}")]
    Zmq {
        /// The socket's endpoint.
        endpoint: String,
        /// zmq.rs's error.
        reason: String,
    },
    /// The request was sent but no reply came within the timeout.
    #[error("no reply from {endpoint} within {timeout:?}")]
    Timeout {
        /// The peer.
        endpoint: String,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// No connection could be made: nothing was sent.
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect {
        /// The peer.
        endpoint: String,
        /// Why the connection failed.
        reason: String,
    },
    /// The request could not be handed to the socket: nothing was sent.
    #[error("cannot send to {endpoint}: {reason}")]
    Send {
        /// The peer.
        endpoint: String,
        /// Why the send failed.
        reason: String,
    },
    /// A REQ reply did not have exactly one frame.
    #[error("reply from {endpoint} has {frames} frames, expected 1")]
    Frames {
        /// The peer.
        endpoint: String,
        /// The frames it sent.
        frames: usize,
    },
}

impl TransportError {
    /// True when the request may have reached the peer (it was sent; the reply is missing or bad).
    /// A peer that stores what it receives may then have stored it.
    pub fn maybe_delivered(&self) -> bool {
        matches!(
            self,
            TransportError::Timeout { .. } | TransportError::Zmq { .. } | TransportError::Frames { .. }
        )
    }
}

/// The address a server socket binds: CGSE's `*` means every interface.
fn bind_addr(address: &str, port: u16) -> Result<SocketAddr, TransportError> {
    let host = address.trim();
    if host.is_empty() || host == "*" {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port));
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut it| it.next())
        .ok_or_else(|| TransportError::Resolve(host.to_owned()))
}

fn listener(protocol: &str, address: &str, port: u16, role: &str) -> Result<(TcpListener, u16), TransportError> {
    if protocol != "tcp" {
        return Err(TransportError::Protocol(protocol.to_owned()));
    }
    let endpoint = format!("tcp://{address}:{port}");
    let addr = bind_addr(address, port)?;
    let bind_err = |source| TransportError::Bind {
        role: role.to_owned(),
        endpoint: endpoint.clone(),
        source,
    };
    let l = TcpListener::bind(addr).map_err(bind_err)?;
    l.set_nonblocking(true).map_err(bind_err)?;
    let actual = l.local_addr().map_err(bind_err)?.port();
    Ok((l, actual))
}

/// Bind a ROUTER socket (serves REQ and DEALER clients); returns it with the real port.
pub async fn bind_router(
    protocol: &str,
    address: &str,
    port: u16,
    role: &str,
) -> Result<(RouterSocket, u16), TransportError> {
    let (l, actual) = listener(protocol, address, port, role)?;
    let mut socket = RouterSocket::new();
    socket.bind_listener(l).await.map_err(|e| TransportError::Zmq {
        endpoint: format!("tcp://{address}:{actual}"),
        reason: e.to_string(),
    })?;
    Ok((socket, actual))
}

/// Bind a PUB socket; returns it with the real port.
pub async fn bind_pub(
    protocol: &str,
    address: &str,
    port: u16,
    role: &str,
) -> Result<(PubSocket, u16), TransportError> {
    let (l, actual) = listener(protocol, address, port, role)?;
    let mut socket = PubSocket::new();
    socket.bind_listener(l).await.map_err(|e| TransportError::Zmq {
        endpoint: format!("tcp://{address}:{actual}"),
        reason: e.to_string(),
    })?;
    Ok((socket, actual))
}

/// A message as a list of frames.
pub fn frames(msg: ZmqMessage) -> Vec<Bytes> {
    msg.into_vec()
}

/// Build a message from frames (at least one).
pub fn message(frames: Vec<Bytes>) -> Option<ZmqMessage> {
    ZmqMessage::try_from(frames).ok()
}

/// The endpoint a client connects to. zmq.rs resolves `localhost` itself, but a hostname that resolves
/// to IPv6 first would be tried as such; resolve here and prefer IPv4 like libzmq.
///
/// This resolves a hostname with the blocking system resolver: for command-line tools and start-up code.
/// Code on the runtime uses [`client_endpoint_async`].
pub fn client_endpoint(protocol: &str, host: &str, port: u16) -> Result<String, TransportError> {
    check_protocol(protocol)?;
    let ip = match host.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) => prefer_ipv4(host, (host, port).to_socket_addrs().ok().into_iter().flatten())?,
    };
    Ok(endpoint_of(ip, port))
}

/// [`client_endpoint`] for async code: a hostname is resolved by `tokio::net::lookup_host`, which runs the
/// system resolver on the blocking pool, so a slow DNS server stalls this caller only, never a runtime
/// thread. An IP address costs no lookup at all.
pub async fn client_endpoint_async(protocol: &str, host: &str, port: u16) -> Result<String, TransportError> {
    check_protocol(protocol)?;
    let ip = match host.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) => prefer_ipv4(
            host,
            tokio::net::lookup_host((host, port)).await.ok().into_iter().flatten(),
        )?,
    };
    Ok(endpoint_of(ip, port))
}

fn check_protocol(protocol: &str) -> Result<(), TransportError> {
    if protocol == "tcp" {
        Ok(())
    } else {
        Err(TransportError::Protocol(protocol.to_owned()))
    }
}

fn prefer_ipv4(host: &str, addrs: impl Iterator<Item = SocketAddr>) -> Result<IpAddr, TransportError> {
    let addrs: Vec<SocketAddr> = addrs.collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .map(|a| a.ip())
        .ok_or_else(|| TransportError::Resolve(host.to_owned()))
}

fn endpoint_of(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("tcp://{v4}:{port}"),
        IpAddr::V6(v6) => format!("tcp://[{v6}]:{port}"),
    }
}

/// Connect a client socket within `limit`; any failure means nothing was sent.
///
/// With `refused_is_final`, a plain TCP connect goes first and a refused connection fails at once:
/// zmq.rs would keep retrying until `limit`, so a peer that is simply not running would cost the whole
/// bound on every attempt. Callers that retry on their own (the core-service clients) want that.
async fn connect_within<S: Socket>(
    mut socket: S,
    endpoint: &str,
    limit: Duration,
    refused_is_final: bool,
) -> Result<S, TransportError> {
    let failed = |reason: String| TransportError::Connect {
        endpoint: endpoint.to_owned(),
        reason,
    };
    if refused_is_final {
        if let Some(addr) = endpoint.strip_prefix("tcp://") {
            let addr = addr.trim_start_matches('[').replacen("]:", ":", 1);
            if let Ok(Err(e)) = tokio::time::timeout(limit, tokio::net::TcpStream::connect(addr.as_str())).await {
                if e.kind() == std::io::ErrorKind::ConnectionRefused {
                    return Err(failed(format!("connection refused ({e})")));
                }
            }
        }
    }
    match tokio::time::timeout(limit, socket.connect(endpoint)).await {
        Ok(Ok(())) => Ok(socket),
        Ok(Err(e)) => Err(failed(e.to_string())),
        Err(_) => Err(failed(format!("no connection within {limit:?}"))),
    }
}

fn socket_options(connect_limit: Duration) -> zeromq::SocketOptions {
    let mut opts = zeromq::SocketOptions::default();
    opts.connect_timeout(connect_limit);
    opts
}

/// The connection state both request clients share: an endpoint and, between requests, the socket kept
/// after a successful exchange. Any error or timeout drops the socket (the caller simply does not give it
/// back), so the next request connects afresh and a late reply dies with the old socket.
struct Lazy<S> {
    endpoint: String,
    socket: Option<S>,
    connect_timeout: Option<Duration>,
    refused_is_final: bool,
}

impl<S: Socket> Lazy<S> {
    fn new(endpoint: String) -> Lazy<S> {
        Lazy {
            endpoint,
            socket: None,
            connect_timeout: None,
            refused_is_final: false,
        }
    }

    /// The kept socket, or a new one connected within the connect bound (at most `timeout`).
    async fn take_or_connect(&mut self, timeout: Duration) -> Result<S, TransportError> {
        match self.socket.take() {
            Some(s) => Ok(s),
            None => {
                let limit = self.connect_timeout.unwrap_or(timeout).min(timeout);
                connect_within(
                    S::with_options(socket_options(limit)),
                    &self.endpoint,
                    limit,
                    self.refused_is_final,
                )
                .await
            }
        }
    }
}

/// A request client that survives a dead or restarted server: after any error or timeout the socket is
/// dropped and the next request connects afresh, so a late reply can never answer the wrong request.
///
/// Connecting has its own, usually shorter, bound ([`LazyClient::set_connect_timeout`]): zmq.rs retries a
/// refused connection until its connect timeout, so a dead peer would otherwise cost the whole request
/// timeout. A connect failure is [`TransportError::Connect`]: the request was certainly not sent.
pub struct LazyClient<S> {
    conn: Lazy<S>,
}

/// A REQ client of a CGSE control server (one pickled frame each way).
pub type ReqClient = LazyClient<zeromq::ReqSocket>;

/// A DEALER client for JSON request/reply peers (the Service Registry). The registry's replies carry no
/// request id, so correlation is by construction: the socket is dropped after any error or timeout (a late
/// reply dies with it), and anything already waiting on a kept socket is discarded before the next request.
pub type DealerClient = LazyClient<zeromq::DealerSocket>;

impl<S: Socket> LazyClient<S> {
    /// A client of `endpoint`; nothing connects before the first request.
    pub fn new(endpoint: impl Into<String>) -> LazyClient<S> {
        LazyClient {
            conn: Lazy::new(endpoint.into()),
        }
    }

    /// Fail at once when nothing listens, instead of retrying until the connect bound.
    pub fn set_refused_is_final(&mut self, yes: bool) {
        self.conn.refused_is_final = yes;
    }

    /// The peer's endpoint.
    pub fn endpoint(&self) -> &str {
        &self.conn.endpoint
    }

    /// Bound the connection phase separately (default: the request timeout).
    pub fn set_connect_timeout(&mut self, limit: Duration) {
        self.conn.connect_timeout = Some(limit);
    }

    /// True while a connected socket is kept.
    pub fn is_connected(&self) -> bool {
        self.conn.socket.is_some()
    }

    /// Drop the socket; the next request reconnects.
    pub fn reset(&mut self) {
        self.conn.socket = None;
    }
}

impl ReqClient {
    /// Send one frame and wait for one frame, all within `timeout` (connecting included).
    pub async fn request(&mut self, payload: Vec<u8>, timeout: Duration) -> Result<Bytes, TransportError> {
        let started = std::time::Instant::now();
        let mut socket = self.conn.take_or_connect(timeout).await?;
        let remaining = timeout.saturating_sub(started.elapsed());
        let endpoint = self.conn.endpoint.clone();
        match tokio::time::timeout(remaining, Self::exchange(&mut socket, &endpoint, payload)).await {
            Ok(Ok(reply)) => {
                self.conn.socket = Some(socket);
                Ok(reply)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(TransportError::Timeout { endpoint, timeout }),
        }
    }

    async fn exchange(
        socket: &mut zeromq::ReqSocket,
        endpoint: &str,
        payload: Vec<u8>,
    ) -> Result<Bytes, TransportError> {
        socket
            .send(ZmqMessage::from(payload))
            .await
            .map_err(|e| TransportError::Send {
                endpoint: endpoint.to_owned(),
                reason: e.to_string(),
            })?;
        let reply = socket.recv().await.map_err(|e| TransportError::Zmq {
            endpoint: endpoint.to_owned(),
            reason: e.to_string(),
        })?;
        let mut parts = reply.into_vec();
        if parts.len() != 1 {
            return Err(TransportError::Frames {
                endpoint: endpoint.to_owned(),
                frames: parts.len(),
            });
        }
        Ok(parts.pop().unwrap_or_default())
    }
}

impl DealerClient {
    /// Send `frames` and wait for one multi-frame reply within `timeout`.
    pub async fn request(&mut self, frames: Vec<Bytes>, timeout: Duration) -> Result<Vec<Bytes>, TransportError> {
        let started = std::time::Instant::now();
        let endpoint = self.conn.endpoint.clone();
        let msg = ZmqMessage::try_from(frames).map_err(|_| TransportError::Send {
            endpoint: endpoint.clone(),
            reason: "empty message".into(),
        })?;
        let mut socket = self.conn.take_or_connect(timeout).await?;
        // Stale replies (there should be none: the socket is dropped after a timeout) are discarded.
        while let Some(Ok(_)) = futures_util::FutureExt::now_or_never(socket.recv()) {}
        let remaining = timeout.saturating_sub(started.elapsed());
        let exchange = async {
            socket.send(msg).await.map_err(|e| TransportError::Send {
                endpoint: endpoint.clone(),
                reason: e.to_string(),
            })?;
            let reply = socket.recv().await.map_err(|e| TransportError::Zmq {
                endpoint: endpoint.clone(),
                reason: e.to_string(),
            })?;
            Ok(reply.into_vec())
        };
        match tokio::time::timeout(remaining, exchange).await {
            Ok(Ok(r)) => {
                self.conn.socket = Some(socket);
                Ok(r)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(TransportError::Timeout { endpoint, timeout }),
        }
    }
}

/// A SUB socket subscribed to some topics (the Notify Hub's events). zmq.rs reconnects a SUB socket by
/// itself once the first connection was made; the first connection needs the publisher to be up.
///
/// A SUB socket is silent about a lost publisher (zmq.rs just waits for the reconnection), and whoever
/// relies on the events to keep something up to date must know that it may have missed some:
/// [`Subscriber::recv_or_lost`] also watches the socket's monitor and fails when the publisher disconnects.
pub struct Subscriber {
    endpoint: String,
    socket: zeromq::SubSocket,
    monitor: std::pin::Pin<Box<dyn futures_util::Stream<Item = zeromq::SocketEvent> + Send>>,
}

impl Subscriber {
    /// Connect to `endpoint` within `limit` and subscribe to each topic prefix.
    pub async fn connect(endpoint: &str, topics: &[&str], limit: Duration) -> Result<Subscriber, TransportError> {
        let mut s = zeromq::SubSocket::with_options(socket_options(limit));
        // Before connecting, so that no disconnection can go unseen.
        let monitor = Box::pin(s.monitor());
        let mut socket = connect_within(s, endpoint, limit, false).await?;
        for t in topics {
            socket.subscribe(t).await.map_err(|e| TransportError::Zmq {
                endpoint: endpoint.to_owned(),
                reason: e.to_string(),
            })?;
        }
        Ok(Subscriber {
            endpoint: endpoint.to_owned(),
            socket,
            monitor,
        })
    }

    /// The next message, as frames (a lost publisher is reconnected silently).
    pub async fn recv(&mut self) -> Result<Vec<Bytes>, TransportError> {
        self.socket
            .recv()
            .await
            .map(ZmqMessage::into_vec)
            .map_err(|e| TransportError::Zmq {
                endpoint: self.endpoint.clone(),
                reason: e.to_string(),
            })
    }

    /// The next message, as frames, or [`TransportError::Zmq`] as soon as the publisher disconnects (after
    /// the messages received before that): the caller should drop the subscriber and connect afresh.
    pub async fn recv_or_lost(&mut self) -> Result<Vec<Bytes>, TransportError> {
        use futures_util::StreamExt;
        let Subscriber {
            endpoint,
            socket,
            monitor,
        } = self;
        let lost = |reason: String| TransportError::Zmq {
            endpoint: endpoint.clone(),
            reason,
        };
        loop {
            tokio::select! {
                // Messages first: those received before a disconnection are delivered before it.
                biased;
                m = socket.recv() => return m.map(ZmqMessage::into_vec).map_err(|e| lost(e.to_string())),
                ev = monitor.next() => match ev {
                    Some(zeromq::SocketEvent::Disconnected(_)) => return Err(lost("the publisher disconnected".into())),
                    Some(_) => {}
                    None => return Err(lost("the socket's monitor ended".into())),
                },
            }
        }
    }
}

/// A connected PUSH socket (one-way: the Logger's receiver, the Metrics Hub's collector).
pub struct PushClient {
    endpoint: String,
    socket: zeromq::PushSocket,
}

impl PushClient {
    /// Connect within `limit`; a refused connection fails at once (the caller retries on its own).
    pub async fn connect(endpoint: &str, limit: Duration) -> Result<PushClient, TransportError> {
        let socket = connect_within(
            zeromq::PushSocket::with_options(socket_options(limit)),
            endpoint,
            limit,
            true,
        )
        .await?;
        Ok(PushClient {
            endpoint: endpoint.to_owned(),
            socket,
        })
    }

    /// The peer's endpoint.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Send one single-frame message within `timeout`. After an error or a timeout the socket must be
    /// dropped (zmq.rs may hold a half-sent message): the caller connects afresh.
    pub async fn send(&mut self, payload: Vec<u8>, timeout: Duration) -> Result<(), TransportError> {
        let endpoint = self.endpoint.clone();
        match tokio::time::timeout(timeout, self.socket.send(ZmqMessage::from(payload))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(TransportError::Send {
                endpoint,
                reason: e.to_string(),
            }),
            Err(_) => Err(TransportError::Timeout { endpoint, timeout }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_async_resolver_gives_what_the_blocking_one_gives() {
        for host in ["127.0.0.1", "::1", "localhost"] {
            let blocking = client_endpoint("tcp", host, 6120).unwrap();
            assert_eq!(
                client_endpoint_async("tcp", host, 6120).await.unwrap(),
                blocking,
                "{host}"
            );
        }
        assert_eq!(client_endpoint_async("tcp", "::1", 1).await.unwrap(), "tcp://[::1]:1");
        assert_eq!(
            client_endpoint_async("tcp", "localhost", 1).await.unwrap(),
            "tcp://127.0.0.1:1"
        );
        assert!(matches!(
            client_endpoint_async("ipc", "x", 1).await,
            Err(TransportError::Protocol(_))
        ));
    }

    #[test]
    fn wildcard_binds_every_interface() {
        assert_eq!(bind_addr("*", 5).unwrap(), "0.0.0.0:5".parse().unwrap());
        assert_eq!(bind_addr("127.0.0.1", 5).unwrap(), "127.0.0.1:5".parse().unwrap());
    }

    #[tokio::test]
    async fn port_zero_reports_the_real_port_and_busy_port_names_itself() {
        let (_s, port) = bind_router("tcp", "127.0.0.1", 0, "commanding").await.unwrap();
        assert_ne!(port, 0);
        let err = bind_router("tcp", "127.0.0.1", port, "service")
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains(&format!("tcp://127.0.0.1:{port}")) && err.contains("service"),
            "{err}"
        );
        assert!(matches!(
            bind_pub("ipc", "x", 0, "monitoring").await,
            Err(TransportError::Protocol(_))
        ));
    }

    #[tokio::test]
    async fn req_client_times_out_and_recovers() {
        let (mut router, port) = bind_router("tcp", "127.0.0.1", 0, "commanding").await.unwrap();
        let mut c = ReqClient::new(format!("tcp://127.0.0.1:{port}"));
        // The server does not answer the first request: timeout, socket dropped.
        let first = c.request(b"one".to_vec(), Duration::from_millis(300));
        let (r, _) = tokio::join!(first, async {
            let m = router.recv().await.unwrap();
            assert_eq!(m.into_vec().last().unwrap().as_ref(), b"one");
        });
        assert!(matches!(r, Err(TransportError::Timeout { .. })));
        assert!(!c.is_connected());
        // The next request gets its own reply, never the late one.
        let server = async {
            let m = router.recv().await.unwrap();
            let mut f = m.into_vec();
            assert_eq!(f.last().unwrap().as_ref(), b"two");
            f.pop();
            f.push(Bytes::from_static(b"reply-two"));
            router.send(ZmqMessage::try_from(f).unwrap()).await.unwrap();
        };
        let (r, _) = tokio::join!(c.request(b"two".to_vec(), Duration::from_secs(2)), server);
        assert_eq!(r.unwrap().as_ref(), b"reply-two");
    }

    #[tokio::test]
    async fn dealer_client_drops_late_and_extra_replies() {
        let (mut router, port) = bind_router("tcp", "127.0.0.1", 0, "req").await.unwrap();
        let mut c = DealerClient::new(format!("tcp://127.0.0.1:{port}"));
        let answer = |f: &[Bytes], text: &'static str| {
            ZmqMessage::try_from(vec![f[0].clone(), Bytes::from_static(text.as_bytes())]).unwrap()
        };
        let t = Duration::from_millis(300);
        // Too late: the client gave up and dropped the socket, the reply goes nowhere.
        let (r, first) = tokio::join!(c.request(vec![Bytes::from_static(b"one")], t), async {
            router.recv().await.unwrap().into_vec()
        });
        assert!(matches!(r, Err(TransportError::Timeout { .. })));
        let _ = router.send(answer(&first, "late-one")).await;
        // Answered twice on a kept socket: the extra reply is drained before the next request.
        let (r, _) = tokio::join!(c.request(vec![Bytes::from_static(b"two")], t), async {
            let f = router.recv().await.unwrap().into_vec();
            router.send(answer(&f, "two")).await.unwrap();
            router.send(answer(&f, "two-again")).await.unwrap();
        });
        assert_eq!(r.unwrap(), [Bytes::from_static(b"two")]);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (r, _) = tokio::join!(c.request(vec![Bytes::from_static(b"three")], t), async {
            let f = router.recv().await.unwrap().into_vec();
            assert_eq!(f.last().unwrap().as_ref(), b"three");
            router.send(answer(&f, "three")).await.unwrap();
        });
        assert_eq!(r.unwrap(), [Bytes::from_static(b"three")]);
    }
}
