//! Our own pickle codec: decode what CPython's `pickle.dumps` writes (protocols 2–5), encode protocol 4.
//!
//! Decoding is a pure stack machine over the bytes: class and function references become
//! [`Value::Global`], instances become [`Object`]. Nothing is imported or executed. Every resource the
//! input controls is bounded by [`Limits`]; exceeding one is a [`CodecError`], never a panic.

mod decode;
mod describe;
mod encode;
mod value;

pub use decode::decode;
pub use describe::{bytes_repr, describe, float_repr, str_repr};
pub use encode::{encode, DictWriter, PickleWriter};
pub use value::{dict_get, Object, ObjectKind, Value};

/// Bounds on what one decoded pickle may cost. All are checked while decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted pickle, in bytes.
    pub max_frame_bytes: usize,
    /// Deepest nesting of containers and objects in the result.
    pub max_depth: usize,
    /// Most memo entries (MEMOIZE / BINPUT) one pickle may create.
    pub max_memo: usize,
    /// Most items in one list, tuple, dict or set.
    pub max_container_len: usize,
    /// Most values in the result tree, counting every copy a memo reference expands to.
    /// Strings, bytes, big ints and global names count one extra value per 64 payload bytes.
    pub max_nodes: usize,
    /// Most values in the result tree per input byte (never less than [`MIN_NODE_BUDGET`]), so that a
    /// small pickle cannot expand into a large tree through memo references: without it, 563 bytes of
    /// `DUP`s and tuples cost 60 MB and 100 ms to decode (found by `fuzz/`). CPython's pickles of CGSE
    /// values hold fewer than one value per byte. 0 disables this bound (`max_nodes` still applies).
    pub max_nodes_per_byte: usize,
}

/// The node budget of any pickle, however small (see [`Limits::max_nodes_per_byte`]).
pub const MIN_NODE_BUDGET: usize = 16_384;

impl Limits {
    /// The most values a pickle of `len` bytes may expand to: `max_nodes`, and at most
    /// `max_nodes_per_byte` per input byte (but never less than [`MIN_NODE_BUDGET`]).
    pub fn node_budget(&self, len: usize) -> usize {
        if self.max_nodes_per_byte == 0 {
            return self.max_nodes;
        }
        self.max_nodes
            .min(self.max_nodes_per_byte.saturating_mul(len).max(MIN_NODE_BUDGET))
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: 64 * 1024 * 1024,
            max_depth: 500,
            max_memo: 1_000_000,
            max_container_len: 1_000_000,
            max_nodes: 2_000_000,
            max_nodes_per_byte: 16,
        }
    }
}

/// Why a pickle could not be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The frame has no bytes.
    #[error("empty frame")]
    Empty,
    /// The frame ends before STOP or inside an opcode's argument; the payload is the frame's length.
    #[error("pickle ends unexpectedly at byte {0}")]
    Truncated(usize),
    /// A byte that is no pickle opcode.
    #[error("unknown pickle opcode 0x{opcode:02x} at byte {pos}")]
    UnknownOpcode {
        /// The byte.
        opcode: u8,
        /// Its offset.
        pos: usize,
    },
    /// A pickle opcode the codec does not implement.
    #[error("pickle opcode {name} (0x{opcode:02x}) at byte {pos} is not supported")]
    Unsupported {
        /// The opcode's name.
        name: &'static str,
        /// The opcode.
        opcode: u8,
        /// Its offset.
        pos: usize,
    },
    /// PROTO names a protocol version the codec does not accept.
    #[error("unsupported pickle protocol {0}")]
    Protocol(u8),
    /// The opcodes do not make a valid pickle (bad argument, wrong stack contents, unknown memo key, …).
    #[error("malformed pickle at byte {pos}: {reason}")]
    Malformed {
        /// The offset of the offending opcode.
        pos: usize,
        /// What is wrong.
        reason: String,
    },
    /// The frame is longer than `Limits::max_frame_bytes`.
    #[error("pickle of {size} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge {
        /// The frame's length in bytes.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Containers nest deeper than `Limits::max_depth` (the payload).
    #[error("pickle nesting exceeds the depth limit of {0}")]
    TooDeep(usize),
    /// The memo would hold more than `Limits::max_memo` entries (the payload).
    #[error("pickle memo exceeds the limit of {0} entries")]
    MemoTooLarge(usize),
    /// A container would hold more than `Limits::max_container_len` items (the payload).
    #[error("pickle container exceeds the length limit of {0} items")]
    ContainerTooLarge(usize),
    /// The pickle expands to more values than the frame's budget (the payload), from `Limits::max_nodes`
    /// and `Limits::max_nodes_per_byte`.
    #[error("pickle expands to more than {0} values")]
    TooManyNodes(usize),
    /// A value contains itself (through the memo).
    #[error("pickle contains a recursive structure, which is not supported")]
    Recursive,
    /// Bytes follow the STOP opcode; the payload is the offset of the first.
    #[error("trailing data after STOP at byte {0}")]
    TrailingData(usize),
}
