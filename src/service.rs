//! The service socket's commands: control-server administration.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cgse::storage::HousekeepingSink;
use crate::codec::Value;
use crate::logging::{self, LogControl};
use crate::monitor::StatusSampler;
use crate::protocol::{exception, py_repr, PyExc};
use crate::server::{Call, CommandError, Handler, HandlerFuture, Reply};

/// What `get_cs_module` answers: the module CGSE tools expect for the Process Manager.
pub const CS_MODULE: &str = "egse.procman.procman_cs";
/// The class name in the `quit_server` reply.
pub const SERVER_CLASS: &str = "ProcessManagerControlServer";

/// Moving average over the last 100 runs of a timed function, in seconds.
#[derive(Debug, Default)]
pub struct MovingAverage {
    samples: VecDeque<f64>,
}

impl MovingAverage {
    const WINDOW: usize = 100;

    /// Add one run's duration; the oldest is dropped past 100.
    pub fn add(&mut self, seconds: f64) {
        if self.samples.len() == Self::WINDOW {
            self.samples.pop_front();
        }
        self.samples.push_back(seconds);
    }

    /// The mean of the kept runs; None before the first.
    pub fn mean(&self) -> Option<f64> {
        (!self.samples.is_empty()).then(|| self.samples.iter().sum::<f64>() / self.samples.len() as f64)
    }
}

/// Run-time settings and measurements shared by the service commands, the monitoring publisher and
/// the housekeeping task.
pub struct ServiceState {
    /// Monitoring period in ms.
    pub mon_delay_ms: watch::Sender<f64>,
    /// Housekeeping period in ms.
    pub hk_delay_ms: watch::Sender<f64>,
    /// Durations of building the status dict (seconds), for `get_average_execution_times`.
    pub get_status_time: Mutex<MovingAverage>,
    /// Durations of collecting a housekeeping record (seconds), for `get_average_execution_times`.
    pub get_housekeeping_time: Mutex<MovingAverage>,
    listeners: Mutex<Vec<(String, Value)>>,
    /// The log filter the logging-level commands change.
    pub log: Arc<dyn LogControl>,
    /// Where housekeeping goes (registered again with `hk_columns` on request).
    pub storage: Arc<dyn HousekeepingSink>,
    /// Columns of the housekeeping record, sent with every registration.
    pub hk_columns: Vec<String>,
    /// Builds the status dict.
    pub sampler: Arc<StatusSampler>,
    /// Cancelled by `quit_server`.
    pub shutdown: CancellationToken,
    /// What a peer may set or add (settings of the `Procman` group).
    pub bounds: ServiceBounds,
}

/// Bounds on what the service commands accept from a peer.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceBounds {
    /// Shortest period (ms) a `set_*_frequency` may set; shorter ones are clamped to it.
    pub min_period_ms: f64,
    /// Longest period (ms) a `set_*_frequency` may set; longer ones are clamped to it.
    pub max_period_ms: f64,
    /// Listeners kept at most.
    pub max_listeners: usize,
    /// Longest listener name in bytes.
    pub max_listener_name: usize,
}

impl Default for ServiceBounds {
    fn default() -> Self {
        ServiceBounds {
            min_period_ms: 10.0,
            max_period_ms: 3_600_000.0,
            max_listeners: 100,
            max_listener_name: 256,
        }
    }
}

/// A peer-supplied name for the log: at most 80 characters.
pub fn log_name(name: &str) -> String {
    const MAX: usize = 80;
    match name.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}… ({} bytes)", &name[..i], name.len()),
        None => name.to_owned(),
    }
}

impl ServiceState {
    /// Periods from `mon_delay` and `hk_delay`, no listeners, default bounds.
    pub fn new(
        mon_delay: Duration,
        hk_delay: Duration,
        log: Arc<dyn LogControl>,
        storage: Arc<dyn HousekeepingSink>,
        hk_columns: Vec<String>,
        sampler: Arc<StatusSampler>,
        shutdown: CancellationToken,
    ) -> ServiceState {
        ServiceState {
            mon_delay_ms: watch::channel(mon_delay.as_secs_f64() * 1000.0).0,
            hk_delay_ms: watch::channel(hk_delay.as_secs_f64() * 1000.0).0,
            get_status_time: Mutex::new(MovingAverage::default()),
            get_housekeeping_time: Mutex::new(MovingAverage::default()),
            listeners: Mutex::new(Vec::new()),
            log,
            storage,
            hk_columns,
            sampler,
            shutdown,
            bounds: ServiceBounds::default(),
        }
    }

    /// Replace the default bounds.
    pub fn with_bounds(mut self, bounds: ServiceBounds) -> ServiceState {
        self.bounds = bounds;
        self
    }

    /// The status dict, timed into the `get_status` average.
    pub fn status(&self) -> Value {
        let started = std::time::Instant::now();
        let v = self.sampler.status(*self.mon_delay_ms.borrow());
        lock(&self.get_status_time).add(started.elapsed().as_secs_f64());
        v
    }

    /// The names of the listeners added, in order.
    pub fn listener_names(&self) -> Vec<String> {
        lock(&self.listeners).iter().map(|(n, _)| n.clone()).collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `("ACK",)`
fn ack() -> Value {
    Value::Tuple(vec![Value::str("ACK")])
}

/// `("NACK", <exc>(message))`
fn nack(exc: PyExc, message: &str) -> Value {
    Value::Tuple(vec![Value::str("NACK"), exception(exc, message)])
}

/// A frequency argument in Hz: a finite number > 0.
fn frequency(v: Option<Value>) -> Result<f64, CommandError> {
    let v = v.unwrap_or(Value::None);
    let f = match &v {
        Value::Str(s) => s.trim().parse::<f64>().ok(),
        Value::Bool(_) => None,
        other => other.as_f64(),
    };
    match f {
        Some(f) if f.is_finite() && f > 0.0 => Ok(f),
        _ => Err(CommandError::Value(format!(
            "freq must be a number of Hz > 0, got {}",
            py_repr(&v)
        ))),
    }
}

/// The new period for frequency `freq`, never shorter than the average run time + 200 ms (CGSE's rule),
/// and clamped into the bounds: a tiny frequency would otherwise make an infinite period.
fn period_ms(freq: f64, avg_seconds: Option<f64>, b: &ServiceBounds) -> f64 {
    let p = (1000.0 / freq).max(1000.0 * (avg_seconds.unwrap_or(0.0) + 0.2));
    if p.is_nan() {
        return b.max_period_ms;
    }
    p.clamp(b.min_period_ms, b.max_period_ms.max(b.min_period_ms))
}

fn python_level(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::Bool(b) => Some(i64::from(*b)),
        Value::Float(f) if f.is_finite() => Some(f.trunc() as i64),
        Value::Str(s) => s
            .trim()
            .parse::<i64>()
            .ok()
            .or_else(|| match s.trim().to_ascii_uppercase().as_str() {
                "TRACE" => Some(5),
                "DEBUG" => Some(10),
                "INFO" => Some(20),
                "WARNING" | "WARN" => Some(30),
                "ERROR" => Some(40),
                "CRITICAL" => Some(50),
                _ => None,
            }),
        _ => None,
    }
}

/// Handler of the service table.
pub struct ServiceHandler {
    /// The state the commands read and change.
    pub state: Arc<ServiceState>,
}

impl ServiceHandler {
    async fn call(&self, call: Call) -> Result<Value, CommandError> {
        let s = &self.state;
        match call.name.as_str() {
            "set_monitoring_frequency" => {
                let freq = frequency(call.bind(&["freq"], 1)?.swap_remove(0))?;
                let ms = period_ms(freq, lock(&s.get_status_time).mean(), &s.bounds);
                s.mon_delay_ms.send_replace(ms);
                info!(delay_ms = ms, "monitoring period changed");
                Ok(Value::Float(ms))
            }
            "set_hk_frequency" => {
                let freq = frequency(call.bind(&["freq"], 1)?.swap_remove(0))?;
                let ms = period_ms(freq, lock(&s.get_housekeeping_time).mean(), &s.bounds);
                s.hk_delay_ms.send_replace(ms);
                info!(delay_ms = ms, "housekeeping period changed");
                Ok(Value::Float(ms))
            }
            "set_logging_level" => {
                let mut b = call.bind(&["name", "level"], 2)?;
                let level_v = b.pop().flatten().unwrap_or(Value::None);
                let name_v = b.pop().flatten().unwrap_or(Value::None);
                let Some(name) = name_v.as_str().map(str::to_owned) else {
                    return Err(CommandError::Type(format!(
                        "name must be a logger name (str), got {}",
                        py_repr(&name_v)
                    )));
                };
                let Some(level) = python_level(&level_v) else {
                    return Err(CommandError::Value(format!(
                        "level must be a Python logging level (e.g. 10 or 'DEBUG'), got {}",
                        py_repr(&level_v)
                    )));
                };
                let filter = logging::level_from_python(level);
                if name == "all" {
                    s.log
                        .set_level(None, filter)
                        .map_err(|e| CommandError::Failed(e.to_string()))?;
                    return Ok(Value::Str(format!(
                        "Logging level set to {level} for ALL 'egse' loggers"
                    )));
                }
                match logging::target_for(&name) {
                    Some(target) => {
                        s.log
                            .set_level(Some(target), filter)
                            .map_err(|e| CommandError::Failed(e.to_string()))?;
                        Ok(Value::Str(format!("Logging level for {name} set to {level}.")))
                    }
                    None => Ok(Value::Str(format!(
                        "Logger with name '{name}' doesn't exist at the server side."
                    ))),
                }
            }
            "quit_server" => {
                call.bind(&[], 0)?;
                info!("quit_server received: shutting down after this reply");
                s.shutdown.cancel();
                Ok(Value::Str(format!("Sent interrupt to {SERVER_CLASS}.")))
            }
            "get_process_status" => {
                call.bind(&[], 0)?;
                Ok(s.status())
            }
            "get_cs_module" => {
                call.bind(&[], 0)?;
                Ok(Value::str(CS_MODULE))
            }
            "get_average_execution_times" => {
                call.bind(&[], 0)?;
                let mut items = Vec::new();
                if let Some(m) = lock(&s.get_status_time).mean() {
                    items.push((Value::str("get_status"), Value::Float(m)));
                }
                if let Some(m) = lock(&s.get_housekeeping_time).mean() {
                    items.push((Value::str("get_housekeeping"), Value::Float(m)));
                }
                Ok(Value::Dict(items))
            }
            "get_storage_mnemonic" => unreachable_builtin(),
            "add_listener" => {
                let listener = call.bind(&["listener"], 1)?.swap_remove(0).unwrap_or(Value::None);
                Ok(self.add_listener(listener))
            }
            "remove_listener" => {
                let listener = call.bind(&["listener"], 1)?.swap_remove(0).unwrap_or(Value::None);
                let Some(name) = listener.get("name").and_then(Value::as_str).map(str::to_owned) else {
                    return Ok(nack(
                        PyExc::ValueError,
                        &format!("Expected 'name' key in listener argument {}.", py_repr(&listener)),
                    ));
                };
                let mut l = lock(&self.state.listeners);
                match l.iter().position(|(n, _)| *n == name) {
                    Some(i) => {
                        l.remove(i);
                        info!(listener = %log_name(&name), "removed listener");
                        Ok(ack())
                    }
                    None => Ok(nack(
                        PyExc::ValueError,
                        &format!("Process {name} cannot be removed, not registered."),
                    )),
                }
            }
            "get_listener_names" => {
                call.bind(&[], 0)?;
                let names = self.state.listener_names().into_iter().map(Value::Str).collect();
                Ok(Value::Tuple(vec![Value::List(names)]))
            }
            "register_to_storage" => {
                call.bind(&[], 0)?;
                match s.storage.register(s.hk_columns.clone()).await {
                    Ok(msg) => {
                        info!(%msg, "registered to storage");
                        Ok(ack())
                    }
                    Err(reason) => {
                        warn!(%reason, "register_to_storage failed");
                        Ok(nack(PyExc::RuntimeError, &reason.to_string()))
                    }
                }
            }
            other => Err(CommandError::Unknown(other.to_owned())),
        }
    }

    fn add_listener(&self, listener: Value) -> Value {
        let Value::Dict(_) = &listener else {
            return nack(
                PyExc::TypeError,
                &format!("Expected a dict as listener argument, got {}.", py_repr(&listener)),
            );
        };
        let Some(name) = listener.get("name").and_then(Value::as_str).map(str::to_owned) else {
            return nack(
                PyExc::ValueError,
                &format!("Expected 'name' key in listener argument {}.", py_repr(&listener)),
            );
        };
        let b = &self.state.bounds;
        if name.len() > b.max_listener_name {
            return nack(
                PyExc::ValueError,
                &format!(
                    "Listener name of {} bytes refused: at most {} (setting Procman.MAX_LISTENER_NAME).",
                    name.len(),
                    b.max_listener_name
                ),
            );
        }
        let proxy = listener.get("proxy").cloned().unwrap_or(Value::None);
        // We cannot import the class to check it subclasses Proxy; a class reference is what a
        // proxy class pickles to, anything else cannot be one.
        if !matches!(proxy, Value::None | Value::Global { .. }) {
            return nack(
                PyExc::ValueError,
                &format!(
                    "Expected 'proxy' in listener argument proxy={} to be a Proxy sub-class.",
                    py_repr(&proxy)
                ),
            );
        }
        let mut l = lock(&self.state.listeners);
        if l.iter().any(|(n, _)| *n == name) {
            return nack(
                PyExc::ValueError,
                &format!("Process {name} is already registered as a listener."),
            );
        }
        if l.len() >= b.max_listeners {
            return nack(
                PyExc::ValueError,
                &format!(
                    "Listener {} refused: {} listeners registered, the most allowed (setting Procman.MAX_LISTENERS).",
                    log_name(&name),
                    l.len()
                ),
            );
        }
        info!(listener = %log_name(&name), "registered listener");
        l.push((name, proxy));
        ack()
    }
}

/// `get_storage_mnemonic` is answered by the built-in before a handler is asked.
fn unreachable_builtin() -> Result<Value, CommandError> {
    Err(CommandError::Failed("get_storage_mnemonic is a built-in".into()))
}

impl Handler for ServiceHandler {
    fn handle(&self, call: Call) -> HandlerFuture<'_> {
        Box::pin(async move { self.call(call).await.map(Reply::from) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgse::storage::LocalCsv;
    use crate::logging::RecordingLogControl;

    fn handler() -> (ServiceHandler, Arc<RecordingLogControl>) {
        let log = Arc::new(RecordingLogControl::default());
        let dir = std::env::temp_dir().join(format!("procman-svc-{}", uuid::Uuid::new_v4()));
        let state = ServiceState::new(
            Duration::from_secs(1),
            Duration::from_secs(10),
            log.clone(),
            Arc::new(LocalCsv::new(dir, "LAB".into(), "PM".into())),
            vec!["timestamp".into()],
            Arc::new(StatusSampler::new()),
            CancellationToken::new(),
        );
        (ServiceHandler { state: Arc::new(state) }, log)
    }

    fn call(name: &str, args: Vec<Value>) -> Call {
        Call {
            name: name.into(),
            args,
            kwargs: vec![],
        }
    }

    #[tokio::test]
    async fn frequencies() {
        let (h, _) = handler();
        assert_eq!(
            h.call(call("set_monitoring_frequency", vec![Value::Float(4.0)])).await,
            Ok(Value::Float(250.0))
        );
        assert_eq!(*h.state.mon_delay_ms.borrow(), 250.0);
        // The floor: never faster than every 200 ms (+ the average get_status time).
        let Ok(Value::Float(ms)) = h.call(call("set_monitoring_frequency", vec![Value::Int(100)])).await else {
            panic!()
        };
        assert!((200.0..210.0).contains(&ms), "{ms}");
        assert_eq!(
            h.call(call("set_hk_frequency", vec![Value::Float(0.5)])).await,
            Ok(Value::Float(2000.0))
        );
        for bad in [
            Value::Int(0),
            Value::Float(-1.0),
            Value::str("fast"),
            Value::None,
            Value::Float(f64::NAN),
        ] {
            assert!(matches!(
                h.call(call("set_monitoring_frequency", vec![bad])).await,
                Err(CommandError::Value(_))
            ));
        }
        assert!(matches!(
            h.call(call("set_hk_frequency", vec![])).await,
            Err(CommandError::Type(_))
        ));
    }

    /// Issue 13, finding 1: a tiny frequency made an infinite period (and a panic in the tasks). It is
    /// clamped to the longest period, and the reply says what was applied.
    #[tokio::test]
    async fn tiny_and_huge_frequencies_are_clamped() {
        let (h, _) = handler();
        let max = h.state.bounds.max_period_ms;
        for tiny in [Value::Float(1e-300), Value::Float(5e-324), Value::str("1e-300")] {
            assert_eq!(
                h.call(call("set_monitoring_frequency", vec![tiny.clone()])).await,
                Ok(Value::Float(max))
            );
            assert_eq!(
                h.call(call("set_hk_frequency", vec![tiny])).await,
                Ok(Value::Float(max))
            );
        }
        assert_eq!(*h.state.mon_delay_ms.borrow(), max);
        assert_eq!(*h.state.hk_delay_ms.borrow(), max);
        for bad in [
            Value::Float(f64::INFINITY),
            Value::Float(f64::NEG_INFINITY),
            Value::str("inf"),
        ] {
            assert!(matches!(
                h.call(call("set_hk_frequency", vec![bad])).await,
                Err(CommandError::Value(_))
            ));
        }
        // A huge frequency is bounded below by CGSE's 200 ms rule and the minimum period.
        let Ok(Value::Float(ms)) = h.call(call("set_hk_frequency", vec![Value::Float(1e300)])).await else {
            panic!()
        };
        assert!(ms >= h.state.bounds.min_period_ms && ms.is_finite(), "{ms}");
    }

    /// Issue 13, finding 5: listeners are bounded in count and name length.
    #[tokio::test]
    async fn listeners_are_bounded() {
        let (h, _) = handler();
        let b = h.state.bounds.clone();
        let named = |n: String| Value::dict([("name", Value::Str(n)), ("proxy", Value::None)]);
        let long = "x".repeat(b.max_listener_name + 1);
        let r = h.call(call("add_listener", vec![named(long)])).await.unwrap();
        assert!(matches!(&r, Value::Tuple(t) if t[0] == Value::str("NACK")), "{r:?}");
        assert_eq!(
            h.call(call("add_listener", vec![named("y".repeat(b.max_listener_name))]))
                .await,
            Ok(ack())
        );
        for i in 1..b.max_listeners {
            assert_eq!(
                h.call(call("add_listener", vec![named(format!("l{i}"))])).await,
                Ok(ack())
            );
        }
        let r = h
            .call(call("add_listener", vec![named("one-too-many".into())]))
            .await
            .unwrap();
        assert!(matches!(&r, Value::Tuple(t) if t[0] == Value::str("NACK")), "{r:?}");
        assert_eq!(h.state.listener_names().len(), b.max_listeners);
        assert_eq!(
            log_name(&"z".repeat(10_000)).chars().count(),
            80 + " (10000 bytes)".len() + 1
        );
    }

    #[tokio::test]
    async fn logging_levels() {
        let (h, log) = handler();
        let r = h
            .call(call(
                "set_logging_level",
                vec![Value::str("egse.procman"), Value::Int(10)],
            ))
            .await;
        assert_eq!(r, Ok(Value::str("Logging level for egse.procman set to 10.")));
        let r = h
            .call(Call {
                name: "set_logging_level".into(),
                args: vec![],
                kwargs: vec![
                    (Value::str("name"), Value::str("all")),
                    (Value::str("level"), Value::Int(20)),
                ],
            })
            .await;
        assert_eq!(r, Ok(Value::str("Logging level set to 20 for ALL 'egse' loggers")));
        let r = h
            .call(call(
                "set_logging_level",
                vec![Value::str("no.such.logger"), Value::Int(10)],
            ))
            .await;
        assert_eq!(
            r,
            Ok(Value::str(
                "Logger with name 'no.such.logger' doesn't exist at the server side."
            ))
        );
        let r = h
            .call(call("set_logging_level", vec![Value::str("all"), Value::str("abc")]))
            .await;
        assert!(matches!(r, Err(CommandError::Value(_))));
        assert_eq!(log.calls.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn listeners() {
        let (h, _) = handler();
        let l = Value::dict([
            ("name", Value::str("capture")),
            ("proxy", Value::global("egse.procman", "ProcessManagerProxy")),
        ]);
        assert_eq!(h.call(call("add_listener", vec![l.clone()])).await, Ok(ack()));
        let again = h.call(call("add_listener", vec![l.clone()])).await.unwrap();
        assert_eq!(
            again,
            nack(
                PyExc::ValueError,
                "Process capture is already registered as a listener."
            )
        );
        let bad = Value::dict([("name", Value::str("x")), ("proxy", Value::str("not-a-class"))]);
        assert_eq!(
            h.call(call("add_listener", vec![bad])).await.unwrap(),
            nack(
                PyExc::ValueError,
                "Expected 'proxy' in listener argument proxy='not-a-class' to be a Proxy sub-class."
            )
        );
        assert!(
            matches!(h.call(call("add_listener", vec![Value::str("str")])).await, Ok(Value::Tuple(t)) if t[0] == Value::str("NACK"))
        );
        assert_eq!(
            h.call(call("get_listener_names", vec![])).await,
            Ok(Value::Tuple(vec![Value::List(vec![Value::str("capture")])]))
        );
        let r = Value::dict([("name", Value::str("capture"))]);
        assert_eq!(h.call(call("remove_listener", vec![r.clone()])).await, Ok(ack()));
        assert_eq!(
            h.call(call("remove_listener", vec![r])).await.unwrap(),
            nack(PyExc::ValueError, "Process capture cannot be removed, not registered.")
        );
    }

    #[tokio::test]
    async fn quit_and_info() {
        let (h, _) = handler();
        assert_eq!(h.call(call("get_cs_module", vec![])).await, Ok(Value::str(CS_MODULE)));
        assert!(matches!(
            h.call(call("get_process_status", vec![])).await,
            Ok(Value::Dict(_))
        ));
        let Ok(Value::Dict(times)) = h.call(call("get_average_execution_times", vec![])).await else {
            panic!()
        };
        assert_eq!(times[0].0, Value::str("get_status"));
        assert!(!h.state.shutdown.is_cancelled());
        assert_eq!(
            h.call(call("quit_server", vec![])).await,
            Ok(Value::str("Sent interrupt to ProcessManagerControlServer."))
        );
        assert!(h.state.shutdown.is_cancelled());
        assert_eq!(h.call(call("register_to_storage", vec![])).await, Ok(ack()));
    }
}
