//! A client of CGSE control servers: what our CLI, the Python proxy, the readiness probe and the
//! Storage/Configuration Manager clients use to talk pickle over REQ-REP.

use std::time::Duration;

use crate::codec::{self, Limits, Value};
use crate::protocol;
use crate::transport::{ReqClient, TransportError};

/// Why a request got no usable reply.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No reply: no connection, a failed send, or a timeout.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The reply is not a pickle we can decode.
    #[error("cannot decode the reply from {endpoint}: {source}")]
    Decode {
        /// The server.
        endpoint: String,
        /// The codec's error.
        source: codec::CodecError,
    },
    /// The command is not among those loaded from the server's `send_commands` reply.
    #[error("{endpoint} has no command '{name}'")]
    NoSuchCommand {
        /// The server.
        endpoint: String,
        /// The command.
        name: String,
    },
    /// The reply decoded but is not what the request calls for.
    #[error("unexpected reply from {endpoint}: {detail}")]
    Unexpected {
        /// The server.
        endpoint: String,
        /// What was wrong with it.
        detail: String,
    },
}

impl ClientError {
    /// True when the server did not answer (down, unreachable or too slow).
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            ClientError::Transport(TransportError::Timeout { .. } | TransportError::Connect { .. })
        )
    }

    /// True when the request may have reached the server although no usable reply came back.
    pub fn maybe_delivered(&self) -> bool {
        match self {
            ClientError::Transport(t) => t.maybe_delivered(),
            ClientError::Decode { .. } | ClientError::Unexpected { .. } => true,
            ClientError::NoSuchCommand { .. } => false,
        }
    }
}

pub use crate::protocol::command_execution;

/// A connection to one control-server REQ-REP endpoint, with the commands it announced.
pub struct ControlClient {
    req: ReqClient,
    timeout: Duration,
    limits: Limits,
    commands: Option<Vec<(Value, Value)>>,
}

impl ControlClient {
    /// A client of `endpoint` with `timeout` per request; nothing connects before the first request.
    pub fn new(endpoint: impl Into<String>, timeout: Duration) -> ControlClient {
        ControlClient {
            req: ReqClient::new(endpoint),
            timeout,
            limits: Limits::default(),
            commands: None,
        }
    }

    /// The server's endpoint.
    pub fn endpoint(&self) -> &str {
        self.req.endpoint()
    }

    /// The default reply timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Bound the connection phase separately, so that a peer that is down costs little.
    pub fn set_connect_timeout(&mut self, limit: Duration) {
        self.req.set_connect_timeout(limit);
    }

    /// Fail at once when nothing listens (for callers that retry on their own).
    pub fn set_refused_is_final(&mut self, yes: bool) {
        self.req.set_refused_is_final(yes);
    }

    /// Drop the socket; the next request reconnects.
    pub fn reset(&mut self) {
        self.req.reset();
    }

    /// Send a value, return the decoded reply. A `Failure` reply is a successful round trip.
    pub async fn request(&mut self, v: &Value) -> Result<Value, ClientError> {
        let timeout = self.timeout;
        self.request_with_timeout(v, timeout).await
    }

    /// [`ControlClient::request`] with another reply timeout.
    pub async fn request_with_timeout(&mut self, v: &Value, timeout: Duration) -> Result<Value, ClientError> {
        let reply = self.req.request(codec::encode(v), timeout).await?;
        codec::decode(&reply, &self.limits).map_err(|source| ClientError::Decode {
            endpoint: self.endpoint().to_owned(),
            source,
        })
    }

    /// `Ping` → `Pong` within `timeout`.
    pub async fn ping(&mut self, timeout: Duration) -> bool {
        matches!(self.request_with_timeout(&Value::str("Ping"), timeout).await, Ok(Value::Str(s)) if s == "Pong")
    }

    /// Ask for the command table (`send_commands`) and keep it.
    pub async fn load_commands(&mut self) -> Result<Vec<String>, ClientError> {
        match self.request(&Value::str("send_commands")).await? {
            Value::Dict(items) => {
                let names = items
                    .iter()
                    .filter_map(|(k, _)| k.as_str().map(str::to_owned))
                    .collect();
                self.commands = Some(items);
                Ok(names)
            }
            other => Err(ClientError::Unexpected {
                endpoint: self.endpoint().to_owned(),
                detail: format!("send_commands returned {}", protocol::py_repr(&other)),
            }),
        }
    }

    /// The loaded command objects.
    pub fn commands(&self) -> Option<&[(Value, Value)]> {
        self.commands.as_deref()
    }

    /// The command object announced under `name`.
    pub fn command(&self, name: &str) -> Option<&Value> {
        self.commands
            .as_ref()?
            .iter()
            .find(|(k, _)| k.as_str() == Some(name))
            .map(|(_, v)| v)
    }

    /// Call a command by name with a `CommandExecution`, loading the command table first if needed.
    pub async fn call(
        &mut self,
        name: &str,
        args: Vec<Value>,
        kwargs: Vec<(Value, Value)>,
    ) -> Result<Value, ClientError> {
        if self.command(name).is_none() {
            self.load_commands().await?;
        }
        let cmd = self.command(name).cloned().ok_or_else(|| ClientError::NoSuchCommand {
            endpoint: self.endpoint().to_owned(),
            name: name.to_owned(),
        })?;
        self.request(&command_execution(cmd, args, kwargs)).await
    }
}
