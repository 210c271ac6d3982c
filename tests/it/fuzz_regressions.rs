//! Replays the inputs under `tests/fuzz-regressions/<target>/` with the checks of the `cargo fuzz` target of
//! the same name (`fuzz/fuzz_targets/`), so that a fixed finding stays fixed on the stable toolchain.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use procman::codec::{decode, encode, Limits, Value};
use procman::protocol::{self, SocketKind};
use procman::server::{Call, CommandError, Dispatcher, Handler, HandlerFuture, Ports, ServerInfo};

/// The inputs of one target; a missing or empty folder fails the test (it would otherwise test nothing).
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz-regressions")
        .join(target);
    let mut out: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            p.is_file() && !name.starts_with("README") && !name.starts_with('.')
        })
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, bytes)
        })
        .collect();
    assert!(!out.is_empty(), "no regression inputs in {}", dir.display());
    out.sort();
    out
}

/// The `decode` target's property.
fn check_decode(data: &[u8]) {
    let limits = Limits::default();
    if let Ok(v) = decode(data, &limits) {
        let once = encode(&v);
        let again = decode(&once, &limits).expect("our own encoding decodes");
        assert_eq!(encode(&again), once, "encoding is stable across a round trip");
    }
}

/// The `dispatch` target's minimal handler.
struct Minimal;

impl Handler for Minimal {
    fn handle(&self, call: Call) -> HandlerFuture<'_> {
        Box::pin(async move {
            let name = call.name.clone();
            let bound = call.bind(&["first", "second"], 1)?;
            match name.as_str() {
                "stop_process" => Err(CommandError::Failed("refused".into())),
                "set_monitoring_frequency" => Err(CommandError::Value("bad frequency".into())),
                _ => Ok(Value::Tuple(bound.into_iter().map(|v| v.unwrap_or(Value::None)).collect()).into()),
            }
        })
    }
}

#[test]
fn decode_regressions() {
    for (path, data) in inputs("decode") {
        println!("{}", path.display());
        check_decode(&data);
    }
}

#[tokio::test]
async fn dispatch_regressions() {
    let (cmd, svc) = protocol::load_tables().unwrap();
    let info = Arc::new(ServerInfo::new(
        Ports {
            commanding: 6120,
            monitoring: 6121,
            service: 6122,
        },
        "PM".into(),
        Some("127.0.0.1".into()),
    ));
    let dispatchers = [
        Dispatcher::new(
            SocketKind::Commanding,
            cmd,
            Arc::new(Minimal),
            info.clone(),
            Limits::default(),
        ),
        Dispatcher::new(SocketKind::Service, svc, Arc::new(Minimal), info, Limits::default()),
    ];
    let ping = encode(&Value::str("Ping"));
    for (path, data) in inputs("dispatch") {
        println!("{}", path.display());
        for d in &dispatchers {
            // Every input here is a request the original mishandled or one that once mattered: each must be
            // refused with a Failure, and the dispatcher must go on answering.
            let (reply, _) = d.dispatch(&data).await;
            let reply = decode(&reply, &Limits::default()).expect("every reply is a pickle we can read");
            assert!(
                reply.as_object().is_some_and(|o| o.is("egse.response", "Failure")),
                "{}: not a Failure: {reply:?}",
                path.display()
            );
            let (pong, _) = d.dispatch(&ping).await;
            assert_eq!(decode(&pong, &Limits::default()), Ok(Value::str("Pong")));
        }
    }
}
