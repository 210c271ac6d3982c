//! The CGSE core services procman talks to, one module per peer.
//!
//! Each peer has the same shape: a client that connects afresh per request (zmq.rs never notices a
//! restarted peer on an idle socket), an embedded default the daemon falls back to when the peer is
//! absent, and the background task that keeps the two in step. Nothing here runs on the request path.
//!
//! - [`registry`]: the Service Registry (register, heartbeat, deregister, discovery).
//! - [`confman`]: the Setup from the Configuration Manager, else the cached or local Setup.
//! - [`storage_manager`]: housekeeping through the Storage Manager, else [`storage`]'s daily CSV file.
//! - [`storage`]: where housekeeping goes ([`storage::HousekeepingSink`]) and the local CSV default.
//! - [`logger`]: our log records to the Logger (`log_cs`, the lab's `general.log`); local output stays.
//! - [`metrics_hub`]: housekeeping as data points to the Metrics Hub, next to the Storage Manager.
//! - [`signals`]: the command files CGSE writes to `/tmp/cgse_signals` (`reregister`).
//! - [`push`]: the bounded, never-blocking PUSH sender the Logger and the Metrics Hub share.
//!
//! Tests of these clients talk to the peers of `testing` (a scripted control server, a PULL receiver).

pub mod confman;
pub mod logger;
pub mod metrics_hub;
pub mod push;
pub mod registry;
pub mod signals;
pub mod storage;
pub mod storage_manager;
#[cfg(test)]
pub mod testing;
