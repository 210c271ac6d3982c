//! What travels on the CGSE control-server sockets, as values: requests, replies, command objects.
//!
//! The codec turns bytes into [`Value`]s; this module gives them meaning. It is pure (no sockets), so
//! every rule (replies, command objects, the built-in names) is testable without a daemon.

pub mod commands;

pub use commands::{load_tables, parse_placeholders, CommandSpec, CommandTable, Placeholders, SocketKind};

use crate::codec::{Object, Value};

/// The names answered by every control server without a command object.
pub const BUILTINS: [&str; 7] = [
    "Ping",
    "send_commands",
    "get_service_port",
    "get_monitoring_port",
    "get_commanding_port",
    "get_ip_address",
    "get_storage_mnemonic",
];

/// How a request arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestForm {
    /// A bare string such as `"Ping"`.
    Str,
    /// `{"cmd": name, "args": [...], "kwargs": {...}}`.
    Dict,
    /// An `egse.command.CommandExecution` instance.
    CommandExecution,
    /// Anything else (an int, None, a list, an unknown object): never a valid request.
    Other,
}

/// A request reduced to what the dispatcher needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The shape the request came in.
    pub form: RequestForm,
    /// The command name; `None` when the request does not name one.
    pub name: Option<String>,
    /// Positional arguments (`args` of a dict, `_args` of a `CommandExecution`).
    pub args: Vec<Value>,
    /// Keyword arguments, (name, value) in the order sent.
    pub kwargs: Vec<(Value, Value)>,
}

impl Request {
    /// Interpret a decoded request. The class path of a `CommandExecution` and of its command object is
    /// not trusted: only the `_name` of the embedded command, `_args` and `_kwargs` are used.
    pub fn from_value(v: Value) -> Request {
        match v {
            Value::Str(s) => Request {
                form: RequestForm::Str,
                name: Some(s),
                args: vec![],
                kwargs: vec![],
            },
            Value::Dict(items) => {
                let mut name = None;
                let mut args = vec![];
                let mut kwargs = vec![];
                for (k, v) in items {
                    match (k.as_str(), v) {
                        (Some("cmd"), Value::Str(s)) => name = Some(s),
                        (Some("args"), Value::List(a) | Value::Tuple(a)) => args = a,
                        (Some("kwargs"), Value::Dict(kw)) => kwargs = kw,
                        _ => {}
                    }
                }
                Request {
                    form: RequestForm::Dict,
                    name,
                    args,
                    kwargs,
                }
            }
            Value::Object(o) if is_command_execution(&o) => request_from_execution(*o),
            _ => Request {
                form: RequestForm::Other,
                name: None,
                args: vec![],
                kwargs: vec![],
            },
        }
    }

    /// The name as the original prints it in `Invalid command: <name>` (`None` when absent).
    pub fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or("None")
    }
}

/// A `CommandExecution` is recognised by its state shape, not by trusting its class path alone: an
/// instance whose `__dict__` has `_cmd` (an object with `_name`), `_args` and `_kwargs`.
fn is_command_execution(o: &Object) -> bool {
    o.attr("_cmd")
        .and_then(Value::as_object)
        .and_then(|c| c.attr("_name"))
        .is_some()
}

fn request_from_execution(o: Object) -> Request {
    let mut name = None;
    let mut args = vec![];
    let mut kwargs = vec![];
    if let Some(Value::Dict(items)) = o.state {
        for (k, v) in items {
            match (k.as_str(), v) {
                (Some("_cmd"), Value::Object(cmd)) => {
                    name = cmd.attr("_name").and_then(Value::as_str).map(str::to_owned);
                }
                (Some("_args"), Value::Tuple(a) | Value::List(a)) => args = a,
                (Some("_kwargs"), Value::Dict(kw)) => kwargs = kw,
                _ => {}
            }
        }
    }
    Request {
        form: RequestForm::CommandExecution,
        name,
        args,
        kwargs,
    }
}

/// `egse.command.CommandExecution(cmd, *args, **kwargs)` as Python pickles it: how a client sends a command.
pub fn command_execution(cmd: Value, args: Vec<Value>, kwargs: Vec<(Value, Value)>) -> Value {
    Value::new_object(
        "egse.command",
        "CommandExecution",
        Value::dict([
            ("_cmd", cmd),
            ("_args", Value::Tuple(args)),
            ("_kwargs", Value::Dict(kwargs)),
        ]),
    )
}

/// A builtin Python exception class carried as the `cause` of a `Failure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PyExc {
    /// `TypeError`.
    TypeError,
    /// `ValueError`.
    ValueError,
    /// `KeyError`.
    KeyError,
    /// `RuntimeError`.
    RuntimeError,
    /// `TimeoutError`.
    TimeoutError,
    /// `ConnectionError`.
    ConnectionError,
}

impl PyExc {
    /// The class name in `builtins`.
    pub fn name(self) -> &'static str {
        match self {
            PyExc::TypeError => "TypeError",
            PyExc::ValueError => "ValueError",
            PyExc::KeyError => "KeyError",
            PyExc::RuntimeError => "RuntimeError",
            PyExc::TimeoutError => "TimeoutError",
            PyExc::ConnectionError => "ConnectionError",
        }
    }
}

/// `builtins.<Exc>(message)`, pickled as Python pickles exceptions (REDUCE, no state).
pub fn exception(exc: PyExc, message: &str) -> Value {
    Value::reduce("builtins", exc.name(), vec![Value::str(message)], None)
}

/// `egse.response.Failure(message)`.
pub fn failure(message: &str) -> Value {
    Value::reduce(
        "egse.response",
        "Failure",
        vec![Value::str(message)],
        Some(Value::dict([("message", Value::str(message)), ("cause", Value::None)])),
    )
}

/// `egse.response.Failure(context, cause)` with `message = "<context>: <cause text>"`.
///
/// Deliberate fix of a known bug of the original (README, "Where we deliberately differ from the original"): it passes a context ending in `": "`, which doubles
/// the separator (`"Executing X failed: : …"`); we write it once.
pub fn failure_with_cause(context: &str, exc: PyExc, cause: &str) -> Value {
    let message = format!("{context}: {cause}");
    let cause = exception(exc, cause);
    Value::reduce(
        "egse.response",
        "Failure",
        vec![Value::str(context), cause.clone()],
        Some(Value::dict([("message", Value::Str(message)), ("cause", cause)])),
    )
}

/// The reply to a request whose name no table knows.
pub fn invalid_command(name: &str) -> Value {
    failure(&format!("Invalid command: {name}"))
}

/// If `v` is an `egse.response.Failure`, its message.
pub fn failure_message(v: &Value) -> Option<String> {
    let o = v.as_object()?;
    if !o.is("egse.response", "Failure") {
        return None;
    }
    o.attr("message")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| o.args.first().and_then(Value::as_str).map(str::to_owned))
        .or_else(|| Some(String::new()))
}

/// Positional and keyword arguments matched to a command's parameter names, like a Python call.
///
/// Errors read like Python's `TypeError`s, because that is what a CGSE user has always seen.
pub fn bind_arguments(
    command: &str,
    params: &[&str],
    required: usize,
    args: Vec<Value>,
    kwargs: Vec<(Value, Value)>,
) -> Result<Vec<Option<Value>>, String> {
    if args.len() > params.len() {
        return Err(format!(
            "{command}() takes {} positional argument{} but {} {} given",
            params.len(),
            if params.len() == 1 { "" } else { "s" },
            args.len(),
            if args.len() == 1 { "was" } else { "were" }
        ));
    }
    let mut bound: Vec<Option<Value>> = vec![None; params.len()];
    for (slot, v) in bound.iter_mut().zip(args) {
        *slot = Some(v);
    }
    for (k, v) in kwargs {
        let Some(key) = k.as_str() else {
            return Err(format!("{command}() keywords must be strings"));
        };
        match params.iter().position(|p| *p == key) {
            Some(i) if bound[i].is_some() => {
                return Err(format!("{command}() got multiple values for argument '{key}'"));
            }
            Some(i) => bound[i] = Some(v),
            None => return Err(format!("{command}() got an unexpected keyword argument '{key}'")),
        }
    }
    let missing: Vec<&str> = params
        .iter()
        .zip(&bound)
        .take(required)
        .filter(|(_, b)| b.is_none())
        .map(|(p, _)| *p)
        .collect();
    if !missing.is_empty() {
        let quoted: Vec<String> = missing.iter().map(|m| format!("'{m}'")).collect();
        return Err(format!(
            "{command}() missing {} required positional argument{}: {}",
            missing.len(),
            if missing.len() == 1 { "" } else { "s" },
            quoted.join(" and ")
        ));
    }
    Ok(bound)
}

/// Python's `repr()` of a value on one line, for messages that quote a client's argument.
pub fn py_repr(v: &Value) -> String {
    let join = |items: &[Value]| items.iter().map(py_repr).collect::<Vec<_>>().join(", ");
    match v {
        Value::None => "None".into(),
        Value::Bool(b) => if *b { "True" } else { "False" }.into(),
        Value::Int(i) => i.to_string(),
        Value::BigInt(_) => "<int>".into(),
        Value::Float(f) => crate::codec::float_repr(*f),
        Value::Str(s) => crate::codec::str_repr(s),
        Value::Bytes(b) => crate::codec::bytes_repr(b),
        Value::ByteArray(b) => format!("bytearray({})", crate::codec::bytes_repr(b)),
        Value::List(items) => format!("[{}]", join(items)),
        Value::Tuple(items) if items.len() == 1 => format!("({},)", join(items)),
        Value::Tuple(items) => format!("({})", join(items)),
        Value::Set(items) | Value::FrozenSet(items) if items.is_empty() => "set()".into(),
        Value::Set(items) | Value::FrozenSet(items) => format!("{{{}}}", join(items)),
        Value::Dict(items) => {
            let inner: Vec<String> = items
                .iter()
                .map(|(k, v)| format!("{}: {}", py_repr(k), py_repr(v)))
                .collect();
            format!("{{{}}}", inner.join(", "))
        }
        Value::Global { module, qualname } => format!("<class '{module}.{qualname}'>"),
        Value::Object(o) => match o.class_path() {
            Some((m, q)) => format!("<{m}.{q} object>"),
            None => "<object>".into(),
        },
    }
}

/// A JSON value (e.g. a serialised status record) as a pickle value: objects become dicts in order,
/// integral numbers ints, other numbers floats.
pub fn from_json(j: serde_json::Value) -> Value {
    use serde_json::Value as J;
    match j {
        J::Null => Value::None,
        J::Bool(b) => Value::Bool(b),
        J::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => match n.as_u64() {
                Some(u) => Value::from(u128::from(u)),
                None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
        },
        J::String(s) => Value::Str(s),
        J::Array(a) => Value::List(a.into_iter().map(from_json).collect()),
        J::Object(m) => Value::Dict(m.into_iter().map(|(k, v)| (Value::Str(k), from_json(v))).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ce(name: &str, args: Vec<Value>, kwargs: Vec<(Value, Value)>) -> Value {
        let cmd = Value::new_object(
            "egse.procman",
            "ProcessManagerCommand",
            Value::dict([("_name", Value::str(name))]),
        );
        command_execution(cmd, args, kwargs)
    }

    #[test]
    fn request_forms() {
        let r = Request::from_value(Value::str("Ping"));
        assert_eq!((r.form, r.name.as_deref()), (RequestForm::Str, Some("Ping")));
        let r = Request::from_value(Value::dict([
            ("cmd", Value::str("get_service_port")),
            ("args", Value::List(vec![])),
        ]));
        assert_eq!(
            (r.form, r.name.as_deref()),
            (RequestForm::Dict, Some("get_service_port"))
        );
        let r = Request::from_value(ce("get_devices", vec![Value::Int(1)], vec![]));
        assert_eq!(
            (r.form, r.name.as_deref(), r.args.len()),
            (RequestForm::CommandExecution, Some("get_devices"), 1)
        );
        let r = Request::from_value(Value::Int(42));
        assert_eq!((r.form, r.display_name()), (RequestForm::Other, "None"));
        // An object naming os.system is just data: no _cmd/_name shape, so it is no request at all.
        let evil = Value::reduce("os", "system", vec![Value::str("touch /tmp/x")], None);
        assert_eq!(Request::from_value(evil).form, RequestForm::Other);
    }

    #[test]
    fn failure_shapes() {
        let f = invalid_command("foo");
        assert_eq!(failure_message(&f).as_deref(), Some("Invalid command: foo"));
        let f = failure_with_cause("Executing get_devices failed", PyExc::TypeError, "bad");
        assert_eq!(
            failure_message(&f).as_deref(),
            Some("Executing get_devices failed: bad")
        );
        let o = f.as_object().unwrap();
        assert!(o
            .attr("cause")
            .and_then(Value::as_object)
            .unwrap()
            .is("builtins", "TypeError"));
    }

    #[test]
    fn binding_reads_like_python() {
        let b = bind_arguments(
            "f",
            &["name", "level"],
            2,
            vec![Value::str("all")],
            vec![(Value::str("level"), Value::Int(10))],
        )
        .unwrap();
        assert_eq!(b[1], Some(Value::Int(10)));
        let e = bind_arguments("get_core_processes", &[], 0, vec![Value::Int(1), Value::Int(2)], vec![]).unwrap_err();
        assert_eq!(e, "get_core_processes() takes 0 positional arguments but 2 were given");
        let e = bind_arguments("f", &["freq"], 1, vec![], vec![]).unwrap_err();
        assert_eq!(e, "f() missing 1 required positional argument: 'freq'");
        let e = bind_arguments(
            "f",
            &["a"],
            1,
            vec![Value::Int(1)],
            vec![(Value::str("a"), Value::Int(2))],
        )
        .unwrap_err();
        assert!(e.contains("multiple values"));
        let e = bind_arguments("f", &["a"], 1, vec![], vec![(Value::str("b"), Value::Int(2))]).unwrap_err();
        assert!(e.contains("unexpected keyword argument 'b'"));
    }
}
