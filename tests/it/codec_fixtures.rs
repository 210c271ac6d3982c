//! The codec against every captured CPython pickle: decode and compare with the structure CPython
//! loaded (the `## decoded` section of each `.dis.txt`), re-encode and decode again, and, when
//! `python3` is available, let CPython load our encoding and compare it with its own load of the
//! original.
//!
//! Fixtures: `tests/fixtures` (copied from the reference captures; see `tests/fixtures/README.md`).

use crate::support;
use std::path::{Path, PathBuf};
use std::process::Command;

use procman::codec::{decode, describe, encode, CodecError, Limits, Value};

use support::fixtures_root;

/// Files in `dir` whose name matches `pred`, sorted.
fn files(dir: &Path, pred: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read fixture dir {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(&pred))
        .collect();
    out.sort();
    out
}

/// Every pickle-ish frame captured on the wire, with its `.dis.txt` next to it.
fn protocol_frames() -> Vec<PathBuf> {
    let root = fixtures_root().join("protocol");
    let mut all = files(&root, |n| {
        n.ends_with(".req.pickle")
            || n.ends_with(".rep.pickle")
            || n.ends_with(".req.bin")
            || (n.starts_with("mon_") && n.ends_with(".bin"))
    });
    all.extend(files(&root.join("proxy_trace"), |n| n.ends_with(".bin")));
    all.extend(files(&root.join("pm_side_tap"), |n| n.ends_with(".bin")));
    all
}

/// The integration captures (Storage / Configuration Manager traffic, the pickled `Setup`).
fn integration_pickles() -> Vec<PathBuf> {
    let root = fixtures_root().join("integration");
    let mut all = Vec::new();
    for sub in ["storage", "confman", "procman"] {
        all.extend(files(&root.join(sub), |n| {
            n.ends_with(".pickle") || n.ends_with(".bin")
        }));
    }
    all
}

fn dis_text(path: &Path) -> String {
    let mut name = path.as_os_str().to_owned();
    name.push(".dis.txt");
    std::fs::read_to_string(&name).unwrap_or_else(|e| panic!("missing {}: {e}", PathBuf::from(name).display()))
}

/// What the `.dis.txt` says CPython made of the frame.
enum Expect {
    /// CPython loaded it; this is its rendering.
    Decoded(String),
    /// CPython could not parse it as a pickle.
    NotAPickle,
    /// A well-formed pickle whose class CPython could not import; we keep such references opaque.
    ImportFailed,
    /// Not a pickle at all (registry JSON, ZeroMQ routing frames).
    Other,
}

fn expectation(dis: &str) -> Expect {
    let mut lines = dis.lines();
    while let Some(line) = lines.next() {
        if line.starts_with("## decoded") {
            let body: Vec<&str> = lines.take_while(|l| !l.starts_with("## ")).collect();
            return Expect::Decoded(body.join("\n").trim_end().to_owned());
        }
        if line.starts_with("## not a (complete) pickle") {
            return Expect::NotAPickle;
        }
        if line.starts_with("## pickle.loads failed") {
            return Expect::ImportFailed;
        }
        if line.starts_with("## JSON") || line.starts_with("## raw bytes") {
            return Expect::Other;
        }
    }
    panic!("cannot classify .dis.txt:\n{dis}");
}

/// The fixtures say `<function ref …>` or `<class ref …>`; a decoder cannot tell which.
fn normalise(text: &str) -> String {
    text.replace("<function ref ", "<ref ").replace("<class ref ", "<ref ")
}

fn first_difference(a: &str, b: &str) -> String {
    for (i, (x, y)) in a.lines().zip(b.lines()).enumerate() {
        if x != y {
            return format!("line {}:\n  ours:     {x}\n  expected: {y}", i + 1);
        }
    }
    format!(
        "line counts differ: ours {} expected {}",
        a.lines().count(),
        b.lines().count()
    )
}

#[test]
fn every_captured_frame_decodes_like_cpython() {
    let limits = Limits::default();
    let (mut compared, mut rejected, mut opaque, mut other) = (0, 0, 0, 0);
    let mut failures = Vec::new();
    for path in protocol_frames() {
        let bytes = std::fs::read(&path).expect("read fixture");
        let name = path
            .strip_prefix(fixtures_root())
            .unwrap_or(&path)
            .display()
            .to_string();
        let result = decode(&bytes, &limits);
        match expectation(&dis_text(&path)) {
            Expect::Decoded(want) => {
                compared += 1;
                match result {
                    Ok(value) => {
                        let ours = normalise(&describe(&value));
                        let want = normalise(&want);
                        if ours != want {
                            failures.push(format!("{name}: {}", first_difference(&ours, &want)));
                        }
                    }
                    Err(e) => failures.push(format!("{name}: decode failed: {e}")),
                }
            }
            Expect::NotAPickle => {
                rejected += 1;
                if result.is_ok() {
                    failures.push(format!("{name}: CPython rejected it but we decoded it"));
                }
            }
            Expect::ImportFailed => {
                opaque += 1;
                // CPython failed importing the named module; we never import, so the reference is data
                // (the dispatcher rejects unknown classes).
                match result {
                    Ok(Value::Object(obj)) if obj.class.as_global().is_some() => {}
                    other => failures.push(format!("{name}: expected an opaque instance, got {other:?}")),
                }
            }
            Expect::Other => {
                other += 1;
                if result.is_ok() {
                    failures.push(format!("{name}: not a pickle but decoded"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // 60 requests + 57 replies + 5 monitoring frames + 44 proxy-trace + 110 pm-side-tap pickles.
    assert_eq!(compared, 276, "compared fixture count");
    assert_eq!(rejected, 3, "non-pickle request frames (empty, garbage x2)");
    assert_eq!(opaque, 1, "err_cmd_unknown_global");
    assert_eq!(other, 12, "JSON / routing frames in pm_side_tap");
}

#[test]
fn non_pickles_fail_with_the_right_error() {
    let root = fixtures_root().join("protocol");
    let limits = Limits::default();
    let empty = std::fs::read(root.join("err_cmd_empty_frame.req.bin")).expect("read");
    assert_eq!(decode(&empty, &limits), Err(CodecError::Empty));
    let garbage = std::fs::read(root.join("err_cmd_garbage.req.bin")).expect("read");
    assert_eq!(
        decode(&garbage, &limits),
        Err(CodecError::UnknownOpcode { opcode: 0, pos: 0 })
    );
}

/// Every fixture that decodes: decode → encode → decode gives the same value.
#[test]
fn every_fixture_round_trips() {
    let limits = Limits::default();
    let mut count = 0;
    let mut failures = Vec::new();
    for path in protocol_frames().into_iter().chain(integration_pickles()) {
        let bytes = std::fs::read(&path).expect("read fixture");
        let Ok(value) = decode(&bytes, &limits) else {
            continue;
        };
        count += 1;
        let again = decode(&encode(&value), &limits);
        if again.as_ref() != Ok(&value) {
            failures.push(format!("{}: {again:?}", path.display()));
        }
    }
    assert!(failures.is_empty(), "round trip failed:\n{}", failures.join("\n"));
    // 276 protocol pickles + err_cmd_unknown_global + 26 integration pickles.
    assert_eq!(count, 303, "round-tripped fixture count");
}

#[test]
fn setup_pickle_keeps_dict_subclass_items() {
    let path = fixtures_root().join("integration/confman/get_setup_reply.pickle");
    let value = decode(&std::fs::read(path).expect("read"), &Limits::default()).expect("decode");
    let setup = value.as_object().expect("Setup instance");
    assert!(setup.is("egse.setup", "Setup"));
    let keys: Vec<_> = setup.dict_items.iter().filter_map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["site_id", "history", "gse", "sut"]);
    let history = setup
        .dict_items
        .get(1)
        .and_then(|(_, v)| v.as_object())
        .expect("history");
    assert!(history.is("navdict.navdict", "NavigableDict"));
    assert_eq!(history.dict_items.len(), 2, "items set before BUILD");
    // `_filename` is a pathlib.PosixPath REDUCE.
    let filename = history.attr("_filename").and_then(Value::as_object).expect("_filename");
    assert!(filename.is("pathlib", "PosixPath"));
    assert_eq!(filename.args.first(), Some(&Value::str("/")));
}

const PY_CHECK: &str = r#"
import pickle, sys, os
class Stub(dict):
    def __new__(cls, *a, **k):
        o = dict.__new__(cls); o.__dict__['_a'] = a; o.__dict__['_k'] = k; return o
    def __init__(self, *a, **k): pass
    def append(self, x): self.__dict__.setdefault('_l', []).append(x)
    def extend(self, xs): self.__dict__.setdefault('_l', []).extend(xs)
stubs = {}
class U(pickle.Unpickler):
    def find_class(self, module, name):
        if module in ('builtins', 'copyreg', '_codecs', 'uuid', 'pathlib'):
            return super().find_class(module, name)
        return stubs.setdefault((module, name), type(name, (Stub,), {'_path': module + '.' + name}))
def canon(o):
    if isinstance(o, type) and issubclass(o, Stub): return ('ref', o._path)
    if isinstance(o, Stub):
        d = dict(vars(o)); a = d.pop('_a', ()); k = d.pop('_k', {}); l = d.pop('_l', [])
        return ('obj', type(o)._path, canon(a), canon(k), canon(l), canon(dict(o)), canon(d))
    if isinstance(o, BaseException): return ('exc', type(o).__name__, canon(o.args), canon(vars(o)))
    if isinstance(o, dict): return ('dict', [(canon(k), canon(v)) for k, v in o.items()])
    if isinstance(o, (list, tuple)): return (type(o).__name__, [canon(x) for x in o])
    if isinstance(o, (set, frozenset)): return (type(o).__name__, sorted(repr(canon(x)) for x in o))
    return (type(o).__name__, repr(o))
bad = 0
d = sys.argv[1]
for name in sorted(os.listdir(d)):
    if not name.endswith('.orig'): continue
    base = name[:-5]
    a = canon(U(open(os.path.join(d, name), 'rb')).load())
    b = canon(U(open(os.path.join(d, base + '.ours'), 'rb')).load())
    if a != b:
        bad += 1; print('MISMATCH', base, a, b)
print('checked', len([n for n in os.listdir(d) if n.endswith('.orig')]), 'mismatches', bad)
sys.exit(1 if bad else 0)
"#;

/// CPython loads our encoding of every fixture into the same structure as the original (classes
/// replaced by stubs, since the CGSE packages are not installed here). Skipped without `python3`.
#[test]
fn cpython_loads_our_encoding_like_the_original() {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("python3 not available; skipping the CPython cross-check");
        return;
    }
    let dir = std::env::temp_dir().join(format!("procman-codec-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let limits = Limits::default();
    let mut n = 0;
    for (i, path) in protocol_frames().into_iter().chain(integration_pickles()).enumerate() {
        let bytes = std::fs::read(&path).expect("read fixture");
        let Ok(value) = decode(&bytes, &limits) else {
            continue;
        };
        if value.as_object().is_some_and(|o| o.is("not_a_module", "Foo")) {
            continue; // CPython cannot load the original
        }
        std::fs::write(dir.join(format!("{i:04}.orig")), &bytes).expect("write");
        std::fs::write(dir.join(format!("{i:04}.ours")), encode(&value)).expect("write");
        n += 1;
    }
    let out = Command::new("python3")
        .arg("-c")
        .arg(PY_CHECK)
        .arg(&dir)
        .output()
        .expect("run python3");
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "CPython disagrees:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&format!("checked {n} mismatches 0")), "{stdout}");
    assert_eq!(n, 302);
}
