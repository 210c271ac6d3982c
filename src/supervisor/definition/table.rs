//! The operator's table: layered, partial entries (`defaults` < `device_classes` < `devices`) and the core
//! services, resolved into [`ProcessDefinition`]s with pure functions.

use std::collections::BTreeMap;
use std::path::Path;

use super::raw::*;
use super::*;
use crate::supervisor::error::{ClientCommandError, DefinitionError};

/// The operator's process table, parsed from YAML. See `docs/PROCESSES.md`.
#[derive(Debug, Clone, Default)]
pub struct ProcessTable {
    origin: String,
    python: String,
    allowed_programs: Vec<String>,
    device_commands: Vec<String>,
    defaults: RawDefinition,
    core_services: Vec<(String, RawDefinition)>,
    device_classes: BTreeMap<String, RawDefinition>,
    devices: BTreeMap<String, RawDefinition>,
}

impl ProcessTable {
    /// Reads and validates a table file.
    ///
    /// # Errors
    /// [`DefinitionError`] naming the file and the key.
    pub fn load(path: &Path) -> Result<Self, DefinitionError> {
        let text = std::fs::read_to_string(path).map_err(|source| DefinitionError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_yaml(&text, &path.display().to_string())
    }

    /// Parses and validates a table; `origin` names the source in errors.
    ///
    /// # Errors
    /// [`DefinitionError`] naming `origin` and the key.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Self, DefinitionError> {
        let raw: RawTable = if text.trim().is_empty() {
            RawTable::default()
        } else {
            serde_saphyr::from_str(text).map_err(|e| DefinitionError::Syntax {
                origin: origin.to_owned(),
                message: e.to_string(),
            })?
        };
        let table = ProcessTable {
            origin: origin.to_owned(),
            python: raw.python.unwrap_or_else(|| DEFAULT_PYTHON.to_owned()),
            allowed_programs: raw.allowed_programs.unwrap_or_default(),
            device_commands: raw.device_commands.unwrap_or_default(),
            defaults: raw.defaults.unwrap_or_default(),
            core_services: raw.core_services.map(|m| m.0).unwrap_or_default(),
            device_classes: raw.device_classes.unwrap_or_default(),
            devices: raw.devices.unwrap_or_default(),
        };
        table.check()?;
        Ok(table)
    }

    /// The allow-list for client-supplied `cgse_cmd` programs.
    pub fn allowed_programs(&self) -> &[String] {
        &self.allowed_programs
    }

    /// Device launchers (`cgse <name>`) a client may name besides the configured Python's entry points.
    pub fn device_commands(&self) -> &[String] {
        &self.device_commands
    }

    /// The interpreter substituted for `{python}`.
    pub fn python(&self) -> &str {
        &self.python
    }

    /// Core services in table order: `(name, registry service type)`, as `get_core_processes` reports them.
    pub fn core_service_types(&self) -> Vec<(String, Option<String>)> {
        self.core_services
            .iter()
            .map(|(name, raw)| {
                let mut merged = self.defaults.clone();
                merged.overlay(raw);
                (name.clone(), merged.service_type)
            })
            .collect()
    }

    /// Definitions of every core service, in table order.
    ///
    /// # Errors
    /// [`DefinitionError::Invalid`] for an entry without argv or with bad templates.
    pub fn core_definitions(&self) -> Result<Vec<ProcessDefinition>, DefinitionError> {
        self.core_services
            .iter()
            .map(|(name, raw)| {
                let mut merged = self.defaults.clone();
                merged.overlay(raw);
                let ctx = Templates {
                    python: &self.python,
                    device: None,
                };
                merged.build(name, &self.origin, &format!("core_services.{name}"), &ctx)
            })
            .collect()
    }

    /// Resolves the definition of a Setup device: `devices[device_id]` over `device_classes[class]` over
    /// `defaults`. Pure: reads nothing but the table.
    ///
    /// # Errors
    /// [`DefinitionError::NoDefinition`] when neither entry exists; [`DefinitionError::Invalid`] when the
    /// merged entry is incomplete.
    pub fn resolve_device(&self, device: &DeviceSpec) -> Result<ProcessDefinition, DefinitionError> {
        let class = class_path(&device.device_class);
        let by_class = self.device_classes.get(class);
        let by_id = self.devices.get(&device.device_id);
        if by_class.is_none() && by_id.is_none() {
            return Err(DefinitionError::NoDefinition {
                device_id: device.device_id.clone(),
                device_class: class.to_owned(),
            });
        }
        let mut merged = self.defaults.clone();
        let mut key = String::new();
        if let Some(raw) = by_class {
            merged.overlay(raw);
            key = format!("device_classes.{class}");
        }
        if let Some(raw) = by_id {
            merged.overlay(raw);
            key = format!("devices.{}", device.device_id);
        }
        let ctx = Templates {
            python: &self.python,
            device: Some(device),
        };
        let mut def = merged.build(&device.device_id, &self.origin, &key, &ctx)?;
        def.simulator = device.simulator;
        Ok(def)
    }

    /// A definition for a legacy self-daemonizing launcher named by a client (`StartCommand` with no table
    /// entry): `<cgse_cmd> start [device_args[0]] [--sim]`, run directly with `forking: true` and the table
    /// defaults. The command is validated by [`validate_cgse_cmd`] first.
    ///
    /// # Errors
    /// [`DefinitionError::Command`] when the command or the argument is refused.
    pub fn legacy_definition(
        &self,
        device_id: &str,
        cgse_cmd: &str,
        device_args: &[String],
        simulator: bool,
        launchers: &Launchers,
    ) -> Result<ProcessDefinition, DefinitionError> {
        let mut argv = self.launcher_argv(cgse_cmd, device_args, launchers)?;
        argv.push("start".to_owned());
        if let Some(arg0) = device_args.first() {
            argv.push(arg0.clone());
        }
        let mut merged = self.defaults.clone();
        merged.argv = Some(argv);
        merged.forking = Some(true);
        merged.sim_args = Some(vec!["--sim".to_owned()]);
        merged.readiness = None;
        let ctx = Templates {
            python: &self.python,
            device: None,
        };
        // The argv holds client text: never template-expand it.
        let mut def = merged.build_literal(device_id, &self.origin, "legacy", &ctx)?;
        def.simulator = simulator;
        Ok(def)
    }

    /// Validates a client's launcher request the same way on every path (start, stop, status): `cgse_cmd`
    /// is `<allowed program> <permitted launcher>` and every device argument is a plain token; the device
    /// id must be one too. Returns the launcher's argv, its program resolved to an absolute path through the
    /// daemon's `PATH` without empty or relative elements.
    ///
    /// # Errors
    /// [`DefinitionError::Command`] naming what was refused.
    pub fn launcher_argv(
        &self,
        cgse_cmd: &str,
        device_args: &[String],
        launchers: &Launchers,
    ) -> Result<Vec<String>, DefinitionError> {
        let mut argv = self.check_launcher(cgse_cmd, device_args, launchers)?;
        let path = launchers.search_path.clone().or_else(|| std::env::var("PATH").ok());
        let program =
            resolve_program_in(&argv[0], path.as_deref()).map_err(|message| ClientCommandError::NotFound {
                program: argv[0].clone(),
                message: message.to_string(),
            })?;
        argv[0] = program.display().to_string();
        Ok(argv)
    }

    /// The checks of [`ProcessTable::launcher_argv`] without resolving the program (which only matters where
    /// the launcher is run): the words of `cgse_cmd`.
    ///
    /// # Errors
    /// [`DefinitionError::Command`] naming what was refused.
    pub fn check_launcher(
        &self,
        cgse_cmd: &str,
        device_args: &[String],
        launchers: &Launchers,
    ) -> Result<Vec<String>, DefinitionError> {
        let argv = validate_launcher(cgse_cmd, &self.allowed_programs, launchers)?;
        validate_client_args(device_args)?;
        Ok(argv)
    }

    /// Validates every entry as far as possible without a device (templates, signals, durations, readiness).
    fn check(&self) -> Result<(), DefinitionError> {
        let dummy = DeviceSpec {
            device_id: "X".to_owned(),
            device_name: "X".to_owned(),
            device_class: "x".to_owned(),
            device_args: vec!["a".to_owned()],
            simulator: false,
        };
        let bad = |key: String, message: String| DefinitionError::Invalid {
            origin: self.origin.clone(),
            key,
            message,
        };
        for p in &self.allowed_programs {
            if p.is_empty() || p.chars().any(|c| c.is_whitespace() || is_metacharacter(c)) {
                return Err(bad(
                    "allowed_programs".into(),
                    format!("{p:?} is not a plain program name"),
                ));
            }
        }
        for d in &self.device_commands {
            if !is_plain_token(d) || NEVER_LAUNCHERS.contains(&d.as_str()) {
                return Err(bad(
                    "device_commands".into(),
                    format!(
                        "{d:?} is not a device launcher a client may run (never: {})",
                        NEVER_LAUNCHERS.join(", ")
                    ),
                ));
            }
        }
        let entries = std::iter::once(("defaults".to_owned(), &self.defaults, true))
            .chain(
                self.core_services
                    .iter()
                    .map(|(k, r)| (format!("core_services.{k}"), r, false)),
            )
            .chain(
                self.device_classes
                    .iter()
                    .map(|(k, r)| (format!("device_classes.{k}"), r, true)),
            )
            .chain(self.devices.iter().map(|(k, r)| (format!("devices.{k}"), r, true)));
        for (key, raw, is_device) in entries {
            let ctx = Templates {
                python: &self.python,
                device: is_device.then_some(&dummy),
            };
            raw.check(&self.origin, &key, &ctx)?;
        }
        // Core services must be complete: they are started without any device information.
        self.core_definitions()?;
        self.check_dependencies()?;
        Ok(())
    }

    /// `depends_on`: not in `defaults` (every process would depend on it, itself included); class entries
    /// name known ids; the core services and `devices` entries form a graph without cycles.
    fn check_dependencies(&self) -> Result<(), DefinitionError> {
        if self.defaults.depends_on.is_some() {
            return Err(DefinitionError::Invalid {
                origin: self.origin.clone(),
                key: "defaults.depends_on".to_owned(),
                message: "not allowed in defaults (give it per entry)".to_owned(),
            });
        }
        let nodes = self.dependency_nodes()?;
        for (class, raw) in &self.device_classes {
            for d in raw.depends_on.iter().flatten() {
                if !nodes.iter().any(|(id, _)| id == d) {
                    return Err(DefinitionError::Invalid {
                        origin: self.origin.clone(),
                        key: format!("device_classes.{class}.depends_on"),
                        message: format!("{d} is not defined (core services and `devices` entries are)"),
                    });
                }
            }
        }
        self.dependency_graph().map(|_| ())
    }

    /// The file or text the table came from, for messages.
    pub(crate) fn origin(&self) -> &str {
        &self.origin
    }

    /// The key of a process's entry in the file, for messages: `core_services.X` or `devices.X`.
    pub(crate) fn entry_key(&self, id: &str) -> String {
        if self.core_services.iter().any(|(n, _)| n == id) {
            format!("core_services.{id}")
        } else {
            format!("devices.{id}")
        }
    }

    /// `(id, depends_on)` of the core services (table order), then of the `devices` entries, each layered over
    /// `defaults` (a device's class entry is only known with the Setup; its own entry is used).
    pub(crate) fn dependency_nodes(&self) -> Result<Vec<(String, Vec<String>)>, DefinitionError> {
        let mut nodes = Vec::new();
        for (id, raw) in self
            .core_services
            .iter()
            .map(|(k, v)| (k, v))
            .chain(self.devices.iter())
        {
            if nodes.iter().any(|(n, _): &(String, Vec<String>)| n == id) {
                return Err(DefinitionError::Invalid {
                    origin: self.origin.clone(),
                    key: format!("devices.{id}"),
                    message: "a core service has the same id".to_owned(),
                });
            }
            nodes.push((id.clone(), raw.depends_on.clone().unwrap_or_default()));
        }
        Ok(nodes)
    }
}
