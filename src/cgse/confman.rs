//! The Configuration Manager as the source of the Setup, with a cache and the local Setup as fallbacks.
//!
//! `get_setup` goes out as a hand-built `CommandExecution` (no handshake, and only a
//! method the CM's command table has: an unknown one kills cm_cs). The pickled `egse.setup.Setup` is read
//! with our codec, which keeps YAML order, and walked by [`crate::setup`].
//!
//! [`ConfmanSetup::current`] asks the CM only while the CM is known to answer, so a new Setup loaded in the
//! CM is seen by the next `get_devices` (as in the original, which asks on every call). Once a request has
//! failed, calls answer at once from the last good Setup (else the local Setup file, else no Setup) and a
//! background task retries every `SETUP_REFRESH`; a `new_setup` event from the Notify Hub makes it re-read
//! at once. A dead CM therefore costs one bounded timeout, not one per call.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::client::{command_execution, ClientError, ControlClient};
use crate::codec::Value;
use crate::config::{NotifyHubSettings, PeerSettings, RegistrySettings};
use crate::setup::{LocalSetup, Node, SetupError, SetupFuture, SetupSource};
use crate::transport::{self, Subscriber};

/// The CM's reply when it has no Setup (that is an answer, not an error: the tables are empty).
const NO_SETUP: &str = "No Setup was loaded";

/// Why the CM gave no Setup.
#[derive(Debug, thiserror::Error)]
pub enum ConfmanError {
    /// The request got no usable reply (no connection, no reply in time, an undecodable reply).
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The CM's endpoint could not be found (its host does not resolve, or the registry does not know it).
    #[error("cannot find the Configuration Manager: {0}")]
    Discovery(String),
    /// The CM answered with a `Failure` other than "No Setup was loaded".
    #[error("the Configuration Manager answered get_setup with a Failure: {0}")]
    Failure(String),
    /// The reply is a Setup that cannot be turned into a tree.
    #[error("the Configuration Manager's Setup is unusable: {0}")]
    Setup(#[from] SetupError),
    /// The reply is neither a Setup nor a `Failure`.
    #[error("the Configuration Manager answered get_setup with {0}, not a Setup")]
    NotASetup(String),
}

impl ConfmanError {
    /// True when the CM did not answer (as opposed to answering something unusable).
    pub fn is_unreachable(&self) -> bool {
        match self {
            ConfmanError::Client(e) => e.is_timeout() || matches!(e, ClientError::Transport(_)),
            ConfmanError::Discovery(_) => true,
            _ => false,
        }
    }
}

/// `CommandExecution(ConfigurationManagerCommand get_setup)` with no arguments: the loaded Setup.
pub fn get_setup_request() -> Value {
    let cmd = Value::new_object(
        "egse.confman",
        "ConfigurationManagerCommand",
        Value::dict([
            ("_name", Value::str("get_setup")),
            (
                "_response",
                Value::global("egse.protocol", "CommandProtocol.handle_device_method"),
            ),
            (
                "_device_method",
                Value::global("egse.confman", "ConfigurationManagerController.get_setup"),
            ),
        ]),
    );
    command_execution(cmd, vec![], vec![])
}

/// A Setup as the CM gave it.
#[derive(Debug, Clone)]
pub struct FetchedSetup {
    /// The Setup tree.
    pub node: Arc<Node>,
    /// `_setup_id` of the pickled Setup (`"00001"`), if present.
    pub setup_id: Option<String>,
    /// When it was received.
    pub fetched: SystemTime,
}

/// Read a `get_setup` reply: `Ok(None)` is the CM saying it has no Setup.
pub fn parse_get_setup_reply(reply: &Value) -> Result<Option<FetchedSetup>, ConfmanError> {
    if let Some(msg) = crate::protocol::failure_message(reply) {
        if msg.contains(NO_SETUP) {
            return Ok(None);
        }
        return Err(ConfmanError::Failure(msg));
    }
    let setup_id = match reply {
        Value::Object(o) => o.attr("_setup_id").and_then(|v| match v {
            Value::Str(s) => Some(s.clone()),
            Value::Int(i) => Some(format!("{i:05}")),
            _ => None,
        }),
        Value::Dict(_) => None,
        other => return Err(ConfmanError::NotASetup(other.type_name().to_owned())),
    };
    Ok(Some(FetchedSetup {
        node: Arc::new(Node::from_pickle(reply)?),
        setup_id,
        fetched: SystemTime::now(),
    }))
}

/// Where the Configuration Manager is and how long to wait for it.
#[derive(Debug, Clone)]
pub struct ConfmanConfig {
    /// Where the CM listens.
    pub cm: PeerSettings,
    /// For discovery when the CM's commanding port is 0.
    pub registry: RegistrySettings,
    /// One registry request.
    pub registry_timeout: Duration,
    /// The CM's reply to `get_setup`.
    pub timeout: Duration,
    /// Connecting to the CM: a CM that is down costs this.
    pub connect_timeout: Duration,
    /// Background re-read period (and retry period while the CM is down).
    pub refresh: Duration,
    /// Subscribe to `new_setup` events here (port 0: no subscription).
    pub notify_hub: NotifyHubSettings,
}

/// What we know about the CM.
#[derive(Debug, Clone, PartialEq)]
enum CmState {
    Unknown,
    Up,
    Down { since: SystemTime, error: String },
}

struct Inner {
    config: ConfmanConfig,
    local: LocalSetup,
    /// One request at a time; `Instant` = when the last attempt finished (callers that waited for it
    /// reuse its outcome instead of asking again).
    client: tokio::sync::Mutex<(Option<ControlClient>, Option<Instant>)>,
    /// The last good Setup, or `None` when the CM said it has none.
    cache: Mutex<Option<FetchedSetup>>,
    state: Mutex<CmState>,
    refresh_now: Notify,
}

/// A [`SetupSource`] backed by the Configuration Manager.
pub struct ConfmanSetup {
    inner: Arc<Inner>,
}

impl ConfmanSetup {
    /// Start the background refresh (and the Notify Hub subscription); needs a tokio runtime.
    pub fn start(config: ConfmanConfig, local: LocalSetup) -> ConfmanSetup {
        let inner = Arc::new(Inner {
            config,
            local,
            client: tokio::sync::Mutex::new((None, None)),
            cache: Mutex::new(None),
            state: Mutex::new(CmState::Unknown),
            refresh_now: Notify::new(),
        });
        tokio::spawn(refresh_loop(Arc::downgrade(&inner)));
        if inner.config.notify_hub.publisher_port != 0 {
            tokio::spawn(notify_loop(Arc::downgrade(&inner)));
        }
        ConfmanSetup { inner }
    }

    /// The last Setup the CM gave, if any.
    pub fn cached(&self) -> Option<FetchedSetup> {
        lock(&self.inner.cache).clone()
    }

    /// True while the CM answers.
    pub fn cm_is_up(&self) -> bool {
        *lock(&self.inner.state) == CmState::Up
    }

    /// Ask the CM now (bounded), whatever its last known state.
    pub async fn refresh(&self) -> Result<Option<FetchedSetup>, ConfmanError> {
        self.inner.fetch(Instant::now()).await
    }
}

impl Inner {
    /// The configured endpoint as written in the settings (for display: no name lookup).
    fn endpoint(&self) -> Result<String, String> {
        let cm = &self.config.cm;
        Ok(match cm.hostname.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V6(v6)) => format!("tcp://[{v6}]:{}", cm.commanding_port),
            _ => format!("tcp://{}:{}", cm.hostname, cm.commanding_port),
        })
    }

    async fn client(&self) -> Result<ControlClient, ConfmanError> {
        let cm = &self.config.cm;
        let endpoint = if cm.commanding_port != 0 {
            transport::client_endpoint_async("tcp", &cm.hostname, cm.commanding_port)
                .await
                .map_err(|e| ConfmanError::Discovery(e.to_string()))?
        } else {
            let rec =
                crate::cgse::registry::discover(&self.config.registry, &cm.service_type, self.config.registry_timeout)
                    .await
                    .map_err(|e| ConfmanError::Discovery(e.to_string()))?;
            rec.endpoint(rec.port)
                .await
                .map_err(|e| ConfmanError::Discovery(e.to_string()))?
        };
        let mut c = ControlClient::new(endpoint, self.config.timeout);
        c.set_connect_timeout(self.config.connect_timeout);
        c.set_refused_is_final(true);
        Ok(c)
    }

    /// One `get_setup`, unless an attempt finished after `asked` (then its outcome is reused).
    async fn fetch(&self, asked: Instant) -> Result<Option<FetchedSetup>, ConfmanError> {
        let mut guard = self.client.lock().await;
        if let Some(done) = guard.1 {
            // An attempt finished while we waited for it: its outcome is as fresh as ours would be.
            if done >= asked {
                return match &*lock(&self.state) {
                    CmState::Up => Ok(lock(&self.cache).clone()),
                    CmState::Down { error, .. } => Err(ConfmanError::Discovery(error.clone())),
                    CmState::Unknown => Err(ConfmanError::Discovery("not asked yet".into())),
                };
            }
        }
        let result = self.fetch_once(&mut guard.0).await;
        guard.1 = Some(Instant::now());
        drop(guard);
        self.record(&result);
        result
    }

    async fn fetch_once(&self, slot: &mut Option<ControlClient>) -> Result<Option<FetchedSetup>, ConfmanError> {
        if slot.is_none() {
            *slot = Some(self.client().await?);
        }
        let Some(client) = slot.as_mut() else {
            return Err(ConfmanError::Discovery("no client".into()));
        };
        // A fresh connection per request (see `storage_manager`): a restarted CM is a new peer.
        let result = client.request(&get_setup_request()).await;
        client.reset();
        match result {
            Ok(reply) => parse_get_setup_reply(&reply),
            Err(e) => {
                // Rediscover next time (a CM on port 0 may come back elsewhere).
                *slot = None;
                Err(e.into())
            }
        }
    }

    /// Update cache and state from an attempt, logging every change of state.
    fn record(&self, result: &Result<Option<FetchedSetup>, ConfmanError>) {
        let mut state = lock(&self.state);
        match result {
            Ok(fetched) => {
                let mut cache = lock(&self.cache);
                let old_id = cache.as_ref().map(|c| c.setup_id.clone());
                let new_id = fetched.as_ref().map(|c| c.setup_id.clone());
                if *state != CmState::Up || old_id != new_id {
                    match fetched {
                        Some(f) => info!(
                            setup_id = f.setup_id.as_deref().unwrap_or("?"),
                            devices = f.node.devices().len(),
                            "Setup from the Configuration Manager"
                        ),
                        None => info!("the Configuration Manager has no Setup loaded: the device tables are empty"),
                    }
                }
                *cache = fetched.clone();
                *state = CmState::Up;
            }
            Err(e) if e.is_unreachable() => {
                if !matches!(*state, CmState::Down { .. }) {
                    warn!(error = %e, fallback = %self.fallback_text(), refresh_s = self.config.refresh.as_secs_f64(),
                        "Configuration Manager unreachable: answering from the fallback until it is back");
                    *state = CmState::Down {
                        since: SystemTime::now(),
                        error: e.to_string(),
                    };
                }
            }
            // The CM answered, but not with a Setup: keep the last good one and keep asking.
            Err(e) => {
                warn!(error = %e, fallback = %self.fallback_text(), "no usable Setup from the Configuration Manager")
            }
        }
    }

    fn fallback_text(&self) -> String {
        match lock(&self.cache).as_ref() {
            Some(f) => format!(
                "the cached Setup {} from the Configuration Manager",
                f.setup_id.as_deref().unwrap_or("(no id)")
            ),
            None => match self.local.path() {
                Some(p) => format!("the local Setup file {}", p.display()),
                None => "no Setup (empty device tables)".into(),
            },
        }
    }

    /// The cache, else the local Setup.
    fn fallback(&self) -> Option<Arc<Node>> {
        if let Some(f) = lock(&self.cache).as_ref() {
            return Some(f.node.clone());
        }
        self.local.load()
    }

    async fn current(&self) -> Option<Arc<Node>> {
        let state = lock(&self.state).clone();
        match state {
            CmState::Up | CmState::Unknown => match self.fetch(Instant::now()).await {
                Ok(Some(f)) => Some(f.node),
                Ok(None) => None,
                Err(_) => self.fallback(),
            },
            CmState::Down { .. } => {
                debug!(fallback = %self.fallback_text(), "Configuration Manager down: Setup from the fallback");
                self.refresh_now.notify_one();
                self.fallback()
            }
        }
    }

    fn describe(&self) -> String {
        let ep = self
            .endpoint()
            .map(|e| {
                if self.config.cm.commanding_port == 0 {
                    "(discovered)".into()
                } else {
                    e
                }
            })
            .unwrap_or_default();
        match &*lock(&self.state) {
            CmState::Unknown => format!(
                "Configuration Manager {ep} (not asked yet); fallback {}",
                self.fallback_text()
            ),
            CmState::Up => match lock(&self.cache).as_ref() {
                Some(f) => format!(
                    "Configuration Manager {ep}: Setup {}",
                    f.setup_id.as_deref().unwrap_or("(no id)")
                ),
                None => format!("Configuration Manager {ep}: no Setup loaded"),
            },
            CmState::Down { since, error } => format!(
                "Configuration Manager {ep} unreachable for {:.0} s ({error}): {}",
                since.elapsed().unwrap_or_default().as_secs_f64(),
                self.fallback_text()
            ),
        }
    }
}

impl SetupSource for ConfmanSetup {
    fn current(&self) -> SetupFuture<'_> {
        Box::pin(self.inner.current())
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// Re-read the Setup every `refresh`, or at once when asked; ends when the source is dropped.
async fn refresh_loop(inner: Weak<Inner>) {
    let mut first = true;
    loop {
        let (refresh, notified) = {
            let Some(i) = inner.upgrade() else { return };
            (i.config.refresh, first)
        };
        if !notified {
            let Some(i) = inner.upgrade() else { return };
            let wake = async { i.refresh_now.notified().await };
            tokio::select! {
                _ = wake => {}
                _ = tokio::time::sleep(refresh) => {}
            }
        }
        first = false;
        let Some(i) = inner.upgrade() else { return };
        let _ = i.fetch(Instant::now()).await;
        drop(i);
        // At most one background attempt per second, whatever wakes us.
        tokio::time::sleep(Duration::from_secs(1).min(refresh)).await;
    }
}

/// Follow the Notify Hub's `new_setup` events (cm_cs publishes one for every Setup it loads).
async fn notify_loop(inner: Weak<Inner>) {
    let (endpoint, refresh) = {
        let Some(i) = inner.upgrade() else { return };
        let nh = &i.config.notify_hub;
        match transport::client_endpoint_async("tcp", &nh.hostname, nh.publisher_port).await {
            Ok(e) => (e, i.config.refresh),
            Err(e) => {
                warn!(error = %e, "not following the Notify Hub");
                return;
            }
        }
    };
    let mut logged = false;
    loop {
        if inner.strong_count() == 0 {
            return;
        }
        let mut sub = match Subscriber::connect(&endpoint, &["new_setup"], Duration::from_secs(1)).await {
            Ok(s) => {
                info!(endpoint = %endpoint, "following new_setup events of the Notify Hub");
                s
            }
            Err(e) => {
                if !logged {
                    debug!(error = %e, "Notify Hub not reachable; polling the Configuration Manager only");
                    logged = true;
                }
                tokio::time::sleep(refresh).await;
                continue;
            }
        };
        loop {
            let msg = tokio::select! {
                m = sub.recv() => m,
                // Wake up now and then to notice that the source is gone.
                _ = tokio::time::sleep(refresh) => {
                    if inner.strong_count() == 0 { return }
                    continue;
                }
            };
            match msg {
                Ok(frames) => {
                    let Some(i) = inner.upgrade() else { return };
                    let body = frames.get(1).map(|b| String::from_utf8_lossy(b).into_owned());
                    info!(
                        event = body.as_deref().unwrap_or(""),
                        "new Setup announced by the Notify Hub"
                    );
                    i.refresh_now.notify_one();
                }
                Err(e) => {
                    debug!(error = %e, "Notify Hub subscription lost; reconnecting");
                    break;
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU8, Ordering};

    use crate::cgse::testing::{free_port, ScriptedServer};
    use crate::codec::{Object, ObjectKind};

    /// A pickled `egse.setup.Setup` as cm_cs sends it: items first, `_setup_id` in the BUILD state.
    fn setup_value(id: &str, devices: &[(&str, &str)]) -> Value {
        let gse = Value::Dict(
            devices
                .iter()
                .map(|(key, name)| {
                    (
                        Value::str(*key),
                        Value::dict([
                            ("device", Value::str("class//egse.dummy.DummyProxy")),
                            ("device_name", Value::str(*name)),
                        ]),
                    )
                })
                .collect(),
        );
        Value::Object(Box::new(Object {
            class: Value::global("egse.setup", "Setup"),
            kind: ObjectKind::NewObj,
            args: vec![],
            kwargs: vec![],
            state: Some(Value::dict([("_setup_id", Value::str(id))])),
            list_items: vec![],
            dict_items: vec![(Value::str("site_id"), Value::str("LAB42")), (Value::str("gse"), gse)],
        }))
    }

    /// 0: setup A, 1: setup B, 2: "No Setup was loaded".
    async fn fake_cm(port: u16, which: Arc<AtomicU8>) -> ScriptedServer {
        ScriptedServer::start(port, move |req| {
            assert_eq!(req, &get_setup_request());
            Some(match which.load(Ordering::SeqCst) {
                0 => setup_value("00001", &[("a", "Device A")]),
                1 => setup_value("00002", &[("b", "Device B"), ("c", "Device C")]),
                _ => crate::protocol::failure("No Setup was loaded on the Configuration Manager."),
            })
        })
        .await
    }

    fn source(port: u16, local_file: Option<std::path::PathBuf>) -> ConfmanSetup {
        let config = ConfmanConfig {
            cm: PeerSettings {
                service_type: "CM_CS".into(),
                hostname: "127.0.0.1".into(),
                commanding_port: port,
            },
            registry: crate::cgse::testing::no_registry(),
            registry_timeout: Duration::from_millis(200),
            timeout: Duration::from_millis(300),
            connect_timeout: Duration::from_millis(200),
            refresh: Duration::from_millis(200),
            notify_hub: NotifyHubSettings {
                hostname: "127.0.0.1".into(),
                publisher_port: 0,
            },
        };
        ConfmanSetup::start(config, LocalSetup::new(local_file, None, None, "LAB42".into()))
    }

    fn names(n: Option<Arc<Node>>) -> Vec<String> {
        n.map(|n| n.devices().into_iter().map(|d| d.name).collect())
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn follows_the_cm_then_answers_from_the_cache_at_once() {
        let port = free_port();
        let which = Arc::new(AtomicU8::new(0));
        let cm = fake_cm(port, which.clone()).await;
        let s = source(port, None);
        assert_eq!(names(s.current().await), ["Device A"]);
        assert!(s.describe().contains("Setup 00001"), "{}", s.describe());
        // A new Setup in the CM: the next call sees it.
        which.store(1, Ordering::SeqCst);
        assert_eq!(names(s.current().await), ["Device B", "Device C"]);
        // The CM goes away: one failed attempt, then answers come from the cache without waiting.
        drop(cm);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(names(s.current().await), ["Device B", "Device C"]);
        let t0 = Instant::now();
        for _ in 0..20 {
            assert_eq!(names(s.current().await), ["Device B", "Device C"]);
        }
        // A call that waited for the CM would cost at least its 200 ms connect timeout: 20 would take 4 s.
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        assert!(s.describe().contains("unreachable") && s.describe().contains("cached Setup 00002"));
        // It comes back with another Setup: the background refresh finds it.
        which.store(0, Ordering::SeqCst);
        let cm = fake_cm(port, which.clone()).await;
        tokio::time::timeout(Duration::from_secs(3), async {
            while !s.cm_is_up() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the CM is noticed again");
        assert_eq!(names(s.current().await), ["Device A"]);
        // The CM with no Setup loaded: that is the answer (empty tables), not the cache.
        which.store(2, Ordering::SeqCst);
        assert!(s.current().await.is_none());
        assert!(s.describe().contains("no Setup loaded"), "{}", s.describe());
        drop(cm);
    }

    #[tokio::test]
    async fn without_cm_and_cache_the_local_setup_else_nothing() {
        let dir = std::env::temp_dir().join(format!("procman-cm-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("setup.yaml");
        std::fs::write(
            &file,
            "Setup:\n  x:\n    device: class//egse.dummy.DummyProxy\n    device_name: Local Device\n",
        )
        .unwrap();
        let s = source(free_port(), Some(file));
        assert_eq!(names(s.current().await), ["Local Device"]);
        assert!(s.describe().contains("local Setup file"), "{}", s.describe());
        let none = source(free_port(), None);
        assert!(none.current().await.is_none());
        assert!(none.describe().contains("no Setup"), "{}", none.describe());
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn reply_parsing() {
        let f = parse_get_setup_reply(&setup_value("00007", &[("a", "A")]))
            .unwrap()
            .unwrap();
        assert_eq!(f.setup_id.as_deref(), Some("00007"));
        assert!(parse_get_setup_reply(&crate::protocol::failure(
            "No Setup was loaded on the Configuration Manager."
        ))
        .unwrap()
        .is_none());
        assert!(matches!(
            parse_get_setup_reply(&crate::protocol::failure("Loading Setup: boom")),
            Err(ConfmanError::Failure(_))
        ));
        assert!(matches!(
            parse_get_setup_reply(&Value::Int(3)),
            Err(ConfmanError::NotASetup(_))
        ));
    }
}
