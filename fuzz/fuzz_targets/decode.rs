//! The pickle decoder on arbitrary bytes: it must never panic, and whatever it accepts must survive our
//! encoder: `encode(decode(x))` decodes again, and encoding that result gives the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use procman::codec::{decode, encode, Limits};

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    if let Ok(v) = decode(data, &limits) {
        let once = encode(&v);
        let again = decode(&once, &limits).expect("our own encoding decodes");
        assert_eq!(encode(&again), once, "encoding is stable across a round trip");
    }
});
