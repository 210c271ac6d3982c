//! Logging: `tracing` to stderr (written by a thread of its own), with a filter that `set_logging_level` can change while running.
//!
//! CGSE clients name Python loggers (`egse.procman`, `all`) and Python levels (10 = DEBUG …). We map
//! those onto our tracing targets, so the original `ServiceProxy.set_logging_level` keeps working.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::writer::{BoxMakeWriter, MakeWriter};
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

/// Lines a stuck log output may hold back before more are dropped (and counted).
const QUEUE_LINES: usize = 1024;

/// A message to the writer, with the number of lines dropped before it was queued: the writer reports drops
/// where they happened, after the lines queued before them.
enum Queued {
    Line(Vec<u8>, u64),
    Flush(SyncSender<()>, u64),
}

/// Log lines on their way to an output written by a thread of its own: a log call never waits for the output
/// (stderr may be a pipe nobody reads, or a file on a full or slow disk), so it never blocks a runtime thread.
/// When the output falls more than [`QUEUE_LINES`] behind, lines are dropped and counted; the writer says how
/// many before its next line.
pub struct LineQueue {
    tx: SyncSender<Queued>,
    dropped: AtomicU64,
}

impl LineQueue {
    /// Starts the writer thread for `out`.
    ///
    /// # Errors
    /// The thread cannot be created.
    pub fn spawn<W: Write + Send + 'static>(out: W, capacity: usize) -> io::Result<Self> {
        let (tx, rx) = sync_channel(capacity.max(1));
        std::thread::Builder::new()
            .name("procman-log".into())
            .spawn(move || write_lines(&rx, out))?;
        Ok(LineQueue {
            tx,
            dropped: AtomicU64::new(0),
        })
    }

    fn push(&self, line: Vec<u8>) {
        let before = self.dropped.load(Ordering::Relaxed);
        if self.tx.try_send(Queued::Line(line, before)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Lines dropped so far because the output could not keep up.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits, at most `timeout`, until every line queued before the call is written. False on timeout.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (done_tx, done_rx) = sync_channel(1);
        let mut msg = Queued::Flush(done_tx, self.dropped());
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                    msg = m;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => return false,
            }
        }
        done_rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_ok()
    }
}

fn write_lines<W: Write>(rx: &Receiver<Queued>, mut out: W) {
    let mut reported = 0;
    while let Ok(msg) = rx.recv() {
        let (Queued::Line(_, now) | Queued::Flush(_, now)) = msg;
        if now > reported {
            let _ = writeln!(
                out,
                "procman: {} log lines dropped: the log output did not keep up",
                now - reported
            );
            reported = now;
        }
        match msg {
            Queued::Line(line, _) => {
                let _ = out.write_all(&line);
            }
            Queued::Flush(done, _) => {
                let _ = out.flush();
                let _ = done.send(());
            }
        }
    }
}

/// One log event's text, queued as one line when the formatter is done with it.
pub struct QueuedLine<'a> {
    queue: &'a LineQueue,
    buf: Vec<u8>,
}

impl Write for QueuedLine<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for QueuedLine<'_> {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            self.queue.push(std::mem::take(&mut self.buf));
        }
    }
}

impl<'a> MakeWriter<'a> for LineQueue {
    type Writer = QueuedLine<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        QueuedLine {
            queue: self,
            buf: Vec::with_capacity(160),
        }
    }
}

/// The process-wide queue as a writer the subscriber can own.
struct StaticQueue(&'static LineQueue);

impl<'a> MakeWriter<'a> for StaticQueue {
    type Writer = QueuedLine<'static>;

    fn make_writer(&'a self) -> Self::Writer {
        self.0.make_writer()
    }
}

static STDERR_QUEUE: OnceLock<Option<LineQueue>> = OnceLock::new();

/// Waits, at most `timeout`, until the log lines so far are on stderr (before the process exits).
pub fn flush(timeout: Duration) {
    if let Some(Some(q)) = STDERR_QUEUE.get() {
        q.flush(timeout);
    }
}

static CONTROL: OnceLock<Arc<dyn LogControl>> = OnceLock::new();

/// Install the global subscriber once (stderr through a [`LineQueue`], filter from `PROCMAN_LOG`, then
/// `RUST_LOG`, else `info`), and return its control. Later calls return the same control.
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
            // Through the writer thread; straight to stderr only if that thread cannot be created.
            let queue = STDERR_QUEUE.get_or_init(|| LineQueue::spawn(io::stderr(), QUEUE_LINES).ok());
            let writer = match queue {
                Some(q) => BoxMakeWriter::new(StaticQueue(q)),
                None => BoxMakeWriter::new(io::stderr),
            };
            let fmt = fmt::layer().with_writer(writer).with_target(true).with_ansi(ansi);
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

    /// An output that takes nothing until the test lets it.
    #[derive(Clone)]
    struct Gated {
        open: Arc<(Mutex<bool>, std::sync::Condvar)>,
        got: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Gated {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (lock, cv) = &*self.open;
            let mut open = lock.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
            self.got.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A stuck output never holds up the logging thread: lines beyond the queue are dropped and counted,
    /// and the count is written once the output moves again, before the lines that follow.
    #[test]
    fn a_stuck_output_drops_lines_instead_of_blocking() {
        let out = Gated {
            open: Arc::new((Mutex::new(false), std::sync::Condvar::new())),
            got: Arc::new(Mutex::new(Vec::new())),
        };
        let queue = LineQueue::spawn(out.clone(), 4).unwrap();
        for i in 0..20 {
            let mut w = queue.make_writer();
            writeln!(w, "line {i}").unwrap();
        }
        // One line may be in the writer's hands, four in the queue: at least 15 dropped.
        assert!(queue.dropped() >= 15, "dropped {}", queue.dropped());
        assert!(
            !queue.flush(Duration::from_millis(50)),
            "a flush cannot finish while the output is stuck"
        );
        *out.open.0.lock().unwrap() = true;
        out.open.1.notify_all();
        assert!(queue.flush(Duration::from_secs(30)));
        {
            let mut w = queue.make_writer();
            writeln!(w, "after").unwrap();
        }
        assert!(queue.flush(Duration::from_secs(30)));
        let text = String::from_utf8(out.got.lock().unwrap().clone()).unwrap();
        assert!(text.starts_with("line 0\n"), "{text}");
        let notice = text.find("log lines dropped").expect("a drop notice");
        assert!(notice < text.find("after").unwrap(), "{text}");
        assert!(!text.contains("line 19"), "{text}");
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
