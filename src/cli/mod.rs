//! The command line, once for every face: the `pm_cs` binary, `python -m egse.procman.procman_cs` (through
//! `_native.cli_main`) and `cgse procman …` all parse with [`parse`] and run [`run`].
//!
//! [`Flavour`] keeps the one difference: the Python CLI prints the original's texts for `status` and `stop`
//! (with its rich markup), the binary prints procman's own (with the integrations).

// The command line is the edge that prints: its output is what the operator asked for.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod args;
pub mod format;
pub mod ops;
mod procinfo;

pub use args::{parse, run, Cli, Command, PickleAction};

use std::path::Path;
use std::time::Duration;

use tracing::info;

use crate::client::ControlClient;
use crate::codec::{self, Limits};
use crate::daemon::{self, DaemonConfig, DaemonError};
use crate::transport;

/// A failure of a CLI command, printed as one line.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The daemon could not run.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// The settings are unusable.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// No Process Manager answers at the endpoint.
    #[error("cannot reach the Process Manager at {0}")]
    Unreachable(String),
    /// Anything else, as its message.
    #[error("{0}")]
    Other(String),
}

/// Whose texts `status` and `stop` print.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// procman's: plain text, the integrations after the status lines, why a connection failed.
    Rust,
    /// The original Python CLI's, byte for byte (tests compare with its captured output).
    Python,
}

/// Resolves when SIGINT, SIGTERM, SIGHUP or SIGQUIT arrives.
pub fn termination_signal() -> impl std::future::Future<Output = ()> + Send {
    shutdown_signal(true)
}

/// Resolves when SIGTERM, SIGHUP or SIGQUIT — and SIGINT if `interrupt` — arrives.
///
/// The handlers are installed when this function is called, not when the future is first polled: a
/// signal that arrives while the daemon is still starting is kept and stops it as soon as it serves,
/// instead of killing it with the default action halfway through. Inside a Python interpreter SIGINT
/// belongs to Python (it becomes `KeyboardInterrupt`), so the bindings pass `false` and watch for it
/// themselves.
pub fn shutdown_signal(interrupt: bool) -> impl std::future::Future<Output = ()> + Send {
    use tokio::signal::unix::{signal, SignalKind};
    let mut kinds = vec![SignalKind::terminate(), SignalKind::hangup(), SignalKind::quit()];
    if interrupt {
        kinds.push(SignalKind::interrupt());
    }
    let mut streams = Vec::new();
    for k in kinds {
        match signal(k) {
            Ok(s) => streams.push(s),
            Err(e) => tracing::warn!(error = %e, "cannot install a signal handler"),
        }
    }
    async move {
        if streams.is_empty() {
            return std::future::pending().await;
        }
        let waits = streams.iter_mut().map(|s| Box::pin(async move { s.recv().await }));
        let _ = futures_util::future::select_all(waits).await;
        info!("termination signal received");
    }
}

/// `start`: run the daemon in the foreground. Exit code 0 after an orderly shutdown.
pub async fn start(settings: Option<&Path>) -> Result<u8, CliError> {
    start_until(settings, termination_signal()).await
}

/// Run the daemon in the foreground until `stop` completes (or `quit_server` arrives): what `start`
/// does, with the caller choosing the stop condition (the Python `serve()` adds Ctrl-C).
pub async fn start_until(settings: Option<&Path>, stop: impl std::future::Future<Output = ()>) -> Result<u8, CliError> {
    let log = crate::logging::init();
    let result = async {
        let config = DaemonConfig::load(settings)?;
        let integrations = crate::assemble::integrations(&config).await?;
        daemon::run(config, integrations, log, stop).await?;
        Ok(0)
    }
    .await;
    // The last lines (the shutdown's) are on stderr before the process exits.
    let _ = tokio::task::spawn_blocking(|| crate::logging::flush(LOG_FLUSH_TIMEOUT)).await;
    result
}

/// How long an exiting daemon waits for its log lines to be written.
const LOG_FLUSH_TIMEOUT: Duration = Duration::from_millis(500);

/// The file `start-bg` sends the daemon's output to, inside the log location (as the Python CLI).
pub const START_BG_LOG: &str = "pm_cs.start-bg.log";

/// `start-bg`: run `pm_cs start` detached (its own session, output appended to [`START_BG_LOG`] in the log
/// location). Exit code 1 when the daemon exits within three seconds (a port in use, bad settings).
pub async fn start_bg(settings: Option<&Path>) -> Result<u8, CliError> {
    let config = DaemonConfig::load(settings)?;
    if config.pm.commanding_port != 0 {
        if let Ok((cmd, _)) = endpoints(&config).await {
            if ControlClient::new(cmd.clone(), Duration::from_millis(500))
                .ping(Duration::from_millis(500))
                .await
            {
                eprintln!("pm_cs start-bg: the Process Manager is already running at {cmd}");
                return Ok(0);
            }
        }
    }
    let other = |e: std::io::Error| CliError::Other(format!("start-bg: {e}"));
    let dir = config.log_location();
    std::fs::create_dir_all(&dir).map_err(other)?;
    let log_file = dir.join(START_BG_LOG);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_file)
        .map_err(other)?;
    let mut cmd = std::process::Command::new(std::env::current_exe().map_err(other)?);
    cmd.arg("start");
    if let Some(s) = settings {
        cmd.arg("--settings").arg(s);
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(log.try_clone().map_err(other)?)
        .stderr(log);
    // A process group of its own: a Ctrl-C in this terminal does not reach the daemon.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().map_err(other)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            eprintln!(
                "pm_cs start-bg: the daemon exited with {status}, see {}",
                log_file.display()
            );
            return Ok(1);
        }
        if config.pm.commanding_port != 0 {
            if let Ok((cmd, _)) = endpoints(&config).await {
                if ControlClient::new(cmd, Duration::from_millis(200))
                    .ping(Duration::from_millis(200))
                    .await
                {
                    break;
                }
            }
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(0)
}

/// The commanding and service endpoints of the configured Process Manager.
pub(crate) async fn endpoints(config: &DaemonConfig) -> Result<(String, String), CliError> {
    let pm = &config.pm;
    if pm.commanding_port == 0 || pm.service_port == 0 {
        let found = crate::assemble::discover_pm(config)
            .await
            .map_err(|e| CliError::Other(e.to_string()))?;
        return Ok(found);
    }
    let host = &pm.hostname;
    let ep = |port| transport::client_endpoint(&pm.protocol, host, port).map_err(|e| CliError::Other(e.to_string()));
    Ok((ep(pm.commanding_port)?, ep(pm.service_port)?))
}

/// Print rich markup as the original CLI does: colours on a terminal (unless `NO_COLOR`), else plain text
/// wrapped at `COLUMNS` (default 80) or at `width` when given.
fn echo(text: &str, width: Option<usize>) {
    let width = width
        .or_else(|| std::env::var("COLUMNS").ok().and_then(|c| c.trim().parse().ok()))
        .unwrap_or(80);
    ops::out(&format::render_markup(text, width, ops::colour_wanted()));
}

/// `status` with the original's texts: exit code 0 whether active or not, as the original.
async fn status_python(config: &DaemonConfig) -> Result<u8, CliError> {
    let pm = &config.pm;
    let text =
        match crate::proxy::process_manager_endpoint(&pm.protocol, &pm.hostname, i64::from(pm.commanding_port), || {
            Ok(config.clone())
        })
        .await
        {
            Err(e) => format!("Process Manager Status: [red]not active[/] ({e})"),
            Ok(ep) => {
                let mut c = ControlClient::new(ep.connect, pm.proxy_timeout);
                if !c.ping(crate::proxy::PING_TIMEOUT).await {
                    format!(
                        "Process Manager Status: [red]not active[/] ({})",
                        crate::proxy::NOT_CONNECTED_IN_CONTEXT
                    )
                } else {
                    let mut text = String::from("Process Manager:\n    Status: [green]active[/]\n");
                    for (label, name) in PORT_LINES {
                        let shown = c
                            .request(&codec::Value::str(name))
                            .await
                            .map(|v| shown(&v))
                            .unwrap_or_else(|e| e.to_string());
                        text.push_str(&format!("    {label}: {shown}\n"));
                    }
                    text
                }
            }
        };
    echo(&text, None);
    Ok(0)
}

/// The status lines after `Status`: label and built-in command.
const PORT_LINES: [(&str, &str); 4] = [
    ("Hostname", "get_ip_address"),
    ("Monitoring port", "get_monitoring_port"),
    ("Commanding port", "get_commanding_port"),
    ("Service port", "get_service_port"),
];

/// A reply as Python's `str()` shows it in an f-string.
fn shown(v: &codec::Value) -> String {
    match v {
        codec::Value::Str(s) => s.clone(),
        codec::Value::Int(i) => i.to_string(),
        codec::Value::None => "None".into(),
        other => crate::protocol::py_repr(other),
    }
}

/// `status`: exit code 0 when active, 1 when not (the Python flavour: always 0, as the original).
pub async fn status(config: &DaemonConfig, flavour: Flavour) -> Result<u8, CliError> {
    if flavour == Flavour::Python {
        return status_python(config).await;
    }
    let timeout = Duration::from_secs(1);
    let (cmd_ep, _) = match endpoints(config).await {
        Ok(e) => e,
        Err(e) => {
            print!("Process Manager Status: not active ({e})");
            return Ok(1);
        }
    };
    let mut c = ControlClient::new(cmd_ep, timeout);
    if !c.ping(timeout).await {
        print!(
            "Process Manager Status: not active (no reply from {} within {timeout:?})",
            c.endpoint()
        );
        return Ok(1);
    }
    let mut text = String::from("Process Manager:\n    Status: active\n");
    for (label, name) in PORT_LINES {
        let v = c
            .request(&codec::Value::str(name))
            .await
            .map_err(|e| CliError::Other(e.to_string()))?;
        text.push_str(&format!("    {label}: {}\n", shown(&v)));
    }
    // procman also says where its integrations stand (after the original's lines, which stay as they are).
    if let Ok(codec::Value::Dict(items)) = c.call("get_integration_status", vec![], vec![]).await {
        if let Some(codec::Value::Str(v)) = codec::dict_get(&items, "registry") {
            text.push_str(&format!("    {v}\n"));
        }
        for (label, key) in [("Setup", "setup"), ("Housekeeping", "storage")] {
            if let Some(codec::Value::Str(v)) = codec::dict_get(&items, key) {
                text.push_str(&format!("    {label}: {v}\n"));
            }
        }
        // These say their own name ("Logger: …", "Metrics Hub: …").
        for key in ["logger", "metrics"] {
            if let Some(codec::Value::Str(v)) = codec::dict_get(&items, key) {
                text.push_str(&format!("    {v}\n"));
            }
        }
    }
    print!("{text}");
    Ok(0)
}

/// `stop`: send `quit_server` to the service port. Exit code 1 when the daemon cannot be reached or
/// does not confirm. The endpoint is split at its last colon, so IPv6 addresses work.
pub async fn stop(config: &DaemonConfig, flavour: Flavour) -> Result<u8, CliError> {
    let python = flavour == Flavour::Python;
    let say = |text: &str, width: Option<usize>| {
        if python {
            echo(&format!("{text}\n"), width);
        } else {
            ops::out(&format!("{}\n", format::render_markup(text, usize::MAX, false)));
        }
    };
    let svc_ep = match endpoints(config).await {
        Ok((_, svc)) => svc,
        Err(e) => {
            let why = if python {
                "No service defined.".to_owned()
            } else {
                e.to_string()
            };
            say(
                &format!("[red]ERROR: Couldn't determine how to connect to the process manager. {why}[/]"),
                None,
            );
            return Ok(1);
        }
    };
    say("[green]Sending 'quit' command to process manager..[/]", None);
    let timeout = Duration::from_secs(2);
    let mut c = ControlClient::new(svc_ep, timeout);
    if !c.ping(if python { crate::proxy::PING_TIMEOUT } else { timeout }).await {
        let why = if python {
            crate::proxy::NOT_CONNECTED_IN_CONTEXT.to_owned()
        } else {
            format!("no reply from {} within {timeout:?}.", c.endpoint())
        };
        say(
            &format!("[red]ERROR: Couldn't connect to process manager: {why}[/]"),
            Some(120),
        );
        return Ok(1);
    }
    match c.call("quit_server", vec![], vec![]).await {
        Ok(v) => match crate::protocol::failure_message(&v) {
            Some(m) => {
                say(
                    &format!("[red]ERROR: the process manager did not confirm: {m}[/]"),
                    Some(120),
                );
                Ok(1)
            }
            None => Ok(0),
        },
        Err(e) => {
            say(
                &format!("[red]ERROR: Couldn't connect to process manager: {e}[/]"),
                Some(120),
            );
            Ok(1)
        }
    }
}

/// `pickle show FILE`
pub fn pickle_show(file: &Path) -> Result<u8, CliError> {
    let bytes = std::fs::read(file).map_err(|e| CliError::Other(format!("{}: {e}", file.display())))?;
    match codec::decode(&bytes, &Limits::default()) {
        Ok(v) => {
            println!("{}", codec::describe(&v));
            Ok(0)
        }
        Err(e) => {
            println!("cannot decode {}: {e}", file.display());
            Ok(2)
        }
    }
}

/// `pickle reencode IN OUT`
pub fn pickle_reencode(input: &Path, output: &Path) -> Result<u8, CliError> {
    let bytes = std::fs::read(input).map_err(|e| CliError::Other(format!("{}: {e}", input.display())))?;
    let v =
        codec::decode(&bytes, &Limits::default()).map_err(|e| CliError::Other(format!("{}: {e}", input.display())))?;
    std::fs::write(output, codec::encode(&v)).map_err(|e| CliError::Other(format!("{}: {e}", output.display())))?;
    Ok(0)
}
