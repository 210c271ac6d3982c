//! Supervisor figures (no assertions): start 50 `sleep 1000`, `list()` latency, crash → restart latency with
//! zero backoff, stop all 50. Run with `cargo run --release --example supervisor_bench`.

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use procman::supervisor::{ProcessDefinition, ProcessEvent, ProcessState, Supervisor, SupervisorConfig};
use tokio::sync::mpsc;

const N: usize = 50;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Waits until `count` events match `pred`, consuming the channel.
async fn wait_events(
    rx: &mut mpsc::Receiver<ProcessEvent>,
    count: usize,
    pred: impl Fn(&ProcessEvent) -> bool,
) -> Option<ProcessEvent> {
    let mut seen = 0;
    let mut last = None;
    while seen < count {
        let e = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await.ok()??;
        if pred(&e) {
            seen += 1;
            last = Some(e);
        }
    }
    last
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("procman-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = SupervisorConfig::new(dir.join("state"), dir.join("log"));
    let mut defs: Vec<ProcessDefinition> = (0..N)
        .map(|i| {
            let mut d = ProcessDefinition::new(format!("p{i:02}"), vec!["sleep".into(), "1000".into()]);
            d.stop_timeout = Duration::from_secs(5);
            d
        })
        .collect();
    // The crash target: zero backoff, no crash-loop limit.
    let mut crash = ProcessDefinition::new("crash", vec!["sleep".into(), "1000".into()]);
    crash.backoff.initial = Duration::ZERO;
    crash.backoff.jitter = 0.0;
    crash.crash_loop.max_starts = 0;
    defs.push(crash);

    let (tx, mut rx) = mpsc::channel(100_000);
    let rss0 = rss_kib();
    let sup = Supervisor::spawn(cfg, defs, tx, None)?;
    println!("supervisor_bench: {N} × `sleep 1000`, 2 tokio workers, RSS before spawn {rss0} KiB");

    // 1. Start 50, time until all RUNNING.
    let t0 = Instant::now();
    for i in 0..N {
        sup.start(&format!("p{i:02}")).await?;
    }
    let issued = t0.elapsed();
    wait_events(&mut rx, N, |e| {
        e.new_state == ProcessState::Running && e.id.starts_with('p')
    })
    .await;
    let all_running = t0.elapsed();
    println!(
        "start {N}: all start() calls returned after {:.1} ms; all RUNNING after {:.1} ms",
        ms(issued),
        ms(all_running)
    );
    println!("RSS with {N} children: {} KiB", rss_kib());

    // 2. list() of 50 (+1), 1000 calls.
    let mut lat = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let t = Instant::now();
        let (_, l) = sup.list();
        lat.push(t.elapsed());
        assert_eq!(l.len(), N + 1);
    }
    lat.sort();
    println!(
        "list() of {} records: p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
        N + 1,
        percentile(&lat, 0.5).as_secs_f64() * 1e6,
        percentile(&lat, 0.99).as_secs_f64() * 1e6,
        lat[lat.len() - 1].as_secs_f64() * 1e6
    );

    // 3. Crash → restart with zero backoff, 20 times.
    sup.start("crash").await?;
    let mut pid = wait_events(&mut rx, 1, |e| e.id == "crash" && e.new_state == ProcessState::Running)
        .await
        .and_then(|e| e.pid)
        .ok_or("crash target did not start")?;
    let mut detect = Vec::new();
    let mut restart = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        kill(Pid::from_raw(pid), Signal::SIGKILL)?;
        let old = pid;
        wait_events(&mut rx, 1, |e| e.id == "crash" && e.new_state == ProcessState::Backoff).await;
        detect.push(t.elapsed());
        let ev = wait_events(&mut rx, 1, |e| {
            e.id == "crash" && e.new_state == ProcessState::Running && e.pid != Some(old)
        })
        .await
        .ok_or("no restart")?;
        restart.push(t.elapsed());
        pid = ev.pid.ok_or("no pid")?;
    }
    detect.sort();
    restart.sort();
    println!(
        "kill -9 → exit detected: p50 {:.2} ms, max {:.2} ms; → new pid RUNNING: p50 {:.2} ms, max {:.2} ms (20 kills, zero backoff); restarts = {}",
        ms(percentile(&detect, 0.5)),
        ms(detect[detect.len() - 1]),
        ms(percentile(&restart, 0.5)),
        ms(restart[restart.len() - 1]),
        sup.get("crash")?.restarts
    );

    // 4. Stop all 50, time until all STOPPED.
    let t0 = Instant::now();
    for i in 0..N {
        sup.stop(&format!("p{i:02}")).await?;
    }
    let issued = t0.elapsed();
    wait_events(&mut rx, N, |e| {
        e.new_state == ProcessState::Stopped && e.id.starts_with('p')
    })
    .await;
    println!(
        "stop {N}: all stop() calls returned after {:.1} ms; all STOPPED (groups empty) after {:.1} ms",
        ms(issued),
        ms(t0.elapsed())
    );
    println!("events dropped: {}", sup.dropped_events());
    sup.shutdown(true).await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
