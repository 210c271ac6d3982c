//! The commanding table's process-management commands.

use std::sync::Arc;

use crate::codec::Value;
use crate::server::{Call, CommandError, Handler, HandlerFuture};
use crate::setup::{device_ids_reply, devices_reply, SetupSource};

/// The Process Manager controller.
pub struct Controller {
    core_processes: Vec<(String, String)>,
    setup: Arc<dyn SetupSource>,
}

impl Controller {
    pub fn new(core_processes: Vec<(String, String)>, setup: Arc<dyn SetupSource>) -> Controller {
        Controller { core_processes, setup }
    }

    async fn call(&self, call: Call) -> Result<Value, CommandError> {
        match call.name.as_str() {
            "get_core_processes" => {
                call.bind(&[], 0)?;
                Ok(Value::Dict(
                    self.core_processes
                        .iter()
                        .map(|(k, v)| (Value::str(k), Value::str(v)))
                        .collect(),
                ))
            }
            "get_devices" => {
                call.bind(&[], 0)?;
                Ok(self
                    .setup
                    .current()
                    .await
                    .map(|n| devices_reply(&n.devices()))
                    .unwrap_or(Value::Dict(vec![])))
            }
            "get_device_ids" => {
                call.bind(&[], 0)?;
                Ok(self
                    .setup
                    .current()
                    .await
                    .map(|n| device_ids_reply(&n.devices()))
                    .unwrap_or(Value::Dict(vec![])))
            }
            other => Err(CommandError::Failed(format!(
                "{other} needs the process supervisor, which is not configured"
            ))),
        }
    }
}

impl Handler for Controller {
    fn handle(&self, call: Call) -> HandlerFuture<'_> {
        Box::pin(self.call(call))
    }
}
