//! The value tree that pickles decode into and encode from.
//!
//! Class and function references stay opaque ([`Value::Global`]); instances keep their class, constructor
//! arguments and state separately ([`Object`]). Nothing here can import or run Python code.

/// A decoded Python value.
///
/// Tuples and lists are distinct because CGSE replies depend on the difference (`("ACK",)` is a tuple,
/// `device_args` inside `get_devices` is a list). Dicts keep insertion order, as Python does.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `None`.
    None,
    /// `bool`.
    Bool(bool),
    /// `int` within the i64 range.
    Int(i64),
    /// An integer outside the i64 range: minimal little-endian two's-complement bytes, as LONG1 carries them.
    BigInt(Vec<u8>),
    /// `float`.
    Float(f64),
    /// `str`.
    Str(String),
    /// `bytes`.
    Bytes(Vec<u8>),
    /// `bytearray`.
    ByteArray(Vec<u8>),
    /// `list`.
    List(Vec<Value>),
    /// `tuple`.
    Tuple(Vec<Value>),
    /// `dict`: (key, value) pairs in insertion order.
    Dict(Vec<(Value, Value)>),
    /// `set`: its members.
    Set(Vec<Value>),
    /// `frozenset`: its members.
    FrozenSet(Vec<Value>),
    /// A reference to a class or function, never resolved.
    Global {
        /// The module (`egse.response`).
        module: String,
        /// The qualified name within it (`Failure`).
        qualname: String,
    },
    /// An instance built by NEWOBJ / NEWOBJ_EX / REDUCE, optionally completed by BUILD.
    Object(Box<Object>),
}

/// How an [`Object`] was constructed; the encoder writes it back the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// `cls.__new__(cls, *args)` (NEWOBJ): plain instances such as `CommandExecution`.
    NewObj,
    /// `callable(*args)` (REDUCE): exceptions, `Failure`, enum members, `pathlib.PosixPath`.
    Reduce,
}

/// An instance of a Python class, kept as data.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    /// Usually a [`Value::Global`]; REDUCE allows any callable value.
    pub class: Value,
    /// How it was constructed.
    pub kind: ObjectKind,
    /// Positional constructor arguments (a tuple in the pickle).
    pub args: Vec<Value>,
    /// Keyword arguments of NEWOBJ_EX (empty otherwise).
    pub kwargs: Vec<(Value, Value)>,
    /// The BUILD argument: normally a dict, or a `(dict, slotstate)` tuple.
    pub state: Option<Value>,
    /// Items appended to a list subclass (APPEND/APPENDS on the instance).
    pub list_items: Vec<Value>,
    /// Items set on a dict subclass (SETITEM/SETITEMS on the instance), e.g. `egse.setup.Setup`.
    pub dict_items: Vec<(Value, Value)>,
}

impl Value {
    /// A `Value::Str` from anything string-like.
    pub fn str(s: impl Into<String>) -> Value {
        Value::Str(s.into())
    }

    /// A `Value::Global` reference.
    pub fn global(module: impl Into<String>, qualname: impl Into<String>) -> Value {
        Value::Global {
            module: module.into(),
            qualname: qualname.into(),
        }
    }

    /// A dict from `(str, value)` pairs, keeping their order.
    pub fn dict<K: Into<String>>(items: impl IntoIterator<Item = (K, Value)>) -> Value {
        Value::Dict(items.into_iter().map(|(k, v)| (Value::Str(k.into()), v)).collect())
    }

    /// An instance created with NEWOBJ and no arguments, then BUILD with `state`.
    pub fn new_object(module: &str, qualname: &str, state: Value) -> Value {
        Value::Object(Box::new(Object {
            class: Value::global(module, qualname),
            kind: ObjectKind::NewObj,
            args: Vec::new(),
            kwargs: Vec::new(),
            state: Some(state),
            list_items: Vec::new(),
            dict_items: Vec::new(),
        }))
    }

    /// An instance created with REDUCE (`callable(*args)`), optionally followed by BUILD.
    pub fn reduce(module: &str, qualname: &str, args: Vec<Value>, state: Option<Value>) -> Value {
        Value::Object(Box::new(Object {
            class: Value::global(module, qualname),
            kind: ObjectKind::Reduce,
            args,
            kwargs: Vec::new(),
            state,
            list_items: Vec::new(),
            dict_items: Vec::new(),
        }))
    }

    /// The string, if this is a `Str`.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer value if it fits an i64 (bools count as 0/1, as in Python).
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(i64::from(*b)),
            _ => None,
        }
    }

    /// A number as f64 (int, float or bool), like Python's `float(x)` on numbers.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
            _ => None,
        }
    }

    /// Look up a string key in a dict value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => dict_get(items, key),
            _ => None,
        }
    }

    /// The object if this is an instance.
    pub fn as_object(&self) -> Option<&Object> {
        match self {
            Value::Object(o) => Some(o),
            _ => None,
        }
    }

    /// `(module, qualname)` if this is a global reference.
    pub fn as_global(&self) -> Option<(&str, &str)> {
        match self {
            Value::Global { module, qualname } => Some((module, qualname)),
            _ => None,
        }
    }

    /// Python's type name, for error messages (`'NoneType'`, `'str'`, the class qualname for instances).
    pub fn type_name(&self) -> &str {
        match self {
            Value::None => "NoneType",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::ByteArray(_) => "bytearray",
            Value::List(_) => "list",
            Value::Tuple(_) => "tuple",
            Value::Dict(_) => "dict",
            Value::Set(_) => "set",
            Value::FrozenSet(_) => "frozenset",
            Value::Global { .. } => "type",
            Value::Object(o) => match &o.class {
                Value::Global { qualname, .. } => qualname.rsplit('.').next().unwrap_or(qualname),
                _ => "object",
            },
        }
    }
}

impl Object {
    /// `(module, qualname)` of the class, if it is a global reference.
    pub fn class_path(&self) -> Option<(&str, &str)> {
        self.class.as_global()
    }

    /// True if the class is `module.qualname`.
    pub fn is(&self, module: &str, qualname: &str) -> bool {
        self.class_path() == Some((module, qualname))
    }

    /// The instance `__dict__`: the BUILD state if it is a dict, or the dict half of `(dict, slots)`.
    pub fn state_dict(&self) -> Option<&[(Value, Value)]> {
        match &self.state {
            Some(Value::Dict(items)) => Some(items),
            Some(Value::Tuple(parts)) if parts.len() == 2 => match &parts[0] {
                Value::Dict(items) => Some(items),
                _ => None,
            },
            _ => None,
        }
    }

    /// An attribute from the instance `__dict__`.
    pub fn attr(&self, name: &str) -> Option<&Value> {
        self.state_dict().and_then(|items| dict_get(items, name))
    }
}

/// Find a string key in dict items (last one wins, as Python's dict would keep it).
pub fn dict_get<'a>(items: &'a [(Value, Value)], key: &str) -> Option<&'a Value> {
    items
        .iter()
        .rev()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::Str(s.to_owned())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::Str(s)
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Value {
        Value::Int(i)
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Value {
        Value::Bool(b)
    }
}

impl From<f64> for Value {
    fn from(f: f64) -> Value {
        Value::Float(f)
    }
}

impl From<u128> for Value {
    fn from(v: u128) -> Value {
        if let Ok(i) = i64::try_from(v) {
            return Value::Int(i);
        }
        // Minimal two's complement: a positive number needs a clear sign bit on the top byte.
        let mut bytes = v.to_le_bytes().to_vec();
        while bytes.len() > 1 && bytes[bytes.len() - 1] == 0 && bytes[bytes.len() - 2] & 0x80 == 0 {
            bytes.pop();
        }
        if bytes[bytes.len() - 1] & 0x80 != 0 {
            bytes.push(0);
        }
        Value::BigInt(bytes)
    }
}
