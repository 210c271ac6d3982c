//! Is a control server alive? A `Ping` on its commanding endpoint, found directly or through a locator
//! (the Service Registry). Used for readiness checks and the status commands.

use std::sync::Arc;
use std::time::Duration;

use crate::client::ControlClient;
use crate::codec::Value;
use crate::supervisor::{PingTarget, ProcessDefinition, ReadinessProbe};

pub use crate::util::BoxFuture;

/// Finds the commanding endpoint of a service type (`SM_CS`, `DUMMY_01`…), e.g. in the registry.
pub trait Locator: Send + Sync {
    /// The endpoint, or None when it cannot be found now.
    fn commanding_endpoint(&self, service_type: &str) -> BoxFuture<'_, Option<String>>;
}

/// No registry: nothing can be located.
pub struct NoLocator;

impl Locator for NoLocator {
    fn commanding_endpoint(&self, _service_type: &str) -> BoxFuture<'_, Option<String>> {
        Box::pin(async { None })
    }
}

/// Pings control servers.
#[derive(Clone)]
pub struct Pinger {
    locator: Arc<dyn Locator>,
    timeout: Duration,
}

impl Pinger {
    /// Pings with `timeout`, locating services through `locator`.
    pub fn new(locator: Arc<dyn Locator>, timeout: Duration) -> Pinger {
        Pinger { locator, timeout }
    }

    /// How services are located.
    pub fn locator(&self) -> &Arc<dyn Locator> {
        &self.locator
    }

    /// `Ping` → `Pong` on `endpoint`.
    pub async fn ping(&self, endpoint: &str) -> bool {
        ControlClient::new(endpoint, self.timeout).ping(self.timeout).await
    }

    /// The endpoint a readiness target names, if it can be found now.
    pub async fn endpoint_of(&self, target: &PingTarget) -> Option<String> {
        match target {
            PingTarget::Endpoint(e) => Some(e.clone()),
            PingTarget::Registry { service_type } => self.locator.commanding_endpoint(service_type).await,
            // Not a control server: readiness is a TCP connection (see `probe`), there is nothing to ping.
            PingTarget::Tcp { .. } => None,
        }
    }

    /// `Ping` the control server at `endpoint`, then call those of `names` it announces (e.g.
    /// `is_connected`), all on one connection. None: no `Pong`. Per name: its reply, or None when it is
    /// not announced or failed.
    pub async fn ping_and_ask(&self, endpoint: &str, names: &[&str]) -> Option<Vec<Option<Value>>> {
        let mut c = ControlClient::new(endpoint, self.timeout);
        if !c.ping(self.timeout).await {
            return None;
        }
        let mut answers = vec![None; names.len()];
        if names.is_empty() || c.load_commands().await.is_err() {
            return Some(answers);
        }
        for (slot, name) in answers.iter_mut().zip(names) {
            if c.command(name).is_some() {
                *slot = c.call(name, vec![], vec![]).await.ok();
            }
        }
        Some(answers)
    }
}

impl ReadinessProbe for Pinger {
    fn probe(&self, def: &ProcessDefinition) -> BoxFuture<'static, bool> {
        let me = self.clone();
        let target = def.readiness.as_ref().map(|r| r.ping.clone());
        Box::pin(async move {
            let Some(target) = target else { return true };
            if let PingTarget::Tcp { host, port } = &target {
                return crate::supervisor::readiness::tcp_accepts(host, *port, me.timeout).await;
            }
            match me.endpoint_of(&target).await {
                Some(ep) => me.ping(&ep).await,
                None => false,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Mutex;

    use bytes::Bytes;
    use zeromq::{SocketRecv, SocketSend, ZmqMessage};

    use crate::codec::{self, Limits, Object, ObjectKind};
    use crate::protocol::Request;
    use crate::transport;

    fn command_object(name: &str) -> Value {
        Value::Object(Box::new(Object {
            class: Value::global("egse.command", "ClientServerCommand"),
            kind: ObjectKind::NewObj,
            args: vec![],
            kwargs: vec![],
            state: Some(Value::dict([("_name", Value::str(name))])),
            list_items: vec![],
            dict_items: vec![],
        }))
    }

    /// A device control server announcing `is_connected` (false) and `is_simulator_mode` (true) when
    /// `announce`; records the connection (ROUTER peer id) and name of every request.
    async fn fake_device(announce: bool, seen: Arc<Mutex<Vec<(Bytes, String)>>>) -> (u16, tokio::task::JoinHandle<()>) {
        let (mut router, port) = transport::bind_router("tcp", "127.0.0.1", 0, "device").await.unwrap();
        let task = tokio::spawn(async move {
            while let Ok(m) = router.recv().await {
                let mut f = m.into_vec();
                let req = Request::from_value(codec::decode(f.last().unwrap(), &Limits::default()).unwrap());
                let name = req.name.clone().unwrap_or_default();
                seen.lock().unwrap().push((f[0].clone(), name.clone()));
                let reply = match name.as_str() {
                    "Ping" => Value::str("Pong"),
                    "send_commands" if announce => Value::dict([
                        ("is_connected", command_object("is_connected")),
                        ("is_simulator_mode", command_object("is_simulator_mode")),
                    ]),
                    "send_commands" => Value::Dict(vec![]),
                    "is_connected" => Value::Bool(false),
                    "is_simulator_mode" => Value::Bool(true),
                    other => crate::protocol::invalid_command(other),
                };
                f.pop();
                f.push(Bytes::from(codec::encode(&reply)));
                let _ = router.send(ZmqMessage::try_from(f).unwrap()).await;
            }
        });
        (port, task)
    }

    fn pinger() -> Pinger {
        Pinger::new(Arc::new(NoLocator), Duration::from_millis(500))
    }

    #[tokio::test]
    async fn ping_and_ask_uses_one_connection_and_asks_only_what_is_announced() {
        let seen = Arc::new(Mutex::new(vec![]));
        let (port, task) = fake_device(true, seen.clone()).await;
        let ep = format!("tcp://127.0.0.1:{port}");
        let answers = pinger()
            .ping_and_ask(&ep, &["is_connected", "is_simulator_mode", "not_announced"])
            .await;
        assert_eq!(
            answers,
            Some(vec![Some(Value::Bool(false)), Some(Value::Bool(true)), None])
        );
        let seen = seen.lock().unwrap().clone();
        let names: Vec<&str> = seen.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(names, ["Ping", "send_commands", "is_connected", "is_simulator_mode"]);
        let connections: HashSet<&Bytes> = seen.iter().map(|(peer, _)| peer).collect();
        assert_eq!(connections.len(), 1, "one connection for the whole status");
        task.abort();
    }

    #[tokio::test]
    async fn ping_and_ask_without_announced_commands_or_without_a_server() {
        let seen = Arc::new(Mutex::new(vec![]));
        let (port, task) = fake_device(false, seen.clone()).await;
        let ep = format!("tcp://127.0.0.1:{port}");
        let answers = pinger().ping_and_ask(&ep, &["is_connected", "is_simulator_mode"]).await;
        assert_eq!(answers, Some(vec![None, None]));
        assert_eq!(seen.lock().unwrap().len(), 2, "Ping and send_commands only");
        task.abort();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(pinger().ping_and_ask(&ep, &["is_connected"]).await, None);
    }
}
