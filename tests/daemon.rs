//! The daemon end to end, in-process on loopback with OS-assigned ports: built-ins, both command tables,
//! every kind of bad input (each followed by a `Ping` that must still get `Pong`), monitoring, and the
//! orderly shutdown.

use std::time::{Duration, Instant};

use procman::client::{command_execution, ControlClient};
use procman::codec::{self, Limits, Value};
use procman::config::{Env, Settings};
use procman::daemon::{self, DaemonConfig, RunningDaemon};
use procman::logging::RecordingLogControl;
use procman::protocol::{failure_message, load_tables};
use zeromq::{Socket, SocketRecv};

const T: Duration = Duration::from_secs(5);

/// No CGSE peers in these tests: their ports point at port 1 on loopback, where nothing listens, so the
/// daemon runs on its embedded defaults and never talks to services of the host.
const PEERS: &str =
    "Service Registry:\n    HOSTNAME: 127.0.0.1\n    REQUESTER_PORT: 1\n    HEARTBEAT_PORT: 1\n    PUBLISHER_PORT: 1\n\
    Storage Manager Control Server:\n    HOSTNAME: 127.0.0.1\n    COMMANDING_PORT: 1\n\
    Configuration Manager Control Server:\n    HOSTNAME: 127.0.0.1\n    COMMANDING_PORT: 1\n\
    Notify Hub:\n    HOSTNAME: 127.0.0.1\n    PUBLISHER_PORT: 1\n";

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("procman-it-{tag}-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// zmq.rs's maximum message size is process-wide and every `daemon::start` sets it: the test that
/// depends on it holds this exclusively, every start holds it shared.
static FRAME_LIMIT: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// A daemon on 127.0.0.1 with ports 0, its state under a temp dir, and `extra` settings YAML.
async fn start(extra: &str) -> (RunningDaemon, std::path::PathBuf) {
    let _limit = FRAME_LIMIT.read().await;
    let dir = tempdir("d");
    let mut s = Settings::defaults().unwrap();
    let yaml = format!(
        "Process Manager Control Server:\n    COMMANDING_PORT: 0\n    MONITORING_PORT: 0\n    SERVICE_PORT: 0\n\
         {PEERS}Procman:\n    BIND_ADDRESS: 127.0.0.1\n    STATE_DIR: {}\n    STOP_CHILDREN_ON_EXIT: true\n{extra}",
        dir.display()
    );
    s.merge_yaml(&yaml, "test").unwrap();
    let config = DaemonConfig::from_parts(s, Env::from_lookup(|_| None)).unwrap();
    let integrations = procman::assemble::integrations(&config).await.unwrap();
    let d = daemon::start(
        config,
        integrations,
        std::sync::Arc::new(RecordingLogControl::default()),
    )
    .await
    .unwrap();
    (d, dir)
}

fn cmd_client(d: &RunningDaemon) -> ControlClient {
    ControlClient::new(format!("tcp://127.0.0.1:{}", d.ports.commanding), T)
}

fn svc_client(d: &RunningDaemon) -> ControlClient {
    ControlClient::new(format!("tcp://127.0.0.1:{}", d.ports.service), T)
}

/// Send raw bytes on a fresh socket and decode the reply.
async fn raw(port: u16, bytes: Vec<u8>) -> Value {
    let mut req = procman::transport::ReqClient::new(format!("tcp://127.0.0.1:{port}"));
    let reply = req.request(bytes, T).await.expect("a reply to every request");
    codec::decode(&reply, &Limits::default()).expect("a decodable reply")
}

async fn assert_pong(c: &mut ControlClient) {
    assert!(c.ping(T).await, "daemon must keep serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtins_and_tables() {
    let (d, _dir) = start("").await;
    let mut c = cmd_client(&d);
    assert!(c.ping(T).await);
    assert_eq!(
        c.request(&Value::str("get_commanding_port")).await.unwrap(),
        Value::Int(d.ports.commanding.into())
    );
    assert_eq!(
        c.request(&Value::str("get_monitoring_port")).await.unwrap(),
        Value::Int(d.ports.monitoring.into())
    );
    assert_eq!(
        c.request(&Value::str("get_service_port")).await.unwrap(),
        Value::Int(d.ports.service.into())
    );
    assert_eq!(
        c.request(&Value::str("get_storage_mnemonic")).await.unwrap(),
        Value::str("PM")
    );
    assert!(matches!(
        c.request(&Value::str("get_ip_address")).await.unwrap(),
        Value::Str(_) | Value::None
    ));
    let dict = Value::dict([("cmd", Value::str("get_service_port")), ("args", Value::List(vec![]))]);
    assert_eq!(c.request(&dict).await.unwrap(), Value::Int(d.ports.service.into()));

    let (cmd_table, svc_table) = load_tables().unwrap();
    let names = c.load_commands().await.unwrap();
    assert_eq!(names, cmd_table.names().map(str::to_owned).collect::<Vec<_>>());
    assert_eq!(
        c.request(&Value::str("send_commands")).await.unwrap(),
        cmd_table.send_commands_reply()
    );
    let mut s = svc_client(&d);
    assert_eq!(
        s.load_commands().await.unwrap(),
        svc_table.names().map(str::to_owned).collect::<Vec<_>>()
    );
    assert_eq!(
        s.call("get_cs_module", vec![], vec![]).await.unwrap(),
        Value::str("egse.procman.procman_cs")
    );
    d.stop();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_failure_and_the_daemon_keeps_serving() {
    // A small frame limit so that "over the limit" is cheap to send.
    let (d, _dir) = start("    MAX_FRAME_BYTES: 1048576\n").await;
    // No other daemon may start (and raise the process-wide transport limit) while we rely on it.
    let _limit = FRAME_LIMIT.write().await;
    zeromq::limits::set_max_message_size(2 * 1048576);
    let port = d.ports.commanding;
    let mut c = cmd_client(&d);
    let ping = codec::encode(&Value::str("Ping"));

    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "random bytes",
            (0..200u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
        ),
        ("empty frame", vec![]),
        ("truncated pickle", ping[..ping.len() - 3].to_vec()),
        (
            "pickle naming os.system",
            b"\x80\x04\x95\x1e\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x8c\x06system\x93\x8c\x0btouch /tmp/x\x85R."
                .to_vec(),
        ),
        (
            "garbage after a valid pickle",
            [ping.clone(), b"junk".to_vec()].concat(),
        ),
    ];
    let mut deep = vec![0x80, 0x04];
    deep.extend(std::iter::repeat_n(b']', 100_000));
    deep.extend(std::iter::repeat_n(b'a', 99_999));
    deep.push(b'.');
    cases.push(("100,000-deep nesting", deep));
    let over = |n: usize| {
        let mut v = vec![0x80, 0x04, 0x42];
        v.extend((n as u32).to_le_bytes());
        v.extend(vec![b'x'; n]);
        v.push(b'.');
        v
    };
    cases.push(("frame over the size limit", over(3 * 1024 * 1024 / 2)));
    for (what, bytes) in cases {
        let reply = raw(port, bytes).await;
        let msg = failure_message(&reply).unwrap_or_else(|| panic!("{what}: expected a Failure, got {reply:?}"));
        assert!(msg.starts_with("Invalid command"), "{what}: {msg}");
        assert_pong(&mut c).await;
    }
    // Far over the limit (more than twice): the transport drops that peer instead of buffering it.
    let mut req = procman::transport::ReqClient::new(format!("tcp://127.0.0.1:{port}"));
    assert!(req
        .request(over(3 * 1024 * 1024), Duration::from_secs(2))
        .await
        .is_err());
    assert_pong(&mut c).await;
    // An unknown command, as a string and as a command execution.
    let reply = c.request(&Value::str("launch_missiles")).await.unwrap();
    assert_eq!(failure_message(&reply).unwrap(), "Invalid command: launch_missiles");
    let fake = Value::new_object(
        "egse.procman",
        "ProcessManagerCommand",
        Value::dict([("_name", Value::str("rm_rf"))]),
    );
    let reply = c.request(&command_execution(fake, vec![], vec![])).await.unwrap();
    assert_eq!(failure_message(&reply).unwrap(), "Invalid command: rm_rf");
    assert_pong(&mut c).await;
    // A command with wrong arguments, on both sockets.
    let reply = c
        .call("get_core_processes", vec![Value::Int(1), Value::Int(2)], vec![])
        .await
        .unwrap();
    assert_eq!(
        failure_message(&reply).unwrap(),
        "Executing get_core_processes failed: get_core_processes() takes 0 positional arguments but 2 were given"
    );
    let mut s = svc_client(&d);
    for args in [
        vec![Value::Int(0)],
        vec![Value::Float(-2.0)],
        vec![Value::str("fast")],
        vec![],
    ] {
        let reply = s.call("set_monitoring_frequency", args, vec![]).await.unwrap();
        assert!(failure_message(&reply)
            .unwrap()
            .starts_with("Executing set_monitoring_frequency failed"));
    }
    let reply = s
        .call(
            "set_logging_level",
            vec![Value::str("all")],
            vec![(Value::str("level"), Value::str("x"))],
        )
        .await
        .unwrap();
    assert!(failure_message(&reply).is_some());
    let reply = s
        .call("add_listener", vec![Value::str("not a dict")], vec![])
        .await
        .unwrap();
    assert!(
        matches!(reply, Value::Tuple(ref t) if t[0] == Value::str("NACK")),
        "{reply:?}"
    );
    assert!(s.ping(T).await);
    assert_pong(&mut c).await;
    d.stop();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_frame_length_cannot_kill_the_daemon() {
    use std::io::{Read, Write};
    let (d, _dir) = start("").await;
    let port = d.ports.commanding;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut greeting = vec![0xffu8];
    greeting.extend([0u8; 8]);
    greeting.extend([0x7f, 3, 0]);
    greeting.extend(b"NULL");
    greeting.extend([0u8; 16 + 1 + 31]);
    s.write_all(&greeting).unwrap();
    let mut back = [0u8; 64];
    s.read_exact(&mut back).unwrap();
    let mut ready = vec![0x05];
    ready.extend(b"READY");
    ready.push(11);
    ready.extend(b"Socket-Type");
    ready.extend(3u32.to_be_bytes());
    ready.extend(b"REQ");
    s.write_all(&[0x04, ready.len() as u8]).unwrap();
    s.write_all(&ready).unwrap();
    // A message frame announcing 1 TiB.
    s.write_all(&[0x02]).unwrap();
    s.write_all(&(1u64 << 40).to_be_bytes()).unwrap();
    s.write_all(&[b'x'; 100]).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_pong(&mut cmd_client(&d)).await;
    d.stop();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_completes_the_handshake_is_dropped() {
    use std::io::{Read, Write};
    let (d, _dir) = start("    HANDSHAKE_TIMEOUT: 0.3\n").await;
    // The limit is process-wide and every start sets it: no other daemon may start meanwhile.
    let _limit = FRAME_LIMIT.write().await;
    zeromq::limits::set_handshake_timeout(Duration::from_millis(300));
    let port = d.ports.commanding;
    // Ten bytes of a greeting, then silence (a half-open or stalled peer).
    let mut stalled = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stalled.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stalled.write_all(&[0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0x7f]).unwrap();
    // A connection that says nothing at all.
    let mut mute = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    mute.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // A real client that handshakes, then idles well past the limit: it is not affected.
    let mut c = cmd_client(&d);
    assert_pong(&mut c).await;
    let t0 = std::time::Instant::now();
    for (name, s) in [("stalled", &mut stalled), ("mute", &mut mute)] {
        // Our side of the greeting may arrive first; the connection must then end (EOF or reset).
        let mut buf = [0u8; 256];
        let closed = loop {
            match s.read(&mut buf) {
                Ok(0) => break true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                    break false
                }
                Err(_) => break true,
            }
        };
        assert!(closed, "{name}: connection still open after {:?}", t0.elapsed());
    }
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "closed only after {:?}",
        t0.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_pong(&mut c).await;
    assert_pong(&mut cmd_client(&d)).await;
    zeromq::limits::set_handshake_timeout(Duration::from_secs(10));
    d.stop();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitoring_publishes_status_at_the_configured_delay() {
    let (d, _dir) = start("").await;
    let mut s = svc_client(&d);
    assert_eq!(
        s.call("set_monitoring_frequency", vec![Value::Float(4.0)], vec![])
            .await
            .unwrap(),
        Value::Float(250.0)
    );
    let mut sub = zeromq::SubSocket::new();
    sub.connect(&format!("tcp://127.0.0.1:{}", d.ports.monitoring))
        .await
        .unwrap();
    sub.subscribe("").await.unwrap();
    let mut stamps = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while stamps.len() < 4 && Instant::now() < deadline {
        let msg = tokio::time::timeout(Duration::from_secs(2), sub.recv())
            .await
            .unwrap()
            .unwrap();
        let frames = msg.into_vec();
        assert_eq!(frames.len(), 1, "one frame, no topic");
        let v = codec::decode(&frames[0], &Limits::default()).unwrap();
        if v.get("PID").is_some() {
            assert_eq!(v.get("delay"), Some(&Value::Float(250.0)));
            assert!(v.get("UUID").and_then(Value::as_object).unwrap().is("uuid", "UUID"));
            stamps.push(Instant::now());
        }
    }
    assert_eq!(stamps.len(), 4);
    // Never faster than the delay; on average clearly the 250 ms asked for, not the 1 s default (the
    // bound leaves room for a loaded machine; the precise intervals are the benchmark's job).
    let gaps: Vec<Duration> = stamps.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.iter().all(|g| *g > Duration::from_millis(150)), "{gaps:?}");
    let mean = gaps.iter().sum::<Duration>() / gaps.len() as u32;
    assert!(mean < Duration::from_millis(800), "{gaps:?}");
    d.stop();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quit_server_replies_then_shuts_down_in_order() {
    let (d, _dir) = start("").await;
    let mut s = svc_client(&d);
    let token = d.shutdown_token();
    let reply = s.call("quit_server", vec![], vec![]).await.unwrap();
    assert_eq!(reply, Value::str("Sent interrupt to ProcessManagerControlServer."));
    assert!(token.is_cancelled());
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(2), d.wait())
        .await
        .expect("shutdown within 2 s");
    assert!(started.elapsed() < Duration::from_secs(2));
    // Nothing listens any more.
    assert!(
        !ControlClient::new(s.endpoint(), Duration::from_millis(300))
            .ping(Duration::from_millis(300))
            .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_port_is_an_error_naming_it() {
    let (d, _dir) = start("").await;
    let mut s = Settings::defaults().unwrap();
    s.merge_yaml(
        &format!(
            "Process Manager Control Server:\n    COMMANDING_PORT: {}\nProcman:\n    BIND_ADDRESS: 127.0.0.1\n",
            d.ports.commanding
        ),
        "test",
    )
    .unwrap();
    let config = DaemonConfig::from_parts(s, Env::from_lookup(|_| None)).unwrap();
    let integrations = procman::daemon::Integrations {
        commanding: std::sync::Arc::new(NoCommands),
        storage: std::sync::Arc::new(procman::storage::LocalCsv::new(tempdir("csv"), "T".into(), "PM".into())),
        housekeeping: procman::housekeeping::Housekeeping::new(
            std::sync::Arc::new(procman::monitor::StatusSampler::new()),
            None,
        ),
        lifecycle: vec![],
        events: None,
        sampler: std::sync::Arc::new(procman::monitor::StatusSampler::new()),
    };
    let err = daemon::start(
        config,
        integrations,
        std::sync::Arc::new(RecordingLogControl::default()),
    )
    .await
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains(&d.ports.commanding.to_string()), "{err}");
    d.stop();
    d.wait().await;
}

struct NoCommands;
impl procman::server::Handler for NoCommands {
    fn handle(&self, call: procman::server::Call) -> procman::server::HandlerFuture<'_> {
        Box::pin(async move { Err(procman::server::CommandError::Unknown(call.name)) })
    }
}
