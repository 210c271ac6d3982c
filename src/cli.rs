//! What the command-line tools do (the `pm_cs` binary and the Python CLI call these).

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
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Other(String),
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
    let config = DaemonConfig::load(settings)?;
    let integrations = crate::assemble::integrations(&config).await?;
    daemon::run(config, integrations, log, stop).await?;
    Ok(0)
}

/// The commanding and service endpoints of the configured Process Manager.
async fn endpoints(config: &DaemonConfig) -> Result<(String, String), CliError> {
    let pm = &config.pm;
    if pm.commanding_port == 0 || pm.service_port == 0 {
        let found = crate::assemble::discover_pm(config).await.map_err(CliError::Other)?;
        return Ok(found);
    }
    let host = &pm.hostname;
    let ep = |port| transport::client_endpoint(&pm.protocol, host, port).map_err(|e| CliError::Other(e.to_string()));
    Ok((ep(pm.commanding_port)?, ep(pm.service_port)?))
}

/// `status`: the original's text; exit code 0 when active, 1 when not.
pub async fn status(settings: Option<&Path>) -> Result<u8, CliError> {
    let config = DaemonConfig::load(settings)?;
    let timeout = Duration::from_secs(1);
    let (cmd_ep, _) = match endpoints(&config).await {
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
    for (label, name) in [
        ("Hostname", "get_ip_address"),
        ("Monitoring port", "get_monitoring_port"),
        ("Commanding port", "get_commanding_port"),
        ("Service port", "get_service_port"),
    ] {
        let v = c
            .request(&codec::Value::str(name))
            .await
            .map_err(|e| CliError::Other(e.to_string()))?;
        let shown = match v {
            codec::Value::Str(s) => s,
            codec::Value::Int(i) => i.to_string(),
            codec::Value::None => "None".into(),
            other => crate::protocol::py_repr(&other),
        };
        text.push_str(&format!("    {label}: {shown}\n"));
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
    }
    print!("{text}");
    Ok(0)
}

/// `stop`: send `quit_server` to the service port. Exit code 1 when the daemon cannot be reached.
pub async fn stop(settings: Option<&Path>) -> Result<u8, CliError> {
    let config = DaemonConfig::load(settings)?;
    println!("Sending 'quit' command to process manager..");
    let (_, svc_ep) = match endpoints(&config).await {
        Ok(e) => e,
        Err(e) => {
            println!("ERROR: Couldn't determine how to connect to the process manager. {e}");
            return Ok(1);
        }
    };
    let timeout = Duration::from_secs(2);
    let mut c = ControlClient::new(svc_ep, timeout);
    if !c.ping(timeout).await {
        println!(
            "ERROR: Couldn't connect to process manager: no reply from {} within {timeout:?}.",
            c.endpoint()
        );
        return Ok(1);
    }
    match c.call("quit_server", vec![], vec![]).await {
        Ok(v) => match crate::protocol::failure_message(&v) {
            Some(m) => {
                println!("ERROR: the process manager refused to quit: {m}");
                Ok(1)
            }
            None => Ok(0),
        },
        Err(e) => {
            println!("ERROR: Couldn't connect to process manager: {e}");
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
