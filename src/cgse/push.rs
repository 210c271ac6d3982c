//! A one-way channel to a CGSE peer that takes PUSH messages (the Logger's receiver, the Metrics Hub's
//! collector), built so that the peer can cost the daemon nothing.
//!
//! Producers hand messages to [`Pusher::push`], which never blocks: a bounded queue sits between them and
//! one background task that owns the socket. When the queue is full (the peer is absent, stuck, or slower
//! than we produce), the message is dropped and counted. The task finds the peer (the configured port, or
//! the port its registry record announces when the port is 0), connects, and sends; after any send error
//! or timeout it drops the socket and connects afresh, so a restarted peer is found again. What is queued
//! while no peer answers is delivered once one does (the queue bounds how much).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::config::RegistrySettings;
use crate::transport::{self, PushClient};

/// Where the peer listens: a fixed port, or (port 0) the metadata port of its registry record.
#[derive(Debug, Clone, PartialEq)]
pub struct PushTarget {
    /// For logs and status ("Logger", "Metrics Hub").
    pub peer: String,
    /// Its host.
    pub hostname: String,
    /// 0 = from the Service Registry.
    pub port: u16,
    /// Registry service type of the peer (`LOG_CS`, `MH_CS`).
    pub service_type: String,
    /// Key of the port in the record's metadata (`receiver_port`, `collector_port`).
    pub metadata_key: String,
    /// The registry to look the peer up in (port 0).
    pub registry: RegistrySettings,
    /// One registry request.
    pub registry_timeout: Duration,
}

/// Why a push peer cannot be found.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// Its host does not resolve (or the protocol is not ours).
    #[error(transparent)]
    Transport(#[from] transport::TransportError),
    /// The registry does not know the peer (or does not answer).
    #[error("{service_type} not found in the Service Registry ({source})")]
    NotRegistered {
        /// What was looked up.
        service_type: String,
        /// The registry's answer.
        source: super::registry::RegistryError,
    },
    /// The registry's record lacks the port we need.
    #[error("its registry record has no metadata.{0}")]
    NoPort(String),
}

impl PushTarget {
    /// The peer's endpoint now (a registry lookup when the port is 0).
    pub async fn resolve(&self) -> Result<String, ResolveError> {
        if self.port != 0 {
            return Ok(transport::client_endpoint_async("tcp", &self.hostname, self.port).await?);
        }
        let record = super::registry::discover(&self.registry, &self.service_type, self.registry_timeout)
            .await
            .map_err(|source| ResolveError::NotRegistered {
                service_type: self.service_type.clone(),
                source,
            })?;
        let port = record
            .metadata_port(&self.metadata_key)
            .ok_or_else(|| ResolveError::NoPort(self.metadata_key.clone()))?;
        Ok(record.endpoint(port).await?)
    }
}

/// How the sender behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct PushConfig {
    /// Where the peer listens.
    pub target: PushTarget,
    /// Messages queued at most; more are dropped (and counted).
    pub queue: usize,
    /// Connecting to the peer.
    pub connect_timeout: Duration,
    /// Handing one message to the socket; a peer that does not read makes this expire.
    pub send_timeout: Duration,
    /// Wait between attempts to find or connect to the peer.
    pub retry: Duration,
}

/// Counters, shared by the producers, the task and the status report.
#[derive(Debug, Default)]
pub struct PushStats {
    /// Messages handed to the socket.
    pub sent: AtomicU64,
    /// Dropped because the queue was full, the send failed, or the daemon stopped with messages queued.
    pub dropped: AtomicU64,
    connected: AtomicBool,
    endpoint: Mutex<String>,
    last_error: Mutex<String>,
}

impl PushStats {
    /// Messages handed to the socket so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Messages dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn set(&self, connected: bool, endpoint: Option<&str>, error: Option<String>) {
        self.connected.store(connected, Ordering::Relaxed);
        if let (Some(ep), Ok(mut e)) = (endpoint, self.endpoint.lock()) {
            ep.clone_into(&mut e);
        }
        if let (Some(err), Ok(mut e)) = (error, self.last_error.lock()) {
            *e = err;
        }
    }
}

/// The producer side: cheap to clone, never blocks.
#[derive(Clone)]
pub struct Pusher {
    peer: String,
    tx: mpsc::Sender<Vec<u8>>,
    stats: Arc<PushStats>,
}

impl Pusher {
    /// Start the background sender (needs a Tokio runtime); it stops when `cancel` fires.
    pub fn start(config: PushConfig, cancel: CancellationToken) -> Pusher {
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let stats = Arc::new(PushStats::default());
        let peer = config.target.peer.clone();
        tokio::spawn(run(config, rx, stats.clone(), cancel));
        Pusher { peer, tx, stats }
    }

    /// Queue one message; false (and counted as dropped) when the queue is full or the sender stopped.
    pub fn push(&self, message: Vec<u8>) -> bool {
        match self.tx.try_send(message) {
            Ok(()) => true,
            Err(_) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Wait until the queue is empty or `limit` passes (at shutdown, so the last lines leave too). Without a
    /// connection nothing can leave: it returns at once rather than hold the exit for the whole `limit`.
    pub async fn flush(&self, limit: Duration) {
        let end = tokio::time::Instant::now() + limit;
        while self.tx.capacity() < self.tx.max_capacity()
            && self.stats.connected.load(Ordering::Relaxed)
            && tokio::time::Instant::now() < end
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// The counters, shared with the background sender.
    pub fn stats(&self) -> &Arc<PushStats> {
        &self.stats
    }

    /// Where it stands, for `pm_cs status`: connected or not, sent and dropped so far.
    pub fn describe(&self) -> String {
        let s = &self.stats;
        let endpoint = s.endpoint.lock().map(|e| e.clone()).unwrap_or_default();
        let error = s.last_error.lock().map(|e| e.clone()).unwrap_or_default();
        let counts = format!("{} sent, {} dropped", s.sent(), s.dropped());
        if s.connected.load(Ordering::Relaxed) {
            format!("{}: connected to {endpoint} ({counts})", self.peer)
        } else if error.is_empty() {
            format!("{}: connecting ({counts})", self.peer)
        } else {
            format!("{}: not connected ({error}); retrying ({counts})", self.peer)
        }
    }
}

/// The sender task: find the peer, connect, send until an error, again.
async fn run(config: PushConfig, mut rx: mpsc::Receiver<Vec<u8>>, stats: Arc<PushStats>, cancel: CancellationToken) {
    let peer = &config.target.peer;
    'outer: loop {
        let connected = match config.target.resolve().await {
            Ok(ep) => PushClient::connect(&ep, config.connect_timeout)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let mut client = match connected {
            Ok(c) => c,
            Err(e) => {
                debug!(peer = %peer, error = %e, "peer not reachable; messages stay queued (bounded)");
                stats.set(false, None, Some(e));
                tokio::select! {
                    _ = cancel.cancelled() => break 'outer,
                    _ = tokio::time::sleep(config.retry) => continue 'outer,
                }
            }
        };
        stats.set(true, Some(client.endpoint()), None);
        loop {
            let message = tokio::select! {
                _ = cancel.cancelled() => break 'outer,
                m = rx.recv() => match m {
                    Some(m) => m,
                    None => break 'outer,
                },
            };
            match client.send(message, config.send_timeout).await {
                Ok(()) => {
                    stats.sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    // The message may be half-sent: count it as lost and start over with a new socket.
                    stats.dropped.fetch_add(1, Ordering::Relaxed);
                    stats.set(false, None, Some(e.to_string()));
                    continue 'outer;
                }
            }
        }
    }
    // Whatever is still queued will never be sent.
    rx.close();
    let mut left = 0u64;
    while rx.try_recv().is_ok() {
        left += 1;
    }
    stats.dropped.fetch_add(left, Ordering::Relaxed);
    stats.set(false, None, None);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgse::testing::{push_config, PullPeer, ReservedPort};

    fn config(port: u16, queue: usize) -> PushConfig {
        push_config("Test", "TEST", "receiver_port", port, queue, Duration::from_millis(300))
    }

    #[tokio::test]
    async fn absent_peer_bounds_the_queue_and_counts_drops() {
        // A port nobody listens on: the connection is refused.
        let reserved = ReservedPort::new();
        let port = reserved.port();
        let cancel = CancellationToken::new();
        let p = Pusher::start(config(port, 4), cancel.clone());
        let accepted = (0..10).filter(|i| p.push(vec![*i as u8])).count();
        assert_eq!(accepted, 4);
        assert_eq!(p.stats().dropped(), 6);
        assert_eq!(p.stats().sent(), 0);
        cancel.cancel();
        let stats = p.stats().clone();
        crate::cgse::testing::wait_until(Duration::from_secs(5), || stats.dropped() == 10).await;
        assert_eq!(stats.dropped(), 10, "the 4 queued ones count as dropped at shutdown");
    }

    #[tokio::test]
    async fn flush_does_not_wait_for_a_peer_that_is_not_there() {
        let reserved = ReservedPort::new();
        let port = reserved.port();
        let cancel = CancellationToken::new();
        let p = Pusher::start(config(port, 4), cancel.clone());
        assert!(p.push(vec![1]));
        let stats = p.stats().clone();
        crate::cgse::testing::wait_until(Duration::from_secs(10), || {
            !stats.connected.load(Ordering::Relaxed) && !stats.last_error.lock().unwrap().is_empty()
        })
        .await;
        // An hour's limit: a flush that waited for the queue to empty would hang here.
        crate::cgse::testing::within(Duration::from_secs(10), "flush", p.flush(Duration::from_secs(3600))).await;
        cancel.cancel();
    }

    #[tokio::test]
    async fn queued_messages_reach_a_peer_that_appears_later() {
        let reserved = ReservedPort::new();
        let port = reserved.port();
        let cancel = CancellationToken::new();
        let p = Pusher::start(config(port, 16), cancel.clone());
        for i in 0..3u8 {
            assert!(p.push(vec![b'm', i]));
        }
        let mut peer = PullPeer::bind(port).await;
        for i in 0..3u8 {
            assert_eq!(peer.recv(Duration::from_secs(10)).await, vec![b'm', i]);
        }
        assert_eq!(p.stats().dropped(), 0);
        assert!(
            p.describe().contains("connected to tcp://127.0.0.1:"),
            "{}",
            p.describe()
        );
        cancel.cancel();
    }

    #[tokio::test]
    async fn a_peer_that_never_reads_costs_drops_not_blocking() {
        // A TCP listener that accepts and never reads nor answers the ZMTP greeting.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hold = tokio::spawn(async move {
            let mut keep = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                keep.push(s);
            }
        });
        let cancel = CancellationToken::new();
        let p = Pusher::start(config(port, 8), cancel.clone());
        let big = vec![0u8; 64 * 1024];
        let mut refused = 0;
        for _ in 0..200 {
            if !p.push(big.clone()) {
                refused += 1;
            }
        }
        assert!(refused >= 192, "at most the queue bound is accepted: {refused}");
        assert_eq!(p.stats().sent(), 0);
        assert!(p.stats().dropped() >= 192);
        cancel.cancel();
        hold.abort();
    }
}
