//! The housekeeping record: what procman stores every housekeeping period.
//!
//! The original stores a placeholder (`random`). Ours is a real record: how many managed processes are in
//! each state, the total restart count, and the daemon's own memory and CPU.

use std::sync::Arc;
use std::time::SystemTime;

use crate::cgse::storage::{HkRecord, HkValue};
use crate::monitor::StatusSampler;
use crate::util::format_datetime;

/// Process counts for the record, provided by the supervisor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessCounts {
    /// Managed processes (column `processes`).
    pub total: u64,
    /// Processes in state `Running`.
    pub running: u64,
    /// Processes in state `Starting`.
    pub starting: u64,
    /// Processes in state `Backoff`.
    pub backoff: u64,
    /// Processes in state `Stopping`.
    pub stopping: u64,
    /// Processes in state `Stopped`.
    pub stopped: u64,
    /// Processes in state `Exited`.
    pub exited: u64,
    /// Processes in state `Fatal`.
    pub fatal: u64,
    /// Automatic restarts so far, all processes together.
    pub restarts: u64,
}

/// Something that can count managed processes (the supervisor).
pub trait CountProcesses: Send + Sync {
    /// The counts now.
    fn counts(&self) -> ProcessCounts;
}

/// The column names, in order. They never change, so existing daily files stay consistent.
pub const COLUMNS: [&str; 12] = [
    "timestamp",
    "processes",
    "running",
    "starting",
    "backoff",
    "stopping",
    "stopped",
    "exited",
    "fatal",
    "restarts",
    "rss",
    "cpu_percent",
];

/// Builds housekeeping records.
pub struct Housekeeping {
    sampler: Arc<StatusSampler>,
    processes: Option<Arc<dyn CountProcesses>>,
}

impl Housekeeping {
    /// Records of the daemon's own figures from `sampler` and, with `processes`, the process counts (else zeros).
    pub fn new(sampler: Arc<StatusSampler>, processes: Option<Arc<dyn CountProcesses>>) -> Housekeeping {
        Housekeeping { sampler, processes }
    }

    /// What counts the processes (systemd's `STATUS=` reports the same counts).
    pub fn processes(&self) -> Option<Arc<dyn CountProcesses>> {
        self.processes.clone()
    }

    /// [`COLUMNS`] as owned strings.
    pub fn columns() -> Vec<String> {
        COLUMNS.iter().map(|c| (*c).to_owned()).collect()
    }

    /// One record, now.
    pub fn collect(&self) -> HkRecord {
        let when = SystemTime::now();
        let c = self.processes.as_ref().map(|p| p.counts()).unwrap_or_default();
        let f = self.sampler.figures();
        let cpu = self.sampler.cpu_percent(&f);
        let n = |v: u64| HkValue::Int(v as i64);
        let values = [
            HkValue::Str(format_datetime(when)),
            n(c.total),
            n(c.running),
            n(c.starting),
            n(c.backoff),
            n(c.stopping),
            n(c.stopped),
            n(c.exited),
            n(c.fatal),
            n(c.restarts),
            n(f.rss),
            HkValue::Float(cpu),
        ];
        HkRecord {
            when,
            fields: COLUMNS.iter().map(|c| (*c).to_owned()).zip(values).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;
    impl CountProcesses for Fixed {
        fn counts(&self) -> ProcessCounts {
            ProcessCounts {
                total: 3,
                running: 2,
                fatal: 1,
                restarts: 7,
                ..Default::default()
            }
        }
    }

    #[test]
    fn record_has_stable_columns_and_real_values() {
        let hk = Housekeeping::new(Arc::new(StatusSampler::new()), Some(Arc::new(Fixed)));
        let r = hk.collect();
        assert_eq!(r.columns(), Housekeeping::columns());
        assert_eq!(r.fields[1].1, HkValue::Int(3));
        assert_eq!(r.fields[9].1, HkValue::Int(7));
        assert!(matches!(r.fields[10].1, HkValue::Int(rss) if rss > 0));
    }
}
