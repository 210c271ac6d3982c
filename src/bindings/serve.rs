//! Module functions: the daemon in the foreground, the settings, and the liveness checks.

use std::path::PathBuf;
use std::time::Duration;

use pyo3::exceptions::{PyKeyboardInterrupt, PyRuntimeError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use tokio_util::sync::CancellationToken;

use super::errors::{cli_error, config_error};
use super::proxy::{block_on, runtime, SLICE};
use crate::config::{Env, PmSettings, Settings};
use crate::daemon::DaemonConfig;

/// Run the Process Manager daemon in the foreground until SIGTERM, SIGHUP, SIGQUIT, `quit_server`, or
/// Ctrl-C (Python's SIGINT handler raising `KeyboardInterrupt`): all end in the orderly shutdown and
/// return 0. Start-up failures raise (`OSError`/`ValueError` for settings, `RuntimeError` otherwise).
#[pyfunction]
#[pyo3(signature = (settings_path = None))]
pub fn serve(py: Python<'_>, settings_path: Option<PathBuf>) -> PyResult<i32> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("pm_cs")
        .enable_all()
        .build()
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start the daemon runtime: {e}")))?;
    let stop = CancellationToken::new();
    let stop_wait = stop.clone();
    // Install the handlers now, before anything starts (see `cli::shutdown_signal`).
    let signals = {
        let _context = rt.enter();
        crate::cli::shutdown_signal(false)
    };
    let mut daemon = rt.spawn(async move {
        // SIGINT stays Python's: it arrives here as a cancelled token.
        let stopped = async move {
            tokio::select! {
                _ = stop_wait.cancelled() => {}
                _ = signals => {}
            }
        };
        crate::cli::start_until(settings_path.as_deref(), stopped).await
    });
    let mut raised: Option<PyErr> = None;
    let result = loop {
        match py.detach(|| rt.block_on(async { tokio::time::timeout(SLICE, &mut daemon).await })) {
            Ok(joined) => break joined,
            Err(_) => {
                if let Err(e) = py.check_signals() {
                    // A signal handler raised (Ctrl-C: KeyboardInterrupt): shut down in order first.
                    stop.cancel();
                    raised.get_or_insert(e);
                }
            }
        }
    };
    py.detach(|| rt.shutdown_timeout(Duration::from_millis(500)));
    if let Some(e) = raised.filter(|e| !e.is_instance_of::<PyKeyboardInterrupt>(py)) {
        // Anything but Ctrl-C (say, SystemExit from an application's handler) goes on up.
        return Err(e);
    }
    match result {
        Ok(Ok(code)) => Ok(i32::from(code)),
        Ok(Err(e)) => Err(cli_error(e)),
        Err(e) => Err(PyRuntimeError::new_err(format!("the daemon failed: {e}"))),
    }
}

/// The merged settings (embedded defaults, then the local settings file named by
/// `<PROJECT>_LOCAL_SETTINGS` or given here): `{group: {key: value}}`.
#[pyfunction]
#[pyo3(signature = (settings_path = None))]
pub fn load_settings(py: Python<'_>, settings_path: Option<PathBuf>) -> PyResult<Bound<'_, PyAny>> {
    let settings = Settings::load(settings_path.as_deref(), &Env::from_process()).map_err(config_error)?;
    pythonize::pythonize(py, settings.groups()).map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// The `Process Manager Control Server` group as the daemon reads it, its defaults applied: the one source of
/// `egse.procman`'s constants (`COMMANDING_PORT`, `SERVICE_TYPE`, …), so Python and Rust cannot disagree.
#[pyfunction]
#[pyo3(signature = (settings_path = None))]
pub fn process_manager_settings(py: Python<'_>, settings_path: Option<PathBuf>) -> PyResult<Bound<'_, PyDict>> {
    let settings = Settings::load(settings_path.as_deref(), &Env::from_process()).map_err(config_error)?;
    let pm = PmSettings::from_settings(&settings).map_err(config_error)?;
    let d = PyDict::new(py);
    d.set_item("PROCESS_NAME", pm.process_name)?;
    d.set_item("SERVICE_TYPE", pm.service_type)?;
    d.set_item("PROTOCOL", pm.protocol)?;
    d.set_item("HOSTNAME", pm.hostname)?;
    d.set_item("COMMANDING_PORT", pm.commanding_port)?;
    d.set_item("SERVICE_PORT", pm.service_port)?;
    d.set_item("MONITORING_PORT", pm.monitoring_port)?;
    d.set_item("STORAGE_MNEMONIC", pm.storage_mnemonic)?;
    d.set_item("DELAY", pm.monitoring_delay.as_secs_f64())?;
    d.set_item("PROXY_TIMEOUT", pm.proxy_timeout.as_secs_f64())?;
    Ok(d)
}

/// Where the daemon writes logs: `<PROJECT>_LOG_FILE_LOCATION`, else `<data storage location>/log`,
/// else `<state dir>/log` (`~/.local/state/procman/log` by default).
#[pyfunction]
#[pyo3(signature = (settings_path = None))]
pub fn log_location(settings_path: Option<PathBuf>) -> PyResult<PathBuf> {
    Ok(DaemonConfig::load(settings_path.as_deref())
        .map_err(config_error)?
        .log_location())
}

/// True if the Process Manager answers a `Ping` within `timeout` seconds (the configured port, or the
/// Service Registry when it is 0).
#[pyfunction]
#[pyo3(signature = (timeout = 0.5))]
pub fn is_process_manager_active(py: Python<'_>, timeout: f64) -> PyResult<bool> {
    let config = DaemonConfig::load(None).map_err(config_error)?;
    let timeout = Duration::from_secs_f64(timeout.clamp(0.0, 1e6));
    block_on(py, &runtime()?, crate::proxy::process_manager_active(&config, timeout))
}

/// True if the control server at `endpoint` answers a `Ping` within `timeout` seconds.
#[pyfunction]
#[pyo3(signature = (endpoint, timeout = 0.5))]
pub fn is_control_server_active(py: Python<'_>, endpoint: &str, timeout: f64) -> PyResult<bool> {
    let connect = match crate::proxy::Endpoint::split(endpoint) {
        Some((p, h, port)) => py.detach(|| crate::proxy::Endpoint::new(&p, &h, port).connect),
        None => endpoint.to_owned(),
    };
    let timeout = Duration::from_secs_f64(timeout.clamp(0.0, 1e6));
    block_on(py, &runtime()?, crate::proxy::control_server_active(&connect, timeout))
}

/// The command line (`pm_cs …`, `cgse procman …`): `argv[0]` is the name shown in usage. Parses and runs
/// the command in Rust with the GIL released; returns the exit code (0 ok, 1 failure with the reason on
/// stderr, 2 usage, 130 after Ctrl-C). `flavour` `"python"` prints the original CLI's `status`/`stop` texts,
/// `"rust"` those of the `pm_cs` binary. `start`/`start-bg` are the Python module's own (exit code 1 here).
#[pyfunction]
#[pyo3(signature = (argv, flavour = "python"))]
pub fn cli_main(py: Python<'_>, argv: Vec<String>, flavour: &str) -> PyResult<i32> {
    let flavour = match flavour {
        "python" => crate::cli::Flavour::Python,
        "rust" => crate::cli::Flavour::Rust,
        other => {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "flavour must be 'python' or 'rust', got {other:?}"
            )))
        }
    };
    let prog = argv.first().cloned().unwrap_or_else(|| "pm_cs".into());
    let cli = match crate::cli::parse(argv) {
        Ok(c) => c,
        Err(code) => return Ok(i32::from(code)),
    };
    match block_on(py, &runtime()?, crate::cli::run(&cli, flavour)) {
        Ok(Ok(code)) => Ok(i32::from(code)),
        Ok(Err(e)) => {
            #[allow(clippy::print_stderr)] // the CLI's error line, as `pm_cs` prints it
            {
                eprintln!("{prog}: {e}");
            }
            Ok(1)
        }
        Err(e) if e.is_instance_of::<PyKeyboardInterrupt>(py) => Ok(130),
        Err(e) => Err(e),
    }
}

/// Rich-style markup as the CLI prints it: ANSI colours when `colour`, else plain text broken at `width`.
#[pyfunction]
pub fn render_markup(text: &str, width: usize, colour: bool) -> String {
    crate::cli::format::render_markup(text, width, colour)
}

/// Break a line at spaces so that no part exceeds `width`, keeping the space at the break (as rich does).
#[pyfunction]
pub fn wrap_line(line: &str, width: usize) -> Vec<String> {
    crate::cli::format::wrap(line, width)
}
