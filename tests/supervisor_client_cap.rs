//! Finding 2 of issue 13: client-created definitions are capped and removed (with their FIFOs, descriptors
//! and log tail) when their process ends. Alone in its test binary because it counts the process's open
//! descriptors, which other tests running in parallel would change.

mod supervisor_util;

use std::time::Duration;

use procman::supervisor::{ProcessState, RestartPolicy, SupervisorError, STATE_FILE};
use supervisor_util::{config, def, eventually, Harness, TempDir};

const T: Duration = Duration::from_secs(15);

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

/// Finding 2: client-created definitions are capped, and each is removed (FIFOs, descriptors, log tail)
/// when its process is stopped or exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_definitions_are_capped_and_removed_when_they_end() {
    let dir = TempDir::new("cap");
    let mut cfg = config(dir.path());
    cfg.max_client_processes = 3;
    let h = Harness::start_with(dir, cfg, vec![], None);
    let fds_before = open_fds();
    for i in 0..3 {
        let id = format!("cap-{i}");
        h.guard.track_id(&id);
        h.sup.define_client(def(&id, &["sleep", "1000"])).await.unwrap();
        h.sup.start(&id).await.unwrap();
        h.wait_state(&id, ProcessState::Running, T).await;
    }
    let fds_full = open_fds();
    let refused = h.sup.define_client(def("cap-3", &["sleep", "1000"])).await;
    assert!(matches!(refused, Err(SupervisorError::Limit(_))), "{refused:?}");
    assert!(h.sup.get("cap-3").is_err());

    // A stop removes the definition: the id, its FIFOs and its descriptors go.
    let fifo = h.dir.path().join("state/fifo/cap-0.stdout");
    assert!(fifo.exists());
    h.sup.stop("cap-0").await.unwrap();
    assert!(
        eventually(T, || h.sup.get("cap-0").is_err()).await,
        "stopped client definition removed"
    );
    assert!(!fifo.exists(), "FIFO removed");
    // Room for a new one now; one whose program exits is removed as well.
    let mut quick = def("cap-quick", &["true"]);
    quick.restart = RestartPolicy::Never;
    h.sup.define_client(quick).await.unwrap();
    h.sup.start("cap-quick").await.unwrap();
    assert!(
        eventually(T, || h.sup.get("cap-quick").is_err()).await,
        "exited client definition removed"
    );
    for i in 1..3 {
        h.sup.stop(&format!("cap-{i}")).await.unwrap();
    }
    assert!(eventually(T, || h.sup.list().1.is_empty()).await, "all removed");
    // Their descriptors (two FIFO readers and two log files each) are released.
    let released = eventually(T, || open_fds() <= fds_before + 2).await;
    let fds_after = open_fds();
    println!("open fds: before {fds_before}, with 3 client definitions {fds_full}, after their removal {fds_after}");
    assert!(released, "fds before {fds_before}, after {fds_after}");
    // Nothing of them is left in the state file either.
    h.sup.flush_state().await;
    let text = std::fs::read_to_string(h.dir.path().join("state").join(STATE_FILE)).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["processes"].as_array().map(Vec::len), Some(0), "{text}");
    h.sup.shutdown(true).await;
}
