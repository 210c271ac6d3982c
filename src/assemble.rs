//! Wiring: builds the daemon's integrations from the configuration.
//!
//! One function per seam, so each integration can evolve on its own: where the Setup comes from
//! ([`setup_source`]), where housekeeping goes ([`storage_sink`]), who must hear that the daemon is up
//! ([`lifecycle_hooks`]), and how clients find a daemon whose ports are dynamic ([`discover_pm`]).

use std::sync::Arc;

use tracing::info;

use crate::controller::Controller;
use crate::daemon::{DaemonConfig, DaemonError, Integrations, Lifecycle};
use crate::housekeeping::Housekeeping;
use crate::monitor::StatusSampler;
use crate::setup::{LocalSetup, SetupSource};
use crate::storage::{HousekeepingSink, LocalCsv};

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

/// Build the integrations for a daemon run.
pub async fn integrations(config: &DaemonConfig) -> Result<Integrations, DaemonError> {
    let sampler = Arc::new(StatusSampler::new());
    let core = CORE_SERVICES
        .iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect();
    Ok(Integrations {
        commanding: Arc::new(Controller::new(core, setup_source(config).await)),
        storage: storage_sink(config).await,
        housekeeping: Housekeeping::new(sampler.clone(), None),
        lifecycle: lifecycle_hooks(config).await,
        events: None,
        sampler,
    })
}

/// Find a running Process Manager whose ports are dynamic: (commanding, service) endpoints.
pub async fn discover_pm(_config: &DaemonConfig) -> Result<(String, String), String> {
    Err("ports are 0 (dynamic) and the Service Registry client is not available".into())
}
