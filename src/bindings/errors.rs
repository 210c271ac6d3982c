//! The one mapping from library errors to Python exceptions, and logging into Python's `logging`.

use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use crate::cli::CliError;
use crate::config::ConfigError;
use crate::proxy::EndpointError;

/// Settings problems: a missing file is `FileNotFoundError`, an unreadable one `OSError`, bad content
/// `ValueError`. The message names the file and key.
pub fn config_error(e: ConfigError) -> PyErr {
    match e {
        ConfigError::LocalSettingsMissing { .. } => PyFileNotFoundError::new_err(e.to_string()),
        ConfigError::Read { .. } => PyOSError::new_err(e.to_string()),
        _ => PyValueError::new_err(e.to_string()),
    }
}

/// No endpoint: `RuntimeError` when the registry cannot tell (as the original), `ValueError` for a bad port.
pub fn endpoint_error(e: EndpointError) -> PyErr {
    match e {
        EndpointError::Config(c) => config_error(c),
        EndpointError::Discovery(_) | EndpointError::UnknownServiceType(_) => PyRuntimeError::new_err(e.to_string()),
        EndpointError::Port(_) => PyValueError::new_err(e.to_string()),
    }
}

/// A daemon that could not start or run: `RuntimeError` with the one-line reason.
pub fn cli_error(e: CliError) -> PyErr {
    match e {
        CliError::Config(c) => config_error(c),
        CliError::Daemon(crate::daemon::DaemonError::Config(c)) => config_error(c),
        other => PyRuntimeError::new_err(other.to_string()),
    }
}

/// Log `message` at `level` (`"warning"`, `"critical"` …) on the `egse.procman` logger.
pub fn log(py: Python<'_>, level: &str, message: &str) {
    let logged = py
        .import("logging")
        .and_then(|m| m.call_method1("getLogger", ("egse.procman",)))
        .and_then(|l| l.call_method1(level, (message,)));
    if let Err(e) = logged {
        // Logging must never turn a reply into an error.
        e.write_unraisable(py, None);
    }
}
