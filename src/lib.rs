//! procman: the CGSE Process Manager control server in Rust.
pub mod assemble;
#[cfg(feature = "python")]
mod bindings;
pub mod cli;
pub mod client;
pub mod codec;
pub mod config;
pub mod controller;
pub mod daemon;
pub mod housekeeping;
pub mod logging;
pub mod monitor;
pub mod objects;
pub mod protocol;
pub mod proxy;
pub mod server;
pub mod service;
pub mod setup;
pub mod storage;
pub mod transport;
pub mod util;
