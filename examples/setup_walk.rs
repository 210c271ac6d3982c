//! Walk Setup YAML files as `get_devices` / `get_device_ids` do and print both replies, one JSON line per
//! file, for the differential test against CGSE's own walk (`tests/python/test_setup_walk.py`).
//!
//! Usage: `setup_walk FILE...`. Values are tagged so that types survive JSON: `{"dict": [[k, v], ...]}`,
//! `{"tuple": [...]}`, `{"list": [...]}`; scalars are plain JSON.

use procman::codec::Value;
use procman::setup::{device_ids_reply, devices_reply, Node};
use serde_json::{json, Value as Json};

fn tagged(v: &Value) -> Json {
    match v {
        Value::None => Json::Null,
        Value::Bool(b) => json!(b),
        Value::Int(i) => json!(i),
        Value::Float(f) => json!(f),
        Value::Str(s) => json!(s),
        Value::List(items) => json!({ "list": items.iter().map(tagged).collect::<Vec<_>>() }),
        Value::Tuple(items) => json!({ "tuple": items.iter().map(tagged).collect::<Vec<_>>() }),
        Value::Dict(items) => json!({
            "dict": items.iter().map(|(k, v)| json!([tagged(k), tagged(v)])).collect::<Vec<_>>()
        }),
        other => json!({ "other": procman::protocol::py_repr(other) }),
    }
}

fn main() {
    for path in std::env::args().skip(1) {
        let line = match Node::from_file(std::path::Path::new(&path)) {
            Ok(n) => json!({
                "devices": tagged(&devices_reply(&n.devices())),
                "device_ids": tagged(&device_ids_reply(&n.device_nodes())),
            }),
            Err(e) => json!({ "error": e.to_string() }),
        };
        println!("{line}");
    }
}
