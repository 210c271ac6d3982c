//! The integration tests that need no process-wide state of their own, in one test binary: one link instead
//! of ten. Tests that install a global allocator (pub_bound, router_churn), the SIGCHLD reaper or a
//! subreaper (daemon, supervisor_*) stay binaries of their own, so that nothing they set up reaches the
//! tests here.

#[path = "../support/mod.rs"]
mod support;

mod codec_decode;
mod codec_encode;
mod codec_fixtures;
mod codec_limits;
mod codec_timing;
mod fuzz_regressions;
mod integrations_fixtures;
mod lifecycle;
mod notify;
mod supervisor_definitions;
