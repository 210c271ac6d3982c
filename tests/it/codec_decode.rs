//! Decoder unit tests, one opcode family at a time. Pickles written by CPython 3.11 are embedded as
//! hex together with the expression that made them (`python3 -c 'import pickle, sys;
//! sys.stdout.buffer.write(pickle.dumps(EXPR, PROTO))'`); classes such as `egse.protocol.Point` came
//! from a throw-away module of that name.

use procman::codec::{decode, describe, encode, CodecError, Limits, Object, ObjectKind, Value};

fn unhex(s: &str) -> Vec<u8> {
    let clean: Vec<u8> = s.bytes().filter(|b| b.is_ascii_hexdigit()).collect();
    clean
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).expect("ascii"), 16).expect("hex"))
        .collect()
}

fn dec(bytes: &[u8]) -> Result<Value, CodecError> {
    decode(bytes, &Limits::default())
}

fn dec_hex(hex: &str) -> Value {
    dec(&unhex(hex)).unwrap_or_else(|e| panic!("decode failed: {e}"))
}

fn s(text: &str) -> Value {
    Value::str(text)
}

fn obj(value: &Value) -> &Object {
    value.as_object().unwrap_or_else(|| panic!("not an object: {value:?}"))
}

fn is_malformed(r: &Result<Value, CodecError>) -> bool {
    matches!(r, Err(CodecError::Malformed { .. }))
}

// --- scalars ---------------------------------------------------------------------------------------

#[test]
fn scalars_from_protocol_md_examples() {
    assert_eq!(
        dec_hex("80 04 95 08 00 00 00 00 00 00 00 8c 04 50 69 6e 67 94 2e"),
        s("Ping")
    );
    assert_eq!(
        dec_hex("80 04 95 04 00 00 00 00 00 00 00 4d e8 17 2e"),
        Value::Int(6120)
    );
    assert_eq!(dec_hex("80 04 4e 2e"), Value::None);
    assert_eq!(dec_hex("80 04 4b 2a 2e"), Value::Int(42));
    assert_eq!(
        dec_hex("80 04 95 0a 00 00 00 00 00 00 00 47 40 6f 40 00 00 00 00 00 2e"),
        Value::Float(250.0)
    );
    assert_eq!(
        dec_hex("80 04 95 09 00 00 00 00 00 00 00 8c 03 41 43 4b 94 85 94 2e"),
        Value::Tuple(vec![s("ACK")])
    );
    assert_eq!(
        dec_hex("80 04 95 11 00 00 00 00 00 00 00 7d 94 8c 03 63 6d 64 94 8c 04 50 69 6e 67 94 73 2e"),
        Value::dict([("cmd", s("Ping"))])
    );
    assert_eq!(dec(b"\x80\x04\x88."), Ok(Value::Bool(true)));
    assert_eq!(dec(b"\x80\x04\x89."), Ok(Value::Bool(false)));
}

#[test]
fn integers_of_every_width() {
    // pickle.dumps([2**70, -2**70, 2**63, -2**63-1, 2**31, -2**31, 65535, 65536, -1], 2)
    let v = dec_hex(
        "80025d7100288a090000000000000000408a090000000000000000c08a090000000000000080008a09ffffffffffffff7fff\
         8a0500000080004a000000804dffff4a000001004affffffff652e",
    );
    let want = Value::List(vec![
        Value::from(1u128 << 70),
        Value::BigInt(vec![0, 0, 0, 0, 0, 0, 0, 0, 0xc0]),
        Value::from(1u128 << 63),
        Value::BigInt(vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 0xff]),
        Value::Int(1 << 31),
        Value::Int(-(1 << 31)),
        Value::Int(65535),
        Value::Int(65536),
        Value::Int(-1),
    ]);
    assert_eq!(v, want);
    assert_eq!(
        describe(&v.clone()).lines().nth(1).map(str::trim),
        Some("1180591620717411303424,")
    );
    // Non-minimal LONG1/LONG4 payloads (hand-made) still give the canonical value.
    assert_eq!(dec(b"\x80\x04\x8a\x03\x01\x00\x00."), Ok(Value::Int(1)));
    assert_eq!(dec(b"\x80\x04\x8a\x00."), Ok(Value::Int(0)));
    assert_eq!(dec(b"\x80\x04\x8b\x02\x00\x00\x00\xff\xff."), Ok(Value::Int(-1)));
    assert!(
        is_malformed(&dec(b"\x80\x04\x8b\xff\xff\xff\xff.")),
        "negative LONG4 length"
    );
}

#[test]
fn strings_and_bytes_of_every_width() {
    // pickle.dumps('x' * 300, 4) uses BINUNICODE
    let mut p = unhex("8004953301000000000000582c010000");
    p.extend(std::iter::repeat_n(b'x', 300));
    p.extend(unhex("942e"));
    assert_eq!(dec(&p), Ok(s(&"x".repeat(300))));
    assert_eq!(
        dec(b"\x80\x04\x8d\x02\x00\x00\x00\x00\x00\x00\x00hi."),
        Ok(s("hi")),
        "BINUNICODE8"
    );
    assert_eq!(
        dec(b"\x80\x04C\x02\x00\xff."),
        Ok(Value::Bytes(vec![0, 0xff])),
        "SHORT_BINBYTES"
    );
    assert_eq!(
        dec(b"\x80\x04B\x01\x00\x00\x00z."),
        Ok(Value::Bytes(b"z".to_vec())),
        "BINBYTES"
    );
    assert_eq!(
        dec(b"\x80\x04\x8e\x01\x00\x00\x00\x00\x00\x00\x00z."),
        Ok(Value::Bytes(b"z".to_vec())),
        "BINBYTES8"
    );
    // pickle.dumps(bytearray(b'xy'), 5)
    assert_eq!(
        dec_hex("8005950d000000000000009602000000000000007879942e"),
        Value::ByteArray(b"xy".to_vec())
    );
    // Python 2 str opcodes: text if UTF-8, else bytes.
    assert_eq!(dec(b"\x80\x02U\x03abcq\x00."), Ok(s("abc")));
    assert_eq!(dec(b"\x80\x02U\x02\xff\xfe."), Ok(Value::Bytes(vec![0xff, 0xfe])));
    assert_eq!(dec(b"\x80\x02T\x02\x00\x00\x00\xc3\xa9."), Ok(s("é")));
    assert!(
        is_malformed(&dec(b"\x80\x02T\xff\xff\xff\xff.")),
        "negative BINSTRING length"
    );
    assert!(
        is_malformed(&dec(b"\x80\x04\x8c\x02\xc3(.")),
        "invalid UTF-8 in SHORT_BINUNICODE"
    );
}

// --- containers ------------------------------------------------------------------------------------

#[test]
fn protocol_2_and_3_plain_data() {
    let want = Value::dict([
        (
            "a",
            Value::List(vec![
                Value::Int(1),
                Value::Float(2.5),
                Value::None,
                Value::Bool(true),
                Value::Bool(false),
            ]),
        ),
        ("b", Value::Tuple(vec![Value::Bytes(b"x".to_vec()), s("é")])),
    ]);
    // pickle.dumps({'a': [1, 2.5, None, True, False], 'b': (b'x', 'é')}, 3)
    let p3 = "80037d71002858010000006171015d7102284b014740040000000000004e888965580100000062710343017871045802000000c3a97105867106752e";
    assert_eq!(dec_hex(p3), want);
    // the same at protocol 2: bytes become _codecs.encode('x', 'latin1')
    let p2 =
        "80027d71002858010000006171015d7102284b014740040000000000004e8889655801000000627103635f636f646563730a656e636f\
              64650a7104580100000078710558060000006c6174696e3171068671075271085802000000c3a9710986710a752e";
    assert_eq!(dec_hex(p2), want);
}

#[test]
fn sets_frozensets_and_bytearrays_in_every_protocol() {
    let set12 = Value::Set(vec![Value::Int(1), Value::Int(2)]);
    // pickle.dumps({1, 2}, 2) / (…, 3) / (…, 4)
    assert_eq!(
        dec_hex("8002635f5f6275696c74696e5f5f0a7365740a71005d7101284b014b02658571025271032e"),
        set12
    );
    assert_eq!(
        dec_hex("8003636275696c74696e730a7365740a71005d7101284b014b02658571025271032e"),
        set12
    );
    assert_eq!(dec_hex("80049509000000000000008f94284b014b02902e"), set12);
    // pickle.dumps(set(), 4), pickle.dumps(set(), 2)
    assert_eq!(dec_hex("80048f942e"), Value::Set(vec![]));
    assert_eq!(
        dec_hex("8002635f5f6275696c74696e5f5f0a7365740a71005d71018571025271032e"),
        Value::Set(vec![])
    );
    // pickle.dumps(frozenset({3}), 3) / (…, 4); pickle.dumps(frozenset(), 4)
    let fs3 = Value::FrozenSet(vec![Value::Int(3)]);
    assert_eq!(
        dec_hex("8003636275696c74696e730a66726f7a656e7365740a71005d71014b03618571025271032e"),
        fs3
    );
    assert_eq!(dec_hex("8004950600000000000000284b0391942e"), fs3);
    assert_eq!(dec_hex("80049504000000000000002891942e"), Value::FrozenSet(vec![]));
    // pickle.dumps(bytearray(b'xy'), 2) / (…, 3) / (…, 4); pickle.dumps(bytearray(), 2)
    let ba = Value::ByteArray(b"xy".to_vec());
    assert_eq!(
        dec_hex(
            "8002635f5f6275696c74696e5f5f0a6279746561727261790a7100635f636f646563730a656e636f64650a71015802000000787971\
             0258060000006c6174696e3171038671045271058571065271072e"
        ),
        ba
    );
    assert_eq!(
        dec_hex("8003636275696c74696e730a6279746561727261790a71004302787971018571025271032e"),
        ba
    );
    assert_eq!(
        dec_hex("80049523000000000000008c086275696c74696e73948c096279746561727261799493944302787994859452942e"),
        ba
    );
    assert_eq!(
        dec_hex("8002635f5f6275696c74696e5f5f0a6279746561727261790a7100295271012e"),
        Value::ByteArray(vec![])
    );
    // pickle.dumps(b'', 2) and pickle.dumps(b'ab\xff', 2)
    assert_eq!(
        dec_hex("8002635f5f6275696c74696e5f5f0a62797465730a7100295271012e"),
        Value::Bytes(vec![])
    );
    assert_eq!(
        dec_hex(
            "8002635f636f646563730a656e636f64650a710058040000006162c3bf710158060000006c6174696e3171028671035271042e"
        ),
        Value::Bytes(b"ab\xff".to_vec())
    );
    // latin-1 cannot encode U+20AC: CPython fails loading this, so do we.
    assert!(is_malformed(&dec(
        b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00\xe2\x82\xacX\x06\x00\x00\x00latin1\x86R."
    )));
}

#[test]
fn sets_and_dicts_deduplicate_like_python() {
    // {1: 'a', True: 'b', 1.0: 'c', 'k': 1, 'k': 2}: equal keys keep the first key and its place,
    // take the last value.
    let p = b"\x80\x04}(K\x01\x8c\x01a\x88\x8c\x01bG\x3f\xf0\x00\x00\x00\x00\x00\x00\x8c\x01c\x8c\x01kK\x01\x8c\x01kK\x02u.";
    assert_eq!(
        dec(p),
        Ok(Value::Dict(vec![(Value::Int(1), s("c")), (s("k"), Value::Int(2))]))
    );
    // SETITEM one by one, with a duplicate at the end: below the hash-index threshold (a linear scan) and
    // past it (the index), with int keys and with string keys.
    for n in [20u8, 40] {
        let mut p = b"\x80\x04}".to_vec();
        for i in 0..n {
            p.extend([b'K', i, b'K', i, b's']);
        }
        p.extend(b"K\x05K\x63s.");
        let Ok(Value::Dict(pairs)) = dec(&p) else {
            panic!("dict expected")
        };
        assert_eq!(pairs.len(), usize::from(n));
        assert_eq!(pairs.get(5), Some(&(Value::Int(5), Value::Int(99))));

        let mut p = b"\x80\x04}".to_vec();
        for i in 0..n {
            p.extend([b'\x8c', 2, b'k', b'0' + i, b'K', i, b's']);
        }
        // "k5" again, and a key of other text with the same length, and the int 5 (not equal to "k5").
        p.extend(b"\x8c\x02k5K\x63s\x8c\x02zzK\x01sK\x05K\x02s.");
        let Ok(Value::Dict(pairs)) = dec(&p) else {
            panic!("dict expected")
        };
        assert_eq!(pairs.len(), usize::from(n) + 2);
        assert_eq!(pairs.get(5), Some(&(s("k5"), Value::Int(99))));
        assert_eq!(pairs.last(), Some(&(Value::Int(5), Value::Int(2))));
    }
    // Sets: {1, True, 2, 2} == {1, 2}
    assert_eq!(
        dec(b"\x80\x04\x8f(K\x01\x88K\x02K\x02\x90."),
        Ok(Value::Set(vec![Value::Int(1), Value::Int(2)]))
    );
    // ... and a set past the threshold: 40 members, then each of them again.
    let mut p = b"\x80\x04\x8f(".to_vec();
    for i in (0..40u8).chain(0..40) {
        p.extend([b'\x8c', 1, b'0' + i]);
    }
    p.extend(b"\x90.");
    let Ok(Value::Set(members)) = dec(&p) else {
        panic!("set expected")
    };
    assert_eq!(members.len(), 40);
    // Keys whose equality we cannot know (tuples, instances) are kept as they are.
    assert_eq!(
        dec(b"\x80\x04}(K\x01\x85K\x01K\x01\x85K\x02u."),
        Ok(Value::Dict(vec![
            (Value::Tuple(vec![Value::Int(1)]), Value::Int(1)),
            (Value::Tuple(vec![Value::Int(1)]), Value::Int(2)),
        ]))
    );
}

#[test]
fn tuples_of_every_size_and_nested_containers() {
    assert_eq!(dec(b"\x80\x04)."), Ok(Value::Tuple(vec![])));
    assert_eq!(
        dec(b"\x80\x04K\x01K\x02\x86."),
        Ok(Value::Tuple(vec![Value::Int(1), Value::Int(2)]))
    );
    assert_eq!(
        dec(b"\x80\x04K\x01K\x02K\x03\x87."),
        Ok(Value::Tuple(vec![Value::Int(1), Value::Int(2), Value::Int(3)]))
    );
    assert_eq!(
        dec(b"\x80\x04(K\x01K\x02K\x03K\x04t."),
        Ok(Value::Tuple((1..=4).map(Value::Int).collect()))
    );
    assert_eq!(dec(b"\x80\x04]K\x01a."), Ok(Value::List(vec![Value::Int(1)])));
    assert_eq!(
        dec(b"\x80\x04](K\x01K\x02e."),
        Ok(Value::List(vec![Value::Int(1), Value::Int(2)]))
    );
    // A big list the way CPython batches it (1000 per APPENDS), and back.
    let big = Value::List((0..2500).map(Value::Int).collect());
    assert_eq!(dec(&encode(&big)), Ok(big));
}

// --- stack and memo --------------------------------------------------------------------------------

#[test]
fn memo_entries_are_the_same_object() {
    // x = [1, 2]; pickle.dumps((x, x), 2): the second element is a BINGET of the first.
    let v = dec_hex("80025d7100284b014b026568008671012e");
    let l = Value::List(vec![Value::Int(1), Value::Int(2)]);
    assert_eq!(v, Value::Tuple(vec![l.clone(), l]));
    // A list memoized and put in a tuple *before* it is filled still shows the items.
    // ] MEMOIZE TUPLE1 MEMOIZE BINGET 0 BININT1 5 APPEND POP STOP  ->  ([5],)
    assert_eq!(
        dec(b"\x80\x04]\x94\x85\x94h\x00K\x05a0."),
        Ok(Value::Tuple(vec![Value::List(vec![Value::Int(5)])]))
    );
    // BUILD on a memoized instance is seen through every later reference.
    let p = b"\x80\x04\x8c\x01m\x8c\x01C\x93)\x81\x94}\x8c\x01aK\x01sbh\x00h\x00\x86.";
    let Ok(Value::Tuple(items)) = dec(p) else {
        panic!("tuple expected")
    };
    for item in &items {
        assert_eq!(obj(item).attr("a"), Some(&Value::Int(1)));
    }
}

#[test]
fn binput_long_binput_and_long_binget() {
    assert_eq!(
        dec(b"\x80\x02K\x07q\x03h\x03\x86."),
        Ok(Value::Tuple(vec![Value::Int(7), Value::Int(7)]))
    );
    assert_eq!(
        dec(b"\x80\x02K\x07r\x10\x00\x01\x00j\x10\x00\x01\x00\x86."),
        Ok(Value::Tuple(vec![Value::Int(7), Value::Int(7)]))
    );
    // An index of 0xFFFFFFFF is just a key (CPython would try to grow its memo array to it).
    assert_eq!(
        dec(b"\x80\x04Nr\xff\xff\xff\xffj\xff\xff\xff\xff\x86."),
        Ok(Value::Tuple(vec![Value::None, Value::None]))
    );
    assert!(is_malformed(&dec(b"\x80\x04h\x00.")), "BINGET of a missing key");
    assert!(is_malformed(&dec(b"\x80\x04\x94.")), "MEMOIZE on an empty stack");
}

#[test]
fn dup_pop_and_pop_mark() {
    assert_eq!(
        dec(b"\x80\x04K\x012\x86."),
        Ok(Value::Tuple(vec![Value::Int(1), Value::Int(1)]))
    );
    assert_eq!(dec(b"\x80\x04K\x01K\x020."), Ok(Value::Int(1)));
    assert_eq!(dec(b"\x80\x04K\x01(K\x02K\x031."), Ok(Value::Int(1)));
    // POP of a MARK on top removes the mark, like CPython.
    assert_eq!(dec(b"\x80\x04K\x01(0."), Ok(Value::Int(1)));
    // Nothing may be popped across a MARK.
    assert!(is_malformed(&dec(b"\x80\x04K\x01(\x85.")));
    assert!(is_malformed(&dec(b"\x80\x04t.")), "TUPLE without MARK");
    assert!(is_malformed(&dec(b"\x80\x04.")), "STOP on an empty stack");
    assert!(is_malformed(&dec(b"\x80\x04}(K\x01u.")), "odd SETITEMS");
}

// --- globals and objects ---------------------------------------------------------------------------

#[test]
fn protocol_2_instance_with_global_opcode() {
    // pickle.dumps(egse.protocol.Point(1, 2.5), 2)
    let v = dec_hex(
        "800263656773652e70726f746f636f6c0a506f696e740a7100298171017d71022858010000007871034b01580100000079710447400400000000000075622e",
    );
    assert_eq!(
        v,
        Value::new_object(
            "egse.protocol",
            "Point",
            Value::dict([("x", Value::Int(1)), ("y", Value::Float(2.5))])
        )
    );
}

#[test]
fn nested_qualnames_fold_from_getattr_chains() {
    let want = Value::global("egse.protocol", "CommandProtocol.handle_device_method");
    // pickle.dumps(CommandProtocol.handle_device_method, 2) -- module __builtin__
    assert_eq!(
        dec_hex(
            "8002635f5f6275696c74696e5f5f0a676574617474720a710063656773652e70726f746f636f6c0a436f6d6d616e6450726f746f636f6c0a\
             7101581400000068616e646c655f6465766963655f6d6574686f6471028671035271042e"
        ),
        want
    );
    // … and at protocol 3 -- module builtins
    assert_eq!(
        dec_hex(
            "8003636275696c74696e730a676574617474720a710063656773652e70726f746f636f6c0a436f6d6d616e6450726f746f636f6c0a7101\
             581400000068616e646c655f6465766963655f6d6574686f6471028671035271042e"
        ),
        want
    );
    // pickle.dumps(CommandProtocol.Nested.helper, 3): two levels
    assert_eq!(
        dec_hex(
            "8003636275696c74696e730a676574617474720a7100680063656773652e70726f746f636f6c0a436f6d6d616e6450726f746f636f6c0a\
             710158060000004e65737465647102867103527104580600000068656c70657271058671065271072e"
        ),
        Value::global("egse.protocol", "CommandProtocol.Nested.helper")
    );
    // pickle.dumps(CommandProtocol().handle_device_method, 2): a bound method is getattr on an
    // *instance*; that stays an opaque reduction.
    let v = dec_hex(
        "8002635f5f6275696c74696e5f5f0a676574617474720a710063656773652e70726f746f636f6c0a436f6d6d616e6450726f746f636f6c0a\
         710129817102581400000068616e646c655f6465766963655f6d6574686f6471038671045271052e",
    );
    let o = obj(&v);
    assert!(o.is("builtins", "getattr") && o.kind == ObjectKind::Reduce);
    assert!(obj(&o.args[0]).is("egse.protocol", "CommandProtocol"));
}

#[test]
fn module_names_of_python_2_are_normalised() {
    assert_eq!(
        dec(b"\x80\x02ccopy_reg\n_reconstructor\n."),
        Ok(Value::global("copyreg", "_reconstructor"))
    );
    assert_eq!(
        dec(b"\x80\x02c__builtin__\nobject\n."),
        Ok(Value::global("builtins", "object"))
    );
    // pickle.dumps(ValueError('bad value', 42), 2) -- CPython writes module `exceptions`
    let v = dec_hex(
        "800263657863657074696f6e730a56616c75654572726f720a710058090000006261642076616c756571014b2a8671025271032e",
    );
    assert_eq!(
        v,
        Value::reduce("builtins", "ValueError", vec![s("bad value"), Value::Int(42)], None)
    );
    assert!(
        matches!(dec(b"\x80\x02cos\nsys"), Err(CodecError::Truncated(_))),
        "GLOBAL without newline"
    );
}

#[test]
fn newobj_ex_keeps_keyword_arguments() {
    // pickle.dumps(egse.protocol.Kw(1, b=2), 4) with __getnewargs_ex__ = ((a,), {'b': b})
    let v = dec_hex(
        "80049536000000000000008c0d656773652e70726f746f636f6c948c024b779493944b0185947d948c0162944b027392947d94288c0161944b0168054b0275622e",
    );
    let o = obj(&v);
    assert!(o.is("egse.protocol", "Kw") && o.kind == ObjectKind::NewObj);
    assert_eq!(o.args, vec![Value::Int(1)]);
    assert_eq!(o.kwargs, vec![(s("b"), Value::Int(2))]);
    assert_eq!(o.attr("a"), Some(&Value::Int(1)));
    assert_eq!(dec(&encode(&v)), Ok(v.clone()), "NEWOBJ_EX round trip");
}

#[test]
fn slot_state_is_kept_as_a_tuple() {
    // pickle.dumps(egse.protocol.Slotted(), 2): BUILD with (None, {'x': 1})
    let v = dec_hex(
        "800263656773652e70726f746f636f6c0a536c6f747465640a7100298171014e7d710258010000007871034b0173867104622e",
    );
    let o = obj(&v);
    assert_eq!(
        o.state,
        Some(Value::Tuple(vec![Value::None, Value::dict([("x", Value::Int(1))])]))
    );
    assert_eq!(
        describe(&v),
        "egse.protocol.Slotted(__dict__={}, __slots__={\n    'x': 1\n})"
    );
}

#[test]
fn build_rules() {
    assert!(is_malformed(&dec(b"\x80\x04]}b.")), "BUILD on a list");
    // Two dict BUILDs merge, the later value wins.
    let p = b"\x80\x04\x8c\x01m\x8c\x01C\x93)\x81}(\x8c\x01aK\x01\x8c\x01bK\x02ub}\x8c\x01aK\x03sb.";
    let v = dec(p).expect("decode");
    assert_eq!(
        obj(&v).state,
        Some(Value::dict([("a", Value::Int(3)), ("b", Value::Int(2))]))
    );
    // APPENDS/SETITEMS on an instance go to its list/dict items (list and dict subclasses).
    let p = b"\x80\x04\x8c\x01m\x8c\x01L\x93)\x81(K\x01K\x02eK\x03a.";
    assert_eq!(
        obj(&dec(p).expect("decode")).list_items,
        vec![Value::Int(1), Value::Int(2), Value::Int(3)]
    );
    assert!(is_malformed(&dec(b"\x80\x04)K\x01a.")), "APPEND to a tuple");
    assert!(is_malformed(&dec(b"\x80\x04](K\x01\x90.")), "ADDITEMS to a list");
    assert!(is_malformed(&dec(b"\x80\x04K\x01)\x81.")), "NEWOBJ of an int");
    assert!(
        is_malformed(&dec(b"\x80\x04\x8c\x01m\x8c\x01C\x93K\x01\x81.")),
        "NEWOBJ args not a tuple"
    );
    assert!(
        is_malformed(&dec(b"\x80\x04K\x01\x8c\x01C\x93.")),
        "STACK_GLOBAL of an int"
    );
}

#[test]
fn os_system_is_only_data() {
    // pickle.dumps-style `os.system('echo pwned')` (REDUCE) and the protocol 0 GLOBAL form.
    let p = b"\x80\x04\x8c\x02os\x8c\x06system\x93\x8c\x0aecho pwned\x85R.";
    let v = dec(p).expect("decode");
    assert_eq!(v, Value::reduce("os", "system", vec![s("echo pwned")], None));
    let p = b"\x80\x02cposix\nsystem\nX\x02\x00\x00\x00ls\x85R.";
    assert_eq!(dec(p), Ok(Value::reduce("posix", "system", vec![s("ls")], None)));
}

// --- refused opcodes and envelope ----------------------------------------------------------------

#[test]
fn refused_opcodes_are_named() {
    for (bytes, name) in [
        (&b"\x80\x02I1\n."[..], "INT"),
        (b"L1L\n.", "LONG"),
        (b"F1.0\n.", "FLOAT"),
        (b"S'a'\n.", "STRING"),
        (b"Vabc\n.", "UNICODE"),
        (b"\x80\x02Np0\n.", "PUT"),
        (b"g0\n.", "GET"),
        (b"(d.", "DICT"),
        (b"(l.", "LIST"),
        (b"(imod\nC\n.", "INST"),
        (b"(o.", "OBJ"),
        (b"Pid\n.", "PERSID"),
        (b"NQ.", "BINPERSID"),
        (b"\x80\x02\x82\x01.", "EXT1"),
        (b"\x80\x02\x83\x01\x00.", "EXT2"),
        (b"\x80\x02\x84\x01\x00\x00\x00.", "EXT4"),
        (b"\x80\x05\x97.", "NEXT_BUFFER"),
        (b"\x80\x05\x98.", "READONLY_BUFFER"),
    ] {
        match dec(bytes) {
            Err(CodecError::Unsupported { name: got, .. }) => assert_eq!(got, name),
            other => panic!("{name}: {other:?}"),
        }
    }
    assert_eq!(
        dec(b"\x80\x04\xff."),
        Err(CodecError::UnknownOpcode { opcode: 0xff, pos: 2 })
    );
}

#[test]
fn envelope_rules() {
    assert_eq!(dec(b""), Err(CodecError::Empty));
    assert_eq!(dec(b"N."), Ok(Value::None), "PROTO is optional");
    assert_eq!(dec(b"\x80\x06N."), Err(CodecError::Protocol(6)));
    assert_eq!(dec(b"\x80\x01N."), Err(CodecError::Protocol(1)));
    assert_eq!(dec(b"\x80\x05N."), Ok(Value::None));
    assert_eq!(dec(b"\x80\x04N.N"), Err(CodecError::TrailingData(4)));
    assert_eq!(dec(b"\x80\x04N"), Err(CodecError::Truncated(3)));
    // FRAME lengths must fit the input; several frames are fine.
    assert_eq!(
        dec(b"\x80\x04\x95\x02\x00\x00\x00\x00\x00\x00\x00N.").ok(),
        Some(Value::None)
    );
    assert_eq!(
        dec(b"\x80\x04\x95\x01\x00\x00\x00\x00\x00\x00\x00N\x95\x01\x00\x00\x00\x00\x00\x00\x00.").ok(),
        Some(Value::None)
    );
    assert!(matches!(
        dec(b"\x80\x04\x95\xff\x00\x00\x00\x00\x00\x00\x00N."),
        Err(CodecError::Truncated(_))
    ));
}
