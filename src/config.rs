//! Settings and environment, resolved the way CGSE resolves them.
//!
//! The defaults (`settings/settings.yaml`) are compiled in. A local settings file — named by the
//! `<PROJECT>_LOCAL_SETTINGS` environment variable, or given explicitly — is merged over them group by
//! group and key by key, as `egse.settings.Settings.load` does. This is the only module that reads
//! settings files or CGSE environment variables; everything else receives plain typed values.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value as Json};

/// The compiled-in default settings.
pub const DEFAULT_SETTINGS_YAML: &str = include_str!("../settings/settings.yaml");

/// The group of the Process Manager in CGSE settings files.
pub const PM_GROUP: &str = "Process Manager Control Server";
/// The group of procman's own settings.
pub const PROCMAN_GROUP: &str = "Procman";

/// Why settings could not be loaded or a value is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A settings file could not be read.
    #[error("cannot read settings file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A settings file is not valid YAML.
    #[error("settings file {path} is not valid YAML: {reason}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message.
        reason: String,
    },
    /// A settings file's top level is not a mapping of groups.
    #[error("settings file {path} must contain a mapping of groups at the top level")]
    NotAMapping {
        /// The file.
        path: String,
    },
    /// A key is present but its value is unusable (wrong type or out of range).
    #[error("settings key '{group}.{key}' (from {source_file}) {problem}")]
    BadValue {
        /// The settings group.
        group: String,
        /// The key within the group.
        key: String,
        /// The file the value came from.
        source_file: String,
        /// What is wrong with the value.
        problem: String,
    },
    /// A required key is in neither the embedded defaults nor the local settings file.
    #[error("settings key '{group}.{key}' is missing (looked in {sources})")]
    Missing {
        /// The settings group.
        group: String,
        /// The key within the group.
        key: String,
        /// The files that were searched.
        sources: String,
    },
    /// `<PROJECT>_LOCAL_SETTINGS` names a file that does not exist.
    #[error("the environment variable {var} names the local settings file {path}, which does not exist")]
    LocalSettingsMissing {
        /// The environment variable's name.
        var: String,
        /// The file it names.
        path: PathBuf,
    },
}

/// Where a settings value came from, for error messages.
const EMBEDDED: &str = "the embedded defaults (settings/settings.yaml)";

/// All settings groups after merging, with the file each key came from.
#[derive(Debug, Clone)]
pub struct Settings {
    groups: Map<String, Json>,
    provenance: HashMap<(String, String), String>,
    local_file: Option<PathBuf>,
}

impl Settings {
    /// The embedded defaults only.
    pub fn defaults() -> Result<Settings, ConfigError> {
        let mut s = Settings {
            groups: Map::new(),
            provenance: HashMap::new(),
            local_file: None,
        };
        s.merge_yaml(DEFAULT_SETTINGS_YAML, EMBEDDED)?;
        Ok(s)
    }

    /// Defaults, then the local settings file: `explicit` if given, else the file named by
    /// `<PROJECT>_LOCAL_SETTINGS` (PROJECT defaults to `CGSE`). A named file that does not exist is an error.
    pub fn load(explicit: Option<&Path>, env: &Env) -> Result<Settings, ConfigError> {
        let mut s = Settings::defaults()?;
        let local = match explicit {
            Some(p) => Some((p.to_path_buf(), "--settings".to_owned())),
            None => env.local_settings.clone().map(|p| (p, env.var_name("LOCAL_SETTINGS"))),
        };
        if let Some((path, var)) = local {
            if !path.exists() {
                return Err(ConfigError::LocalSettingsMissing { var, path });
            }
            let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            s.merge_yaml(&text, &path.display().to_string())?;
            s.local_file = Some(path);
        }
        Ok(s)
    }

    /// Merge one YAML document over the current groups (nested mappings merge, everything else replaces).
    pub fn merge_yaml(&mut self, text: &str, source: &str) -> Result<(), ConfigError> {
        let doc: Json = if text.trim().is_empty() {
            Json::Object(Map::new())
        } else {
            serde_saphyr::from_str(text).map_err(|e| ConfigError::Parse {
                path: source.to_owned(),
                reason: e.to_string(),
            })?
        };
        let doc = match doc {
            Json::Object(m) => m,
            Json::Null => Map::new(),
            _ => {
                return Err(ConfigError::NotAMapping {
                    path: source.to_owned(),
                })
            }
        };
        for (group, value) in doc {
            if let Json::Object(keys) = &value {
                for key in keys.keys() {
                    self.provenance.insert((group.clone(), key.clone()), source.to_owned());
                }
            }
            match (self.groups.get_mut(&group), value) {
                (Some(Json::Object(existing)), Json::Object(new)) => merge_maps(existing, new),
                (_, value) => {
                    self.groups.insert(group, value);
                }
            }
        }
        Ok(())
    }

    /// The local settings file in effect, if any.
    pub fn local_file(&self) -> Option<&Path> {
        self.local_file.as_deref()
    }

    /// All merged groups (for the Python module's `settings`).
    pub fn groups(&self) -> &Map<String, Json> {
        &self.groups
    }

    /// One group's mapping.
    pub fn group(&self, group: &str) -> Option<&Map<String, Json>> {
        self.groups.get(group).and_then(Json::as_object)
    }

    fn raw(&self, group: &str, key: &str) -> Option<&Json> {
        self.group(group).and_then(|g| g.get(key))
    }

    fn source_of(&self, group: &str, key: &str) -> String {
        self.provenance
            .get(&(group.to_owned(), key.to_owned()))
            .cloned()
            .unwrap_or_else(|| EMBEDDED.to_owned())
    }

    fn sources(&self) -> String {
        match &self.local_file {
            Some(p) => format!("{EMBEDDED} and {}", p.display()),
            None => EMBEDDED.to_owned(),
        }
    }

    fn bad(&self, group: &str, key: &str, problem: String) -> ConfigError {
        ConfigError::BadValue {
            group: group.to_owned(),
            key: key.to_owned(),
            source_file: self.source_of(group, key),
            problem,
        }
    }

    fn missing(&self, group: &str, key: &str) -> ConfigError {
        ConfigError::Missing {
            group: group.to_owned(),
            key: key.to_owned(),
            sources: self.sources(),
        }
    }

    /// A string value; numbers are accepted and printed, as Python settings code would use them.
    pub fn string(&self, group: &str, key: &str) -> Result<String, ConfigError> {
        match self.raw(group, key) {
            Some(Json::String(s)) => Ok(s.clone()),
            Some(Json::Number(n)) => Ok(n.to_string()),
            Some(Json::Bool(b)) => Ok(b.to_string()),
            Some(other) => Err(self.bad(group, key, format!("has value {other}, expected a string"))),
            None => Err(self.missing(group, key)),
        }
    }

    /// A string value, or `default` when the key is absent.
    pub fn string_or(&self, group: &str, key: &str, default: &str) -> Result<String, ConfigError> {
        match self.raw(group, key) {
            None | Some(Json::Null) => Ok(default.to_owned()),
            Some(_) => self.string(group, key),
        }
    }

    /// A TCP port (0 = OS-assigned).
    pub fn port(&self, group: &str, key: &str) -> Result<u16, ConfigError> {
        let v = self.raw(group, key).ok_or_else(|| self.missing(group, key))?;
        json_u64(v)
            .and_then(|n| u16::try_from(n).ok())
            .ok_or_else(|| self.bad(group, key, format!("has value {v}, expected a port number 0-65535")))
    }

    /// A port, or `default` when the key is absent.
    pub fn port_or(&self, group: &str, key: &str, default: u16) -> Result<u16, ConfigError> {
        match self.raw(group, key) {
            None | Some(Json::Null) => Ok(default),
            Some(_) => self.port(group, key),
        }
    }

    /// A non-negative number of seconds.
    pub fn seconds(&self, group: &str, key: &str) -> Result<Duration, ConfigError> {
        let v = self.raw(group, key).ok_or_else(|| self.missing(group, key))?;
        json_f64(v)
            .filter(|f| f.is_finite() && *f >= 0.0 && *f < 1e9)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| self.bad(group, key, format!("has value {v}, expected a number of seconds >= 0")))
    }

    /// A boolean (YAML `true`/`false`, also `yes`/`no` as PyYAML reads them).
    pub fn boolean(&self, group: &str, key: &str) -> Result<bool, ConfigError> {
        match self.raw(group, key) {
            Some(Json::Bool(b)) => Ok(*b),
            Some(Json::String(s)) if matches!(s.to_ascii_lowercase().as_str(), "true" | "yes" | "on" | "1") => Ok(true),
            Some(Json::String(s)) if matches!(s.to_ascii_lowercase().as_str(), "false" | "no" | "off" | "0") => {
                Ok(false)
            }
            Some(other) => Err(self.bad(group, key, format!("has value {other}, expected true or false"))),
            None => Err(self.missing(group, key)),
        }
    }

    /// A list of strings: a YAML list, or one string of comma-separated items; absent or null = empty.
    pub fn string_list(&self, group: &str, key: &str) -> Result<Vec<String>, ConfigError> {
        let items: Vec<String> = match self.raw(group, key) {
            None | Some(Json::Null) => Vec::new(),
            Some(Json::String(s)) => s.split(',').map(str::to_owned).collect(),
            Some(Json::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Json::String(s) => Ok(s.clone()),
                    Json::Number(n) => Ok(n.to_string()),
                    other => Err(self.bad(group, key, format!("has item {other}, expected strings"))),
                })
                .collect::<Result<_, _>>()?,
            Some(other) => return Err(self.bad(group, key, format!("has value {other}, expected a list of strings"))),
        };
        Ok(items
            .into_iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect())
    }

    /// A positive count.
    pub fn count(&self, group: &str, key: &str) -> Result<usize, ConfigError> {
        let v = self.raw(group, key).ok_or_else(|| self.missing(group, key))?;
        json_u64(v)
            .filter(|n| *n > 0)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| self.bad(group, key, format!("has value {v}, expected a positive integer")))
    }
}

fn merge_maps(into: &mut Map<String, Json>, from: Map<String, Json>) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(Json::Object(a)), Json::Object(b)) => merge_maps(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

fn json_u64(v: &Json) -> Option<u64> {
    match v {
        Json::Number(n) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0).map(|f| f as u64)),
        Json::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn json_f64(v: &Json) -> Option<f64> {
    match v {
        Json::Number(n) => n.as_f64(),
        Json::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// The CGSE environment variables, read once.
#[derive(Debug, Clone, Default)]
pub struct Env {
    /// `PROJECT` (defaults to `CGSE`, with a note in the log).
    pub project: String,
    /// Whether `PROJECT` was set (false: `project` is the default `CGSE`).
    pub project_was_set: bool,
    /// `SITE_ID`.
    pub site_id: Option<String>,
    /// `<P>_DATA_STORAGE_LOCATION`, without the site suffix rule applied.
    pub data_storage_location: Option<PathBuf>,
    /// `<P>_CONF_DATA_LOCATION`.
    pub conf_data_location: Option<PathBuf>,
    /// `<P>_LOG_FILE_LOCATION`.
    pub log_file_location: Option<PathBuf>,
    /// `<P>_LOCAL_SETTINGS`.
    pub local_settings: Option<PathBuf>,
}

impl Env {
    /// Read the process environment.
    pub fn from_process() -> Env {
        Env::from_lookup(|k| std::env::var(k).ok())
    }

    /// Read from any lookup function (tests pass a map).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Env {
        let non_empty = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let (project, project_was_set) = match non_empty("PROJECT") {
            Some(p) => (p, true),
            None => ("CGSE".to_owned(), false),
        };
        let path = |name: &str| non_empty(&format!("{project}_{name}")).map(PathBuf::from);
        Env {
            site_id: non_empty("SITE_ID"),
            data_storage_location: path("DATA_STORAGE_LOCATION"),
            conf_data_location: path("CONF_DATA_LOCATION"),
            log_file_location: path("LOG_FILE_LOCATION"),
            local_settings: path("LOCAL_SETTINGS"),
            project,
            project_was_set,
        }
    }

    /// The full name of a project variable, e.g. `CGSE_LOCAL_SETTINGS`.
    pub fn var_name(&self, name: &str) -> String {
        format!("{}_{name}", self.project)
    }

    /// `get_data_storage_location()`: the variable, trailing `/` stripped, with `/<SITE_ID>` appended
    /// unless it already ends with the site id.
    pub fn data_storage_location(&self) -> Option<PathBuf> {
        let base = self.data_storage_location.as_ref()?;
        let s = base.to_string_lossy();
        let trimmed = s.trim_end_matches('/');
        let trimmed = if trimmed.is_empty() { "/" } else { trimmed };
        match &self.site_id {
            Some(site) if !trimmed.ends_with(site.as_str()) => Some(Path::new(trimmed).join(site)),
            _ => Some(PathBuf::from(trimmed)),
        }
    }

    /// `get_conf_data_location()`: the variable, else `<data storage location>/conf`.
    pub fn conf_data_location(&self) -> Option<PathBuf> {
        self.conf_data_location
            .clone()
            .or_else(|| self.data_storage_location().map(|d| d.join("conf")))
    }

    /// `get_log_file_location()`: the variable, else `<data storage location>/log`.
    pub fn log_file_location(&self) -> Option<PathBuf> {
        self.log_file_location
            .clone()
            .or_else(|| self.data_storage_location().map(|d| d.join("log")))
    }
}

/// Typed settings of the Process Manager control server.
#[derive(Debug, Clone, PartialEq)]
pub struct PmSettings {
    /// `SERVICE_TYPE`: the type under which the daemon registers with the Service Registry.
    pub service_type: String,
    /// `PROCESS_NAME`: the process name (also the prefix of its CGSE signal files).
    pub process_name: String,
    /// `PROTOCOL`: the transport of the three sockets (`tcp`).
    pub protocol: String,
    /// `HOSTNAME`: where clients reach the daemon (the daemon binds `Procman.BIND_ADDRESS`).
    pub hostname: String,
    /// `COMMANDING_PORT`: the REQ-REP commanding port; 0 = OS-assigned.
    pub commanding_port: u16,
    /// `MONITORING_PORT`: the PUB port for status and process events; 0 = OS-assigned.
    pub monitoring_port: u16,
    /// `SERVICE_PORT`: the REQ-REP service (administration) port; 0 = OS-assigned.
    pub service_port: u16,
    /// `STORAGE_MNEMONIC`: the origin of the housekeeping records.
    pub storage_mnemonic: String,
    /// Monitoring period (`DELAY`, seconds in the file).
    pub monitoring_delay: Duration,
    /// `PROXY_TIMEOUT`: the default reply timeout of `ProcessManagerProxy` (seconds in the file).
    pub proxy_timeout: Duration,
}

impl PmSettings {
    /// Read group `Process Manager Control Server`; `DELAY` must be > 0.
    pub fn from_settings(s: &Settings) -> Result<PmSettings, ConfigError> {
        let g = PM_GROUP;
        let delay = s.seconds(g, "DELAY")?;
        if delay.is_zero() {
            return Err(s.bad(g, "DELAY", "is 0, expected a monitoring period > 0 seconds".into()));
        }
        Ok(PmSettings {
            service_type: s.string_or(g, "SERVICE_TYPE", "PM_CS")?,
            process_name: s.string_or(g, "PROCESS_NAME", "pm_cs")?,
            protocol: s.string_or(g, "PROTOCOL", "tcp")?,
            hostname: s.string_or(g, "HOSTNAME", "localhost")?,
            commanding_port: s.port_or(g, "COMMANDING_PORT", 0)?,
            monitoring_port: s.port_or(g, "MONITORING_PORT", 0)?,
            service_port: s.port_or(g, "SERVICE_PORT", 0)?,
            storage_mnemonic: s.string_or(g, "STORAGE_MNEMONIC", "PM")?,
            monitoring_delay: delay,
            proxy_timeout: s.seconds(g, "PROXY_TIMEOUT")?,
        })
    }
}

/// procman's own settings (group `Procman`).
#[derive(Debug, Clone, PartialEq)]
pub struct ProcmanSettings {
    /// `BIND_ADDRESS`: the interface of the three server sockets; `*` = all.
    pub bind_address: String,
    /// `HOUSEKEEPING_PERIOD`: time between housekeeping records.
    pub housekeeping_period: Duration,
    /// `REGISTRY_TTL`: the registration's time to live; heartbeats go every TTL/3.
    pub registry_ttl: Duration,
    /// Decoder bounds on a request (`MAX_FRAME_BYTES`, `MAX_NESTING_DEPTH`, …).
    pub limits: crate::codec::Limits,
    /// Requests in flight per REQ-REP socket; more wait for a slot.
    pub max_concurrent_requests: usize,
    /// Monitoring messages kept for a subscriber that does not read; newer ones are dropped for it.
    pub pub_queue_per_subscriber: usize,
    /// A connection that has not completed the ZMTP handshake by then is closed; zero = never.
    pub handshake_timeout: Duration,
    /// A client that has sent nothing for this long is disconnected; zero = never.
    pub idle_timeout: Duration,
    /// Replies queued for one client; a client that lets more pile up (it does not read) is dropped.
    pub peer_send_queue: usize,
    /// Connections one server socket keeps (connected plus in handshake); more are closed at once.
    pub max_connections: usize,
    /// Bytes of frames above 64 KiB being received at once, all sockets together; past it the sending
    /// peer is disconnected.
    pub max_receiving_bytes: usize,
    /// Shortest monitoring / housekeeping period a `set_*_frequency` can set.
    pub min_period: Duration,
    /// Longest such period; a smaller frequency is clamped to it.
    pub max_period: Duration,
    /// `add_listener`: most listeners kept.
    pub max_listeners: usize,
    /// Longest listener name in bytes; longer is refused.
    pub max_listener_name: usize,
    /// Hosts and networks allowed to send state-changing commands; empty = this host's own addresses.
    pub control_allow: Vec<String>,
    /// Time allowed for the orderly shutdown.
    pub shutdown_timeout: Duration,
    /// Where procman keeps its state; None = `<log file location>/procman-state` (see `DaemonConfig::state_dir`).
    pub state_dir: Option<PathBuf>,
    /// Local Setup YAML used when no Configuration Manager answers; None = none.
    pub setup_file: Option<PathBuf>,
    /// The process definition table (`settings/procman.yaml` format); None = the embedded one.
    pub process_table: Option<PathBuf>,
    /// Stop managed processes when the daemon exits (else they are re-adopted by the next daemon).
    pub stop_children_on_exit: bool,
    /// Log rotation of managed processes: a log file is rotated at this size (bytes).
    pub log_max_bytes: u64,
    /// Rotated log files kept per process.
    pub log_backups: u32,
    /// Lines kept in memory per process for `get_process_log`.
    pub log_tail_lines: usize,
    /// Where CGSE tools drop command files for us (`/tmp/cgse_signals` in CGSE).
    pub signal_dir: PathBuf,
    /// Log records queued for the Logger; more are dropped (counted).
    pub log_queue: usize,
    /// Data points queued for the Metrics Hub; more are dropped (counted).
    pub metrics_queue: usize,
    /// Client-created process definitions (legacy launchers) allowed at a time.
    pub max_client_processes: usize,
}

impl ProcmanSettings {
    /// Read group `Procman`; `HOUSEKEEPING_PERIOD` and `MIN_PERIOD` must be > 0, `MIN_PERIOD` <= `MAX_PERIOD`.
    pub fn from_settings(s: &Settings) -> Result<ProcmanSettings, ConfigError> {
        let g = PROCMAN_GROUP;
        let hk = s.seconds(g, "HOUSEKEEPING_PERIOD")?;
        if hk.is_zero() {
            return Err(s.bad(g, "HOUSEKEEPING_PERIOD", "is 0, expected a period > 0 seconds".into()));
        }
        let min_period = s.seconds(g, "MIN_PERIOD")?;
        let max_period = s.seconds(g, "MAX_PERIOD")?;
        if min_period.is_zero() || max_period < min_period {
            return Err(s.bad(
                g,
                "MIN_PERIOD",
                format!("must be > 0 and <= MAX_PERIOD ({max_period:?}), got {min_period:?}"),
            ));
        }
        let opt_path = |key: &str| -> Result<Option<PathBuf>, ConfigError> {
            let v = s.string_or(g, key, "")?;
            Ok(if v.trim().is_empty() {
                None
            } else {
                Some(PathBuf::from(v))
            })
        };
        Ok(ProcmanSettings {
            bind_address: s.string_or(g, "BIND_ADDRESS", "*")?,
            housekeeping_period: hk,
            registry_ttl: s.seconds(g, "REGISTRY_TTL")?,
            limits: crate::codec::Limits {
                max_frame_bytes: s.count(g, "MAX_FRAME_BYTES")?,
                max_depth: s.count(g, "MAX_NESTING_DEPTH")?,
                max_memo: s.count(g, "MAX_MEMO_ENTRIES")?,
                max_container_len: s.count(g, "MAX_CONTAINER_LENGTH")?,
                max_nodes: s.count(g, "MAX_DECODED_VALUES")?,
                max_nodes_per_byte: s.count(g, "MAX_DECODED_VALUES_PER_BYTE")?,
            },
            max_concurrent_requests: s.count(g, "MAX_CONCURRENT_REQUESTS")?,
            pub_queue_per_subscriber: s.count(g, "PUB_QUEUE_PER_SUBSCRIBER")?,
            handshake_timeout: s.seconds(g, "HANDSHAKE_TIMEOUT")?,
            peer_send_queue: s.count(g, "PEER_SEND_QUEUE")?,
            idle_timeout: s.seconds(g, "IDLE_TIMEOUT")?,
            max_connections: s.count(g, "MAX_CONNECTIONS")?,
            max_receiving_bytes: s.count(g, "MAX_RECEIVING_BYTES")?,
            min_period,
            max_period,
            max_listeners: s.count(g, "MAX_LISTENERS")?,
            max_listener_name: s.count(g, "MAX_LISTENER_NAME")?,
            control_allow: s.string_list(g, "CONTROL_ALLOW")?,
            shutdown_timeout: s.seconds(g, "SHUTDOWN_TIMEOUT")?,
            state_dir: opt_path("STATE_DIR")?,
            setup_file: opt_path("SETUP_FILE")?,
            process_table: opt_path("PROCESS_TABLE")?,
            stop_children_on_exit: s.boolean(g, "STOP_CHILDREN_ON_EXIT")?,
            log_max_bytes: s.count(g, "LOG_MAX_BYTES")? as u64,
            log_backups: u32::try_from(s.count(g, "LOG_BACKUPS")?)
                .map_err(|_| s.bad(g, "LOG_BACKUPS", "is too large".into()))?,
            log_tail_lines: s.count(g, "LOG_TAIL_LINES")?,
            max_client_processes: s.count(g, "MAX_CLIENT_PROCESSES")?,
            signal_dir: opt_path("SIGNAL_DIR")?
                .unwrap_or_else(|| PathBuf::from(crate::cgse::signals::DEFAULT_SIGNAL_DIR)),
            log_queue: s.count(g, "LOG_FORWARD_QUEUE")?,
            metrics_queue: s.count(g, "METRICS_QUEUE")?,
        })
    }
}

/// Where a peer that takes PUSH messages listens (the Logger's receiver, the Metrics Hub's collector).
#[derive(Debug, Clone, PartialEq)]
pub struct PushPeerSettings {
    /// `SERVICE_TYPE`: the type its registry record has.
    pub service_type: String,
    /// `HOSTNAME`: where it listens.
    pub hostname: String,
    /// 0 = the port its registry record announces.
    pub port: u16,
}

impl PushPeerSettings {
    /// `group`'s `SERVICE_TYPE`, `HOSTNAME` and `port_key` (`RECEIVER_PORT`, `COLLECTOR_PORT`).
    pub fn from_settings(
        s: &Settings,
        group: &str,
        default_type: &str,
        port_key: &str,
    ) -> Result<PushPeerSettings, ConfigError> {
        Ok(PushPeerSettings {
            service_type: s.string_or(group, "SERVICE_TYPE", default_type)?,
            hostname: s.string_or(group, "HOSTNAME", "localhost")?,
            port: s.port_or(group, port_key, 0)?,
        })
    }
}

/// Where a peer control server (Storage or Configuration Manager) listens.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerSettings {
    /// `SERVICE_TYPE`: the type its registry record has.
    pub service_type: String,
    /// `HOSTNAME`: where it listens.
    pub hostname: String,
    /// `COMMANDING_PORT`; 0 = the port its registry record announces.
    pub commanding_port: u16,
}

impl PeerSettings {
    /// `group`'s `SERVICE_TYPE`, `HOSTNAME` and `COMMANDING_PORT`.
    pub fn from_settings(s: &Settings, group: &str, default_type: &str) -> Result<PeerSettings, ConfigError> {
        Ok(PeerSettings {
            service_type: s.string_or(group, "SERVICE_TYPE", default_type)?,
            hostname: s.string_or(group, "HOSTNAME", "localhost")?,
            commanding_port: s.port_or(group, "COMMANDING_PORT", 0)?,
        })
    }
}

/// Where the Service Registry listens.
#[derive(Debug, Clone, PartialEq)]
pub struct RegistrySettings {
    /// `HOSTNAME`.
    pub hostname: String,
    /// `REQUESTER_PORT`: requests (register, deregister, discover).
    pub requester_port: u16,
    /// `PUBLISHER_PORT`: its event publications (procman does not subscribe).
    pub publisher_port: u16,
    /// `HEARTBEAT_PORT`: renewals of a registration.
    pub heartbeat_port: u16,
}

impl RegistrySettings {
    /// Read group `Service Registry`.
    pub fn from_settings(s: &Settings) -> Result<RegistrySettings, ConfigError> {
        let g = "Service Registry";
        Ok(RegistrySettings {
            hostname: s.string_or(g, "HOSTNAME", "localhost")?,
            requester_port: s.port_or(g, "REQUESTER_PORT", 4242)?,
            publisher_port: s.port_or(g, "PUBLISHER_PORT", 4243)?,
            heartbeat_port: s.port_or(g, "HEARTBEAT_PORT", 4244)?,
        })
    }
}

/// Timeouts and periods of the core-service integrations (group `Procman`).
#[derive(Debug, Clone, PartialEq)]
pub struct IntegrationSettings {
    /// Registry request timeout (the original waits 0.5 s; a busy registry on a loaded host needs more).
    pub registry_timeout: Duration,
    /// Storage / Configuration Manager reply timeout.
    pub peer_timeout: Duration,
    /// Connection bound for those peers: a peer that is down costs this, not the reply timeout.
    pub peer_connect_timeout: Duration,
    /// How often the Setup is re-read from the Configuration Manager in the background (and retried
    /// while it is down).
    pub setup_refresh: Duration,
}

impl IntegrationSettings {
    /// Read group `Procman`; each must be > 0.
    pub fn from_settings(s: &Settings) -> Result<IntegrationSettings, ConfigError> {
        let g = PROCMAN_GROUP;
        let positive = |key: &str| -> Result<Duration, ConfigError> {
            let d = s.seconds(g, key)?;
            if d.is_zero() {
                return Err(s.bad(g, key, "is 0, expected a duration > 0 seconds".into()));
            }
            Ok(d)
        };
        Ok(IntegrationSettings {
            registry_timeout: positive("REGISTRY_TIMEOUT")?,
            peer_timeout: positive("PEER_TIMEOUT")?,
            peer_connect_timeout: positive("PEER_CONNECT_TIMEOUT")?,
            setup_refresh: positive("SETUP_REFRESH")?,
        })
    }
}

/// Where the Notify Hub publishes its events (`new_setup` among them).
#[derive(Debug, Clone, PartialEq)]
pub struct NotifyHubSettings {
    /// `HOSTNAME`.
    pub hostname: String,
    /// 0 = do not subscribe.
    pub publisher_port: u16,
}

impl NotifyHubSettings {
    /// Read group `Notify Hub`.
    pub fn from_settings(s: &Settings) -> Result<NotifyHubSettings, ConfigError> {
        let g = "Notify Hub";
        Ok(NotifyHubSettings {
            hostname: s.string_or(g, "HOSTNAME", "localhost")?,
            publisher_port: s.port_or(g, "PUBLISHER_PORT", 0)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Env::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_have_the_cgse_ports() {
        let s = Settings::defaults().unwrap();
        let pm = PmSettings::from_settings(&s).unwrap();
        assert_eq!(
            (pm.commanding_port, pm.monitoring_port, pm.service_port),
            (6120, 6121, 6122)
        );
        assert_eq!(pm.storage_mnemonic, "PM");
        assert_eq!(pm.service_type, "PM_CS");
        assert_eq!(pm.monitoring_delay, Duration::from_secs(1));
        let p = ProcmanSettings::from_settings(&s).unwrap();
        // The codec's own default frame limit is 64 MiB; the daemon's setting is 1 MiB (CGSE requests are
        // a few KB, and every concurrent frame up to twice this may be buffered).
        assert_eq!(
            p.limits,
            crate::codec::Limits {
                max_frame_bytes: 1 << 20,
                ..Default::default()
            }
        );
        assert!(p.control_allow.is_empty());
        assert!(p.min_period > Duration::ZERO && p.max_period >= p.min_period);
        let i = IntegrationSettings::from_settings(&s).unwrap();
        assert!(i.peer_connect_timeout < i.peer_timeout);
        assert_eq!(NotifyHubSettings::from_settings(&s).unwrap().publisher_port, 6126);
        assert_eq!(p.housekeeping_period, Duration::from_secs(10));
    }

    #[test]
    fn local_file_overrides_key_by_key() {
        let dir = tempdir();
        let f = dir.join("local.yaml");
        std::fs::write(
            &f,
            "Process Manager Control Server:\n    COMMANDING_PORT: 0\nSITE:\n    ID: LAB42\n",
        )
        .unwrap();
        let s = Settings::load(Some(&f), &env(&[])).unwrap();
        let pm = PmSettings::from_settings(&s).unwrap();
        assert_eq!(pm.commanding_port, 0);
        assert_eq!(pm.service_port, 6122, "untouched keys keep their defaults");
        assert_eq!(s.string("SITE", "ID").unwrap(), "LAB42");
    }

    #[test]
    fn local_settings_from_the_project_variable() {
        let dir = tempdir();
        let f = dir.join("ls.yaml");
        std::fs::write(&f, "Process Manager Control Server:\n    SERVICE_PORT: 7000\n").unwrap();
        let e = env(&[("PROJECT", "PLATO"), ("PLATO_LOCAL_SETTINGS", f.to_str().unwrap())]);
        let s = Settings::load(None, &e).unwrap();
        assert_eq!(PmSettings::from_settings(&s).unwrap().service_port, 7000);
    }

    #[test]
    fn missing_local_file_is_an_error_naming_it() {
        let e = env(&[("CGSE_LOCAL_SETTINGS", "/nonexistent/x.yaml")]);
        let err = Settings::load(None, &e).unwrap_err().to_string();
        assert!(
            err.contains("/nonexistent/x.yaml") && err.contains("CGSE_LOCAL_SETTINGS"),
            "{err}"
        );
    }

    #[test]
    fn malformed_yaml_names_the_file() {
        let dir = tempdir();
        let f = dir.join("bad.yaml");
        std::fs::write(&f, "Process Manager Control Server:\n  - [unclosed\n").unwrap();
        let err = Settings::load(Some(&f), &env(&[])).unwrap_err().to_string();
        assert!(err.contains("bad.yaml"), "{err}");
    }

    #[test]
    fn bad_value_names_file_and_key() {
        let dir = tempdir();
        let f = dir.join("v.yaml");
        std::fs::write(&f, "Process Manager Control Server:\n    COMMANDING_PORT: seventy\n").unwrap();
        let s = Settings::load(Some(&f), &env(&[])).unwrap();
        let err = PmSettings::from_settings(&s).unwrap_err().to_string();
        assert!(
            err.contains("Process Manager Control Server.COMMANDING_PORT") && err.contains("v.yaml"),
            "{err}"
        );
        std::fs::write(&f, "Process Manager Control Server:\n    SERVICE_PORT: 70000\n").unwrap();
        let s = Settings::load(Some(&f), &env(&[])).unwrap();
        assert!(PmSettings::from_settings(&s)
            .unwrap_err()
            .to_string()
            .contains("SERVICE_PORT"));
    }

    #[test]
    fn data_storage_location_appends_the_site() {
        let e = env(&[("SITE_ID", "LAB42"), ("CGSE_DATA_STORAGE_LOCATION", "/x/data/")]);
        assert_eq!(e.data_storage_location().unwrap(), PathBuf::from("/x/data/LAB42"));
        let e = env(&[("SITE_ID", "LAB42"), ("CGSE_DATA_STORAGE_LOCATION", "/x/LAB42")]);
        assert_eq!(e.data_storage_location().unwrap(), PathBuf::from("/x/LAB42"));
        assert_eq!(e.log_file_location().unwrap(), PathBuf::from("/x/LAB42/log"));
        assert!(!e.project_was_set);
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "procman-config-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
