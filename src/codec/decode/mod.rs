//! Pickle decoder (protocols 2–5).
//!
//! Decoding runs in two phases so that Python's object identity survives and no input can make us
//! allocate without bound:
//!
//! 1. The opcode loop builds a graph in an arena. The stack and the memo hold node ids, so a list that
//!    CPython memoizes right after `EMPTY_LIST` and fills later is seen filled by every later `BINGET`,
//!    and `BUILD`/`SETITEMS` on a memoized instance reach every reference to it. Strings and bytes
//!    borrow from the input; every node costs at least one input byte, so the graph is linear in the
//!    input.
//! 2. At `STOP` one iterative pass over the graph reachable from the result finds cycles and computes
//!    the depth and the size of the tree that memo references expand to. Only when those fit
//!    [`Limits`] is the [`Value`] tree built, recursively but never deeper than `max_depth`.
//!
//! Nothing named by the pickle is imported or called: globals stay [`Value::Global`] and instances
//! stay [`Object`]s. A few builtin reductions that CPython itself writes for plain data (sets,
//! bytearrays and bytes in protocol 2/3, nested qualnames via `getattr`) are folded back into data.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::rc::Rc;

use super::{CodecError, Limits, Object, ObjectKind, Value};

mod graph;

/// Index of a node in the arena.
type Id = u32;

/// Dict keys and set members longer than this are not de-duplicated: hashing and comparing them on
/// every insert would let a memo reference to one huge key cost far more work than its two input
/// bytes. CPython never writes duplicate keys, so this only matters for hand-made pickles, where the
/// later value still wins in [`super::dict_get`].
const MAX_DEDUP_KEY_BYTES: usize = 256;

/// Dicts and sets up to this size are de-duplicated by a linear scan; larger ones get a hash index. A
/// scan compares lengths and bytes, no hashing: for the records CGSE sends (20 keys, a definition of 9)
/// that is cheaper than building and dropping an index per dict (`list_processes` of 110 records decoded
/// 25 % faster with 32 than with 8), and it bounds the work per insert at 32 comparisons.
const INDEX_THRESHOLD: usize = 32;

/// Every this many payload bytes of a string, bytes, big int or global name count as one more result
/// node, so that memo references to one large string cannot multiply memory past the node budget (a
/// `Value` is 48 bytes, so a node and 64 payload bytes cost about the same).
const PAYLOAD_BYTES_PER_NODE: usize = 64;

/// Decode one pickle.
pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Value, CodecError> {
    if bytes.len() > limits.max_frame_bytes {
        return Err(CodecError::FrameTooLarge {
            size: bytes.len(),
            limit: limits.max_frame_bytes,
        });
    }
    if bytes.is_empty() {
        return Err(CodecError::Empty);
    }
    let mut machine = Machine::new(bytes, limits);
    let root = machine.run()?;
    machine.check_graph(root)?;
    machine.build(root)
}

// ---------------------------------------------------------------------------------------------------
// Payloads: borrowed from the input where possible, shared (cheap to clone) where synthesized.

/// String payload of a node.
#[derive(Clone, Debug)]
enum Text<'a> {
    Borrowed(&'a str),
    Static(&'static str),
    Shared(Rc<str>),
}

impl Deref for Text<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        match self {
            Text::Borrowed(s) => s,
            Text::Static(s) => s,
            Text::Shared(s) => s,
        }
    }
}

impl PartialEq for Text<'_> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}
impl Eq for Text<'_> {}
impl Hash for Text<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (**self).hash(state);
    }
}

/// Byte payload of a node.
#[derive(Clone, Debug)]
enum Blob<'a> {
    Borrowed(&'a [u8]),
    Shared(Rc<[u8]>),
}

impl Deref for Blob<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Blob::Borrowed(b) => b,
            Blob::Shared(b) => b,
        }
    }
}

impl PartialEq for Blob<'_> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}
impl Eq for Blob<'_> {}
impl Hash for Blob<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (**self).hash(state);
    }
}

// ---------------------------------------------------------------------------------------------------
// The graph.

/// One Python object under construction. Containers hold child ids, never values.
#[derive(Debug)]
enum Node<'a> {
    None,
    Bool(bool),
    Int(i64),
    /// Minimal little-endian two's complement, outside the i64 range.
    BigInt(Blob<'a>),
    Float(f64),
    Str(Text<'a>),
    Bytes(Blob<'a>),
    ByteArray(Blob<'a>),
    List(Vec<Id>),
    Tuple(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Set(Vec<Id>),
    FrozenSet(Vec<Id>),
    Global(Box<(Text<'a>, Text<'a>)>),
    Object(Box<ObjNode>),
}

/// An instance under construction.
#[derive(Debug)]
struct ObjNode {
    class: Id,
    kind: ObjectKind,
    /// The args tuple node; tuples are immutable, so referencing it is the same as copying it.
    args: Id,
    kwargs: Vec<(Id, Id)>,
    state: Option<Id>,
    list_items: Vec<Id>,
    dict_items: Vec<(Id, Id)>,
}

/// What Python's `==`/`hash` would consider the same dict key or set member, for the key types whose
/// equality we can know without running Python code. `True`, `1` and `1.0` are the same key.
#[derive(Clone, PartialEq, Eq, Hash)]
enum Key<'a> {
    None,
    Int(i64),
    Big(Blob<'a>),
    Float(u64),
    Str(Text<'a>),
    Bytes(Blob<'a>),
    Global(Text<'a>, Text<'a>),
}

/// The pickle virtual machine: input cursor, stack, marks, memo and the arena.
struct Machine<'a, 'l> {
    data: &'a [u8],
    pos: usize,
    limits: &'l Limits,
    nodes: Vec<Node<'a>>,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: HashMap<u32, Id>,
    /// Hash indexes of dicts, sets and dict-like instances that outgrew [`INDEX_THRESHOLD`].
    indexes: HashMap<Id, HashMap<Key<'a>, u32>>,
    /// Ids and bytes we may still copy while folding reductions; bounded by the input size so that
    /// memo references cannot make a few input bytes copy a large structure again and again.
    copy_budget: usize,
}

/// Opcodes we recognise but refuse: protocol 0/1 text forms, persistent ids, the extension registry
/// and out-of-band buffers. None of them is written by `pickle.dumps` at protocol 2 or later for the
/// values CGSE exchanges.
fn unsupported_name(op: u8) -> Option<&'static str> {
    Some(match op {
        b'I' => "INT",
        b'L' => "LONG",
        b'F' => "FLOAT",
        b'S' => "STRING",
        b'V' => "UNICODE",
        b'p' => "PUT",
        b'g' => "GET",
        b'd' => "DICT",
        b'l' => "LIST",
        b'i' => "INST",
        b'o' => "OBJ",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => return None,
    })
}

/// Python 2 module names that CPython's unpickler maps to their Python 3 names (`fix_imports`).
fn normalize_module(module: Text<'_>) -> Text<'_> {
    match &*module {
        "__builtin__" | "exceptions" => Text::Static("builtins"),
        "copy_reg" => Text::Static("copyreg"),
        _ => module,
    }
}

fn malformed(pos: usize, reason: impl Into<String>) -> CodecError {
    CodecError::Malformed {
        pos,
        reason: reason.into(),
    }
}

/// Trim a little-endian two's-complement integer to its minimal length (what `From<u128>` yields).
fn minimal_twos_complement(bytes: &[u8]) -> &[u8] {
    let mut len = bytes.len();
    while len > 1 {
        let (Some(&last), Some(&prev)) = (bytes.get(len - 1), bytes.get(len - 2)) else {
            break;
        };
        let redundant = (last == 0x00 && prev & 0x80 == 0) || (last == 0xff && prev & 0x80 != 0);
        if !redundant {
            break;
        }
        len -= 1;
    }
    bytes.get(..len).unwrap_or(bytes)
}

/// Sign-extend a little-endian two's-complement integer of at most 8 bytes.
fn small_int(bytes: &[u8]) -> Option<i64> {
    if bytes.len() > 8 {
        return None;
    }
    let negative = bytes.last().is_some_and(|b| b & 0x80 != 0);
    let mut buf = if negative { [0xffu8; 8] } else { [0u8; 8] };
    for (dst, src) in buf.iter_mut().zip(bytes) {
        *dst = *src;
    }
    Some(i64::from_le_bytes(buf))
}

impl<'a, 'l> Machine<'a, 'l> {
    fn new(data: &'a [u8], limits: &'l Limits) -> Self {
        Machine {
            data,
            pos: 0,
            limits,
            // CPython pickles hold roughly one object per 8 to 16 bytes, so this avoids most regrowth.
            // No input holds more nodes than bytes, and exact doubling from `len / 8 + 1` reaches at
            // least `len`, so the arena never reserves more than 32 bytes per input byte.
            nodes: Vec::with_capacity(data.len() / 8 + 1),
            stack: Vec::with_capacity(16),
            marks: Vec::new(),
            memo: HashMap::new(),
            indexes: HashMap::new(),
            copy_budget: data.len().saturating_mul(2).saturating_add(4096),
        }
    }

    // --- input -------------------------------------------------------------------------------------

    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        let data: &'a [u8] = self.data;
        let end = self.pos.checked_add(n).filter(|&end| end <= data.len());
        match end.and_then(|end| data.get(self.pos..end)) {
            Some(slice) => {
                self.pos += n;
                Ok(slice)
            }
            None => Err(CodecError::Truncated(data.len())),
        }
    }

    fn take_array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let slice = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(slice);
        Ok(out)
    }

    fn read_u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.take_array::<1>()?[0])
    }

    /// A length field; it is checked against the remaining input before anything is allocated.
    fn read_len(&mut self, width: usize, signed: bool, at: usize) -> Result<usize, CodecError> {
        let raw: u64 = match width {
            1 => u64::from(self.read_u8()?),
            4 => {
                let b = self.take_array::<4>()?;
                if signed {
                    let v = i32::from_le_bytes(b);
                    u64::try_from(v).map_err(|_| malformed(at, "negative byte count"))?
                } else {
                    u64::from(u32::from_le_bytes(b))
                }
            }
            _ => u64::from_le_bytes(self.take_array::<8>()?),
        };
        let remaining = self.data.len().saturating_sub(self.pos);
        match usize::try_from(raw) {
            Ok(n) if n <= remaining => Ok(n),
            _ => Err(CodecError::Truncated(self.data.len())),
        }
    }

    /// A `\n`-terminated line (GLOBAL's arguments), without the newline.
    fn read_line(&mut self, at: usize) -> Result<&'a str, CodecError> {
        let data: &'a [u8] = self.data;
        let rest = data.get(self.pos..).unwrap_or_default();
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            return Err(CodecError::Truncated(data.len()));
        };
        let line = rest.get(..n).unwrap_or_default();
        self.pos += n + 1;
        std::str::from_utf8(line).map_err(|_| malformed(at, "GLOBAL name is not valid UTF-8"))
    }

    // --- arena and stack ---------------------------------------------------------------------------

    fn add(&mut self, node: Node<'a>) -> Result<Id, CodecError> {
        let id = Id::try_from(self.nodes.len()).map_err(|_| malformed(self.pos, "too many objects"))?;
        self.nodes.push(node);
        Ok(id)
    }

    fn push_new(&mut self, node: Node<'a>) -> Result<(), CodecError> {
        let id = self.add(node)?;
        self.stack.push(id);
        Ok(())
    }

    fn node(&self, id: Id) -> Result<&Node<'a>, CodecError> {
        self.nodes
            .get(id as usize)
            .ok_or_else(|| malformed(self.pos, "dangling object reference"))
    }

    fn node_mut(&mut self, id: Id) -> Result<&mut Node<'a>, CodecError> {
        let pos = self.pos;
        self.nodes
            .get_mut(id as usize)
            .ok_or_else(|| malformed(pos, "dangling object reference"))
    }

    /// The stack must not be popped below the innermost MARK (CPython's "fence").
    fn fence(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self, at: usize) -> Result<Id, CodecError> {
        if self.stack.len() <= self.fence() {
            return Err(malformed(at, "unpickling stack underflow"));
        }
        self.stack
            .pop()
            .ok_or_else(|| malformed(at, "unpickling stack underflow"))
    }

    fn top(&self, at: usize) -> Result<Id, CodecError> {
        if self.stack.len() <= self.fence() {
            return Err(malformed(at, "unpickling stack underflow"));
        }
        self.stack
            .last()
            .copied()
            .ok_or_else(|| malformed(at, "unpickling stack underflow"))
    }

    /// Pop the innermost MARK and return everything pushed since.
    fn pop_mark(&mut self, at: usize) -> Result<Vec<Id>, CodecError> {
        let mark = self.marks.pop().ok_or_else(|| malformed(at, "could not find MARK"))?;
        if mark > self.stack.len() {
            return Err(malformed(at, "MARK above the stack top"));
        }
        Ok(self.stack.split_off(mark))
    }

    fn check_len(&self, len: usize) -> Result<(), CodecError> {
        if len > self.limits.max_container_len {
            return Err(CodecError::ContainerTooLarge(self.limits.max_container_len));
        }
        Ok(())
    }

    fn spend(&mut self, n: usize, at: usize) -> Result<(), CodecError> {
        self.copy_budget = self
            .copy_budget
            .checked_sub(n)
            .ok_or_else(|| malformed(at, "reductions copy more data than the pickle holds (memo bomb?)"))?;
        Ok(())
    }

    fn memo_put(&mut self, index: u32, at: usize) -> Result<(), CodecError> {
        let id = self.top(at)?;
        self.memo.insert(index, id);
        if self.memo.len() > self.limits.max_memo {
            return Err(CodecError::MemoTooLarge(self.limits.max_memo));
        }
        Ok(())
    }

    fn memo_get(&mut self, index: u32, at: usize) -> Result<(), CodecError> {
        let id = *self
            .memo
            .get(&index)
            .ok_or_else(|| malformed(at, format!("memo key {index} not found")))?;
        self.stack.push(id);
        Ok(())
    }

    // --- keys and de-duplication -------------------------------------------------------------------

    fn key_of(&self, id: Id) -> Option<Key<'a>> {
        Some(match self.nodes.get(id as usize)? {
            Node::None => Key::None,
            Node::Bool(b) => Key::Int(i64::from(*b)),
            Node::Int(i) => Key::Int(*i),
            Node::BigInt(b) if b.len() <= MAX_DEDUP_KEY_BYTES => Key::Big(b.clone()),
            Node::Float(f) => {
                const LIMIT: f64 = 9_223_372_036_854_775_808.0; // 2**63
                if f.is_nan() {
                    return None;
                } else if f.fract() == 0.0 && *f >= -LIMIT && *f < LIMIT {
                    Key::Int(*f as i64)
                } else if f.fract() == 0.0 && f.is_finite() {
                    return None; // equal to some big int; not worth modelling
                } else {
                    Key::Float(f.to_bits())
                }
            }
            Node::Str(t) if t.len() <= MAX_DEDUP_KEY_BYTES => Key::Str(t.clone()),
            Node::Bytes(b) if b.len() <= MAX_DEDUP_KEY_BYTES => Key::Bytes(b.clone()),
            Node::Global(g) if g.0.len() + g.1.len() <= MAX_DEDUP_KEY_BYTES => Key::Global(g.0.clone(), g.1.clone()),
            _ => return None,
        })
    }

    /// `key_of(id) == Some(key)`, without building the key for the common cases (strings and ints).
    fn is_key(&self, id: Id, key: &Key<'a>) -> bool {
        match (self.nodes.get(id as usize), key) {
            // A `Key::Str` is never longer than MAX_DEDUP_KEY_BYTES, so equal text is within it too.
            (Some(Node::Str(t)), Key::Str(k)) => **t == **k,
            (Some(Node::Str(_)), _) => false,
            (Some(Node::Int(i)), Key::Int(k)) => i == k,
            _ => self.key_of(id).as_ref() == Some(key),
        }
    }

    /// Entries of a dict node or the dict items of an instance.
    fn dict_entries(&self, target: Id) -> Option<&Vec<(Id, Id)>> {
        match self.nodes.get(target as usize)? {
            Node::Dict(entries) => Some(entries),
            Node::Object(obj) => Some(&obj.dict_items),
            _ => None,
        }
    }

    fn dict_entries_mut(&mut self, target: Id) -> Option<&mut Vec<(Id, Id)>> {
        match self.nodes.get_mut(target as usize)? {
            Node::Dict(entries) => Some(entries),
            Node::Object(obj) => Some(&mut obj.dict_items),
            _ => None,
        }
    }

    /// `target[k] = v` with Python semantics: an equal existing key keeps its place and gets the value.
    fn dict_set(&mut self, target: Id, k: Id, v: Id, at: usize) -> Result<(), CodecError> {
        let key = self.key_of(k);
        let entries = self
            .dict_entries(target)
            .ok_or_else(|| malformed(at, "SETITEM(S) target is neither a dict nor an instance"))?;
        let existing = match &key {
            None => None,
            Some(key) => match self.indexes.get(&target) {
                Some(index) => index.get(key).map(|&i| i as usize),
                None => entries.iter().position(|&(ek, _)| self.is_key(ek, key)),
            },
        };
        let len = entries.len();
        if let Some(i) = existing {
            if let Some(entry) = self.dict_entries_mut(target).and_then(|e| e.get_mut(i)) {
                entry.1 = v;
            }
            return Ok(());
        }
        self.check_len(len + 1)?;
        if let Some(entries) = self.dict_entries_mut(target) {
            entries.push((k, v));
        }
        self.index_after_insert(target, key, len)
    }

    /// Keep the hash index of `target` up to date after an element was appended at `position`,
    /// creating it when the container outgrows the linear-scan size.
    fn index_after_insert(&mut self, target: Id, key: Option<Key<'a>>, position: usize) -> Result<(), CodecError> {
        let position =
            u32::try_from(position).map_err(|_| CodecError::ContainerTooLarge(self.limits.max_container_len))?;
        if let Some(index) = self.indexes.get_mut(&target) {
            if let Some(key) = key {
                index.insert(key, position);
            }
            return Ok(());
        }
        if (position as usize) < INDEX_THRESHOLD {
            return Ok(());
        }
        let members: Vec<Id> = match self.nodes.get(target as usize) {
            Some(Node::Dict(entries)) => entries.iter().map(|e| e.0).collect(),
            Some(Node::Object(obj)) => obj.dict_items.iter().map(|e| e.0).collect(),
            Some(Node::Set(items)) | Some(Node::FrozenSet(items)) => items.clone(),
            _ => return Ok(()),
        };
        let mut index = HashMap::with_capacity(members.len());
        for (i, id) in members.into_iter().enumerate() {
            if let (Some(key), Ok(i)) = (self.key_of(id), u32::try_from(i)) {
                index.insert(key, i);
            }
        }
        self.indexes.insert(target, index);
        Ok(())
    }

    /// Add `item` to a set node unless an equal member is already there.
    fn set_add(&mut self, target: Id, item: Id, at: usize) -> Result<(), CodecError> {
        let key = self.key_of(item);
        let (Node::Set(items) | Node::FrozenSet(items)) = self.node(target)? else {
            return Err(malformed(at, "ADDITEMS target is not a set"));
        };
        let present = match &key {
            None => false,
            Some(key) => match self.indexes.get(&target) {
                Some(index) => index.contains_key(key),
                None => items.iter().any(|&m| self.is_key(m, key)),
            },
        };
        if present {
            return Ok(());
        }
        let len = items.len();
        self.check_len(len + 1)?;
        if let Node::Set(items) | Node::FrozenSet(items) = self.node_mut(target)? {
            items.push(item);
        }
        self.index_after_insert(target, key, len)
    }

    // --- the opcode loop ---------------------------------------------------------------------------

    fn run(&mut self) -> Result<Id, CodecError> {
        loop {
            let at = self.pos;
            let Some(&op) = self.data.get(at) else {
                return Err(CodecError::Truncated(self.data.len()));
            };
            self.pos += 1;
            match op {
                0x80 => {
                    let version = self.read_u8()?;
                    if !(2..=5).contains(&version) {
                        return Err(CodecError::Protocol(version));
                    }
                }
                0x95 => {
                    // FRAME: only a length hint; the opcodes inside are read as usual.
                    self.read_len(8, false, at)?;
                }
                b'.' => {
                    let result = self.pop(at)?;
                    if self.pos < self.data.len() {
                        return Err(CodecError::TrailingData(self.pos));
                    }
                    return Ok(result);
                }
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    // POP removes a MARK if it is the topmost thing (CPython's load_pop).
                    if self.marks.last() == Some(&self.stack.len()) {
                        self.marks.pop();
                    } else {
                        self.pop(at)?;
                    }
                }
                b'1' => {
                    self.pop_mark(at)?;
                }
                b'2' => {
                    let id = self.top(at)?;
                    self.stack.push(id);
                }
                b'N' => self.push_new(Node::None)?,
                0x88 => self.push_new(Node::Bool(true))?,
                0x89 => self.push_new(Node::Bool(false))?,
                b'J' => {
                    let v = i32::from_le_bytes(self.take_array::<4>()?);
                    self.push_new(Node::Int(i64::from(v)))?;
                }
                b'K' => {
                    let v = self.read_u8()?;
                    self.push_new(Node::Int(i64::from(v)))?;
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.take_array::<2>()?);
                    self.push_new(Node::Int(i64::from(v)))?;
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        self.read_len(1, false, at)?
                    } else {
                        self.read_len(4, true, at)?
                    };
                    let raw = self.take(n)?;
                    let bytes = minimal_twos_complement(raw);
                    let node = match small_int(bytes) {
                        Some(v) => Node::Int(v),
                        None => Node::BigInt(Blob::Borrowed(bytes)),
                    };
                    self.push_new(node)?;
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take_array::<8>()?);
                    self.push_new(Node::Float(v))?;
                }
                0x8c | b'X' | 0x8d => {
                    let width = match op {
                        0x8c => 1,
                        b'X' => 4,
                        _ => 8,
                    };
                    let n = self.read_len(width, false, at)?;
                    let raw = self.take(n)?;
                    // CPython decodes with 'surrogatepass'; lone surrogates have no Rust `str` form.
                    let s = std::str::from_utf8(raw).map_err(|_| malformed(at, "string is not valid UTF-8"))?;
                    self.push_new(Node::Str(Text::Borrowed(s)))?;
                }
                b'C' | b'B' | 0x8e | 0x96 => {
                    let width = match op {
                        b'C' => 1,
                        b'B' => 4,
                        _ => 8,
                    };
                    let n = self.read_len(width, false, at)?;
                    let blob = Blob::Borrowed(self.take(n)?);
                    self.push_new(if op == 0x96 {
                        Node::ByteArray(blob)
                    } else {
                        Node::Bytes(blob)
                    })?;
                }
                b'U' | b'T' => {
                    // Python 2 `str`: Python 3 decodes it as text by default; keep it as bytes if it is not.
                    let n = if op == b'U' {
                        self.read_len(1, false, at)?
                    } else {
                        self.read_len(4, true, at)?
                    };
                    let raw = self.take(n)?;
                    let node = match std::str::from_utf8(raw) {
                        Ok(s) => Node::Str(Text::Borrowed(s)),
                        Err(_) => Node::Bytes(Blob::Borrowed(raw)),
                    };
                    self.push_new(node)?;
                }
                b')' => self.push_new(Node::Tuple(Vec::new()))?,
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = vec![0; n];
                    for slot in items.iter_mut().rev() {
                        *slot = self.pop(at)?;
                    }
                    self.push_new(Node::Tuple(items))?;
                }
                b't' => {
                    let items = self.pop_mark(at)?;
                    self.check_len(items.len())?;
                    self.push_new(Node::Tuple(items))?;
                }
                b']' => self.push_new(Node::List(Vec::new()))?,
                b'a' => {
                    let item = self.pop(at)?;
                    let target = self.top(at)?;
                    self.extend_list(target, vec![item], at)?;
                }
                b'e' => {
                    let items = self.pop_mark(at)?;
                    let target = self.top(at)?;
                    self.extend_list(target, items, at)?;
                }
                b'}' => self.push_new(Node::Dict(Vec::new()))?,
                b's' => {
                    let v = self.pop(at)?;
                    let k = self.pop(at)?;
                    let target = self.top(at)?;
                    self.dict_set(target, k, v, at)?;
                }
                b'u' => {
                    let items = self.pop_mark(at)?;
                    if items.len() % 2 != 0 {
                        return Err(malformed(at, "odd number of items for SETITEMS"));
                    }
                    let target = self.top(at)?;
                    for pair in items.chunks_exact(2) {
                        if let [k, v] = *pair {
                            self.dict_set(target, k, v, at)?;
                        }
                    }
                }
                0x8f => self.push_new(Node::Set(Vec::new()))?,
                0x90 => {
                    let items = self.pop_mark(at)?;
                    let target = self.top(at)?;
                    if !matches!(self.node(target)?, Node::Set(_)) {
                        return Err(malformed(at, "ADDITEMS target is not a set"));
                    }
                    for item in items {
                        self.set_add(target, item, at)?;
                    }
                }
                0x91 => {
                    let items = self.pop_mark(at)?;
                    let id = self.add(Node::FrozenSet(Vec::new()))?;
                    for item in items {
                        self.set_add(id, item, at)?;
                    }
                    self.stack.push(id);
                }
                b'c' => {
                    let module = self.read_line(at)?;
                    let name = self.read_line(at)?;
                    let node = Node::Global(Box::new((
                        normalize_module(Text::Borrowed(module)),
                        Text::Borrowed(name),
                    )));
                    self.push_new(node)?;
                }
                0x93 => {
                    let name = self.pop(at)?;
                    let module = self.pop(at)?;
                    let (Node::Str(module), Node::Str(name)) = (self.node(module)?, self.node(name)?) else {
                        return Err(malformed(at, "STACK_GLOBAL requires str"));
                    };
                    let node = Node::Global(Box::new((normalize_module(module.clone()), name.clone())));
                    self.push_new(node)?;
                }
                0x81 => {
                    let args = self.pop(at)?;
                    let class = self.pop(at)?;
                    self.new_object(class, ObjectKind::NewObj, args, Vec::new(), at)?;
                }
                0x92 => {
                    let kwargs = self.pop(at)?;
                    let args = self.pop(at)?;
                    let class = self.pop(at)?;
                    let Node::Dict(pairs) = self.node(kwargs)? else {
                        return Err(malformed(at, "NEWOBJ_EX kwargs is not a dict"));
                    };
                    let pairs = pairs.clone();
                    self.spend(pairs.len(), at)?;
                    self.new_object(class, ObjectKind::NewObj, args, pairs, at)?;
                }
                b'R' => {
                    let args = self.pop(at)?;
                    let callable = self.pop(at)?;
                    if let Some(id) = self.fold_reduce(callable, args, at)? {
                        self.stack.push(id);
                    } else {
                        self.new_object(callable, ObjectKind::Reduce, args, Vec::new(), at)?;
                    }
                }
                b'b' => {
                    let state = self.pop(at)?;
                    let target = self.top(at)?;
                    self.build_state(target, state, at)?;
                }
                0x94 => {
                    let index =
                        u32::try_from(self.memo.len()).map_err(|_| CodecError::MemoTooLarge(self.limits.max_memo))?;
                    self.memo_put(index, at)?;
                }
                b'q' => {
                    let index = u32::from(self.read_u8()?);
                    self.memo_put(index, at)?;
                }
                b'r' => {
                    let index = u32::from_le_bytes(self.take_array::<4>()?);
                    self.memo_put(index, at)?;
                }
                b'h' => {
                    let index = u32::from(self.read_u8()?);
                    self.memo_get(index, at)?;
                }
                b'j' => {
                    let index = u32::from_le_bytes(self.take_array::<4>()?);
                    self.memo_get(index, at)?;
                }
                _ => {
                    return Err(match unsupported_name(op) {
                        Some(name) => CodecError::Unsupported {
                            name,
                            opcode: op,
                            pos: at,
                        },
                        None => CodecError::UnknownOpcode { opcode: op, pos: at },
                    });
                }
            }
        }
    }

    /// APPEND/APPENDS: lists get the items, instances (list subclasses) get them as `list_items`.
    fn extend_list(&mut self, target: Id, items: Vec<Id>, at: usize) -> Result<(), CodecError> {
        let max = self.limits.max_container_len;
        let list = match self.node_mut(target)? {
            Node::List(list) => list,
            Node::Object(obj) => &mut obj.list_items,
            _ => return Err(malformed(at, "APPEND(S) target is neither a list nor an instance")),
        };
        if list.len().saturating_add(items.len()) > max {
            return Err(CodecError::ContainerTooLarge(max));
        }
        list.extend(items);
        Ok(())
    }

    /// NEWOBJ / NEWOBJ_EX / REDUCE: record the instance as data.
    fn new_object(
        &mut self,
        class: Id,
        kind: ObjectKind,
        args: Id,
        kwargs: Vec<(Id, Id)>,
        at: usize,
    ) -> Result<(), CodecError> {
        if !matches!(self.node(class)?, Node::Global(_) | Node::Object(_)) {
            return Err(malformed(at, "the class or callable is not a global reference"));
        }
        let Node::Tuple(items) = self.node(args)? else {
            return Err(malformed(at, "the argument list is not a tuple"));
        };
        self.check_len(items.len())?;
        self.check_len(kwargs.len())?;
        let obj = ObjNode {
            class,
            kind,
            args,
            kwargs,
            state: None,
            list_items: Vec::new(),
            dict_items: Vec::new(),
        };
        self.push_new(Node::Object(Box::new(obj)))
    }

    /// REDUCE of a few builtins that CPython uses to write plain data in protocols 2 and 3. Returns
    /// the new data node, or `None` to keep the reduction as an opaque [`Object`].
    fn fold_reduce(&mut self, callable: Id, args: Id, at: usize) -> Result<Option<Id>, CodecError> {
        let (module, name) = match self.node(callable)? {
            Node::Global(g) => (g.0.clone(), g.1.clone()),
            _ => return Ok(None),
        };
        let Node::Tuple(items) = self.node(args)? else {
            return Ok(None);
        };
        let arity = items.len();
        let (a0, a1) = (items.first().copied(), items.get(1).copied());
        let arg = |i: Option<Id>| i.and_then(|id| self.nodes.get(id as usize));
        let (module, name) = (&*module, &*name);
        let node = match (module, name, arity) {
            ("builtins", "getattr", 2) => {
                // getattr(Global(m, q), "name") is how protocols 2/3 write the nested qualname m.q.name.
                let (Some(Node::Global(owner)), Some(Node::Str(attr))) = (arg(a0), arg(a1)) else {
                    return Ok(None);
                };
                let qualname = format!("{}.{}", &*owner.1, &**attr);
                let module = owner.0.clone();
                self.spend(qualname.len(), at)?;
                Node::Global(Box::new((module, Text::Shared(Rc::from(qualname)))))
            }
            ("builtins", "set" | "frozenset", 0) => {
                if name == "set" {
                    Node::Set(Vec::new())
                } else {
                    Node::FrozenSet(Vec::new())
                }
            }
            ("builtins", "set" | "frozenset", 1) => {
                let (Some(Node::List(members)) | Some(Node::Tuple(members))) = arg(a0) else {
                    return Ok(None);
                };
                let members = members.clone();
                let frozen = name == "frozenset";
                self.spend(members.len(), at)?;
                let id = self.add(if frozen {
                    Node::FrozenSet(Vec::new())
                } else {
                    Node::Set(Vec::new())
                })?;
                for m in members {
                    self.set_add(id, m, at)?;
                }
                return Ok(Some(id));
            }
            ("builtins", "bytearray", 0) => Node::ByteArray(Blob::Borrowed(&[])),
            ("builtins", "bytes", 0) => Node::Bytes(Blob::Borrowed(&[])),
            ("builtins", "bytearray", 1) => match arg(a0) {
                Some(Node::Bytes(b) | Node::ByteArray(b)) => Node::ByteArray(b.clone()),
                _ => return Ok(None),
            },
            ("builtins", "bytearray", 2) | ("_codecs", "encode", 2) => {
                // `_codecs.encode(s, 'latin1')` is protocol 2's bytes; Python 2 wrote bytearray(s, 'latin-1').
                let (Some(Node::Str(text)), Some(Node::Str(encoding))) = (arg(a0), arg(a1)) else {
                    return Ok(None);
                };
                if !matches!(&**encoding, "latin1" | "latin-1" | "iso-8859-1" | "iso8859-1") {
                    return Ok(None);
                }
                let mut out = Vec::new();
                for c in text.chars() {
                    let b =
                        u8::try_from(u32::from(c)).map_err(|_| malformed(at, "latin-1 cannot encode a character"))?;
                    out.push(b);
                }
                let blob = Blob::Shared(Rc::from(out));
                self.spend(blob.len(), at)?;
                if module == "builtins" {
                    Node::ByteArray(blob)
                } else {
                    Node::Bytes(blob)
                }
            }
            _ => return Ok(None),
        };
        self.add(node).map(Some)
    }

    /// BUILD: set the instance state. A second BUILD with dict states merges them, as Python would.
    fn build_state(&mut self, target: Id, state: Id, at: usize) -> Result<(), CodecError> {
        let Node::Object(obj) = self.node(target)? else {
            return Err(malformed(at, "BUILD target is not an instance"));
        };
        let merged = match obj.state {
            None => state,
            Some(old) => match (self.node(old)?, self.node(state)?) {
                (Node::None, _) => state,
                (Node::Dict(a), Node::Dict(b)) => {
                    let (a, b) = (a.clone(), b.clone());
                    self.spend(a.len() + b.len(), at)?;
                    let id = self.add(Node::Dict(Vec::new()))?;
                    for (k, v) in a.into_iter().chain(b) {
                        self.dict_set(id, k, v, at)?;
                    }
                    id
                }
                _ => return Err(malformed(at, "BUILD applied twice with non-dict state")),
            },
        };
        if let Node::Object(obj) = self.node_mut(target)? {
            obj.state = Some(merged);
        }
        Ok(())
    }
}
