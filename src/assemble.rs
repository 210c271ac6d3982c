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

use crate::config::{ConfigError, IntegrationSettings, NotifyHubSettings, PeerSettings, RegistrySettings};
use crate::confman::{ConfmanConfig, ConfmanSetup};
use crate::controller::Controller;
use crate::daemon::{DaemonConfig, DaemonError, Integrations, Lifecycle};
use crate::housekeeping::Housekeeping;
use crate::monitor::StatusSampler;
use crate::registry::{Registration, RegistrationConfig};
use crate::setup::{LocalSetup, SetupSource};
use crate::storage::{HousekeepingSink, LocalCsv};
use crate::storage_manager::{StorageManagerConfig, StorageManagerSink};

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
