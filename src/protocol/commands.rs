//! The command tables served by `send_commands`, built from `settings/commands.yaml`.
//!
//! Python proxies turn each command object into a method: they read `_name`, `_cmd` and the argument
//! counts for client-side validation and `__doc__` for help. The function references are echoed back by
//! clients and ignored by us, but we still write them so that existing tools see the original objects.

use indexmap_lite::OrderedMap;
use serde::Deserialize;

use crate::codec::Value;

/// The compiled-in command tables.
pub const COMMANDS_YAML: &str = include_str!("../../settings/commands.yaml");

/// Which REQ-REP socket a table belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SocketKind {
    /// The commanding socket (`COMMANDING_PORT`).
    Commanding,
    /// The service socket (`SERVICE_PORT`).
    Service,
}

impl std::fmt::Display for SocketKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SocketKind::Commanding => "commanding",
            SocketKind::Service => "service",
        })
    }
}

/// Why the command table is unusable (a programming error in `commands.yaml`, caught by tests).
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// The YAML does not parse into the tables.
    #[error("command table YAML is invalid: {0}")]
    Yaml(String),
    /// A `_cmd` template has both `{}` and `{name}` placeholders.
    #[error("command '{name}': template '{cmd}' mixes positional and named placeholders")]
    MixedPlaceholders {
        /// The command.
        name: String,
        /// Its template.
        cmd: String,
    },
    /// A service-table command without its `handler` key.
    #[error("command '{name}' of the service table has no handler")]
    MissingHandler {
        /// The command.
        name: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
struct GlobalRef {
    module: String,
    qualname: String,
}

#[derive(Debug, Clone, Deserialize)]
struct RawCommand {
    #[serde(default)]
    cmd: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    handler: Option<String>,
    /// False for commands the original controller class does not have (no function reference).
    #[serde(default = "yes")]
    device_method: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
struct RawTable {
    class: GlobalRef,
    #[serde(default)]
    response: Option<GlobalRef>,
    #[serde(default)]
    device_method_class: Option<GlobalRef>,
    #[serde(default)]
    handler_class: Option<GlobalRef>,
    commands: OrderedMap<RawCommand>,
}

#[derive(Debug, Clone, Deserialize)]
struct RawTables {
    commanding: RawTable,
    service: RawTable,
}

/// The argument counts derived from a `_cmd` template.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Placeholders {
    /// All placeholders (`_tot_n_args`).
    pub total: usize,
    /// Unnamed ones, `{}` (`_n_args`).
    pub positional: usize,
    /// Named ones, `{name}` (`_n_kwargs`).
    pub named: usize,
    /// The names of the named ones, in order (`_keys`).
    pub keys: Vec<String>,
}

/// Count the `{…}` placeholders of a template the way CGSE does: a `{{ … }}` span is masked first,
/// then each `{…}` group is a placeholder named by the part before an optional `:`.
pub fn parse_placeholders(cmd: &str) -> Placeholders {
    let masked = match (cmd.find("{{"), cmd.rfind("}}")) {
        (Some(a), Some(b)) if b + 2 > a => format!("{}_{}", &cmd[..a], &cmd[b + 2..]),
        _ => cmd.to_owned(),
    };
    let mut p = Placeholders::default();
    let mut rest = masked.as_str();
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else { break };
        let inner = &after[..close];
        let name = inner.split(':').next().unwrap_or("");
        p.total += 1;
        if name.is_empty() {
            p.positional += 1;
        } else {
            p.named += 1;
            p.keys.push(name.to_owned());
        }
        rest = &after[close + 1..];
    }
    p
}

/// One command of a table.
#[derive(Debug, Clone)]
pub struct CommandSpec {
    /// The command's name (`_name`).
    pub name: String,
    /// Its template (`_cmd`).
    pub cmd: String,
    /// Its description (`_description`), if any.
    pub description: Option<String>,
    /// The argument counts of `cmd`.
    pub placeholders: Placeholders,
    /// The pickled command object (`_name`, `_cmd`, … `__doc__`).
    pub object: Value,
}

/// A socket's command table: the specs in order and the `send_commands` reply.
#[derive(Debug, Clone)]
pub struct CommandTable {
    /// The socket the table belongs to.
    pub kind: SocketKind,
    specs: Vec<CommandSpec>,
}

impl CommandTable {
    /// The command names in table order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.specs.iter().map(|s| s.name.as_str())
    }

    /// Look a command up by name.
    pub fn get(&self, name: &str) -> Option<&CommandSpec> {
        self.specs.iter().find(|s| s.name == name)
    }

    /// The `send_commands` reply: `{name: command object}` in table order.
    pub fn send_commands_reply(&self) -> Value {
        Value::Dict(
            self.specs
                .iter()
                .map(|s| (Value::str(&s.name), s.object.clone()))
                .collect(),
        )
    }

    /// The commands in table order.
    pub fn specs(&self) -> &[CommandSpec] {
        &self.specs
    }
}

/// Both tables, parsed from the compiled-in YAML.
pub fn load_tables() -> Result<(CommandTable, CommandTable), TableError> {
    load_tables_from(COMMANDS_YAML)
}

/// Both tables from YAML text.
pub fn load_tables_from(yaml: &str) -> Result<(CommandTable, CommandTable), TableError> {
    let raw: RawTables = serde_saphyr::from_str(yaml).map_err(|e| TableError::Yaml(e.to_string()))?;
    Ok((
        build(SocketKind::Commanding, raw.commanding)?,
        build(SocketKind::Service, raw.service)?,
    ))
}

fn build(kind: SocketKind, raw: RawTable) -> Result<CommandTable, TableError> {
    let mut specs = Vec::new();
    for (name, rc) in raw.commands.into_entries() {
        let cmd = rc.cmd.unwrap_or_default();
        let placeholders = parse_placeholders(&cmd);
        if placeholders.positional > 0 && placeholders.named > 0 {
            return Err(TableError::MixedPlaceholders { name, cmd });
        }
        let (response, device_method) = match kind {
            SocketKind::Commanding => (
                raw.response
                    .as_ref()
                    .map(|g| Value::global(&g.module, &g.qualname))
                    .unwrap_or(Value::None),
                raw.device_method_class
                    .as_ref()
                    .filter(|_| rc.device_method)
                    .map(|g| Value::global(&g.module, format!("{}.{name}", g.qualname)))
                    .unwrap_or(Value::None),
            ),
            SocketKind::Service => {
                let handler = rc
                    .handler
                    .clone()
                    .ok_or_else(|| TableError::MissingHandler { name: name.clone() })?;
                let response = match &raw.handler_class {
                    Some(g) => Value::global(&g.module, format!("{}.{handler}", g.qualname)),
                    None => Value::None,
                };
                (response, Value::None)
            }
        };
        let object = command_object(
            &raw.class,
            &name,
            &cmd,
            rc.description.as_deref(),
            response,
            device_method,
            &placeholders,
        );
        specs.push(CommandSpec {
            name,
            cmd,
            description: rc.description,
            placeholders,
            object,
        });
    }
    Ok(CommandTable { kind, specs })
}

/// `repr()` of a Python list of strings, as used in `__doc__`.
fn py_list_repr(items: &[String]) -> String {
    let inner: Vec<String> = items
        .iter()
        .map(|s| {
            if s.contains('\'') && !s.contains('"') {
                format!("\"{}\"", s.replace('\\', "\\\\"))
            } else {
                format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
            }
        })
        .collect();
    format!("[{}]", inner.join(", "))
}

fn command_object(
    class: &GlobalRef,
    name: &str,
    cmd: &str,
    description: Option<&str>,
    response: Value,
    device_method: Value,
    p: &Placeholders,
) -> Value {
    let mut doc = format!(
        "usage: {name}(nargs={}, keys={})\n       args & kwargs can be mixed (limited)",
        p.total,
        py_list_repr(&p.keys)
    );
    if let Some(d) = description {
        doc.push('\n');
        doc.push_str(d);
        doc.push('\n');
    }
    let state = Value::dict([
        ("_name", Value::str(name)),
        ("_cmd", Value::str(cmd)),
        ("_response", response),
        ("_wait", Value::None),
        ("_check", Value::None),
        ("_description", description.map(Value::str).unwrap_or(Value::None)),
        ("_device_method", device_method),
        ("_tot_n_args", Value::Int(p.total as i64)),
        ("_n_args", Value::Int(p.positional as i64)),
        ("_n_kwargs", Value::Int(p.named as i64)),
        ("_keys", Value::List(p.keys.iter().map(Value::str).collect())),
        ("__doc__", Value::Str(doc)),
    ]);
    Value::new_object(&class.module, &class.qualname, state)
}

/// A YAML mapping deserialised with its key order kept (serde maps would sort or hash it).
mod indexmap_lite {
    use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
    use std::fmt;
    use std::marker::PhantomData;

    #[derive(Debug, Clone)]
    pub struct OrderedMap<V>(Vec<(String, V)>);

    impl<V> OrderedMap<V> {
        pub fn into_entries(self) -> Vec<(String, V)> {
            self.0
        }
    }

    impl<'de, V: Deserialize<'de>> Deserialize<'de> for OrderedMap<V> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V2<V>(PhantomData<V>);
            impl<'de, V: Deserialize<'de>> Visitor<'de> for V2<V> {
                type Value = OrderedMap<V>;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a mapping")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                    let mut out = Vec::new();
                    while let Some((k, v)) = map.next_entry::<String, V>()? {
                        out.push((k, v));
                    }
                    Ok(OrderedMap(out))
                }
            }
            d.deserialize_map(V2(PhantomData))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_follow_cgse_rules() {
        assert_eq!(parse_placeholders(""), Placeholders::default());
        let p = parse_placeholders("{start_cmd}");
        assert_eq!(
            (p.total, p.positional, p.named, p.keys.clone()),
            (1, 0, 1, vec!["start_cmd".to_owned()])
        );
        let p = parse_placeholders("{name} {level}");
        assert_eq!((p.total, p.named), (2, 2));
        let p = parse_placeholders("{} {:0.2f}");
        assert_eq!((p.total, p.positional, p.named), (2, 2, 0));
        let p = parse_placeholders("{{literal}} {x}");
        assert_eq!((p.total, p.keys.clone()), (1, vec!["x".to_owned()]));
    }

    #[test]
    fn tables_have_the_original_commands_in_order() {
        let (cmd, svc) = load_tables().unwrap();
        let names: Vec<_> = cmd.names().collect();
        assert_eq!(
            &names[..7],
            [
                "get_core_processes",
                "get_devices",
                "get_device_ids",
                "start_process",
                "stop_process",
                "get_core_service_status",
                "get_device_process_status"
            ]
        );
        assert_eq!(svc.names().count(), 12);
        let quit = svc.get("quit_server").unwrap();
        let o = quit.object.as_object().unwrap();
        assert!(o.is("egse.services", "ServiceCommand"));
        assert_eq!(
            o.attr("_response").and_then(Value::as_global),
            Some(("egse.services", "ServiceProtocol.handle_quit"))
        );
        let start = cmd.get("start_process").unwrap().object.as_object().unwrap().clone();
        assert_eq!(
            start.attr("__doc__").and_then(Value::as_str),
            Some("usage: start_process(nargs=1, keys=['start_cmd'])\n       args & kwargs can be mixed (limited)\nStarts a process\n")
        );
        assert_eq!(
            start.attr("_device_method").and_then(Value::as_global),
            Some(("egse.procman", "ProcessManagerController.start_process"))
        );
    }

    #[test]
    fn mixed_placeholders_are_rejected() {
        let yaml = COMMANDS_YAML.replace("cmd: \"{stop_cmd}\"", "cmd: \"{} {stop_cmd}\"");
        assert!(matches!(
            load_tables_from(&yaml),
            Err(TableError::MixedPlaceholders { .. })
        ));
    }
}
