//! The floor under "start 100 processes": how long this machine takes to spawn `N` processes one after the
//! other, the way the supervisor spawns them (own process group, stdin from /dev/null, output redirected),
//! with no daemon, no protocol and no bookkeeping. `bench/bench.py` prints it beside the supervisors' figures.
//!
//! ```text
//! spawn_floor [N=100] [PROGRAM=sleep] [ARG=1000]
//! ```
//!
//! Prints one JSON object: the time until the last spawn returned, and the per-spawn latency (µs): `spawn`
//! returns once the child has exec'd, as in the supervisor. The children are killed and reaped afterwards.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
    let program = args.next().unwrap_or_else(|| "sleep".into());
    let arg = args.next().unwrap_or_else(|| "1000".into());
    let mut each: Vec<Duration> = Vec::with_capacity(n);
    let mut children = Vec::with_capacity(n);
    let t0 = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        let mut cmd = Command::new(&program);
        cmd.arg0(&program)
            .arg(&arg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        match cmd.spawn() {
            Ok(child) => children.push(child),
            Err(e) => {
                eprintln!("spawn_floor: cannot start {program:?}: {e}");
                std::process::exit(1);
            }
        }
        each.push(t.elapsed());
    }
    let total = t0.elapsed();
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    each.sort();
    let us = |p: f64| {
        let i = ((each.len().saturating_sub(1)) as f64 * p).round() as usize;
        each.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    println!(
        "{{\"n\": {n}, \"program\": {program:?}, \"all_spawned_ms\": {:.2}, \"spawn_p50_us\": {:.1}, \"spawn_p90_us\": {:.1}, \"spawn_max_us\": {:.1}}}",
        total.as_secs_f64() * 1e3,
        us(0.5),
        us(0.9),
        us(1.0)
    );
}
