//! The Python objects that wire values stand for: the allow-list the Python bindings use.
//!
//! A reply can name any class (`Value::Global`, `Value::Object`). The bindings never import what a
//! reply names: [`classify`] maps the few classes we know onto a [`Known`] shape, each of which the
//! bindings build from their own classes (`egse.procman.Failure`, `uuid.UUID`, a builtin exception …);
//! everything else stays data. The other direction — our Python objects as arguments — is built here
//! too ([`process_command`], [`response`], [`exception`], [`uuid`]), so the wire shapes are testable
//! without Python.

use crate::codec::{Object, ObjectKind, Value};

/// The module our Python package lives in, and the module the process commands travel under.
pub const PROCMAN_MODULE: &str = "egse.procman";

/// Builtin exception classes that a reply may carry (the `cause` of a `Failure`, or a `NACK`).
/// Only these become real Python exceptions; any other class stays a generic object.
pub const BUILTIN_EXCEPTIONS: [&str; 24] = [
    "Exception",
    "ArithmeticError",
    "AssertionError",
    "AttributeError",
    "BrokenPipeError",
    "ConnectionError",
    "ConnectionRefusedError",
    "ConnectionResetError",
    "EOFError",
    "FileExistsError",
    "FileNotFoundError",
    "IndexError",
    "KeyError",
    "LookupError",
    "NotImplementedError",
    "OSError",
    "OverflowError",
    "PermissionError",
    "RuntimeError",
    "StopIteration",
    "TimeoutError",
    "TypeError",
    "ValueError",
    "ZeroDivisionError",
];

/// The `egse.response` classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseClass {
    /// An `Exception` subclass, pickled by REDUCE with its constructor arguments.
    Failure,
    /// A plain instance (NEWOBJ + BUILD) with `message` and `return_code`.
    Success,
    /// A plain instance with `message` only.
    Message,
}

impl ResponseClass {
    /// The class name in `egse.response`.
    pub fn name(self) -> &'static str {
        match self {
            ResponseClass::Failure => "Failure",
            ResponseClass::Success => "Success",
            ResponseClass::Message => "Message",
        }
    }

    fn from_name(name: &str) -> Option<ResponseClass> {
        match name {
            "Failure" => Some(ResponseClass::Failure),
            "Success" => Some(ResponseClass::Success),
            "Message" => Some(ResponseClass::Message),
            _ => None,
        }
    }
}

/// The process commands of `egse.procman`, with their state keys in wire order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessCommandClass {
    /// `ProcessCommand`, the base class.
    Process,
    /// `StartCommand`.
    Start,
    /// `StopCommand`.
    Stop,
    /// `StatusCommand`.
    Status,
}

impl ProcessCommandClass {
    /// Every class, base first.
    pub const ALL: [ProcessCommandClass; 4] = [
        ProcessCommandClass::Process,
        ProcessCommandClass::Start,
        ProcessCommandClass::Stop,
        ProcessCommandClass::Status,
    ];

    /// The class name in `egse.procman`.
    pub fn name(self) -> &'static str {
        match self {
            ProcessCommandClass::Process => "ProcessCommand",
            ProcessCommandClass::Start => "StartCommand",
            ProcessCommandClass::Stop => "StopCommand",
            ProcessCommandClass::Status => "StatusCommand",
        }
    }

    /// The instance attributes, in the order the original constructors assign them.
    pub fn state_keys(self) -> &'static [&'static str] {
        match self {
            ProcessCommandClass::Start => &["_device_id", "_cgse_cmd", "_device_args", "_is_simulator_mode"],
            _ => &["_device_id", "_cgse_cmd", "_device_args"],
        }
    }

    /// The class named `name` in `egse.procman`, if it is one of these.
    pub fn from_name(name: &str) -> Option<ProcessCommandClass> {
        ProcessCommandClass::ALL.into_iter().find(|c| c.name() == name)
    }
}

/// The state keys of a command object (`ClientServerCommand`), in the original's order.
pub const COMMAND_STATE_KEYS: [&str; 12] = [
    "_name",
    "_cmd",
    "_response",
    "_wait",
    "_check",
    "_description",
    "_device_method",
    "_tot_n_args",
    "_n_args",
    "_n_kwargs",
    "_keys",
    "__doc__",
];

/// The command class of the commanding table, which our package defines.
pub const PROCESS_MANAGER_COMMAND: &str = "ProcessManagerCommand";

/// What a decoded instance stands for.
#[derive(Debug, Clone, PartialEq)]
pub enum Known<'a> {
    /// `egse.response.Failure / Success / Message`: constructor arguments and the instance dict.
    Response {
        /// Which response class.
        class: ResponseClass,
        /// The constructor arguments.
        args: &'a [Value],
        /// The instance dict.
        state: &'a [(Value, Value)],
    },
    /// `uuid.UUID`: the 128-bit integer (an `Int` or `BigInt` value) and `is_safe` if present.
    Uuid {
        /// The 128-bit integer.
        int: &'a Value,
        /// `is_safe`, if present.
        is_safe: Option<i64>,
    },
    /// A builtin exception from [`BUILTIN_EXCEPTIONS`].
    Exception {
        /// The exception's class name.
        name: &'static str,
        /// The constructor arguments.
        args: &'a [Value],
        /// The instance dict.
        state: &'a [(Value, Value)],
    },
    /// `egse.procman.StartCommand` and friends.
    ProcessCommand {
        /// Which process command class.
        class: ProcessCommandClass,
        /// The instance dict.
        state: &'a [(Value, Value)],
    },
    /// `egse.procman.ProcessManagerCommand`, as announced by `send_commands`.
    Command {
        /// The instance dict.
        state: &'a [(Value, Value)],
    },
    /// Anything else: kept as data.
    Generic,
}

/// Decide what a decoded instance becomes on the Python side. Only exact class paths from the
/// allow-list count; the class is never looked up anywhere.
pub fn classify(o: &Object) -> Known<'_> {
    let Some((module, qualname)) = o.class_path() else {
        return Known::Generic;
    };
    let state = o.state_dict().unwrap_or(&[]);
    match (module, o.kind) {
        ("egse.response", _) => match ResponseClass::from_name(qualname) {
            Some(class) => Known::Response {
                class,
                args: &o.args,
                state,
            },
            None => Known::Generic,
        },
        ("uuid", ObjectKind::NewObj) if qualname == "UUID" => match o.attr("int") {
            Some(int @ (Value::Int(_) | Value::BigInt(_))) => Known::Uuid {
                int,
                is_safe: o.attr("is_safe").and_then(Value::as_i64),
            },
            _ => Known::Generic,
        },
        ("builtins", ObjectKind::Reduce) => match BUILTIN_EXCEPTIONS.iter().find(|n| **n == qualname) {
            Some(name) => Known::Exception {
                name,
                args: &o.args,
                state,
            },
            None => Known::Generic,
        },
        (PROCMAN_MODULE, ObjectKind::NewObj) => {
            if let Some(class) = ProcessCommandClass::from_name(qualname) {
                Known::ProcessCommand { class, state }
            } else if qualname == PROCESS_MANAGER_COMMAND {
                Known::Command { state }
            } else {
                Known::Generic
            }
        }
        _ => Known::Generic,
    }
}

/// True for names that may be set as attributes on an object we build from a reply: plain
/// identifiers, no dunders (a state dict must not be able to set `__class__` or `__dict__`) except a
/// command object's own help text, `__doc__`.
pub fn is_settable_attribute(name: &str) -> bool {
    if name == "__doc__" {
        return true;
    }
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c == '_' || c.is_alphabetic());
    first_ok && chars.all(|c| c == '_' || c.is_alphanumeric()) && !(name.starts_with("__") && name.ends_with("__"))
}

/// `egse.procman.<class>` with the given state values, in the wire order of [`ProcessCommandClass::state_keys`].
/// `values` holds the attribute values in that order (missing ones are left out, as Python would).
pub fn process_command(class: ProcessCommandClass, values: Vec<Option<Value>>) -> Value {
    let state = class
        .state_keys()
        .iter()
        .zip(values)
        .filter_map(|(k, v)| v.map(|v| (*k, v)));
    Value::new_object(PROCMAN_MODULE, class.name(), Value::dict(state))
}

/// `egse.procman.ProcessManagerCommand` from its attributes (those present, in the original order).
pub fn command_object(values: Vec<Option<Value>>) -> Value {
    let state = COMMAND_STATE_KEYS
        .iter()
        .zip(values)
        .filter_map(|(k, v)| v.map(|v| (*k, v)));
    Value::new_object(PROCMAN_MODULE, PROCESS_MANAGER_COMMAND, Value::dict(state))
}

/// An `egse.response` object as the original pickles it: `Failure` by REDUCE with its constructor
/// arguments and `{message, cause}`; `Success` and `Message` by NEWOBJ with their instance dict.
pub fn response(class: ResponseClass, args: Vec<Value>, message: Value, extra: Option<Value>) -> Value {
    match class {
        ResponseClass::Failure => Value::reduce(
            "egse.response",
            "Failure",
            args,
            Some(Value::dict([
                ("message", message),
                ("cause", extra.unwrap_or(Value::None)),
            ])),
        ),
        ResponseClass::Success => Value::new_object(
            "egse.response",
            "Success",
            Value::dict([("message", message), ("return_code", extra.unwrap_or(Value::None))]),
        ),
        ResponseClass::Message => Value::new_object("egse.response", "Message", Value::dict([("message", message)])),
    }
}

/// A builtin exception as Python pickles one with an empty `__dict__`: REDUCE, no BUILD.
pub fn exception(name: &str, args: Vec<Value>) -> Value {
    Value::reduce("builtins", name, args, None)
}

/// `uuid.UUID` from its integer value (an `Int`/`BigInt`) and optional `is_safe`.
pub fn uuid(int: Value, is_safe: Option<i64>) -> Value {
    let mut state = vec![(Value::str("int"), int)];
    if let Some(s) = is_safe {
        state.push((Value::str("is_safe"), Value::Int(s)));
    }
    Value::new_object("uuid", "UUID", Value::Dict(state))
}

/// An integer from little-endian two's-complement bytes (as Python's `int.to_bytes(..., "little",
/// signed=True)` writes them): an `Int` when it fits an i64, else a minimal `BigInt`.
pub fn int_from_le_bytes(bytes: &[u8]) -> Value {
    let mut b = bytes.to_vec();
    if b.is_empty() {
        return Value::Int(0);
    }
    // Drop redundant sign-extension bytes.
    while b.len() > 1 {
        let top = b[b.len() - 1];
        let next_sign = b[b.len() - 2] & 0x80;
        if (top == 0x00 && next_sign == 0) || (top == 0xff && next_sign != 0) {
            b.pop();
        } else {
            break;
        }
    }
    if b.len() <= 8 {
        let fill = if b[b.len() - 1] & 0x80 != 0 { 0xff } else { 0x00 };
        let mut buf = [fill; 8];
        buf[..b.len()].copy_from_slice(&b);
        return Value::Int(i64::from_le_bytes(buf));
    }
    Value::BigInt(b)
}

/// The Python class path of a value, for messages: `egse.procman.StartCommand`, or the type name.
pub fn class_path(v: &Value) -> String {
    match v {
        Value::Object(o) => match o.class_path() {
            Some((m, q)) => format!("{m}.{q}"),
            None => "object".into(),
        },
        other => other.type_name().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol;

    #[test]
    fn failures_from_the_server_are_recognised() {
        let f = protocol::failure_with_cause("Executing x failed", protocol::PyExc::TypeError, "bad");
        let Known::Response { class, args, state } = classify(f.as_object().unwrap()) else {
            panic!("not a response")
        };
        assert_eq!(class, ResponseClass::Failure);
        assert_eq!(args.len(), 2);
        let cause = crate::codec::dict_get(state, "cause").unwrap();
        assert!(matches!(
            classify(cause.as_object().unwrap()),
            Known::Exception { name: "TypeError", .. }
        ));
    }

    #[test]
    fn uuid_and_commands_are_recognised() {
        let u = crate::monitor::uuid_value(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        assert!(matches!(
            classify(u.as_object().unwrap()),
            Known::Uuid { is_safe: None, .. }
        ));
        let s = process_command(
            ProcessCommandClass::Status,
            vec![
                Some(Value::str("SM")),
                Some(Value::str("sm_cs")),
                Some(Value::List(vec![])),
            ],
        );
        let o = s.as_object().unwrap();
        assert!(o.is("egse.procman", "StatusCommand"));
        let keys: Vec<_> = o
            .state_dict()
            .unwrap()
            .iter()
            .map(|(k, _)| k.as_str().unwrap())
            .collect();
        assert_eq!(keys, ["_device_id", "_cgse_cmd", "_device_args"]);
        assert!(matches!(
            classify(o),
            Known::ProcessCommand {
                class: ProcessCommandClass::Status,
                ..
            }
        ));
        let (table, _) = protocol::load_tables().unwrap();
        let cmd = table.get("start_process").unwrap().object.as_object().unwrap().clone();
        assert!(matches!(classify(&cmd), Known::Command { .. }));
    }

    #[test]
    fn unknown_classes_stay_generic() {
        for (m, q, kind) in [
            ("os", "system", ObjectKind::Reduce),
            ("builtins", "eval", ObjectKind::Reduce),
            ("builtins", "TypeError", ObjectKind::NewObj),
            ("egse.procman", "ProcessManagerProxy", ObjectKind::NewObj),
            ("egse.services", "ServiceCommand", ObjectKind::NewObj),
            ("uuid", "UUID", ObjectKind::Reduce),
            ("egse.response", "Response", ObjectKind::NewObj),
        ] {
            let o = Object {
                class: Value::global(m, q),
                kind,
                args: vec![Value::str("x")],
                kwargs: vec![],
                state: Some(Value::dict([("int", Value::Int(1))])),
                list_items: vec![],
                dict_items: vec![],
            };
            assert_eq!(classify(&o), Known::Generic, "{m}.{q}");
        }
        // A UUID whose int is not an integer is not a UUID.
        let bad = Value::new_object("uuid", "UUID", Value::dict([("int", Value::str("1"))]));
        assert_eq!(classify(bad.as_object().unwrap()), Known::Generic);
    }

    #[test]
    fn attribute_names_are_filtered() {
        assert!(is_settable_attribute("_device_id"));
        assert!(is_settable_attribute("message"));
        assert!(!is_settable_attribute("__class__"));
        assert!(!is_settable_attribute("__dict__"));
        assert!(is_settable_attribute("__doc__"));
        assert!(!is_settable_attribute("a-b"));
        assert!(!is_settable_attribute(""));
        assert!(!is_settable_attribute("1x"));
    }

    #[test]
    fn response_shapes_match_the_original() {
        let f = response(
            ResponseClass::Failure,
            vec![Value::str("Invalid command: foo")],
            Value::str("Invalid command: foo"),
            None,
        );
        assert_eq!(f, protocol::invalid_command("foo"));
        let s = response(ResponseClass::Success, vec![], Value::str("ok"), Some(Value::Int(3)));
        let o = s.as_object().unwrap();
        assert_eq!(
            (o.kind, o.attr("return_code")),
            (ObjectKind::NewObj, Some(&Value::Int(3)))
        );
    }

    #[test]
    fn integers_from_python_bytes() {
        assert_eq!(int_from_le_bytes(&[]), Value::Int(0));
        assert_eq!(int_from_le_bytes(&[0x2a, 0x00, 0x00]), Value::Int(42));
        assert_eq!(int_from_le_bytes(&[0xff, 0xff]), Value::Int(-1));
        assert_eq!(int_from_le_bytes(&i64::MIN.to_le_bytes()), Value::Int(i64::MIN));
        // 2**64: nine bytes, positive.
        let mut b = vec![0u8; 8];
        b.extend([0x01, 0x00, 0x00]);
        assert_eq!(
            int_from_le_bytes(&b),
            Value::BigInt([0, 0, 0, 0, 0, 0, 0, 0, 1].to_vec())
        );
        // -(2**64)
        let mut b = vec![0u8; 8];
        b.extend([0xff, 0xff]);
        assert_eq!(
            int_from_le_bytes(&b),
            Value::BigInt([0, 0, 0, 0, 0, 0, 0, 0, 0xff].to_vec())
        );
        // u128 UUID ints agree with the value tree's own conversion.
        let u: u128 = 0xfedc_ba98_7654_3210_0123_4567_89ab_cdef;
        let mut b = u.to_le_bytes().to_vec();
        b.push(0);
        assert_eq!(int_from_le_bytes(&b), Value::from(u));
    }
}
