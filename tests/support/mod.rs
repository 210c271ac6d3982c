//! Helpers shared by the integration tests.

use std::path::PathBuf;

/// The captured reference fixtures, kept in the repository (`tests/fixtures`). A missing folder is a
/// failure, never a skip.
#[allow(dead_code)] // not every test binary uses every helper
pub fn fixtures_root() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    assert!(dir.is_dir(), "fixtures missing: {}", dir.display());
    dir
}

pub mod counting_alloc;
pub mod tcp;
pub mod zmtp;
