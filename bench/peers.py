"""Supervision figures of two peers, supervisord and circus, measured as bench/bench.py measures procman.

    python3 bench/peers.py --setup                 # once, with network: .venv-peers (bench/requirements-peers.txt)
    scripts/in-netns.sh .venv/bin/python bench/peers.py [--n 100] [--kills 20] [--calls 200]

Each peer runs from ``.venv-peers`` in its own temporary directory, with a generated configuration of ``n``
programs ``sleep 1000`` (not started automatically) and its control endpoint on 127.0.0.1 at a free port.
Configured for the quickest reaction:

* supervisord: ``startsecs=0`` (RUNNING as soon as spawned), ``autorestart=true``, ``startretries=1000``,
  ``stopwaitsecs=5``, no child logs (``stdout_logfile=NONE``); XML-RPC on ``[inet_http_server]``.
* circus: ``check_delay=0.01`` (its watcher-management period, default 1 s), ``warmup_delay=0``,
  ``respawn=true``, ``max_retry=-1``, ``check_flapping=false``, ``graceful_timeout=5``, no stats/statsd.

Measured for each (the client is this interpreter; the peer's own CLI runs from ``.venv-peers``):

* start n → all RUNNING: one "start all" request, then the status polled back to back until every program
  is RUNNING (supervisord: ``startAllProcesses(wait=False)``, ``getAllProcessInfo``; circus: ``start``,
  ``status``);
* status of n: the CLI (``supervisorctl status`` / ``circusctl status``, a subprocess each, p50) and the raw
  protocol (XML-RPC ``supervisor.getAllProcessInfo`` with ``xmlrpc.client``; circus's ZeroMQ JSON
  ``status`` and ``list`` with pyzmq), p50 of ``calls`` requests (key ``main``: ``getAllProcessInfo`` /
  ``status``; circus's ``list_each``: one ``list`` per watcher, the only way to its pids);
* idle RSS, with the n programs running, after 2 s idle: the supervisor process and its tree (and its CPU %
  over those 2 s);
* crash → restarted: ``kill -9`` of one program's pid, then its status polled back to back until it shows
  RUNNING with another pid (``kills`` times);
* stop n → all stopped: one "stop all" request, then polled until every program is stopped.

Results: one JSON object per peer (``--out``, default stdout).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import xmlrpc.client
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

PEERS_VENV = Path(os.environ.get("PROCMAN_PEERS_VENV", REPO / ".venv-peers"))
REQUIREMENTS = REPO / "bench" / "requirements-peers.txt"
SETUP_HINT = "python3 bench/peers.py --setup   (outside the network namespace: it needs PyPI)"


def log(msg: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def peers_bin(name: str) -> Path:
    return PEERS_VENV / "bin" / name


def ensure_venv() -> Path:
    """``.venv-peers`` with the pinned supervisor and circus; made on first use (needs PyPI)."""
    py = peers_bin("python")
    marker = PEERS_VENV / ".requirements-peers.txt"
    if py.exists() and marker.exists() and marker.read_text() == REQUIREMENTS.read_text():
        return py
    log(f"creating {PEERS_VENV} ({REQUIREMENTS.name})")
    try:
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)], check=True, timeout=600)
    except (subprocess.SubprocessError, OSError) as e:
        raise RuntimeError(f"cannot make {PEERS_VENV} ({e}); run once: {SETUP_HINT}") from e
    marker.write_text(REQUIREMENTS.read_text())
    return py


def peer_version(dist: str) -> str:
    r = subprocess.run(
        [str(peers_bin("python")), "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
        capture_output=True,
        text=True,
        check=False,
    )
    return r.stdout.strip() or "?"


# ------------------------------------------------------------------------------------------------ helpers


# Looked up here, in the parent: importing ctypes in each forked child added ~5 ms to every spawn (Popen -> main
# of a trivial C program: 11 ms with it, 5.9 ms without; 2.0 ms with no preexec_fn at all).
try:
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _PRCTL = None


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGKILL when the benchmark dies (PR_SET_PDEATHSIG), so none outlives it."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL, 0, 0, 0)


def _children(pid: int) -> list[int]:
    """Children of every thread of ``pid`` (a child belongs to the thread that forked it)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out += [int(x) for x in (task / "children").read_text().split()]
    return out


def _kib(pid: int) -> dict[str, int]:
    """Rss and Pss of one process (smaps_rollup), in KiB; zeros when it is gone."""
    out = {"Rss": 0, "Pss": 0, "Private_Clean": 0, "Private_Dirty": 0}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            parts = line.split()
            if parts and parts[0].rstrip(":") in out:
                out[parts[0].rstrip(":")] = int(parts[1])
    return out


def tree_memory(pid: int) -> dict[str, Any]:
    """RSS, PSS and USS (private pages) of ``pid``; RSS and PSS summed over its tree (itself and every descendant), in KiB.

    PSS shares each page among the processes that map it, so the tree's PSS does not count the 100 children's
    shared libc n times (their RSS sum does)."""
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        seen.append(p)
        todo.extend(_children(p))
    each = [_kib(p) for p in seen]
    return {
        "rss_kib": each[0]["Rss"],
        "pss_kib": each[0]["Pss"],
        "uss_kib": each[0]["Private_Clean"] + each[0]["Private_Dirty"],
        "tree_rss_kib": sum(m["Rss"] for m in each),
        "tree_pss_kib": sum(m["Pss"] for m in each),
        "tree_processes": len(seen),
    }


def free_ports(n: int) -> list[int]:
    """``n`` ports picked by the OS on 127.0.0.1 (bound together, then released for the peer to bind)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def stats(lat_s: list[float], errors: int = 0, elapsed: float | None = None) -> dict[str, Any]:
    """Latency summary in microseconds (as bench/pyclient.py's)."""
    from pyclient import stats as _stats  # pyclient needs pyzmq: not for --setup

    return _stats(lat_s, errors, elapsed)


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (itself, not its children), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> float:
    """Call ``pred`` back to back until true; returns the perf_counter when it was."""
    deadline = time.perf_counter() + timeout
    while True:
        if pred():
            return time.perf_counter()
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")


def timed_calls(fn: Callable[[], Any], n: int, warmup: int = 5) -> dict[str, Any]:
    for _ in range(min(warmup, n)):
        fn()
    lat = []
    t0 = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t)
    return stats(lat, 0, time.perf_counter() - t0)


def cli_calls(
    argv: list[str], n: int, check: Callable[[str], bool], env: dict[str, str] | None = None
) -> dict[str, Any]:
    """``n`` runs of a CLI (a subprocess each): wall time from spawn to exit."""
    lat, bad = [], 0
    for _ in range(n + 1):
        t = time.perf_counter()
        r = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60, env=env)
        dt = time.perf_counter() - t
        if not check(r.stdout):
            bad += 1
            log(f"{argv[0]}: unexpected output (rc {r.returncode}): {r.stdout[-300:]} {r.stderr[-300:]}")
        lat.append(dt)
    return stats(lat[1:], bad)  # the first run warms the page cache


# ------------------------------------------------------------------------------------------------ the peers


class Peer:
    """One supervisor of ``n`` programs ``sleep 1000`` in its own temporary directory."""

    name = "?"

    def __init__(self, n: int) -> None:
        self.n = n
        self.names = [f"p{i:03d}" for i in range(n)]
        self.root = Path(tempfile.mkdtemp(prefix=f"bench-{self.name}-"))
        self.proc: subprocess.Popen[bytes] | None = None

    # -- to be provided by each peer
    def argv(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def states(self) -> dict[str, tuple[str, int | None]]:
        """``{program: (state, pid)}`` with state normalized to RUNNING / STOPPED / other."""
        raise NotImplementedError

    def state_of(self, name: str) -> tuple[str, int | None]:
        return self.states()[name]

    def start_all(self) -> None:
        raise NotImplementedError

    def stop_all(self) -> None:
        raise NotImplementedError

    def raw_status(self) -> dict[str, Callable[[], Any]]:
        raise NotImplementedError

    def cli_status(self) -> tuple[list[str], Callable[[str], bool]]:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    # -- common
    def launch(self) -> None:
        out = open(self.root / "out.log", "wb")  # noqa: SIM115 - closed below
        self.proc = subprocess.Popen(
            self.argv(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=self.root,
            start_new_session=True,
            preexec_fn=die_with_parent,  # noqa: PLW1509 - only prctl()
        )
        out.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {(self.root / 'out.log').read_text()[-2000:]}")
            with contextlib.suppress(Exception):
                if self.ready():
                    return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready within 30 s")

    def shutdown(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # Children that outlived their supervisor (none expected): by pid, from our own records only.
        shutil.rmtree(self.root, ignore_errors=True)

    def all_in(self, state: str) -> bool:
        s = self.states()
        return len(s) == self.n and all(v[0] == state for v in s.values())

    def measure(self, kills: int, calls: int, cli_runs: int) -> dict[str, Any]:
        assert self.proc is not None
        res: dict[str, Any] = {"config": self.config(), "pid": self.proc.pid}
        log(f"{self.name}: start {self.n} → all RUNNING")
        t0 = time.perf_counter()
        self.start_all()
        t_ret = time.perf_counter()
        t_all = wait_until(lambda: self.all_in("RUNNING"), 60, "all RUNNING")
        res["start"] = {
            "calls_returned_ms": round((t_ret - t0) * 1e3, 2),
            "all_running_ms": round((t_all - t0) * 1e3, 2),
        }
        time.sleep(1.0)
        log(f"{self.name}: status of {self.n}: CLI x {cli_runs}, raw protocol x {calls}")
        argv, check = self.cli_status()
        res["status_cli"] = cli_calls(argv, cli_runs, check)
        res["status_raw"] = {}
        for k, fn in self.raw_status().items():
            n = calls if k == "main" else min(calls, 20)  # circus's list_each: 100 requests each
            c0 = cpu_seconds(self.proc.pid)
            r = timed_calls(fn, n)
            # The supervisor's own CPU per request (warm-up requests included: n + 5).
            r["server_cpu_us"] = round((cpu_seconds(self.proc.pid) - c0) / (n + min(5, n)) * 1e6, 1)
            res["status_raw"][k] = r
        c0 = cpu_seconds(self.proc.pid)
        time.sleep(2.0)
        res["idle_cpu_pct"] = round((cpu_seconds(self.proc.pid) - c0) / 2.0 * 100, 2)
        res["idle_memory"] = tree_memory(self.proc.pid)
        log(f"{self.name}: crash → restarted x {kills}")
        victim = self.names[0]
        restart = []
        for _ in range(kills):
            state, old = self.state_of(victim)
            assert state == "RUNNING" and old, (state, old)
            t0 = time.perf_counter()
            os.kill(old, signal.SIGKILL)

            def again(old: int = old) -> bool:
                st, pid = self.state_of(victim)
                return st == "RUNNING" and pid is not None and pid != old

            restart.append(wait_until(again, 30, "restarted") - t0)
            time.sleep(0.05)
        res["crash_restart"] = {"running_again": stats(restart)}
        wait_until(lambda: self.all_in("RUNNING"), 30, "all RUNNING after the kills")
        log(f"{self.name}: stop {self.n} → all stopped")
        t0 = time.perf_counter()
        self.stop_all()
        t_ret = time.perf_counter()
        t_all = wait_until(lambda: self.all_in("STOPPED"), 60, "all STOPPED")
        res["stop"] = {
            "calls_returned_ms": round((t_ret - t0) * 1e3, 2),
            "all_stopped_ms": round((t_all - t0) * 1e3, 2),
        }
        return res


class Supervisord(Peer):
    name = "supervisord"

    def __init__(self, n: int) -> None:
        super().__init__(n)
        (self.port,) = free_ports(1)
        self.conf = self.root / "supervisord.conf"
        lines = [
            "[inet_http_server]",
            f"port = 127.0.0.1:{self.port}",
            "[supervisord]",
            f"logfile = {self.root / 'supervisord.log'}",
            f"pidfile = {self.root / 'supervisord.pid'}",
            f"childlogdir = {self.root}",
            "nodaemon = true",
            "loglevel = warn",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
            "[supervisorctl]",
            f"serverurl = http://127.0.0.1:{self.port}",
        ]
        for p in self.names:
            lines += [
                f"[program:{p}]",
                "command = sleep 1000",
                "autostart = false",
                "autorestart = true",
                "startsecs = 0",
                "startretries = 1000",
                "stopwaitsecs = 5",
                "stdout_logfile = NONE",
                "stderr_logfile = NONE",
            ]
        self.conf.write_text("\n".join(lines) + "\n")
        self.rpc = xmlrpc.client.ServerProxy(f"http://127.0.0.1:{self.port}/RPC2")

    def config(self) -> dict[str, Any]:
        return {"startsecs": 0, "autorestart": True, "startretries": 1000, "stopwaitsecs": 5, "child_logs": None}

    def argv(self) -> list[str]:
        return [str(peers_bin("supervisord")), "-n", "-c", str(self.conf)]

    def ready(self) -> bool:
        return self.rpc.supervisor.getState()["statename"] == "RUNNING"

    @staticmethod
    def _norm(info: dict[str, Any]) -> tuple[str, int | None]:
        st = info["statename"]
        return ("STOPPED" if st in ("STOPPED", "EXITED") else st, info["pid"] or None)

    def states(self) -> dict[str, tuple[str, int | None]]:
        return {i["name"]: self._norm(i) for i in self.rpc.supervisor.getAllProcessInfo()}

    def state_of(self, name: str) -> tuple[str, int | None]:
        return self._norm(self.rpc.supervisor.getProcessInfo(name))

    def start_all(self) -> None:
        self.rpc.supervisor.startAllProcesses(False)

    def stop_all(self) -> None:
        self.rpc.supervisor.stopAllProcesses(False)

    def raw_status(self) -> dict[str, Callable[[], Any]]:
        def all_info() -> Any:
            r = self.rpc.supervisor.getAllProcessInfo()
            assert len(r) == self.n
            return r

        return {"main": all_info}  # supervisor.getAllProcessInfo

    def cli_status(self) -> tuple[list[str], Callable[[str], bool]]:
        argv = [str(peers_bin("supervisorctl")), "-c", str(self.conf), "status"]
        return argv, lambda out: out.count("RUNNING") == self.n


class Circus(Peer):
    name = "circus"

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.port, self.pub_port = free_ports(2)
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.conf = self.root / "circus.ini"
        lines = [
            "[circus]",
            f"endpoint = {self.endpoint}",
            f"pubsub_endpoint = tcp://127.0.0.1:{self.pub_port}",
            "statsd = false",
            "stats = false",
            "check_delay = 0.01",
            "warmup_delay = 0",
            "loglevel = WARNING",
            f"logoutput = {self.root / 'circusd.log'}",
        ]
        for p in self.names:
            lines += [
                f"[watcher:{p}]",
                "cmd = sleep",
                "args = 1000",
                "numprocesses = 1",
                "autostart = false",
                "respawn = true",
                "warmup_delay = 0",
                "max_retry = -1",
                "check_flapping = false",
                "graceful_timeout = 5",
                "copy_env = true",
            ]
        self.conf.write_text("\n".join(lines) + "\n")
        import zmq

        self.zmq = zmq
        self.ctx = zmq.Context()
        self.sock = self._socket()

    def _socket(self) -> Any:
        s = self.ctx.socket(self.zmq.DEALER)
        s.setsockopt(self.zmq.LINGER, 0)
        s.connect(self.endpoint)
        return s

    def call(self, command: str, timeout: float = 10.0, **props: Any) -> dict[str, Any]:
        """One request of circus's ZeroMQ JSON protocol (what circusctl sends), on a DEALER socket."""
        mid = uuid.uuid4().hex
        self.sock.send(json.dumps({"id": mid, "command": command, "properties": props}).encode())
        deadline = time.perf_counter() + timeout
        while True:
            left = deadline - time.perf_counter()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1):
                self.sock.close(0)
                self.sock = self._socket()
                raise TimeoutError(f"circus {command}: no reply in {timeout} s")
            reply = json.loads(self.sock.recv())
            if reply.get("id") == mid:
                if reply.get("status") != "ok":
                    raise RuntimeError(f"circus {command}: {reply}")
                return reply

    def config(self) -> dict[str, Any]:
        return {
            "check_delay": 0.01,
            "warmup_delay": 0,
            "respawn": True,
            "max_retry": -1,
            "check_flapping": False,
            "graceful_timeout": 5,
            "stats": False,
        }

    def argv(self) -> list[str]:
        return [str(peers_bin("circusd")), str(self.conf)]

    def ready(self) -> bool:
        return len(self.call("status", timeout=1.0)["statuses"]) == self.n

    def states(self) -> dict[str, tuple[str, int | None]]:
        # `status` tells a watcher's state, not its pids: a watcher is "active" once its processes are spawned.
        st = self.call("status")["statuses"]
        norm = {"active": "RUNNING", "stopped": "STOPPED"}
        return {k: (norm.get(v, v), None) for k, v in st.items() if k in self.names}

    def state_of(self, name: str) -> tuple[str, int | None]:
        pids = self.call("list", name=name)["pids"]
        alive = [p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)]
        return ("RUNNING", alive[0]) if len(alive) == 1 and pids == alive else ("OTHER", None)

    def start_all(self) -> None:
        # `start` without a name starts only the watchers with autostart: one `start` per watcher.
        for p in self.names:
            self.call("start", name=p, waiting=True)

    def stop_all(self) -> None:
        self.call("stop", timeout=60.0)

    def raw_status(self) -> dict[str, Callable[[], Any]]:
        def status() -> Any:
            r = self.call("status")["statuses"]
            assert len(r) == self.n
            return r

        def list_pids() -> Any:  # one request per watcher: circus has no "every pid" command
            return [self.call("list", name=p)["pids"] for p in self.names]

        return {"main": status, "list_each": list_pids}

    def cli_status(self) -> tuple[list[str], Callable[[str], bool]]:
        argv = [str(peers_bin("circusctl")), "--endpoint", self.endpoint, "--timeout", "10", "status"]
        return argv, lambda out: out.count("active") == self.n

    def shutdown(self) -> None:
        self.sock.close(0)
        self.ctx.term()
        super().shutdown()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


PEERS: dict[str, type[Peer]] = {"supervisord": Supervisord, "circus": Circus}


def run_peer(name: str, n: int = 100, kills: int = 20, calls: int = 200, cli_runs: int = 20) -> dict[str, Any]:
    """Measure one peer; ``{"error": ...}`` when it could not be measured."""
    ensure_venv()
    peer = PEERS[name](n)
    try:
        log(f"{name}: launching ({peer.root})")
        peer.launch()
        res = peer.measure(kills, calls, cli_runs)
        res["version"] = peer_version("supervisor" if name == "supervisord" else "circus")
        res["n"] = n
        return res
    finally:
        peer.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", action="store_true", help="make .venv-peers (needs PyPI) and exit")
    ap.add_argument("--peer", choices=tuple(PEERS), action="append", help="only this peer (repeatable)")
    ap.add_argument("--n", type=int, default=100, help="programs per peer")
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--calls", type=int, default=200, help="raw-protocol status requests")
    ap.add_argument("--cli-runs", type=int, default=20, help="CLI status runs")
    ap.add_argument("--out", type=Path)
    cfg = ap.parse_args()
    if cfg.setup:
        ensure_venv()
        return 0
    results = {p: run_peer(p, cfg.n, cfg.kills, cfg.calls, cfg.cli_runs) for p in cfg.peer or PEERS}
    text = json.dumps(results, indent=2)
    if cfg.out:
        cfg.out.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
