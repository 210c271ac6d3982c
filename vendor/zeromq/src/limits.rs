//! Process-wide limits (procman patch, see `PATCHES.md` at the crate root).
//!
//! Upstream zmq.rs reserves memory for the frame length a peer announces, so a peer announcing a
//! 1 TiB frame aborts the process on allocation failure; and a PUB socket queues up to 100,000
//! messages for a subscriber that stops reading; and a peer that connects and never completes the
//! ZMTP handshake holds its connection forever. These bounds make all three configurable.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

static MAX_MESSAGE_SIZE: AtomicUsize = AtomicUsize::new(256 * 1024 * 1024);
static PUB_SUBSCRIBER_QUEUE: AtomicUsize = AtomicUsize::new(100_000);
/// Milliseconds; 0 = no limit. 30 s is libzmq's default `ZMQ_HANDSHAKE_IVL`.
static HANDSHAKE_TIMEOUT_MS: AtomicU64 = AtomicU64::new(30_000);

/// Largest message (sum of its frames) accepted from a peer; larger ones disconnect the peer.
pub fn max_message_size() -> usize {
    MAX_MESSAGE_SIZE.load(Ordering::Relaxed)
}

/// Set the largest accepted message size in bytes.
pub fn set_max_message_size(bytes: usize) {
    MAX_MESSAGE_SIZE.store(bytes.max(1), Ordering::Relaxed);
}

/// Messages a PUB socket queues for one subscriber before it drops new ones for that subscriber.
pub fn pub_subscriber_queue() -> usize {
    PUB_SUBSCRIBER_QUEUE.load(Ordering::Relaxed)
}

/// Set the per-subscriber PUB queue bound (applies to subscribers that connect afterwards).
pub fn set_pub_subscriber_queue(messages: usize) {
    PUB_SUBSCRIBER_QUEUE.store(messages.max(1), Ordering::Relaxed);
}

static PEER_SEND_QUEUE: AtomicUsize = AtomicUsize::new(100_000);
/// 0 = no limit.
static MAX_CONNECTIONS: AtomicUsize = AtomicUsize::new(0);

/// Messages queued for one peer of a ROUTER (or DEALER, …) socket. A ROUTER drops a peer whose queue is
/// full instead of waiting for it (procman patch 5); other sockets wait, as upstream.
pub fn peer_send_queue() -> usize {
    PEER_SEND_QUEUE.load(Ordering::Relaxed)
}

/// Set the per-peer send queue bound (applies to peers that connect afterwards).
pub fn set_peer_send_queue(messages: usize) {
    PEER_SEND_QUEUE.store(messages.max(1), Ordering::Relaxed);
}

/// Most connections one bound socket keeps (connected peers plus handshakes in progress); None = no
/// limit. A connection accepted beyond it is closed at once (procman patch 6).
pub fn max_connections() -> Option<usize> {
    match MAX_CONNECTIONS.load(Ordering::Relaxed) {
        0 => None,
        n => Some(n),
    }
}

/// Set the per-socket connection cap (0 = none).
pub fn set_max_connections(n: usize) {
    MAX_CONNECTIONS.store(n, Ordering::Relaxed);
}

/// Bytes of large frames being received at once, process-wide (procman patch 8).
static RECEIVING: AtomicUsize = AtomicUsize::new(0);
/// 0 = no limit.
static MAX_RECEIVING_BYTES: AtomicUsize = AtomicUsize::new(0);
/// Frames up to this size never count against the budget: requests of every day pass whatever happens.
pub const SMALL_FRAME: usize = 64 * 1024;

/// Set the process-wide budget for frames above [`SMALL_FRAME`] being received at once (0 = none).
pub fn set_max_receiving_bytes(bytes: usize) {
    MAX_RECEIVING_BYTES.store(bytes, Ordering::Relaxed);
}

/// Bytes of large frames being received right now.
pub fn receiving_bytes() -> usize {
    RECEIVING.load(Ordering::Relaxed)
}

/// Reserve `len` bytes of the budget for a frame about to be received; false when it would exceed it.
pub(crate) fn reserve_receiving(len: usize) -> bool {
    let max = MAX_RECEIVING_BYTES.load(Ordering::Relaxed);
    RECEIVING
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
            let next = now.checked_add(len)?;
            (max == 0 || next <= max).then_some(next)
        })
        .is_ok()
}

/// Give back what [`reserve_receiving`] took.
pub(crate) fn release_receiving(len: usize) {
    let _ = RECEIVING.fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| Some(now.saturating_sub(len)));
}

/// Time a new connection has to complete the ZMTP greeting and READY exchange; None = no limit.
pub fn handshake_timeout() -> Option<Duration> {
    match HANDSHAKE_TIMEOUT_MS.load(Ordering::Relaxed) {
        0 => None,
        ms => Some(Duration::from_millis(ms)),
    }
}

/// Set the handshake limit (`Duration::ZERO` = none; applies to connections made afterwards).
pub fn set_handshake_timeout(limit: Duration) {
    let ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
    // A non-zero limit below 1 ms still means a limit.
    let ms = if ms == 0 && !limit.is_zero() { 1 } else { ms };
    HANDSHAKE_TIMEOUT_MS.store(ms, Ordering::Relaxed);
}

/// Peer writer tasks alive in the process (procman patch 10). A closed socket's writers go on until
/// everything queued for their peers is on the wire, so a process that exits once this is 0 loses no reply;
/// upstream gives no way to know, and callers slept for a guessed while.
static LIVE_WRITERS: AtomicUsize = AtomicUsize::new(0);

/// Woken when the last writer task ends.
static WRITERS_GONE: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// How many peer writer tasks are still running (still flushing queued messages, or waiting for more).
pub fn live_writers() -> usize {
    LIVE_WRITERS.load(Ordering::Acquire)
}

/// Completes when no writer task is running (at once if none is): an exiting process awaits it, bounded,
/// rather than polling [`live_writers`] on a timer (each poll of a 1 ms timer cost 1-2 ms of exit time).
pub async fn writers_drained() {
    loop {
        let gone = WRITERS_GONE.notified();
        tokio::pin!(gone);
        // Registered before the check, so a writer ending between the check and the await still wakes us.
        gone.as_mut().enable();
        if live_writers() == 0 {
            return;
        }
        gone.await;
    }
}

/// Held by a writer task for its lifetime: counts it in [`live_writers`].
pub(crate) struct WriterGuard(());

impl WriterGuard {
    pub(crate) fn new() -> WriterGuard {
        LIVE_WRITERS.fetch_add(1, Ordering::AcqRel);
        WriterGuard(())
    }
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        if LIVE_WRITERS.fetch_sub(1, Ordering::AcqRel) == 1 {
            WRITERS_GONE.notify_waiters();
        }
    }
}
