//! The CGSE Logger (`log_cs`): every log line of the daemon also goes to the lab's `general.log`.
//!
//! CGSE processes send each record to the Logging Control Server's receiver as a ZeroMQ PUSH of the pickled
//! `LogRecord.__dict__`; `log_cs` rebuilds the record (`logging.makeLogRecord`) and formats it into
//! `general.log` like every other one. [`RemoteLayer`] does the same for our tracing events: the fields
//! `log_cs`'s format uses (`asctime` from `created`/`msecs`, `levelname`, `processName`, `message`, `name`,
//! `process`, `package_name`, `filename`, `lineno`) and the rest of a `LogRecord` as Python fills it in.
//!
//! The layer sits behind the same run-time filter as the local output, so `set_logging_level` decides
//! for both. It only queues (a [`Pusher`]: bounded, never blocking, drops counted); local output stays.
//! Before the daemon has its settings (and in processes that never start one) the layer does nothing.

use std::fmt::Write as _;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

use crate::codec::{self, Value};

use super::push::Pusher;

/// The settings group of the Logger in CGSE settings files.
pub const GROUP: &str = "Logging Control Server";

/// What the layer needs once the daemon knows its settings.
pub struct Forward {
    /// Sends the encoded records to the Logger's receiver.
    pub pusher: Pusher,
    /// `processName` of the records (`pm_cs`, the Process Manager's `PROCESS_NAME`).
    pub process_name: String,
}

static FORWARD: OnceLock<Forward> = OnceLock::new();
static STARTED: OnceLock<Instant> = OnceLock::new();

/// Start forwarding this process's records (the first call wins; later ones return false).
pub fn install(forward: Forward) -> bool {
    FORWARD.set(forward).is_ok()
}

/// The forwarder, once installed (for status and the shutdown flush).
pub fn installed() -> Option<&'static Forward> {
    FORWARD.get()
}

/// Give the queued records up to `limit` to leave (at shutdown; the process exits right after).
pub async fn flush(limit: Duration) {
    if let Some(f) = FORWARD.get() {
        f.pusher.flush(limit).await;
    }
}

/// The tracing layer that turns events into `log_cs` records.
pub struct RemoteLayer {
    slot: &'static OnceLock<Forward>,
}

/// The layer for the global subscriber (`logging::init`).
pub fn layer() -> RemoteLayer {
    STARTED.get_or_init(Instant::now);
    RemoteLayer { slot: &FORWARD }
}

impl RemoteLayer {
    /// A layer with its own slot (tests).
    pub fn with_slot(slot: &'static OnceLock<Forward>) -> RemoteLayer {
        STARTED.get_or_init(Instant::now);
        RemoteLayer { slot }
    }
}

impl<S: Subscriber> Layer<S> for RemoteLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let Some(forward) = self.slot.get() else { return };
        let meta = event.metadata();
        // Never forward what the sending itself logs: a dead peer must not feed its own queue.
        let target = meta.target();
        if target.starts_with("zeromq") || target == module_path!() || target == "procman::cgse::push" {
            return;
        }
        let mut message = MessageVisitor::default();
        event.record(&mut message);
        let record = record_value(&RecordParts {
            target,
            level: *meta.level(),
            message: message.finish(),
            file: meta.file(),
            line: meta.line(),
            when: SystemTime::now(),
            process_name: &forward.process_name,
        });
        forward.pusher.push(codec::encode(&record));
    }
}

/// The text of an event: its message, then its other fields as `key=value` (as the local output shows).
#[derive(Default)]
struct MessageVisitor {
    message: String,
    fields: String,
}

impl MessageVisitor {
    fn finish(self) -> String {
        match (self.message.is_empty(), self.fields.is_empty()) {
            (_, true) => self.message,
            (true, false) => self.fields,
            (false, false) => format!("{} {}", self.message, self.fields),
        }
    }

    fn field(&mut self, name: &str, value: std::fmt::Arguments<'_>) {
        if !self.fields.is_empty() {
            self.fields.push(' ');
        }
        let _ = write!(self.fields, "{name}={value}");
    }
}

impl Visit for MessageVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_owned();
        } else {
            self.field(field.name(), format_args!("{value}"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.field(field.name(), format_args!("{value:?}"));
        }
    }
}

/// What one record is made of.
pub struct RecordParts<'a> {
    /// The tracing target (module path); `name` is it with `::` as `.`.
    pub target: &'a str,
    /// The event's level.
    pub level: Level,
    /// The event's text.
    pub message: String,
    /// The source file, when known.
    pub file: Option<&'a str>,
    /// The source line, when known.
    pub line: Option<u32>,
    /// When the event happened (`created`, `msecs`).
    pub when: SystemTime,
    /// `processName`.
    pub process_name: &'a str,
}

/// Python's level number and name for a tracing level (TRACE has no Python name: 5, `TRACE`).
pub fn python_level(level: Level) -> (i64, &'static str) {
    match level {
        Level::ERROR => (40, "ERROR"),
        Level::WARN => (30, "WARNING"),
        Level::INFO => (20, "INFO"),
        Level::DEBUG => (10, "DEBUG"),
        Level::TRACE => (5, "TRACE"),
    }
}

/// The `LogRecord.__dict__` of one event, as `egse.logger`'s ZeroMQ handler sends it.
pub fn record_value(p: &RecordParts<'_>) -> Value {
    let (levelno, levelname) = python_level(p.level);
    let name = p.target.replace("::", ".");
    // Python's `package_name` is the dotted package of the module; ours is the module's parent path.
    let package = name
        .rsplit_once('.')
        .map(|(a, _)| a.to_owned())
        .unwrap_or_else(|| name.clone());
    let since = p.when.duration_since(UNIX_EPOCH).unwrap_or_default();
    let created = since.as_secs_f64();
    // Whole milliseconds from the integer time, as Python >= 3.12 does (no float rounding down to .122).
    let msecs = f64::from(since.subsec_millis());
    let relative = STARTED.get().map(|s| s.elapsed().as_secs_f64() * 1000.0).unwrap_or(0.0);
    let pathname = p.file.unwrap_or("(unknown file)");
    let filename = pathname.rsplit('/').next().unwrap_or(pathname);
    let module = filename.strip_suffix(".rs").unwrap_or(filename);
    let thread = std::thread::current();
    let thread_name = thread.name().unwrap_or("unnamed").to_owned();
    Value::dict([
        ("name", Value::Str(name)),
        ("msg", Value::Str(p.message.clone())),
        ("args", Value::Tuple(Vec::new())),
        ("levelname", Value::str(levelname)),
        ("levelno", Value::Int(levelno)),
        ("pathname", Value::str(pathname)),
        ("filename", Value::str(filename)),
        ("module", Value::str(module)),
        ("exc_info", Value::None),
        ("exc_text", Value::None),
        ("stack_info", Value::None),
        ("lineno", Value::Int(i64::from(p.line.unwrap_or(0)))),
        ("funcName", Value::str("(unknown function)")),
        ("created", Value::Float(created)),
        ("msecs", Value::Float(msecs)),
        ("relativeCreated", Value::Float(relative)),
        ("thread", Value::Int(i64::from(nix::unistd::gettid().as_raw()))),
        ("threadName", Value::Str(thread_name)),
        ("processName", Value::str(p.process_name)),
        ("process", Value::Int(i64::from(std::process::id()))),
        ("taskName", Value::None),
        ("package_name", Value::Str(package)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgse::push::PushConfig;
    use crate::cgse::testing::{push_config, PullPeer, ReservedPort};
    use crate::codec::{dict_get, Limits};
    use tokio_util::sync::CancellationToken;
    use tracing_subscriber::filter::LevelFilter;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::{reload, EnvFilter};

    fn config(port: u16, queue: usize) -> PushConfig {
        push_config(
            "Logger",
            "LOG_CS",
            "receiver_port",
            port,
            queue,
            Duration::from_millis(500),
        )
    }

    fn text<'a>(d: &'a [(Value, Value)], k: &str) -> &'a str {
        dict_get(d, k).and_then(Value::as_str).unwrap_or_else(|| panic!("{k}"))
    }

    #[test]
    fn record_has_the_fields_log_cs_formats() {
        let when = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let v = record_value(&RecordParts {
            target: "procman::cgse::registry",
            level: Level::WARN,
            message: "registry heartbeat failed error=x".into(),
            file: Some("src/cgse/registry.rs"),
            line: Some(42),
            when,
            process_name: "pm_cs",
        });
        let bytes = codec::encode(&v);
        let Value::Dict(d) = codec::decode(&bytes, &Limits::default()).unwrap() else {
            panic!()
        };
        assert_eq!(text(&d, "name"), "procman.cgse.registry");
        assert_eq!(text(&d, "package_name"), "procman.cgse");
        assert_eq!(text(&d, "levelname"), "WARNING");
        assert_eq!(dict_get(&d, "levelno"), Some(&Value::Int(30)));
        assert_eq!(text(&d, "processName"), "pm_cs");
        assert_eq!(text(&d, "msg"), "registry heartbeat failed error=x");
        assert_eq!(text(&d, "filename"), "registry.rs");
        assert_eq!(dict_get(&d, "lineno"), Some(&Value::Int(42)));
        assert_eq!(dict_get(&d, "created"), Some(&Value::Float(1_700_000_000.123)));
        assert_eq!(dict_get(&d, "msecs"), Some(&Value::Float(123.0)));
        assert_eq!(dict_get(&d, "args"), Some(&Value::Tuple(vec![])));
        assert_eq!(
            dict_get(&d, "process"),
            Some(&Value::Int(i64::from(std::process::id())))
        );
    }

    /// Events go through the live filter to the receiver, decoded back exactly; a raised level stops them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_reach_the_receiver_through_the_live_filter() {
        static SLOT: OnceLock<Forward> = OnceLock::new();
        let reserved = ReservedPort::new();
        let port = reserved.port();
        let mut peer = PullPeer::bind(port).await;
        let cancel = CancellationToken::new();
        let pusher = Pusher::start(config(port, 64), cancel.clone());
        assert!(SLOT
            .set(Forward {
                pusher: pusher.clone(),
                process_name: "pm_cs".into()
            })
            .is_ok());
        let (filter, handle) = reload::Layer::new(EnvFilter::new("info"));
        let subscriber = tracing_subscriber::registry()
            .with(filter)
            .with(RemoteLayer::with_slot(&SLOT));
        tracing::subscriber::with_default(subscriber, || {
            tracing::debug!(target: "procman::daemon", "hidden");
            tracing::info!(target: "procman::daemon", port = 6120, "listening");
            handle.reload(EnvFilter::new(LevelFilter::ERROR.to_string())).unwrap();
            tracing::warn!(target: "procman::daemon", "filtered");
            tracing::error!(target: "procman::server", "last");
        });
        let got = peer.recv_until(Duration::from_secs(10), |m| m.len() >= 2).await;
        let decoded: Vec<Vec<(Value, Value)>> = got
            .iter()
            .map(|b| match codec::decode(b, &Limits::default()).unwrap() {
                Value::Dict(d) => d,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(decoded.len(), 2);
        assert_eq!(text(&decoded[0], "msg"), "listening port=6120");
        assert_eq!(text(&decoded[0], "levelname"), "INFO");
        assert_eq!(text(&decoded[0], "name"), "procman.daemon");
        assert!(text(&decoded[0], "pathname").ends_with("logger.rs"));
        assert_eq!(text(&decoded[1], "msg"), "last");
        assert_eq!(text(&decoded[1], "levelname"), "ERROR");
        assert_eq!(pusher.stats().dropped(), 0);
        cancel.cancel();
    }
}
