//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};

/// The captured reference fixtures: `PROCMAN_FIXTURES`, else `../shared/reference/fixtures` next to the
/// repository (the layout CI and development use), else `/work/shared/reference/fixtures`.
#[allow(dead_code)] // not every test binary uses every helper
pub fn fixtures_root() -> PathBuf {
    if let Ok(dir) = std::env::var("PROCMAN_FIXTURES") {
        return PathBuf::from(dir);
    }
    let relative = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/reference/fixtures");
    if relative.is_dir() {
        return relative;
    }
    PathBuf::from("/work/shared/reference/fixtures")
}
