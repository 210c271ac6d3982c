"""The ``pm_cs`` command line (``python -m egse.procman.procman_cs``): output and exit codes (PROTOCOL.md §12.4)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
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
    is_active,
    kill_pid,
    pid_alive,
    stop_process,
    wait_until,
)
from egse.procman import ProcessManagerProxy
from egse.procman.procman_cs import render, strip_markup, wrap

CLI_FIXTURES = ROOT.parent / "shared" / "reference" / "fixtures" / "protocol" / "cli"

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
    if not CLI_FIXTURES.is_dir():
        pytest.skip("shared/reference fixtures not present")
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
        ip = pm.get_ip_address()
    r = run_cli("status")
    assert (r.returncode, r.stdout) == (0, status_running(ip))
    r = run_cli("stop")
    assert (r.returncode, r.stdout) == (0, STOP_SENT)
    assert fresh_daemon.proc.wait(10) == 0
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
            ip = pm.get_ip_address()
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


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_start_in_the_foreground_stops_on_a_signal(no_daemon: Ports, sig: signal.Signals) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "egse.procman.procman_cs", "start"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=SESSION_DIR,
    )
    try:
        assert wait_until(lambda: proc.poll() is not None or is_active(PORTS.commanding), 20)
        assert proc.poll() is None
        proc.send_signal(sig)
        assert proc.wait(10) == 0
        assert proc.stdout is not None and proc.stdout.read() == b""
    finally:
        stop_process(proc)
        if proc.stdout is not None:
            proc.stdout.close()


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
    script = Path(sys.executable).parent / "pm_cs"
    assert script.exists(), "pip/maturin install the pm_cs console script"
    r = subprocess.run([str(script), "--help"], check=False, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
    for command in ("start", "start-bg", "status", "stop"):
        assert command in r.stdout
    r = run_cli("bogus")
    assert r.returncode == 2 and "invalid choice" in r.stderr


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
