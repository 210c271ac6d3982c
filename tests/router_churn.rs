//! Regression test for a leak found by the soak (bench/soak.py): every connection to a ROUTER socket left
//! its peer identity in zmq.rs's round-robin queue, which only DEALER and PUSH sockets ever pop, so the
//! daemon's memory grew by about 110 bytes per client connection, forever (vendor/zeromq/PATCHES.md, patch 3).
//!
//! Live heap bytes are counted by a global allocator during 17,000 connect / request / disconnect cycles
//! against a ROUTER; their floor must not rise by more than 512 KiB (~48 B a connection) over 11,000 cycles
//! (the leak raised it by ~95 B a connection, ~1 MB; the floor moves without a leak, as epoch-based
//! reclamation frees late, whatever the number of connections: by ±120 KiB on a busy machine, once by
//! +305 KiB in ~300 runs at load average 7-8).

use std::io::{Read, Write};
use std::time::Duration;

use zeromq::{SocketRecv, SocketSend};

mod support;
use support::{counting_alloc, zmtp};

#[global_allocator]
static ALLOC: counting_alloc::Counting = counting_alloc::Counting;

/// One ZMTP 3.0 REQ peer (NULL mechanism): greeting, READY, one request, its reply, close.
fn cycle(port: u16) -> std::io::Result<()> {
    let mut s = zmtp::connect(port, b"REQ")?;
    s.write_all(b"\x01\x00\x00\x04ping")?;
    // The peer's READY command, then the reply [b"", b"ping"]: read until the last frame.
    loop {
        let mut head = [0u8; 2];
        s.read_exact(&mut head)?;
        let mut body = vec![0u8; head[1] as usize];
        s.read_exact(&mut body)?;
        if head[0] & 0x04 == 0 && head[0] & 0x01 == 0 {
            return Ok(());
        }
    }
}

#[test]
fn router_connections_leave_nothing_behind() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let port = rt.block_on(async {
        let (socket, port) = procman::transport::bind_router("tcp", "127.0.0.1", 0, "test")
            .await
            .unwrap();
        tokio::spawn(async move {
            let (mut send, mut recv) = socket.split();
            while let Ok(msg) = recv.recv().await {
                let _ = send.send(msg).await; // echo: [identity, b"", payload]
            }
        });
        port
    });
    // Sample once the server has finished with every connection of the batch: each peer's writer task ends
    // when its connection is torn down (zmq.rs patch 10 counts them), so a busy machine cannot make a
    // connection still being torn down look like a leak.
    let settle = || {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while zeromq::limits::live_writers() > 0 {
            assert!(std::time::Instant::now() < deadline, "connections never torn down");
            std::thread::sleep(Duration::from_millis(5));
        }
        counting_alloc::live() as isize
    };
    for _ in 0..500 {
        cycle(port).expect("a reply");
    }
    // Freed memory comes back late (epoch-based reclamation in zmq.rs's maps, tokio's caches), so single
    // samples are noisy (±200 KiB here); the floor of several samples much less. A leak raises the floor.
    let mut samples = Vec::new();
    for _ in 0..16 {
        for _ in 0..1000 {
            cycle(port).expect("a reply");
        }
        samples.push(settle());
    }
    let first = samples[..5].iter().min().copied().unwrap_or(0);
    let last = samples[11..].iter().min().copied().unwrap_or(0);
    let growth = last - first;
    println!("live heap (bytes) after every 1,000 connections: {samples:?}; floor {first} -> {last} ({growth:+} B over 11,000 connections)");
    assert!(
        growth < 512 * 1024,
        "11,000 connections left {growth} bytes behind (~{} B each)",
        growth / 11_000
    );
    rt.shutdown_timeout(Duration::from_secs(1));
}
