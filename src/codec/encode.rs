//! Pickle encoder (protocol 4).
//!
//! Writes the minimal opcode subset that the real CGSE clients were validated
//! against: `PROTO 4`, no FRAME (optional for the reader) and no memo, so an object referenced twice
//! is written twice. Batches of 1000 items per APPENDS/SETITEMS/ADDITEMS mirror CPython, which keeps
//! the reader's stack small. `bytearray` uses BYTEARRAY8 (a protocol 5 opcode that every Python ≥ 3.8
//! reads whatever the declared protocol; CGSE requires ≥ 3.10).
use super::{Object, ObjectKind, Value};

/// CPython's `_BATCHSIZE`.
const BATCH: usize = 1000;

/// Encode a value as a protocol-4 pickle.
///
/// The keyword arguments of a [`ObjectKind::Reduce`] object cannot be expressed by REDUCE and are not
/// written; the decoder never produces them.
pub fn encode(value: &Value) -> Vec<u8> {
    let mut w = PickleWriter::new();
    w.value(value);
    w.finish()
}

/// Writes one pickle straight from the caller's data, without a [`Value`] tree: for replies on a hot path
/// (`list_processes` of a hundred records), where building the tree costs more than the encoding itself.
///
/// The caller writes exactly one value (a container counts as one); [`PickleWriter::finish`] ends the pickle.
/// The bytes are the ones [`encode`] writes for the equivalent tree, except that a batch of one item keeps
/// its MARK (`( x e` rather than `x a`), which every unpickler reads the same.
pub struct PickleWriter {
    out: Vec<u8>,
}

impl Default for PickleWriter {
    fn default() -> Self {
        PickleWriter::new()
    }
}

impl PickleWriter {
    /// A pickle with its protocol header written.
    pub fn new() -> PickleWriter {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(&[0x80, 0x04]);
        PickleWriter { out }
    }

    /// The finished pickle.
    pub fn finish(mut self) -> Vec<u8> {
        self.out.push(b'.');
        self.out
    }

    /// `None`.
    pub fn none(&mut self) {
        self.out.push(b'N');
    }

    /// `True` or `False`.
    pub fn bool(&mut self, b: bool) {
        self.out.push(if b { 0x88 } else { 0x89 });
    }

    /// An `int`.
    pub fn int(&mut self, i: i64) {
        write_int(&mut self.out, i);
    }

    /// A `float`.
    pub fn float(&mut self, f: f64) {
        self.out.push(b'G');
        self.out.extend_from_slice(&f.to_be_bytes());
    }

    /// A `str`.
    pub fn str(&mut self, s: &str) {
        write_str(&mut self.out, s);
    }

    /// Any value given as a tree.
    pub fn value(&mut self, v: &Value) {
        write(&mut self.out, v);
    }

    /// A `list` of `items`, each written by `item`, which writes exactly one value.
    pub fn list<T>(&mut self, items: impl IntoIterator<Item = T>, mut item: impl FnMut(&mut PickleWriter, T)) {
        self.out.push(b']');
        let mut n = 0usize;
        for x in items {
            if n.is_multiple_of(BATCH) {
                if n > 0 {
                    self.out.push(b'e');
                }
                self.out.push(b'(');
            }
            item(self, x);
            n += 1;
        }
        if n > 0 {
            self.out.push(b'e');
        }
    }

    /// A `dict`, its entries written by `entries` through [`DictWriter::key`].
    pub fn dict(&mut self, entries: impl FnOnce(&mut DictWriter<'_>)) {
        self.out.push(b'}');
        let mut d = DictWriter { w: self, n: 0 };
        entries(&mut d);
        if d.n > 0 {
            d.w.out.push(b'u');
        }
    }
}

/// The entries of a dict being written by [`PickleWriter::dict`].
pub struct DictWriter<'a> {
    w: &'a mut PickleWriter,
    n: usize,
}

impl DictWriter<'_> {
    /// Writes a `str` key and returns the writer for its value, which the caller must write (one value).
    pub fn key(&mut self, k: &str) -> &mut PickleWriter {
        if self.n.is_multiple_of(BATCH) {
            if self.n > 0 {
                self.w.out.push(b'u');
            }
            self.w.out.push(b'(');
        }
        self.n += 1;
        self.w.str(k);
        self.w
    }
}

fn write(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::None => out.push(b'N'),
        Value::Bool(true) => out.push(0x88),
        Value::Bool(false) => out.push(0x89),
        Value::Int(i) => write_int(out, *i),
        Value::BigInt(bytes) => write_long(out, bytes),
        Value::Float(f) => {
            out.push(b'G');
            out.extend_from_slice(&f.to_be_bytes());
        }
        Value::Str(s) => write_str(out, s),
        Value::Bytes(b) => write_sized(out, b, b'C', b'B', 0x8e),
        Value::ByteArray(b) => {
            out.push(0x96);
            out.extend_from_slice(&(b.len() as u64).to_le_bytes());
            out.extend_from_slice(b);
        }
        Value::Tuple(items) => write_tuple(out, items),
        Value::List(items) => {
            out.push(b']');
            write_appends(out, items);
        }
        Value::Dict(pairs) => {
            out.push(b'}');
            write_setitems(out, pairs);
        }
        Value::Set(items) => {
            out.push(0x8f);
            for batch in items.chunks(BATCH) {
                out.push(b'(');
                batch.iter().for_each(|v| write(out, v));
                out.push(0x90);
            }
        }
        Value::FrozenSet(items) => {
            out.push(b'(');
            items.iter().for_each(|v| write(out, v));
            out.push(0x91);
        }
        Value::Global { module, qualname } => {
            write_str(out, module);
            write_str(out, qualname);
            out.push(0x93);
        }
        Value::Object(obj) => write_object(out, obj),
    }
}

/// The smallest of BININT1, BININT2, BININT, LONG1, like `pickle.Pickler.save_long`.
fn write_int(out: &mut Vec<u8>, i: i64) {
    if let Ok(v) = u8::try_from(i) {
        out.extend_from_slice(&[b'K', v]);
    } else if let Ok(v) = u16::try_from(i) {
        out.push(b'M');
        out.extend_from_slice(&v.to_le_bytes());
    } else if let Ok(v) = i32::try_from(i) {
        out.push(b'J');
        out.extend_from_slice(&v.to_le_bytes());
    } else {
        let bytes = i.to_le_bytes();
        let mut len = bytes.len();
        // Drop sign-extension bytes that the next lower byte's top bit already implies.
        while len > 1 {
            let (last, prev) = (bytes.get(len - 1), bytes.get(len - 2));
            match (last, prev) {
                (Some(0x00), Some(p)) if p & 0x80 == 0 => len -= 1,
                (Some(0xff), Some(p)) if p & 0x80 != 0 => len -= 1,
                _ => break,
            }
        }
        write_long(out, bytes.get(..len).unwrap_or(&bytes));
    }
}

fn write_long(out: &mut Vec<u8>, bytes: &[u8]) {
    if let Ok(n) = u8::try_from(bytes.len()) {
        out.extend_from_slice(&[0x8a, n]);
    } else {
        out.push(0x8b);
        // A pickle cannot hold more than i32::MAX bytes of one integer; nothing we build comes close.
        let n = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
        out.extend_from_slice(&n.to_le_bytes());
    }
    out.extend_from_slice(bytes);
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    write_sized(out, s.as_bytes(), 0x8c, b'X', 0x8d);
}

/// A payload with a 1-, 4- or 8-byte length, whichever is the smallest that fits.
fn write_sized(out: &mut Vec<u8>, payload: &[u8], op1: u8, op4: u8, op8: u8) {
    if let Ok(n) = u8::try_from(payload.len()) {
        out.extend_from_slice(&[op1, n]);
    } else if let Ok(n) = u32::try_from(payload.len()) {
        out.push(op4);
        out.extend_from_slice(&n.to_le_bytes());
    } else {
        out.push(op8);
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    }
    out.extend_from_slice(payload);
}

fn write_tuple(out: &mut Vec<u8>, items: &[Value]) {
    match items.len() {
        0 => out.push(b')'),
        1..=3 => {
            items.iter().for_each(|v| write(out, v));
            out.push(0x84 + items.len() as u8);
        }
        _ => {
            out.push(b'(');
            items.iter().for_each(|v| write(out, v));
            out.push(b't');
        }
    }
}

/// Items for the list (or list subclass) on top of the stack; a batch of one is a plain APPEND.
fn write_appends(out: &mut Vec<u8>, items: &[Value]) {
    for batch in items.chunks(BATCH) {
        if let [single] = batch {
            write(out, single);
            out.push(b'a');
        } else {
            out.push(b'(');
            batch.iter().for_each(|v| write(out, v));
            out.push(b'e');
        }
    }
}

/// Items for the dict (or dict subclass) on top of the stack; a batch of one is a plain SETITEM.
fn write_setitems(out: &mut Vec<u8>, pairs: &[(Value, Value)]) {
    for batch in pairs.chunks(BATCH) {
        if let [(k, v)] = batch {
            write(out, k);
            write(out, v);
            out.push(b's');
        } else {
            out.push(b'(');
            for (k, v) in batch {
                write(out, k);
                write(out, v);
            }
            out.push(b'u');
        }
    }
}

/// `class, args, NEWOBJ|NEWOBJ_EX|REDUCE`, then list items, dict items and `state BUILD`, in the order
/// of CPython's `save_reduce`.
fn write_object(out: &mut Vec<u8>, obj: &Object) {
    write(out, &obj.class);
    write_tuple(out, &obj.args);
    match obj.kind {
        ObjectKind::NewObj if obj.kwargs.is_empty() => out.push(0x81),
        ObjectKind::NewObj => {
            out.push(b'}');
            write_setitems(out, &obj.kwargs);
            out.push(0x92);
        }
        ObjectKind::Reduce => out.push(b'R'),
    }
    write_appends(out, &obj.list_items);
    write_setitems(out, &obj.dict_items);
    if let Some(state) = &obj.state {
        write(out, state);
        out.push(b'b');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn the_writer_and_the_tree_give_the_same_value() {
        let tree = Value::dict([
            ("id", Value::str("DUMMY_01")),
            ("pid", Value::None),
            ("ok", Value::Bool(true)),
            ("n", Value::Int(-70_000)),
            ("t", Value::Float(1.5)),
            ("empty", Value::Dict(vec![])),
            ("argv", Value::List((0..2500).map(Value::Int).collect())),
            ("none", Value::List(vec![])),
        ]);
        let mut w = PickleWriter::new();
        w.dict(|d| {
            d.key("id").str("DUMMY_01");
            d.key("pid").none();
            d.key("ok").bool(true);
            d.key("n").int(-70_000);
            d.key("t").float(1.5);
            d.key("empty").dict(|_| {});
            d.key("argv").list(0..2500, |w, i| w.int(i));
            d.key("none").list(std::iter::empty::<i64>(), |w, i| w.int(i));
        });
        let bytes = w.finish();
        let back = crate::codec::decode(&bytes, &crate::codec::Limits::default()).expect("decodes");
        assert_eq!(back, tree);
    }

    #[test]
    fn a_writer_dict_of_more_than_one_batch_decodes_whole() {
        let keys: Vec<String> = (0..2001).map(|i| format!("k{i}")).collect();
        let mut w = PickleWriter::new();
        w.dict(|d| keys.iter().enumerate().for_each(|(i, k)| d.key(k).int(i as i64)));
        let back = crate::codec::decode(&w.finish(), &crate::codec::Limits::default()).expect("decodes");
        let want = Value::Dict(
            keys.iter()
                .enumerate()
                .map(|(i, k)| (Value::str(k), Value::Int(i as i64)))
                .collect(),
        );
        assert_eq!(back, want);
    }

    #[test]
    fn scalars_match_cpython_bytes() {
        // Bytes as CPython writes them (frame-free forms).
        assert_eq!(hex(&encode(&Value::None)), "80044e2e");
        assert_eq!(hex(&encode(&Value::Int(42))), "80044b2a2e");
        assert_eq!(hex(&encode(&Value::Int(6120))), "80044de8172e");
        assert_eq!(hex(&encode(&Value::Float(250.0))), "800447406f4000000000002e");
        assert_eq!(hex(&encode(&Value::str("Pong"))), "80048c04506f6e672e");
        assert_eq!(
            hex(&encode(&Value::Tuple(vec![Value::str("ACK")]))),
            "80048c0341434b852e"
        );
        // python3 -c 'import pickle; print(pickle.dumps(x, 4).hex())' for x in -1, 2**40, -2**40,
        // -2**63, 2**31 (FRAME removed).
        assert_eq!(hex(&encode(&Value::Int(-1))), "80044affffffff2e");
        assert_eq!(hex(&encode(&Value::Int(1 << 40))), "80048a060000000000012e");
        assert_eq!(hex(&encode(&Value::Int(-(1 << 40)))), "80048a060000000000ff2e");
        assert_eq!(hex(&encode(&Value::Int(i64::MIN))), "80048a0800000000000000802e");
        assert_eq!(hex(&encode(&Value::Int(1 << 31))), "80048a0500000080002e");
    }
}
