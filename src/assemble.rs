//! Wiring: builds the daemon's integrations from the configuration.
//!
//! One function per seam, so each integration can evolve on its own: where the Setup comes from
//! ([`setup_source`]), where housekeeping goes ([`storage_sink`]), who must hear that the daemon is up
//! ([`lifecycle_hooks`]), and how clients find a daemon whose ports are dynamic ([`discover_pm`]).

use std::sync::Arc;

use tracing::info;

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::config::PeerSettings;
use crate::controller::{event_value, Controller, SupervisorCounts};
use crate::daemon::{DaemonConfig, DaemonError, HookFuture, Integrations, Lifecycle};
use crate::housekeeping::Housekeeping;
use crate::monitor::StatusSampler;
use crate::probe::{Locator, NoLocator, Pinger};
use crate::server::Ports;
use crate::setup::{LocalSetup, SetupSource};
use crate::storage::{HousekeepingSink, LocalCsv};
use crate::supervisor::{ProcessTable, Supervisor, SupervisorConfig, SupervisorHandle};
use crate::transport;

/// The process table compiled into the binary.
pub const DEFAULT_PROCESS_TABLE: &str = include_str!("../settings/procman.yaml");

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

/// Where the current Setup comes from.
pub async fn setup_source(config: &DaemonConfig) -> Arc<dyn SetupSource> {
    let local = local_setup(config);
    info!(setup = %local.describe(), "Setup source");
    Arc::new(local)
}

/// Where housekeeping records go.
pub async fn storage_sink(config: &DaemonConfig) -> Arc<dyn HousekeepingSink> {
    let (data, from_env) = config.data_location();
    if !from_env {
        info!(path = %data.display(), "no CGSE data storage location set: housekeeping goes to local CSV files here");
    }
    Arc::new(LocalCsv::new(
        data,
        config.site_id(),
        config.pm.storage_mnemonic.clone(),
    ))
}

/// Integrations that must know when the daemon starts and stops.
pub async fn lifecycle_hooks(_config: &DaemonConfig) -> Vec<Arc<dyn Lifecycle>> {
    Vec::new()
}

/// How control servers are located by service type (the registry, when there is one).
pub async fn locator(_config: &DaemonConfig) -> Arc<dyn Locator> {
    Arc::new(NoLocator)
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
    let supervisor = Supervisor::spawn(
        SupervisorConfig::new(&state_dir, &log_dir),
        Vec::new(),
        ev_tx,
        Some(Arc::new(pinger.clone())),
    )
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
    let controller = Controller::new(
        core_processes(&table),
        setup_source(config).await,
        table,
        config.procman.process_table.clone(),
        supervisor.clone(),
        pinger,
        core_endpoints(config),
        self_names,
    );
    controller.define_all().await;
    let mut lifecycle = lifecycle_hooks(config).await;
    lifecycle.push(Arc::new(SupervisorLifecycle {
        handle: supervisor.clone(),
        stop_children: config.procman.stop_children_on_exit,
    }));
    Ok(Integrations {
        commanding: Arc::new(controller),
        storage: storage_sink(config).await,
        housekeeping: Housekeeping::new(sampler.clone(), Some(Arc::new(SupervisorCounts(supervisor)))),
        lifecycle,
        events: Some(out_rx),
        sampler,
    })
}

/// Find a running Process Manager whose ports are dynamic: (commanding, service) endpoints.
pub async fn discover_pm(_config: &DaemonConfig) -> Result<(String, String), String> {
    Err("ports are 0 (dynamic) and the Service Registry client is not available".into())
}
