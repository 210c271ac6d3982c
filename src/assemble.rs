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

use crate::config::{ConfigError, IntegrationSettings, NotifyHubSettings, PeerSettings, RegistrySettings};
use crate::confman::{ConfmanConfig, ConfmanSetup};
use crate::controller::{event_value, Controller, SupervisorCounts};
use crate::daemon::{DaemonConfig, DaemonError, HookFuture, Integrations, Lifecycle};
use crate::housekeeping::Housekeeping;
use crate::monitor::StatusSampler;
use crate::probe::{Locator, NoLocator, Pinger};
use crate::registry::{Registration, RegistrationConfig, RegistryLocator};
use crate::server::Ports;
use crate::setup::{LocalSetup, SetupSource};
use crate::storage::{HousekeepingSink, LocalCsv};
use crate::storage_manager::{StorageManagerConfig, StorageManagerSink};
use crate::supervisor::{ProcessTable, Supervisor, SupervisorConfig, SupervisorHandle};
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

/// Integrations that must know when the daemon starts and stops: the registry registration.
pub async fn lifecycle_hooks(config: &DaemonConfig) -> Vec<Arc<dyn Lifecycle>> {
    match registration(config) {
        Ok(r) => vec![r as Arc<dyn Lifecycle>],
        Err(e) => {
            warn!(error = %e, "Service Registry settings unusable: the daemon will not register");
            Vec::new()
        }
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
    let supervisor = Supervisor::spawn(sup_config, Vec::new(), ev_tx, Some(Arc::new(pinger.clone())))
        .map_err(|e| DaemonError::Setup(format!("process supervisor: {e}")))?;
    info!(state = %state_dir.display(), logs = %log_dir.display(), "process supervisor ready");
    // Supervisor events become monitoring messages.
    let (out_tx, out_rx) = mpsc::channel(4096);
    tokio::spawn(async move {
        while let Some(e) = ev_rx.recv().await {
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
    let storage = storage_sink(config).await;
    let mut lifecycle = lifecycle_hooks(config).await;
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
    controller.define_all().await;
    lifecycle.push(Arc::new(SupervisorLifecycle {
        handle: supervisor.clone(),
        stop_children: config.procman.stop_children_on_exit,
    }));
    Ok(Integrations {
        commanding: Arc::new(controller),
        storage,
        housekeeping: Housekeeping::new(sampler.clone(), Some(Arc::new(SupervisorCounts(supervisor)))),
        lifecycle,
        events: Some(out_rx),
        sampler,
    })
}

/// Find a running Process Manager whose ports are dynamic: (commanding, service) endpoints, from its
/// registry record (`host`:`port`, and `metadata.service_port`).
pub async fn discover_pm(config: &DaemonConfig) -> Result<(String, String), String> {
    let (i, registry) = integration_settings(config).map_err(|e| e.to_string())?;
    let service_type = &config.pm.service_type;
    let record = crate::registry::discover(&registry, service_type, i.registry_timeout)
        .await
        .map_err(|e| format!("No service registered as '{service_type}' and no port provided ({e})"))?;
    let service_port = record.metadata_port("service_port").ok_or_else(|| {
        format!(
            "the registry record {} of '{service_type}' has no metadata.service_port",
            record.id
        )
    })?;
    let endpoint = |port| record.endpoint(port).map_err(|e| e.to_string());
    Ok((endpoint(record.port)?, endpoint(service_port)?))
}
