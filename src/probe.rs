//! Is a control server alive? A `Ping` on its commanding endpoint, found directly or through a locator
//! (the Service Registry). Used for readiness checks and the status commands.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::client::ControlClient;
use crate::codec::Value;
use crate::supervisor::{PingTarget, ProcessDefinition, ReadinessProbe};

/// A boxed future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Finds the commanding endpoint of a service type (`SM_CS`, `DUMMY_01`…), e.g. in the registry.
pub trait Locator: Send + Sync {
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
    pub fn new(locator: Arc<dyn Locator>, timeout: Duration) -> Pinger {
        Pinger { locator, timeout }
    }

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
        }
    }

    /// Call a command of the control server at `endpoint` if it announces it (e.g. `is_connected`).
    pub async fn call_if_announced(&self, endpoint: &str, name: &str) -> Option<Value> {
        let mut c = ControlClient::new(endpoint, self.timeout);
        c.load_commands().await.ok()?;
        c.command(name)?;
        c.call(name, vec![], vec![]).await.ok()
    }
}

impl ReadinessProbe for Pinger {
    fn probe(&self, def: &ProcessDefinition) -> Pin<Box<dyn Future<Output = bool> + Send + 'static>> {
        let me = self.clone();
        let target = def.readiness.as_ref().map(|r| r.ping.clone());
        Box::pin(async move {
            let Some(target) = target else { return true };
            match me.endpoint_of(&target).await {
                Some(ep) => me.ping(&ep).await,
                None => false,
            }
        })
    }
}
