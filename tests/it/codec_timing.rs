//! Decode / encode timings per fixture class. Numbers only, no assertions on time:
//!
//! ```text
//! cargo test --release --test it codec_timing -- --ignored --nocapture
//! ```

use crate::support;
use std::hint::black_box;
use std::time::{Duration, Instant};

use procman::codec::{decode, encode, Limits};

use support::fixtures_root;

/// Mean time of `f` over enough runs to fill about 300 ms.
fn time_per_call(mut f: impl FnMut()) -> Duration {
    let start = Instant::now();
    let mut n: u32 = 0;
    while start.elapsed() < Duration::from_millis(30) {
        f();
        n += 1;
    }
    let runs = n.saturating_mul(10).max(1);
    let start = Instant::now();
    for _ in 0..runs {
        f();
    }
    start.elapsed() / runs
}

#[test]
#[ignore = "timing report; run with --release -- --ignored --nocapture"]
fn decode_and_encode_timings() {
    let classes = [
        ("Ping request", "protocol/cmd_ping.req.pickle"),
        ("Pong reply", "protocol/cmd_ping.rep.pickle"),
        ("Failure reply", "protocol/cmd_unknown_string.rep.pickle"),
        (
            "Failure with cause",
            "protocol/cmd_controller_raises_statuscmd_none.rep.pickle",
        ),
        ("CommandExecution request", "protocol/cmd_get_core_processes.req.pickle"),
        (
            "CommandExecution + StartCommand",
            "protocol/cmd_start_process.req.pickle",
        ),
        ("monitoring status (UUID)", "protocol/mon_status_1.bin"),
        ("pm send_commands reply", "protocol/proxy_trace/0005_recv_REQ_6120.bin"),
        ("service send_commands reply", "protocol/svc_send_commands.rep.pickle"),
        (
            "sm send_commands reply",
            "integration/storage/sm_send_commands_reply.pickle",
        ),
        ("Setup reply (get_setup)", "integration/confman/get_setup_reply.pickle"),
    ];
    let limits = Limits::default();
    println!(
        "{:<34} {:>7} {:>12} {:>12} {:>9} {:>12}",
        "fixture class", "bytes", "decode", "encode", "enc bytes", "re-decode"
    );
    for (label, rel) in classes {
        let bytes = std::fs::read(fixtures_root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
        let value = decode(&bytes, &limits).expect("decode");
        let encoded = encode(&value);
        let t_dec = time_per_call(|| {
            black_box(decode(black_box(&bytes), &limits).ok());
        });
        let t_enc = time_per_call(|| {
            black_box(encode(black_box(&value)));
        });
        let t_redec = time_per_call(|| {
            black_box(decode(black_box(&encoded), &limits).ok());
        });
        println!(
            "{label:<34} {:>7} {:>9.2} µs {:>9.2} µs {:>9} {:>9.2} µs",
            bytes.len(),
            t_dec.as_secs_f64() * 1e6,
            t_enc.as_secs_f64() * 1e6,
            encoded.len(),
            t_redec.as_secs_f64() * 1e6
        );
    }
}
