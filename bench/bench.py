"""Side-by-side benchmark: the original Python ``pm_cs`` (cgse-core 0.25.11) and procman's ``pm_cs``.

    scripts/in-netns.sh .venv/bin/python bench/bench.py [--quick] [--no-build] [--out FILE] [--update-md FILE]

One run, one machine, one CGSE site: the Service Registry, Storage Manager and Configuration Manager run
throughout and both servers use them (register, heartbeat, Setup, housekeeping); the original ``pm_cs`` is measured
first, then ours, on the same ports, with the same Setup (10 devices) and the same client code
(``bench/pyclient.py``: pyzmq + pickle, run by the reference interpreter, as the original clients do). A
low-overhead Rust client (``examples/wire_bench.rs``, raw ZMTP) measures both servers a second time, so that
client overhead can be told apart from server cost.

Our supervisor (100 ``sleep`` processes through the wire, ``list_processes`` also timed inside the daemon) is
then measured beside two peers, supervisord and circus (``bench/peers.py``, run from ``.venv-peers``: make it
once with ``python3 bench/peers.py --setup``, outside the namespace), in a second table. The Python face: our
``ProcessManagerProxy`` and cgse-core's, both against our daemon (``bench/proxyclient.py``), and the import time
of both ``egse.procman`` packages.

Results: ``bench/results/latest.json`` and two Markdown tables on stdout (``--update-md BENCHMARKS.md`` replaces
the block between ``<!-- bench:begin -->`` and ``<!-- bench:end -->``). Needs a private network namespace
(``scripts/in-netns.sh``) and the reference venv (``PROCMAN_REF_VENV``, see ``scripts/setup-ref-venv.sh``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import zmq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "python"))

import peers
from refenv import (
    CgseEnv,
    free_ports,
    in_private_netns,
    ref_python,
    zero_setup_yaml,
)

PYCLIENT = REPO / "bench" / "pyclient.py"
FAKE_DEVICE = REPO / "bench" / "fake_device.py"
PM_CS = REPO / "target" / "release" / "pm_cs"
WIRE_BENCH = REPO / "target" / "release" / "examples" / "wire_bench"
SPAWN_FLOOR = REPO / "target" / "release" / "examples" / "spawn_floor"
RTT_FLOOR = REPO / "target" / "release" / "examples" / "rtt_floor"
EXAMPLES = ("wire_bench", "spawn_floor", "rtt_floor")
N_DEVICES = 10
PROXYCLIENT = REPO / "bench" / "proxyclient.py"
N_PROCS = 100
COMMAND = "scripts/in-netns.sh .venv/bin/python bench/bench.py"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ the site


def device_ids() -> list[str]:
    return [f"DEV_{i:02d}" for i in range(N_DEVICES)]


def proc_ids() -> list[str]:
    return [f"P{i:03d}" for i in range(N_PROCS)]


def bench_setup_yaml(site_id: str, ports: list[int]) -> str:
    lines = [
        "# Setup of the side-by-side benchmark: 10 devices of one (fake) class.",
        "Setup:",
        f"    site_id: {site_id}",
        "    history:",
        '        "0": Zero Setup, no devices',
        '        "1": Benchmark setup with 10 devices',
        "    gse:",
    ]
    for i, (dev, port) in enumerate(zip(device_ids(), ports, strict=True)):
        lines += [
            f"        dev{i:02d}:",
            "            device: class//bench.FakeDevice",
            f"            device_name: Bench Device {i:02d}",
            f"            device_id: {dev}",
            f'            device_args: ["{port}"]',
        ]
    return "\n".join(lines) + "\n"


def process_table_yaml(ports: list[int]) -> str:
    """Ours: the 10 Setup devices (a fake control server each, ready when it answers Ping), 100 `sleep`s and a
    crash target with zero backoff and no crash-loop limit."""
    lines = [
        "# Process table of the side-by-side benchmark (written by bench/bench.py).",
        f"python: {json.dumps(sys.executable)}",
        "allowed_programs: [cgse]",
        "defaults:",
        "  restart: on-failure",
        "  stop_timeout: 5",
        "device_classes:",
        "  bench.FakeDevice:",
        f'    argv: ["{{python}}", {json.dumps(str(FAKE_DEVICE))}, "{{arg0}}"]',
        "devices:",
    ]
    for dev, port in zip(device_ids(), ports, strict=True):
        lines += [
            f"  {dev}:",
            f'    readiness: {{ping: {{endpoint: "tcp://127.0.0.1:{port}"}}, timeout: 20, interval: 0.05}}',
        ]
    for pid in proc_ids():
        lines.append(f'  {pid}: {{argv: [sleep, "1000"]}}')
    lines += [
        "  CRASH:",
        '    argv: [sleep, "1000"]',
        "    restart: always",
        "    backoff: {initial: 0, jitter: 0}",
        "    crash_loop: {max_starts: 0}",
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ processes


class Server:
    """One control server process (original or ours), spawned identically, stopped and reaped by pid."""

    def __init__(self, kind: str, env: CgseEnv, tag: str, guarded: bool = True) -> None:
        """``guarded``: killed if the benchmark dies (``die_with_parent``). A ``preexec_fn`` makes every spawn a
        full fork that runs Python in the child: Popen -> main of a trivial program 5.9 ms instead of 2.0 ms. The
        start-up figure is measured unguarded (each of those servers lives for a few ms, inside a try/finally)."""
        self.kind, self.env, self.tag, self.guarded = kind, env, tag, guarded
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def argv(self) -> list[str]:
        if self.kind == "original":
            return [ref_python(), "-m", "egse.procman.procman_cs", "start"]
        return [str(PM_CS), "start"]

    def environ(self) -> dict[str, str]:
        return self.env.env(PROCMAN_LOG="info") if self.kind == "ours" else self.env.env()

    def spawn(self) -> float:
        """Start the server; returns the perf_counter just before the spawn."""
        out = open(self.env.procs_dir / f"{self.kind}.{self.tag}.out", "wb")  # noqa: SIM115 - closed below
        err = open(self.env.procs_dir / f"{self.kind}.{self.tag}.err", "wb")  # noqa: SIM115
        argv, environ = self.argv, self.environ()
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            cwd=self.env.run_dir,
            env=environ,
            start_new_session=True,
            preexec_fn=peers.die_with_parent if self.guarded else None,  # noqa: PLW1509 - only prctl()
        )
        out.close()
        err.close()
        return t0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode

    def wait(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


def first_pong(port: int, server: Server, timeout: float = 30.0) -> float:
    """Spawn ``server`` and return the seconds until its commanding port first answers ``Ping`` with ``Pong``.

    The REQ socket connects before the spawn and retries every millisecond; the queued ``Ping`` is answered
    as soon as the server serves requests.
    """
    ctx = zmq.Context()
    s = ctx.socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RECONNECT_IVL, 1)
    s.setsockopt(zmq.RECONNECT_IVL_MAX, 1)
    s.connect(f"tcp://127.0.0.1:{port}")
    try:
        t0 = server.spawn()
        s.send(b"\x80\x04\x95\x08\x00\x00\x00\x00\x00\x00\x00\x8c\x04Ping\x94.")  # pickle.dumps("Ping", 4)
        deadline = t0 + timeout
        while time.perf_counter() < deadline:
            if s.poll(1):
                t = time.perf_counter()
                reply = s.recv()
                if b"Pong" not in reply:
                    raise RuntimeError(f"unexpected reply {reply!r}")
                return t - t0
            if not server.alive():
                raise RuntimeError(f"{server.kind} exited with {server.proc.returncode if server.proc else None}")
        raise RuntimeError(f"{server.kind}: no Pong within {timeout} s")
    finally:
        s.close(0)
        ctx.term()


def spawn_main_floor(env: CgseEnv, n: int) -> dict[str, Any]:
    """What the spawn itself costs: Popen (as ``Server.spawn`` unguarded) until a trivial C program (``date``) reads
    the clock in its ``main``. Part of every start-up figure that no server can remove."""
    times = []
    for _ in range(n):
        w0 = time.time()
        out = subprocess.run(
            ["date", "+%s.%N"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            cwd=env.run_dir,
            env=env.env(),
            start_new_session=True,
            check=True,
        ).stdout
        times.append((float(out) - w0) * 1e3)
        time.sleep(0.05)
    return {"median": round(statistics.median(times), 2), "all": [round(x, 2) for x in times]}


def memory(pid: int) -> dict[str, Any]:
    """RSS, PSS and USS (private clean + dirty) from smaps_rollup; peak RSS, threads, fds from status and fd/."""
    kib: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            kib[parts[0].rstrip(":")] = int(parts[1])
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {
        "rss_kib": kib.get("Rss", 0),
        "pss_kib": kib.get("Pss", 0),
        "uss_kib": kib.get("Private_Clean", 0) + kib.get("Private_Dirty", 0),
        "peak_rss_kib": int(status["VmHWM"].split()[0]),
        "threads": int(status["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "children": _children(pid),
    }


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def _client_script(
    python: str, script: Path, env: CgseEnv, spec: dict[str, Any], timeout: float, what: str
) -> dict[str, Any]:
    """Run a client script (one JSON spec in, a ``RESULT {json}`` line out) in the site's environment."""
    r = subprocess.run(
        [python, str(script), json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env.env(),
        cwd=env.run_dir,
        check=False,
    )
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed (rc {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def pyclient(env: CgseEnv, spec: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
    """Run one phase of bench/pyclient.py under the reference interpreter."""
    return _client_script(ref_python(), PYCLIENT, env, spec, timeout, f"pyclient {spec['phase']}")


def _run_example(example: Path, *args: str, timeout: float = 120.0) -> dict[str, Any]:
    """Run one of our example binaries; the JSON object on its last stdout line."""
    r = subprocess.run([str(example), *args], capture_output=True, text=True, timeout=timeout, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{example.name} failed: {r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def spawn_floor() -> dict[str, Any]:
    """examples/spawn_floor: N_PROCS `sleep`s spawned one after the other with no daemon (its children reaped)."""
    return _run_example(SPAWN_FLOOR, str(N_PROCS))


def rtt_floor(n: int) -> dict[str, Any]:
    """examples/rtt_floor: ``n`` loopback TCP round trips between two threads, no server: the machine's own tail."""
    return _run_example(RTT_FLOOR, str(n))


def wire_bench(port: int, *args: str, timeout: float = 120.0) -> dict[str, Any]:
    return _run_example(WIRE_BENCH, "--port", str(port), *args, timeout=timeout)


def proxyclient(python: str, env: CgseEnv, spec: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
    """bench/proxyclient.py under ``python``: ours (this venv) or the original (the reference venv)."""
    return _client_script(python, PROXYCLIENT, env, spec, timeout, f"proxyclient ({python})")


def import_time(python: str, env: CgseEnv, runs: int) -> dict[str, Any]:
    """``import egse.procman`` under ``python``: ``-X importtime``'s cumulative figure for the package (median of
    ``runs``), and the wall time of ``python -c "import egse.procman"`` less that of ``python -c pass``."""
    cumulative, wall, bare = [], [], []
    for _ in range(runs + 1):
        r = subprocess.run(
            [python, "-X", "importtime", "-c", "import egse.procman"],
            capture_output=True, text=True, env=env.env(), cwd=env.run_dir, check=True,
        )  # fmt: skip
        for line in r.stderr.splitlines():
            parts = [x.strip() for x in line.split("|")]
            if len(parts) == 3 and parts[2] == "egse.procman":
                cumulative.append(int(parts[1]))
        for argv, into in (([python, "-c", "import egse.procman"], wall), ([python, "-c", "pass"], bare)):
            t = time.perf_counter()
            subprocess.run(argv, capture_output=True, env=env.env(), cwd=env.run_dir, check=True)
            into.append(time.perf_counter() - t)
    # The first run warms the page cache.
    cumulative, wall, bare = cumulative[1:], wall[1:], bare[1:]
    return {
        "importtime_cumulative_us": statistics.median(cumulative) if cumulative else None,
        "wall_ms": round(statistics.median(wall) * 1e3, 1),
        "bare_interpreter_ms": round(statistics.median(bare) * 1e3, 1),
        "import_ms": round((statistics.median(wall) - statistics.median(bare)) * 1e3, 1),
        "runs": runs,
    }


def daemon_elapsed(err_log: Path, command: str, offset: int) -> dict[str, Any]:
    """``elapsed_us`` of the daemon's debug ``request`` lines for ``command``, from byte ``offset`` of its log."""
    import re

    with err_log.open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    pat = re.compile(rf"command={re.escape(command)}\b.*?elapsed_us=(\d+)")
    us = [int(m.group(1)) for m in pat.finditer(text)]
    from pyclient import stats

    return stats([x / 1e6 for x in us])


def cpu_per_request(pid: int, fn: Any, requests: Any) -> tuple[Any, float | None]:
    """Run ``fn()``; the server's CPU (utime + stime of ``pid``) over it divided by ``requests(result)``, in µs."""
    c0 = peers.cpu_seconds(pid)
    out = fn()
    c1 = peers.cpu_seconds(pid)
    n = requests(out)
    return out, (round((c1 - c0) / n * 1e6, 2) if n else None)


def standalone_idle(idle: float) -> dict[str, Any]:
    """Our daemon on its embedded defaults (no settings file, no CGSE service to talk to): RSS after ``idle`` s."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-standalone-") as tmp:
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("CGSE", "PROJECT", "SITE_ID"))}
        environ.update(XDG_STATE_HOME=str(Path(tmp) / "state"), PROCMAN_LOG="info")
        for port in (6120, 6121, 6122):
            wait_port_free(port)
        with open(Path(tmp) / "err", "wb") as err:
            proc = subprocess.Popen(
                [str(PM_CS), "start"], stdin=subprocess.DEVNULL, stdout=err, stderr=err, cwd=tmp, env=environ,
                start_new_session=True, preexec_fn=peers.die_with_parent,  # noqa: PLW1509 - only prctl()
            )  # fmt: skip
        try:
            ctx = zmq.Context()
            s = ctx.socket(zmq.REQ)
            s.setsockopt(zmq.LINGER, 0)
            s.connect("tcp://127.0.0.1:6120")
            s.send(b"\x80\x04\x95\x08\x00\x00\x00\x00\x00\x00\x00\x8c\x04Ping\x94.")
            ok = s.poll(10_000)
            s.close(0)
            ctx.term()
            if not ok:
                raise RuntimeError(f"standalone pm_cs: no Pong: {(Path(tmp) / 'err').read_text()[-2000:]}")
            time.sleep(idle)
            return memory(proc.pid)
        finally:
            proc.terminate()
            proc.wait(15)


def wait_port_free(port: int, timeout: float = 30.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
            return
        except OSError:
            time.sleep(0.1)
        finally:
            s.close()
    raise RuntimeError(f"port {port} still busy after {timeout} s")


# ------------------------------------------------------------------------------------------------ one server


def measure(kind: str, env: CgseEnv, cfg: argparse.Namespace) -> dict[str, Any]:
    p = env.ports
    res: dict[str, Any] = {}
    log(f"{kind}: start-up, {cfg.starts} starts")
    starts = []
    for i in range(cfg.starts):
        wait_port_free(p.pm_cmd)
        srv = Server(kind, env, f"start{i}", guarded=False)
        try:
            starts.append(first_pong(p.pm_cmd, srv))
        finally:
            srv.stop()
        time.sleep(0.5)
    res["startup_ms"] = {
        "median": round(statistics.median(starts) * 1e3, 1),
        "all": [round(x * 1e3, 1) for x in starts],
    }
    res["spawn_main_floor_ms"] = spawn_main_floor(env, 3 * cfg.starts)

    wait_port_free(p.pm_cmd)
    srv = Server(kind, env, "main")
    try:
        first_pong(p.pm_cmd, srv)
        log(f"{kind}: idle {cfg.idle} s, then memory (pid {srv.pid})")
        time.sleep(cfg.idle)
        res["idle_memory"] = memory(srv.pid)

        # Server CPU per request: utime + stime of the server over a loop, divided by the requests of the loop
        # (warm-up requests included). Clock ticks are 10 ms: the loops are long enough for a few %.
        log(f"{kind}: Ping x {cfg.ping} (Python client)")
        res["ping_py"], res["cpu_ping_py_us"] = cpu_per_request(
            srv.pid,
            lambda: pyclient(env, {"phase": "ping", "port": p.pm_cmd, "n": cfg.ping}),
            lambda r: r["n"] + r["errors"] + 20,
        )
        log(f"{kind}: 8 concurrent clients x {cfg.duration} s (Python client)")
        res["throughput_py"], res["cpu_throughput_py_us"] = cpu_per_request(
            srv.pid,
            lambda: pyclient(env, {"phase": "throughput", "port": p.pm_cmd, "clients": 8, "duration": cfg.duration}),
            lambda r: r["n"] + r["errors"] + 8 * 20,
        )
        log(f"{kind}: Ping and 8 clients (Rust client)")
        wb, res["cpu_ping_rust_us"] = cpu_per_request(
            srv.pid,
            lambda: wire_bench(p.pm_cmd, "--ping", str(cfg.ping), "--clients", "0"),
            lambda r: r["ping"]["n"] + r["ping"]["errors"] + 50,
        )
        res["ping_rust"] = wb["ping"]
        # The same number of round trips with no server at all, right after: what the machine adds to the tail.
        res["rtt_floor"] = rtt_floor(cfg.ping)
        wb, res["cpu_throughput_rust_us"] = cpu_per_request(
            srv.pid,
            lambda: wire_bench(p.pm_cmd, "--ping", "0", "--clients", "8", "--duration", str(cfg.duration)),
            lambda r: r["throughput"]["summary"]["n"] + r["throughput"]["summary"]["errors"] + 8 * 20,
        )
        res["throughput_rust"] = wb["throughput"]["summary"]
        wb = wire_bench(
            p.pm_cmd, "--ping", "0", "--clients", "0", "--call", "get_core_processes", "--calls", str(cfg.calls)
        )
        res["get_core_processes_rust"] = wb["call"].get("summary")
        log(f"{kind}: table commands x {cfg.calls} (Python client)")
        res["calls_py"] = pyclient(env, {"phase": "calls", "cmd_port": p.pm_cmd, "svc_port": p.pm_srv, "n": cfg.calls})

        if kind == "ours":
            log("ours: start the 10 device processes (start_process), wait until they answer Ping")
            res["start_devices"] = pyclient(
                env, {"phase": "start_devices", "port": p.pm_cmd, "device_ids": device_ids()}
            )
        log(f"{kind}: get_device_process_status for {N_DEVICES} devices x {cfg.rounds} rounds")
        res["device_status_py"] = pyclient(
            env,
            {
                "phase": "device_status",
                "port": p.pm_cmd,
                "device_ids": device_ids(),
                "cgse_cmd": "echo",
                "rounds": cfg.rounds,
            },
        )
        if kind == "ours":
            measure_supervision(srv, env, cfg, res)
        res["after_load_memory"] = memory(srv.pid)
        log(f"{kind}: quit_server -> exit")
        res["quit"] = pyclient(env, {"phase": "quit", "svc_port": p.pm_srv, "pid": srv.pid})
        res["exit_code"] = srv.wait(30)
    finally:
        srv.stop()
    return res


def measure_supervision(srv: Server, env: CgseEnv, cfg: argparse.Namespace, res: dict[str, Any]) -> None:
    """Ours only (the original has no supervisor), measured as bench/peers.py measures supervisord and circus."""
    p = env.ports
    # The devices (Python processes) are stopped first: the tree measured below is the daemon and its sleeps.
    res["stop_devices"] = pyclient(env, {"phase": "stop_processes", "port": p.pm_cmd, "ids": device_ids()})
    log(f"ours: supervisor through the wire: start {N_PROCS}, status of all (list_processes)")
    sup = {"cmd_port": p.pm_cmd, "mon_port": p.pm_mon, "ids": proc_ids(), "crash_id": "CRASH"}
    # procman::server at DEBUG logs each request's elapsed_us (the time inside the daemon); one line a request.
    err_log = env.procs_dir / f"ours.{srv.tag}.err"
    level = {"phase": "table_call", "port": p.pm_srv, "name": "set_logging_level"}
    pyclient(env, {**level, "args": ["procman.server", 10]})
    offset = err_log.stat().st_size
    res["supervisor_py"] = pyclient(env, {"phase": "sup_start", "list_n": cfg.calls, **sup})
    res["start_process_daemon"] = daemon_elapsed(err_log, "start_process", offset)
    res["spawn_floor"] = spawn_floor()
    pyclient(env, {**level, "args": ["procman.server", 20]})
    wb, res["cpu_list_processes_rust_us"] = cpu_per_request(
        srv.pid,
        lambda: wire_bench(
            p.pm_cmd, "--ping", "0", "--clients", "0", "--call", "list_processes", "--calls", str(cfg.calls)
        ),
        lambda r: r["call"]["summary"]["n"] + r["call"]["summary"]["errors"] + 50,
    )
    res["list_processes_rust"] = wb["call"].get("summary")
    log("ours: list_processes inside the daemon (procman::server at DEBUG logs elapsed_us per request)")
    pyclient(env, {**level, "args": ["procman.server", 10]})
    offset = err_log.stat().st_size
    wire_bench(p.pm_cmd, "--ping", "0", "--clients", "0", "--call", "list_processes", "--calls", str(cfg.calls))
    time.sleep(0.2)
    res["list_processes_daemon"] = daemon_elapsed(err_log, "list_processes", offset)
    pyclient(env, {**level, "args": ["procman.server", 20]})
    log(f"ours: status of {N_PROCS} through our CLI (pm_cs ps) x {cfg.cli_runs}")
    res["status_cli"] = peers.cli_calls(
        [str(PM_CS), "ps"], cfg.cli_runs, lambda out: out.count("RUNNING") >= N_PROCS, env=env.env()
    )
    log("ours: the Python face: our ProcessManagerProxy and the original's, both against this daemon")
    calls = {"port": p.pm_cmd, "n": cfg.calls, "list_n": cfg.calls}
    res["proxy_ours"] = proxyclient(sys.executable, env, {**calls, "calls": ["ping", "get_devices", "list_processes"]})
    res["proxy_original"] = proxyclient(ref_python(), env, {**calls, "calls": ["ping", "get_devices"]})
    log("ours: import egse.procman, ours and the original")
    res["import_ours"] = import_time(sys.executable, env, cfg.import_runs)
    res["import_original"] = import_time(ref_python(), env, cfg.import_runs)
    cpu0 = peers.cpu_seconds(srv.pid)
    time.sleep(2.0)
    res["sup_idle_cpu_pct"] = round((peers.cpu_seconds(srv.pid) - cpu0) / 2.0 * 100, 2)
    res["sup_idle_memory"] = peers.tree_memory(srv.pid)
    log(f"ours: crash -> restart x {cfg.kills}, stop {N_PROCS}")
    pyclient(env, {**level, "args": ["procman.server", 10]})
    offset = err_log.stat().st_size
    res["supervisor_py"].update(pyclient(env, {"phase": "sup_crash_stop", "kills": cfg.kills, **sup}))
    res["stop_process_daemon"] = daemon_elapsed(err_log, "stop_process", offset)
    pyclient(env, {**level, "args": ["procman.server", 20]})
    res["stop_all"] = pyclient(
        env, {"phase": "stop_processes", "port": p.pm_cmd, "ids": device_ids() + proc_ids() + ["CRASH"]}
    )


# ------------------------------------------------------------------------------------------------ report


def machine() -> dict[str, Any]:
    def first(path: str, key: str) -> str:
        with contextlib.suppress(OSError):
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        return "?"

    def out(argv: list[str]) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False).stdout.strip()
        return "?"

    probe = "import importlib.metadata as m, sys, zmq\n"
    probe += "print(m.version('cgse-core'), sys.version.split()[0], zmq.__version__, zmq.zmq_version())"
    ref = out([ref_python(), "-c", probe]).split()
    return {
        "cpu": first("/proc/cpuinfo", "model name"),
        "cores": os.cpu_count(),
        "memory": first("/proc/meminfo", "MemTotal"),
        "kernel": platform.release(),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        # A stop walks /proc for escaped processes: its cost grows with the processes on the machine.
        "processes": sum(1 for p in Path("/proc").iterdir() if p.name.isdigit()),
        "rustc": out(["rustc", "--version"]),
        "procman_commit": out(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
        + ("+dirty" if out(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"]) else ""),
        "cgse_core": ref[0] if ref else "?",
        "reference_python": ref[1] if len(ref) > 1 else "?",
        "pyzmq": ref[2] if len(ref) > 2 else "?",
        "libzmq": ref[3] if len(ref) > 3 else "?",
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _get(d: dict[str, Any], path: str) -> Any:
    for k in path.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


# (label, path, unit, scale, better: "lower"/"higher" ("floor": the machine's, no ratio), target for ours as
# (op, value) or None). Targets: issue #11.
MB = 1024 / 1e6
ROWS: list[tuple[str, str, str, float, str, tuple[str, float] | None]] = [
    ("start-up: spawn → first Pong (median of starts)", "startup_ms.median", "ms", 1, "lower", ("<=", 20)),
    ("the machine's floor: the same spawn until a trivial program (`date`) reads the clock in its main, median", "spawn_main_floor_ms.median", "ms", 1, "floor", None),
    ("idle RSS after 5 s, standalone (embedded defaults, no CGSE services)", "standalone_idle.rss_kib", "MB", MB, "lower", ("<=", 6)),
    ("idle RSS after 5 s, registered with the CGSE services", "idle_memory.rss_kib", "MB", MB, "lower", None),
    ("idle USS after 5 s, registered", "idle_memory.uss_kib", "MB", MB, "lower", None),
    ("Ping p50, one REQ socket (Python client)", "ping_py.p50_us", "µs", 1, "lower", ("<", 100)),
    ("Ping p99 (Python client)", "ping_py.p99_us", "µs", 1, "lower", ("<", 1000)),
    ("Ping p99.9 (Python client)", "ping_py.p999_us", "µs", 1, "lower", ("<=", 1000)),
    ("Ping max (Python client)", "ping_py.max_us", "µs", 1, "lower", ("<=", 1000)),
    ("Ping requests/s, one socket (Python client)", "ping_py.rps", "req/s", 1, "higher", None),
    ("server CPU per Ping, sequential (Python client)", "cpu_ping_py_us", "µs", 1, "lower", ("<=", 12)),
    ("Ping p50 (Rust client)", "ping_rust.p50_us", "µs", 1, "lower", ("<", 100)),
    ("Ping p99 (Rust client)", "ping_rust.p99_us", "µs", 1, "lower", ("<", 1000)),
    ("Ping p99.9 (Rust client)", "ping_rust.p999_us", "µs", 1, "lower", ("<=", 1000)),
    ("Ping max (Rust client)", "ping_rust.max_us", "µs", 1, "lower", ("<=", 1000)),
    ("the machine's floor, measured right after: as many loopback TCP round trips between two threads, no server (examples/rtt_floor), p99.9", "rtt_floor.p999_us", "µs", 1, "floor", None),
    ("the machine's floor: max of those round trips", "rtt_floor.max_us", "µs", 1, "floor", None),
    ("the machine's floor: round trips over 1 ms", "rtt_floor.over_1ms", "", 1, "floor", None),
    ("Ping requests/s, one socket (Rust client)", "ping_rust.rps", "req/s", 1, "higher", None),
    ("server CPU per Ping, sequential (Rust client)", "cpu_ping_rust_us", "µs", 1, "lower", ("<=", 12)),
    ("the machine's floor: CPU of rtt_floor's echoing thread per round trip (it only sleeps in read, wakes, writes)", "rtt_floor.echo_cpu_us_per_rt", "µs", 1, "floor", None),
    ("8 concurrent clients, requests/s (Python clients)", "throughput_py.rps", "req/s", 1, "higher", (">=", 20000)),
    ("8 concurrent clients, p99 (Python clients)", "throughput_py.p99_us", "µs", 1, "lower", None),
    ("server CPU per Ping, 8 clients (Python clients)", "cpu_throughput_py_us", "µs", 1, "lower", ("<=", 12)),
    ("8 concurrent clients, requests/s (Rust client)", "throughput_rust.rps", "req/s", 1, "higher", (">=", 20000)),
    ("8 concurrent clients, p99 (Rust client)", "throughput_rust.p99_us", "µs", 1, "lower", None),
    ("server CPU per Ping, 8 clients (Rust client)", "cpu_throughput_rust_us", "µs", 1, "lower", ("<=", 12)),
    ("send_commands p50", "calls_py.send_commands.p50_us", "µs", 1, "lower", None),
    ("get_devices p50 (10 devices)", "calls_py.get_devices.p50_us", "ms", 1e-3, "lower", ("<=", 0.15)),
    ("get_device_ids p50", "calls_py.get_device_ids.p50_us", "ms", 1e-3, "lower", ("<=", 0.15)),
    ("get_core_processes p50", "calls_py.get_core_processes.p50_us", "µs", 1, "lower", None),
    ("get_core_processes p50 (Rust client)", "get_core_processes_rust.p50_us", "µs", 1, "lower", None),
    ("service port get_process_status p50", "calls_py.service_get_process_status.p50_us", "ms", 1e-3, "lower", ("<=", 0.25)),
    ("get_device_process_status, 10 devices, p50 of rounds", "device_status_py.round.p50_us", "ms", 1e-3, "lower", None),
    ("get_device_process_status, one call p50", "device_status_py.per_call.p50_us", "µs", 1, "lower", None),
    ("quit_server → process exit", "quit.exit_ms", "ms", 1, "lower", ("<=", 20)),
    ("RSS after the whole run (peak)", "after_load_memory.peak_rss_kib", "MB", MB, "lower", None),
    (f"start {N_PROCS} processes → all RUNNING", "supervisor_py.start.all_running_ms", "ms", 1, "lower", ("<=", 100)),
    (f"status of {N_PROCS}: list_processes in the daemon, p50", "list_processes_daemon.p50_us", "ms", 1e-3, "lower", ("<=", 0.2)),
    (f"status of {N_PROCS}: list_processes p50 (Python client)", "supervisor_py.list_processes.p50_us", "ms", 1e-3, "lower", None),
    (f"status of {N_PROCS}: list_processes p50 (Rust client)", "list_processes_rust.p50_us", "ms", 1e-3, "lower", None),
    ("crash → restarted (kill -9 → new pid RUNNING), p50", "supervisor_py.crash_restart.running_again.p50_us", "ms", 1e-3, "lower", ("<=", 5)),
    ("crash → restarted, max", "supervisor_py.crash_restart.running_again.max_us", "ms", 1e-3, "lower", None),
    (f"stop {N_PROCS} processes → all STOPPED", "supervisor_py.stop.all_stopped_ms", "ms", 1, "lower", ("<=", 50)),
    ("Python proxy ping() p50, both proxies against procman's daemon", "proxy.ping.p50_us", "µs", 1, "lower", None),
    ("Python proxy get_devices() p50, both proxies against procman's daemon", "proxy.get_devices.p50_us", "µs", 1, "lower", None),
    (f"Python proxy list_processes() p50 ({N_PROCS} running; the original proxy has none)", "proxy.list_processes.p50_us", "µs", 1, "lower", None),
    ("import egse.procman (-X importtime, cumulative)", "import.importtime_cumulative_us", "ms", 1e-3, "lower", None),
    ("python -c 'import egse.procman' less bare interpreter", "import.import_ms", "ms", 1, "lower", None),
]  # fmt: skip

# The supervisors side by side: (label, path in ours, path in a peer, unit, scale, target for ours). A path of
# None: not applicable to that one.
SUP_ROWS: list[tuple[str, str | None, str | None, str, float, tuple[str, float] | None]] = [
    (f"start {N_PROCS} → all RUNNING", "supervisor_py.start.all_running_ms", "start.all_running_ms", "ms", 1, ("<=", 100)),
    ("start: requests (procman: `start_process` per process; supervisord: one `startAllProcesses`; circus: `start` per watcher), until the last reply", "supervisor_py.start.calls_returned_ms", "start.calls_returned_ms", "ms", 1, None),
    ("start_process, time inside the daemon, p50", "start_process_daemon.p50_us", None, "ms", 1e-3, None),
    (f"the machine's floor: {N_PROCS} `sleep`s spawned in a bare loop (examples/spawn_floor), until the last spawn returned", "spawn_floor.all_spawned_ms", None, "ms", 1, None),
    (f"status of {N_PROCS}, own CLI (`pm_cs ps` / `supervisorctl status` / `circusctl status`), p50", "status_cli.p50_us", "status_cli.p50_us", "ms", 1e-3, None),
    (f"status of {N_PROCS}, own Python client (ProcessManagerProxy / — / —), p50", "proxy.list_processes.p50_us", None, "ms", 1e-3, None),
    (f"status of {N_PROCS}, raw protocol from Python (pyzmq+pickle / XML-RPC `getAllProcessInfo` / ZeroMQ JSON `status`), p50", "supervisor_py.list_processes.p50_us", "status_raw.main.p50_us", "ms", 1e-3, None),
    (f"status of {N_PROCS} with every pid, raw protocol (— / as above / one `list` per watcher), p50", None, "status_raw.list_each.p50_us", "ms", 1e-3, None),
    (f"status of {N_PROCS}, raw protocol from Rust (wire_bench), p50", "list_processes_rust.p50_us", None, "ms", 1e-3, None),
    (f"status of {N_PROCS}, time inside the daemon, p50", "list_processes_daemon.p50_us", None, "ms", 1e-3, ("<=", 0.2)),
    ("supervisor CPU per raw status request", "cpu_list_processes_rust_us", "status_raw.main.server_cpu_us", "ms", 1e-3, None),
    ("crash (kill -9) → restarted, new pid RUNNING, p50", "supervisor_py.crash_restart.running_again.p50_us", "crash_restart.running_again.p50_us", "ms", 1e-3, ("<=", 5)),
    ("crash → restarted, max", "supervisor_py.crash_restart.running_again.max_us", "crash_restart.running_again.max_us", "ms", 1e-3, None),
    (f"stop {N_PROCS} → all stopped", "supervisor_py.stop.all_stopped_ms", "stop.all_stopped_ms", "ms", 1, ("<=", 50)),
    ("stop: requests (procman: `stop_process` per process; supervisord: one `stopAllProcesses`; circus: one `stop`), until the last reply", "supervisor_py.stop.calls_returned_ms", "stop.calls_returned_ms", "ms", 1, None),
    ("stop_process, time inside the daemon, p50", "stop_process_daemon.p50_us", None, "ms", 1e-3, None),
    (f"idle RSS of the supervisor process, {N_PROCS} running", "sup_idle_memory.rss_kib", "idle_memory.rss_kib", "MB", MB, None),
    (f"idle USS (private memory) of the supervisor process, {N_PROCS} running", "sup_idle_memory.uss_kib", "idle_memory.uss_kib", "MB", MB, None),
    (f"idle PSS of the supervisor and its {N_PROCS} children", "sup_idle_memory.tree_pss_kib", "idle_memory.tree_pss_kib", "MB", MB, None),
    (f"idle CPU of the supervisor, {N_PROCS} running (2 s)", "sup_idle_cpu_pct", "idle_cpu_pct", "%", 1, None),
]  # fmt: skip


def _fmt(v: float | None) -> str:
    if v is None:
        return "—"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _met(v: float | None, target: tuple[str, float] | None) -> bool | None:
    if target is None or v is None:
        return None
    op, val = target
    return {"<": v < val, "<=": v <= val, ">=": v >= val}[op]


def _met_md(met: bool | None) -> str:
    return "" if met is None else ("yes" if met else "**no**")


def table(results: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    rows, out = [], []
    out.append("| measure | unit | original `pm_cs` | procman | procman better by | target (procman) | met |")
    out.append("|---|---|---:|---:|---:|---|---|")
    for label, path, unit, scale, better, target in ROWS:
        o = _get(results["original"], path)
        u = _get(results["ours"], path)
        o = None if o is None else o * scale
        u = None if u is None else u * scale
        ratio = None
        if o and u and better in ("lower", "higher"):
            ratio = o / u if better == "lower" else u / o
        met = _met(u, target)
        rows.append({"measure": label, "unit": unit, "original": o, "ours": u, "ratio": ratio, "met": met})
        tgt = f"{target[0]} {target[1]:g} {unit}" if target else ""
        out.append(
            f"| {label} | {unit} | {_fmt(o)} | {_fmt(u)} | {'' if ratio is None else f'{ratio:,.1f}×'} | {tgt} | "
            f"{_met_md(met)} |"
        )
    return "\n".join(out), rows


def sup_table(results: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """Ours, supervisord and circus: each column from its own run of the same measurements."""
    names = [n for n in peers.PEERS if n in results.get("peers", {})]
    cols = ["procman", *names]
    out = [
        "| measure | unit | " + " | ".join(cols) + " | target (procman) | met |",
        "|---|---|" + "---:|" * len(cols) + "---|---|",
    ]
    rows = []
    for label, ours_path, peer_path, unit, scale, target in SUP_ROWS:
        vals: dict[str, float | None] = {}
        u = _get(results.get("ours", {}), ours_path) if ours_path else None
        vals["procman"] = None if u is None else u * scale
        for n in names:
            pr = results["peers"][n]
            v = _get(pr, peer_path) if peer_path and "error" not in pr else None
            vals[n] = None if v is None else v * scale
        met = _met(vals["procman"], target)
        rows.append({"measure": label, "unit": unit, **vals, "met": met})
        tgt = f"{target[0]} {target[1]:g} {unit}" if target else ""
        cells = " | ".join(_fmt(vals[c]) for c in cols)
        out.append(f"| {label} | {unit} | {cells} | {tgt} | {_met_md(met)} |")
    versions = ", ".join(
        f"{n} {results['peers'][n].get('version', '?')}"
        + (f" (not measured: {results['peers'][n]['error']})" if "error" in results["peers"][n] else "")
        for n in names
    )
    return f"Supervisors side by side ({N_PROCS} × `sleep 1000` each; {versions}):\n\n" + "\n".join(out), rows


def update_md(path: Path, block: str) -> None:
    text = path.read_text()
    begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    if begin not in text or end not in text:
        raise SystemExit(f"{path}: markers {begin} / {end} not found")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{block}\n{end}{tail}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (for trying the script out)")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build first")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "latest.json")
    ap.add_argument("--update-md", type=Path, help="replace the table block in this Markdown file")
    ap.add_argument("--only", choices=("original", "ours", "peers"), help="measure one of them only")
    ap.add_argument("--no-peers", action="store_true", help="leave supervisord and circus out")
    cfg = ap.parse_args()
    (cfg.starts, cfg.idle, cfg.ping, cfg.duration, cfg.calls, cfg.rounds, cfg.kills, cfg.cli_runs,
     cfg.import_runs) = (
        (3, 5.0, 2000, 1.0, 100, 5, 5, 5, 3) if cfg.quick else (7, 5.0, 10000, 3.0, 300, 20, 20, 20, 10)
    )  # fmt: skip
    if not in_private_netns():
        print("bench.py: run it inside a private network namespace: " + COMMAND, file=sys.stderr)
        return 2
    if not cfg.no_build:
        log(f"cargo build --release --bin pm_cs, examples {', '.join(EXAMPLES)}")
        subprocess.run(
            ["cargo", "build", "--release", "--bin", "pm_cs", *[f"--example={e}" for e in EXAMPLES]],
            cwd=REPO,
            check=True,
        )
    results: dict[str, Any] = {"command": COMMAND + (" --quick" if cfg.quick else ""), "machine": machine()}
    log(f"machine: {results['machine']}")
    dev_ports = free_ports(N_DEVICES)
    if cfg.only in (None, "ours"):
        log(f"ours: standalone daemon (embedded defaults), idle {cfg.idle} s, then memory")
        standalone = standalone_idle(cfg.idle)
    with CgseEnv(setup_id=1) as env:
        env.write_setup(0, zero_setup_yaml(env.site_id))
        env.write_setup(1, bench_setup_yaml(env.site_id, dev_ports))
        table_file = env.root / "bench_procman.yaml"
        table_file.write_text(process_table_yaml(dev_ports))
        env.extra_settings["Procman"] = {
            "PROCESS_TABLE": str(table_file),
            "STOP_CHILDREN_ON_EXIT": True,
            "STATE_DIR": str(env.root / "procman-state"),
        }
        env.write_settings()
        log(f"site {env.root}: starting registry, notify hub, storage manager, configuration manager")
        env.start_core(("registry", "nh", "sm", "cm"))
        for kind in ("original", "ours"):
            if cfg.only and kind != cfg.only:
                continue
            results[kind] = measure(kind, env, cfg)
            time.sleep(1.0)
        if cfg.only in (None, "peers") and not cfg.no_peers:
            results["peers"] = {}
            for name in peers.PEERS:
                log(f"{name}: {N_PROCS} programs (bench/peers.py)")
                try:
                    results["peers"][name] = peers.run_peer(name, N_PROCS, cfg.kills, cfg.calls, cfg.cli_runs)
                except Exception as e:  # noqa: BLE001 - reported in the table, not hidden
                    log(f"{name}: NOT MEASURED: {e}")
                    results["peers"][name] = {"error": str(e).splitlines()[0][:200]}
                time.sleep(1.0)
        results["machine"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    if "ours" in results:
        ours = results["ours"]
        ours["standalone_idle"] = standalone
        # Both proxies and both packages were measured during our run (same server): file each under its own.
        for key in ("proxy", "import"):
            results.setdefault("original", {})[key] = ours.pop(f"{key}_original", None)
            ours[key] = ours.pop(f"{key}_ours", None)
    if cfg.only:
        print(json.dumps(results, indent=2))
        return 0
    md, rows = table(results)
    results["table"] = rows
    if "peers" in results:
        sup_md, sup_rows = sup_table(results)
        results["sup_table"] = sup_rows
        md += "\n\n" + sup_md
    m = results["machine"]
    header = (
        f"Measured {m['date_utc']} with `{results['command']}` on {m['cpu']} ({m['cores']} cores, {m['memory']}), "
        f"Linux {m['kernel']}, load average {' '.join(m['loadavg'])} at the start and "
        f"{' '.join(m['loadavg_end'])} at the end, {m.get('processes', '?')} processes on the machine at the start; procman {m['procman_commit']} ({m['rustc']}); original "
        f"cgse-core {m['cgse_core']} on Python {m['reference_python']}; clients pyzmq {m['pyzmq']} "
        f"(libzmq {m['libzmq']})."
    )
    block = header + "\n\n" + md
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(results, indent=2) + "\n")
    print(block)
    log(f"results written to {cfg.out}")
    if cfg.update_md:
        update_md(cfg.update_md, block)
        log(f"table written into {cfg.update_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
