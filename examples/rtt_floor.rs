//! The floor under the Ping latency figures: round trips of a small message over loopback TCP between two
//! threads of one process, blocking sockets, no ZeroMQ, no pickle, no runtime. Whatever tail this shows (p99.9,
//! max) comes from the machine (scheduler, host, interrupts), not from a server; `bench/bench.py` prints it
//! beside the Ping figures.
//!
//! ```text
//! rtt_floor [N=20000] [BYTES=32]
//! ```
//!
//! Prints one JSON object: p50, p99, p99.9 and max of the round trips (µs), how many took over 1 ms, and the CPU
//! the echoing thread used per round trip (µs): the floor under "server CPU per Ping", since that thread does
//! nothing but sleep in `read`, be woken, and `write`. Two counts of that CPU: the scheduler's own
//! (`/proc/thread-self/schedstat`, nanoseconds) and the tick-sampled utime + stime of `/proc/thread-self/stat`,
//! which is what the benchmark reads for the servers.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let size: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(32).max(1);
    if let Err(e) = run(n, size) {
        eprintln!("rtt_floor: {e}");
        std::process::exit(1);
    }
}

fn run(n: usize, size: usize) -> std::io::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<(ThreadCpu, ThreadCpu)> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut buf = vec![0u8; size];
        let mut echoed = 0usize;
        let mut start = ThreadCpu::now();
        loop {
            match s.read_exact(&mut buf) {
                Ok(()) => s.write_all(&buf)?,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok((start, ThreadCpu::now())),
                Err(e) => return Err(e),
            }
            echoed += 1;
            if echoed == WARM_UP {
                start = ThreadCpu::now();
            }
        }
    });
    let mut c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let msg = vec![7u8; size];
    let mut back = vec![0u8; size];
    // Warm-up, as the Ping measurements have.
    for _ in 0..WARM_UP {
        c.write_all(&msg)?;
        c.read_exact(&mut back)?;
    }
    let mut each: Vec<Duration> = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        c.write_all(&msg)?;
        c.read_exact(&mut back)?;
        each.push(t.elapsed());
    }
    drop(c);
    let (cpu0, cpu1) = echo
        .join()
        .map_err(|_| std::io::Error::other("echo thread panicked"))??;
    let per_rt = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if n > 0 => format!("{:.2}", (b - a) / n as f64),
        _ => "null".to_string(),
    };
    let echo_cpu_us = per_rt(cpu0.sched_us, cpu1.sched_us);
    let echo_cpu_tick_us = per_rt(cpu0.tick_us, cpu1.tick_us);
    each.sort();
    let us = |p: f64| {
        let i = ((each.len().saturating_sub(1)) as f64 * p).round() as usize;
        each.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    let over_1ms = each.iter().filter(|d| **d > Duration::from_millis(1)).count();
    println!(
        "{{\"n\": {n}, \"bytes\": {size}, \"p50_us\": {:.1}, \"p99_us\": {:.1}, \"p999_us\": {:.1}, \"max_us\": {:.1}, \"over_1ms\": {over_1ms}, \"echo_cpu_us_per_rt\": {echo_cpu_us}, \"echo_cpu_tick_us_per_rt\": {echo_cpu_tick_us}}}",
        us(0.5),
        us(0.99),
        us(0.999),
        us(1.0)
    );
    Ok(())
}

const WARM_UP: usize = 200;

/// CPU used so far by the calling thread, in µs, by two clocks (either may be missing on a kernel without it).
#[derive(Clone, Copy)]
struct ThreadCpu {
    sched_us: Option<f64>,
    tick_us: Option<f64>,
}

impl ThreadCpu {
    fn now() -> Self {
        let sched_us = std::fs::read_to_string("/proc/thread-self/schedstat")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
            .map(|ns| ns / 1e3);
        // utime and stime are fields 14 and 15, counted after the ")" that ends the command name.
        let tick_us = std::fs::read_to_string("/proc/thread-self/stat").ok().and_then(|s| {
            let rest = &s[s.rfind(')')? + 1..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some(ticks * 1e6 / 100.0)
        });
        ThreadCpu { sched_us, tick_us }
    }
}
