//! Python objects ↔ wire values.
//!
//! Replies become Python objects through the allow-list of [`crate::objects::classify`]: our own classes
//! in `egse.procman`, `uuid.UUID` and a fixed set of builtin exceptions. Nothing a reply names is ever
//! imported; every other class becomes a [`RemoteObject`], every class or function reference a
//! [`GlobalRef`], both of which travel back unchanged when passed as arguments.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{
    PyBool, PyByteArray, PyBytes, PyDict, PyFloat, PyFrozenSet, PyInt, PyList, PySet, PyString, PyTuple, PyType,
};
use pyo3::IntoPyObjectExt;
use std::collections::HashMap;

use crate::codec::str_repr as py_str_repr;
use crate::codec::{Object, Value};
use crate::objects::{self, Known, ProcessCommandClass, ResponseClass, PROCMAN_MODULE};

/// Deepest nesting accepted from a Python argument (a self-containing list would never end).
const MAX_DEPTH: usize = 500;

/// A class or function reference from a reply, kept as its name (never imported).
#[pyclass(module = "egse.procman", frozen, eq, hash, from_py_object)]
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct GlobalRef {
    #[pyo3(get)]
    pub module: String,
    #[pyo3(get)]
    pub qualname: String,
}

#[pymethods]
impl GlobalRef {
    #[new]
    fn new(module: String, qualname: String) -> GlobalRef {
        GlobalRef { module, qualname }
    }

    fn __repr__(&self) -> String {
        format!(
            "GlobalRef({}, {})",
            py_str_repr(&self.module),
            py_str_repr(&self.qualname)
        )
    }
}

/// An instance of a class outside the allow-list, kept as data: its class path, constructor arguments
/// and state. Passed back to a control server it is sent exactly as it was received.
#[pyclass(module = "egse.procman", frozen)]
pub struct RemoteObject {
    value: Value,
}

impl RemoteObject {
    fn object(&self) -> Option<&Object> {
        self.value.as_object()
    }
}

#[pymethods]
impl RemoteObject {
    /// The module of the class, or None when the class is not a plain reference.
    #[getter]
    fn module(&self) -> Option<String> {
        self.object().and_then(|o| o.class_path()).map(|(m, _)| m.to_owned())
    }

    /// The qualified class name, or None.
    #[getter]
    fn qualname(&self) -> Option<String> {
        self.object().and_then(|o| o.class_path()).map(|(_, q)| q.to_owned())
    }

    /// The constructor arguments.
    #[getter]
    fn args<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        let items = match self.object() {
            Some(o) => o.args.iter().map(|v| to_py(py, v)).collect::<PyResult<Vec<_>>>()?,
            None => Vec::new(),
        };
        PyTuple::new(py, items)
    }

    /// The instance state (normally a dict), or None.
    #[getter]
    fn state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        match self.object().and_then(|o| o.state.as_ref()) {
            Some(s) => to_py(py, s),
            None => Ok(py.None().into_bound(py)),
        }
    }

    /// Attributes of the state dict, like the original object would have them (`obj._name`).
    fn __getattr__<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        match self.object().and_then(|o| o.attr(name)) {
            Some(v) if !name.starts_with("__") => to_py(py, v),
            _ => Err(pyo3::exceptions::PyAttributeError::new_err(format!(
                "'RemoteObject' has no attribute '{name}'"
            ))),
        }
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .cast::<RemoteObject>()
            .map(|o| o.get().value == self.value)
            .unwrap_or(false)
    }

    fn __repr__(&self) -> String {
        let class = objects::class_path(&self.value);
        match self.object().and_then(|o| o.attr("_name")).and_then(Value::as_str) {
            Some(name) => format!("<RemoteObject {class}({name})>"),
            None => format!("<RemoteObject {class}>"),
        }
    }
}

/// A reply value as a Python object.
pub fn to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Converter::new(py).convert(v)
}

/// Dict keys no longer than this are shared between the dicts of one reply.
const SHARED_KEY_BYTES: usize = 64;
/// At most this many distinct keys are shared per reply (bounds the cache a hostile peer could grow).
const SHARED_KEYS: usize = 1024;

/// One conversion. The records of a `list_processes` reply repeat the same 20 keys a hundred times:
/// one Python `str` per distinct key (its hash computed once) instead of one per occurrence makes the
/// conversion faster and the result smaller, as `pickle.loads` gives when the pickler memoized them.
struct Converter<'py, 'v> {
    py: Python<'py>,
    keys: HashMap<&'v str, Bound<'py, PyString>>,
}

impl<'py, 'v> Converter<'py, 'v> {
    fn new(py: Python<'py>) -> Self {
        Converter {
            py,
            keys: HashMap::new(),
        }
    }

    fn convert(&mut self, v: &'v Value) -> PyResult<Bound<'py, PyAny>> {
        let py = self.py;
        Ok(match v {
            Value::None => py.None().into_bound(py),
            Value::Bool(b) => b.into_bound_py_any(py)?,
            Value::Int(i) => i.into_bound_py_any(py)?,
            Value::BigInt(bytes) => int_from_le_bytes(py, bytes)?,
            Value::Float(f) => f.into_bound_py_any(py)?,
            Value::Str(s) => PyString::new(py, s).into_any(),
            Value::Bytes(b) => PyBytes::new(py, b).into_any(),
            Value::ByteArray(b) => PyByteArray::new(py, b).into_any(),
            Value::List(items) => PyList::new(py, self.convert_all(items)?)?.into_any(),
            Value::Tuple(items) => PyTuple::new(py, self.convert_all(items)?)?.into_any(),
            Value::Set(items) => PySet::new(py, self.convert_all(items)?)?.into_any(),
            Value::FrozenSet(items) => PyFrozenSet::new(py, self.convert_all(items)?)?.into_any(),
            Value::Dict(items) => {
                let d = PyDict::new(py);
                for (k, v) in items {
                    let key = match k {
                        Value::Str(s) => self.key(s),
                        other => self.convert(other)?,
                    };
                    d.set_item(key, self.convert(v)?)?;
                }
                d.into_any()
            }
            Value::Global { module, qualname } => Bound::new(
                py,
                GlobalRef {
                    module: module.clone(),
                    qualname: qualname.clone(),
                },
            )?
            .into_any(),
            Value::Object(o) => object_to_py(py, o, v)?,
        })
    }

    fn convert_all(&mut self, items: &'v [Value]) -> PyResult<Vec<Bound<'py, PyAny>>> {
        items.iter().map(|v| self.convert(v)).collect()
    }

    fn key(&mut self, s: &'v str) -> Bound<'py, PyAny> {
        if s.len() > SHARED_KEY_BYTES {
            return PyString::new(self.py, s).into_any();
        }
        if let Some(k) = self.keys.get(s) {
            return k.clone().into_any();
        }
        let k = PyString::new(self.py, s);
        if self.keys.len() < SHARED_KEYS {
            self.keys.insert(s, k.clone());
        }
        k.into_any()
    }
}

fn int_from_le_bytes<'py>(py: Python<'py>, bytes: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    let kwargs = PyDict::new(py);
    kwargs.set_item("signed", true)?;
    py.get_type::<PyInt>()
        .call_method("from_bytes", (PyBytes::new(py, bytes), "little"), Some(&kwargs))
}

/// An allow-listed instance as its Python object; anything else (or an allow-listed object whose
/// data does not fit its class) as a [`RemoteObject`].
fn object_to_py<'py>(py: Python<'py>, o: &Object, whole: &Value) -> PyResult<Bound<'py, PyAny>> {
    let built = match objects::classify(o) {
        Known::Generic => None,
        known => build_known(py, known).ok(),
    };
    match built {
        Some(obj) => Ok(obj),
        None => Ok(Bound::new(py, RemoteObject { value: whole.clone() })?.into_any()),
    }
}

fn build_known<'py>(py: Python<'py>, known: Known<'_>) -> PyResult<Bound<'py, PyAny>> {
    match known {
        Known::Response { class, args, state } => {
            let cls = py.import(PROCMAN_MODULE)?.getattr(class.name())?;
            let obj = match class {
                ResponseClass::Failure => construct(py, &cls, args)?,
                _ => new_instance(&cls)?,
            };
            set_state(py, &obj, state)?;
            Ok(obj)
        }
        Known::Uuid { int, is_safe } => {
            let uuid = py.import("uuid")?;
            let kwargs = PyDict::new(py);
            kwargs.set_item("int", to_py(py, int)?)?;
            if let Some(s) = is_safe {
                kwargs.set_item("is_safe", uuid.getattr("SafeUUID")?.call1((s,))?)?;
            }
            uuid.getattr("UUID")?.call((), Some(&kwargs))
        }
        Known::Exception { name, args, state } => {
            let cls = py.import("builtins")?.getattr(name)?;
            let obj = construct(py, &cls, args)?;
            set_state(py, &obj, state)?;
            Ok(obj)
        }
        Known::ProcessCommand { class, state } => {
            let cls = py.import(PROCMAN_MODULE)?.getattr(class.name())?;
            let obj = new_instance(&cls)?;
            set_state(py, &obj, state)?;
            Ok(obj)
        }
        Known::Command { state } => {
            let cls = py.import(PROCMAN_MODULE)?.getattr(objects::PROCESS_MANAGER_COMMAND)?;
            let obj = new_instance(&cls)?;
            set_state(py, &obj, state)?;
            Ok(obj)
        }
        Known::Generic => Err(PyTypeError::new_err("not an allow-listed class")),
    }
}

/// `cls(*args)`, as unpickling a REDUCE does; if the constructor refuses the arguments, `cls.__new__`
/// with them (exceptions keep them as `.args`), the state then fills in the rest.
fn construct<'py>(py: Python<'py>, cls: &Bound<'py, PyAny>, args: &[Value]) -> PyResult<Bound<'py, PyAny>> {
    let args = PyTuple::new(py, Converter::new(py).convert_all(args)?)?;
    match cls.call1(args.clone()) {
        Ok(obj) => Ok(obj),
        Err(_) => {
            let mut with_cls = vec![cls.clone()];
            with_cls.extend(args.iter());
            cls.call_method1("__new__", PyTuple::new(py, with_cls)?)
        }
    }
}

/// `cls.__new__(cls)`: an instance whose attributes come from the state, as unpickling NEWOBJ does.
fn new_instance<'py>(cls: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    cls.call_method1("__new__", (cls.clone(),))
}

fn set_state(py: Python<'_>, obj: &Bound<'_, PyAny>, state: &[(Value, Value)]) -> PyResult<()> {
    for (k, v) in state {
        if let Some(name) = k.as_str().filter(|n| objects::is_settable_attribute(n)) {
            obj.setattr(name, to_py(py, v)?)?;
        }
    }
    Ok(())
}

/// A Python argument as a wire value.
pub fn from_py(obj: &Bound<'_, PyAny>) -> PyResult<Value> {
    from_py_at(obj, 0)
}

fn from_py_at(obj: &Bound<'_, PyAny>, depth: usize) -> PyResult<Value> {
    if depth > MAX_DEPTH {
        return Err(PyValueError::new_err(format!(
            "cannot send a value nested deeper than {MAX_DEPTH} levels (is it recursive?)"
        )));
    }
    let py = obj.py();
    let all = |items: pyo3::Bound<'_, pyo3::types::PyIterator>| -> PyResult<Vec<Value>> {
        items.map(|item| item.and_then(|i| from_py_at(&i, depth + 1))).collect()
    };
    if obj.is_none() {
        return Ok(Value::None);
    }
    if let Ok(b) = obj.cast::<PyBool>() {
        return Ok(Value::Bool(b.is_true()));
    }
    if obj.is_instance_of::<PyInt>() {
        return int_to_value(obj);
    }
    if let Ok(f) = obj.cast::<PyFloat>() {
        return Ok(Value::Float(f.value()));
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(Value::Str(s.to_str()?.to_owned()));
    }
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(Value::Bytes(b.as_bytes().to_vec()));
    }
    if let Ok(b) = obj.cast::<PyByteArray>() {
        return Ok(Value::ByteArray(b.to_vec()));
    }
    if obj.is_instance_of::<PyTuple>() {
        return Ok(Value::Tuple(all(obj.try_iter()?)?));
    }
    if obj.is_instance_of::<PyList>() {
        return Ok(Value::List(all(obj.try_iter()?)?));
    }
    if let Ok(d) = obj.cast::<PyDict>() {
        let mut items = Vec::with_capacity(d.len());
        for (k, v) in d.iter() {
            items.push((from_py_at(&k, depth + 1)?, from_py_at(&v, depth + 1)?));
        }
        return Ok(Value::Dict(items));
    }
    if obj.is_instance_of::<PySet>() {
        return Ok(Value::Set(all(obj.try_iter()?)?));
    }
    if obj.is_instance_of::<PyFrozenSet>() {
        return Ok(Value::FrozenSet(all(obj.try_iter()?)?));
    }
    if let Ok(g) = obj.cast::<GlobalRef>() {
        let g = g.get();
        return Ok(Value::global(&g.module, &g.qualname));
    }
    if let Ok(r) = obj.cast::<RemoteObject>() {
        return Ok(r.get().value.clone());
    }
    if let Ok(t) = obj.cast::<PyType>() {
        return global_of(obj, &t.name()?.to_string());
    }
    if let Some(v) = known_instance(py, obj, depth)? {
        return Ok(v);
    }
    let type_name = obj.get_type().name()?.to_string();
    if matches!(
        type_name.as_str(),
        "function" | "builtin_function_or_method" | "method_descriptor"
    ) {
        return global_of(obj, &type_name);
    }
    Err(PyTypeError::new_err(format!(
        "cannot send an object of type '{type_name}' to a control server (send plain data, or the egse.procman \
         command and response objects)"
    )))
}

/// A class or function as a global reference (`__module__`, `__qualname__`).
fn global_of(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Value> {
    let module: String = obj.getattr("__module__")?.extract()?;
    let qualname: String = obj.getattr("__qualname__")?.extract()?;
    if qualname.contains("<locals>") || qualname.contains("<lambda>") {
        return Err(PyTypeError::new_err(format!(
            "cannot send the {what} {module}.{qualname}: it cannot be referenced by name"
        )));
    }
    Ok(Value::global(module, qualname))
}

fn int_to_value(obj: &Bound<'_, PyAny>) -> PyResult<Value> {
    if let Ok(i) = obj.extract::<i64>() {
        return Ok(Value::Int(i));
    }
    // Enough bytes for the magnitude plus a sign bit; `int_from_le_bytes` trims the rest.
    let bits: usize = obj.call_method0("bit_length")?.extract()?;
    let kwargs = PyDict::new(obj.py());
    kwargs.set_item("signed", true)?;
    let bytes = obj.call_method("to_bytes", (bits / 8 + 1, "little"), Some(&kwargs))?;
    Ok(objects::int_from_le_bytes(bytes.cast::<PyBytes>()?.as_bytes()))
}

/// Our own objects (responses, process and command objects), `uuid.UUID` and builtin exceptions.
fn known_instance(py: Python<'_>, obj: &Bound<'_, PyAny>, depth: usize) -> PyResult<Option<Value>> {
    let attr = |name: &str| -> PyResult<Option<Value>> {
        match obj.getattr(name) {
            Ok(v) => Ok(Some(from_py_at(&v, depth + 1)?)),
            Err(e) if e.is_instance_of::<pyo3::exceptions::PyAttributeError>(py) => Ok(None),
            Err(e) => Err(e),
        }
    };
    let uuid_cls = py.import("uuid")?.getattr("UUID")?;
    if obj.is_instance(&uuid_cls)? {
        let int = attr("int")?.unwrap_or(Value::Int(0));
        let is_safe = obj
            .getattr("is_safe")
            .and_then(|s| s.getattr("value"))
            .and_then(|v| v.extract::<Option<i64>>())
            .unwrap_or(None);
        return Ok(Some(objects::uuid(int, is_safe)));
    }
    let procman = py.import(PROCMAN_MODULE)?;
    let class = |name: &str| procman.getattr(name).ok();
    let is = |name: &str| -> PyResult<bool> {
        match class(name) {
            Some(c) => obj.is_instance(&c),
            None => Ok(false),
        }
    };
    for rc in [ResponseClass::Failure, ResponseClass::Success, ResponseClass::Message] {
        if is(rc.name())? {
            let message = attr("message")?.unwrap_or(Value::None);
            return Ok(Some(match rc {
                ResponseClass::Failure => {
                    let args = match obj.getattr("args")?.cast::<PyTuple>() {
                        Ok(t) => t
                            .iter()
                            .map(|a| from_py_at(&a, depth + 1))
                            .collect::<PyResult<Vec<_>>>()?,
                        Err(_) => vec![message.clone()],
                    };
                    objects::response(rc, args, message, attr("cause")?)
                }
                ResponseClass::Success => objects::response(rc, vec![], message, attr("return_code")?),
                ResponseClass::Message => objects::response(rc, vec![], message, None),
            }));
        }
    }
    // Most specific first: the three commands are subclasses of ProcessCommand.
    for pc in [
        ProcessCommandClass::Start,
        ProcessCommandClass::Stop,
        ProcessCommandClass::Status,
        ProcessCommandClass::Process,
    ] {
        if is(pc.name())? {
            let values = pc.state_keys().iter().map(|k| attr(k)).collect::<PyResult<Vec<_>>>()?;
            return Ok(Some(objects::process_command(pc, values)));
        }
    }
    if is(objects::PROCESS_MANAGER_COMMAND)? {
        let values = objects::COMMAND_STATE_KEYS
            .iter()
            .map(|k| {
                // `__doc__` is the instance's own help text, not the class docstring.
                if *k == "__doc__" {
                    match obj.getattr("__dict__").and_then(|d| d.get_item("__doc__")) {
                        Ok(v) => from_py_at(&v, depth + 1).map(Some),
                        Err(_) => Ok(None),
                    }
                } else {
                    attr(k)
                }
            })
            .collect::<PyResult<Vec<_>>>()?;
        return Ok(Some(objects::command_object(values)));
    }
    if obj.is_instance_of::<pyo3::exceptions::PyBaseException>() {
        let ty = obj.get_type();
        let module: String = ty.getattr("__module__")?.extract()?;
        let name = ty.name()?.to_string();
        if module == "builtins" {
            let args = obj
                .getattr("args")?
                .try_iter()?
                .map(|a| a.and_then(|a| from_py_at(&a, depth + 1)))
                .collect::<PyResult<Vec<_>>>()?;
            return Ok(Some(objects::exception(&name, args)));
        }
    }
    Ok(None)
}
