//! The Configuration Manager as the source of the Setup, with a cache and the local Setup as fallbacks.
//!
//! `get_setup` goes out as a hand-built `CommandExecution` (no handshake, and only a
//! method the CM's command table has: an unknown one kills cm_cs). The pickled `egse.setup.Setup` is read
//! with our codec, which keeps YAML order, and walked by [`crate::setup`].
//!
//! # Answering from the cache, never stale
//!
//! The original asks the CM on every `get_devices` (a Python round trip, ~1.5 ms). [`ConfmanSetup::current`]
//! answers from the last fetched Setup instead (a few µs) when three things vouch for it:
//!
//! * the Notify Hub subscription to `new_setup` is connected ("following"; not with publisher port 0, not
//!   while the hub is down or after the connection was lost: an event may have been missed);
//! * no `new_setup` event, (re)connection or loss of the subscription came since the fetch *began* (each
//!   starts a new epoch; the event also starts a re-read in the background);
//! * cm_cs's `<data storage location>/last_setup_id.txt` is exactly as it was when the fetch began (device,
//!   inode, size, times, contents) and names the cached Setup's `_setup_id`.
//!
//! Otherwise the call asks the CM, as before. The file is what closes the race of a client that calls the
//! CM's `load_setup` and asks us at once: cm_cs (`ConfigurationManagerController.load_setup`) sets its Setup,
//! rewrites the file, then pushes the event to the hub on a *new* PUSH connection and replies; the event
//! reaches a subscriber 0.2–9 ms (median ~3 ms) *after* the reply (measured with the real services:
//! `tests/python/test_integrations.py::test_get_devices_right_after_load_setup_is_the_new_setup`), so the
//! event alone would leave that window stale every time, while the file is rewritten before the reply.
//! What remains: a reload of the *same* Setup id (its YAML edited in between) within one tick of the
//! kernel's coarse file clock after our fetch began looks like no change until its event arrives; and a CM
//! restarted on an edited YAML of the same id publishes nothing. When the CM runs on another host (the
//! file is not its file) the file does not name its Setup and every call asks the CM.
//!
//! Once a request has failed, calls answer at once from the last good Setup (else the local Setup file,
//! else no Setup) and a background task retries every `SETUP_REFRESH`. A dead CM therefore costs one
//! bounded timeout, not one per call. Every change of mode is logged (info).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::client::{command_execution, ClientError, ControlClient};
use crate::codec::Value;
use crate::config::{NotifyHubSettings, PeerSettings, RegistrySettings};
use crate::setup::{LocalSetup, Node, SetupError, SetupFuture, SetupSource};
use crate::transport::{self, Subscriber};

/// Retry period of the Notify Hub subscription (at most; `refresh` when shorter): while it is down every
/// call asks the CM, so it is worth being back soon, and a refused local connection costs nothing.
const RESUBSCRIBE: Duration = Duration::from_secs(1);

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
    /// cm_cs's `<data storage location>/last_setup_id.txt`, which it rewrites on every load *before* it
    /// replies (the `new_setup` event comes 0.2 to 9 ms *after* the reply): the cache is used only while this
    /// file is unchanged since the fetch and names the cached Setup. `None`: no cache, ask on every call.
    pub last_setup_id_file: Option<PathBuf>,
}

/// What cm_cs's `last_setup_id.txt` looked like: any difference means a Setup was loaded since.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    content: Vec<u8>,
}

impl Stamp {
    /// The file now; `None` when it cannot be read (then nothing vouches for the cache).
    fn read(path: &Path) -> Option<Stamp> {
        use std::io::Read;
        use std::os::unix::fs::MetadataExt;
        let mut f = std::fs::File::open(path).ok()?;
        let m = f.metadata().ok()?;
        let mut content = Vec::with_capacity(16);
        // A Setup id is a few digits; more than that is not cm_cs's file.
        (&mut f).take(64).read_to_end(&mut content).ok()?;
        Some(Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
            content,
        })
    }

    /// The Setup id the file names.
    fn setup_id(&self) -> Option<u64> {
        std::str::from_utf8(&self.content).ok()?.trim().parse().ok()
    }
}

/// The circumstances of one `get_setup`, taken before it was sent.
#[derive(Debug, Clone)]
struct Attempt {
    /// [`Inner::epoch`] then.
    epoch: u64,
    /// The witness file then.
    stamp: Option<Stamp>,
}

/// When the last `get_setup` began and ended, and whether it gave a Setup.
#[derive(Debug, Clone, Copy)]
struct LastAttempt {
    started: Instant,
    finished: Instant,
    ok: bool,
}

impl LastAttempt {
    /// Whether a caller that asked at `asked` may take this attempt's outcome as its own: a failure that
    /// ended after it asked (the CM is as unreachable for it: one timeout, not one per waiting caller), or
    /// an answer to a request sent after it asked (an earlier one may predate a load the caller knows of).
    fn serves(&self, asked: Instant) -> bool {
        self.finished >= asked && (!self.ok || self.started >= asked)
    }
}

/// The last good Setup and how it was obtained.
#[derive(Default)]
struct Cached {
    /// The last good Setup, or `None` when the CM said it has none.
    setup: Option<FetchedSetup>,
    /// The attempt that gave `setup` (`None` once an attempt failed).
    from: Option<Attempt>,
    /// Whether the witness file named the fetched Setup (logged when it changes).
    witness_agrees: Option<bool>,
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
    /// One request at a time, and the last attempt (callers that waited for it may reuse its outcome).
    client: tokio::sync::Mutex<(Option<ControlClient>, Option<LastAttempt>)>,
    cache: Mutex<Cached>,
    state: Mutex<CmState>,
    refresh_now: Notify,
    /// True while the Notify Hub subscription is connected: only then may the cache answer.
    following: AtomicBool,
    /// Bumped by every `new_setup` event and every change of the subscription: a Setup fetched in an
    /// earlier epoch may predate a load, so it is not used until re-read.
    epoch: AtomicU64,
    /// `new_setup` events received.
    events: AtomicU64,
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
            cache: Mutex::new(Cached::default()),
            state: Mutex::new(CmState::Unknown),
            refresh_now: Notify::new(),
            following: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            events: AtomicU64::new(0),
        });
        tokio::spawn(refresh_loop(Arc::downgrade(&inner)));
        if inner.config.notify_hub.publisher_port == 0 {
            info!("no Notify Hub configured (publisher port 0): asking the Configuration Manager on every call");
        } else {
            tokio::spawn(notify_loop(Arc::downgrade(&inner)));
        }
        if inner.config.last_setup_id_file.is_none() {
            info!("no data storage location, so no last_setup_id.txt to check a cached Setup against: asking the Configuration Manager on every call");
        }
        ConfmanSetup { inner }
    }

    /// The last Setup the CM gave, if any.
    pub fn cached(&self) -> Option<FetchedSetup> {
        lock(&self.inner.cache).setup.clone()
    }

    /// True while the Notify Hub's `new_setup` events are followed (the subscription is connected).
    pub fn is_following(&self) -> bool {
        self.inner.following.load(Ordering::SeqCst)
    }

    /// How many `new_setup` events were received.
    pub fn events_seen(&self) -> u64 {
        self.inner.events.load(Ordering::SeqCst)
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
    fn endpoint(&self) -> String {
        let cm = &self.config.cm;
        match cm.hostname.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V6(v6)) => format!("tcp://[{v6}]:{}", cm.commanding_port),
            _ => format!("tcp://{}:{}", cm.hostname, cm.commanding_port),
        }
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
        if let Some(last) = guard.1 {
            if last.serves(asked) {
                return match &*lock(&self.state) {
                    CmState::Up => Ok(lock(&self.cache).setup.clone()),
                    CmState::Down { error, .. } => Err(ConfmanError::Discovery(error.clone())),
                    CmState::Unknown => Err(ConfmanError::Discovery("not asked yet".into())),
                };
            }
        }
        // Taken before asking: a load after this point changes one or the other, and the result is not
        // trusted beyond this call.
        let started = Instant::now();
        let attempt = Attempt {
            epoch: self.epoch.load(Ordering::SeqCst),
            stamp: self.config.last_setup_id_file.as_deref().and_then(Stamp::read),
        };
        let result = self.fetch_once(&mut guard.0).await;
        guard.1 = Some(LastAttempt {
            started,
            finished: Instant::now(),
            ok: result.is_ok(),
        });
        // Recorded before the next attempt may begin, so that an older outcome never overwrites a newer.
        self.record(&result, attempt);
        drop(guard);
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
    fn record(&self, result: &Result<Option<FetchedSetup>, ConfmanError>, attempt: Attempt) {
        let mut state = lock(&self.state);
        if result.is_err() {
            lock(&self.cache).from = None;
        }
        match result {
            Ok(fetched) => {
                let mut cache = lock(&self.cache);
                let agrees = witness_names(attempt.stamp.as_ref(), fetched.as_ref());
                if let (Some(path), Some(agrees)) = (&self.config.last_setup_id_file, agrees) {
                    if cache.witness_agrees != Some(agrees) {
                        if agrees {
                            info!(file = %path.display(), "last_setup_id.txt names the Configuration Manager's Setup: answering from the cache while the Notify Hub is followed");
                        } else {
                            info!(file = %path.display(), setup_id = fetched.as_ref().and_then(|f| f.setup_id.as_deref()).unwrap_or("none"),
                                "last_setup_id.txt does not name the Configuration Manager's Setup (another CM's file?): asking the CM on every call");
                        }
                        cache.witness_agrees = Some(agrees);
                    }
                }
                let old_id = cache.setup.as_ref().map(|c| c.setup_id.clone());
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
                cache.setup = fetched.clone();
                cache.from = Some(attempt);
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
        match lock(&self.cache).setup.as_ref() {
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
        if let Some(f) = lock(&self.cache).setup.as_ref() {
            return Some(f.node.clone());
        }
        self.local.load()
    }

    /// The cached Setup, if it is certainly the CM's current one: the subscription is connected, no event
    /// came since the fetch began, and `last_setup_id.txt` is as it was then and names that Setup.
    fn coherent(&self) -> Option<Arc<Node>> {
        let path = self.config.last_setup_id_file.as_deref()?;
        if !self.following.load(Ordering::SeqCst) || *lock(&self.state) != CmState::Up {
            return None;
        }
        let epoch = self.epoch.load(Ordering::SeqCst);
        // Read after the epoch: a load that rewrote the file before this point is seen here.
        let now = Stamp::read(path)?;
        let cache = lock(&self.cache);
        let from = cache.from.as_ref()?;
        if from.epoch != epoch || from.stamp.as_ref() != Some(&now) {
            return None;
        }
        let setup = cache.setup.as_ref()?;
        if witness_names(Some(&now), Some(setup)) != Some(true) {
            return None;
        }
        Some(setup.node.clone())
    }

    async fn current(&self) -> Option<Arc<Node>> {
        if let Some(node) = self.coherent() {
            return Some(node);
        }
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
        let ep = if self.config.cm.commanding_port == 0 {
            "(discovered)".into()
        } else {
            self.endpoint()
        };
        match &*lock(&self.state) {
            CmState::Unknown => format!(
                "Configuration Manager {ep} (not asked yet); fallback {}",
                self.fallback_text()
            ),
            CmState::Up => match lock(&self.cache).setup.as_ref() {
                Some(f) => format!(
                    "Configuration Manager {ep}: Setup {}{}",
                    f.setup_id.as_deref().unwrap_or("(no id)"),
                    if self.following.load(Ordering::SeqCst) {
                        ", following new_setup events"
                    } else {
                        ""
                    }
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

/// Whether the witness file names `setup` (`None`: nothing to compare, e.g. no file or no Setup).
fn witness_names(stamp: Option<&Stamp>, setup: Option<&FetchedSetup>) -> Option<bool> {
    let file_id = stamp?.setup_id()?;
    let setup_id = setup?.setup_id.as_deref()?.trim().parse::<u64>().ok()?;
    Some(file_id == setup_id)
}

/// Re-read the Setup now, without holding up the caller (the subscription must keep being read).
fn refetch(inner: &Arc<Inner>) {
    let i = inner.clone();
    tokio::spawn(async move {
        let _ = i.fetch(Instant::now()).await;
    });
}

/// Follow the Notify Hub's `new_setup` events (cm_cs publishes one for every Setup it loads).
///
/// Every event, connection and disconnection starts a new epoch, so that a Setup fetched before it is not
/// answered from the cache; while the subscription is down the cache is not used at all (an event may be
/// missed), and calls ask the CM as they did without a Notify Hub.
async fn notify_loop(inner: Weak<Inner>) {
    let (endpoint, refresh) = {
        let Some(i) = inner.upgrade() else { return };
        let nh = &i.config.notify_hub;
        match transport::client_endpoint_async("tcp", &nh.hostname, nh.publisher_port).await {
            Ok(e) => (e, i.config.refresh.min(RESUBSCRIBE)),
            Err(e) => {
                warn!(error = %e, "not following the Notify Hub: asking the Configuration Manager on every call");
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
            Ok(s) => s,
            Err(e) => {
                if !logged {
                    info!(error = %e, "Notify Hub not reachable: asking the Configuration Manager on every call until it is");
                    logged = true;
                }
                tokio::time::sleep(refresh).await;
                continue;
            }
        };
        {
            let Some(i) = inner.upgrade() else { return };
            // Whatever was loaded before the subscription took effect is in the Setup fetched from now on.
            i.epoch.fetch_add(1, Ordering::SeqCst);
            i.following.store(true, Ordering::SeqCst);
            info!(endpoint = %endpoint, "following new_setup events of the Notify Hub");
            logged = false;
            refetch(&i);
        }
        loop {
            let msg = tokio::select! {
                m = sub.recv_or_lost() => m,
                // Wake up now and then to notice that the source is gone.
                _ = tokio::time::sleep(refresh) => {
                    if inner.strong_count() == 0 { return }
                    continue;
                }
            };
            let Some(i) = inner.upgrade() else { return };
            match msg {
                Ok(frames) => {
                    // First of all: from now on the cached Setup is not answered until re-read.
                    i.epoch.fetch_add(1, Ordering::SeqCst);
                    i.events.fetch_add(1, Ordering::SeqCst);
                    let body = frames.get(1).map(|b| String::from_utf8_lossy(b).into_owned());
                    info!(
                        event = body.as_deref().unwrap_or(""),
                        "new Setup announced by the Notify Hub"
                    );
                    refetch(&i);
                }
                Err(e) => {
                    i.following.store(false, Ordering::SeqCst);
                    i.epoch.fetch_add(1, Ordering::SeqCst);
                    info!(error = %e, "Notify Hub subscription lost: asking the Configuration Manager on every call until it is back");
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

    use crate::cgse::testing::{wait_until, ReservedPort, ScriptedServer};
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

    /// 0: setup A, 1: setup B, 2: "No Setup was loaded", 3: setup A with other devices (its YAML edited).
    async fn fake_cm(port: u16, which: Arc<AtomicU8>) -> ScriptedServer {
        let gate = Arc::new(tokio::sync::Semaphore::new(tokio::sync::Semaphore::MAX_PERMITS));
        gated_fake_cm(port, which, gate).await
    }

    /// [`fake_cm`] answering only as `gate` allows.
    async fn gated_fake_cm(port: u16, which: Arc<AtomicU8>, gate: Arc<tokio::sync::Semaphore>) -> ScriptedServer {
        ScriptedServer::start_gated(port, gate, move |req| {
            assert_eq!(req, &get_setup_request());
            Some(match which.load(Ordering::SeqCst) {
                0 => setup_value("00001", &[("a", "Device A")]),
                1 => setup_value("00002", &[("b", "Device B"), ("c", "Device C")]),
                3 => setup_value("00001", &[("z", "Device Z")]),
                _ => crate::protocol::failure("No Setup was loaded on the Configuration Manager."),
            })
        })
        .await
    }

    fn source(port: u16, local_file: Option<std::path::PathBuf>) -> ConfmanSetup {
        following_source(port, local_file, 0, None, Duration::from_millis(200))
    }

    /// With a Notify Hub publishing on `hub_port` (0: none), cm_cs's `last_setup_id.txt` at `witness`, and
    /// background re-reads every `refresh`.
    fn following_source(
        port: u16,
        local_file: Option<std::path::PathBuf>,
        hub_port: u16,
        witness: Option<PathBuf>,
        refresh: Duration,
    ) -> ConfmanSetup {
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
            refresh,
            notify_hub: NotifyHubSettings {
                hostname: "127.0.0.1".into(),
                publisher_port: hub_port,
            },
            last_setup_id_file: witness,
        };
        ConfmanSetup::start(config, LocalSetup::new(local_file, None, None, "LAB42".into()))
    }

    fn names(n: Option<Arc<Node>>) -> Vec<String> {
        n.map(|n| n.devices().into_iter().map(|d| d.name).collect())
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn follows_the_cm_then_answers_from_the_cache_at_once() {
        let reserved = ReservedPort::new();
        let port = reserved.port();
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

    /// A fake Notify Hub: the PUB side of the hub, publishing what cm_cs's event becomes (topic, JSON).
    struct FakeHub {
        socket: transport::PubSocket,
    }

    impl FakeHub {
        async fn bind(port: u16) -> FakeHub {
            let (socket, _) = transport::bind_pub("tcp", "127.0.0.1", port, "fake hub")
                .await
                .expect("bind the fake hub");
            FakeHub { socket }
        }

        /// Publish `new_setup` until `s` has received one more event (a PUB drops what it publishes before
        /// the subscription has reached it), within a bound.
        async fn announce(&mut self, s: &ConfmanSetup, setup_id: u32) {
            use zeromq::SocketSend;
            let before = s.events_seen();
            let body = format!(
                r#"{{"event_type": "new_setup", "source_service": "cm_cs", "data": {{"setup_id": {setup_id}}}, "timestamp": 1795691622.641114, "correlation_id": "498d0c60-7843-4b06-ae9e-3a8ce999a6d6"}}"#
            );
            let end = Instant::now() + Duration::from_secs(5);
            while s.events_seen() == before && Instant::now() < end {
                let frames = vec![
                    bytes::Bytes::from_static(b"new_setup"),
                    bytes::Bytes::from(body.clone()),
                ];
                let msg = transport::message(frames).expect("two frames");
                self.socket.send(msg).await.expect("publish");
                wait_until(Duration::from_millis(200), || s.events_seen() > before).await;
            }
            assert!(s.events_seen() > before, "the event did not arrive");
        }
    }

    /// `current()` until it answers without asking the CM (the background re-read has landed), bounded.
    async fn settled(s: &ConfmanSetup, cm: &ScriptedServer) -> Vec<String> {
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let before = cm.seen().len();
            let got = names(s.current().await);
            if cm.seen().len() == before || Instant::now() > end {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn following_the_notify_hub_answers_from_the_cache_and_never_stale() {
        let dir = std::env::temp_dir().join(format!("procman-cm-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let witness = dir.join("last_setup_id.txt");
        // cm_cs rewrites the file on every load; the tests set its mtime apart each time, as the clock does
        // between loads (the kernel's file times are coarse: two writes in one tick look alike).
        let mut mtime = 0;
        let mut save_last_setup_id = |id: &str| {
            std::fs::write(&witness, id).unwrap();
            mtime += 1;
            let f = std::fs::File::options().write(true).open(&witness).unwrap();
            f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(mtime))
                .unwrap();
        };
        save_last_setup_id("1");
        let reserved = ReservedPort::new();
        let port = reserved.port();
        let which = Arc::new(AtomicU8::new(0));
        let gate = Arc::new(tokio::sync::Semaphore::new(tokio::sync::Semaphore::MAX_PERMITS / 2));
        let cm = gated_fake_cm(port, which.clone(), gate.clone()).await;
        let hub_reserved = ReservedPort::new();
        let hub_port = hub_reserved.port();
        let mut hub = FakeHub::bind(hub_port).await;
        // No background re-read during the test: every request the fake CM counts is one a call (or an
        // event) caused.
        let s = following_source(port, None, hub_port, Some(witness.clone()), Duration::from_secs(600));
        wait_until(Duration::from_secs(5), || s.is_following()).await;
        assert!(s.is_following());

        // (a) While following, calls answer from the cache: the CM is not asked.
        assert_eq!(settled(&s, &cm).await, ["Device A"]);
        let asked = cm.seen().len();
        for _ in 0..50 {
            assert_eq!(names(s.current().await), ["Device A"]);
        }
        assert_eq!(cm.seen().len(), asked, "the CM was asked while following");
        assert!(s.describe().contains("following new_setup events"), "{}", s.describe());

        // (b) The same Setup id loaded again with other contents, last_setup_id.txt untouched: the event
        // alone makes the next answer the new Setup, never the old one. The CM is held back so that the
        // re-read the event starts cannot have landed when the call is made: the call must wait for it.
        gate.forget_permits(usize::MAX);
        which.store(3, Ordering::SeqCst);
        let asked = cm.seen().len();
        hub.announce(&s, 1).await;
        wait_until(Duration::from_secs(5), || cm.seen().len() > asked).await;
        let call = {
            let s = ConfmanSetup { inner: s.inner.clone() };
            tokio::spawn(async move { names(s.current().await) })
        };
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        gate.add_permits(tokio::sync::Semaphore::MAX_PERMITS / 2);
        assert_eq!(call.await.unwrap(), ["Device Z"]);
        assert_eq!(settled(&s, &cm).await, ["Device Z"]);

        // A call that finds a request under way does not take its answer if it was sent before the call:
        // the CM may have answered it before a load that the caller knows of.
        let spawn_call = || {
            let s = ConfmanSetup { inner: s.inner.clone() };
            tokio::spawn(async move { names(s.current().await) })
        };
        gate.forget_permits(usize::MAX);
        let asked = cm.seen().len();
        save_last_setup_id("1");
        let early = spawn_call();
        wait_until(Duration::from_secs(5), || cm.seen().len() > asked).await;
        which.store(0, Ordering::SeqCst);
        save_last_setup_id("1");
        let late = spawn_call();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        gate.add_permits(tokio::sync::Semaphore::MAX_PERMITS / 2);
        assert_eq!(early.await.unwrap(), ["Device Z"]);
        assert_eq!(late.await.unwrap(), ["Device A"]);

        // The race of a client that calls load_setup and asks at once: cm_cs has rewritten
        // last_setup_id.txt before replying, but its event is still on the way. The file alone suffices,
        // whether it names another Setup or the same one (reloaded: only its times change).
        which.store(1, Ordering::SeqCst);
        save_last_setup_id("2");
        assert_eq!(names(s.current().await), ["Device B", "Device C"]);
        hub.announce(&s, 2).await;
        assert_eq!(settled(&s, &cm).await, ["Device B", "Device C"]);
        which.store(0, Ordering::SeqCst);
        save_last_setup_id("1");
        assert_eq!(settled(&s, &cm).await, ["Device A"]);
        which.store(3, Ordering::SeqCst);
        save_last_setup_id("1");
        assert_eq!(names(s.current().await), ["Device Z"]);
        assert_eq!(settled(&s, &cm).await, ["Device Z"]);
        which.store(1, Ordering::SeqCst);
        save_last_setup_id("2");
        assert_eq!(settled(&s, &cm).await, ["Device B", "Device C"]);

        // A file that does not name the CM's Setup (another CM's?) vouches for nothing: ask on every call.
        save_last_setup_id("7");
        let asked = cm.seen().len();
        for _ in 0..3 {
            assert_eq!(names(s.current().await), ["Device B", "Device C"]);
        }
        assert_eq!(cm.seen().len(), asked + 3);
        save_last_setup_id("2");
        assert_eq!(settled(&s, &cm).await, ["Device B", "Device C"]);

        // (c) The subscription is lost: an event may be missed, so every call asks the CM again.
        drop(hub);
        wait_until(Duration::from_secs(5), || !s.is_following()).await;
        assert!(!s.is_following());
        let asked = cm.seen().len();
        for i in 0..3 {
            assert_eq!(names(s.current().await), ["Device B", "Device C"]);
            assert_eq!(cm.seen().len(), asked + i + 1);
        }
        // Nothing vouches for a change now but the CM itself.
        which.store(3, Ordering::SeqCst);
        assert_eq!(names(s.current().await), ["Device Z"]);

        // The hub is back: following again, from a Setup fetched after the subscription was made.
        let _hub = FakeHub::bind(hub_port).await;
        wait_until(Duration::from_secs(10), || s.is_following()).await;
        assert!(s.is_following());
        save_last_setup_id("1");
        assert_eq!(settled(&s, &cm).await, ["Device Z"]);
        let asked = cm.seen().len();
        assert_eq!(names(s.current().await), ["Device Z"]);
        assert_eq!(cm.seen().len(), asked);
        drop(cm);
        std::fs::remove_dir_all(dir).ok();
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
        let reserved = ReservedPort::new();
        let s = source(reserved.port(), Some(file));
        assert_eq!(names(s.current().await), ["Local Device"]);
        assert!(s.describe().contains("local Setup file"), "{}", s.describe());
        let none = source(reserved.port(), None);
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
