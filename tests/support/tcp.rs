//! The kernel's view of a loopback TCP connection, so that a test can wait for the daemon to act on a
//! connection (drop it, close it) without reading from it, which would change what it tests.
#![allow(dead_code)] // not every test binary uses every helper

/// `ESTABLISHED` in `/proc/net/tcp`'s `st` column (include/net/tcp_states.h).
pub const ESTABLISHED: u8 = 0x01;

/// The state of the IPv4 socket whose local port is `local` and whose peer's port is `remote`, both on
/// 127.0.0.1; None when the kernel has no such socket (closed and gone, or never there).
pub fn state(local: u16, remote: u16) -> Option<u8> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let want_local = format!("0100007F:{local:04X}");
    let want_remote = format!("0100007F:{remote:04X}");
    table.lines().skip(1).find_map(|line| {
        let mut fields = line.split_whitespace().skip(1);
        let (l, r, st) = (fields.next()?, fields.next()?, fields.next()?);
        (l == want_local && r == want_remote)
            .then(|| u8::from_str_radix(st, 16).ok())
            .flatten()
    })
}
