"""The supervisor behind the process-management commands, end to end through the daemon.

Device control servers are stand-ins (``fake_device_cs.py``) started through ``start_process(StartCommand(...))``
from the ORIGINAL Python ``ProcessManagerProxy`` (cgse-core, reference venv) and from ours.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from egse.procman import ProcessManagerProxy, StartCommand, StatusCommand, StopCommand
from ourdaemon import OurDaemon
from refenv import CgseEnv, free_port, in_private_netns, ping_control_server
from replies import ok

pytestmark = [pytest.mark.refenv, pytest.mark.timeout(180)]

HERE = Path(__file__).resolve().parent
FAKE_CS = HERE / "fake_device_cs.py"


def table(ports: dict[str, int]) -> str:
    """A process table: fake device control servers, a crasher, and a TERM-ignoring process tree."""
    lines = [
        f"python: {sys.executable}",
        "allowed_programs: [cgse]",
        "device_commands: [fake, crasher, stubborn, hx]",
        "defaults:",
        "  restart: on-failure",
        "  backoff: {initial: 0.2, factor: 2, max: 1, reset_after: 60, jitter: 0}",
        "  crash_loop: {max_starts: 3, window: 60}",
        "  stop_timeout: 2",
        "devices:",
    ]
    for name, port in ports.items():
        lines += [
            f"  {name}:",
            f'    argv: ["{{python}}", "{FAKE_CS}", "{port}"]',
            f'    readiness: {{ping: {{endpoint: "tcp://127.0.0.1:{port}"}}, timeout: 15, interval: 0.1}}',
        ]
    lines += [
        "  TEMPLATED:",
        '    argv: ["{python}", "-c", "import time; time.sleep(1000)", "{device_args}"]',
        "  CRASHER:",
        '    argv: ["{python}", "-c", "import sys; sys.exit(1)"]',
        "  STUBBORN:",
        "    argv: [bash, -c, \"trap '' TERM; sleep 1000 & sleep 1000 & wait\"]",
        "    stop_timeout: 1",
    ]
    return "\n".join(lines) + "\n"


@pytest.fixture
def site(tmp_path: Path) -> Iterator[CgseEnv]:
    if not in_private_netns():
        pytest.skip("needs a private network namespace (scripts/in-netns.sh)")
    ports = {name: free_port() for name in ("FAKE_01", "FAKE_02", "FAKE_A", "FAKE_B", "FAKE_C")}
    path = tmp_path / "procman.yaml"
    path.write_text(table(ports))
    settings = {"Procman": {"PROCESS_TABLE": str(path), "STOP_CHILDREN_ON_EXIT": True, "MAX_CLIENT_PROCESSES": 16}}
    with CgseEnv(tmp_path / "site", extra_settings=settings) as env:
        env.fake_ports = ports  # type: ignore[attr-defined]
        yield env


def proxy(site: CgseEnv) -> ProcessManagerProxy:
    return ProcessManagerProxy(hostname="127.0.0.1", port=site.ports.pm_cmd, timeout=10.0)


def processes(site: CgseEnv) -> dict[str, dict[str, Any]]:
    with proxy(site) as pm:
        listing = ok(pm.list_processes())
    return {p["id"]: p for p in listing["processes"]}


def wait_for(check: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def running(site: CgseEnv, pid_not: int | None = None, name: str = "FAKE_01") -> Callable[[], Any]:
    def check() -> Any:
        p = processes(site).get(name)
        if p and p["state"] == "RUNNING" and p["ready"] and p["pid"] != pid_not:
            return p
        return None

    return check


def group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2 :].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


class Events:
    """A monitoring subscriber that keeps the process events."""

    def __init__(self, port: int) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.connect(f"tcp://127.0.0.1:{port}")
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.events: list[dict[str, Any]] = []

    def drain(self, seconds: float = 0.2) -> list[dict[str, Any]]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.sock.poll(50):
                msg = pickle.loads(self.sock.recv())  # our own daemon on loopback
                if isinstance(msg, dict) and msg.get("event") == "process_state":
                    self.events.append(msg)
        return self.events

    def wait_subscribed(self, timeout: float = 30.0) -> None:
        """Block until the first message arrives: the subscription has reached the daemon (it publishes its
        status every second), so no event published from now on is missed."""
        if not self.sock.poll(int(timeout * 1000)):
            raise AssertionError(f"no monitoring message within {timeout} s")
        msg = pickle.loads(self.sock.recv())  # our own daemon on loopback
        if isinstance(msg, dict) and msg.get("event") == "process_state":
            self.events.append(msg)

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def test_device_cs_from_the_original_proxy(site: CgseEnv, ours: OurDaemon) -> None:
    events = Events(site.ports.pm_mon)
    try:
        events.wait_subscribed()
        got = site.run_json(
            "from egse.procman import ProcessManagerProxy, StartCommand, StatusCommand\n"
            "with ProcessManagerProxy() as pm:\n"
            "    emit(pm.start_process(StartCommand('FAKE_01', 'cgse fake', [], False)))\n"
        )
        assert got is None
        first = wait_for(running(site), what="FAKE_01 running and ready")
        status = site.run_json(
            "from egse.procman import ProcessManagerProxy, StatusCommand\n"
            "with ProcessManagerProxy() as pm:\n"
            "    emit(pm.get_device_process_status(StatusCommand('FAKE_01', [], 'cgse fake')))\n"
        )
        assert status == {
            "device_id": "FAKE_01",
            "cs_is_active": True,
            "device_is_connected": True,
            "is_simulator_mode": False,
        }
        # A crash: restarted after the backoff, restart count 1, and the events say so.
        os.kill(first["pid"], signal.SIGKILL)
        second = wait_for(running(site, pid_not=first["pid"]), what="FAKE_01 restarted")
        assert second["restarts"] == 1
        evs = [e for e in events.drain(0.5) if e["id"] == "FAKE_01"]
        assert any(e["exit_signal"] == signal.SIGKILL and e["pid"] == first["pid"] for e in evs), evs
        assert evs[-1]["new_state"] == "RUNNING" and evs[-1]["pid"] == second["pid"]
        seqs = [e["seq"] for e in events.events]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"a gap in {seqs}"
        with proxy(site) as pm:
            assert ok(pm.list_processes())["seq"] >= seqs[-1]
        stopped = site.run_json(
            "from egse.procman import ProcessManagerProxy, StopCommand\n"
            "with ProcessManagerProxy() as pm:\n"
            "    emit(pm.stop_process(StopCommand('FAKE_01', [], 'cgse fake')))\n"
        )
        assert stopped is None
        wait_for(lambda: processes(site)["FAKE_01"]["state"] == "STOPPED", what="FAKE_01 stopped")
        inactive = site.run_json(
            "from egse.procman import ProcessManagerProxy, StatusCommand\n"
            "with ProcessManagerProxy() as pm:\n"
            "    emit(pm.get_device_process_status(StatusCommand('FAKE_01', [], 'cgse fake')))\n"
        )
        assert inactive == {"device_id": "FAKE_01", "cs_is_active": False}
    finally:
        events.close()


def test_device_cs_from_our_proxy(site: CgseEnv, ours: OurDaemon) -> None:
    with proxy(site) as pm:
        assert pm.start_process(StartCommand("FAKE_02", "cgse fake", [], False)) is None
    wait_for(running(site, name="FAKE_02"), what="FAKE_02 running")
    with proxy(site) as pm:
        status = ok(pm.get_device_process_status(StatusCommand("FAKE_02", [], "cgse fake")))
        assert status["cs_is_active"] is True
        port = site.fake_ports["FAKE_02"]  # type: ignore[attr-defined]
        expected = f"fake device control server on port {port}, 0 children"
        assert wait_for(lambda: any(expected in line for line in ok(pm.get_process_log("FAKE_02", 5))), what="log")
        assert pm.stop_process(StopCommand("FAKE_02", [], "cgse fake")) is None
    wait_for(lambda: processes(site)["FAKE_02"]["state"] == "STOPPED", what="FAKE_02 stopped")


def test_crash_loop_ends_fatal(site: CgseEnv, ours: OurDaemon) -> None:
    with proxy(site) as pm:
        assert pm.start_process(StartCommand("CRASHER", "cgse crasher", [], False)) is None
    fatal = wait_for(
        lambda: (p := processes(site)["CRASHER"])["state"] == "FATAL" and p, timeout=30, what="CRASHER fatal"
    )
    assert fatal["restarts"] == 2  # three starts within the window: the first and two restarts
    assert fatal["exit_code"] == 1 and fatal["last_error"]
    # No more restarts once FATAL: nothing within longer than the table's largest backoff (1 s). An absence
    # needs a span of time; this one comes from the definition.
    time.sleep(1.5)
    assert processes(site)["CRASHER"]["restarts"] == 2


def test_stop_kills_the_whole_group(site: CgseEnv, ours: OurDaemon) -> None:
    with proxy(site) as pm:
        pm.start_process(StartCommand("STUBBORN", "cgse stubborn", [], False))
    p = wait_for(lambda: (r := processes(site)["STUBBORN"])["state"] == "RUNNING" and r, what="STUBBORN running")
    pgid = p["pgid"]
    wait_for(lambda: len(group_members(pgid)) == 3, what="bash and two grandchildren")
    with proxy(site) as pm:
        pm.stop_process(StopCommand("STUBBORN", [], "cgse stubborn"))
    r = wait_for(lambda: (r := processes(site)["STUBBORN"])["state"] == "STOPPED" and r, what="STUBBORN stopped")
    assert r["exit_signal"] == signal.SIGKILL
    assert group_members(pgid) == []


@pytest.mark.parametrize(
    "cgse_cmd",
    ["sh -c 'touch /tmp/x'", "cgse dummy; touch /tmp/x", "cgse $(touch /tmp/x)", "cgse `touch /tmp/x`", "rm -rf"],
)
def test_shell_commands_are_refused(site: CgseEnv, ours: OurDaemon, cgse_cmd: str, tmp_path: Path) -> None:
    marker = Path("/tmp/x")
    existed = marker.exists()
    with proxy(site) as pm:
        reply = pm.start_process(StartCommand("EVIL", cgse_cmd, [], False))
    assert reply is not None and type(reply).__name__ == "Failure", reply
    assert "allowed programs: [cgse]" in reply.message
    assert "EVIL" not in processes(site)
    assert marker.exists() == existed


def test_daemon_killed_children_readopted(site: CgseEnv, ours: OurDaemon, tmp_path: Path) -> None:
    with proxy(site) as pm:
        for name in ("FAKE_A", "FAKE_B", "FAKE_C"):
            pm.start_process(StartCommand(name, "cgse fake", [], False))
    pids = {n: wait_for(running(site, name=n), what=f"{n} running")["pid"] for n in ("FAKE_A", "FAKE_B", "FAKE_C")}
    ours.kill()  # kill -9 of the daemon; the children live on
    for pid in pids.values():
        os.kill(pid, 0)
    # Make FAKE_C's saved pid point at an unrelated live process (a reused pid), and let the real one die.
    state_file = site.log_dir / "procman-state" / "supervisor" / "supervisor.json"
    state = json.loads(state_file.read_text())
    decoy = subprocess.Popen(["sleep", "1000"])
    try:
        os.kill(pids["FAKE_C"], signal.SIGKILL)
        for saved in state["processes"]:
            if saved["definition"]["id"] == "FAKE_C":
                saved["process"]["pid"] = decoy.pid
        state_file.write_text(json.dumps(state))
        again = OurDaemon(site, name="ours-again").start()
        try:
            procs = processes(site)
            for name in ("FAKE_A", "FAKE_B"):
                assert procs[name]["pid"] == pids[name] and procs[name]["adopted"] is True, procs[name]
                assert procs[name]["state"] == "RUNNING"
            # None duplicated: exactly one process of each id (PROCMAN_ID in its environment).
            for name in ("FAKE_A", "FAKE_B"):
                assert len(with_procman_id(name)) == 1
            # The reused pid is not adopted nor signalled; FAKE_C is restarted as a new process.
            c = wait_for(running(site, name="FAKE_C"), what="FAKE_C restarted")
            assert c["pid"] not in (decoy.pid, pids["FAKE_C"]) and not c["adopted"]
            assert decoy.poll() is None
        finally:
            again.stop()
    finally:
        decoy.kill()
        decoy.wait()


def with_procman_id(name: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"PROCMAN_ID={name}".encode() in environ:
                found.append(int(entry.name))
    return found


# -- issue 13: hardening against a hostile peer ---------------------------------------------------------------------


def test_client_device_args_never_fill_a_table_template(site: CgseEnv, ours: OurDaemon) -> None:
    """Finding 8: TEMPLATED is in the table but not in the Setup; the client's args must not reach its argv."""
    with proxy(site) as pm:
        assert pm.start_process(StartCommand("TEMPLATED", "cgse fake", ["injected"], False)) is None
    p = wait_for(lambda: (r := processes(site)["TEMPLATED"])["state"] == "RUNNING" and r, what="TEMPLATED running")
    assert "injected" not in p["argv"], p["argv"]
    with proxy(site) as pm:
        pm.stop_process(StopCommand("TEMPLATED", [], "cgse fake"))


@pytest.mark.parametrize("cgse_cmd", ["cgse core", "cgse reg", "cgse admin", "cgse fake extra", "cgse"])
def test_only_device_launchers_on_every_path(site: CgseEnv, ours: OurDaemon, cgse_cmd: str) -> None:
    """Finding 7: `cgse core` (and every non-launcher) is refused on start, stop and status alike."""
    with proxy(site) as pm:
        for reply in (
            pm.start_process(StartCommand("NOT_OURS", cgse_cmd, ["X"], False)),
            pm.stop_process(StopCommand("NOT_OURS", ["X"], cgse_cmd)),
            pm.get_device_process_status(StatusCommand("NOT_OURS", ["X"], cgse_cmd)),
        ):
            assert type(reply).__name__ == "Failure", reply
    names = processes(site)
    assert "NOT_OURS" not in names and "NOT_OURS.stop" not in names, sorted(names)


@pytest.mark.parametrize("arg", ["a b", "a;b", "--help", "x'y", "a\nb", ""])
def test_device_args_validated_on_every_path(site: CgseEnv, ours: OurDaemon, arg: str) -> None:
    """Finding 7: the stop path used to pass device_args[0] through unchecked; all three paths check it now."""
    with proxy(site) as pm:
        for reply in (
            pm.start_process(StartCommand("NOT_OURS", "cgse fake", [arg], False)),
            pm.stop_process(StopCommand("NOT_OURS", [arg], "cgse fake")),
            pm.get_device_process_status(StatusCommand("FAKE_01", [arg], "cgse fake")),
        ):
            assert type(reply).__name__ == "Failure", reply
    assert "NOT_OURS.stop" not in processes(site)


def daemon_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def daemon_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_client_definitions_are_bounded(site: CgseEnv, tmp_path: Path) -> None:
    """Findings 2 and 14: start_process for 300 new ids whose launcher (`cgse`, found on PATH) exits 0 at once.

    The definitions never exceed Procman.MAX_CLIENT_PROCESSES (16 here), each is removed once it ends (the
    launcher leaves nothing to adopt: a failed start, then FATAL), the daemon's descriptors and memory come back
    to where they were, another client's Ping keeps answering, and the daemon does not signal itself.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    launcher = bin_dir / "cgse"
    launcher.write_text("#!/bin/sh\nexit 0\n")
    launcher.chmod(0o755)
    path = f"{bin_dir}{os.pathsep}{site.env()['PATH']}"
    with OurDaemon(site, name="flood", extra_env={"PATH": path}) as d:
        d.start()
        pid = d.pid
        with proxy(site) as pm:  # warm up: one client definition, ended
            pm.start_process(StartCommand("HXWARM", "cgse hx", [], False))
        wait_for(lambda: "HXWARM" not in processes(site), timeout=30, what="warm-up definition removed")
        rss0, fds0 = daemon_rss_kb(pid), daemon_fds(pid)
        refused = accepted = 0
        most = 0
        pings_ok = pings = 0
        with proxy(site) as pm:
            for i in range(300):
                reply = pm.start_process(StartCommand(f"HX{i:05d}", "cgse hx", [], False))
                if reply is None:
                    accepted += 1
                else:
                    assert "MAX_CLIENT_PROCESSES" in reply.message, reply.message
                    refused += 1
                if i % 20 == 0:
                    live = [n for n in processes(site) if n.startswith("HX0")]
                    most = max(most, len(live))
                    pings += 1
                    pings_ok += ping_control_server(site.ports.pm_cmd, timeout=5.0)
        assert most <= 16, most
        assert accepted >= 16 and refused > 0, (accepted, refused)
        assert pings_ok == pings, f"{pings - pings_ok} of {pings} pings unanswered"
        wait_for(
            lambda: not any(n.startswith("HX0") for n in processes(site)), timeout=60, what="client definitions gone"
        )
        # Room again once they ended.
        with proxy(site) as pm:
            assert pm.start_process(StartCommand("HXAGAIN", "cgse hx", [], False)) is None
        wait_for(lambda: "HXAGAIN" not in processes(site), timeout=30, what="HXAGAIN removed")
        fds1 = wait_for(lambda: (n := daemon_fds(pid)) <= fds0 + 8 and n, timeout=20, what="descriptors released")
        rss1 = daemon_rss_kb(pid)
        print(f"flood: {accepted} accepted, {refused} refused; fds {fds0} -> {fds1}; RSS {rss0} kB -> {rss1} kB")
        assert rss1 - rss0 < 32 * 1024, (rss0, rss1)
        assert d.proc is not None and d.proc.poll() is None, "the daemon exited:\n" + d.logs()
        assert "refusing to signal" not in d.stderr.read_text() + d.stdout.read_text()
