//! Wiring: builds the daemon's integrations from the configuration.
//!
//! One function per seam, so each integration can evolve on its own: where the Setup comes from
//! ([`setup_source`]), where housekeeping goes ([`storage_sink`]), who must hear that the daemon is up
//! ([`lifecycle_hooks`]), and how clients find a daemon whose ports are dynamic ([`discover_pm`]).
//!
//! Every CGSE core service has an embedded default, so a laptop without them runs: no Configuration
//! Manager → the cached or the local Setup; no Storage Manager → the daily CSV file written directly;
//! no Service Registry → the daemon serves on its ports and keeps trying to register.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use std::collections::HashMap;

use tokio::sync::mpsc;

use tokio_util::sync::CancellationToken;

use crate::cgse::confman::{ConfmanConfig, ConfmanSetup};
use crate::cgse::metrics_hub::{ListProcesses, MetricsSink, ProcessSample};
use crate::cgse::push::{PushConfig, PushTarget, Pusher};
use crate::cgse::registry::{Registration, RegistrationConfig, RegistryLocator, StaleRecordCleaner};
use crate::cgse::signals::SignalWatcher;
use crate::cgse::storage::{HousekeepingSink, LocalCsv};
use crate::cgse::storage_manager::{StorageManagerConfig, StorageManagerSink};
use crate::config::{
    ConfigError, IntegrationSettings, NotifyHubSettings, PeerSettings, PushPeerSettings, RegistrySettings,
};
use crate::controller::{event_value, Controller, PeerStatus, SupervisorCounts};
use crate::daemon::{DaemonConfig, DaemonError, HookFuture, Integrations, Lifecycle};
use crate::housekeeping::Housekeeping;
use crate::monitor::StatusSampler;
use crate::probe::{Locator, NoLocator, Pinger};
use crate::server::Ports;
use crate::setup::{LocalSetup, SetupSource};
use crate::supervisor::{
    PingTarget, ProcessDefinition, ProcessState, ProcessTable, Supervisor, SupervisorConfig, SupervisorHandle,
};
use crate::transport;

/// The process table compiled into the binary.
pub const DEFAULT_PROCESS_TABLE: &str = include_str!("../settings/procman.yaml");

/// The settings group of the Storage Manager in CGSE settings files.
pub const SM_GROUP: &str = "Storage Manager Control Server";
/// The settings group of the Configuration Manager in CGSE settings files.
pub const CM_GROUP: &str = "Configuration Manager Control Server";
/// Where the daemon keeps its registry service id, under [`DaemonConfig::state_dir`].
pub const SERVICE_ID_FILE: &str = "registry-service-id";

/// The CGSE core services, as `get_core_processes` reports them (name → registry service type).
pub const CORE_SERVICES: [(&str, &str); 6] = [
    ("Configuration Manager", "CM_CS"),
    ("Logger", "LOG_CS"),
    ("Metrics Hub", "MH_CS"),
    ("Notification Hub", "NH_CS"),
    ("Process Manager", "PM_CS"),
    ("Storage Manager", "SM_CS"),
];

/// The local Setup (embedded default).
pub fn local_setup(config: &DaemonConfig) -> LocalSetup {
    LocalSetup::new(
        config.procman.setup_file.clone(),
        config.env.conf_data_location(),
        config.env.data_storage_location(),
        config.site_id(),
    )
}

fn integration_settings(config: &DaemonConfig) -> Result<(IntegrationSettings, RegistrySettings), ConfigError> {
    Ok((
        IntegrationSettings::from_settings(&config.settings)?,
        RegistrySettings::from_settings(&config.settings)?,
    ))
}

/// The Configuration Manager source, from the settings.
pub fn confman_config(config: &DaemonConfig) -> Result<ConfmanConfig, ConfigError> {
    let (i, registry) = integration_settings(config)?;
    Ok(ConfmanConfig {
        cm: PeerSettings::from_settings(&config.settings, CM_GROUP, "CM_CS")?,
        registry,
        registry_timeout: i.registry_timeout,
        timeout: i.peer_timeout,
        connect_timeout: i.peer_connect_timeout,
        refresh: i.setup_refresh,
        notify_hub: NotifyHubSettings::from_settings(&config.settings)?,
        // Where cm_cs's `save_last_setup_id` writes (`get_last_setup_id_file_path`).
        last_setup_id_file: config.env.data_storage_location().map(|d| d.join("last_setup_id.txt")),
    })
}

/// Where the current Setup comes from: the Configuration Manager, with the last good Setup and then the
/// local Setup as fallbacks; only the local Setup when the settings for the CM are unusable.
pub async fn setup_source(config: &DaemonConfig) -> Arc<dyn SetupSource> {
    let local = local_setup(config);
    match confman_config(config) {
        Ok(cm) => {
            let source = ConfmanSetup::start(cm, local);
            info!(setup = %source.describe(), "Setup source");
            Arc::new(source)
        }
        Err(e) => {
            warn!(error = %e, setup = %local.describe(), "Configuration Manager settings unusable: local Setup only");
            Arc::new(local)
        }
    }
}

/// The Storage Manager sink, from the settings.
pub fn storage_manager_config(config: &DaemonConfig) -> Result<StorageManagerConfig, ConfigError> {
    let (i, registry) = integration_settings(config)?;
    Ok(StorageManagerConfig {
        sm: PeerSettings::from_settings(&config.settings, SM_GROUP, "SM_CS")?,
        registry,
        registry_timeout: i.registry_timeout,
        timeout: i.peer_timeout,
        connect_timeout: i.peer_connect_timeout,
        origin: config.pm.storage_mnemonic.clone(),
    })
}

/// Where housekeeping records go: the Storage Manager, failing over to the daily CSV file it writes.
pub async fn storage_sink(config: &DaemonConfig) -> Arc<dyn HousekeepingSink> {
    let (data, from_env) = config.data_location();
    if !from_env {
        info!(path = %data.display(), "no CGSE data storage location set: housekeeping goes to local CSV files here");
    }
    let local = LocalCsv::new(data, config.site_id(), config.pm.storage_mnemonic.clone());
    match storage_manager_config(config) {
        Ok(sm) => Arc::new(StorageManagerSink::new(sm, local)),
        Err(e) => {
            warn!(error = %e, "Storage Manager settings unusable: housekeeping goes to local CSV files only");
            Arc::new(local)
        }
    }
}

/// The daemon's registration with the Service Registry, from the settings.
pub fn registration(config: &DaemonConfig) -> Result<Arc<Registration>, ConfigError> {
    let (i, registry) = integration_settings(config)?;
    Ok(Arc::new(Registration::new(RegistrationConfig {
        registry,
        name: config.pm.process_name.clone(),
        service_type: config.pm.service_type.clone(),
        ttl: config.procman.registry_ttl,
        timeout: i.registry_timeout,
        id_file: config.state_dir().join(SERVICE_ID_FILE),
        retry: Duration::from_secs(1),
        host_ip: Arc::new(crate::util::host_ip),
    })))
}

/// Integrations that must know when the daemon starts and stops: the registry registration, and the
/// watcher of CGSE signal files that asks it to re-register.
pub fn lifecycle_hooks(config: &DaemonConfig, registration: Option<Arc<Registration>>) -> Vec<Arc<dyn Lifecycle>> {
    match registration {
        Some(r) => {
            let signals = SignalWatcher::new(
                config.procman.signal_dir.clone(),
                config.pm.process_name.clone(),
                r.clone(),
            );
            vec![r as Arc<dyn Lifecycle>, Arc::new(signals)]
        }
        None => Vec::new(),
    }
}

/// A PUSH peer's sender configuration from its settings group.
fn push_config(
    config: &DaemonConfig,
    peer: &str,
    group: &str,
    default_type: &str,
    port_key: &str,
    metadata_key: &str,
    queue: usize,
) -> Result<PushConfig, ConfigError> {
    let (i, registry) = integration_settings(config)?;
    let p = PushPeerSettings::from_settings(&config.settings, group, default_type, port_key)?;
    Ok(PushConfig {
        target: PushTarget {
            peer: peer.to_owned(),
            hostname: p.hostname,
            port: p.port,
            service_type: p.service_type,
            metadata_key: metadata_key.to_owned(),
            registry,
            registry_timeout: i.registry_timeout,
        },
        queue,
        connect_timeout: i.peer_connect_timeout,
        send_timeout: i.peer_timeout,
        retry: Duration::from_secs(1),
    })
}

/// Our log records also go to the CGSE Logger (`log_cs`); its status line for `pm_cs status`.
pub fn remote_logging(config: &DaemonConfig) -> Option<PeerStatus> {
    if let Some(f) = crate::cgse::logger::installed() {
        // An earlier daemon in this process installed it (tests): report that one.
        let p = f.pusher.clone();
        return Some(Arc::new(move || p.describe()));
    }
    let group = crate::cgse::logger::GROUP;
    match push_config(
        config,
        "Logger",
        group,
        "LOG_CS",
        "RECEIVER_PORT",
        "receiver_port",
        config.procman.log_queue,
    ) {
        Ok(pc) => {
            let pusher = Pusher::start(pc, CancellationToken::new());
            let status = pusher.clone();
            crate::cgse::logger::install(crate::cgse::logger::Forward {
                pusher,
                process_name: config.pm.process_name.clone(),
            });
            Some(Arc::new(move || status.describe()))
        }
        Err(e) => {
            warn!(error = %e, "Logging Control Server settings unusable: logs stay local");
            None
        }
    }
}

/// Housekeeping also goes to the CGSE Metrics Hub: `storage` wrapped so every record becomes data points.
pub fn with_metrics(
    config: &DaemonConfig,
    storage: Arc<dyn HousekeepingSink>,
    supervisor: &SupervisorHandle,
) -> (Arc<dyn HousekeepingSink>, Option<PeerStatus>) {
    let group = crate::cgse::metrics_hub::GROUP;
    match push_config(
        config,
        "Metrics Hub",
        group,
        "MH_CS",
        "COLLECTOR_PORT",
        "collector_port",
        config.procman.metrics_queue,
    ) {
        Ok(pc) => {
            let pusher = Pusher::start(pc, CancellationToken::new());
            let handle = supervisor.clone();
            let list: ListProcesses = Arc::new(move || handle.list().1.iter().map(ProcessSample::from).collect());
            let sink = Arc::new(MetricsSink::new(
                storage,
                pusher.clone(),
                config.pm.storage_mnemonic.clone(),
                config.site_id(),
                Some(list),
            ));
            (sink, Some(Arc::new(move || pusher.describe())))
        }
        Err(e) => {
            warn!(error = %e, "Metrics Hub settings unusable: housekeeping goes to storage only");
            (storage, None)
        }
    }
}

/// Gives the last log records a moment to reach the Logger at shutdown.
struct LoggerFlush;

impl Lifecycle for LoggerFlush {
    fn started(&self, _ports: Ports) -> HookFuture<'_> {
        Box::pin(async {})
    }

    fn stopping(&self) -> HookFuture<'_> {
        Box::pin(crate::cgse::logger::flush(Duration::from_millis(300)))
    }

    fn runs_last(&self) -> bool {
        true
    }
}

/// How control servers are located by service type: the Service Registry (`discover`).
pub async fn locator(config: &DaemonConfig) -> Arc<dyn Locator> {
    match integration_settings(config) {
        Ok((i, registry)) => Arc::new(RegistryLocator::new(registry, i.registry_timeout)),
        Err(e) => {
            warn!(error = %e, "Service Registry settings unusable: services cannot be located by type");
            Arc::new(NoLocator)
        }
    }
}

/// The process table: `Procman.PROCESS_TABLE`, else the embedded one.
pub fn process_table(config: &DaemonConfig) -> Result<ProcessTable, DaemonError> {
    match &config.procman.process_table {
        Some(p) => ProcessTable::load(p),
        None => ProcessTable::from_yaml(DEFAULT_PROCESS_TABLE, "the embedded settings/procman.yaml"),
    }
    .map_err(|e| DaemonError::Setup(e.to_string()))
}

/// Commanding endpoints of the core services whose ports the settings give.
fn core_endpoints(config: &DaemonConfig) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for (name, group, ty) in [
        ("Storage Manager", "Storage Manager Control Server", "SM_CS"),
        ("Configuration Manager", "Configuration Manager Control Server", "CM_CS"),
    ] {
        if let Ok(p) = PeerSettings::from_settings(&config.settings, group, ty) {
            if p.commanding_port != 0 {
                if let Ok(ep) = transport::client_endpoint("tcp", &p.hostname, p.commanding_port) {
                    out.insert(name.to_owned(), ep);
                }
            }
        }
    }
    out
}

/// Stops (or leaves running, for re-adoption) the managed processes at daemon exit.
struct SupervisorLifecycle {
    handle: SupervisorHandle,
    stop_children: bool,
}

impl Lifecycle for SupervisorLifecycle {
    fn started(&self, _ports: Ports) -> HookFuture<'_> {
        Box::pin(async {})
    }

    fn stopping(&self) -> HookFuture<'_> {
        Box::pin(async move { self.handle.shutdown(self.stop_children).await })
    }
}

/// `get_core_processes`: the CGSE core services, with the service types the process table gives.
fn core_processes(table: &ProcessTable) -> Vec<(String, String)> {
    let mut core: Vec<(String, String)> = CORE_SERVICES
        .iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect();
    for (name, ty) in table.core_service_types() {
        if let Some(ty) = ty {
            match core.iter_mut().find(|(n, _)| *n == name) {
                Some(e) => e.1 = ty,
                None => core.push((name, ty)),
            }
        }
    }
    core.sort();
    core
}

/// Build the integrations for a daemon run.
pub async fn integrations(config: &DaemonConfig) -> Result<Integrations, DaemonError> {
    let sampler = Arc::new(StatusSampler::new());
    let table = Arc::new(process_table(config)?);
    let pinger = Pinger::new(locator(config).await, Duration::from_secs(1));
    let state_dir = config.state_dir().join("supervisor");
    let log_dir = config.log_location().join("procman");
    let (ev_tx, mut ev_rx) = mpsc::channel(4096);
    let mut sup_config = SupervisorConfig::new(&state_dir, &log_dir);
    sup_config.log.max_bytes = config.procman.log_max_bytes;
    sup_config.log.backups = config.procman.log_backups;
    sup_config.log.tail_lines = config.procman.log_tail_lines;
    sup_config.max_client_processes = config.procman.max_client_processes;
    let supervisor = Supervisor::spawn(sup_config, Vec::new(), ev_tx, Some(Arc::new(pinger.clone())))
        .map_err(|e| DaemonError::Setup(format!("process supervisor: {e}")))?;
    info!(state = %state_dir.display(), logs = %log_dir.display(), "process supervisor ready");
    let registration = match registration(config) {
        Ok(r) => Some(r),
        Err(e) => {
            warn!(error = %e, "Service Registry settings unusable: the daemon will not register");
            None
        }
    };
    let registry_port = integration_settings(config).ok().map(|(i, registry)| {
        // Before a CGSE service is restarted, the stale record of the instance just reaped goes.
        let port = registry.requester_port;
        supervisor.set_restart_hook(Arc::new(StaleRecordCleaner::new(registry, i.registry_timeout)));
        port
    });
    // Supervisor events become monitoring messages; the Service Registry we run becoming ready is our cue to
    // register at once.
    let (out_tx, out_rx) = mpsc::channel(4096);
    let (events_sup, events_registration) = (supervisor.clone(), registration.clone());
    tokio::spawn(async move {
        while let Some(e) = ev_rx.recv().await {
            if e.new_state == ProcessState::Running {
                if let (Some(r), Some(def)) = (&events_registration, events_sup.definition(&e.id)) {
                    if is_service_registry(&def, registry_port) {
                        info!(process = %e.id, "the Service Registry is ready: registering now");
                        r.retry_now();
                    }
                }
            }
            if out_tx.send(event_value(&e)).await.is_err() {
                break;
            }
        }
    });
    let self_names = vec![
        "Process Manager".to_owned(),
        config.pm.service_type.clone(),
        config.pm.process_name.clone(),
    ];
    let setup = setup_source(config).await;
    let logger = remote_logging(config);
    let (storage, metrics) = with_metrics(config, storage_sink(config).await, &supervisor);
    let mut lifecycle = lifecycle_hooks(config, registration);
    let controller = Controller::new(
        core_processes(&table),
        setup.clone(),
        table,
        config.procman.process_table.clone(),
        supervisor.clone(),
        pinger,
        core_endpoints(config),
        self_names,
    )
    .with_integration_status(lifecycle.clone(), storage.clone());
    let controller = match logger {
        Some(s) => controller.with_peer_status("logger", s),
        None => controller,
    };
    let controller = match metrics {
        Some(s) => controller.with_peer_status("metrics", s),
        None => controller,
    };
    let controller = Arc::new(controller);
    controller.define_all_in_background();
    lifecycle.push(Arc::new(SupervisorLifecycle {
        handle: supervisor.clone(),
        stop_children: config.procman.stop_children_on_exit,
    }));
    lifecycle.push(Arc::new(LoggerFlush));
    Ok(Integrations {
        commanding: controller,
        storage,
        housekeeping: Housekeeping::new(sampler.clone(), Some(Arc::new(SupervisorCounts(supervisor)))),
        lifecycle,
        events: Some(out_rx),
        sampler,
    })
}

/// Whether a managed process is the Service Registry the daemon registers with: its readiness is a TCP
/// connection to the registry's request port, or it is named `Service Registry`.
fn is_service_registry(def: &ProcessDefinition, registry_port: Option<u16>) -> bool {
    let by_port = matches!(
        (&def.readiness, registry_port),
        (Some(r), Some(p)) if matches!(r.ping, PingTarget::Tcp { port, .. } if port == p)
    );
    by_port || def.id == "Service Registry"
}

/// Why a Process Manager with dynamic ports could not be found.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The settings could not be read.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The registry does not know it (or does not answer).
    #[error("No service registered as '{service_type}' and no port provided ({source})")]
    NotRegistered {
        /// The service type looked up.
        service_type: String,
        /// The registry's answer.
        source: crate::cgse::registry::RegistryError,
    },
    /// Its record lacks the service port.
    #[error("the registry record {record} of '{service_type}' has no metadata.service_port")]
    NoServicePort {
        /// The record's id.
        record: String,
        /// The service type looked up.
        service_type: String,
    },
    /// The record's host does not resolve.
    #[error(transparent)]
    Endpoint(#[from] crate::transport::TransportError),
}

/// Find a running Process Manager whose ports are dynamic: (commanding, service) endpoints, from its
/// registry record (`host`:`port`, and `metadata.service_port`).
pub async fn discover_pm(config: &DaemonConfig) -> Result<(String, String), DiscoveryError> {
    let (i, registry) = integration_settings(config)?;
    let service_type = &config.pm.service_type;
    let record = crate::cgse::registry::discover(&registry, service_type, i.registry_timeout)
        .await
        .map_err(|source| DiscoveryError::NotRegistered {
            service_type: service_type.clone(),
            source,
        })?;
    let service_port = record
        .metadata_port("service_port")
        .ok_or_else(|| DiscoveryError::NoServicePort {
            record: record.id.clone(),
            service_type: service_type.clone(),
        })?;
    let commanding = record.endpoint(record.port).await?;
    let service = record.endpoint(service_port).await?;
    Ok((commanding, service))
}
