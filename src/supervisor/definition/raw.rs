//! The YAML side of the table: partial entries as written, layered and then built into definitions, and the
//! templates (`{python}`, `{device_id}`, …) their argv may use.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::*;
use crate::supervisor::error::DefinitionError;

// ---------------------------------------------------------------------------------------------------------------
// The YAML side: partial entries, layered and then built.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTable {
    pub(super) python: Option<String>,
    pub(super) allowed_programs: Option<Vec<String>>,
    pub(super) device_commands: Option<Vec<String>>,
    pub(super) defaults: Option<RawDefinition>,
    pub(super) core_services: Option<OrderedMap<RawDefinition>>,
    pub(super) device_classes: Option<BTreeMap<String, RawDefinition>>,
    pub(super) devices: Option<BTreeMap<String, RawDefinition>>,
}

/// A YAML mapping that keeps the file's order (start order of core services).
#[derive(Debug, Default)]
pub(super) struct OrderedMap<V>(pub(super) Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for OrderedMap<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V_<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for V_<V> {
            type Value = OrderedMap<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping of names to definitions")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out: Vec<(String, V)> = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, V>()? {
                    if out.iter().any(|(existing, _)| *existing == k) {
                        return Err(de::Error::custom(format!("duplicate name {k:?}")));
                    }
                    out.push((k, v));
                }
                Ok(OrderedMap(out))
            }
        }
        deserializer.deserialize_map(V_(std::marker::PhantomData))
    }
}

/// An environment value: YAML scalars of any kind become strings (`SITE_ID: 42`).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct EnvValue(String);

impl<'de> Deserialize<'de> for EnvValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Vis;
        impl Visitor<'_> for Vis {
            type Value = EnvValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_owned()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_string()))
            }
        }
        deserializer.deserialize_any(Vis)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackoff {
    pub(super) initial: Option<f64>,
    pub(super) factor: Option<f64>,
    pub(super) max: Option<f64>,
    pub(super) reset_after: Option<f64>,
    pub(super) jitter: Option<f64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCrashLoop {
    pub(super) max_starts: Option<u32>,
    pub(super) window: Option<f64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPing {
    pub(super) endpoint: Option<String>,
    pub(super) registry: Option<bool>,
    pub(super) service_type: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTcp {
    pub(super) port: u16,
    pub(super) host: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReadiness {
    pub(super) ping: Option<RawPing>,
    pub(super) tcp: Option<RawTcp>,
    pub(super) timeout: Option<f64>,
    pub(super) interval: Option<f64>,
}

/// A partial definition: every field optional, so entries can be layered.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDefinition {
    pub(super) argv: Option<Vec<String>>,
    pub(super) cwd: Option<String>,
    pub(super) env: Option<BTreeMap<String, EnvValue>>,
    pub(super) inherit_env: Option<bool>,
    pub(super) restart: Option<RestartPolicy>,
    pub(super) backoff: Option<RawBackoff>,
    pub(super) crash_loop: Option<RawCrashLoop>,
    pub(super) stop_signal: Option<String>,
    pub(super) stop_timeout: Option<f64>,
    pub(super) readiness: Option<RawReadiness>,
    pub(super) python_unbuffered: Option<bool>,
    pub(super) forking: Option<bool>,
    pub(super) sim_args: Option<Vec<String>>,
    pub(super) autostart: Option<bool>,
    pub(super) service_type: Option<String>,
    pub(super) depends_on: Option<Vec<String>>,
}

macro_rules! take {
    ($dst:expr, $src:expr, $($f:ident),+) => { $( if $src.$f.is_some() { $dst.$f = $src.$f.clone(); } )+ };
}

impl RawDefinition {
    /// Lays `top` over `self`: set fields replace, `env` maps merge, `backoff`/`crash_loop` merge per field.
    pub(super) fn overlay(&mut self, top: &RawDefinition) {
        take!(
            self,
            top,
            argv,
            cwd,
            inherit_env,
            restart,
            stop_signal,
            stop_timeout,
            readiness,
            python_unbuffered,
            forking,
            sim_args,
            autostart,
            service_type,
            depends_on
        );
        if let Some(env) = &top.env {
            let mine = self.env.get_or_insert_with(BTreeMap::new);
            mine.extend(env.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        if let Some(b) = &top.backoff {
            let mine = self.backoff.get_or_insert_with(RawBackoff::default);
            take!(mine, b, initial, factor, max, reset_after, jitter);
        }
        if let Some(c) = &top.crash_loop {
            let mine = self.crash_loop.get_or_insert_with(RawCrashLoop::default);
            take!(mine, c, max_starts, window);
        }
    }

    /// Validates the fields that are set, expanding templates against `ctx`.
    pub(super) fn check(&self, origin: &str, key: &str, ctx: &Templates<'_>) -> Result<(), DefinitionError> {
        let mut probe = self.clone();
        if probe.argv.is_none() {
            probe.argv = Some(vec!["x".to_owned()]);
        }
        probe.build("check", origin, key, ctx).map(|_| ())
    }

    pub(super) fn build(
        &self,
        id: &str,
        origin: &str,
        key: &str,
        ctx: &Templates<'_>,
    ) -> Result<ProcessDefinition, DefinitionError> {
        self.build_inner(id, origin, key, ctx, true)
    }

    pub(super) fn build_literal(
        &self,
        id: &str,
        origin: &str,
        key: &str,
        ctx: &Templates<'_>,
    ) -> Result<ProcessDefinition, DefinitionError> {
        self.build_inner(id, origin, key, ctx, false)
    }

    pub(super) fn build_inner(
        &self,
        id: &str,
        origin: &str,
        key: &str,
        ctx: &Templates<'_>,
        expand_argv: bool,
    ) -> Result<ProcessDefinition, DefinitionError> {
        let bad = |field: &str, message: String| DefinitionError::Invalid {
            origin: origin.to_owned(),
            key: format!("{key}.{field}"),
            message,
        };
        let secs = |field: &str, v: Option<f64>, default: Duration| -> Result<Duration, DefinitionError> {
            match v {
                None => Ok(default),
                Some(s) if s.is_finite() && (0.0..=1.0e9).contains(&s) => Ok(Duration::from_secs_f64(s)),
                Some(s) => Err(bad(field, format!("{s} is not a duration in seconds (≥ 0)"))),
            }
        };
        let mut def = ProcessDefinition::new(id, Vec::new());
        let argv = self
            .argv
            .clone()
            .ok_or_else(|| bad("argv", "missing: no entry gives a program".into()))?;
        def.argv = if expand_argv {
            let mut out = Vec::new();
            for (i, item) in argv.iter().enumerate() {
                out.extend(
                    ctx.expand_item(item)
                        .map_err(|m| bad(&format!("argv[{i}]"), m.to_string()))?,
                );
            }
            out
        } else {
            argv
        };
        if let Some(sim) = &self.sim_args {
            let mut out = Vec::new();
            for (i, item) in sim.iter().enumerate() {
                out.extend(
                    ctx.expand_item(item)
                        .map_err(|m| bad(&format!("sim_args[{i}]"), m.to_string()))?,
                );
            }
            def.sim_args = out;
        }
        if let Some(cwd) = &self.cwd {
            def.cwd = Some(PathBuf::from(
                ctx.expand_str(cwd).map_err(|m| bad("cwd", m.to_string()))?,
            ));
        }
        if let Some(env) = &self.env {
            for (k, v) in env {
                let value = ctx
                    .expand_str(&v.0)
                    .map_err(|m| bad(&format!("env.{k}"), m.to_string()))?;
                def.env.insert(k.clone(), value);
            }
        }
        def.inherit_env = self.inherit_env.unwrap_or(def.inherit_env);
        def.restart = self.restart.unwrap_or(def.restart);
        if let Some(b) = &self.backoff {
            def.backoff.initial = secs("backoff.initial", b.initial, def.backoff.initial)?;
            def.backoff.max = secs("backoff.max", b.max, def.backoff.max)?;
            def.backoff.reset_after = secs("backoff.reset_after", b.reset_after, def.backoff.reset_after)?;
            def.backoff.factor = b.factor.unwrap_or(def.backoff.factor);
            def.backoff.jitter = b.jitter.unwrap_or(def.backoff.jitter);
        }
        if let Some(c) = &self.crash_loop {
            def.crash_loop.max_starts = c.max_starts.unwrap_or(def.crash_loop.max_starts);
            def.crash_loop.window = secs("crash_loop.window", c.window, def.crash_loop.window)?;
        }
        if let Some(s) = &self.stop_signal {
            def.stop_signal = parse_signal(s).map_err(|m| bad("stop_signal", m.to_string()))?;
        }
        def.stop_timeout = secs("stop_timeout", self.stop_timeout, def.stop_timeout)?;
        if let Some(r) = &self.readiness {
            let ping = match (&r.ping, &r.tcp) {
                (None, Some(t)) => {
                    let host = match &t.host {
                        Some(h) => ctx
                            .expand_str(h)
                            .map_err(|m| bad("readiness.tcp.host", m.to_string()))?,
                        None => "127.0.0.1".to_owned(),
                    };
                    if host.trim().is_empty() || t.port == 0 {
                        return Err(bad("readiness.tcp", "needs a non-empty host and a port > 0".into()));
                    }
                    PingTarget::Tcp { host, port: t.port }
                }
                (Some(p), None) => self.ping_target(p, ctx, &bad)?,
                _ => return Err(bad("readiness", "give exactly one of `ping` or `tcp`".into())),
            };
            def.readiness = Some(Readiness {
                ping,
                timeout: secs("readiness.timeout", r.timeout, Duration::from_secs(30))?,
                interval: secs("readiness.interval", r.interval, Duration::from_millis(500))?,
            });
        }
        def.depends_on = self.depends_on.clone().unwrap_or_default();
        def.python_unbuffered = self.python_unbuffered.unwrap_or(def.python_unbuffered);
        def.forking = self.forking.unwrap_or(def.forking);
        def.autostart = self.autostart.unwrap_or(def.autostart);
        def.service_type = self.service_type.clone();
        def.validate().map_err(|e| match e {
            DefinitionError::Invalid { key: k, message, .. } => DefinitionError::Invalid {
                origin: origin.to_owned(),
                key: format!("{key}.{}", k.split_once('.').map_or(k.as_str(), |(_, f)| f)),
                message,
            },
            other => other,
        })?;
        Ok(def)
    }

    /// The `ping` readiness target: a fixed endpoint, or the registry under a service type.
    pub(super) fn ping_target(
        &self,
        ping: &RawPing,
        ctx: &Templates<'_>,
        bad: &dyn Fn(&str, String) -> DefinitionError,
    ) -> Result<PingTarget, DefinitionError> {
        match (&ping.endpoint, ping.registry.unwrap_or(false)) {
            (Some(ep), false) => Ok(PingTarget::Endpoint(
                ctx.expand_str(ep)
                    .map_err(|m| bad("readiness.ping.endpoint", m.to_string()))?,
            )),
            (None, true) => {
                let st = match &ping.service_type {
                    Some(st) => ctx
                        .expand_str(st)
                        .map_err(|m| bad("readiness.ping.service_type", m.to_string()))?,
                    None => match (ctx.device, &self.service_type) {
                        (_, Some(st)) => st.clone(),
                        (Some(d), None) => d.device_id.to_uppercase(),
                        (None, None) => {
                            return Err(bad(
                                "readiness.ping",
                                "registry: true needs a service_type (or a device id)".into(),
                            ))
                        }
                    },
                };
                Ok(PingTarget::Registry { service_type: st })
            }
            _ => Err(bad(
                "readiness.ping",
                "give exactly one of `endpoint` or `registry: true`".into(),
            )),
        }
    }
}

/// A signal name that is not one (`stop_signal`, the signal files).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown signal {0:?}")]
pub struct UnknownSignal(pub String);

/// A template in a definition that cannot be expanded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// `{` without its `}`.
    #[error("unclosed '{{' in {0:?}")]
    Unclosed(String),
    /// `}` without its `{`.
    #[error("unmatched '}}' in {0:?} (write '}}}}' for a brace)")]
    Unmatched(String),
    /// `{device_args}` inside a longer string: it expands to several argv items.
    #[error("{{device_args}} must be a whole argv item, not part of {0:?}")]
    DeviceArgsNotWhole(String),
    /// A name we do not know.
    #[error("unknown template {{{0}}} (known: {TEMPLATE_NAMES})")]
    Unknown(String),
    /// A device template outside a device entry.
    #[error("device templates are only allowed in device entries")]
    DeviceOnly,
}

pub(crate) fn parse_signal(s: &str) -> Result<Signal, UnknownSignal> {
    let upper = s.trim().to_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<Signal>().map_err(|_| UnknownSignal(s.to_owned()))
}

/// Template values: `{python}` always, the device ones only for device entries.
pub(super) struct Templates<'a> {
    pub(super) python: &'a str,
    pub(super) device: Option<&'a DeviceSpec>,
}

pub(super) const TEMPLATE_NAMES: &str = "{python}, {device_id}, {device_name}, {device_args}, {arg0}";

impl Templates<'_> {
    /// Expands one argv item into zero or more items: `{device_args}` alone becomes one item per argument,
    /// `{arg0}` alone disappears when there are no arguments.
    pub(super) fn expand_item(&self, item: &str) -> Result<Vec<String>, TemplateError> {
        match item {
            "{device_args}" => Ok(self.device()?.device_args.clone()),
            "{arg0}" => Ok(self.device()?.device_args.first().cloned().into_iter().collect()),
            _ => Ok(vec![self.expand_str(item)?]),
        }
    }

    /// Expands `{name}` inside a string; `{{` and `}}` are literal braces.
    pub(super) fn expand_str(&self, s: &str) -> Result<String, TemplateError> {
        let mut out = String::with_capacity(s.len());
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    out.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    out.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(ch) => name.push(ch),
                            None => return Err(TemplateError::Unclosed(s.to_owned())),
                        }
                    }
                    out.push_str(&self.value(&name, s)?);
                }
                '}' => return Err(TemplateError::Unmatched(s.to_owned())),
                _ => out.push(c),
            }
        }
        Ok(out)
    }

    pub(super) fn value(&self, name: &str, whole: &str) -> Result<String, TemplateError> {
        match name {
            "python" => Ok(self.python.to_owned()),
            "device_id" => Ok(self.device()?.device_id.clone()),
            "device_name" => Ok(self.device()?.device_name.clone()),
            "arg0" => Ok(self.device()?.device_args.first().cloned().unwrap_or_default()),
            "device_args" => Err(TemplateError::DeviceArgsNotWhole(whole.to_owned())),
            other => Err(TemplateError::Unknown(other.to_owned())),
        }
    }

    pub(super) fn device(&self) -> Result<&DeviceSpec, TemplateError> {
        self.device.ok_or(TemplateError::DeviceOnly)
    }
}
