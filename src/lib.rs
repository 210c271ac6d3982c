//! procman: the CGSE Process Manager control server (`pm_cs`) in Rust.
//!
//! # Layout
//!
//! Bytes come in on a socket and go out as a reply; each step is one module:
//!
//! - [`transport`]: the zmq.rs sockets (ROUTER for the commanding and service ports, PUB for monitoring)
//!   and the REQ/DEALER clients. Nothing else touches zmq.rs.
//! - [`codec`]: our pickle codec. Bytes ⇄ [`codec::Value`]; class references stay opaque; bounded.
//! - [`protocol`]: what values mean on the wire: requests, `Failure` replies, the command tables.
//! - [`server`]: the dispatcher (built-ins, table commands → a [`server::Handler`]) and the request loop.
//! - [`service`]: the service socket's 12 commands. [`controller`]: the commanding socket's commands.
//! - [`monitor`] / [`housekeeping`]: the status dict and the housekeeping record, from `/proc`.
//! - [`setup`]: the Setup's device walk.
//! - [`cgse`]: the CGSE core services the daemon talks to, each with an embedded default when it is
//!   absent (Service Registry, Configuration Manager, Storage Manager and the local CSV sink).
//! - [`supervisor`]: owns the processes it starts (state machines, reaper, logs, re-adoption);
//!   [`probe`]: is a control server alive (a `Ping`, found directly or through the registry).
//! - [`daemon`]: binds, runs and shuts everything down in order; [`assemble`] wires the integrations.
//! - [`config`]: the only reader of settings files and CGSE environment variables.
//! - [`client`]: a control-server client (our CLI, the Python proxy, peers). [`cli`]: the commands.
//! - [`proxy`] / [`objects`]: the logic of the Python `ProcessManagerProxy` and the allow-list of classes
//!   replies may become; the pyo3 layer itself (`bindings`, feature `python`) only converts and delegates.
//! - [`logging`]: tracing to stderr, with levels settable at run time. [`notify`]: systemd's notify protocol.

// Nothing a peer or a file sends may panic the daemon, and only the command-line edge prints.
#![cfg_attr(
    not(test),
    warn(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout, clippy::print_stderr)
)]
#![warn(missing_docs)]

pub mod assemble;
#[cfg(feature = "python")]
mod bindings;
pub mod cgse;
pub mod cli;
pub mod client;
pub mod codec;
pub mod config;
pub mod controller;
pub mod daemon;
pub mod housekeeping;
pub mod logging;
pub mod monitor;
pub mod notify;
pub mod objects;
pub mod probe;
pub mod protocol;
pub mod proxy;
pub mod server;
pub mod service;
pub mod setup;
pub mod supervisor;
pub mod transport;
pub mod util;
