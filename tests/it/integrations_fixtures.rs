//! Our core-service requests and reply parsing against the frames captured from the real cgse-core 0.25.11
//! services (`integration/` fixtures): the minimal requests sm_cs and cm_cs accepted, their replies, and the
//! pickled `Setup` with the original's `find_devices` / `find_device_ids` output.
//!
//! Fixtures: `tests/fixtures` (copied from the reference captures; see `tests/fixtures/README.md`).

use crate::support;

use procman::cgse::confman::{get_setup_request, parse_get_setup_reply};
use procman::cgse::storage::{HkRecord, HkValue};
use procman::cgse::storage_manager::{register_request, save_request, success_message, unregister_request};
use procman::codec::{decode, Limits, Value};
use procman::setup::{device_ids_reply, devices_reply};

use support::fixtures_root;

fn load(rel: &str) -> Value {
    let path = fixtures_root().join("integration").join(rel);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    decode(&bytes, &Limits::default()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn our_requests_are_the_ones_the_real_services_accepted() {
    assert_eq!(get_setup_request(), load("confman/handmade_get_setup_request.pickle"));
    assert_eq!(
        register_request("PM", &["timestamp".to_owned(), "random".to_owned()]),
        load("storage/handmade_register_request.pickle")
    );
    assert_eq!(
        unregister_request("PM"),
        load("storage/handmade_unregister_request.pickle")
    );
    let when = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_795_691_527_380);
    let record = HkRecord {
        when,
        fields: vec![
            ("timestamp".into(), HkValue::Str(procman::util::format_datetime(when))),
            ("random".into(), HkValue::Int(100)),
        ],
    };
    assert_eq!(
        save_request("PM", &record),
        load("storage/handmade_save_request.pickle")
    );
}

#[test]
fn storage_manager_replies() {
    assert_eq!(
        success_message(&load("storage/register_reply.pickle")).unwrap(),
        "Storage successfully registered PM"
    );
    assert!(success_message(&load("storage/save_reply.pickle")).is_ok());
    let refused = success_message(&load("storage/save_unknown_origin_failure_reply.pickle")).unwrap_err();
    assert!(refused.says("could not find a registration"), "{refused}");
    assert!(success_message(&load("storage/unregister_again_failure_reply.pickle")).is_err());
}

/// JSON (lists for tuples) of a device reply, for comparison with `find_devices_output.json`.
fn json(v: &Value) -> serde_json::Value {
    match v {
        Value::None => serde_json::Value::Null,
        Value::Int(i) => (*i).into(),
        Value::Str(s) => s.clone().into(),
        Value::List(items) | Value::Tuple(items) => items.iter().map(json).collect(),
        Value::Dict(items) => serde_json::Value::Object(
            items
                .iter()
                .map(|(k, v)| (k.as_str().unwrap().to_owned(), json(v)))
                .collect(),
        ),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn the_pickled_setup_walks_like_the_original() {
    let fetched = parse_get_setup_reply(&load("confman/get_setup_reply.pickle"))
        .unwrap()
        .expect("a Setup");
    assert_eq!(fetched.setup_id.as_deref(), Some("00001"));
    let path = fixtures_root().join("integration/confman/find_devices_output.json");
    let expected: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let devices = devices_reply(&fetched.node.devices());
    let ids = device_ids_reply(&fetched.node.device_nodes());
    // serde_json keeps insertion order (preserve_order): YAML order is compared too.
    assert_eq!(json(&devices), expected["find_devices"]);
    assert_eq!(json(&ids), expected["find_device_ids"]);
    let keys: Vec<_> = expected["find_devices"].as_object().unwrap().keys().cloned().collect();
    let Value::Dict(items) = devices else { panic!() };
    let ours: Vec<_> = items.iter().map(|(k, _)| k.as_str().unwrap().to_owned()).collect();
    assert_eq!(ours, keys);
}
