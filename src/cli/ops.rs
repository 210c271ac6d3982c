//! The operator commands (`ps`, `logs`, `start-process`, `stop-process`, `restart`, `reload`, `events`,
//! `stop --all`): requests on the commanding port, replies turned into text by [`super::format`].
//!
//! Exit codes: 0 ok, 1 failure (the reason on stderr, naming the process id), 2 usage.

use std::io::Write;
use std::time::{Duration, Instant};

use super::format::{self, PsRow};
use super::{endpoints, procinfo, CliError};
use crate::client::ControlClient;
use crate::codec::{self, Limits, Value};
use crate::daemon::DaemonConfig;
use crate::protocol::failure_message;

/// How long one request may take before the daemon counts as unreachable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often `logs -f` polls and `events` checks that the daemon is still there.
const POLL: Duration = Duration::from_millis(500);
/// How many lines `logs -f` compares between two polls.
const FOLLOW_WINDOW: usize = 1000;

/// Print to stdout; false when stdout is gone (a closed pipe), so followers can end quietly.
pub(crate) fn out(text: &str) -> bool {
    let mut o = std::io::stdout().lock();
    o.write_all(text.as_bytes()).and_then(|_| o.flush()).is_ok()
}

/// True when `ps` may colour: stdout is a terminal and `NO_COLOR` is unset or empty.
pub(crate) fn colour_wanted() -> bool {
    use std::io::IsTerminal;
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// A client of the daemon's commanding port that has answered a `Ping`.
pub(crate) async fn commanding(config: &DaemonConfig) -> Result<ControlClient, CliError> {
    let (cmd, _) = endpoints(config).await?;
    let mut c = ControlClient::new(cmd, REQUEST_TIMEOUT);
    if !c.ping(Duration::from_secs(2)).await {
        return Err(CliError::Unreachable(c.endpoint().to_owned()));
    }
    Ok(c)
}

/// Call a commanding command; a `Failure` reply becomes an error naming `what` (the process id).
async fn call(c: &mut ControlClient, name: &str, args: Vec<Value>, what: &str) -> Result<Value, CliError> {
    let v = c
        .call(name, args, vec![])
        .await
        .map_err(|e| CliError::Other(format!("{what}: {e}")))?;
    match failure_message(&v) {
        Some(m) => Err(CliError::Other(format!("{what}: {m}"))),
        None => Ok(v),
    }
}

/// The process records of `list_processes`, with its sequence number.
async fn records(c: &mut ControlClient) -> Result<(i64, Vec<Value>), CliError> {
    let v = call(c, "list_processes", vec![], "list_processes").await?;
    let seq = v.get("seq").and_then(Value::as_i64).unwrap_or(0);
    match v.get("processes") {
        Some(Value::List(items)) => Ok((seq, items.clone())),
        _ => Err(CliError::Other("list_processes: unexpected reply".into())),
    }
}

/// `ps [--json]`.
pub async fn ps(config: &DaemonConfig, json: bool) -> Result<u8, CliError> {
    let mut c = commanding(config).await?;
    let (seq, recs) = records(&mut c).await?;
    let rows: Vec<PsRow> = recs
        .iter()
        .filter_map(PsRow::from_record)
        .map(|mut r| {
            if let (Some(pid), Some(up)) = (r.pid, r.uptime_s) {
                if let Some((cpu, rss)) = procinfo::cpu_and_rss(pid, up) {
                    r.cpu_percent = Some(cpu);
                    r.rss_bytes = Some(rss);
                }
            }
            r
        })
        .collect();
    let text = if json {
        format::ps_json(seq, &rows)
    } else {
        format::ps_table(&rows, colour_wanted())
    };
    out(&text);
    Ok(0)
}

/// The last `lines` of a process's output.
async fn tail(c: &mut ControlClient, id: &str, lines: usize) -> Result<Vec<String>, CliError> {
    let v = call(c, "get_process_log", vec![Value::str(id), Value::Int(lines as i64)], id).await?;
    match v {
        Value::List(items) => Ok(items
            .into_iter()
            .map(|l| match l {
                Value::Str(s) => s,
                other => crate::protocol::py_repr(&other),
            })
            .collect()),
        other => Err(CliError::Other(format!(
            "{id}: unexpected reply {}",
            crate::protocol::py_repr(&other)
        ))),
    }
}

fn print_lines(lines: &[String]) -> bool {
    let mut text = String::new();
    for l in lines {
        text.push_str(l.strip_suffix('\n').unwrap_or(l));
        text.push('\n');
    }
    lines.is_empty() || out(&text)
}

/// `logs [-n N] [-f] ID`. Following polls the tail every half second and ends on Ctrl-C (the caller's),
/// a closed stdout, or when the daemon stops answering (exit code 1, said on stderr).
pub async fn logs(config: &DaemonConfig, id: &str, lines: usize, follow: bool) -> Result<u8, CliError> {
    let mut c = commanding(config).await?;
    let first = tail(&mut c, id, lines).await?;
    if !print_lines(&first) || !follow {
        return Ok(0);
    }
    let mut seen = tail(&mut c, id, FOLLOW_WINDOW).await?;
    loop {
        tokio::time::sleep(POLL).await;
        let now = match tail(&mut c, id, FOLLOW_WINDOW).await {
            Ok(v) => v,
            Err(e) if !c.ping(Duration::from_secs(2)).await => {
                return Err(CliError::Other(format!(
                    "{id}: the Process Manager at {} went away ({e})",
                    c.endpoint()
                )))
            }
            Err(e) => return Err(e),
        };
        if !print_lines(format::new_lines(&seen, &now)) {
            return Ok(0);
        }
        seen = now;
    }
}

/// A process command as the controller reads it (a dict with the state keys of `ProcessCommand`).
fn process_command(id: &str) -> Value {
    Value::dict([
        ("_device_id", Value::str(id)),
        ("_cgse_cmd", Value::None),
        ("_device_args", Value::List(vec![])),
        ("_is_simulator_mode", Value::Bool(false)),
    ])
}

/// `start-process ID`, `stop-process ID`, `restart ID`.
pub async fn process_action(config: &DaemonConfig, action: &str, id: &str) -> Result<u8, CliError> {
    let mut c = commanding(config).await?;
    let (name, arg, done) = match action {
        "start" => ("start_process", process_command(id), "start requested"),
        "stop" => ("stop_process", process_command(id), "stop requested"),
        _ => ("restart_process", Value::str(id), "restart requested"),
    };
    call(&mut c, name, vec![arg], id).await?;
    out(&format!("{id}: {done}\n"));
    Ok(0)
}

/// `reload [--dry-run]`: the plan the daemon applied (or would apply).
pub async fn reload(config: &DaemonConfig, dry_run: bool) -> Result<u8, CliError> {
    let mut c = commanding(config).await?;
    let plan = c
        .call("reload", vec![], vec![(Value::str("dry_run"), Value::Bool(dry_run))])
        .await
        .map_err(|e| CliError::Other(format!("reload: {e}")))?;
    if let Some(m) = failure_message(&plan) {
        return Err(CliError::Other(format!("reload: {m}")));
    }
    out(&format::reload_diff(&plan, dry_run));
    Ok(0)
}

/// `events`: one line per process state change from the monitoring socket, until Ctrl-C (the caller's), a
/// closed stdout, or the daemon going away (checked with a `Ping` every few seconds; exit code 1).
pub async fn events(config: &DaemonConfig) -> Result<u8, CliError> {
    let mut c = commanding(config).await?;
    let port = match c.request(&Value::str("get_monitoring_port")).await {
        Ok(Value::Int(p)) => u16::try_from(p).map_err(|_| CliError::Other(format!("bad monitoring port {p}")))?,
        Ok(other) => {
            return Err(CliError::Other(format!(
                "bad monitoring port {}",
                crate::protocol::py_repr(&other)
            )))
        }
        Err(e) => return Err(CliError::Other(e.to_string())),
    };
    let (protocol, host, _) = crate::proxy::Endpoint::split(c.endpoint())
        .ok_or_else(|| CliError::Other(format!("cannot read the endpoint {}", c.endpoint())))?;
    let mon = crate::transport::client_endpoint(&protocol, &host, port).map_err(|e| CliError::Other(e.to_string()))?;
    let mut sub = crate::transport::Subscriber::connect(&mon, &[""], Duration::from_secs(2))
        .await
        .map_err(|e| CliError::Other(e.to_string()))?;
    let limits = Limits::default();
    let mut check = tokio::time::interval(Duration::from_secs(2));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            msg = sub.recv() => {
                let frames = msg.map_err(|e| CliError::Other(e.to_string()))?;
                for f in frames {
                    let Ok(v) = codec::decode(&f, &limits) else { continue };
                    if let Some(line) = format::event_line(&v) {
                        if !out(&format!("{line}\n")) {
                            return Ok(0);
                        }
                    }
                }
            }
            _ = check.tick() => {
                if !c.ping(Duration::from_secs(2)).await {
                    return Err(CliError::Other(format!("the Process Manager at {} went away", c.endpoint())));
                }
            }
        }
    }
}

/// The order `stop --all` stops processes in: the reverse of the start order. Until dependencies
/// (`depends_on`) exist that is the reverse of the table's order, which `list_processes` keeps; this is the
/// one place to switch to the reverse dependency order.
pub fn stop_order(records: &[Value]) -> Vec<String> {
    records
        .iter()
        .rev()
        .filter_map(|r| r.get("id").and_then(Value::as_str).map(str::to_owned))
        .collect()
}

/// States in which a process needs no stop.
fn is_down(state: &str) -> bool {
    matches!(state, "STOPPED" | "EXITED" | "FATAL")
}

/// `stop --all`: every managed process in [`stop_order`], waiting for each (its stop timeout plus a
/// margin), with a line of progress each; then the daemon itself. Exit code 1 if any did not stop.
pub async fn stop_all(config: &DaemonConfig) -> Result<u8, CliError> {
    let mut c = commanding(config).await?;
    let (_, recs) = records(&mut c).await?;
    let mut failed = false;
    for id in stop_order(&recs) {
        let find = |recs: &[Value]| {
            recs.iter()
                .find(|r| r.get("id").and_then(Value::as_str) == Some(&id))
                .cloned()
        };
        let Some(r) = find(&recs) else { continue };
        let state = r.get("state").and_then(Value::as_str).unwrap_or("?").to_owned();
        if is_down(&state) {
            out(&format!("{id}: already {state}\n"));
            continue;
        }
        let timeout = r
            .get("definition")
            .and_then(|d| d.get("stop_timeout_s"))
            .and_then(Value::as_f64)
            .filter(|t| t.is_finite() && *t >= 0.0)
            .unwrap_or(10.0);
        out(&format!("{id}: stopping ...\n"));
        if let Err(e) = call(&mut c, "stop_process", vec![process_command(&id)], &id).await {
            eprintln!("pm_cs: {e}");
            failed = true;
            continue;
        }
        let deadline = Instant::now() + Duration::from_secs_f64(timeout + 5.0);
        let outcome = loop {
            let (_, now) = records(&mut c).await?;
            match find(&now) {
                None => break Some("removed".to_owned()),
                Some(r) => {
                    let s = r.get("state").and_then(Value::as_str).unwrap_or("?");
                    if is_down(s) {
                        break Some(s.to_owned());
                    }
                }
            }
            if Instant::now() >= deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        match outcome {
            Some(s) => {
                out(&format!("{id}: {s}\n"));
            }
            None => {
                eprintln!("pm_cs: {id}: not stopped within {:.0} s", timeout + 5.0);
                failed = true;
            }
        }
    }
    let code = super::stop(config, super::Flavour::Rust).await?;
    Ok(if failed { 1 } else { code })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_order_is_the_reverse_of_the_table() {
        let recs: Vec<Value> = ["cm_cs", "sm_cs", "dummy"]
            .iter()
            .map(|id| Value::dict([("id", Value::str(*id))]))
            .collect();
        assert_eq!(stop_order(&recs), ["dummy", "sm_cs", "cm_cs"]);
    }

    #[test]
    fn process_command_reads_back_as_one() {
        let cmd = crate::controller::ProcessCommand::from_value(&process_command("dev 1"), "StopCommand").unwrap();
        assert_eq!(cmd.device_id, "dev 1");
        assert_eq!(cmd.cgse_cmd, None);
        assert!(cmd.device_args.is_empty() && !cmd.simulator);
    }
}
