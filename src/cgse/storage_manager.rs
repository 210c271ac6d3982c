//! Housekeeping through the CGSE Storage Manager, with the local CSV file as failover.
//!
//! Requests are hand-built `CommandExecution`s: `register` (origin, persistence
//! class `egse.storage.persistence.CSV2`, column names, mode `a`), `save` (`{"origin", "data"}`) and
//! `unregister`. Each housekeeping period the Storage Manager is tried again (the original checks once, at
//! start). A `Failure` saying it "could not find a registration" means it restarted and forgot us: we
//! register again and re-send that record.
//!
//! When it cannot take a record, the record is appended to the daily CSV file ourselves. That file IS the
//! one the Storage Manager appends to (same path, same format) as long as both run on this host with
//! the same data location, so an outage leaves no gap, and nothing is replayed: each record goes one way.
//!
//! A record is written locally only when the Storage Manager certainly did not store it: the connection
//! failed (nothing was sent) or it answered with a `Failure`. When it was sent and no reply came (the SM
//! may have stored it late, or died while storing), the record is "in doubt": it is looked up in the daily
//! file before anything else happens. Found: done. Not found once the Storage Manager answers a `Ping`
//! again (it handles one request at a time, so the lost one is not still running): sent again. Not found
//! and the Storage Manager still silent after [`IN_DOUBT_LIMIT`]: written locally (a Storage Manager that
//! was frozen longer than that and then stores it late would duplicate that one row). At shutdown, records
//! in doubt that are not in the file are written locally.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::cgse::storage::{HkRecord, HkValue, HousekeepingSink, LocalCsv, SinkError};
use crate::client::{command_execution, ClientError, ControlClient};
use crate::codec::Value;
use crate::config::{PeerSettings, RegistrySettings};
use crate::transport;
use crate::util::BoxFuture;

/// How long a record sent without reply waits for the Storage Manager before we write it ourselves.
pub const IN_DOUBT_LIMIT: Duration = Duration::from_secs(30);

/// The Storage Manager's message after a restart (it keeps registrations in memory only).
const NOT_REGISTERED: &str = "could not find a registration";
/// Its reply to a second `register` of an origin: the old registration, with its columns, stays.
const ALREADY_REGISTERED: &str = "is already registered";

/// Why a Storage Manager call failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The request got no usable reply (no connection, no reply in time, an undecodable reply).
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The SM's endpoint could not be found (its host does not resolve, or the registry does not know it).
    #[error("cannot find the Storage Manager: {0}")]
    Discovery(String),
    /// The SM answered, but not with success.
    #[error("the Storage Manager refused '{command}': {message}")]
    Refused {
        /// The command it refused.
        command: String,
        /// Its reply.
        message: String,
    },
}

impl StorageError {
    /// True when the request may have been carried out although we got no answer.
    pub fn maybe_delivered(&self) -> bool {
        matches!(self, StorageError::Client(e) if e.maybe_delivered())
    }
}

/// `CommandExecution(StorageCommand <name>, arg)`, the minimal form sm_cs accepts.
pub fn storage_request(name: &str, arg: Value) -> Value {
    let cmd = Value::new_object(
        "egse.storage",
        "StorageCommand",
        Value::dict([
            ("_name", Value::str(name)),
            (
                "_response",
                Value::global("egse.protocol", "CommandProtocol.handle_device_method"),
            ),
            (
                "_device_method",
                Value::global("egse.storage", format!("StorageController.{name}")),
            ),
        ]),
    );
    command_execution(cmd, vec![arg], vec![])
}

/// `register` of `origin` with CSV persistence and these columns.
pub fn register_request(origin: &str, columns: &[String]) -> Value {
    storage_request(
        "register",
        Value::dict([
            ("origin", Value::str(origin)),
            ("persistence_class", Value::global("egse.storage.persistence", "CSV2")),
            (
                "prep",
                Value::dict([
                    (
                        "column_names",
                        Value::List(columns.iter().map(|c| Value::str(c.as_str())).collect()),
                    ),
                    ("mode", Value::str("a")),
                ]),
            ),
        ]),
    )
}

/// `save` of one record.
pub fn save_request(origin: &str, record: &HkRecord) -> Value {
    let data = record
        .fields
        .iter()
        .map(|(k, v)| {
            let v = match v {
                HkValue::Str(s) => Value::str(s.as_str()),
                HkValue::Int(i) => Value::Int(*i),
                HkValue::Float(f) => Value::Float(*f),
                HkValue::None => Value::None,
            };
            (Value::str(k.as_str()), v)
        })
        .collect();
    storage_request(
        "save",
        Value::dict([("origin", Value::str(origin)), ("data", Value::Dict(data))]),
    )
}

/// `unregister` of `origin`.
pub fn unregister_request(origin: &str) -> Value {
    storage_request("unregister", Value::dict([("origin", Value::str(origin))]))
}

/// A Storage Manager reply that is not an `egse.response.Success`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SmReplyError {
    /// A `Failure`: the SM refused, and says why.
    #[error("{0}")]
    Failure(String),
    /// Neither `Success` nor `Failure` (shown as Python would show it).
    #[error("unexpected reply {0}")]
    Unexpected(String),
}

impl SmReplyError {
    /// The SM's own words (a `Failure`'s message), for matching its known refusals.
    pub fn says(&self, text: &str) -> bool {
        matches!(self, SmReplyError::Failure(m) if m.contains(text))
    }
}

/// `Ok(message)` for an `egse.response.Success`, the reason otherwise.
pub fn success_message(reply: &Value) -> Result<String, SmReplyError> {
    if let Some(m) = crate::protocol::failure_message(reply) {
        return Err(SmReplyError::Failure(m));
    }
    match reply.as_object() {
        Some(o) if o.is("egse.response", "Success") => {
            Ok(o.attr("message").and_then(Value::as_str).unwrap_or_default().to_owned())
        }
        _ => Err(SmReplyError::Unexpected(crate::protocol::py_repr(reply))),
    }
}

/// Where the Storage Manager is and how long to wait for it.
#[derive(Debug, Clone)]
pub struct StorageManagerConfig {
    /// Where the SM listens.
    pub sm: PeerSettings,
    /// For discovery when the SM's commanding port is 0.
    pub registry: RegistrySettings,
    /// One registry request.
    pub registry_timeout: Duration,
    /// The SM's reply.
    pub timeout: Duration,
    /// Connecting to the SM: an SM that is down costs this.
    pub connect_timeout: Duration,
    /// `STORAGE_MNEMONIC`.
    pub origin: String,
}

/// How one attempt to hand a record to the Storage Manager ended.
#[derive(Debug)]
enum Outcome {
    Stored,
    /// Certainly not stored (not sent, or refused): the reason.
    NotStored(String),
    /// Sent, no answer.
    InDoubt(String),
}

struct Doubt {
    record: HkRecord,
    since: Instant,
}

#[derive(Default)]
struct State {
    client: Option<ControlClient>,
    registered: bool,
    columns: Vec<String>,
    /// Records that may or may not be in the Storage Manager's file.
    in_doubt: Vec<Doubt>,
    /// Where records went last: true = the Storage Manager.
    via_sm: Option<bool>,
}

/// A [`HousekeepingSink`] that stores through the Storage Manager and fails over to [`LocalCsv`].
pub struct StorageManagerSink {
    config: StorageManagerConfig,
    local: LocalCsv,
    state: tokio::sync::Mutex<State>,
    status: Mutex<String>,
}

impl StorageManagerSink {
    /// Stores through the SM of `config`, failing over to `local`; nothing is contacted yet.
    pub fn new(config: StorageManagerConfig, local: LocalCsv) -> StorageManagerSink {
        let status = format!("Storage Manager (not contacted yet), else {}", local.describe());
        StorageManagerSink {
            config,
            local,
            state: tokio::sync::Mutex::new(State::default()),
            status: Mutex::new(status),
        }
    }

    fn set_status(&self, text: String) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = text;
    }

    /// Records sent without an answer and not yet found in the daily file.
    pub async fn in_doubt(&self) -> usize {
        self.state.lock().await.in_doubt.len()
    }

    async fn endpoint(&self) -> Result<String, StorageError> {
        let sm = &self.config.sm;
        if sm.commanding_port != 0 {
            return transport::client_endpoint_async("tcp", &sm.hostname, sm.commanding_port)
                .await
                .map_err(|e| StorageError::Discovery(e.to_string()));
        }
        let rec =
            crate::cgse::registry::discover(&self.config.registry, &sm.service_type, self.config.registry_timeout)
                .await
                .map_err(|e| StorageError::Discovery(e.to_string()))?;
        rec.endpoint(rec.port)
            .await
            .map_err(|e| StorageError::Discovery(e.to_string()))
    }

    /// One request; a transport failure drops the client (and, with it, our belief that we are registered
    /// when the Storage Manager may have restarted).
    async fn request(&self, st: &mut State, v: &Value) -> Result<Value, StorageError> {
        self.request_within(st, v, self.config.timeout).await
    }

    async fn request_within(&self, st: &mut State, v: &Value, timeout: Duration) -> Result<Value, StorageError> {
        if st.client.is_none() {
            let mut c = ControlClient::new(self.endpoint().await?, self.config.timeout);
            c.set_connect_timeout(self.config.connect_timeout);
            c.set_refused_is_final(true);
            st.client = Some(c);
        }
        let Some(client) = st.client.as_mut() else {
            return Err(StorageError::Discovery("no client".into()));
        };
        // A fresh connection per request: a kept zmq.rs socket does not notice that a restarted Storage
        // Manager is a new peer, and a request sent into the old connection would be "in doubt" for
        // nothing. A new connection that succeeds also proves the SM is there before anything is sent.
        let result = client.request_with_timeout(v, timeout).await;
        client.reset();
        match result {
            Ok(r) => Ok(r),
            Err(e) => {
                // Rediscover next time (a Storage Manager on port 0 may come back elsewhere).
                st.client = None;
                Err(e.into())
            }
        }
    }

    /// Register our origin with our columns. A stale registration (ours before a crash, or another
    /// process's) keeps its old columns in the Storage Manager, which would then drop our fields
    /// silently: replace it.
    async fn sm_register(&self, st: &mut State) -> Result<String, StorageError> {
        let origin = self.config.origin.clone();
        let refused = |command: &str, message: String| StorageError::Refused {
            command: command.into(),
            message,
        };
        let reply = self
            .request(st, &register_request(&origin, &st.columns.clone()))
            .await?;
        let msg = match success_message(&reply) {
            Ok(m) if m.contains(ALREADY_REGISTERED) => {
                info!(origin = %origin, "replacing an older Storage Manager registration, so that our columns apply");
                let reply = self.request(st, &unregister_request(&origin)).await?;
                if let Err(m) = success_message(&reply) {
                    debug!(message = %m, "unregister before re-registering");
                }
                let reply = self
                    .request(st, &register_request(&origin, &st.columns.clone()))
                    .await?;
                success_message(&reply).map_err(|m| refused("register", m.to_string()))?
            }
            Ok(m) => m,
            Err(m) => return Err(refused("register", m.to_string())),
        };
        st.registered = true;
        Ok(msg)
    }

    /// Hand one record to the Storage Manager (registering first if needed, again after a restart).
    async fn sm_store(&self, st: &mut State, record: &HkRecord) -> Outcome {
        if !st.registered {
            if let Err(e) = self.sm_register(st).await {
                // A register that got no answer stored no record: this one is certainly not stored.
                return Outcome::NotStored(e.to_string());
            }
        }
        let request = save_request(&self.config.origin, record);
        let mut reregistered = false;
        loop {
            match self.request(st, &request).await {
                Ok(reply) => match success_message(&reply) {
                    Ok(_) => return Outcome::Stored,
                    Err(m) if m.says(NOT_REGISTERED) && !reregistered => {
                        info!("the Storage Manager forgot our registration (restarted?): registering again");
                        st.registered = false;
                        reregistered = true;
                        if let Err(e) = self.sm_register(st).await {
                            return Outcome::NotStored(e.to_string());
                        }
                    }
                    Err(m) => return Outcome::NotStored(format!("the Storage Manager refused 'save': {m}")),
                },
                // Still registered as far as we know; a restarted SM says otherwise on the next save.
                Err(e) if e.maybe_delivered() => return Outcome::InDoubt(e.to_string()),
                Err(e) => return Outcome::NotStored(e.to_string()),
            }
        }
    }

    /// True when the Storage Manager answers a `Ping` now.
    async fn sm_alive(&self, st: &mut State) -> bool {
        matches!(self.request(st, &Value::str("Ping")).await, Ok(Value::Str(s)) if s == "Pong")
    }

    async fn write_local(&self, st: &mut State, record: &HkRecord, reason: &str) -> Result<(), SinkError> {
        let path = self
            .local
            .append_async(record.clone())
            .await
            .map_err(|source| SinkError::Lost {
                reason: reason.to_owned(),
                source,
            })?;
        if st.via_sm != Some(false) {
            warn!(reason = %reason, file = %path.display(),
                "Storage Manager not storing: housekeeping goes to the daily CSV file directly until it is back");
            self.set_status(format!(
                "local CSV files under {} (Storage Manager not storing: {reason})",
                self.local.data_location().display()
            ));
        }
        st.via_sm = Some(false);
        Ok(())
    }

    fn stored_via_sm(&self, st: &mut State) {
        if st.via_sm != Some(true) {
            info!(origin = %self.config.origin, "housekeeping goes to the Storage Manager");
            self.set_status(format!(
                "Storage Manager (origin {}), failing over to {}",
                self.config.origin,
                self.local.describe()
            ));
        }
        st.via_sm = Some(true);
    }

    /// Settle the records in doubt as far as possible now (see the module doc).
    async fn settle_doubts(&self, st: &mut State, shutting_down: bool) -> Result<(), SinkError> {
        let doubts = std::mem::take(&mut st.in_doubt);
        let mut errors = Vec::new();
        let mut alive: Option<bool> = None;
        for d in doubts {
            match self.local.contains_async(d.record.clone()).await {
                Ok(true) => {
                    debug!("a record in doubt is in the daily file: the Storage Manager stored it");
                    continue;
                }
                Ok(false) => {}
                Err(e) => warn!(error = %e, "cannot read the daily file to settle a record in doubt"),
            }
            if shutting_down {
                if let Err(e) = self.write_local(st, &d.record, "no answer before shutdown").await {
                    errors.push(e);
                }
                continue;
            }
            let is_alive = match alive {
                Some(a) => a,
                None => {
                    let a = self.sm_alive(st).await;
                    alive = Some(a);
                    a
                }
            };
            // Alive and idle (it answered after the lost request): look once more, then send again.
            if is_alive && !matches!(self.local.contains_async(d.record.clone()).await, Ok(true)) {
                match self.sm_store(st, &d.record).await {
                    Outcome::Stored => self.stored_via_sm(st),
                    Outcome::NotStored(reason) => {
                        if let Err(e) = self.write_local(st, &d.record, &reason).await {
                            errors.push(e);
                        }
                    }
                    Outcome::InDoubt(_) => st.in_doubt.push(d),
                }
            } else if is_alive {
                continue;
            } else if d.since.elapsed() >= IN_DOUBT_LIMIT {
                warn!(
                    limit_s = IN_DOUBT_LIMIT.as_secs(),
                    "a record sent to the silent Storage Manager is written locally"
                );
                if let Err(e) = self
                    .write_local(st, &d.record, "no answer from the Storage Manager")
                    .await
                {
                    errors.push(e);
                }
            } else {
                st.in_doubt.push(d);
            }
        }
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(SinkError::Several(errors)),
        }
    }

    async fn save_record(&self, record: HkRecord) -> Result<(), SinkError> {
        let mut st = self.state.lock().await;
        if st.columns.is_empty() {
            st.columns = record.columns();
            self.local.set_columns(st.columns.clone());
        }
        let settled = if st.in_doubt.is_empty() {
            Ok(())
        } else {
            self.settle_doubts(&mut st, false).await
        };
        // Counted as in doubt while in flight: if this future is dropped (shutdown), the record is
        // settled by `shutdown` instead of vanishing.
        st.in_doubt.push(Doubt {
            record: record.clone(),
            since: Instant::now(),
        });
        let outcome = self.sm_store(&mut st, &record).await;
        st.in_doubt.pop();
        let stored = match outcome {
            Outcome::Stored => {
                self.stored_via_sm(&mut st);
                Ok(())
            }
            Outcome::NotStored(reason) => self.write_local(&mut st, &record, &reason).await,
            Outcome::InDoubt(reason) => {
                warn!(reason = %reason, "no answer from the Storage Manager to a save: the record is in doubt until it is found in the file or the Storage Manager answers again");
                st.in_doubt.push(Doubt {
                    record,
                    since: Instant::now(),
                });
                Ok(())
            }
        };
        settled.and(stored)
    }

    async fn register_now(&self, columns: Vec<String>) -> Result<String, SinkError> {
        let mut st = self.state.lock().await;
        st.columns = columns.clone();
        self.local.set_columns(columns);
        match self.sm_register(&mut st).await {
            Ok(msg) => {
                self.stored_via_sm(&mut st);
                Ok(msg)
            }
            Err(e) => {
                st.registered = false;
                Err(SinkError::NotRegistered {
                    reason: e.to_string(),
                    fallback: self.local.data_location().to_owned(),
                })
            }
        }
    }

    async fn close(&self) {
        let mut st = self.state.lock().await;
        if let Err(e) = self.settle_doubts(&mut st, true).await {
            warn!(error = %e, "at shutdown");
        }
        if st.registered {
            // Within the shutdown budget: a live SM answers in milliseconds.
            let timeout = self.config.timeout.min(Duration::from_millis(500));
            match self
                .request_within(&mut st, &unregister_request(&self.config.origin), timeout)
                .await
            {
                Ok(reply) => match success_message(&reply) {
                    Ok(m) => info!(message = %m, "unregistered from the Storage Manager"),
                    Err(m) => warn!(message = %m, "unregister from the Storage Manager refused"),
                },
                Err(e) => warn!(error = %e, "unregister from the Storage Manager failed"),
            }
            st.registered = false;
        }
    }
}

impl HousekeepingSink for StorageManagerSink {
    fn register(&self, columns: Vec<String>) -> BoxFuture<'_, Result<String, SinkError>> {
        Box::pin(self.register_now(columns))
    }

    fn save(&self, record: HkRecord) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(self.save_record(record))
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.close())
    }

    fn describe(&self) -> String {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::UNIX_EPOCH;

    use crate::cgse::testing::{ReservedPort, ScriptedServer};

    /// What the fake Storage Manager does with a request.
    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Act {
        /// Answer normally (Success; a save is appended to the daily file as sm_cs would).
        Normal,
        /// Store the record, then never answer (a reply lost, or given too late).
        StoreSilently,
        /// Neither store nor answer (a request lost with a dying SM).
        Drop,
        /// "could not find a registration" (an SM that restarted).
        Forgot,
        /// Another Failure.
        Refuse,
    }

    #[derive(Default)]
    struct Script {
        /// One act per save, in order; `Normal` after the end.
        saves: Vec<Act>,
        registered_already: bool,
        log: Vec<String>,
    }

    /// A Storage Manager on the shared scripted server: it acts by [`Script`] and logs the command names.
    struct FakeSm {
        script: Arc<Mutex<Script>>,
        server: ScriptedServer,
    }

    fn success(msg: &str) -> Value {
        Value::new_object(
            "egse.response",
            "Success",
            Value::dict([("message", Value::str(msg)), ("return_code", Value::None)]),
        )
    }

    /// The command name and first argument of a request (`"Ping"` or a `CommandExecution`).
    fn command_of(req: &Value) -> (String, Value) {
        match req {
            Value::Str(s) => (s.clone(), Value::None),
            Value::Object(o) => {
                let cmd = o.attr("_cmd").and_then(Value::as_object).unwrap();
                let name = cmd.attr("_name").and_then(Value::as_str).unwrap().to_owned();
                let Some(Value::Tuple(args)) = o.attr("_args") else {
                    panic!("no _args in {o:?}")
                };
                (name, args[0].clone())
            }
            other => panic!("{other:?}"),
        }
    }

    impl FakeSm {
        /// Serve on `port` (0 = a free one, kept bound by the server).
        async fn start(port: u16, local: LocalCsv, script: Script) -> FakeSm {
            let script = Arc::new(Mutex::new(script));
            let s = script.clone();
            let saves = AtomicUsize::new(0);
            let server = ScriptedServer::start(port, move |req| {
                let (name, arg) = command_of(req);
                let mut sc = s.lock().unwrap();
                sc.log.push(name.clone());
                match name.as_str() {
                    "Ping" => Some(Value::str("Pong")),
                    "register" if sc.registered_already => {
                        sc.registered_already = false;
                        Some(success("PM is already registered."))
                    }
                    "register" => Some(success("Storage successfully registered PM")),
                    "unregister" => Some(success("Storage successfully unregistered PM")),
                    "save" => {
                        let n = saves.fetch_add(1, Ordering::SeqCst);
                        match sc.saves.get(n).copied().unwrap_or(Act::Normal) {
                            Act::Normal => {
                                local.append(&record_of(&arg)).unwrap();
                                Some(success("Storage successfully saved the data for PM."))
                            }
                            Act::StoreSilently => {
                                local.append(&record_of(&arg)).unwrap();
                                None
                            }
                            Act::Drop => None,
                            Act::Forgot => Some(crate::protocol::failure(
                                "Storage could not find a registration for PM, no data saved.",
                            )),
                            Act::Refuse => Some(crate::protocol::failure("disk full")),
                        }
                    }
                    other => panic!("unexpected {other}"),
                }
            })
            .await;
            FakeSm { script, server }
        }

        fn log(&self) -> Vec<String> {
            self.script.lock().unwrap().log.clone()
        }
    }

    /// The record a save carried (the fake SM writes it like sm_cs does).
    fn record_of(arg: &Value) -> HkRecord {
        let Some(Value::Dict(data)) = arg.get("data") else {
            panic!()
        };
        let fields: Vec<(String, HkValue)> = data
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::Str(s) => HkValue::Str(s.clone()),
                    Value::Int(i) => HkValue::Int(*i),
                    _ => HkValue::None,
                };
                (k.as_str().unwrap().to_owned(), v)
            })
            .collect();
        let HkValue::Int(ms) = fields[1].1 else { panic!() };
        HkRecord {
            when: UNIX_EPOCH + Duration::from_millis(ms as u64),
            fields,
        }
    }

    fn record(n: i64) -> HkRecord {
        let ms = 1_795_691_412_000 + n * 250;
        let when = UNIX_EPOCH + Duration::from_millis(ms as u64);
        HkRecord {
            when,
            fields: vec![
                ("timestamp".into(), HkValue::Str(crate::util::format_datetime(when))),
                ("n".into(), HkValue::Int(ms)),
            ],
        }
    }

    fn temp_dir() -> std::path::PathBuf {
        std::env::temp_dir().join(format!("procman-sm-{}", uuid::Uuid::new_v4()))
    }

    fn local_csv(dir: &std::path::Path) -> LocalCsv {
        LocalCsv::new(dir.to_owned(), "LAB42".into(), "PM".into())
    }

    /// Our sink, talking to a Storage Manager on `port`, failing over to the daily file under `dir`.
    fn sink(port: u16, dir: &std::path::Path) -> StorageManagerSink {
        sink_with_timeout(port, dir, Duration::from_millis(300))
    }

    fn sink_with_timeout(port: u16, dir: &std::path::Path, timeout: Duration) -> StorageManagerSink {
        let config = StorageManagerConfig {
            sm: PeerSettings {
                service_type: "SM_CS".into(),
                hostname: "127.0.0.1".into(),
                commanding_port: port,
            },
            registry: crate::cgse::testing::no_registry(),
            registry_timeout: timeout,
            timeout,
            connect_timeout: timeout,
            origin: "PM".into(),
        };
        StorageManagerSink::new(config, local_csv(dir))
    }

    /// A fake Storage Manager running `script` on a port of its own, and our sink talking to it.
    async fn scripted(script: Script) -> (StorageManagerSink, FakeSm, std::path::PathBuf) {
        let dir = temp_dir();
        let sm = FakeSm::start(0, local_csv(&dir), script).await;
        (sink(sm.server.port, &dir), sm, dir)
    }

    fn rows(dir: &std::path::Path) -> Vec<String> {
        let path = daily(dir);
        let text = std::fs::read_to_string(path).unwrap_or_default();
        text.split("\r\n")
            .filter(|l| !l.is_empty() && !l.starts_with("timestamp,"))
            .map(str::to_owned)
            .collect()
    }

    fn daily(dir: &std::path::Path) -> std::path::PathBuf {
        crate::cgse::storage::daily_file(dir, "LAB42", "PM", record(0).when)
    }

    #[tokio::test]
    async fn stores_through_the_sm_and_registers_again_after_its_restart() {
        let (sink, sm, dir) = scripted(Script {
            saves: vec![Act::Normal, Act::Forgot],
            ..Default::default()
        })
        .await;
        sink.save(record(0)).await.unwrap();
        sink.save(record(1)).await.unwrap();
        assert_eq!(sm.log(), ["register", "save", "save", "register", "save"]);
        // Every row once, written by the "SM".
        assert_eq!(rows(&dir).len(), 2);
        assert!(sink.describe().starts_with("Storage Manager"), "{}", sink.describe());
        sink.shutdown().await;
        assert_eq!(sm.log().last().unwrap(), "unregister");
        sm.server.stop();
        std::fs::remove_dir_all(dir).ok();
    }

    #[tokio::test]
    async fn fails_over_to_the_daily_file_at_once_and_back() {
        // Nothing listens on the port yet. With timeouts of a minute, a sink that waited for one instead of
        // failing over when the connection is refused would take minutes here.
        let reserved = ReservedPort::new();
        let port = reserved.port();
        let dir = temp_dir();
        let sink = sink_with_timeout(port, &dir, Duration::from_secs(60));
        let t0 = std::time::Instant::now();
        sink.save(record(0)).await.unwrap();
        sink.save(record(1)).await.unwrap();
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "waited out a timeout: {:?}",
            t0.elapsed()
        );
        let text = std::fs::read_to_string(daily(&dir)).unwrap();
        assert!(text.starts_with("timestamp,n\r\n"), "{text}");
        assert!(sink.describe().starts_with("local CSV"), "{}", sink.describe());
        let refused = sink.register(vec!["timestamp".into(), "n".into()]).await.unwrap_err();
        assert!(refused.to_string().contains("local CSV"), "{refused}");
        // The SM appears: the next record goes to it (registered first), nothing twice.
        let sm = FakeSm::start(port, local_csv(&dir), Script::default()).await;
        sink.save(record(2)).await.unwrap();
        assert_eq!(sm.log(), ["register", "save"]);
        let r = rows(&dir);
        assert_eq!(r.len(), 3);
        assert!(r[2].contains(&crate::util::format_datetime(record(2).when)));
        sm.server.stop();
        std::fs::remove_dir_all(dir).ok();
    }

    #[tokio::test]
    async fn a_record_stored_without_answer_is_not_written_again() {
        let (sink, sm, dir) = scripted(Script {
            saves: vec![Act::StoreSilently],
            ..Default::default()
        })
        .await;
        sink.save(record(0)).await.unwrap();
        assert_eq!(sink.in_doubt().await, 1);
        sink.save(record(1)).await.unwrap();
        assert_eq!(sink.in_doubt().await, 0);
        // Found in the file: neither sent again nor written locally.
        assert_eq!(sm.log(), ["register", "save", "save"]);
        assert_eq!(rows(&dir).len(), 2);
        sm.server.stop();
        std::fs::remove_dir_all(dir).ok();
    }

    #[tokio::test]
    async fn a_record_lost_without_answer_is_sent_again_once_the_sm_answers() {
        let (sink, sm, dir) = scripted(Script {
            saves: vec![Act::Drop],
            ..Default::default()
        })
        .await;
        sink.save(record(0)).await.unwrap();
        assert_eq!(sink.in_doubt().await, 1);
        sink.save(record(1)).await.unwrap();
        // Not in the file, the SM answers a Ping: the lost record goes again, before the new one.
        assert_eq!(sm.log(), ["register", "save", "Ping", "save", "save"]);
        let r = rows(&dir);
        assert_eq!(r.len(), 2);
        assert!(r[0].contains(&crate::util::format_datetime(record(0).when)));
        sm.server.stop();
        std::fs::remove_dir_all(dir).ok();
    }

    #[tokio::test]
    async fn at_shutdown_a_record_in_doubt_that_is_not_in_the_file_is_written_locally() {
        let (sink, sm, dir) = scripted(Script {
            saves: vec![Act::Drop],
            ..Default::default()
        })
        .await;
        sink.save(record(0)).await.unwrap();
        sm.server.stop();
        tokio::time::sleep(Duration::from_millis(50)).await;
        sink.shutdown().await;
        assert_eq!(rows(&dir).len(), 1);
        std::fs::remove_dir_all(dir).ok();
    }

    #[tokio::test]
    async fn a_refused_save_goes_local_and_a_stale_registration_is_replaced() {
        let (sink, sm, dir) = scripted(Script {
            saves: vec![Act::Refuse],
            registered_already: true,
            ..Default::default()
        })
        .await;
        sink.save(record(0)).await.unwrap();
        assert_eq!(sm.log(), ["register", "unregister", "register", "save"]);
        assert_eq!(rows(&dir).len(), 1, "refused by the SM: written by us");
        assert_eq!(sink.in_doubt().await, 0);
        sm.server.stop();
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn requests_have_the_minimal_shape() {
        let r = save_request("PM", &record(0));
        let o = r.as_object().unwrap();
        assert!(o.is("egse.command", "CommandExecution"));
        let cmd = o.attr("_cmd").and_then(Value::as_object).unwrap();
        assert!(cmd.is("egse.storage", "StorageCommand"));
        assert_eq!(
            cmd.attr("_device_method"),
            Some(&Value::global("egse.storage", "StorageController.save"))
        );
    }
}
