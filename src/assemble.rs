//! Wiring: builds the daemon's integrations from the configuration.

use std::sync::Arc;

use tracing::info;

use crate::controller::Controller;
use crate::daemon::{DaemonConfig, DaemonError, Integrations};
use crate::housekeeping::Housekeeping;
use crate::monitor::StatusSampler;
use crate::storage::LocalCsv;

/// The CGSE core services, as `get_core_processes` reports them (name → registry service type).
pub const CORE_SERVICES: [(&str, &str); 6] = [
    ("Configuration Manager", "CM_CS"),
    ("Logger", "LOG_CS"),
    ("Metrics Hub", "MH_CS"),
    ("Notification Hub", "NH_CS"),
    ("Process Manager", "PM_CS"),
    ("Storage Manager", "SM_CS"),
];

/// Build the integrations for a daemon run.
pub async fn integrations(config: &DaemonConfig) -> Result<Integrations, DaemonError> {
    let sampler = Arc::new(StatusSampler::new());
    let (data, from_env) = config.data_location();
    if !from_env {
        info!(path = %data.display(), "no CGSE data storage location set: housekeeping goes to local CSV files here");
    }
    let storage = Arc::new(LocalCsv::new(
        data,
        config.site_id(),
        config.pm.storage_mnemonic.clone(),
    ));
    let core = CORE_SERVICES
        .iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect();
    Ok(Integrations {
        commanding: Arc::new(Controller::new(core, config.procman.setup_file.clone())),
        storage,
        housekeeping: Housekeeping::new(sampler.clone(), None),
        lifecycle: Vec::new(),
        events: None,
        sampler,
    })
}

/// Find a running Process Manager whose ports are dynamic: (commanding, service) endpoints.
pub async fn discover_pm(_config: &DaemonConfig) -> Result<(String, String), String> {
    Err("ports are 0 (dynamic) and the Service Registry client is not available".into())
}
