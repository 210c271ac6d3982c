//! The floor under the Ping latency figures: round trips of a small message over loopback TCP between two
//! threads of one process, blocking sockets, no ZeroMQ, no pickle, no runtime. Whatever tail this shows (p99.9,
//! max) comes from the machine (scheduler, host, interrupts), not from a server; `bench/bench.py` prints it
//! beside the Ping figures.
//!
//! ```text
//! rtt_floor [N=20000] [BYTES=32]
//! ```
//!
//! Prints one JSON object: p50, p99, p99.9 and max of the round trips (µs), and how many took over 1 ms.

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
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut buf = vec![0u8; size];
        loop {
            match s.read_exact(&mut buf) {
                Ok(()) => s.write_all(&buf)?,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    });
    let mut c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let msg = vec![7u8; size];
    let mut back = vec![0u8; size];
    // Warm-up, as the Ping measurements have.
    for _ in 0..200 {
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
    echo.join()
        .map_err(|_| std::io::Error::other("echo thread panicked"))??;
    each.sort();
    let us = |p: f64| {
        let i = ((each.len().saturating_sub(1)) as f64 * p).round() as usize;
        each.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    let over_1ms = each.iter().filter(|d| **d > Duration::from_millis(1)).count();
    println!(
        "{{\"n\": {n}, \"bytes\": {size}, \"p50_us\": {:.1}, \"p99_us\": {:.1}, \"p999_us\": {:.1}, \"max_us\": {:.1}, \"over_1ms\": {over_1ms}}}",
        us(0.5),
        us(0.99),
        us(0.999),
        us(1.0)
    );
    Ok(())
}
