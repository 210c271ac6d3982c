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
