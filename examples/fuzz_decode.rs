//! Deterministic mutation fuzzing of the pickle decoder.
//!
//! ```text
//! cargo run --release --example fuzz_decode -- --iterations 1000000 [--seed N] [--fixtures DIR]
//! ```
//!
//! The corpus is every captured pickle under the fixtures directory, their re-encodings by our encoder
//! and a few protocol 2/3 pickles written by CPython. Each iteration applies one to four mutations (bit
//! flips, byte replace/insert/delete, splices of two inputs, truncation, length-field blow-ups,
//! duplicated slices, inserted opcodes) and decodes the result inside `catch_unwind`.
//!
//! It fails (exit 1, input printed as hex) on a panic, on a decode slower than one second, or on a
//! decode whose peak of live heap bytes exceeds [`memory_bound`], measured by a counting global
//! allocator. Before fuzzing, large inputs of the worst shapes for the arena (one node per input
//! byte) are decoded once to show that the per-byte factor of the bound holds.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use procman::codec::{decode, encode, CodecError, Limits};

// The counting allocator of the tests: live heap bytes and their high-water mark.
#[path = "../tests/support/counting_alloc.rs"]
mod counting_alloc;

#[global_allocator]
static GLOBAL: counting_alloc::Counting = counting_alloc::Counting;

// --- limits and bounds -------------------------------------------------------------------------------

/// The fuzzer's limits: defaults, except a result-node budget small enough that a lucky mutation
/// producing a legitimate but huge memo expansion does not dominate the run.
fn fuzz_limits() -> Limits {
    Limits {
        max_nodes: 100_000,
        ..Limits::default()
    }
}

/// Bytes of decoder state per input byte. Every node costs at least one input byte and the arena
/// reserves `len / 8 + 1` nodes of 32 bytes, which exact doubling grows to at most `len + 8` nodes:
/// 32 bytes per input byte. Stack ids (4 bytes, doubling) add up to 8, the graph check 9 (colour and
/// expanded size per node); the measured worst shape in [`shape_check`] is 49.
const BYTES_PER_INPUT_BYTE: usize = 64;

/// Bytes of built `Value` tree per counted node: a `Value` is 48 bytes, an `Object` 200 plus the
/// `Value` holding it (shared by at least two counted nodes, the object and its class), a string or
/// global up to 63 heap bytes before its payload counts as another node.
const BYTES_PER_RESULT_NODE: usize = 160;

/// Fixed slack: hash maps' initial tables, the memo, small vectors.
const SLACK: usize = 4 << 20;

/// Largest peak of live heap bytes one decode of `len` input bytes may reach under `limits`.
fn memory_bound(len: usize, limits: &Limits) -> usize {
    BYTES_PER_INPUT_BYTE * len + BYTES_PER_RESULT_NODE * limits.max_nodes + SLACK
}

// --- PRNG ------------------------------------------------------------------------------------------

/// SplitMix64: tiny, deterministic, good enough to drive mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

// --- corpus ----------------------------------------------------------------------------------------

fn default_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn collect(dir: &Path, out: &mut Vec<Vec<u8>>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for path in paths {
        if path.is_dir() {
            collect(&path, out);
        } else if path.extension().is_some_and(|e| e == "pickle" || e == "bin") {
            if let Ok(bytes) = std::fs::read(&path) {
                out.push(bytes);
            }
        }
    }
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| s.get(2 * i..2 * i + 2))
        .filter_map(|p| u8::from_str_radix(p, 16).ok())
        .collect()
}

/// CPython 3.11 protocol 2/3 pickles (see tests/it/codec_decode.rs for the expressions).
const PROTOCOL_2_3: &[&str] = &[
    "800263656773652e70726f746f636f6c0a506f696e740a7100298171017d71022858010000007871034b01580100000079710447400400000000000075622e",
    "8002635f5f6275696c74696e5f5f0a676574617474720a710063656773652e70726f746f636f6c0a436f6d6d616e6450726f746f636f6c0a7101581400000068616e646c655f6465766963655f6d6574686f6471028671035271042e",
    "8003636275696c74696e730a676574617474720a7100680063656773652e70726f746f636f6c0a436f6d6d616e6450726f746f636f6c0a710158060000004e65737465647102867103527104580600000068656c70657271058671065271072e",
    "80025d7100284b014b026568008671012e",
    "80027d71002858010000006171015d7102284b014740040000000000004e8889655801000000627103635f636f646563730a656e636f64650a7104580100000078710558060000006c6174696e3171068671075271085802000000c3a9710986710a752e",
    "8002635f5f6275696c74696e5f5f0a6279746561727261790a7100635f636f646563730a656e636f64650a710158020000007879710258060000006c6174696e3171038671045271058571065271072e",
    "8002635f5f6275696c74696e5f5f0a7365740a71005d7101284b014b02658571025271032e",
    "80049509000000000000008f94284b014b02902e",
    "8004950600000000000000284b0391942e",
    "80025d7100288a090000000000000000408a090000000000000000c08a090000000000000080008a09ffffffffffffff7fff8a0500000080004a000000804dffff4a000001004affffffff652e",
    "80049536000000000000008c0d656773652e70726f746f636f6c948c024b779493944b0185947d948c0162944b027392947d94288c0161944b0168054b0275622e",
    "800263656773652e70726f746f636f6c0a536c6f747465640a7100298171014e7d710258010000007871034b0173867104622e",
    "800263657863657074696f6e730a56616c75654572726f720a710058090000006261642076616c756571014b2a8671025271032e",
    "8005950d000000000000009602000000000000007879942e",
];

/// Every opcode byte the decoder knows (accepted or refused), for opcode insertion.
const OPCODES: &[u8] = b"\x80\x95.(012NJKM\x8a\x8bG\x8cX\x8dCB\x8e\x96UT)\x85\x86\x87t]ae}su\x8f\x90\x91c\x93\x81\x92Rb\x94qrhjILFSVpgdlioPQ\x82\x83\x84\x97\x98\x88\x89";

// --- mutations -------------------------------------------------------------------------------------

const MAX_INPUT: usize = 256 * 1024;

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    let len = input.len();
    match rng.below(11) {
        0 if len > 0 => {
            let i = rng.below(len);
            if let Some(b) = input.get_mut(i) {
                *b ^= 1 << rng.below(8);
            }
        }
        1 if len > 0 => {
            let i = rng.below(len);
            let v = if rng.below(2) == 0 {
                rng.byte()
            } else {
                [0x00, 0xff, 0x7f, 0x80, 0x01][rng.below(5)]
            };
            if let Some(b) = input.get_mut(i) {
                *b = v;
            }
        }
        2 => {
            let i = rng.below(len + 1);
            input.insert(i, rng.byte());
        }
        3 if len > 0 => {
            let start = rng.below(len);
            let end = (start + 1 + rng.below(16)).min(len);
            input.drain(start..end);
        }
        4 => {
            // Splice: our prefix, another input's suffix.
            let other = &corpus[rng.below(corpus.len())];
            let cut = rng.below(len + 1);
            let from = rng.below(other.len() + 1);
            input.truncate(cut);
            input.extend_from_slice(other.get(from..).unwrap_or_default());
        }
        5 => input.truncate(rng.below(len + 1)),
        6 if len > 0 => {
            // Length-field blow-up: overwrite 1, 4 or 8 bytes with a huge or boundary value.
            let width = [1, 4, 8][rng.below(3)];
            let i = rng.below(len);
            let value: u64 = [u64::MAX, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, 1 << 40, 0x100][rng.below(6)];
            for (k, b) in value.to_le_bytes().iter().take(width).enumerate() {
                if let Some(slot) = input.get_mut(i + k) {
                    *slot = *b;
                }
            }
        }
        7 if len > 0 => {
            // Duplicate a slice, possibly many times (memo-heavy repetitions, deep nesting).
            let start = rng.below(len);
            let end = (start + 1 + rng.below(64)).min(len);
            let slice = input.get(start..end).unwrap_or_default().to_vec();
            let times = if rng.below(8) == 0 {
                1 + rng.below(2000)
            } else {
                1 + rng.below(4)
            };
            let at = rng.below(len + 1);
            let mut block = Vec::with_capacity(slice.len() * times);
            for _ in 0..times {
                block.extend_from_slice(&slice);
            }
            input.splice(at..at, block);
        }
        8 => {
            // Insert an opcode with a few random argument bytes.
            let at = rng.below(len + 1);
            let mut ins = vec![OPCODES[rng.below(OPCODES.len())]];
            for _ in 0..rng.below(5) {
                ins.push(rng.byte());
            }
            input.splice(at..at, ins);
        }
        9 if rng.below(2) == 0 => {
            // Memo amplification: MARK, k references to early memo entries, TUPLE, repeated.
            let at = rng.below(len + 1);
            let mut ins = Vec::new();
            for _ in 0..1 + rng.below(6) {
                ins.push(b'(');
                for _ in 0..1 + rng.below(64) {
                    ins.extend([b'h', rng.below(8) as u8]);
                }
                ins.extend([b't', 0x94]);
            }
            input.splice(at..at, ins);
        }
        9 => {
            // Nested expansion as the result: memo[250] = x; L times memo[250] = (memo[250],) * k.
            // Expands to k**L leaves: from tiny trees to far past the node limit.
            if input.last() == Some(&b'.') {
                input.pop();
            }
            input.extend(b"Nq\xfa0");
            let (k, levels) = (1 + rng.below(8), 1 + rng.below(12));
            for _ in 0..levels {
                input.push(b'(');
                for _ in 0..k {
                    input.extend(b"h\xfa");
                }
                input.extend(b"tq\xfa0");
            }
            input.extend(b"h\xfa.");
        }
        _ if len > 1 => {
            // Change a memo index or a 1-byte length: the byte after a BINGET/BINPUT/short opcode.
            let positions: Vec<usize> = input
                .iter()
                .enumerate()
                .filter(|(_, &b)| matches!(b, b'h' | b'q' | 0x8c | b'C' | b'K' | 0x8a | b'U'))
                .map(|(i, _)| i + 1)
                .filter(|&i| i < len)
                .collect();
            if !positions.is_empty() {
                let i = positions[rng.below(positions.len())];
                if let Some(b) = input.get_mut(i) {
                    *b = rng.byte();
                }
            }
        }
        _ => input.push(rng.byte()),
    }
    input.truncate(MAX_INPUT);
}

// --- running ---------------------------------------------------------------------------------------

struct Outcome {
    result: Result<(), CodecError>,
    elapsed: Duration,
    peak: usize,
}

fn run_one(input: &[u8], limits: &Limits) -> Result<Outcome, String> {
    let baseline = counting_alloc::reset_peak();
    let start = Instant::now();
    let caught = std::panic::catch_unwind(|| decode(input, limits).map(drop));
    let elapsed = start.elapsed();
    let peak = counting_alloc::peak().saturating_sub(baseline);
    match caught {
        Ok(result) => Ok(Outcome { result, elapsed, peak }),
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(msg)
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn fail(what: &str, input: &[u8]) -> ! {
    eprintln!("FAILURE: {what}");
    eprintln!("input ({} bytes): {}", input.len(), hex(input));
    std::process::exit(1);
}

fn error_kind(e: &CodecError) -> String {
    let text = format!("{e:?}");
    text.split(['(', ' ', '{']).next().unwrap_or_default().to_owned()
}

/// Large inputs of the shapes that make the most arena nodes per input byte.
fn shape_check(limits: &Limits) {
    // Just past a power of two, so that every growing `Vec` has doubled its reservation.
    const N: usize = (1 << 20) + 16;
    let distinct_keys = |open: &[u8], close: u8, with_value: bool| {
        let mut p = [b"\x80\x04".as_slice(), open, b"("].concat();
        for i in 0..(N / 6) as u32 {
            p.push(b'J');
            p.extend(i.to_le_bytes());
            if with_value {
                p.push(b'N');
            }
        }
        p.extend([close, b'.']);
        p
    };
    let shapes: [(&str, Vec<u8>); 9] = [
        (
            "EMPTY_LIST x N",
            [b"\x80\x04".as_slice(), &vec![b']'; N], b"."].concat(),
        ),
        ("EMPTY_LIST x N+5, no PROTO", [vec![b']'; N + 5], vec![b'.']].concat()),
        (
            "EMPTY_DICT x N",
            [b"\x80\x04".as_slice(), &vec![b'}'; N], b"."].concat(),
        ),
        ("MARK x N", [b"\x80\x04".as_slice(), &vec![b'('; N], b"N."].concat()),
        ("NONE DUP x N", [b"\x80\x04N".as_slice(), &vec![b'2'; N], b"."].concat()),
        (
            "NONE MEMOIZE x N/2",
            [b"\x80\x04".as_slice(), &b"N\x94".repeat(N / 2), b"."].concat(),
        ),
        ("EMPTY_SET x N", [b"\x80\x04".as_slice(), &vec![0x8f; N], b"."].concat()),
        ("dict, N/6 int keys", distinct_keys(b"}", b'u', true)),
        ("set, N/6 int members", distinct_keys(b"\x8f", 0x90, false)),
    ];
    println!("worst-case shapes ({N} opcodes each):");
    for (name, input) in shapes {
        let outcome = match run_one(&input, limits) {
            Ok(o) => o,
            Err(msg) => fail(&format!("panic on shape {name}: {msg}"), &input),
        };
        let per_byte = outcome.peak as f64 / input.len() as f64;
        println!(
            "  {name:<26} {:>8.1} ms  peak {:>6.1} MiB  = {per_byte:>5.1} bytes per input byte  ({:?})",
            outcome.elapsed.as_secs_f64() * 1e3,
            outcome.peak as f64 / (1 << 20) as f64,
            outcome
                .result
                .as_ref()
                .map_err(error_kind)
                .err()
                .unwrap_or_else(|| "Ok".into())
        );
        if outcome.peak > BYTES_PER_INPUT_BYTE * input.len() + SLACK {
            fail(
                &format!("shape {name} exceeds {BYTES_PER_INPUT_BYTE} bytes per input byte"),
                &input[..64],
            );
        }
    }
}

fn main() {
    let mut iterations: u64 = 100_000;
    let mut seed: u64 = 1;
    let mut fixtures = default_fixtures();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| fail(&format!("{arg} needs a value"), &[]))
        };
        match arg.as_str() {
            "--iterations" => iterations = value().parse().unwrap_or_else(|_| fail("bad --iterations", &[])),
            "--seed" => seed = value().parse().unwrap_or_else(|_| fail("bad --seed", &[])),
            "--fixtures" => fixtures = PathBuf::from(value()),
            other => fail(&format!("unknown argument {other}"), &[]),
        }
    }
    // Panics are reported by us, with the input; keep the default hook from printing them too.
    std::panic::set_hook(Box::new(|_| {}));

    let limits = fuzz_limits();
    let mut corpus = Vec::new();
    collect(&fixtures, &mut corpus);
    let captured = corpus.len();
    let reencoded: Vec<Vec<u8>> = corpus
        .iter()
        .filter_map(|c| decode(c, &Limits::default()).ok())
        .map(|v| encode(&v))
        .collect();
    corpus.extend(reencoded);
    corpus.extend(PROTOCOL_2_3.iter().map(|h| unhex(h)));
    if captured == 0 {
        fail(&format!("no fixtures found under {}", fixtures.display()), &[]);
    }
    println!(
        "corpus: {} inputs ({captured} captured, {} re-encoded, {} protocol 2/3) from {}",
        corpus.len(),
        corpus.len() - captured - PROTOCOL_2_3.len(),
        PROTOCOL_2_3.len(),
        fixtures.display()
    );
    println!(
        "limits: max_nodes {} max_depth {} max_memo {} max_container_len {}; memory bound {BYTES_PER_INPUT_BYTE} * len + {BYTES_PER_RESULT_NODE} * max_nodes + {} MiB",
        limits.max_nodes,
        limits.max_depth,
        limits.max_memo,
        limits.max_container_len,
        SLACK >> 20
    );
    shape_check(&limits);

    let mut rng = Rng(seed);
    let started = Instant::now();
    let (mut ok, mut err) = (0u64, 0u64);
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    let mut slowest = (Duration::ZERO, 0usize);
    let mut peak_max = (0usize, 0usize);
    let mut total_bytes = 0u64;
    for i in 0..iterations {
        let mut input = corpus[rng.below(corpus.len())].clone();
        let rounds = if rng.below(2) == 0 { 1 } else { 2 + rng.below(3) };
        for _ in 0..rounds {
            mutate(&mut rng, &mut input, &corpus);
        }
        total_bytes += input.len() as u64;
        let outcome = match run_one(&input, &limits) {
            Ok(o) => o,
            Err(msg) => fail(&format!("panic at iteration {i}: {msg}"), &input),
        };
        if outcome.elapsed > Duration::from_secs(1) {
            fail(&format!("decode took {:?} at iteration {i}", outcome.elapsed), &input);
        }
        let bound = memory_bound(input.len(), &limits);
        if outcome.peak > bound {
            fail(
                &format!(
                    "decode peaked at {} bytes > bound {bound} at iteration {i}",
                    outcome.peak
                ),
                &input,
            );
        }
        if outcome.elapsed > slowest.0 {
            slowest = (outcome.elapsed, input.len());
        }
        if outcome.peak > peak_max.0 {
            peak_max = (outcome.peak, input.len());
        }
        match outcome.result {
            Ok(()) => ok += 1,
            Err(e) => {
                err += 1;
                *kinds.entry(error_kind(&e)).or_default() += 1;
            }
        }
        if (i + 1) % 200_000 == 0 {
            println!("  … {} iterations, {:.1} s", i + 1, started.elapsed().as_secs_f64());
        }
    }
    let total = started.elapsed();
    println!(
        "iterations: {iterations} (seed {seed}), mean input {} bytes",
        total_bytes / iterations.max(1)
    );
    println!("ok: {ok}  err: {err}");
    println!("error kinds:");
    for (kind, n) in &kinds {
        println!("  {kind:<20} {n}");
    }
    println!(
        "slowest decode: {:.3} ms ({} byte input)",
        slowest.0.as_secs_f64() * 1e3,
        slowest.1
    );
    println!(
        "largest peak allocation: {:.2} MiB ({} byte input)",
        peak_max.0 as f64 / (1 << 20) as f64,
        peak_max.1
    );
    println!(
        "total time: {:.1} s ({:.1} µs per iteration)",
        total.as_secs_f64(),
        total.as_secs_f64() * 1e6 / iterations.max(1) as f64
    );
}
