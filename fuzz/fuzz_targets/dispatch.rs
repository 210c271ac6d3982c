//! A request frame through `server::Dispatcher::dispatch`, on the commanding and on the service table, with a
//! minimal handler that binds arguments like the real ones. Every frame must get exactly one reply, the
//! reply must be a pickle our decoder reads, and nothing may panic (a handler panic is caught by design, so
//! the handler here never panics: any panic is the dispatcher's).
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use procman::codec::{decode, Limits, Value};
use procman::protocol::{self, SocketKind};
use procman::server::{Call, CommandError, Dispatcher, Handler, HandlerFuture, Ports, ServerInfo};

/// Binds one required and one optional argument, then answers with what it got.
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

struct World {
    rt: tokio::runtime::Runtime,
    dispatchers: Vec<Dispatcher>,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let (cmd, svc) = protocol::load_tables().expect("the embedded command tables load");
        let info = Arc::new(ServerInfo::new(
            Ports {
                commanding: 6120,
                monitoring: 6121,
                service: 6122,
            },
            "PM".into(),
            Some("127.0.0.1".into()),
        ));
        let limits = Limits::default();
        World {
            rt: tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("a runtime"),
            dispatchers: vec![
                Dispatcher::new(
                    SocketKind::Commanding,
                    cmd,
                    Arc::new(Minimal),
                    info.clone(),
                    limits.clone(),
                ),
                Dispatcher::new(SocketKind::Service, svc, Arc::new(Minimal), info, limits),
            ],
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    for d in &w.dispatchers {
        let (reply, _) = w.rt.block_on(d.dispatch(data));
        decode(&reply, &Limits::default()).expect("every reply is a pickle we can read");
    }
});
