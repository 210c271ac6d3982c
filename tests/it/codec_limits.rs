//! Every limit triggers its own error, and hostile input (truncation, garbage, bombs, absurd length
//! fields, extreme nesting) gives a clean `Err` quickly instead of a panic, hang or huge allocation.

use crate::support;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use procman::codec::{decode, CodecError, Limits, Value};

fn fixture(rel: &str) -> Vec<u8> {
    std::fs::read(support::fixtures_root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn limits() -> Limits {
    Limits::default()
}

/// Decode and insist it does not hang, whatever the result. The bound is a hang guard, not a performance
/// target (those are measured by benchmarks): an unbounded blowup takes minutes, a debug build on a loaded
/// 2-core CI machine a couple of seconds.
fn timed(bytes: &[u8], limits: &Limits) -> Result<Value, CodecError> {
    let start = Instant::now();
    let r = decode(bytes, limits);
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "decode took {:?}",
        start.elapsed()
    );
    r
}

/// `]` MEMOIZE, then `n` times: a 2-tuple of the previous level, memoized: 2**n leaves from 4n bytes.
fn doubling_bomb(n: u8) -> Vec<u8> {
    let mut p = b"\x80\x04]\x94".to_vec();
    for i in 0..n {
        p.extend([b'h', i, b'h', i, 0x86, 0x94]);
    }
    p.push(b'.');
    p
}

#[test]
fn frame_over_the_size_limit_is_rejected_first() {
    let l = Limits {
        max_frame_bytes: 16,
        ..limits()
    };
    // Even garbage is reported as too large: the size check comes before parsing.
    assert_eq!(
        decode(&[0u8; 17], &l),
        Err(CodecError::FrameTooLarge { size: 17, limit: 16 })
    );
    assert_eq!(
        decode(&[0u8; 16], &l),
        Err(CodecError::UnknownOpcode { opcode: 0, pos: 0 })
    );
}

#[test]
fn memo_limit() {
    let l = Limits {
        max_memo: 2,
        ..limits()
    };
    assert_eq!(
        decode(b"\x80\x04N\x94N\x94\x86.", &l).ok(),
        Some(Value::Tuple(vec![Value::None, Value::None]))
    );
    assert_eq!(
        decode(b"\x80\x04N\x94N\x94N\x94\x87.", &l),
        Err(CodecError::MemoTooLarge(2))
    );
    // Re-using an index does not grow the memo.
    assert!(decode(b"\x80\x04Nq\x00q\x00q\x00q\x01.", &l).is_ok());
}

#[test]
fn container_limit_for_every_container() {
    let l = Limits {
        max_container_len: 3,
        ..limits()
    };
    let cases: [&[u8]; 6] = [
        b"\x80\x04(NNNNt.",                        // tuple
        b"\x80\x04](NNNNe.",                       // list, APPENDS
        b"\x80\x04]NaNaNaNa.",                     // list, APPEND
        b"\x80\x04}(K\x01NK\x02NK\x03NK\x04Nu.",   // dict
        b"\x80\x04\x8f(K\x01K\x02K\x03K\x04\x90.", // set
        b"\x80\x04(K\x01K\x02K\x03K\x04\x91.",     // frozenset
    ];
    for p in cases {
        assert_eq!(decode(p, &l), Err(CodecError::ContainerTooLarge(3)), "{p:?}");
    }
    assert!(decode(b"\x80\x04(NNNt.", &l).is_ok());
}

#[test]
fn node_limit_counts_memo_copies() {
    // x = [1, 2, 3]; (x, x, x): 3 tuple slots * (1 list + 3 ints) + 1 = 13 nodes.
    let p = b"\x80\x04](K\x01K\x02K\x03e\x94h\x00h\x00\x87.";
    assert!(decode(
        p,
        &Limits {
            max_nodes: 13,
            ..limits()
        }
    )
    .is_ok());
    assert_eq!(
        decode(
            p,
            &Limits {
                max_nodes: 12,
                ..limits()
            }
        ),
        Err(CodecError::TooManyNodes(12))
    );
}

#[test]
fn billion_laughs_hits_the_node_limit_without_expanding() {
    // 2**60 leaves from 363 bytes: the budget of so small a pickle is the minimum one.
    assert_eq!(
        timed(&doubling_bomb(60), &limits()),
        Err(CodecError::TooManyNodes(procman::codec::MIN_NODE_BUDGET))
    );
    // With the per-byte bound off, the absolute one still holds.
    assert_eq!(
        timed(
            &doubling_bomb(60),
            &Limits {
                max_nodes_per_byte: 0,
                ..limits()
            }
        ),
        Err(CodecError::TooManyNodes(limits().max_nodes))
    );
    // A small one is fine and really is expanded.
    let Ok(Value::Tuple(items)) = decode(&doubling_bomb(3), &limits()) else {
        panic!("tuple expected")
    };
    assert_eq!(items.len(), 2);
}

#[test]
fn large_strings_count_towards_the_node_limit() {
    // A 64 KiB string referenced 1000 times is 64 MB of output from 66 KB of input.
    let mut p = b"\x80\x04X\x00\x00\x01\x00".to_vec();
    p.extend(std::iter::repeat_n(b'a', 65536));
    p.extend(b"\x94(");
    for _ in 0..1000 {
        p.extend(b"h\x00");
    }
    p.extend(b"t.");
    assert_eq!(
        timed(
            &p,
            &Limits {
                max_nodes: 100_000,
                ..limits()
            }
        ),
        Err(CodecError::TooManyNodes(100_000))
    );
}

#[test]
fn depth_limit() {
    let nested = |n: usize| {
        let mut p = b"\x80\x04".to_vec();
        p.extend(std::iter::repeat_n(b']', n));
        p.extend(std::iter::repeat_n(b'a', n - 1));
        p.push(b'.');
        p
    };
    let l = Limits {
        max_depth: 10,
        ..limits()
    };
    assert!(decode(&nested(10), &l).is_ok());
    assert_eq!(decode(&nested(11), &l), Err(CodecError::TooDeep(10)));
}

#[test]
fn hundred_thousand_deep_nesting_is_an_error_not_a_stack_overflow() {
    let n = 100_000;
    // ]]]…]aaa…a.  -> lists nested 100,000 deep
    let mut p = b"\x80\x04".to_vec();
    p.extend(std::iter::repeat_n(b']', n));
    p.extend(std::iter::repeat_n(b'a', n - 1));
    p.push(b'.');
    assert_eq!(timed(&p, &limits()), Err(CodecError::TooDeep(500)));
    // ((((…(N ttt…t. -> tuples nested 100,000 deep via marks
    let mut p = b"\x80\x04".to_vec();
    p.extend(std::iter::repeat_n(b'(', n));
    p.push(b'N');
    p.extend(std::iter::repeat_n(b't', n));
    p.push(b'.');
    assert_eq!(timed(&p, &limits()), Err(CodecError::TooDeep(500)));
    // 100,000 open marks and nothing else.
    let mut p = b"\x80\x04".to_vec();
    p.extend(std::iter::repeat_n(b'(', n));
    p.push(b'.');
    assert!(timed(&p, &limits()).is_err());
    // 100,000 lists left on the stack: like CPython, STOP returns the top one.
    let mut p = b"\x80\x04".to_vec();
    p.extend(std::iter::repeat_n(b']', n));
    p.push(b'.');
    assert_eq!(timed(&p, &limits()), Ok(Value::List(vec![])));
}

#[test]
fn cycles_are_rejected() {
    // l = []; l.append(l)
    assert_eq!(decode(b"\x80\x04]\x94h\x00a.", &limits()), Err(CodecError::Recursive));
    // an instance whose state refers to itself
    let p = b"\x80\x04\x8c\x01m\x8c\x01C\x93)\x81\x94}\x8c\x04selfh\x00sb.";
    assert_eq!(decode(p, &limits()), Err(CodecError::Recursive));
    // d = {}; d['d'] = [d]
    assert_eq!(
        decode(b"\x80\x04}\x94\x8c\x01d]h\x00as.", &limits()),
        Err(CodecError::Recursive)
    );
    // A cycle that is not reachable from the result does not matter.
    assert_eq!(decode(b"\x80\x04]\x94h\x00a0N.", &limits()), Ok(Value::None));
}

#[test]
fn absurd_length_fields_do_not_allocate() {
    let cases: [&[u8]; 9] = [
        b"\x80\x04X\xff\xff\xff\xff0123456789", // BINUNICODE claims 4 GB
        b"\x80\x04\x8d\xff\xff\xff\xff\xff\xff\xff\xff0123456789", // BINUNICODE8
        b"\x80\x04B\xff\xff\xff\xff0123456789", // BINBYTES
        b"\x80\x04\x8e\xff\xff\xff\xff\xff\xff\xff\x7f0123456789", // BINBYTES8
        b"\x80\x04\x96\x00\x00\x00\x00\x00\x00\x00\x800123456789", // BYTEARRAY8
        b"\x80\x04\x8b\xff\xff\xff\x7f0123456789", // LONG4
        b"\x80\x04\x95\xff\xff\xff\xff\xff\xff\xff\xffN.", // FRAME
        b"\x80\x04T\xff\xff\xff\x7f0123456789", // BINSTRING
        b"\x80\x04\x8c\xff0123456789",          // SHORT_BINUNICODE
    ];
    for p in cases {
        assert!(matches!(timed(p, &limits()), Err(CodecError::Truncated(_))), "{p:?}");
    }
}

#[test]
fn long_binput_at_the_top_index() {
    assert_eq!(
        timed(b"\x80\x04Nr\xff\xff\xff\xffj\xff\xff\xff\xff0.", &limits()),
        Ok(Value::None)
    );
}

#[test]
fn memo_bombs_of_reductions_are_bounded() {
    // set() of a memoized 4000-item list, REDUCEd 20,000 times from 5 input bytes each: every fold
    // would copy 4000 ids. Stack: [set, args] MARK then (set args REDUCE POP) * 20000.
    let mut p = b"\x80\x04\x8c\x08builtins\x8c\x03set\x93\x94](".to_vec();
    for i in 0..4000u32 {
        p.push(b'J');
        p.extend(i.to_le_bytes());
    }
    p.extend(b"e\x85\x94("); // args = ([0, …, 3999],) as memo 1
    for _ in 0..20_000 {
        p.extend(b"h\x00h\x01R0");
    }
    p.extend(b"1N.");
    let r = timed(&p, &limits());
    assert!(matches!(r, Err(CodecError::Malformed { .. })), "{r:?}");

    // getattr chains whose qualname grows with every level: [getattr, G] -> getattr(G, name) = G'.
    let mut p = b"\x80\x04\x8c\x08builtins\x8c\x07getattr\x93q\x00\x8c\x01m\x8c\x01C\x93".to_vec();
    for _ in 0..50_000 {
        p.extend(b"\x8c\x0aabcdefghij\x86Rq\x010h\x00h\x01");
    }
    p.push(b'.');
    let r = timed(&p, &limits());
    assert!(
        matches!(r, Err(CodecError::Malformed { .. })),
        "a 550 KB qualname must not be folded: {r:?}"
    );
    // The same chain, short, folds normally.
    let mut p = b"\x80\x04\x8c\x08builtins\x8c\x07getattr\x93q\x00\x8c\x01m\x8c\x01C\x93".to_vec();
    for _ in 0..3 {
        p.extend(b"\x8c\x01x\x86Rq\x010h\x00h\x01");
    }
    p.push(b'.');
    assert_eq!(decode(&p, &limits()), Ok(Value::global("m", "C.x.x.x")));
}

#[test]
fn truncation_at_every_offset_of_a_real_pickle_is_an_error() {
    for rel in [
        "protocol/cmd_send_commands.rep.pickle",
        "protocol/mon_status_1.bin",
        "protocol/cmd_controller_raises_statuscmd_none.rep.pickle",
        "integration/confman/get_setup_reply.pickle",
    ] {
        let full = fixture(rel);
        assert!(decode(&full, &limits()).is_ok(), "{rel} itself decodes");
        for cut in 0..full.len() {
            let r = decode(full.get(..cut).unwrap_or_default(), &limits());
            assert!(r.is_err(), "{rel} cut at {cut} decoded: {r:?}");
        }
    }
}

#[test]
fn random_bytes_never_panic() {
    // xorshift64*, fixed seed: deterministic.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let mut ok = 0;
    for _ in 0..20_000 {
        let len = (next() % 64) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if next() % 2 == 0 {
            bytes.splice(0..0, [0x80, 0x04]);
        }
        if timed(&bytes, &limits()).is_ok() {
            ok += 1;
        }
    }
    assert!(ok < 20_000);
}

#[test]
fn small_pickles_cannot_expand_into_large_trees() {
    // Found by `cargo fuzz` (fuzz/, target decode): 563 bytes of DUPs, empty sets, marks and tuples that
    // expanded to ~1.9 million values; the daemon took 100 ms and 60 MB to decode it, per request.
    let p = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-regressions/decode/dup-expansion-563-bytes"),
    )
    .unwrap();
    assert_eq!(p.len(), 563);
    assert_eq!(
        timed(&p, &limits()),
        Err(CodecError::TooManyNodes(procman::codec::MIN_NODE_BUDGET))
    );
    let l = limits();
    assert_eq!(l.node_budget(0), procman::codec::MIN_NODE_BUDGET);
    assert_eq!(l.node_budget(100_000), 1_600_000);
    assert_eq!(l.node_budget(64 << 20), l.max_nodes);
    // A legitimate 2x sharing in a small pickle is untouched: x = [1, 2, 3]; (x, x, x).
    assert!(decode(b"\x80\x04](K\x01K\x02K\x03e\x94h\x00h\x00\x87.", &l).is_ok());
}
