//! Logging: `tracing` to stderr, with a filter that `set_logging_level` can change while running.
//!
//! CGSE clients name Python loggers (`egse.procman`, `all`) and Python levels (10 = DEBUG …). We map
//! those onto our tracing targets, so the original `ServiceProxy.set_logging_level` keeps working.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

/// The logger names `set_logging_level` accepts, besides `all`: our module targets, in Python's dotted
/// form too, plus the names CGSE users know.
const KNOWN: [&str; 19] = [
    "procman",
    "procman::server",
    "procman::service",
    "procman::daemon",
    "procman::monitor",
    "procman::controller",
    "procman::supervisor",
    "procman::cgse::registry",
    "procman::cgse::storage",
    "procman::cgse::storage_manager",
    "procman::cgse::confman",
    "procman::cgse::logger",
    "procman::cgse::metrics_hub",
    "procman::cgse::signals",
    "procman::setup",
    "procman::client",
    "procman::transport",
    "procman::bindings",
    "zeromq",
];

/// Translate a CGSE/Python logger name into a tracing target, if we have such a logger.
pub fn target_for(name: &str) -> Option<&'static str> {
    let name = name.trim();
    match name {
        "egse" | "egse.procman" | "egse.procman.procman_cs" | "pm_cs" => return Some("procman"),
        _ => {}
    }
    let rust = name.replace('.', "::");
    KNOWN.iter().copied().find(|k| *k == rust)
}

/// Python logging level (10, 20, …) to a tracing level.
pub fn level_from_python(level: i64) -> LevelFilter {
    match level {
        i64::MIN..=9 => LevelFilter::TRACE,
        10..=19 => LevelFilter::DEBUG,
        20..=29 => LevelFilter::INFO,
        30..=39 => LevelFilter::WARN,
        _ => LevelFilter::ERROR,
    }
}

/// Why the log filter could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum LogLevelError {
    /// A thread panicked while holding the filter state.
    #[error("the log filter state is poisoned")]
    Poisoned,
    /// The filter built from the levels does not parse (a target name it cannot take).
    #[error("invalid log filter: {0}")]
    Filter(String),
    /// The subscriber is gone or refused the new filter.
    #[error("cannot reload the log filter: {0}")]
    Reload(String),
}

/// Run-time control of the log filter.
pub trait LogControl: Send + Sync {
    /// Set the level of one target, or of everything when `target` is `None`.
    fn set_level(&self, target: Option<&str>, level: LevelFilter) -> Result<(), LogLevelError>;
}

/// A `LogControl` that only remembers (for tests and for embedders with their own subscriber).
#[derive(Default)]
pub struct RecordingLogControl {
    /// The calls so far: (target, level), in order.
    pub calls: Mutex<Vec<(Option<String>, LevelFilter)>>,
}

impl LogControl for RecordingLogControl {
    fn set_level(&self, target: Option<&str>, level: LevelFilter) -> Result<(), LogLevelError> {
        if let Ok(mut c) = self.calls.lock() {
            c.push((target.map(str::to_owned), level));
        }
        Ok(())
    }
}

struct ReloadControl {
    handle: reload::Handle<EnvFilter, Registry>,
    state: Mutex<(LevelFilter, BTreeMap<String, LevelFilter>)>,
}

impl LogControl for ReloadControl {
    fn set_level(&self, target: Option<&str>, level: LevelFilter) -> Result<(), LogLevelError> {
        let mut state = self.state.lock().map_err(|_| LogLevelError::Poisoned)?;
        match target {
            None => {
                state.0 = level;
                state.1.clear();
            }
            Some(t) => {
                state.1.insert(t.to_owned(), level);
            }
        }
        let mut spec = state.0.to_string();
        for (t, l) in &state.1 {
            spec.push_str(&format!(",{t}={l}"));
        }
        let filter = EnvFilter::try_new(&spec).map_err(|e| LogLevelError::Filter(e.to_string()))?;
        self.handle
            .reload(filter)
            .map_err(|e| LogLevelError::Reload(e.to_string()))
    }
}

static CONTROL: OnceLock<Arc<dyn LogControl>> = OnceLock::new();

/// Install the global subscriber once (stderr, filter from `PROCMAN_LOG`, then `RUST_LOG`, else
/// `info`), and return its control. Later calls return the same control.
pub fn init() -> Arc<dyn LogControl> {
    CONTROL
        .get_or_init(|| {
            let spec = std::env::var("PROCMAN_LOG")
                .or_else(|_| std::env::var("RUST_LOG"))
                .unwrap_or_else(|_| "info".into());
            let filter = EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("info"));
            let default = filter.max_level_hint().unwrap_or(LevelFilter::INFO);
            let (layer, handle) = reload::Layer::new(filter);
            // Colours only for a terminal: `pm_cs start-bg` sends stderr to a log file.
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let fmt = fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(true)
                .with_ansi(ansi);
            // Another subscriber may already be installed (an embedding application): then our
            // control still records levels but cannot change that subscriber.
            // The same filter decides for the CGSE Logger (`cgse::logger`), which forwards once the daemon
            // has its settings.
            let installed = tracing_subscriber::registry()
                .with(layer)
                .with(fmt)
                .with(crate::cgse::logger::layer())
                .try_init()
                .is_ok();
            if installed {
                Arc::new(ReloadControl {
                    handle,
                    state: Mutex::new((default, BTreeMap::new())),
                }) as Arc<dyn LogControl>
            } else {
                Arc::new(RecordingLogControl::default()) as Arc<dyn LogControl>
            }
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captures formatted log lines in memory.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn set_level_changes_the_live_filter() {
        let out = Capture::default();
        let writer = out.clone();
        let (layer, handle) = reload::Layer::new(EnvFilter::new("info"));
        let fmt = fmt::layer().with_writer(move || writer.clone()).with_ansi(false);
        let subscriber = tracing_subscriber::registry().with(layer).with(fmt);
        let control = ReloadControl {
            handle,
            state: Mutex::new((LevelFilter::INFO, BTreeMap::new())),
        };
        let text = || String::from_utf8_lossy(&out.0.lock().unwrap()).into_owned();
        tracing::subscriber::with_default(subscriber, || {
            tracing::debug!(target: "procman::server", "first");
            assert!(!text().contains("first"));
            control.set_level(Some("procman::server"), LevelFilter::DEBUG).unwrap();
            tracing::debug!(target: "procman::server", "second");
            tracing::debug!(target: "procman::daemon", "elsewhere");
            assert!(text().contains("second") && !text().contains("elsewhere"));
            control.set_level(None, LevelFilter::ERROR).unwrap();
            tracing::warn!(target: "procman::daemon", "third");
            assert!(!text().contains("third"));
        });
    }

    #[test]
    fn python_names_and_levels() {
        assert_eq!(target_for("egse.procman"), Some("procman"));
        assert_eq!(target_for("procman.server"), Some("procman::server"));
        assert_eq!(target_for("no.such.logger"), None);
        assert_eq!(level_from_python(10), LevelFilter::DEBUG);
        assert_eq!(level_from_python(20), LevelFilter::INFO);
        assert_eq!(level_from_python(50), LevelFilter::ERROR);
        assert_eq!(level_from_python(0), LevelFilter::TRACE);
    }
}
