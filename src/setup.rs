//! The Setup: which devices a lab has. Read from the Configuration Manager's pickled `Setup` or from a
//! local Setup YAML file, and walked exactly as CGSE's `Setup.find_devices` / `find_device_ids` walk it.

use std::path::Path;

use serde_json::Value as Json;

use crate::codec::Value;

/// A Setup as an ordered tree: mappings in YAML order, leaves as raw values (directives such as
/// `class//…` stay strings; nothing is imported).
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// A mapping: (key, child) pairs in YAML order.
    Map(Vec<(String, Node)>),
    /// Anything else, as a raw value.
    Leaf(Value),
}

/// Why a Setup could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A Setup file could not be read.
    #[error("cannot read Setup file {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        reason: String,
    },
    /// A Setup file is not valid YAML.
    #[error("Setup file {path} is not valid YAML: {reason}")]
    Yaml {
        /// The file.
        path: String,
        /// The parser's message.
        reason: String,
    },
    /// The Setup (or its `Setup:` key) is not a mapping.
    #[error("the Setup is not a mapping")]
    NotAMapping,
}

/// One device of the Setup.
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    /// `device_name` as text (a non-string name in its Python repr).
    pub name: String,
    /// The raw `device_name` value: the reply keys on it, so a name `5` stays the int `5`.
    pub name_value: Value,
    /// The raw `device` value, e.g. `class//egse.dummy.DummyProxy`.
    pub device: Value,
    /// The raw `device_id` value, if present.
    pub device_id: Option<Value>,
    /// The raw `device_args` (a list), or `None` when absent (the wire then carries `()`).
    pub device_args: Option<Value>,
}

impl Device {
    /// `device_args` as it goes on the wire: the YAML list, or an empty tuple when absent.
    pub fn wire_args(&self) -> Value {
        self.device_args.clone().unwrap_or(Value::Tuple(vec![]))
    }

    /// The class path of a `class//module.Class` device, e.g. `egse.dummy.DummyProxy`.
    pub fn class_path(&self) -> Option<&str> {
        self.device.as_str().map(|s| s.strip_prefix("class//").unwrap_or(s))
    }

    /// The device id as text, if any.
    pub fn id_text(&self) -> Option<String> {
        match &self.device_id {
            Some(Value::Str(s)) => Some(s.clone()),
            Some(Value::Int(i)) => Some(i.to_string()),
            _ => None,
        }
    }

    /// The device args as strings (for argv templates).
    pub fn args_text(&self) -> Vec<String> {
        match &self.device_args {
            Some(Value::List(items) | Value::Tuple(items)) => items
                .iter()
                .map(|v| match v {
                    Value::Str(s) => s.clone(),
                    other => crate::protocol::py_repr(other),
                })
                .collect(),
            _ => Vec::new(),
        }
    }
}

impl Node {
    /// Parse Setup YAML text; the `Setup:` top-level key is used when present, as CGSE does.
    pub fn from_yaml(text: &str, path: &str) -> Result<Node, SetupError> {
        let doc: Json = serde_saphyr::from_str(text).map_err(|e| SetupError::Yaml {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        // As `Setup.from_yaml_file`: a `Setup` key is the Setup (its siblings are ignored), else the whole
        // document is.
        let doc = match doc {
            Json::Object(mut m) => match m.shift_remove("Setup") {
                Some(inner @ Json::Object(_)) => inner,
                Some(Json::Null) => Json::Object(Default::default()),
                Some(_) => return Err(SetupError::NotAMapping),
                None => Json::Object(m),
            },
            Json::Null => Json::Object(Default::default()),
            _ => return Err(SetupError::NotAMapping),
        };
        Ok(from_json(doc))
    }

    /// Read a Setup YAML file.
    pub fn from_file(path: &Path) -> Result<Node, SetupError> {
        let text = std::fs::read_to_string(path).map_err(|e| SetupError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Node::from_yaml(&text, &path.display().to_string())
    }

    /// Convert a decoded `egse.setup.Setup` (a dict subclass: its items come before BUILD) or any dict.
    pub fn from_pickle(v: &Value) -> Result<Node, SetupError> {
        match to_node(v) {
            n @ Node::Map(_) => Ok(n),
            Node::Leaf(_) => Err(SetupError::NotAMapping),
        }
    }

    /// `Setup.find_devices`: depth first, YAML order; a node with both `device` and `device_name` is a
    /// device (and is not searched further); a later duplicate name overwrites an earlier one in place.
    pub fn devices(&self) -> Vec<Device> {
        let mut out: Vec<Device> = Vec::new();
        walk(self, &|n| n.has("device") && n.has("device_name"), &mut |d| match out
            .iter_mut()
            .find(|e| e.name_value == d.name_value)
        {
            Some(e) => *e = d,
            None => out.push(d),
        });
        out
    }

    /// The nodes `Setup.find_device_ids` lists, in walk order, duplicates included: a node is one when it
    /// has `device`, `device_id` and `device_name`; any other mapping is searched further, so devices below
    /// a device node without an id are found too (unlike [`Node::devices`]).
    pub fn device_nodes(&self) -> Vec<Device> {
        let mut out = Vec::new();
        walk(
            self,
            &|n| n.has("device") && n.has("device_id") && n.has("device_name"),
            &mut |d| out.push(d),
        );
        out
    }

    fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    fn get(&self, key: &str) -> Option<&Node> {
        match self {
            Node::Map(items) => items.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v),
            Node::Leaf(_) => None,
        }
    }

    /// The site id and setup id, if the Setup carries them.
    pub fn leaf(&self, key: &str) -> Option<&Value> {
        match self.get(key) {
            Some(Node::Leaf(v)) => Some(v),
            _ => None,
        }
    }
}

/// The walk both CGSE functions share: every mapping value, depth first in YAML order; one that
/// `is_device` accepts is reported and not searched further, any other is searched.
fn walk(node: &Node, is_device: &dyn Fn(&Node) -> bool, found: &mut dyn FnMut(Device)) {
    let Node::Map(items) = node else { return };
    for (_, sub) in items {
        let Node::Map(_) = sub else { continue };
        if is_device(sub) {
            let raw = |k: &str| match sub.get(k) {
                Some(Node::Leaf(v)) => Some(v.clone()),
                Some(n @ Node::Map(_)) => Some(node_value(n)),
                None => None,
            };
            let name_value = raw("device_name").unwrap_or(Value::None);
            let name = match &name_value {
                Value::Str(s) => s.clone(),
                other => crate::protocol::py_repr(other),
            };
            found(Device {
                name,
                name_value,
                device: raw("device").unwrap_or(Value::None),
                device_id: raw("device_id"),
                device_args: raw("device_args"),
            });
        } else {
            walk(sub, is_device, found);
        }
    }
}

/// `get_devices` reply: `{device_name: (device, device_id or None, device_args)}`.
pub fn devices_reply(devices: &[Device]) -> Value {
    Value::Dict(
        devices
            .iter()
            .map(|d| {
                (
                    d.name_value.clone(),
                    Value::Tuple(vec![
                        d.device.clone(),
                        d.device_id.clone().unwrap_or(Value::None),
                        d.wire_args(),
                    ]),
                )
            })
            .collect(),
    )
}

/// `get_device_ids` reply: `{device_id: (device_name, device, device_args)}` for devices with an id.
/// Give it [`Node::device_nodes`]: [`Node::devices`] neither descends below an id-less device nor keeps a
/// device whose name a later one reuses.
pub fn device_ids_reply(devices: &[Device]) -> Value {
    let mut items: Vec<(Value, Value)> = Vec::new();
    for d in devices {
        let Some(id) = d.device_id.clone() else { continue };
        let v = Value::Tuple(vec![d.name_value.clone(), d.device.clone(), d.wire_args()]);
        match items.iter_mut().find(|(k, _)| *k == id) {
            Some(e) => e.1 = v,
            None => items.push((id, v)),
        }
    }
    Value::Dict(items)
}

fn from_json(j: Json) -> Node {
    match j {
        Json::Object(m) => Node::Map(m.into_iter().map(|(k, v)| (k, from_json(v))).collect()),
        other => Node::Leaf(crate::protocol::from_json(other)),
    }
}

fn to_node(v: &Value) -> Node {
    let items: Option<&[(Value, Value)]> = match v {
        Value::Dict(items) => Some(items),
        Value::Object(o) if !o.dict_items.is_empty() || o.state.is_some() && o.list_items.is_empty() => {
            Some(&o.dict_items)
        }
        _ => None,
    };
    match items {
        Some(items) => Node::Map(
            items
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| crate::protocol::py_repr(k)),
                        to_node(v),
                    )
                })
                .collect(),
        ),
        None => Node::Leaf(v.clone()),
    }
}

fn node_value(n: &Node) -> Value {
    match n {
        Node::Leaf(v) => v.clone(),
        Node::Map(items) => Value::Dict(items.iter().map(|(k, v)| (Value::str(k), node_value(v))).collect()),
    }
}

/// What [`SetupSource::current`] returns.
pub type SetupFuture<'a> = crate::util::BoxFuture<'a, Option<std::sync::Arc<Node>>>;

/// Where the current Setup comes from: the Configuration Manager (with a cache), or a local file.
pub trait SetupSource: Send + Sync {
    /// The current Setup; `None` when no source has one (the device tables are then empty).
    fn current(&self) -> SetupFuture<'_>;
    /// Where the Setup comes from now, for logs and status.
    fn describe(&self) -> String;
}

/// The embedded default: a local Setup YAML file — `Procman.SETUP_FILE`, else the Setup named by
/// `<data>/last_setup_id.txt` under the configuration data location (as the Configuration Manager finds
/// it) — re-read when the file changes.
pub struct LocalSetup {
    explicit: Option<std::path::PathBuf>,
    conf_dir: Option<std::path::PathBuf>,
    last_id_file: Option<std::path::PathBuf>,
    site_id: String,
    cache: std::sync::Mutex<Option<(std::path::PathBuf, std::time::SystemTime, std::sync::Arc<Node>)>>,
}

impl LocalSetup {
    /// `explicit` (`Procman.SETUP_FILE`) if given, else the Setup numbered in `<data_dir>/last_setup_id.txt`,
    /// found under `conf_dir` for `site_id`.
    pub fn new(
        explicit: Option<std::path::PathBuf>,
        conf_dir: Option<std::path::PathBuf>,
        data_dir: Option<std::path::PathBuf>,
        site_id: String,
    ) -> LocalSetup {
        LocalSetup {
            explicit,
            conf_dir,
            last_id_file: data_dir.map(|d| d.join("last_setup_id.txt")),
            site_id,
            cache: std::sync::Mutex::new(None),
        }
    }

    /// The file to read now, if any.
    pub fn path(&self) -> Option<std::path::PathBuf> {
        if let Some(p) = &self.explicit {
            return Some(p.clone());
        }
        let id: u32 = std::fs::read_to_string(self.last_id_file.as_ref()?)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        find_setup_file(self.conf_dir.as_ref()?, &self.site_id, id)
    }

    /// Read (or reuse) the Setup; errors are logged and give `None`.
    pub fn load(&self) -> Option<std::sync::Arc<Node>> {
        let path = self.path()?;
        let mtime = std::fs::metadata(&path).and_then(|m| m.modified()).ok()?;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((p, t, n)) = cache.as_ref() {
            if *p == path && *t == mtime {
                return Some(n.clone());
            }
        }
        match Node::from_file(&path) {
            Ok(n) => {
                let n = std::sync::Arc::new(n);
                *cache = Some((path, mtime, n.clone()));
                Some(n)
            }
            Err(e) => {
                tracing::warn!(error = %e, "local Setup unusable");
                None
            }
        }
    }
}

impl SetupSource for LocalSetup {
    fn current(&self) -> SetupFuture<'_> {
        Box::pin(async move { self.load() })
    }

    fn describe(&self) -> String {
        match self.path() {
            Some(p) => format!("local Setup file {}", p.display()),
            None => "no Setup (no Configuration Manager and no local Setup file)".to_owned(),
        }
    }
}

/// `SETUP_<SITE>_<NNNNN>_<YYMMDD>_<HHMMSS>.yaml` under `dir` (searched recursively, like the CM).
pub fn find_setup_file(dir: &Path, site_id: &str, id: u32) -> Option<std::path::PathBuf> {
    let prefix = format!("SETUP_{site_id}_{id:05}_");
    let mut stack = vec![dir.to_path_buf()];
    let mut found = Vec::new();
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(name) = p.file_name().and_then(|n| n.to_str()) {
                if name.starts_with(&prefix) && name.ends_with(".yaml") {
                    found.push(p);
                }
            }
        }
    }
    found.sort();
    found.pop()
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
Setup:
    site_id: LAB42
    history:
        "0": Zero Setup, no devices
    gse:
        dummy:
            device: class//egse.dummy.DummyProxy
            device_name: Dummy Device
            device_id: DUMMY_01
            ID: 42
        hexapod:
            device: class//egse.hexapod.symetrie.puna.PunaProxy
            device_name: PUNA Hexapod
            device_id: PUNA_01
            device_args: [PUNA_01]
        aeu:
            psu1:
                device: class//egse.aeu.aeu.PSUProxy
                device_args: [1]
                device_name: AEU PSU1
                device_id: AEU_PSU1
            crio:
                device: class//egse.aeu.aeu.CRIOProxy
                device_name: AEU cRIO
    sut:
        ID: SUT_A
"#;

    #[test]
    fn walk_matches_cgse() {
        let n = Node::from_yaml(EXAMPLE, "example").unwrap();
        let devices = n.devices();
        assert_eq!(
            devices_reply(&devices),
            Value::Dict(vec![
                (
                    Value::str("Dummy Device"),
                    Value::Tuple(vec![
                        Value::str("class//egse.dummy.DummyProxy"),
                        Value::str("DUMMY_01"),
                        Value::Tuple(vec![])
                    ])
                ),
                (
                    Value::str("PUNA Hexapod"),
                    Value::Tuple(vec![
                        Value::str("class//egse.hexapod.symetrie.puna.PunaProxy"),
                        Value::str("PUNA_01"),
                        Value::List(vec![Value::str("PUNA_01")])
                    ])
                ),
                (
                    Value::str("AEU PSU1"),
                    Value::Tuple(vec![
                        Value::str("class//egse.aeu.aeu.PSUProxy"),
                        Value::str("AEU_PSU1"),
                        Value::List(vec![Value::Int(1)])
                    ])
                ),
                (
                    Value::str("AEU cRIO"),
                    Value::Tuple(vec![
                        Value::str("class//egse.aeu.aeu.CRIOProxy"),
                        Value::None,
                        Value::Tuple(vec![])
                    ])
                ),
            ])
        );
        let Value::Dict(ids) = device_ids_reply(&devices) else {
            panic!()
        };
        let keys: Vec<_> = ids.iter().map(|(k, _)| k.as_str().unwrap()).collect();
        assert_eq!(keys, ["DUMMY_01", "PUNA_01", "AEU_PSU1"]);
        assert_eq!(devices[0].class_path(), Some("egse.dummy.DummyProxy"));
    }

    #[test]
    fn ids_come_from_every_device_node_even_a_renamed_one() {
        let yaml = "Setup:\n  a:\n    device: class//x.A\n    device_name: Same\n    device_id: A_01\n  b:\n    device: class//x.B\n    device_name: Same\n    device_id: B_01\n  c:\n    device: class//x.C\n    device_name: Other\n    device_id: A_01\n";
        let n = Node::from_yaml(yaml, "dup").unwrap();
        let names: Vec<_> = n.devices().iter().map(|d| d.name.clone()).collect();
        assert_eq!(names, ["Same", "Other"]);
        let Value::Dict(ids) = device_ids_reply(&n.device_nodes()) else {
            panic!()
        };
        // A_01 keeps its first position and takes the later node's value, as a Python dict does.
        let keys: Vec<_> = ids.iter().map(|(k, _)| k.as_str().unwrap()).collect();
        assert_eq!(keys, ["A_01", "B_01"]);
        assert_eq!(
            ids[0].1,
            Value::Tuple(vec![
                Value::str("Other"),
                Value::str("class//x.C"),
                Value::Tuple(vec![])
            ])
        );
    }

    fn keys(v: &Value) -> Vec<Value> {
        let Value::Dict(items) = v else { panic!("{v:?}") };
        items.iter().map(|(k, _)| k.clone()).collect()
    }

    // The cases below came from the differential test against CGSE (`tests/python/test_setup_walk.py`).

    #[test]
    fn ids_are_found_below_a_device_without_an_id() {
        let yaml = "Setup:\n  aeu:\n    device: class//x.AEU\n    device_name: AEU\n    psu:\n      device: class//x.PSU\n      device_name: PSU\n      device_id: PSU_01\n";
        let n = Node::from_yaml(yaml, "nested").unwrap();
        // find_devices stops at the outer device, find_device_ids does not.
        assert_eq!(keys(&devices_reply(&n.devices())), [Value::str("AEU")]);
        assert_eq!(keys(&device_ids_reply(&n.device_nodes())), [Value::str("PSU_01")]);
    }

    #[test]
    fn a_node_missing_a_field_is_searched_and_lists_of_mappings_are_not() {
        let yaml = r#"{"Setup": {
            "half": {"device_id": "H", "device_name": "Half", "inner": {"device": 1, "device_name": "In", "device_id": "I"}},
            "noname": {"device": "d", "device_id": "N", "deeper": {"device": 2, "device_name": 7, "device_id": 3}},
            "listed": [{"device": 3, "device_name": "L", "device_id": "L"}]
        }}"#;
        let n = Node::from_yaml(yaml, "shapes").unwrap();
        let devices = devices_reply(&n.devices());
        assert_eq!(keys(&devices), [Value::str("In"), Value::Int(7)]);
        assert_eq!(
            keys(&device_ids_reply(&n.device_nodes())),
            [Value::str("I"), Value::Int(3)]
        );
        // A non-string name stays what it is, in the key and in the id entry.
        let Value::Dict(ids) = device_ids_reply(&n.device_nodes()) else {
            panic!()
        };
        assert_eq!(
            ids[1].1,
            Value::Tuple(vec![Value::Int(7), Value::Int(2), Value::Tuple(vec![])])
        );
    }

    #[test]
    fn a_null_id_is_an_id_and_the_setup_key_wins_over_its_siblings() {
        let yaml = "Other:\n  o: {device: o, device_name: O, device_id: O}\nSetup:\n  a: {device: a, device_name: A, device_id: null}\n";
        let n = Node::from_yaml(yaml, "siblings").unwrap();
        assert_eq!(keys(&devices_reply(&n.devices())), [Value::str("A")]);
        assert_eq!(keys(&device_ids_reply(&n.device_nodes())), [Value::None]);
        assert!(Node::from_yaml("Setup: 3\n", "x").is_err());
        assert!(Node::from_yaml("Setup:\n", "x").unwrap().devices().is_empty());
    }

    #[test]
    fn empty_and_bad_setups() {
        assert!(Node::from_yaml("", "x").unwrap().devices().is_empty());
        assert!(Node::from_yaml("Setup:\n  a: [1, 2]\n", "x")
            .unwrap()
            .devices()
            .is_empty());
        assert!(Node::from_yaml("- a\n- b\n", "x").is_err());
        assert!(Node::from_yaml("Setup: [", "x").is_err());
    }
}
