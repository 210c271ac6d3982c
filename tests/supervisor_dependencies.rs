//! `depends_on` at run time: start order with readiness, stop order at shutdown, the restart hook before a
//! CGSE service comes back; and the table side (cycles, unknown ids, TCP readiness). Bounded; kills what it
//! started.

mod supervisor_util;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use procman::supervisor::{
    DefinitionError, EventKind, PingTarget, ProcessDefinition, ProcessState, ProcessTable, Readiness, ReadinessProbe,
    RestartHook, SupervisorHandle,
};
use supervisor_util::{config, def, Harness, TempDir};

const T: Duration = Duration::from_secs(10);

/// Ready when the flag is set (the test decides when a dependency becomes ready).
struct FlagProbe(Arc<AtomicBool>);

impl ReadinessProbe for FlagProbe {
    fn probe(&self, _def: &ProcessDefinition) -> Pin<Box<dyn Future<Output = bool> + Send + 'static>> {
        let ready = self.0.load(Ordering::SeqCst);
        Box::pin(async move { ready })
    }
}

fn with_readiness(mut d: ProcessDefinition) -> ProcessDefinition {
    d.readiness = Some(Readiness {
        ping: PingTarget::Endpoint("tcp://127.0.0.1:1".into()),
        timeout: Duration::from_secs(60),
        interval: Duration::from_millis(20),
    });
    d
}

fn index_of(events: &[procman::supervisor::ProcessEvent], id: &str, state: ProcessState) -> usize {
    events
        .iter()
        .position(|e| e.id == id && e.kind == EventKind::State && e.new_state == state)
        .unwrap_or_else(|| panic!("no {state} event of {id}: {events:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dependents_wait_for_ready_dependencies_and_stop_first() {
    let mut registry = with_readiness(def("dep-registry", &["sleep", "1000"]));
    registry.autostart = true;
    let mut sm = def("dep-sm", &["sleep", "1000"]);
    sm.depends_on = vec!["dep-registry".into()];
    sm.autostart = true;
    let mut logger = def("dep-logger", &["sleep", "1000"]);
    logger.depends_on = vec!["dep-registry".into()];
    logger.autostart = true;
    let mut cm = def("dep-cm", &["sleep", "1000"]);
    cm.depends_on = vec!["dep-sm".into(), "dep-registry".into()];
    cm.autostart = true;
    let ready = Arc::new(AtomicBool::new(false));
    let dir = TempDir::new("deps");
    let cfg = config(dir.path());
    // Dependents first in the list: the order comes from depends_on, not from the list.
    let h = Harness::start_with(
        dir,
        cfg,
        vec![cm, sm, logger, registry],
        Some(Arc::new(FlagProbe(ready.clone()))),
    );
    h.wait_state("dep-registry", ProcessState::Starting, T).await;
    let waiting = h.wait_state("dep-cm", ProcessState::Backoff, T).await;
    assert_eq!(waiting.pid, None);
    assert!(
        waiting.last_error.as_deref().is_some_and(|e| e.contains("dep-sm")),
        "{waiting:?}"
    );
    let sm_waiting = h.sup.get("dep-sm").unwrap();
    assert_eq!(sm_waiting.state, ProcessState::Backoff);
    assert_eq!(sm_waiting.last_error.as_deref(), Some("waiting for dep-registry"));

    ready.store(true, Ordering::SeqCst);
    // The recorded events, not the table: events reach the recorder task after the table changes, in order,
    // so once these two are recorded every earlier one is too.
    h.wait_event(T, |e| e.id == "dep-cm" && e.new_state == ProcessState::Running)
        .await;
    h.wait_event(T, |e| e.id == "dep-logger" && e.new_state == ProcessState::Running)
        .await;
    assert_eq!(
        h.sup.get("dep-cm").unwrap().last_error,
        None,
        "the waiting message is gone"
    );
    let events = h.events.lock().unwrap().clone();
    let reg_running = index_of(&events, "dep-registry", ProcessState::Running);
    let sm_starting = index_of(&events, "dep-sm", ProcessState::Starting);
    let sm_running = index_of(&events, "dep-sm", ProcessState::Running);
    let logger_starting = index_of(&events, "dep-logger", ProcessState::Starting);
    let cm_starting = index_of(&events, "dep-cm", ProcessState::Starting);
    assert!(reg_running < sm_starting && reg_running < logger_starting, "{events:?}");
    assert!(sm_running < cm_starting, "{events:?}");

    assert_eq!(
        h.sup.stop_order(),
        vec![
            vec!["dep-cm".to_owned()],
            vec!["dep-sm".to_owned(), "dep-logger".to_owned()],
            vec!["dep-registry".to_owned()]
        ]
    );
    let before = h.events.lock().unwrap().len();
    h.sup.shutdown(true).await;
    h.wait_event(T, |e| e.id == "dep-registry" && e.new_state == ProcessState::Stopped)
        .await;
    let events = h.events.lock().unwrap()[before..].to_vec();
    let cm_stopped = index_of(&events, "dep-cm", ProcessState::Stopped);
    let sm_stopping = index_of(&events, "dep-sm", ProcessState::Stopping);
    let sm_stopped = index_of(&events, "dep-sm", ProcessState::Stopped);
    let logger_stopped = index_of(&events, "dep-logger", ProcessState::Stopped);
    let reg_stopping = index_of(&events, "dep-registry", ProcessState::Stopping);
    assert!(cm_stopped < sm_stopping, "{events:?}");
    assert!(sm_stopped < reg_stopping && logger_stopped < reg_stopping, "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_while_waiting_cancels_the_start() {
    let mut d = def("wait-alone", &["sleep", "1000"]);
    d.depends_on = vec!["wait-missing".into()];
    d.autostart = true;
    let h = Harness::start("wait", vec![d]);
    let r = h.wait_state("wait-alone", ProcessState::Backoff, T).await;
    assert_eq!(r.last_error.as_deref(), Some("waiting for wait-missing"));
    h.sup.stop("wait-alone").await.unwrap();
    let r = h.wait_state("wait-alone", ProcessState::Stopped, T).await;
    assert_eq!(r.last_error, None);
    // Defining the dependency later does not start the stopped process.
    h.sup.define(def("wait-missing", &["sleep", "1000"])).await.unwrap();
    h.sup.start("wait-missing").await.unwrap();
    h.wait_state("wait-missing", ProcessState::Running, T).await;
    h.sup.flush_state().await;
    assert_eq!(h.sup.get("wait-alone").unwrap().state, ProcessState::Stopped);
    h.sup.shutdown(true).await;
}

/// What the hook saw of the process each time it ran: its state and pid.
type Seen = Arc<Mutex<Vec<(ProcessState, Option<i32>)>>>;

/// Records the state of the process when the hook runs.
struct RecordingHook {
    sup: Arc<Mutex<Option<SupervisorHandle>>>,
    seen: Seen,
}

impl RestartHook for RecordingHook {
    fn before_restart(&self, def: &ProcessDefinition) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        let sup = self.sup.lock().unwrap().clone();
        let seen = self.seen.clone();
        let id = def.id.clone();
        Box::pin(async move {
            if let Some(r) = sup.and_then(|s| s.get(&id).ok()) {
                seen.lock().unwrap().push((r.state, r.pid));
            }
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_restart_hook_runs_before_a_cgse_service_comes_back() {
    let mut sm = def("hook-sm", &["sleep", "1000"]);
    sm.service_type = Some("SM_CS".into());
    sm.autostart = true;
    sm.backoff.jitter = 0.0;
    let mut plain = def("hook-plain", &["sleep", "1000"]);
    plain.autostart = true;
    let h = Harness::start("hook", vec![sm, plain]);
    let slot = Arc::new(Mutex::new(Some(h.sup.clone())));
    let seen = Arc::new(Mutex::new(Vec::new()));
    h.sup.set_restart_hook(Arc::new(RecordingHook {
        sup: slot.clone(),
        seen: seen.clone(),
    }));
    let first = h.wait_state("hook-sm", ProcessState::Running, T).await;
    assert!(seen.lock().unwrap().is_empty(), "not on the first start");
    let plain_pid = h.wait_state("hook-plain", ProcessState::Running, T).await.pid.unwrap();

    kill(Pid::from_raw(first.pid.unwrap()), Signal::SIGKILL).unwrap();
    h.wait_event(T, |e| {
        e.id == "hook-sm" && e.new_state == ProcessState::Starting && e.pid != first.pid
    })
    .await;
    assert_eq!(
        seen.lock().unwrap().as_slice(),
        &[(ProcessState::Backoff, None)],
        "called once, while the process was down"
    );
    // A process without service_type restarts without the hook.
    kill(Pid::from_raw(plain_pid), Signal::SIGKILL).unwrap();
    h.wait_event(T, |e| {
        e.id == "hook-plain" && e.new_state == ProcessState::Running && e.pid != Some(plain_pid)
    })
    .await;
    assert_eq!(seen.lock().unwrap().len(), 1);
    slot.lock().unwrap().take();
    h.sup.shutdown(true).await;
}

const TABLE: &str = r#"
core_services:
  Service Registry:
    argv: [reg_cs, start]
    readiness:
      tcp: {port: 4242}
      timeout: 10
  Storage Manager:
    argv: [sm_cs, start]
    depends_on: [Service Registry]
  Configuration Manager:
    argv: [cm_cs, start]
    depends_on: [Service Registry, Storage Manager]
devices:
  DUMMY_01:
    argv: [dummy_cs, start]
    depends_on: [Configuration Manager]
"#;

#[test]
fn the_table_orders_core_services_and_devices() {
    let t = ProcessTable::from_yaml(TABLE, "lab.yaml").unwrap();
    let layers = t.start_layers().unwrap();
    assert_eq!(
        layers,
        vec![
            vec!["Service Registry"],
            vec!["Storage Manager"],
            vec!["Configuration Manager"],
            vec!["DUMMY_01"]
        ]
    );
    let stop: Vec<Vec<String>> = layers.into_iter().rev().collect();
    assert_eq!(t.stop_order().unwrap(), stop);
    let core = t.core_definitions().unwrap();
    assert_eq!(
        core[0].readiness.as_ref().unwrap().ping,
        PingTarget::Tcp {
            host: "127.0.0.1".into(),
            port: 4242
        }
    );
    assert_eq!(core[2].depends_on, ["Service Registry", "Storage Manager"]);
}

fn refused(text: &str) -> String {
    match ProcessTable::from_yaml(text, "lab.yaml") {
        Err(e @ DefinitionError::Invalid { .. }) => e.to_string(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_cycle_is_refused_naming_its_ids() {
    let text = TABLE.replace(
        "    argv: [sm_cs, start]\n    depends_on: [Service Registry]",
        "    argv: [sm_cs, start]\n    depends_on: [Service Registry, DUMMY_01]",
    );
    let msg = refused(&text);
    assert!(msg.starts_with("lab.yaml: "), "{msg}");
    assert!(
        msg.contains("dependency cycle: Storage Manager → DUMMY_01 → Configuration Manager → Storage Manager"),
        "{msg}"
    );
}

#[test]
fn unknown_ids_and_misplaced_dependencies_are_refused() {
    let msg = refused(&TABLE.replace("depends_on: [Configuration Manager]", "depends_on: [Confman]"));
    assert!(msg.contains("devices.DUMMY_01.depends_on"), "{msg}");
    assert!(
        msg.contains("DUMMY_01 depends on Confman, which is not defined"),
        "{msg}"
    );

    let msg = refused(&format!("defaults:\n  depends_on: [Storage Manager]\n{TABLE}"));
    assert!(msg.contains("defaults.depends_on"), "{msg}");

    let msg = refused(&format!(
        "{TABLE}device_classes:\n  egse.dummy.DummyProxy:\n    argv: [x]\n    depends_on: [Nope]\n"
    ));
    assert!(msg.contains("device_classes.egse.dummy.DummyProxy.depends_on"), "{msg}");
}

#[test]
fn tcp_readiness_is_validated() {
    let msg = refused(&TABLE.replace("tcp: {port: 4242}", "tcp: {port: 4242}\n      ping: {registry: true}"));
    assert!(msg.contains("exactly one of `ping` or `tcp`"), "{msg}");
    let msg = refused(&TABLE.replace("tcp: {port: 4242}", "tcp: {port: 0}"));
    assert!(msg.contains("readiness.tcp"), "{msg}");
    let t = ProcessTable::from_yaml(
        &TABLE.replace("tcp: {port: 4242}", "tcp: {port: 4242, host: localhost}"),
        "lab.yaml",
    )
    .unwrap();
    assert_eq!(
        t.core_definitions().unwrap()[0].readiness.as_ref().unwrap().ping,
        PingTarget::Tcp {
            host: "localhost".into(),
            port: 4242
        }
    );
}

#[test]
fn the_shipped_lab_table_brings_the_core_up_in_order() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("settings/lab.yaml");
    let t = ProcessTable::load(&path).unwrap();
    assert_eq!(
        t.start_layers().unwrap(),
        vec![
            vec!["Service Registry"],
            vec!["Logger", "Notification Hub", "Metrics Hub"],
            vec!["Storage Manager"],
            vec!["Configuration Manager"],
        ]
    );
    let core = t.core_definitions().unwrap();
    assert!(core.iter().all(|d| d.autostart));
    assert_eq!(
        core[0].readiness.as_ref().unwrap().ping,
        PingTarget::Tcp {
            host: "127.0.0.1".into(),
            port: 6100
        }
    );
}
