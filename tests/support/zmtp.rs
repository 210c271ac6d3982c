//! Raw ZMTP 3.0 peers (NULL mechanism) for tests that must behave as no ZeroMQ library would: connect and
//! then never read, pipeline without reading, stall mid-handshake.
#![allow(dead_code)] // not every test binary uses every helper

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Our side of the handshake: the 64-byte greeting (3.0, NULL, as client) and a READY command naming
/// `socket_type` (`b"DEALER"`, `b"SUB"`, `b"REQ"`).
pub fn handshake(socket_type: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; 64];
    out[0] = 0xff;
    out[9] = 0x7f;
    out[10] = 3;
    out[12..16].copy_from_slice(b"NULL");
    let mut ready = vec![0x05];
    ready.extend(b"READY");
    ready.push(11);
    ready.extend(b"Socket-Type");
    ready.extend((socket_type.len() as u32).to_be_bytes());
    ready.extend(socket_type);
    out.extend([0x04, ready.len() as u8]);
    out.extend(ready);
    out
}

/// Connect to `127.0.0.1:port`, send our greeting and READY, read the peer's greeting (its READY is left
/// in the stream). Reads time out after 5 s.
pub fn connect(port: u16, socket_type: &[u8]) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_nodelay(true)?;
    s.write_all(&handshake(socket_type))?;
    let mut greeting = [0u8; 64];
    s.read_exact(&mut greeting)?;
    Ok(s)
}
