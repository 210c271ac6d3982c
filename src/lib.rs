//! procman: the CGSE Process Manager control server in Rust.
pub mod codec;
pub mod supervisor;
