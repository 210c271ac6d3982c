//! The CGSE Metrics Hub (`mh_cs`): housekeeping as data points, next to the Storage Manager's CSV files.
//!
//! CGSE control servers send each housekeeping record to the hub's collector as a ZeroMQ PUSH of the JSON
//! of a `DataPoint` (`egse.metrics.DataPoint.as_dict()`): `{"measurement": <storage mnemonic, lower case>,
//! "tags": {"site_id", "origin"}, "fields": {<column, lower case>: value}, "time": <UNIX seconds>}`.
//! [`MetricsSink`] does that for our record (measurement `pm`), and — beyond the original — one point per
//! managed process and period (measurement `pm_process`, tag `process_id`; fields `state_code`,
//! `restarts`, `cpu_percent`, `rss`, `uptime`), so a lab sees each process in its dashboards.
//!
//! It wraps the storage sink: points are queued on a [`Pusher`] (bounded, never blocking, drops counted),
//! then the record goes to storage as before. The hub being absent or stuck costs storage nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value as Json};

use crate::supervisor::{ProcessRecord, ProcessState};

/// What a point says about one managed process (taken from the supervisor's [`ProcessRecord`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessSample {
    /// Process id (the point's `process_id` tag).
    pub id: String,
    /// Its state.
    pub state: ProcessState,
    /// Pid of the running process.
    pub pid: Option<i32>,
    /// Automatic restarts so far.
    pub restarts: u32,
    /// Seconds since it started, while running or starting.
    pub uptime_s: Option<f64>,
}

impl From<&ProcessRecord> for ProcessSample {
    fn from(r: &ProcessRecord) -> ProcessSample {
        ProcessSample {
            id: r.id.clone(),
            state: r.state,
            pid: r.pid,
            restarts: r.restarts,
            uptime_s: r.uptime_s,
        }
    }
}

use super::push::Pusher;
use super::storage::{HkRecord, HkValue, HousekeepingSink, SinkError};
use crate::util::BoxFuture;

/// The settings group of the Metrics Hub in CGSE settings files.
pub const GROUP: &str = "Metrics Hub";
/// The measurement of the per-process points.
pub const PROCESS_MEASUREMENT: &str = "pm_process";

/// The number a dashboard plots for a process state (documented in the README).
pub fn state_code(state: ProcessState) -> i64 {
    match state {
        ProcessState::Stopped => 0,
        ProcessState::Starting => 1,
        ProcessState::Running => 2,
        ProcessState::Backoff => 3,
        ProcessState::Stopping => 4,
        ProcessState::Exited => 5,
        ProcessState::Fatal => 6,
    }
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The data point of one housekeeping record: numeric columns only (the `timestamp` column is the time).
pub fn housekeeping_point(record: &HkRecord, origin: &str, site_id: &str) -> Json {
    let mut fields = Map::new();
    for (name, value) in &record.fields {
        if name == "timestamp" {
            continue;
        }
        let v = match value {
            HkValue::Int(i) => json!(i),
            HkValue::Float(f) if f.is_finite() => json!(f),
            _ => continue,
        };
        fields.insert(name.to_lowercase(), v);
    }
    json!({
        "measurement": origin.to_lowercase(),
        "tags": {"site_id": site_id, "origin": origin},
        "fields": fields,
        "time": unix_seconds(record.when),
    })
}

/// What `/proc` says about one managed process.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcUsage {
    /// Resident set size in bytes (0 when unreadable).
    pub rss: u64,
    /// CPU use since the previous sample of the pid, in % of one core (0 on the first).
    pub cpu_percent: f64,
}

/// CPU % between two calls per pid, and RSS, from `/proc/<pid>/stat` and `/proc/<pid>/statm`.
#[derive(Default)]
pub struct UsageMeter {
    last: HashMap<i32, (Instant, f64)>,
}

impl UsageMeter {
    /// Usage of `pid` now; CPU % is 0 on the first sight of a pid.
    pub fn sample(&mut self, pid: i32) -> ProcUsage {
        let clk = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as f64;
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .unwrap_or(4096) as u64;
        let rss = std::fs::read_to_string(format!("/proc/{pid}/statm"))
            .ok()
            .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
            .map(|pages| pages * page)
            .unwrap_or(0);
        let cpu_s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| {
            // Fields after the command name, which may contain spaces: utime and stime are 14 and 15.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some(ticks / clk)
        });
        let now = Instant::now();
        let cpu_percent = match (cpu_s, self.last.get(&pid)) {
            (Some(c), Some((t, prev))) => {
                let wall = now.duration_since(*t).as_secs_f64();
                if wall > 0.0 {
                    ((c - prev) / wall * 100.0).max(0.0)
                } else {
                    0.0
                }
            }
            _ => 0.0,
        };
        if let Some(c) = cpu_s {
            self.last.insert(pid, (now, c));
        }
        ProcUsage { rss, cpu_percent }
    }

    /// Forget pids that are gone.
    pub fn retain(&mut self, live: &[i32]) {
        self.last.retain(|pid, _| live.contains(pid));
    }
}

/// The point of one managed process.
pub fn process_point(r: &ProcessSample, usage: ProcUsage, origin: &str, site_id: &str, when: SystemTime) -> Json {
    json!({
        "measurement": PROCESS_MEASUREMENT,
        "tags": {"site_id": site_id, "origin": origin, "process_id": r.id},
        "fields": {
            "state_code": state_code(r.state),
            "restarts": r.restarts,
            "cpu_percent": usage.cpu_percent,
            "rss": usage.rss,
            "uptime": r.uptime_s.unwrap_or(0.0),
        },
        "time": unix_seconds(when),
    })
}

/// The managed processes now (the supervisor's list).
pub type ListProcesses = Arc<dyn Fn() -> Vec<ProcessSample> + Send + Sync>;

/// A [`HousekeepingSink`] that also sends every record (and the process points) to the Metrics Hub.
pub struct MetricsSink {
    inner: Arc<dyn HousekeepingSink>,
    pusher: Pusher,
    origin: String,
    site_id: String,
    processes: Option<ListProcesses>,
    meter: Mutex<UsageMeter>,
}

impl MetricsSink {
    /// Wraps `inner`, sending each record through `pusher` with `origin` and `site_id` as tags;
    /// with `processes`, also one point per managed process.
    pub fn new(
        inner: Arc<dyn HousekeepingSink>,
        pusher: Pusher,
        origin: String,
        site_id: String,
        processes: Option<ListProcesses>,
    ) -> MetricsSink {
        MetricsSink {
            inner,
            pusher,
            origin,
            site_id,
            processes,
            meter: Mutex::new(UsageMeter::default()),
        }
    }

    /// Where the Metrics Hub stands (for `get_integration_status`).
    pub fn describe_hub(&self) -> String {
        self.pusher.describe()
    }

    /// The points of one period: the record's, then one per managed process.
    pub fn points(&self, record: &HkRecord) -> Vec<Json> {
        let mut out = vec![housekeeping_point(record, &self.origin, &self.site_id)];
        if let Some(list) = &self.processes {
            let records = list();
            let mut meter = self.meter.lock().unwrap_or_else(|e| e.into_inner());
            let live: Vec<i32> = records.iter().filter_map(|r| r.pid).collect();
            meter.retain(&live);
            for r in &records {
                let usage = r.pid.map(|pid| meter.sample(pid)).unwrap_or_default();
                out.push(process_point(r, usage, &self.origin, &self.site_id, record.when));
            }
        }
        out
    }
}

impl HousekeepingSink for MetricsSink {
    fn register(&self, columns: Vec<String>) -> BoxFuture<'_, Result<String, SinkError>> {
        self.inner.register(columns)
    }

    fn save(&self, record: HkRecord) -> BoxFuture<'_, Result<(), SinkError>> {
        for point in self.points(&record) {
            self.pusher.push(point.to_string().into_bytes());
        }
        self.inner.save(record)
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        self.inner.shutdown()
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgse::push::PushConfig;
    use crate::cgse::testing::{push_config, PullPeer, ReservedPort};
    use std::time::Duration;
    use tokio_util::sync::CancellationToken;

    struct Counting(std::sync::atomic::AtomicUsize);
    impl HousekeepingSink for Counting {
        fn register(&self, _c: Vec<String>) -> BoxFuture<'_, Result<String, SinkError>> {
            Box::pin(async { Ok("ok".into()) })
        }
        fn save(&self, _r: HkRecord) -> BoxFuture<'_, Result<(), SinkError>> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async { Ok(()) })
        }
        fn shutdown(&self) -> BoxFuture<'_, ()> {
            Box::pin(async {})
        }
        fn describe(&self) -> String {
            "counting".into()
        }
    }

    fn config(port: u16, queue: usize) -> PushConfig {
        push_config(
            "Metrics Hub",
            "MH_CS",
            "collector_port",
            port,
            queue,
            Duration::from_millis(500),
        )
    }

    fn record() -> HkRecord {
        HkRecord {
            when: UNIX_EPOCH + Duration::from_millis(1_700_000_000_500),
            fields: vec![
                ("timestamp".into(), HkValue::Str("2023-11-14T22:13:20.500+0000".into())),
                ("processes".into(), HkValue::Int(2)),
                ("cpu_percent".into(), HkValue::Float(1.5)),
                ("RSS".into(), HkValue::Int(1024)),
                ("note".into(), HkValue::Str("text".into())),
            ],
        }
    }

    fn proc_record(id: &str, state: ProcessState, pid: Option<i32>) -> ProcessSample {
        ProcessSample {
            id: id.into(),
            state,
            pid,
            restarts: 3,
            uptime_s: Some(12.5),
        }
    }

    #[test]
    fn the_points_have_the_shape_the_hub_accepts() {
        let p = housekeeping_point(&record(), "PM", "LAB42");
        assert_eq!(
            p,
            json!({"measurement": "pm", "tags": {"site_id": "LAB42", "origin": "PM"},
                   "fields": {"processes": 2, "cpu_percent": 1.5, "rss": 1024}, "time": 1_700_000_000.5})
        );
        let r = proc_record("DUMMY_01", ProcessState::Running, Some(std::process::id() as i32));
        let mut meter = UsageMeter::default();
        let usage = meter.sample(std::process::id() as i32);
        assert!(usage.rss > 0);
        let q = process_point(&r, usage, "PM", "LAB42", record().when);
        assert_eq!(q["measurement"], "pm_process");
        assert_eq!(
            q["tags"],
            json!({"site_id": "LAB42", "origin": "PM", "process_id": "DUMMY_01"})
        );
        assert_eq!(q["fields"]["state_code"], 2);
        assert_eq!(q["fields"]["restarts"], 3);
        assert_eq!(q["fields"]["uptime"], 12.5);
        assert_eq!(q["fields"]["rss"], usage.rss);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_reach_the_collector_and_storage_still_gets_them() {
        let reserved = ReservedPort::new();
        let port = reserved.port();
        let mut peer = PullPeer::bind(port).await;
        let cancel = CancellationToken::new();
        let inner = Arc::new(Counting(Default::default()));
        let list: ListProcesses = Arc::new(|| vec![proc_record("A", ProcessState::Fatal, None)]);
        let sink = MetricsSink::new(
            inner.clone(),
            Pusher::start(config(port, 16), cancel.clone()),
            "PM".into(),
            "LAB42".into(),
            Some(list),
        );
        sink.save(record()).await.unwrap();
        let got = peer.recv_until(Duration::from_secs(10), |m| m.len() >= 2).await;
        let points: Vec<Json> = got.iter().map(|b| serde_json::from_slice(b).unwrap()).collect();
        assert_eq!(points[0]["measurement"], "pm");
        assert_eq!(points[1]["measurement"], "pm_process");
        assert_eq!(points[1]["tags"]["process_id"], "A");
        assert_eq!(points[1]["fields"]["state_code"], 6);
        assert_eq!(inner.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        cancel.cancel();
    }

    #[tokio::test]
    async fn an_absent_hub_costs_storage_nothing_and_drops_are_counted() {
        let reserved = ReservedPort::new();
        let port = reserved.port();
        let cancel = CancellationToken::new();
        let inner = Arc::new(Counting(Default::default()));
        let pusher = Pusher::start(config(port, 3), cancel.clone());
        let sink = MetricsSink::new(inner.clone(), pusher.clone(), "PM".into(), "LAB42".into(), None);
        for _ in 0..5 {
            sink.save(record()).await.unwrap();
        }
        assert_eq!(inner.0.load(std::sync::atomic::Ordering::SeqCst), 5);
        assert_eq!(pusher.stats().dropped(), 2);
        assert!(sink.describe_hub().contains("2 dropped"), "{}", sink.describe_hub());
        cancel.cancel();
    }
}
