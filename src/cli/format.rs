//! What the operator commands print: pure functions from replies to text, tested without a daemon.

use crate::codec::Value;

/// One row of `pm_cs ps`, read from a `list_processes` record (plus what `/proc` says, when local).
#[derive(Debug, Clone, PartialEq)]
pub struct PsRow {
    /// Process id.
    pub id: String,
    /// Its state (`?` when the record has none).
    pub state: String,
    /// Pid of the running process.
    pub pid: Option<i64>,
    /// Seconds since it started.
    pub uptime_s: Option<f64>,
    /// Automatic restarts so far.
    pub restarts: i64,
    /// Result of the last readiness probe; None when none ran (or the record does not say).
    pub ready: Option<bool>,
    /// Average CPU use since the process started, in percent of one core.
    pub cpu_percent: Option<f64>,
    /// Resident set size in bytes, when `/proc` is readable here.
    pub rss_bytes: Option<u64>,
}

impl PsRow {
    /// The fields `ps` shows from one record of `list_processes()["processes"]`.
    pub fn from_record(r: &Value) -> Option<PsRow> {
        Some(PsRow {
            id: r.get("id")?.as_str()?.to_owned(),
            state: r.get("state").and_then(Value::as_str).unwrap_or("?").to_owned(),
            pid: r.get("pid").and_then(Value::as_i64),
            uptime_s: r.get("uptime_s").and_then(Value::as_f64),
            restarts: r.get("restarts").and_then(Value::as_i64).unwrap_or(0),
            ready: match r.get("ready") {
                Some(Value::Bool(b)) => Some(*b),
                _ => None,
            },
            cpu_percent: None,
            rss_bytes: None,
        })
    }
}

/// `1d02h`, `3h04m`, `5m06s`, `7s`; `-` when unknown.
pub fn duration(s: Option<f64>) -> String {
    let Some(s) = s.filter(|s| s.is_finite() && *s >= 0.0) else {
        return "-".into();
    };
    let s = s as u64;
    let (d, h, m, sec) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d}d{h:02}h")
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{sec:02}s")
    } else {
        format!("{sec}s")
    }
}

/// `512B`, `1.5K`, `12.3M`, `1.0G` (powers of 1024); `-` when unknown.
pub fn bytes(b: Option<u64>) -> String {
    let Some(b) = b else { return "-".into() };
    let units = ["K", "M", "G", "T"];
    if b < 1024 {
        return format!("{b}B");
    }
    let mut v = b as f64 / 1024.0;
    let mut unit = units[0];
    for u in &units[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1}{unit}")
}

/// The ANSI colour of a state on a terminal.
fn state_colour(state: &str) -> &'static str {
    match state {
        "RUNNING" => "32",
        "STARTING" | "STOPPING" | "BACKOFF" => "33",
        "FATAL" => "1;31",
        "EXITED" => "31",
        _ => "",
    }
}

/// The `ps` table: a header and one aligned line per process; states coloured when `colour`.
pub fn ps_table(rows: &[PsRow], colour: bool) -> String {
    let header = ["ID", "STATE", "PID", "UPTIME", "RESTARTS", "READY", "CPU%", "RSS"];
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|r| {
            [
                r.id.clone(),
                r.state.clone(),
                r.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                duration(r.uptime_s),
                r.restarts.to_string(),
                match r.ready {
                    Some(true) => "yes".into(),
                    Some(false) => "no".into(),
                    None => "-".into(),
                },
                r.cpu_percent.map(|c| format!("{c:.1}")).unwrap_or_else(|| "-".into()),
                bytes(r.rss_bytes),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for c in &cells {
        for (w, cell) in widths.iter_mut().zip(c.iter()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |c: &[String], colour_state: Option<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in c.iter().zip(&widths).enumerate() {
            let pad = " ".repeat(w.saturating_sub(cell.chars().count()));
            let last = i + 1 == c.len();
            let shown = match colour_state {
                Some(code) if i == 1 && !code.is_empty() => format!("\x1b[{code}m{cell}\x1b[0m"),
                _ => cell.clone(),
            };
            // Text columns (id, state) are left-aligned, numbers right-aligned.
            if i < 2 {
                out.push_str(&shown);
                if !last {
                    out.push_str(&pad);
                }
            } else {
                out.push_str(&pad);
                out.push_str(&shown);
            }
            if !last {
                out.push_str("  ");
            }
        }
        out.push('\n');
        out
    };
    let mut text = line(&header.map(String::from), None);
    for (row, c) in rows.iter().zip(&cells) {
        text.push_str(&line(c, colour.then(|| state_colour(&row.state))));
    }
    text
}

/// A JSON string literal.
fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

fn json_opt<T: ToString>(v: Option<T>) -> String {
    v.map(|x| x.to_string()).unwrap_or_else(|| "null".into())
}

/// `ps --json`: `{"seq": n, "processes": [{"id", "state", "pid", "uptime_s", "restarts", "ready", "cpu_percent",
/// "rss_bytes"}]}`, the keys in that order, `null` for what is unknown (README: "pm_cs ps --json").
pub fn ps_json(seq: i64, rows: &[PsRow]) -> String {
    let procs: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{{\"id\": {}, \"state\": {}, \"pid\": {}, \"uptime_s\": {}, \"restarts\": {}, \"ready\": {}, \
                 \"cpu_percent\": {}, \"rss_bytes\": {}}}",
                json_str(&r.id),
                json_str(&r.state),
                json_opt(r.pid),
                json_opt(
                    r.uptime_s
                        .filter(|f| f.is_finite())
                        .map(|f| (f * 1000.0).round() / 1000.0)
                ),
                r.restarts,
                json_opt(r.ready),
                json_opt(r.cpu_percent.filter(|f| f.is_finite())),
                json_opt(r.rss_bytes),
            )
        })
        .collect();
    format!("{{\"seq\": {seq}, \"processes\": [{}]}}\n", procs.join(", "))
}

/// The ids under `key` of a reload plan.
fn ids(plan: &Value, key: &str) -> Vec<String> {
    match plan.get(key) {
        Some(Value::List(items)) => items.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
        _ => Vec::new(),
    }
}

/// The lines `reload` prints for its plan: `+ id` added, `- id` removed, `~ id` changed, then a summary.
pub fn reload_diff(plan: &Value, dry_run: bool) -> String {
    let mut out = String::new();
    for (key, mark) in [("added", '+'), ("removed", '-'), ("changed", '~')] {
        for id in ids(plan, key) {
            out.push_str(&format!("{mark} {id}\n"));
        }
    }
    let (a, r, c, u) = (
        ids(plan, "added").len(),
        ids(plan, "removed").len(),
        ids(plan, "changed").len(),
        ids(plan, "unchanged").len(),
    );
    let verb = if dry_run { "would apply" } else { "applied" };
    if a + r + c == 0 {
        out.push_str(&format!("no changes ({u} unchanged)\n"));
    } else {
        out.push_str(&format!("{verb}: {a} added, {r} removed, {c} changed, {u} unchanged\n"));
    }
    out
}

/// One line per process event from the monitoring socket; `None` for anything else (the status dict).
pub fn event_line(ev: &Value) -> Option<String> {
    if ev.get("event").and_then(Value::as_str) != Some("process_state") {
        return None;
    }
    let s = |k: &str| ev.get(k).and_then(Value::as_str).unwrap_or("?");
    let time = ev
        .get("time")
        .and_then(Value::as_f64)
        .map(|t| {
            let (y, mo, d, h, mi, sec, _) =
                crate::util::utc_parts(std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(t.max(0.0)));
            format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{sec:02}Z")
        })
        .unwrap_or_else(|| "?".into());
    let mut line = format!("{time} {} {} -> {}", s("id"), s("old_state"), s("new_state"));
    if ev.get("kind").and_then(Value::as_str) == Some("removed") {
        line.push_str(" (removed)");
    }
    for key in ["pid", "exit_code", "exit_signal"] {
        if let Some(v) = ev.get(key).and_then(Value::as_i64) {
            line.push_str(&format!(" {key}={v}"));
        }
    }
    if let Some(seq) = ev.get("seq").and_then(Value::as_i64) {
        line.push_str(&format!(" seq={seq}"));
    }
    Some(line)
}

/// The lines of `new` that follow what `old` already showed, for `logs -f` polling the tail.
///
/// Both are tails of the same output: the largest suffix of `old` that is a prefix of `new` is what both
/// contain. When nothing overlaps (the output moved on by more than a tail), all of `new` is new. A run of
/// identical lines can make the overlap look longer than it is; then lines are missed, never repeated.
pub fn new_lines<'a>(old: &[String], new: &'a [String]) -> &'a [String] {
    let max = old.len().min(new.len());
    for k in (1..=max).rev() {
        if old[old.len() - k..] == new[..k] {
            return &new[k..];
        }
    }
    new
}

/// Rich-style markup (`[green]…[/]`, `[bold red]…[/]`) as the original CLI prints it: ANSI colours on a
/// terminal, otherwise plain text broken at `width` like rich does (the space stays at the end of the
/// broken line). Square brackets that are not markup tags (`[Errno 111]`) are kept.
pub fn render_markup(text: &str, width: usize, colour: bool) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find(']').map(|close| (&after[..close], close)) {
            Some((tag, close)) if is_tag(tag) => {
                if colour {
                    if tag.starts_with('/') {
                        out.push_str("\x1b[0m");
                    } else {
                        let codes: Vec<&str> = tag
                            .split(' ')
                            .filter_map(|t| match t {
                                "red" => Some("31"),
                                "green" => Some("32"),
                                "yellow" => Some("33"),
                                "blue" => Some("34"),
                                "bold" => Some("1"),
                                _ => None,
                            })
                            .collect();
                        if !codes.is_empty() {
                            out.push_str(&format!("\x1b[{}m", codes.join(";")));
                        }
                    }
                }
                rest = &after[close + 1..];
            }
            _ => {
                out.push('[');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    if colour {
        return out;
    }
    let width = width.max(1);
    out.split('\n')
        .map(|l| wrap(l, width).join("\n"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `[red]`, `[bold red]`, `[/]`, `[/green]`: lower-case words separated by single spaces, maybe after a `/`.
fn is_tag(tag: &str) -> bool {
    if tag == "/" {
        return true;
    }
    let body = tag.strip_prefix('/').unwrap_or(tag);
    !body.is_empty()
        && body
            .split(' ')
            .all(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase()))
}

/// Break a line at spaces so that no part exceeds `width` (a single longer word stays whole).
pub fn wrap(line: &str, width: usize) -> Vec<String> {
    if line.chars().count() <= width {
        return vec![line.to_owned()];
    }
    // Words with their trailing spaces, as `\S+\s*|\s+`.
    let mut words: Vec<&str> = Vec::new();
    let mut start = 0;
    let mut in_space = line.starts_with(' ');
    for (i, c) in line.char_indices() {
        let space = c.is_whitespace();
        if !space && in_space && i > start {
            words.push(&line[start..i]);
            start = i;
        }
        in_space = space;
    }
    words.push(&line[start..]);
    let mut parts = Vec::new();
    let mut current = String::new();
    for w in words {
        if !current.is_empty() && current.chars().count() + w.trim_end().chars().count() > width {
            parts.push(std::mem::take(&mut current));
        }
        current.push_str(w);
    }
    parts.push(current);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, state: &str, pid: Option<i64>) -> Value {
        Value::dict([
            ("id", Value::str(id)),
            ("state", Value::str(state)),
            ("pid", pid.map(Value::Int).unwrap_or(Value::None)),
            ("uptime_s", Value::Float(3725.4)),
            ("restarts", Value::Int(2)),
            ("ready", Value::Bool(true)),
        ])
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(duration(None), "-");
        assert_eq!(duration(Some(7.9)), "7s");
        assert_eq!(duration(Some(306.0)), "5m06s");
        assert_eq!(duration(Some(3725.0)), "1h02m");
        assert_eq!(duration(Some(93_600.0)), "1d02h");
        assert_eq!(duration(Some(f64::NAN)), "-");
        assert_eq!(bytes(Some(512)), "512B");
        assert_eq!(bytes(Some(1536)), "1.5K");
        assert_eq!(bytes(Some(12 * 1024 * 1024 + 300 * 1024)), "12.3M");
        assert_eq!(bytes(None), "-");
    }

    #[test]
    fn ps_table_aligns_and_colours_only_when_asked() {
        let mut rows = vec![
            PsRow::from_record(&record("cm_cs", "RUNNING", Some(4242))).unwrap(),
            PsRow::from_record(&record("a", "STOPPED", None)).unwrap(),
        ];
        rows[0].cpu_percent = Some(1.25);
        rows[0].rss_bytes = Some(2048);
        let plain = ps_table(&rows, false);
        assert_eq!(
            plain,
            "ID     STATE     PID  UPTIME  RESTARTS  READY  CPU%   RSS\n\
             cm_cs  RUNNING  4242   1h02m         2    yes   1.2  2.0K\n\
             a      STOPPED     -   1h02m         2    yes     -     -\n"
        );
        assert!(!plain.contains('\x1b'));
        let coloured = ps_table(&rows, true);
        assert!(coloured.contains("\x1b[32mRUNNING\x1b[0m"));
        assert!(!coloured.contains("\x1b[0mSTOPPED"), "no colour code for STOPPED");
    }

    #[test]
    fn ps_json_has_the_documented_shape() {
        let mut row = PsRow::from_record(&record("x\"y", "RUNNING", Some(1))).unwrap();
        row.rss_bytes = Some(10);
        let text = ps_json(7, &[row]);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["seq"], 7);
        let p = &v["processes"][0];
        assert_eq!(p["id"], "x\"y");
        assert_eq!(p["pid"], 1);
        assert_eq!(p["uptime_s"], 3725.4);
        assert_eq!(p["ready"], true);
        assert!(p["cpu_percent"].is_null());
        assert_eq!(p["rss_bytes"], 10);
        let keys: Vec<&String> = p.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "id",
                "state",
                "pid",
                "uptime_s",
                "restarts",
                "ready",
                "cpu_percent",
                "rss_bytes"
            ]
        );
        assert_eq!(ps_json(0, &[]), "{\"seq\": 0, \"processes\": []}\n");
    }

    #[test]
    fn reload_diff_lists_each_change() {
        let list = |ids: &[&str]| Value::List(ids.iter().map(|s| Value::str(*s)).collect());
        let plan = Value::dict([
            ("added", list(&["new"])),
            ("removed", list(&["old"])),
            ("changed", list(&["cm_cs"])),
            ("unchanged", list(&["a", "b"])),
        ]);
        assert_eq!(
            reload_diff(&plan, true),
            "+ new\n- old\n~ cm_cs\nwould apply: 1 added, 1 removed, 1 changed, 2 unchanged\n"
        );
        assert!(reload_diff(&plan, false).ends_with("applied: 1 added, 1 removed, 1 changed, 2 unchanged\n"));
        let none = Value::dict([("unchanged", list(&["a"]))]);
        assert_eq!(reload_diff(&none, false), "no changes (1 unchanged)\n");
    }

    #[test]
    fn event_lines_for_process_events_only() {
        let ev = Value::dict([
            ("event", Value::str("process_state")),
            ("seq", Value::Int(5)),
            ("kind", Value::str("state")),
            ("id", Value::str("dummy")),
            ("old_state", Value::str("RUNNING")),
            ("new_state", Value::str("EXITED")),
            ("pid", Value::Int(99)),
            ("exit_code", Value::Int(3)),
            ("exit_signal", Value::None),
            ("time", Value::Float(0.0)),
        ]);
        assert_eq!(
            event_line(&ev).unwrap(),
            "1970-01-01T00:00:00Z dummy RUNNING -> EXITED pid=99 exit_code=3 seq=5"
        );
        assert_eq!(event_line(&Value::dict([("PID", Value::Int(1))])), None);
    }

    #[test]
    fn new_lines_after_the_overlap() {
        let v = |s: &[&str]| s.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            new_lines(&v(&["a", "b", "c"]), &v(&["b", "c", "d", "e"])),
            v(&["d", "e"]).as_slice()
        );
        assert_eq!(new_lines(&v(&["a", "b"]), &v(&["a", "b"])), [] as [String; 0]);
        assert_eq!(new_lines(&[], &v(&["x"])), v(&["x"]).as_slice());
        assert_eq!(new_lines(&v(&["a"]), &v(&["x", "y"])), v(&["x", "y"]).as_slice());
    }

    #[test]
    fn markup_like_the_original() {
        let text = "Process Manager Status: [red]not active[/] (Proxy is not connected when entering the context.)";
        assert_eq!(
            render_markup(text, 80, false),
            "Process Manager Status: not active (Proxy is not connected when entering the \ncontext.)"
        );
        assert_eq!(render_markup("[green]Sending[/]", 80, false), "Sending");
        assert_eq!(render_markup("[bold red]x[/]", 80, true), "\x1b[1;31mx\x1b[0m");
        assert_eq!(render_markup("[Errno 111] kept", 80, false), "[Errno 111] kept");
        assert_eq!(render_markup("a [b", 80, false), "a [b");
        assert_eq!(wrap("a b c", 80), ["a b c"]);
        assert_eq!(wrap("aaaa bbbb", 5), ["aaaa ", "bbbb"]);
    }
}
