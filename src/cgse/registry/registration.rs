//! The daemon's registration with the Service Registry: the [`Lifecycle`] hook, its background task and the
//! service id kept in the state directory (see the module doc of `registry`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value as Json;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::client::ControlClient;
use crate::config::RegistrySettings;
use crate::daemon::{HookFuture, Lifecycle};
use crate::server::Ports;

use super::*;

/// Where the daemon's registration stands, for logs and status.
#[derive(Debug, Clone, PartialEq)]
pub enum RegistrationState {
    /// The daemon has not started serving yet.
    NotStarted,
    /// Registering; `attempts` failed so far (the registry is absent or refused).
    Registering {
        /// Failed attempts so far.
        attempts: u32,
        /// Why the last attempt failed.
        last_error: String,
    },
    /// Registered and renewed.
    Registered {
        /// The id the registry gave our record.
        service_id: String,
        /// The host address in our record.
        host: String,
    },
    /// Another live Process Manager holds the service type; we retry until it goes away.
    Conflict {
        /// The id of the other Process Manager's record.
        existing_id: String,
        /// Where the other Process Manager listens.
        endpoint: String,
    },
    /// Deregistered at shutdown.
    Deregistered,
}

impl fmt::Display for RegistrationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegistrationState::NotStarted => write!(f, "not started"),
            RegistrationState::Registering { attempts, last_error } => {
                write!(f, "not registered ({attempts} attempts; last: {last_error}); retrying")
            }
            RegistrationState::Registered { service_id, host } => {
                write!(f, "registered as {service_id} (host {host})")
            }
            RegistrationState::Conflict { existing_id, endpoint } => write!(
                f,
                "not registered: another live Process Manager ({existing_id} at {endpoint}) holds the service type; retrying"
            ),
            RegistrationState::Deregistered => write!(f, "deregistered"),
        }
    }
}

/// Finds this host's address for the record (may block: called off the runtime threads).
pub type HostIpFn = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// How the daemon registers.
#[derive(Clone)]
pub struct RegistrationConfig {
    /// Where the registry listens.
    pub registry: RegistrySettings,
    /// `PROCESS_NAME` (the record's `name`).
    pub name: String,
    /// `SERVICE_TYPE`.
    pub service_type: String,
    /// The record's time to live; renewals go every TTL/3.
    pub ttl: Duration,
    /// One registry request.
    pub timeout: Duration,
    /// Where the service id is kept across restarts.
    pub id_file: PathBuf,
    /// How long to wait between attempts while unregistered.
    pub retry: Duration,
    /// Finds the `host` of the record; `127.0.0.1` when it gives none within 2 s.
    pub host_ip: HostIpFn,
}

/// The daemon's registration with the Service Registry (a [`Lifecycle`] hook).
pub struct Registration {
    config: RegistrationConfig,
    state: watch::Sender<RegistrationState>,
    service_id: Arc<Mutex<Option<String>>>,
    cancel: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
    signal: Arc<ReregisterSignal>,
    wake: Arc<tokio::sync::Notify>,
}

/// A re-registration asked for from outside (a CGSE signal file): wakes the worker at once.
#[derive(Default)]
struct ReregisterSignal {
    notify: Notify,
    /// Deregister first (`force`), else only register when the registry lost our record.
    force: AtomicBool,
    /// Re-registrations done on request, for status.
    done: AtomicU64,
}

impl Registration {
    /// Makes the next attempt now instead of after the retry pause: the supervisor calls it when the Service
    /// Registry it runs becomes ready. A no-op while registered (the renew schedule is kept).
    pub fn retry_now(&self) {
        if !matches!(*self.state.borrow(), RegistrationState::Registered { .. }) {
            self.wake.notify_one();
        }
    }

    /// A registration not started yet, with the service id persisted in `id_file` (if any).
    pub fn new(config: RegistrationConfig) -> Registration {
        let persisted = read_id_file(&config.id_file);
        Registration {
            config,
            state: watch::channel(RegistrationState::NotStarted).0,
            service_id: Arc::new(Mutex::new(persisted)),
            cancel: CancellationToken::new(),
            task: Mutex::new(None),
            signal: Arc::new(ReregisterSignal::default()),
            wake: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Re-register now, as CGSE control servers do on a `reregister` signal: with `force`, deregister and
    /// register again; without, register again only when the registry no longer has our record.
    pub fn reregister(&self, force: bool) {
        if force {
            self.signal.force.store(true, Ordering::SeqCst);
        }
        self.signal.notify.notify_one();
    }

    /// Re-registrations done on request so far.
    pub fn reregistrations(&self) -> u64 {
        self.signal.done.load(Ordering::SeqCst)
    }

    /// Where the registration stands now.
    pub fn state(&self) -> RegistrationState {
        self.state.borrow().clone()
    }

    /// Follow the registration state (e.g. for a status display or a test).
    pub fn subscribe(&self) -> watch::Receiver<RegistrationState> {
        self.state.subscribe()
    }

    /// The service id we register under (persisted, or the registry's once registered).
    pub fn service_id(&self) -> Option<String> {
        lock(&self.service_id).clone()
    }

    fn start(&self, ports: Ports) {
        let worker = Worker {
            config: self.config.clone(),
            state: self.state.clone(),
            service_id: self.service_id.clone(),
            ports,
            registry: None,
            heartbeat: None,
            signal: self.signal.clone(),
            wake: self.wake.clone(),
        };
        let cancel = self.cancel.clone();
        let handle = tokio::spawn(async move { worker.run(cancel).await });
        if let Some(old) = lock(&self.task).replace(handle) {
            old.abort();
        }
    }

    async fn stop(&self) {
        self.cancel.cancel();
        let handle = lock(&self.task).take();
        if let Some(h) = handle {
            // The worker only ever waits on bounded requests; give it one request's time.
            let _ = tokio::time::timeout(self.config.timeout, h).await;
        }
        let registered = matches!(*self.state.borrow(), RegistrationState::Registered { .. });
        let id = self.service_id();
        if let (true, Some(id)) = (registered, id) {
            // Deregister only when the registry was answering: a dead one would eat the shutdown budget.
            let timeout = self.config.timeout.min(Duration::from_millis(500));
            match RegistryClient::from_settings(&self.config.registry, timeout).await {
                Ok(mut c) => match c.deregister(&id).await {
                    Ok(()) => info!(service_id = %id, "deregistered from the Service Registry"),
                    Err(e) => warn!(service_id = %id, error = %e, "deregistration failed"),
                },
                Err(e) => warn!(error = %e, "deregistration failed"),
            }
        }
        self.state.send_replace(RegistrationState::Deregistered);
    }
}

/// How long `started()` waits for the first registration attempt: long enough for a registry that answers
/// (a few ms), so the "listening" log line normally comes after the registration; short enough that a hung
/// registry does not delay the daemon (a refused connection fails at once anyway).
pub(super) const FIRST_ATTEMPT_WAIT: Duration = Duration::from_millis(250);

impl Lifecycle for Registration {
    fn started(&self, ports: Ports) -> HookFuture<'_> {
        let mut rx = self.state.subscribe();
        self.start(ports);
        Box::pin(async move {
            let first = rx.wait_for(|s| !matches!(s, RegistrationState::NotStarted));
            let _ = tokio::time::timeout(FIRST_ATTEMPT_WAIT.min(self.config.timeout), first).await;
        })
    }

    fn stopping(&self) -> HookFuture<'_> {
        Box::pin(self.stop())
    }

    fn describe(&self) -> Option<String> {
        let asked = self.reregistrations();
        let extra = if asked > 0 {
            format!(" ({asked} re-registration(s) on signal)")
        } else {
            String::new()
        };
        Some(format!("Service Registry: {}{extra}", self.state()))
    }
}

/// The background task behind [`Registration`].
struct Worker {
    config: RegistrationConfig,
    state: watch::Sender<RegistrationState>,
    service_id: Arc<Mutex<Option<String>>>,
    ports: Ports,
    registry: Option<RegistryClient>,
    heartbeat: Option<HeartbeatClient>,
    signal: Arc<ReregisterSignal>,
    /// [`Registration::retry_now`].
    wake: Arc<tokio::sync::Notify>,
}

impl Worker {
    async fn run(mut self, cancel: CancellationToken) {
        let interval = heartbeat_interval(self.config.ttl);
        let mut registered_host: Option<String> = None;
        let mut attempts = 0u32;
        loop {
            let host = self.host_ip().await;
            let wait = match &registered_host {
                // Registered: renew, unless our address changed (then the record must change too).
                Some(h) if *h == host => match self.renew().await {
                    Ok(()) => {
                        debug!("registry heartbeat renewed");
                        interval
                    }
                    Err(e) => {
                        warn!(error = %e, "registry heartbeat failed; re-registering as soon as the registry answers");
                        registered_host = None;
                        Duration::ZERO
                    }
                },
                _ => match self.register(&host).await {
                    Ok(id) => {
                        info!(service_id = %id, host = %host, ports = ?self.ports, after_attempts = attempts,
                            "registered with the Service Registry");
                        self.state.send_replace(RegistrationState::Registered {
                            service_id: id,
                            host: host.clone(),
                        });
                        registered_host = Some(host);
                        attempts = 0;
                        interval
                    }
                    Err(state) => {
                        attempts += 1;
                        let state = match state {
                            RegistrationState::Registering { last_error, .. } => {
                                RegistrationState::Registering { attempts, last_error }
                            }
                            other => other,
                        };
                        let changed = std::mem::discriminant(&*self.state.borrow()) != std::mem::discriminant(&state);
                        if changed {
                            warn!(state = %state, "not registered with the Service Registry; the daemon serves anyway");
                        } else {
                            debug!(state = %state, "registration attempt failed");
                        }
                        let conflict = matches!(state, RegistrationState::Conflict { .. });
                        self.state.send_replace(state);
                        if conflict {
                            // A live holder: no point in asking it every second.
                            interval
                        } else {
                            self.config.retry
                        }
                    }
                },
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                _ = self.signal.notify.notified() => {
                    if self.on_reregister_signal(registered_host.is_some()).await {
                        registered_host = None;
                    }
                }
                // Only while unregistered: a wake must not turn into an early renew.
                _ = self.wake.notified(), if registered_host.is_none() => {}
            }
        }
    }

    /// A `reregister` signal: true when the next round must register (again).
    async fn on_reregister_signal(&mut self, registered: bool) -> bool {
        let force = self.signal.force.swap(false, Ordering::SeqCst);
        info!(force, "re-registration requested (signal)");
        let id = lock(&self.service_id).clone();
        let again = match (&id, registered) {
            (Some(id), true) if force => {
                let id = id.clone();
                if let Ok(c) = self.registry().await {
                    if let Err(e) = c.deregister(&id).await {
                        warn!(service_id = %id, error = %e, "deregistration before re-registering failed");
                    }
                }
                true
            }
            (Some(id), true) => {
                let id = id.clone();
                match self.registry().await {
                    Ok(c) => c.get(&id).await.is_err(),
                    Err(_) => true,
                }
            }
            // Not registered yet: the next round registers anyway.
            _ => true,
        };
        if again {
            self.signal.done.fetch_add(1, Ordering::SeqCst);
        } else {
            info!("the registry still has our record; nothing to do (use force to re-register anyway)");
        }
        again
    }

    async fn host_ip(&self) -> String {
        let f = self.config.host_ip.clone();
        tokio::time::timeout(Duration::from_secs(2), tokio::task::spawn_blocking(move || f()))
            .await
            .ok()
            .and_then(Result::ok)
            .flatten()
            .unwrap_or_else(|| "127.0.0.1".to_owned())
    }

    async fn registry(&mut self) -> Result<&mut RegistryClient, RegistryError> {
        if self.registry.is_none() {
            self.registry = Some(RegistryClient::from_settings(&self.config.registry, self.config.timeout).await?);
        }
        self.registry.as_mut().ok_or_else(|| RegistryError::BadReply {
            endpoint: String::new(),
            detail: "no client".into(),
        })
    }

    async fn renew(&mut self) -> Result<(), RegistryError> {
        let Some(id) = lock(&self.service_id).clone() else {
            return Err(RegistryError::BadReply {
                endpoint: String::new(),
                detail: "no service id".into(),
            });
        };
        if self.heartbeat.is_none() {
            let r = &self.config.registry;
            let ep = transport::client_endpoint_async("tcp", &r.hostname, r.heartbeat_port).await?;
            self.heartbeat = Some(HeartbeatClient::new(ep, self.config.timeout));
        }
        match self.heartbeat.as_mut() {
            Some(hb) => hb.renew(&id).await,
            None => Ok(()),
        }
    }

    fn info(&self, host: &str, id: Option<String>) -> ServiceInfo {
        ServiceInfo {
            name: self.config.name.clone(),
            host: host.to_owned(),
            port: self.ports.commanding,
            id,
            service_type: self.config.service_type.clone(),
            metadata: vec![
                ("service_port".into(), Json::from(self.ports.service)),
                ("monitoring_port".into(), Json::from(self.ports.monitoring)),
            ],
        }
    }

    /// One registration attempt; Err carries the state to report.
    async fn register(&mut self, host: &str) -> Result<String, RegistrationState> {
        let known = lock(&self.service_id).clone();
        let info = self.info(host, known);
        let ttl = self.config.ttl;
        let failed = |e: &RegistryError| RegistrationState::Registering {
            attempts: 0,
            last_error: e.to_string(),
        };
        let client = self.registry().await.map_err(|e| failed(&e))?;
        let first = client.register(&info, ttl).await;
        let id = match first {
            Ok(id) => id,
            Err(RegistryError::Refused { error, reply, .. }) if error == "duplicate_service_type" => {
                let existing = reply
                    .get("existing_service_id")
                    .and_then(Json::as_str)
                    .filter(|id| valid_id(id))
                    .map(str::to_owned);
                let Some(existing) = existing else {
                    return Err(RegistrationState::Registering {
                        attempts: 0,
                        last_error: format!("duplicate_service_type without a usable existing id: {reply:?}"),
                    });
                };
                self.take_over_if_stale(host, existing).await?
            }
            Err(e) => return Err(failed(&e)),
        };
        *lock(&self.service_id) = Some(id.clone());
        if let Err(e) = write_id_file(&self.config.id_file, &id) {
            warn!(error = %e, "the service id is not kept: after a crash, a restart waits for the old record to expire");
        }
        Ok(id)
    }

    /// Another record holds our service type. If nothing answers at its endpoint (a crashed Process
    /// Manager, ours or the original, whose record has not expired yet) or the endpoint is our own, we
    /// update that record in place; a live one we leave alone.
    async fn take_over_if_stale(&mut self, host: &str, existing: String) -> Result<String, RegistrationState> {
        let ttl = self.config.ttl;
        let timeout = self.config.timeout;
        let client = self.registry().await.map_err(|e| RegistrationState::Registering {
            attempts: 0,
            last_error: e.to_string(),
        })?;
        let record = match client.get(&existing).await {
            Ok(r) => r,
            // Expired and cleaned up in the meantime: the next plain attempt will succeed.
            Err(e) => {
                return Err(RegistrationState::Registering {
                    attempts: 0,
                    last_error: format!("duplicate service type held by {existing}, which cannot be read: {e}"),
                })
            }
        };
        let endpoint = record
            .endpoint(record.port)
            .await
            .unwrap_or_else(|_| format!("{}:{}", record.host, record.port));
        let ours = record.port == self.ports.commanding && (record.host == host || is_loopback(&record.host));
        let mut holder = ControlClient::new(endpoint.clone(), timeout);
        holder.set_refused_is_final(true);
        if !ours && holder.ping(timeout).await {
            return Err(RegistrationState::Conflict {
                existing_id: existing,
                endpoint,
            });
        }
        warn!(existing_id = %existing, endpoint = %endpoint,
            "the Process Manager service type is held by a record nobody answers for (a crashed Process Manager?); taking it over");
        let info = self.info(host, Some(existing));
        let client = self.registry().await.map_err(|e| RegistrationState::Registering {
            attempts: 0,
            last_error: e.to_string(),
        })?;
        client
            .register(&info, ttl)
            .await
            .map_err(|e| RegistrationState::Registering {
                attempts: 0,
                last_error: e.to_string(),
            })
    }
}

fn is_loopback(host: &str) -> bool {
    host.parse::<std::net::IpAddr>()
        .map(|ip| ip.is_loopback())
        .unwrap_or(host == "localhost")
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The id kept by an earlier run, if the file holds a plausible one.
fn read_id_file(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let id = text.trim();
    if valid_id(id) {
        Some(id.to_owned())
    } else {
        warn!(path = %path.display(), "ignoring an unusable service id file");
        None
    }
}

/// Keep the id (write a temporary file, then rename, so a crash never leaves half an id).
fn write_id_file(path: &Path, id: &str) -> Result<(), RegistryError> {
    let err = |e: std::io::Error| RegistryError::IdFile {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    if read_id_file(path).as_deref() == Some(id) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{id}\n")).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}
