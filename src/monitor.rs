//! The control-server status dict: real process figures read from `/proc`.

use std::sync::Mutex;
use std::time::{Instant, SystemTime};

use crate::codec::Value;
use crate::util::format_datetime;

/// Reads this process's figures from `/proc` and builds the status dict published on the monitoring
/// socket and returned by `get_process_status`.
pub struct StatusSampler {
    pid: u32,
    uuid: u128,
    clk_tck: f64,
    page_size: u64,
    cpu_count: Option<i64>,
    /// Process start, seconds since boot (field 22 of /proc/self/stat).
    start_since_boot: Option<f64>,
    last_cpu: Mutex<Option<(Instant, f64)>>,
    /// The last figures read and when: requests within [`FIGURES_TTL`] reuse them, so a client asking in a
    /// loop does not turn into a loop of `/proc` reads on a runtime thread.
    cached: Mutex<Option<(Instant, ProcFigures)>>,
    /// USS and when it was read: `smaps_rollup` walks every mapping, the dearest of the reads.
    cached_uss: Mutex<Option<(Instant, u64)>>,
}

/// How long a reading of `/proc/self/stat` and `statm` is reused (the kernel counts CPU in 10 ms ticks).
const FIGURES_TTL: std::time::Duration = std::time::Duration::from_millis(100);
/// How long a USS reading is reused.
const USS_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// CPU times and memory of this process.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcFigures {
    /// Resident set size in bytes (status `RSS`).
    pub rss: u64,
    /// Unique set size in bytes (status `USS`; the RSS when `smaps_rollup` is unreadable).
    pub uss: u64,
    /// CPU time in user mode, in seconds.
    pub cpu_user: f64,
    /// CPU time in kernel mode, in seconds.
    pub cpu_system: f64,
}

impl StatusSampler {
    /// A sampler of this process, with a new version-1 UUID.
    pub fn new() -> StatusSampler {
        let clk_tck = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as f64;
        let page_size = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .unwrap_or(4096) as u64;
        let stat = read_stat();
        StatusSampler {
            pid: std::process::id(),
            uuid: uuid1(),
            clk_tck,
            page_size,
            cpu_count: physical_cores(),
            start_since_boot: stat.and_then(|s| s.starttime).map(|t| t as f64 / clk_tck),
            last_cpu: Mutex::new(None),
            cached: Mutex::new(None),
            cached_uss: Mutex::new(None),
        }
    }

    /// The version-1 UUID made when the sampler was created (once per daemon).
    pub fn uuid(&self) -> u128 {
        self.uuid
    }

    /// Memory and CPU times, at most `FIGURES_TTL` old (USS at most `USS_TTL`).
    pub fn figures(&self) -> ProcFigures {
        let now = Instant::now();
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, f)) = *cached {
            if now.duration_since(at) < FIGURES_TTL {
                return f;
            }
        }
        let f = self.read_figures(now);
        *cached = Some((now, f));
        f
    }

    fn read_figures(&self, now: Instant) -> ProcFigures {
        let mut f = ProcFigures::default();
        if let Some(s) = read_stat() {
            f.cpu_user = s.utime as f64 / self.clk_tck;
            f.cpu_system = s.stime as f64 / self.clk_tck;
        }
        if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
            let rss_pages: u64 = statm
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            f.rss = rss_pages * self.page_size;
        }
        let mut uss = self.cached_uss.lock().unwrap_or_else(|e| e.into_inner());
        f.uss = match *uss {
            Some((at, v)) if now.duration_since(at) < USS_TTL => v,
            _ => {
                let v = read_uss().unwrap_or(f.rss);
                *uss = Some((now, v));
                v
            }
        };
        f
    }

    /// Seconds since this process was created.
    pub fn uptime(&self) -> f64 {
        let since_boot = std::fs::read_to_string("/proc/uptime")
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()));
        match (since_boot, self.start_since_boot) {
            (Some(now), Some(start)) => (now - start).max(0.0),
            _ => 0.0,
        }
    }

    /// CPU utilisation since the previous call, in percent (0.0 the first time, like psutil).
    pub fn cpu_percent(&self, f: &ProcFigures) -> f64 {
        let now = Instant::now();
        let total = f.cpu_user + f.cpu_system;
        let mut last = self.last_cpu.lock().unwrap_or_else(|e| e.into_inner());
        let pct = match *last {
            Some((t, prev)) => {
                let wall = now.duration_since(t).as_secs_f64();
                if wall > 0.0 {
                    ((total - prev) / wall * 100.0).max(0.0)
                } else {
                    0.0
                }
            }
            None => 0.0,
        };
        *last = Some((now, total));
        (pct * 10.0).round() / 10.0
    }

    /// The status dict, with the original's keys and types. `delay_ms` is the current monitoring delay;
    /// it is always a float (the original switches from int to float).
    pub fn status(&self, delay_ms: f64) -> Value {
        let f = self.figures();
        let cpu_pct = self.cpu_percent(&f);
        Value::dict([
            ("timestamp", Value::Str(format_datetime(SystemTime::now()))),
            ("delay", Value::Float(delay_ms)),
            ("PID", Value::Int(i64::from(self.pid))),
            ("Up", Value::Float(self.uptime())),
            ("UUID", uuid_value(self.uuid)),
            ("RSS", Value::Int(f.rss as i64)),
            ("USS", Value::Int(f.uss as i64)),
            ("CPU User", Value::Float(f.cpu_user)),
            ("CPU System", Value::Float(f.cpu_system)),
            ("CPU count", self.cpu_count.map(Value::Int).unwrap_or(Value::None)),
            ("CPU%", Value::Float(cpu_pct)),
        ])
    }
}

impl Default for StatusSampler {
    fn default() -> Self {
        Self::new()
    }
}

/// A `uuid.UUID` instance as Python pickles it. `is_safe` is left out: our UUID is
/// not made by a synchronised generator, which Python calls `SafeUUID.unknown`.
pub fn uuid_value(u: u128) -> Value {
    Value::new_object("uuid", "UUID", Value::dict([("int", Value::from(u))]))
}

fn uuid1() -> u128 {
    let node: [u8; 6] = {
        let r = uuid::Uuid::new_v4().into_bytes();
        // A random node id must have the multicast bit set (RFC 4122 §4.5).
        [r[0] | 0x01, r[1], r[2], r[3], r[4], r[5]]
    };
    uuid::Uuid::now_v1(&node).as_u128()
}

struct Stat {
    utime: u64,
    stime: u64,
    starttime: Option<u64>,
}

fn read_stat() -> Option<Stat> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name is in parentheses and may contain spaces: split after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15, starttime 22.
    Some(Stat {
        utime: fields.get(11)?.parse().ok()?,
        stime: fields.get(12)?.parse().ok()?,
        starttime: fields.get(19).and_then(|v| v.parse().ok()),
    })
}

/// Unique set size: memory that would be freed if this process exited (psutil's `uss`).
fn read_uss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/smaps_rollup").ok()?;
    let mut kb = 0u64;
    let mut found = false;
    for line in s.lines() {
        if let Some(v) = line
            .strip_prefix("Private_Clean:")
            .or_else(|| line.strip_prefix("Private_Dirty:"))
        {
            kb += v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()?;
            found = true;
        }
    }
    found.then_some(kb * 1024)
}

/// Number of physical cores (psutil `cpu_count(logical=False)`): distinct (physical id, core id) pairs.
fn physical_cores() -> Option<i64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mut pairs = std::collections::HashSet::new();
    let (mut phys, mut core) = (None, None);
    for line in info.lines().chain(std::iter::once("")) {
        if line.trim().is_empty() {
            if let (Some(p), Some(c)) = (phys.take(), core.take()) {
                pairs.insert((p, c));
            }
            continue;
        }
        let mut kv = line.splitn(2, ':');
        match (kv.next().map(str::trim), kv.next().map(str::trim)) {
            (Some("physical id"), Some(v)) => phys = Some(v.to_owned()),
            (Some("core id"), Some(v)) => core = Some(v.to_owned()),
            _ => {}
        }
    }
    if pairs.is_empty() {
        std::thread::available_parallelism().ok().map(|n| n.get() as i64)
    } else {
        Some(pairs.len() as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_has_the_original_keys_in_order() {
        let s = StatusSampler::new();
        let v = s.status(1000.0);
        let Value::Dict(items) = &v else { panic!("not a dict") };
        let keys: Vec<&str> = items.iter().filter_map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "timestamp",
                "delay",
                "PID",
                "Up",
                "UUID",
                "RSS",
                "USS",
                "CPU User",
                "CPU System",
                "CPU count",
                "CPU%"
            ]
        );
        assert_eq!(v.get("PID"), Some(&Value::Int(i64::from(std::process::id()))));
        assert!(v.get("RSS").and_then(Value::as_i64).unwrap() > 1_000_000);
        let uss = v.get("USS").and_then(Value::as_i64).unwrap();
        assert!(uss > 0 && uss <= v.get("RSS").and_then(Value::as_i64).unwrap());
        let uuid = s.uuid();
        assert_eq!((uuid >> 76) & 0xf, 1, "version-1 UUID");
        assert!(s.uptime() >= 0.0);
    }
}
