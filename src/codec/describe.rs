//! Python-repr-like rendering of a value tree.
use super::Value;

/// Render a value the way the fixtures' `.dis.txt` files show decoded structures.
pub fn describe(_value: &Value) -> String {
    String::new()
}
