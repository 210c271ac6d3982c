//! Encoder tests: byte layout of the protocol-4 subset, CPython-style batching, every `Value` variant
//! surviving encode → decode, and CPython loading what we write.

use std::process::Command;

use procman::codec::{decode, encode, Limits, Object, ObjectKind, Value};

fn round_trip(v: &Value) -> Value {
    decode(&encode(v), &Limits::default()).unwrap_or_else(|e| panic!("{e} for {v:?}"))
}

/// The opcodes of a pickle written by our encoder, skipping their arguments.
fn opcodes(pickle: &[u8]) -> Vec<u8> {
    let mut ops = Vec::new();
    let mut i = 0;
    let len_at = |at: usize, width: usize| -> usize {
        let mut buf = [0u8; 8];
        buf[..width].copy_from_slice(&pickle[at..at + width]);
        u64::from_le_bytes(buf) as usize
    };
    while i < pickle.len() {
        let op = pickle[i];
        ops.push(op);
        i += 1 + match op {
            0x80 | b'K' => 1,
            b'M' => 2,
            b'J' => 4,
            b'G' => 8,
            0x8a | 0x8c | b'C' => 1 + len_at(i + 1, 1),
            b'X' | b'B' => 4 + len_at(i + 1, 4),
            0x96 | 0x8d | 0x8e => 8 + len_at(i + 1, 8),
            _ => 0,
        };
    }
    ops
}

fn count(pickle: &[u8], opcode: u8) -> usize {
    opcodes(pickle).into_iter().filter(|&op| op == opcode).count()
}

fn object(kind: ObjectKind) -> Object {
    Object {
        class: Value::global("egse.test", "Thing"),
        kind,
        args: vec![],
        kwargs: vec![],
        state: None,
        list_items: vec![],
        dict_items: vec![],
    }
}

#[test]
fn header_and_trailer() {
    let bytes = encode(&Value::None);
    assert_eq!(bytes, b"\x80\x04N.");
}

#[test]
fn large_containers_are_batched_like_cpython() {
    let list = Value::List((0..2500).map(Value::Int).collect());
    let bytes = encode(&list);
    assert_eq!(count(&bytes, b'e'), 3, "APPENDS per 1000 items");
    assert_eq!(round_trip(&list), list);

    let dict = Value::Dict((0..2001).map(|i| (Value::Int(i + 100_000), Value::None)).collect());
    let bytes = encode(&dict);
    assert_eq!(count(&bytes, b'u'), 2, "SETITEMS per 1000 pairs");
    assert_eq!(count(&bytes, b's'), 1, "a batch of one is a SETITEM");
    assert_eq!(round_trip(&dict), dict);

    let set = Value::Set((0..1500).map(|i| Value::Int(i + 100_000)).collect());
    assert_eq!(count(&encode(&set), 0x90), 2, "ADDITEMS per 1000 items");
    assert_eq!(round_trip(&set), set);
}

#[test]
fn sizes_that_need_the_wide_opcodes() {
    let long = Value::str("é".repeat(200)); // 400 UTF-8 bytes: BINUNICODE
    assert_eq!(encode(&long).get(2), Some(&b'X'));
    assert_eq!(round_trip(&long), long);
    let bytes = Value::Bytes(vec![7; 300]);
    assert_eq!(encode(&bytes).get(2), Some(&b'B'));
    assert_eq!(round_trip(&bytes), bytes);
    // A 300-byte integer needs LONG4.
    let mut big = vec![0x55u8; 300];
    big.push(0x01);
    let big = Value::BigInt(big);
    assert_eq!(encode(&big).get(2), Some(&0x8b));
    assert_eq!(round_trip(&big), big);
    let uuid = Value::from(0x0ff7_1718_e98d_11f1_bc67_119e_bbe3_5941u128);
    assert_eq!(round_trip(&uuid), uuid);
}

#[test]
fn every_variant_round_trips() {
    let mut newobj = object(ObjectKind::NewObj);
    newobj.args = vec![Value::Int(1)];
    newobj.kwargs = vec![(Value::str("b"), Value::Int(2))];
    newobj.list_items = vec![Value::str("appended")];
    newobj.dict_items = vec![(Value::str("item"), Value::Float(1.5))];
    newobj.state = Some(Value::dict([("a", Value::Int(1))]));
    let mut reduce = object(ObjectKind::Reduce);
    reduce.args = vec![Value::str("boom"), Value::Object(Box::new(newobj.clone()))];
    let value = Value::Tuple(vec![
        Value::None,
        Value::Bool(true),
        Value::Bool(false),
        Value::Int(i64::MIN),
        Value::Int(i64::MAX),
        Value::Int(-129),
        Value::Float(-0.0),
        Value::Float(f64::INFINITY),
        Value::str(""),
        Value::Bytes(vec![]),
        Value::ByteArray(b"\x00\xff".to_vec()),
        Value::List(vec![]),
        Value::Tuple(vec![]),
        Value::Tuple(vec![Value::Int(1)]),
        Value::Tuple(vec![Value::Int(1), Value::Int(2), Value::Int(3), Value::Int(4)]),
        Value::Dict(vec![]),
        Value::Set(vec![]),
        Value::FrozenSet(vec![Value::str("x")]),
        Value::FrozenSet(vec![]),
        Value::global("egse.protocol", "CommandProtocol.handle_device_method"),
        Value::Object(Box::new(newobj)),
        Value::Object(Box::new(reduce)),
        Value::Object(Box::new(Object {
            state: Some(Value::None),
            ..object(ObjectKind::NewObj)
        })),
    ]);
    assert_eq!(round_trip(&value), value);
}

/// Random canonical values (what the decoder can produce) survive encode → decode.
#[test]
fn random_values_round_trip() {
    /// SplitMix64 plus a serial number that makes every dict key and set member unique (the decoder
    /// de-duplicates equal keys, so duplicates would not be canonical).
    struct Gen(u64, i64);
    impl Gen {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn fresh_key(&mut self) -> Value {
            self.1 += 1;
            if self.below(2) == 0 {
                Value::Int(self.1)
            } else {
                Value::Str(format!("k{}", self.1))
            }
        }
        fn value(&mut self, depth: u32) -> Value {
            let leaf = depth == 0 || self.below(3) == 0;
            let pick = if leaf { self.below(8) } else { 8 + self.below(7) };
            let n = self.below(5) as usize;
            match pick {
                0 => Value::None,
                1 => Value::Bool(self.below(2) == 0),
                2 => Value::Int(self.next() as i64 >> self.below(64)),
                3 => Value::from((self.next() as u128) << 64 | u128::from(self.next())),
                4 => Value::Float((self.next() as i64 as f64) / 7.0),
                5 => Value::Str(
                    (0..self.below(300))
                        .map(|_| char::from_u32(32 + self.below(0x3000) as u32).unwrap_or('?'))
                        .collect(),
                ),
                6 => Value::Bytes((0..self.below(300)).map(|_| self.next() as u8).collect()),
                7 => Value::global("egse.mod", format!("Cls.m{}", self.below(9))),
                8 => Value::List((0..n).map(|_| self.value(depth - 1)).collect()),
                9 => Value::Tuple((0..n).map(|_| self.value(depth - 1)).collect()),
                10 => Value::Dict((0..n).map(|_| (self.fresh_key(), self.value(depth - 1))).collect()),
                11 => Value::Set((0..n).map(|_| self.fresh_key()).collect()),
                12 => Value::ByteArray((0..n).map(|_| self.next() as u8).collect()),
                _ => {
                    let kind = if self.below(2) == 0 {
                        ObjectKind::NewObj
                    } else {
                        ObjectKind::Reduce
                    };
                    let mut o = object(kind);
                    o.args = (0..n).map(|_| self.value(depth - 1)).collect();
                    if kind == ObjectKind::NewObj && self.below(3) == 0 {
                        o.kwargs = vec![(self.fresh_key(), self.value(depth - 1))];
                    }
                    if self.below(2) == 0 {
                        o.state = Some(Value::Dict(vec![(self.fresh_key(), self.value(depth - 1))]));
                    }
                    if self.below(4) == 0 {
                        o.list_items = vec![self.value(depth - 1)];
                    }
                    if self.below(4) == 0 {
                        o.dict_items = vec![(self.fresh_key(), self.value(depth - 1))];
                    }
                    Value::Object(Box::new(o))
                }
            }
        }
    }
    let mut g = Gen(42, 0);
    for _ in 0..2000 {
        let v = g.value(5);
        assert_eq!(round_trip(&v), v);
    }
}

/// CPython reads our bytes for plain data exactly (skipped without `python3`).
#[test]
fn cpython_loads_plain_values() {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("python3 not available; skipping");
        return;
    }
    let value = Value::Tuple(vec![
        Value::Set(vec![Value::Int(1), Value::Int(2)]),
        Value::FrozenSet(vec![Value::str("a")]),
        Value::ByteArray(b"xy".to_vec()),
        Value::from(1u128 << 70),
        Value::BigInt(vec![0, 0, 0, 0, 0, 0, 0, 0, 0xc0]),
        Value::Int(-2),
        Value::Float(0.1),
        Value::str("x".repeat(300)),
        Value::Bytes(vec![0, 255]),
        Value::List((0..1001).map(Value::Int).collect()),
        Value::dict([("k", Value::None)]),
        Value::global("builtins", "ValueError"),
        Value::reduce("builtins", "ValueError", vec![Value::str("bad")], None),
    ]);
    let hex: String = encode(&value).iter().map(|b| format!("{b:02x}")).collect();
    let script = r#"
import pickle, sys
v = pickle.loads(bytes.fromhex(sys.argv[1]))
want = ({1, 2}, frozenset({'a'}), bytearray(b'xy'), 2**70, -2**70, -2, 0.1, 'x' * 300, b'\x00\xff',
        list(range(1001)), {'k': None}, ValueError)
assert v[:-1] == want, v
assert type(v[-1]) is ValueError and v[-1].args == ('bad',)
print('ok')
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(hex)
        .output()
        .expect("python3");
    assert!(
        out.status.success() && out.stdout.starts_with(b"ok"),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
