"""The ``pm_cs`` command line (``python -m egse.procman.procman_cs``): output and exit codes."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    LOG_DIR,
    PORTS,
    ROOT,
    SESSION_DIR,
    Daemon,
    Ports,
    daemon_pids,
    free_port,
    is_active,
    kill_pid,
    pid_alive,
    stop_process,
    wait_until,
)
from egse.procman import ProcessManagerProxy
from egse.procman.procman_cs import render, strip_markup, wrap
from replies import ok

CLI_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "protocol" / "cli"

STOP_SENT = "Sending 'quit' command to process manager..\n"
NOT_ACTIVE = "Process Manager Status: not active (Proxy is not connected when entering the \ncontext.)"
STOP_NOT_RUNNING = (
    STOP_SENT + "ERROR: Couldn't connect to process manager: Proxy is not connected when entering the context.\n"
)


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "egse.procman.procman_cs", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        cwd=SESSION_DIR,
    )


def status_running(ip: str | None) -> str:
    return (
        "Process Manager:\n"
        "    Status: active\n"
        f"    Hostname: {ip}\n"
        f"    Monitoring port: {PORTS.monitoring}\n"
        f"    Commanding port: {PORTS.commanding}\n"
        f"    Service port: {PORTS.service}\n"
    )


def test_the_expected_texts_are_the_recorded_ones() -> None:
    assert (CLI_FIXTURES / "pm_cs_status.not_running.stdout").read_text() == NOT_ACTIVE
    assert (CLI_FIXTURES / "pm_cs_stop.not_running.stdout").read_text() == STOP_NOT_RUNNING
    assert (CLI_FIXTURES / "pm_cs_stop.running.stdout").read_text() == STOP_SENT
    recorded = (CLI_FIXTURES / "pm_cs_status.running.stdout").read_text()
    assert recorded == status_running("127.0.0.1").replace(str(PORTS.monitoring), "6121").replace(
        str(PORTS.commanding), "6120"
    ).replace(str(PORTS.service), "6122")


def test_status_not_running(no_daemon: Ports) -> None:
    r = run_cli("status")
    assert (r.returncode, r.stdout) == (0, NOT_ACTIVE)


def test_stop_not_running(no_daemon: Ports) -> None:
    r = run_cli("stop")
    assert r.stdout == STOP_NOT_RUNNING
    assert r.returncode == 1, "deliberate fix: the original exits 0"


def test_status_and_stop_running(fresh_daemon: Daemon) -> None:
    with ProcessManagerProxy() as pm:
        ip = ok(pm.get_ip_address())
    r = run_cli("status")
    assert (r.returncode, r.stdout) == (0, status_running(ip))
    r = run_cli("stop")
    assert (r.returncode, r.stdout) == (0, STOP_SENT)
    assert fresh_daemon.proc.wait(60) == 0
    assert not is_active(PORTS.commanding)


def test_start_bg_status_stop(no_daemon: Ports) -> None:
    log_file = LOG_DIR / "pm_cs.start-bg.log"
    started = time.monotonic()
    r = run_cli("start-bg")
    try:
        assert (r.returncode, r.stdout) == (0, ""), r.stderr
        assert time.monotonic() - started < 10
        pids = daemon_pids()
        assert len(pids) == 1, pids
        argv = Path(f"/proc/{pids[0]}/cmdline").read_bytes().split(b"\0")
        assert any(b"procman_cs" in a for a in argv) and b"start" in argv, "cgse core stop must find it"
        assert wait_until(lambda: is_active(PORTS.commanding), 10)
        assert log_file.exists()
        with ProcessManagerProxy() as pm:
            ip = ok(pm.get_ip_address())
        r = run_cli("status")
        assert (r.returncode, r.stdout) == (0, status_running(ip))
        again = run_cli("start-bg")
        assert again.returncode == 0 and "already running" in again.stderr
        assert daemon_pids() == pids
        r = run_cli("stop")
        assert (r.returncode, r.stdout) == (0, STOP_SENT)
        assert wait_until(lambda: not pid_alive(pids[0]), 10)
        assert "listening" in log_file.read_text()
    finally:
        for pid in daemon_pids():
            kill_pid(pid)


@contextlib.contextmanager
def foreground_daemon(stdout: int, stderr: int, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """``procman_cs start`` in the foreground with the given output streams, answering on the session ports;
    stopped by pid and its pipes closed afterwards."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "egse.procman.procman_cs", "start"],
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        cwd=SESSION_DIR,
        env=env,
    )
    try:
        assert wait_until(lambda: proc.poll() is not None or is_active(PORTS.commanding), 20)
        assert proc.poll() is None
        yield proc
    finally:
        stop_process(proc)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_start_in_the_foreground_stops_on_a_signal(no_daemon: Ports, sig: signal.Signals) -> None:
    with foreground_daemon(subprocess.PIPE, subprocess.DEVNULL) as proc:
        proc.send_signal(sig)
        assert proc.wait(60) == 0
        assert proc.stdout is not None and proc.stdout.read() == b""


def test_a_stderr_nobody_reads_never_stops_the_daemon(no_daemon: Ports) -> None:
    """The daemon logs through a thread of its own: with stderr a pipe nobody reads (a parent that never drains
    it), the pipe fills and lines are dropped, but requests keep being answered. At DEBUG every request is
    logged, so 3,000 requests write several times the 64 KiB a pipe holds."""
    import zmq

    env = {**os.environ, "PROCMAN_LOG": "debug"}
    with foreground_daemon(subprocess.DEVNULL, subprocess.PIPE, env) as proc:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(f"tcp://127.0.0.1:{PORTS.commanding}")
            ping = pickle.dumps("Ping", protocol=4)
            for i in range(3000):
                sock.send(ping)
                assert sock.poll(10_000), f"no reply to request {i}: the daemon is stuck on its log output"
                assert pickle.loads(sock.recv()) == "Pong"
        finally:
            sock.close(0)
            ctx.term()
        assert proc.stderr is not None
        os.set_blocking(proc.stderr.fileno(), False)
        held = proc.stderr.read() or b""
        assert len(held) >= 60_000, f"only {len(held)} bytes of log: the pipe never filled, nothing was tested"


def test_start_fails_readably_when_a_port_is_taken(no_daemon: Ports) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # earlier tests leave TIME_WAIT behind
        blocker.bind(("0.0.0.0", PORTS.service))
        blocker.listen()
        r = run_cli("start")
    assert r.returncode == 1, "deliberate fix: the original exits 0"
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("pm_cs start: cannot bind the service socket") and str(PORTS.service) in last


def test_console_script_and_help() -> None:
    script = Path(sys.executable).parent / "procman_cs"
    assert script.exists(), "pip/maturin install the procman_cs console script (pm_cs is cgse-core's)"
    r = subprocess.run([str(script), "--help"], check=False, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
    for command in ("start", "start-bg", "status", "stop"):
        assert command in r.stdout
    for command in ("ps", "logs", "start-process", "stop-process", "restart", "reload", "events"):
        assert command in r.stdout
    r = run_cli("bogus")
    assert r.returncode == 2 and "bogus" in r.stderr


def test_markup_rendering() -> None:
    text = "Process Manager Status: [red]not active[/] (Proxy is not connected when entering the context.)"
    assert strip_markup(text) == NOT_ACTIVE.replace(" \n", " ")
    assert render(text, tty=False, width=80) == NOT_ACTIVE
    assert render("[green]Sending[/]", tty=False) == "Sending"
    assert render("[bold red]x[/]", tty=True) == "\x1b[1;31mx\x1b[0m"
    assert render("[Errno 111] kept", tty=False) == "[Errno 111] kept", "only markup tags are stripped"
    assert wrap("a b c", 80) == ["a b c"]
    assert wrap("aaaa bbbb", 5) == ["aaaa ", "bbbb"]
    assert os.environ.get("COLUMNS") is None


# --- the operator commands, against our daemon with a small process table, from the Rust binary and the module ---

PM_CS = ROOT / "target" / "release" / "pm_cs"

ALPHA_SCRIPT = "import sys, time\nfor i in range(5): print('line', i, flush=True)\nsys.stdin.read() if False else time.sleep(1000)\n"


def ops_table(path: Path, extra: str = "") -> Path:
    """Two core services that start with the daemon: alpha prints five lines then sleeps; beta sleeps."""
    path.write_text(
        f"python: {sys.executable}\n"
        "defaults:\n  restart: never\n  stop_timeout: 2\n"
        "core_services:\n"
        "  alpha:\n"
        f'    argv: ["{{python}}", -c, {ALPHA_SCRIPT!r}]\n'
        "    autostart: true\n"
        "  beta:\n"
        "    argv: [sleep, '1000']\n"
        "    autostart: true\n" + extra
    )
    return path


class OpsDaemon:
    """Our daemon on its own ports and table; the CLI reaches it with ``--settings``."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp
        self.table = ops_table(tmp / "table.yaml")
        self.ports = Ports(free_port(), free_port(), free_port())
        self.settings = tmp / "settings.yaml"
        self.settings.write_text(
            "Process Manager Control Server:\n"
            f"    COMMANDING_PORT: {self.ports.commanding}\n"
            f"    MONITORING_PORT: {self.ports.monitoring}\n"
            f"    SERVICE_PORT: {self.ports.service}\n"
            "Procman:\n"
            "    BIND_ADDRESS: 127.0.0.1\n"
            f"    STATE_DIR: {tmp / 'state'}\n"
            f"    PROCESS_TABLE: {self.table}\n"
            "    STOP_CHILDREN_ON_EXIT: true\n"
        )
        self.stderr = open(tmp / "daemon.stderr", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(PM_CS), "start", "--settings", str(self.settings)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.stderr,
            cwd=tmp,
        )
        if not wait_until(lambda: self.proc.poll() is not None or is_active(self.ports.commanding), 20):
            raise AssertionError("the daemon did not answer within 20 s")

    def stop(self) -> None:
        stop_process(self.proc)
        self.stderr.close()


def cli(how: str, d: OpsDaemon, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """One CLI command, from the binary or from ``python -m egse.procman.procman_cs``."""
    exe = [str(PM_CS)] if how == "binary" else [sys.executable, "-m", "egse.procman.procman_cs"]
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    return subprocess.run(
        [*exe, *args, "--settings", str(d.settings)],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        cwd=d.dir,
        env=env,
    )


def ps_json(how: str, d: OpsDaemon) -> dict[str, dict[str, object]]:
    r = cli(how, d, "ps", "--json")
    assert r.returncode == 0, r.stderr
    return {p["id"]: p for p in json.loads(r.stdout)["processes"]}


@pytest.fixture
def ops(tmp_path: Path) -> Iterator[OpsDaemon]:
    if not PM_CS.exists():
        pytest.skip("cargo build --release --bin pm_cs first")
    d = OpsDaemon(tmp_path)
    try:
        yield d
    finally:
        d.stop()


HOW = pytest.mark.parametrize("how", ["binary", "module"])


@HOW
def test_ps_table_and_json(ops: OpsDaemon, how: str) -> None:
    assert wait_until(lambda: all(p["state"] == "RUNNING" for p in ps_json(how, ops).values()), 20)
    procs = ps_json(how, ops)
    assert list(procs) == ["alpha", "beta"]
    beta = procs["beta"]
    assert set(beta) == {"id", "state", "pid", "uptime_s", "restarts", "ready", "cpu_percent", "rss_bytes"}
    assert isinstance(beta["pid"], int) and pid_alive(beta["pid"])
    assert isinstance(beta["rss_bytes"], int) and beta["rss_bytes"] > 0, "local /proc figures"
    r = cli(how, ops, "ps")
    assert r.returncode == 0 and "\x1b" not in r.stdout, "no colours off a terminal"
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["ID", "STATE", "PID", "UPTIME", "RESTARTS", "READY", "CPU%", "RSS"]
    assert [line.split()[:3] for line in lines[1:]] == [
        ["alpha", "RUNNING", str(procs["alpha"]["pid"])],
        ["beta", "RUNNING", str(beta["pid"])],
    ]


@HOW
def test_logs_and_errors_name_the_id(ops: OpsDaemon, how: str) -> None:
    assert wait_until(lambda: cli(how, ops, "logs", "alpha").stdout.count("line") == 5, 20)
    r = cli(how, ops, "logs", "-n", "2", "alpha")
    assert (r.returncode, r.stdout) == (0, "line 3\nline 4\n")
    r = cli(how, ops, "logs", "nosuch")
    assert r.returncode == 1 and "nosuch" in r.stderr and r.stdout == ""
    r = cli(how, ops, "logs")
    assert r.returncode == 2
    r = cli(how, ops, "restart", "nosuch")
    assert r.returncode == 1 and "nosuch" in r.stderr


@HOW
def test_stop_start_restart_a_process(ops: OpsDaemon, how: str) -> None:
    assert wait_until(lambda: ps_json(how, ops)["beta"]["state"] == "RUNNING", 20)
    r = cli(how, ops, "stop-process", "beta")
    assert (r.returncode, r.stdout) == (0, "beta: stop requested\n"), r.stderr
    assert wait_until(lambda: ps_json(how, ops)["beta"]["state"] == "STOPPED", 20)
    r = cli(how, ops, "start-process", "beta")
    assert (r.returncode, r.stdout) == (0, "beta: start requested\n"), r.stderr
    assert wait_until(lambda: ps_json(how, ops)["beta"]["state"] == "RUNNING", 20)
    pid = ps_json(how, ops)["beta"]["pid"]
    r = cli(how, ops, "restart", "beta")
    assert (r.returncode, r.stdout) == (0, "beta: restart requested\n"), r.stderr
    assert wait_until(lambda: ps_json(how, ops)["beta"]["pid"] not in (None, pid), 20)


def test_reload_dry_run_then_apply(ops: OpsDaemon) -> None:
    r = cli("binary", ops, "reload", "--dry-run")
    assert (r.returncode, r.stdout) == (0, "no changes (2 unchanged)\n"), r.stderr
    ops_table(ops.table, "  gamma:\n    argv: [sleep, '1000']\n    autostart: false\n")
    text = ops.table.read_text().replace("  beta:\n    argv: [sleep, '1000']", "  beta:\n    argv: [sleep, '999']")
    ops.table.write_text(text)
    r = cli("module", ops, "reload", "--dry-run")
    assert (r.returncode, r.stdout) == (0, "+ gamma\n~ beta\nwould apply: 1 added, 0 removed, 1 changed, 1 unchanged\n")
    assert "gamma" not in ps_json("binary", ops), "a dry run changes nothing"
    r = cli("binary", ops, "reload")
    assert (r.returncode, r.stdout) == (0, "+ gamma\n~ beta\napplied: 1 added, 0 removed, 1 changed, 1 unchanged\n")
    assert "gamma" in ps_json("binary", ops)


@HOW
def test_events_and_logs_follow_until_the_daemon_goes_away(ops: OpsDaemon, how: str) -> None:
    exe = [str(PM_CS)] if how == "binary" else [sys.executable, "-m", "egse.procman.procman_cs"]
    assert wait_until(lambda: ps_json(how, ops)["beta"]["state"] == "RUNNING", 20)
    # `-n 1` must show alpha's last line, so wait until it has printed all five.
    assert wait_until(lambda: "line 4" in cli(how, ops, "logs", "alpha").stdout, 30)
    out = ops.dir / f"events.{how}"
    followed = ops.dir / f"follow.{how}"
    with open(out, "w") as f, open(followed, "w") as g:
        events = subprocess.Popen(
            [*exe, "events", "--settings", str(ops.settings)], stdout=f, stderr=subprocess.PIPE, text=True
        )
        follow = subprocess.Popen(
            [*exe, "logs", "-f", "-n", "1", "alpha", "--settings", str(ops.settings)],
            stdout=g,
            stderr=subprocess.PIPE,
            text=True,
        )
    try:
        # The subscription needs a moment to be in place: restart until an event line shows up.
        def seen() -> bool:
            cli(how, ops, "restart", "beta")
            return wait_until(lambda: " beta RUNNING -> STOPPING" in out.read_text(), 3)

        assert wait_until(seen, 30)
        # The follower prints its first line once it has asked the daemon: on a busy machine that can come
        # after the events subscription is in place, and the daemon must still be there to answer.
        assert wait_until(lambda: followed.read_text().startswith("line 4\n"), 30), followed.read_text()
        ops.stop()
        assert events.wait(30) == 1
        assert events.stderr is not None and "went away" in events.stderr.read()
        assert follow.wait(30) == 1
        assert followed.read_text().startswith("line 4\n")
        assert follow.stderr is not None and "alpha" in follow.stderr.read()
    finally:
        for p in (events, follow):
            stop_process(p)  # type: ignore[arg-type]
            for pipe in (p.stdout, p.stderr):
                if pipe is not None:
                    pipe.close()


@HOW
def test_follow_ends_on_ctrl_c(ops: OpsDaemon, how: str) -> None:
    exe = [str(PM_CS)] if how == "binary" else [sys.executable, "-m", "egse.procman.procman_cs"]
    p = subprocess.Popen(
        [*exe, "logs", "-f", "alpha", "--settings", str(ops.settings)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert p.stdout is not None
        assert p.stdout.readline().startswith(b"line"), "it prints, then follows"
        p.send_signal(signal.SIGINT)
        assert p.wait(60) == 130
    finally:
        stop_process(p)
        for pipe in (p.stdout, p.stderr):
            if pipe is not None:
                pipe.close()


@HOW
def test_stop_all_stops_processes_in_reverse_order_then_the_daemon(ops: OpsDaemon, how: str) -> None:
    assert wait_until(lambda: all(p["state"] == "RUNNING" for p in ps_json(how, ops).values()), 20)
    pids = [int(str(p["pid"])) for p in ps_json(how, ops).values()]
    r = cli(how, ops, "stop", "--all")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:4] == ["beta: stopping ...", "beta: STOPPED", "alpha: stopping ...", "alpha: STOPPED"], lines
    assert ops.proc.wait(20) == 0
    assert not any(pid_alive(p) for p in pids)


@HOW
def test_not_running_is_exit_code_1_on_stderr(no_daemon: Ports, how: str) -> None:
    exe = [str(PM_CS)] if how == "binary" else [sys.executable, "-m", "egse.procman.procman_cs"]
    if how == "binary" and not PM_CS.exists():
        pytest.skip("cargo build --release --bin pm_cs first")
    r = subprocess.run([*exe, "ps"], check=False, capture_output=True, text=True, timeout=30, cwd=SESSION_DIR)
    assert r.returncode == 1 and r.stdout == ""
    assert "cannot reach the Process Manager" in r.stderr and str(PORTS.commanding) in r.stderr


def test_cgse_plugin_function() -> None:
    """``cgse procman …`` runs the same CLI (the typer group itself needs cgse's typer: see test below)."""
    from egse.procman import cgse_plugin

    assert cgse_plugin.procman_cli(["--help"]) == 0
    assert cgse_plugin.procman_cli(["bogus"]) == 2
    assert set(cgse_plugin.COMMANDS) >= {"ps", "logs", "events", "reload", "stop"}


def test_cgse_plugin_group_builds_with_typer() -> None:
    typer = pytest.importorskip("typer")
    from egse.procman import cgse_plugin
    from typer.testing import CliRunner

    app = cgse_plugin.app
    assert isinstance(app, typer.Typer)
    result = CliRunner().invoke(app, ["ps", "--help"])
    assert result.exit_code == 0
