//! Small helpers shared by several modules: CGSE timestamps and the host address.

use std::net::{IpAddr, ToSocketAddrs, UdpSocket};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The future of an object-safe trait method (a handler, a sink, a probe, a hook): one spelling for all.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Civil date (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// UTC broken-down time of a moment: (year, month, day, hour, minute, second, millisecond).
pub fn utc_parts(t: SystemTime) -> (i64, u32, u32, u32, u32, u32, u32) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = d.as_secs() as i64;
    let (y, mo, day) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    (
        y,
        mo,
        day,
        (rem / 3600) as u32,
        ((rem % 3600) / 60) as u32,
        (rem % 60) as u32,
        d.subsec_millis(),
    )
}

/// CGSE's `format_datetime()`: `YYYY-MM-DDTHH:MM:SS.mmm+0000`, UTC.
pub fn format_datetime(t: SystemTime) -> String {
    let (y, mo, d, h, mi, s, ms) = utc_parts(t);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ms:03}+0000")
}

/// `YYYYMMDD` of a moment, UTC (the Storage Manager's daily folder and file names).
pub fn yyyymmdd(t: SystemTime) -> String {
    let (y, mo, d, ..) = utc_parts(t);
    format!("{y:04}{mo:02}{d:02}")
}

/// The address of the interface that routes outwards, as CGSE's `get_host_ip()` finds it: the local
/// end of a UDP "connection" to 10.255.255.255 (nothing is sent), else the address of the host name.
/// May block on name resolution: call it off the request path.
pub fn host_ip() -> Option<String> {
    let udp = UdpSocket::bind(("0.0.0.0", 0)).and_then(|s| s.connect(("10.255.255.255", 1)).map(|_| s));
    if let Ok(local) = udp.and_then(|s| s.local_addr()) {
        if !local.ip().is_unspecified() {
            return Some(local.ip().to_string());
        }
    }
    let name = nix::unistd::gethostname().ok()?.into_string().ok()?;
    let addrs: Vec<IpAddr> = (name.as_str(), 0).to_socket_addrs().ok()?.map(|a| a.ip()).collect();
    addrs
        .iter()
        .find(|ip| ip.is_ipv4())
        .or_else(|| addrs.first())
        .map(|ip| ip.to_string())
}

/// Raise the soft limit on open files to the hard limit. Every client connection costs the daemon a file
/// descriptor, and zmq.rs has no handshake timeout (a peer that connects and stays silent keeps its fd), so
/// the common 1024 default is a needlessly low ceiling. Returns the limit in effect.
pub fn raise_open_files_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return Some(hard);
    }
    Some(soft)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_match_cgse_format() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_691_412_459);
        assert_eq!(format_datetime(t), "2026-11-26T11:10:12.459+0000");
        assert_eq!(yyyymmdd(t), "20261126");
        assert_eq!(format_datetime(UNIX_EPOCH), "1970-01-01T00:00:00.000+0000");
        // A leap day and the turn of a century.
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(yyyymmdd(t), "20000229");
    }

    #[test]
    fn host_ip_is_an_address() {
        if let Some(ip) = host_ip() {
            assert!(ip.parse::<IpAddr>().is_ok(), "{ip}");
        }
    }
}

#[cfg(test)]
mod float_tests {
    use crate::codec::float_repr as py_float_repr;

    #[test]
    fn matches_python_repr() {
        for (f, s) in [
            (1000.0, "1000.0"),
            (250.0, "250.0"),
            (203.60446822220538, "203.60446822220538"),
            (0.0030, "0.003"),
            (1e-05, "1e-05"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (1234567890123456.0, "1234567890123456.0"),
            (-2.5, "-2.5"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (0.1, "0.1"),
            (1.5e300, "1.5e+300"),
        ] {
            assert_eq!(py_float_repr(f), s, "{f}");
        }
    }
}
