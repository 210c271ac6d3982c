//! The composition root: binds the three sockets, runs every task, and shuts down in order.
//!
//! Shutdown (SIGINT, SIGTERM or `quit_server`): stop accepting requests, let the requests in flight
//! send their replies, run the integrations' shutdown hooks (deregister, unregister, stop the supervisor:
//! concurrently; the log flush after them), then close the sockets — all within the configured shutdown
//! timeout.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use zeromq::SocketSend;

use crate::cgse::storage::HousekeepingSink;
use crate::codec::{self, Value};
use crate::config::{ConfigError, Env, PmSettings, ProcmanSettings, Settings};
use crate::housekeeping::Housekeeping;
use crate::logging::LogControl;
use crate::monitor::StatusSampler;
use crate::protocol::{self, SocketKind};
use crate::server::{self, AccessControl, Dispatcher, Handler, Ports, ServerInfo};
use crate::service::{ServiceBounds, ServiceHandler, ServiceState};
use crate::transport::{self, TransportError};

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The settings are unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A socket could not be bound.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The compiled-in command tables are unusable.
    #[error("command table: {0}")]
    Table(#[from] protocol::commands::TableError),
    /// Setting up a part failed (the process table could not be loaded, the supervisor did not start).
    #[error("{0}")]
    Setup(String),
}

/// Everything the daemon reads from settings and environment, resolved once.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// All settings groups after merging.
    pub settings: Settings,
    /// The CGSE environment variables.
    pub env: Env,
    /// The Process Manager's group.
    pub pm: PmSettings,
    /// procman's own group.
    pub procman: ProcmanSettings,
}

impl DaemonConfig {
    /// Load settings (the embedded defaults, then the local settings file) and the environment.
    pub fn load(explicit_settings: Option<&Path>) -> Result<DaemonConfig, ConfigError> {
        let env = Env::from_process();
        let settings = Settings::load(explicit_settings, &env)?;
        DaemonConfig::from_parts(settings, env)
    }

    /// From settings and environment already read (tests pass their own).
    pub fn from_parts(settings: Settings, env: Env) -> Result<DaemonConfig, ConfigError> {
        Ok(DaemonConfig {
            pm: PmSettings::from_settings(&settings)?,
            procman: ProcmanSettings::from_settings(&settings)?,
            settings,
            env,
        })
    }

    /// The site id for file names: `SITE_ID`, else the `SITE.ID` setting.
    pub fn site_id(&self) -> String {
        self.env
            .site_id
            .clone()
            .or_else(|| self.settings.string("SITE", "ID").ok())
            .unwrap_or_else(|| "XXXX".to_owned())
    }

    /// Where procman keeps its own state, logs and (without CGSE storage) its data.
    pub fn state_dir(&self) -> PathBuf {
        if let Some(d) = &self.procman.state_dir {
            return d.clone();
        }
        if let Some(log) = self.env.log_file_location() {
            return log.join("procman-state");
        }
        default_home_dir()
    }

    /// The data storage location, or the embedded default under the state directory.
    pub fn data_location(&self) -> (PathBuf, bool) {
        match self.env.data_storage_location() {
            Some(d) => (d, true),
            None => (self.state_dir().join("data").join(self.site_id()), false),
        }
    }

    /// The log location, or the embedded default.
    pub fn log_location(&self) -> PathBuf {
        self.env
            .log_file_location()
            .unwrap_or_else(|| self.state_dir().join("log"))
    }
}

fn default_home_dir() -> PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("procman")
}

/// A boxed future for lifecycle hooks.
pub type HookFuture<'a> = crate::util::BoxFuture<'a, ()>;

/// An integration that must know when the daemon is up and when it goes down (the registry).
pub trait Lifecycle: Send + Sync {
    /// Called once the sockets are bound; must return promptly (do slow work in a task).
    fn started(&self, ports: Ports) -> HookFuture<'_>;
    /// Called during the orderly shutdown, after the last reply; bounded by the shutdown timeout.
    fn stopping(&self) -> HookFuture<'_>;
    /// Where this integration stands now (e.g. "registered as …"), for logs and status; None = nothing to say.
    fn describe(&self) -> Option<String> {
        None
    }
    /// True for a hook whose `stopping` must run after every other one has finished (the log flush: the
    /// others log what they did). The rest run concurrently: none waits for another's round trip.
    fn runs_last(&self) -> bool {
        false
    }
}

/// The seams the other layers plug into.
pub struct Integrations {
    /// Meaning of the commanding table (the process-management commands).
    pub commanding: Arc<dyn Handler>,
    /// Where housekeeping goes.
    pub storage: Arc<dyn HousekeepingSink>,
    /// Builds the housekeeping record.
    pub housekeeping: Housekeeping,
    /// Told when the daemon is up and when it stops.
    pub lifecycle: Vec<Arc<dyn Lifecycle>>,
    /// Extra messages for the monitoring socket (process events), already pickled-ready values.
    pub events: Option<mpsc::Receiver<Value>>,
    /// Shared by everything that measures the daemon itself.
    pub sampler: Arc<StatusSampler>,
}

/// A daemon that is serving.
pub struct RunningDaemon {
    /// The ports bound (0 in the settings: the ones the OS chose).
    pub ports: Ports,
    shutdown: CancellationToken,
    done: JoinHandle<()>,
}

impl RunningDaemon {
    /// The token whose cancellation stops the daemon (cancelled by `quit_server` too).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Ask for an orderly shutdown.
    pub fn stop(&self) {
        self.shutdown.cancel();
    }

    /// Wait until the shutdown sequence has finished.
    pub async fn wait(self) {
        if let Err(e) = self.done.await {
            warn!(error = %e, "shutdown task failed");
        }
    }
}

/// Bind the sockets and start serving. Returns once everything listens.
pub async fn start(
    config: DaemonConfig,
    integrations: Integrations,
    log: Arc<dyn LogControl>,
) -> Result<RunningDaemon, DaemonError> {
    let pm = &config.pm;
    let p = &config.procman;
    let addr = p.bind_address.as_str();
    if !config.env.project_was_set {
        info!(project = %config.env.project, "PROJECT is not set: settings and environment variables of the default project are used");
    }
    let open_files = crate::util::raise_open_files_limit();
    if let Some(n) = open_files {
        debug!(open_files = n, "open-files limit");
    }
    // Three server sockets share the open-files limit with the clients, log files and pipes: keep a
    // quarter of it for each socket at most, so a flood of connections on one never starves the rest.
    let max_connections = match open_files.and_then(|n| usize::try_from(n / 4).ok()) {
        Some(quarter) if quarter < p.max_connections => {
            warn!(
                setting = p.max_connections,
                applied = quarter,
                "Procman.MAX_CONNECTIONS lowered to a quarter of the open-files limit"
            );
            quarter.max(1)
        }
        _ => p.max_connections,
    };
    zeromq::limits::set_max_connections(max_connections);
    zeromq::limits::set_peer_send_queue(p.peer_send_queue);
    zeromq::limits::set_max_receiving_bytes(p.max_receiving_bytes);
    // Bound what a peer can make zmq.rs buffer (vendor/zeromq/PATCHES.md). A frame up to twice our pickle
    // limit is read and answered with a Failure naming the limit; a larger one (a peer announcing
    // gigabytes) disconnects that peer instead of being buffered.
    zeromq::limits::set_max_message_size(p.limits.max_frame_bytes.saturating_mul(2).max(1024 * 1024));
    zeromq::limits::set_pub_subscriber_queue(p.pub_queue_per_subscriber);
    // A peer that connects and never finishes the handshake (a port scanner, a half-open connection)
    // would otherwise hold a file descriptor until it goes away.
    zeromq::limits::set_handshake_timeout(p.handshake_timeout);
    let (service_sock, service_port) = transport::bind_router(&pm.protocol, addr, pm.service_port, "service").await?;
    let (pub_sock, monitoring_port) = transport::bind_pub(&pm.protocol, addr, pm.monitoring_port, "monitoring").await?;
    let (cmd_sock, commanding_port) =
        transport::bind_router(&pm.protocol, addr, pm.commanding_port, "commanding").await?;
    let ports = Ports {
        commanding: commanding_port,
        monitoring: monitoring_port,
        service: service_port,
    };

    let ip = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::task::spawn_blocking(crate::util::host_ip),
    )
    .await
    .ok()
    .and_then(Result::ok)
    .flatten();
    let info = Arc::new(ServerInfo::new(ports, pm.storage_mnemonic.clone(), ip));

    let shutdown = CancellationToken::new();
    let Integrations {
        commanding,
        storage,
        housekeeping,
        lifecycle,
        events,
        sampler,
    } = integrations;
    let state = Arc::new(
        ServiceState::new(
            pm.monitoring_delay,
            p.housekeeping_period,
            log,
            storage.clone(),
            Housekeeping::columns(),
            sampler,
            shutdown.clone(),
        )
        .with_bounds(ServiceBounds {
            min_period_ms: p.min_period.as_secs_f64() * 1000.0,
            max_period_ms: p.max_period.as_secs_f64() * 1000.0,
            max_listeners: p.max_listeners,
            max_listener_name: p.max_listener_name,
        }),
    );
    let (access, unusable) = AccessControl::from_list(&p.control_allow);
    for item in &unusable {
        warn!(item = %item, "Procman.CONTROL_ALLOW: cannot use this item (not an address, network or resolvable host name); it allows nothing");
    }
    info!(
        allow = %if p.control_allow.is_empty() { "this host".to_owned() } else { p.control_allow.join(", ") },
        "state-changing commands accepted from Procman.CONTROL_ALLOW"
    );
    let (cmd_table, svc_table) = protocol::load_tables()?;
    let cmd_dispatch = Arc::new(
        Dispatcher::new(
            SocketKind::Commanding,
            cmd_table,
            commanding,
            info.clone(),
            p.limits.clone(),
        )
        .with_access(access.clone()),
    );
    let svc_dispatch = Arc::new(
        Dispatcher::new(
            SocketKind::Service,
            svc_table,
            Arc::new(ServiceHandler { state: state.clone() }),
            info.clone(),
            p.limits.clone(),
        )
        .with_access(access),
    );

    let requests = TaskTracker::new();
    let tasks = TaskTracker::new();
    let stop_serving = shutdown.child_token();
    tasks.spawn(server::serve(
        cmd_sock,
        cmd_dispatch,
        p.max_concurrent_requests,
        Some(p.idle_timeout),
        stop_serving.clone(),
        requests.clone(),
    ));
    tasks.spawn(server::serve(
        service_sock,
        svc_dispatch,
        p.max_concurrent_requests,
        Some(p.idle_timeout),
        stop_serving.clone(),
        requests.clone(),
    ));
    tasks.spawn(publish(pub_sock, state.clone(), events, shutdown.clone()));
    let process_counts = housekeeping.processes();
    tasks.spawn(run_housekeeping(housekeeping, state.clone(), shutdown.clone()));
    tasks.spawn(refresh_ip(info.clone(), shutdown.clone()));
    tasks.close();

    // Registration happens before the announcement so that a client reading the log finds us
    // registered; hooks return promptly and retry in the background.
    for hook in &lifecycle {
        hook.started(ports).await;
    }
    info!(
        commanding = ports.commanding,
        monitoring = ports.monitoring,
        service = ports.service,
        bind = %addr,
        storage = %storage.describe(),
        lifecycle = %lifecycle.iter().filter_map(|h| h.describe()).collect::<Vec<_>>().join("; "),
        "Process Manager control server listening (commanding tcp://{addr}:{}, monitoring tcp://{addr}:{}, service tcp://{addr}:{})",
        ports.commanding,
        ports.monitoring,
        ports.service
    );
    // Under systemd (`Type=notify`): READY=1 now that the sockets serve, then status, watchdog, STOPPING=1.
    if let Some(n) = crate::notify::Notifier::from_env() {
        tasks.spawn(crate::notify::run(Arc::new(n), process_counts, shutdown.clone()));
    }

    let timeout = p.shutdown_timeout;
    let token = shutdown.clone();
    let done = tokio::spawn(async move {
        token.cancelled().await;
        let started = std::time::Instant::now();
        info!("shutting down");
        // Stop accepting, let the requests in flight reply (quit_server's own reply among them).
        requests.close();
        if tokio::time::timeout(timeout / 2, requests.wait()).await.is_err() {
            warn!("requests still running after {:?}; abandoning them", timeout / 2);
        }
        let left = timeout.saturating_sub(started.elapsed());
        let hooks = async {
            let (last, first): (Vec<_>, Vec<_>) = lifecycle.iter().partition(|h| h.runs_last());
            let first = futures_util::future::join_all(first.iter().map(|h| h.stopping()));
            futures_util::future::join(first, storage.shutdown()).await;
            for hook in last {
                hook.stopping().await;
            }
        };
        if tokio::time::timeout(left, hooks).await.is_err() {
            warn!("shutdown hooks did not finish in time");
        }
        debug!(elapsed_us = started.elapsed().as_micros() as u64, "shutdown hooks done");
        let left = timeout.saturating_sub(started.elapsed());
        let _ = tokio::time::timeout(left, tasks.wait()).await;
        debug!(elapsed_us = started.elapsed().as_micros() as u64, "tasks done");
        // zmq.rs has no linger. The sockets are closed now; their writer tasks end once the last replies
        // (quit_server's among them) are on the wire (zmq.rs patch 10). Wait for that, bounded.
        let drain = Duration::from_millis(DRAIN_LIMIT_MS).min(timeout.saturating_sub(started.elapsed()));
        let drained = tokio::time::timeout(drain, zeromq::limits::writers_drained())
            .await
            .is_ok();
        if !drained {
            debug!(
                writers = zeromq::limits::live_writers(),
                "writers still busy at the end of the drain wait"
            );
        }
        info!(elapsed_ms = started.elapsed().as_millis() as u64, "stopped");
    });
    Ok(RunningDaemon { ports, shutdown, done })
}

/// Longest wait at shutdown for the sockets' writer tasks to put the last replies on the wire (a peer that
/// does not read would otherwise hold the exit).
const DRAIN_LIMIT_MS: u64 = 200;

/// Run until `signal` completes or `quit_server` arrives, then shut down in order.
pub async fn run(
    config: DaemonConfig,
    integrations: Integrations,
    log: Arc<dyn LogControl>,
    signal: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let daemon = start(config, integrations, log).await?;
    let token = daemon.shutdown_token();
    tokio::select! {
        _ = signal => token.cancel(),
        _ = token.cancelled() => {}
    }
    daemon.wait().await;
    Ok(())
}

/// The period for a delay in ms, whatever the value: NaN, negative, infinite or huge values cannot
/// panic here (`Duration::from_secs_f64` does on an infinite one). Between 1 ms and one day.
pub fn period(delay_ms: f64) -> Duration {
    const MAX: Duration = Duration::from_secs(86_400);
    if delay_ms.is_nan() {
        return MAX;
    }
    Duration::try_from_secs_f64(delay_ms / 1000.0)
        .unwrap_or(if delay_ms > 0.0 { MAX } else { Duration::ZERO })
        .clamp(Duration::from_millis(1), MAX)
}

/// Run one round of a task; true when it panicked and should run again (a bug must not silence the
/// monitoring or housekeeping for the rest of the daemon's life), false when it ended or we stop.
async fn restart_after_panic(name: &str, run: impl Future<Output = ()>, cancel: &CancellationToken) -> bool {
    use futures_util::FutureExt;
    match std::panic::AssertUnwindSafe(run).catch_unwind().await {
        Ok(()) => false,
        Err(_) if cancel.is_cancelled() => false,
        Err(_) => {
            warn!(task = name, "task panicked; restarting it");
            tokio::select! {
                _ = cancel.cancelled() => false,
                _ = tokio::time::sleep(Duration::from_millis(100)) => true,
            }
        }
    }
}

/// Publish the status dict every monitoring period, and process events as they come.
async fn publish(
    mut socket: transport::PubSocket,
    state: Arc<ServiceState>,
    mut events: Option<mpsc::Receiver<Value>>,
    cancel: CancellationToken,
) {
    loop {
        let run = publish_once(&mut socket, &state, &mut events, &cancel);
        if !restart_after_panic("monitoring publisher", run, &cancel).await {
            break;
        }
    }
    debug!("monitoring publisher stopped");
}

async fn publish_once(
    socket: &mut transport::PubSocket,
    state: &ServiceState,
    events: &mut Option<mpsc::Receiver<Value>>,
    cancel: &CancellationToken,
) {
    let mut delay_rx = state.mon_delay_ms.subscribe();
    let mut last = tokio::time::Instant::now();
    loop {
        let delay = period(*delay_rx.borrow_and_update());
        let next = last + delay;
        let event = async {
            match events.as_mut() {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = delay_rx.changed() => continue,
            ev = event => match ev {
                Some(v) => send(socket, &v).await,
                None => *events = None,
            },
            _ = tokio::time::sleep_until(next) => {
                last = tokio::time::Instant::now();
                let status = state.status();
                send(socket, &status).await;
            }
        }
    }
}

async fn send(socket: &mut transport::PubSocket, v: &Value) {
    let bytes = codec::encode(v);
    // PUB never blocks: a subscriber that does not read loses messages, not our memory or time.
    if let Err(e) = socket.send(zeromq::ZmqMessage::from(bytes)).await {
        debug!(error = %e, "monitoring publish failed");
    }
}

/// Collect a housekeeping record every period and hand it to storage. A dead storage peer delays the
/// next record, never a request.
async fn run_housekeeping(hk: Housekeeping, state: Arc<ServiceState>, cancel: CancellationToken) {
    loop {
        let run = housekeeping_once(&hk, &state, &cancel);
        if !restart_after_panic("housekeeping", run, &cancel).await {
            break;
        }
    }
}

async fn housekeeping_once(hk: &Housekeeping, state: &ServiceState, cancel: &CancellationToken) {
    let mut delay_rx = state.hk_delay_ms.subscribe();
    let mut last = tokio::time::Instant::now();
    loop {
        let delay = period(*delay_rx.borrow_and_update());
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = delay_rx.changed() => continue,
            _ = tokio::time::sleep_until(last + delay) => {}
        }
        last = tokio::time::Instant::now();
        let started = std::time::Instant::now();
        let record = hk.collect();
        if let Ok(mut avg) = state.get_housekeeping_time.lock() {
            avg.add(started.elapsed().as_secs_f64());
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            r = state.storage.save(record) => if let Err(e) = r {
                warn!(error = %e, "housekeeping record not stored");
            }
        }
    }
}

/// Keep the host address current (it may change; resolving it may block).
async fn refresh_ip(info: Arc<ServerInfo>, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
        if let Ok(Ok(ip)) = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::task::spawn_blocking(crate::util::host_ip),
        )
        .await
        {
            info.set_ip(ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 13, finding 1: no delay value can panic the tasks.
    #[test]
    fn any_delay_makes_a_period() {
        let day = Duration::from_secs(86_400);
        assert_eq!(period(f64::INFINITY), day);
        assert_eq!(period(1e303), day);
        assert_eq!(period(f64::NAN), day);
        assert_eq!(period(f64::NEG_INFINITY), Duration::from_millis(1));
        assert_eq!(period(-5.0), Duration::from_millis(1));
        assert_eq!(period(0.0), Duration::from_millis(1));
        assert_eq!(period(250.0), Duration::from_millis(250));
    }
}
