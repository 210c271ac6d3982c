//! Process-wide limits (procman patch, see `PATCHES.md` at the crate root).
//!
//! Upstream zmq.rs reserves memory for the frame length a peer announces, so a peer announcing a
//! 1 TiB frame aborts the process on allocation failure; and a PUB socket queues up to 100,000
//! messages for a subscriber that stops reading. These bounds make both configurable.

use std::sync::atomic::{AtomicUsize, Ordering};

static MAX_MESSAGE_SIZE: AtomicUsize = AtomicUsize::new(256 * 1024 * 1024);
static PUB_SUBSCRIBER_QUEUE: AtomicUsize = AtomicUsize::new(100_000);

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
