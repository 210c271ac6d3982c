//! A low-overhead wire client for the benchmarks (bench/bench.py): a minimal ZMTP 3.0 REQ peer on a blocking
//! TCP socket per thread, sending pickles made by our codec. It measures a control server from outside, like
//! the Python clients do, but spends far less time in the client, so the server's own cost shows. It works
//! against any CGSE control server (the original Python `pm_cs` too).
//!
//! ```text
//! wire_bench --port P [--host 127.0.0.1] [--ping 2000] [--clients 8] [--duration 3]
//!            [--call NAME --calls 1000]
//! ```
//!
//! Prints one JSON object: `ping` (one REQ socket, sequential), `throughput` (`--clients` sockets, one
//! thread each, `Ping` for `--duration` s) and, with `--call`, the latency of a table command without
//! arguments sent as a `CommandExecution` of the command object the server announced (`send_commands`).
//! Latencies are in microseconds. Errors and timeouts are counted, never hidden.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use procman::client::command_execution;
use procman::codec::{self, Limits, Value};

/// One ZMTP 3.0 REQ connection (NULL mechanism).
struct Req {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Req {
    fn connect(addr: &str, timeout: Duration) -> std::io::Result<Req> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut r = Req {
            stream,
            buf: Vec::with_capacity(4096),
        };
        r.handshake()?;
        Ok(r)
    }

    fn handshake(&mut self) -> std::io::Result<()> {
        let mut greeting = [0u8; 64];
        greeting[0] = 0xff;
        greeting[9] = 0x7f;
        greeting[10] = 3; // version 3.0
        greeting[12..16].copy_from_slice(b"NULL");
        self.stream.write_all(&greeting)?;
        // READY with Socket-Type = REQ.
        let mut body = Vec::new();
        body.push(5u8);
        body.extend_from_slice(b"READY");
        body.push(11u8);
        body.extend_from_slice(b"Socket-Type");
        body.extend_from_slice(&3u32.to_be_bytes());
        body.extend_from_slice(b"REQ");
        let mut cmd = vec![0x04u8, body.len() as u8];
        cmd.extend_from_slice(&body);
        self.stream.write_all(&cmd)?;
        let mut peer = [0u8; 64];
        self.stream.read_exact(&mut peer)?;
        if peer[0] != 0xff || peer[9] != 0x7f {
            return Err(std::io::Error::other("not a ZMTP peer"));
        }
        // The peer's READY (a command frame).
        let (flags, _) = self.read_frame()?;
        if flags & 0x04 == 0 {
            return Err(std::io::Error::other("expected the peer's READY command"));
        }
        Ok(())
    }

    /// Reads one frame into `self.buf`; returns its flags and length.
    fn read_frame(&mut self) -> std::io::Result<(u8, usize)> {
        let mut head = [0u8; 2];
        self.stream.read_exact(&mut head)?;
        let flags = head[0];
        let len = if flags & 0x02 != 0 {
            let mut rest = [0u8; 8];
            rest[0] = head[1];
            self.stream.read_exact(&mut rest[1..])?;
            u64::from_be_bytes(rest) as usize
        } else {
            head[1] as usize
        };
        if len > 256 * 1024 * 1024 {
            return Err(std::io::Error::other("frame too large"));
        }
        self.buf.resize(len, 0);
        self.stream.read_exact(&mut self.buf)?;
        Ok((flags, len))
    }

    /// One request (empty delimiter + payload), one reply payload.
    fn request(&mut self, payload: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(payload.len() + 12);
        out.extend_from_slice(&[0x01, 0x00]);
        if payload.len() <= 255 {
            out.extend_from_slice(&[0x00, payload.len() as u8]);
        } else {
            out.push(0x02);
            out.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        }
        out.extend_from_slice(payload);
        self.stream.write_all(&out)?;
        let mut parts: Vec<Vec<u8>> = Vec::new();
        loop {
            let (flags, _) = self.read_frame()?;
            if flags & 0x04 != 0 {
                continue; // a command (e.g. a heartbeat), not part of the message
            }
            parts.push(std::mem::take(&mut self.buf));
            if flags & 0x01 == 0 {
                break;
            }
        }
        // [b"", payload] from a REP/ROUTER peer.
        match parts.len() {
            2 if parts[0].is_empty() => Ok(parts.pop().unwrap_or_default()),
            n => Err(std::io::Error::other(format!("reply with {n} frames"))),
        }
    }
}

struct Args {
    host: String,
    port: u16,
    ping: usize,
    clients: usize,
    duration: f64,
    call: Option<String>,
    calls: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        host: "127.0.0.1".into(),
        port: 0,
        ping: 2000,
        clients: 8,
        duration: 3.0,
        call: None,
        calls: 1000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--host" => a.host = v()?,
            "--port" => a.port = v()?.parse().map_err(|e| format!("--port: {e}"))?,
            "--ping" => a.ping = v()?.parse().map_err(|e| format!("--ping: {e}"))?,
            "--clients" => a.clients = v()?.parse().map_err(|e| format!("--clients: {e}"))?,
            "--duration" => a.duration = v()?.parse().map_err(|e| format!("--duration: {e}"))?,
            "--call" => a.call = Some(v()?),
            "--calls" => a.calls = v()?.parse().map_err(|e| format!("--calls: {e}"))?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.port == 0 {
        return Err("--port is required".into());
    }
    Ok(a)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary(mut lat_us: Vec<f64>, errors: usize, elapsed: f64) -> String {
    lat_us.sort_by(f64::total_cmp);
    let n = lat_us.len();
    format!(
        "{{\"n\": {n}, \"errors\": {errors}, \"p50_us\": {:.1}, \"p99_us\": {:.1}, \"p999_us\": {:.1}, \"max_us\": {:.1}, \"mean_us\": {:.1}, \"rps\": {:.0}}}",
        pct(&lat_us, 0.5),
        pct(&lat_us, 0.99),
        pct(&lat_us, 0.999),
        lat_us.last().copied().unwrap_or(f64::NAN),
        if n > 0 { lat_us.iter().sum::<f64>() / n as f64 } else { f64::NAN },
        if elapsed > 0.0 { n as f64 / elapsed } else { 0.0 }
    )
}

fn is_pong(reply: &[u8]) -> bool {
    matches!(codec::decode(reply, &Limits::default()), Ok(Value::Str(s)) if s == "Pong")
}

/// Sequential requests on one socket: (latencies in µs, errors, elapsed s).
fn sequential(addr: &str, payload: &[u8], n: usize, check: impl Fn(&[u8]) -> bool) -> (Vec<f64>, usize, f64) {
    let mut lat = Vec::with_capacity(n);
    let mut errors = 0;
    let mut req = Req::connect(addr, Duration::from_secs(5)).ok();
    // Warm-up: connection, caches.
    for _ in 0..50 {
        if let Some(r) = req.as_mut() {
            if r.request(payload).is_err() {
                req = None;
            }
        }
    }
    let t0 = Instant::now();
    for _ in 0..n {
        if req.is_none() {
            req = Req::connect(addr, Duration::from_secs(5)).ok();
        }
        let Some(r) = req.as_mut() else {
            errors += 1;
            continue;
        };
        let t = Instant::now();
        match r.request(payload) {
            Ok(reply) => {
                // Stop the clock before checking the reply: decoding it is the client's cost.
                let dt = t.elapsed().as_secs_f64() * 1e6;
                if check(&reply) {
                    lat.push(dt);
                } else {
                    errors += 1;
                }
            }
            Err(_) => {
                errors += 1;
                req = None;
            }
        }
    }
    (lat, errors, t0.elapsed().as_secs_f64())
}

/// `clients` sockets in threads, `Ping` for `duration` s after a common start.
fn throughput(addr: &str, payload: &[u8], clients: usize, duration: f64) -> String {
    let barrier = Arc::new(Barrier::new(clients + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for _ in 0..clients {
        let (addr, payload, barrier, stop) = (addr.to_owned(), payload.to_vec(), barrier.clone(), stop.clone());
        handles.push(std::thread::spawn(move || {
            let mut req = Req::connect(&addr, Duration::from_secs(5)).ok();
            if let Some(r) = req.as_mut() {
                for _ in 0..20 {
                    let _ = r.request(&payload);
                }
            }
            barrier.wait();
            let mut lat = Vec::with_capacity(100_000);
            let mut errors = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let Some(r) = req.as_mut() else {
                    errors += 1;
                    std::thread::sleep(Duration::from_millis(10));
                    req = Req::connect(&addr, Duration::from_secs(5)).ok();
                    continue;
                };
                let t = Instant::now();
                match r.request(&payload) {
                    Ok(reply) => {
                        let dt = t.elapsed().as_secs_f64() * 1e6;
                        if is_pong(&reply) {
                            lat.push(dt);
                        } else {
                            errors += 1;
                        }
                    }
                    Err(_) => {
                        errors += 1;
                        req = None;
                    }
                }
            }
            (lat, errors)
        }));
    }
    barrier.wait();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(duration));
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let mut errors = 0;
    for h in handles {
        if let Ok((lat, e)) = h.join() {
            all.extend(lat);
            errors += e;
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let s = summary(all, errors, elapsed);
    format!("{{\"clients\": {clients}, \"duration_s\": {elapsed:.3}, \"summary\": {s}}}")
}

fn main() {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("wire_bench: {e}");
            std::process::exit(2);
        }
    };
    let addr = format!("{}:{}", a.host, a.port);
    let ping = codec::encode(&Value::str("Ping"));
    let mut out = vec![format!("\"endpoint\": \"tcp://{addr}\"")];
    if a.ping > 0 {
        let (lat, errors, elapsed) = sequential(&addr, &ping, a.ping, is_pong);
        out.push(format!("\"ping\": {}", summary(lat, errors, elapsed)));
    }
    if a.clients > 0 && a.duration > 0.0 {
        out.push(format!(
            "\"throughput\": {}",
            throughput(&addr, &ping, a.clients, a.duration)
        ));
    }
    if let Some(name) = &a.call {
        let request = Req::connect(&addr, Duration::from_secs(5))
            .and_then(|mut r| r.request(&codec::encode(&Value::str("send_commands"))))
            .ok()
            .and_then(|reply| codec::decode(&reply, &Limits::default()).ok())
            .and_then(|v| v.get(name).cloned())
            .map(|cmd| codec::encode(&command_execution(cmd, vec![], vec![])));
        match request {
            Some(req) => {
                let failure = |r: &[u8]| {
                    codec::decode(r, &Limits::default())
                        .map(|v| procman::protocol::failure_message(&v).is_none())
                        .unwrap_or(false)
                };
                let (lat, errors, elapsed) = sequential(&addr, &req, a.calls, failure);
                out.push(format!(
                    "\"call\": {{\"name\": \"{name}\", \"summary\": {}}}",
                    summary(lat, errors, elapsed)
                ));
            }
            None => out.push(format!(
                "\"call\": {{\"name\": \"{name}\", \"error\": \"not announced\"}}"
            )),
        }
    }
    println!("{{{}}}", out.join(", "));
}
