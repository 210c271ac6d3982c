"""Side-by-side benchmark: the original Python ``pm_cs`` (cgse-core 0.25.11) and procman's ``pm_cs``.

    scripts/in-netns.sh .venv/bin/python bench/bench.py [--quick] [--no-build] [--out FILE] [--update-md FILE]

One run, one machine, one CGSE site: the Service Registry, Storage Manager and Configuration Manager run
throughout and both servers use them (register, heartbeat, Setup, housekeeping); the original ``pm_cs`` is measured
first, then ours, on the same ports, with the same Setup (10 devices) and the same client code
(``bench/pyclient.py``: pyzmq + pickle, run by the reference interpreter, as the original clients do). A
low-overhead Rust client (``examples/wire_bench.rs``, raw ZMTP) measures both servers a second time, so that
client overhead can be told apart from server cost.

Results: ``bench/results/latest.json`` and a Markdown table on stdout (``--update-md BENCHMARKS.md`` replaces
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
N_DEVICES = 10
N_PROCS = 50
COMMAND = "scripts/in-netns.sh .venv/bin/python bench/bench.py"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ the site


def device_ids() -> list[str]:
    return [f"DEV_{i:02d}" for i in range(N_DEVICES)]


def proc_ids() -> list[str]:
    return [f"P{i:02d}" for i in range(N_PROCS)]


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
    """Ours: the 10 Setup devices (a fake control server each, ready when it answers Ping), 50 `sleep`s and a
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


def _die_with_parent() -> None:
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


class Server:
    """One control server process (original or ours), spawned identically, stopped and reaped by pid."""

    def __init__(self, kind: str, env: CgseEnv, tag: str) -> None:
        self.kind, self.env, self.tag = kind, env, tag
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
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - only prctl()
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


def pyclient(env: CgseEnv, spec: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
    """Run one phase of bench/pyclient.py under the reference interpreter."""
    r = subprocess.run(
        [ref_python(), str(PYCLIENT), json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env.env(),
        cwd=env.run_dir,
        check=False,
    )
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(
            f"pyclient {spec['phase']} failed (rc {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        )
    return json.loads(lines[-1][len("RESULT ") :])


def wire_bench(port: int, *args: str, timeout: float = 120.0) -> dict[str, Any]:
    r = subprocess.run(
        [str(WIRE_BENCH), "--port", str(port), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if r.returncode != 0:
        raise RuntimeError(f"wire_bench failed: {r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


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
        srv = Server(kind, env, f"start{i}")
        try:
            starts.append(first_pong(p.pm_cmd, srv))
        finally:
            srv.stop()
        time.sleep(0.5)
    res["startup_ms"] = {
        "median": round(statistics.median(starts) * 1e3, 1),
        "all": [round(x * 1e3, 1) for x in starts],
    }

    wait_port_free(p.pm_cmd)
    srv = Server(kind, env, "main")
    try:
        first_pong(p.pm_cmd, srv)
        log(f"{kind}: idle {cfg.idle} s, then memory (pid {srv.pid})")
        time.sleep(cfg.idle)
        res["idle_memory"] = memory(srv.pid)

        log(f"{kind}: Ping x {cfg.ping} (Python client)")
        res["ping_py"] = pyclient(env, {"phase": "ping", "port": p.pm_cmd, "n": cfg.ping})
        log(f"{kind}: 8 concurrent clients x {cfg.duration} s (Python client)")
        res["throughput_py"] = pyclient(
            env, {"phase": "throughput", "port": p.pm_cmd, "clients": 8, "duration": cfg.duration}
        )
        log(f"{kind}: Ping and 8 clients (Rust client)")
        wb = wire_bench(
            p.pm_cmd, "--ping", str(cfg.ping), "--clients", "8", "--duration", str(cfg.duration),
            "--call", "get_core_processes", "--calls", str(cfg.calls),
        )  # fmt: skip
        res["ping_rust"], res["throughput_rust"] = wb["ping"], wb["throughput"]["summary"]
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
            log(f"ours: supervisor through the wire: start {N_PROCS}, status of all (list_processes)")
            sup = {"cmd_port": p.pm_cmd, "mon_port": p.pm_mon, "ids": proc_ids(), "crash_id": "CRASH"}
            res["supervisor_py"] = pyclient(env, {"phase": "sup_start", "list_n": cfg.calls, **sup})
            wb = wire_bench(
                p.pm_cmd, "--ping", "0", "--clients", "0", "--call", "list_processes", "--calls", str(cfg.calls)
            )
            res["list_processes_rust"] = wb["call"].get("summary")
            log(f"ours: crash -> restart x {cfg.kills}, stop {N_PROCS}")
            res["supervisor_py"].update(pyclient(env, {"phase": "sup_crash_stop", "kills": cfg.kills, **sup}))
            res["stop_all"] = pyclient(
                env, {"phase": "stop_processes", "port": p.pm_cmd, "ids": device_ids() + proc_ids() + ["CRASH"]}
            )
        res["after_load_memory"] = memory(srv.pid)
        log(f"{kind}: quit_server -> exit")
        res["quit"] = pyclient(env, {"phase": "quit", "svc_port": p.pm_srv, "pid": srv.pid})
        res["exit_code"] = srv.wait(30)
    finally:
        srv.stop()
    return res


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


# (label, path, unit, scale, better: "lower"/"higher", target for ours as (op, value) or None)
ROWS: list[tuple[str, str, str, float, str, tuple[str, float] | None]] = [
    ("start-up: spawn → first Pong (median of starts)", "startup_ms.median", "ms", 1, "lower", ("<", 50)),
    ("idle RSS after 5 s", "idle_memory.rss_kib", "MB", 1024 / 1e6, "lower", ("<", 15)),
    ("idle USS after 5 s", "idle_memory.uss_kib", "MB", 1024 / 1e6, "lower", None),
    ("Ping p50, one REQ socket (Python client)", "ping_py.p50_us", "µs", 1, "lower", ("<", 100)),
    ("Ping p99 (Python client)", "ping_py.p99_us", "µs", 1, "lower", ("<", 1000)),
    ("Ping max (Python client)", "ping_py.max_us", "µs", 1, "lower", None),
    ("Ping requests/s, one socket (Python client)", "ping_py.rps", "req/s", 1, "higher", None),
    ("Ping p50 (Rust client)", "ping_rust.p50_us", "µs", 1, "lower", ("<", 100)),
    ("Ping p99 (Rust client)", "ping_rust.p99_us", "µs", 1, "lower", ("<", 1000)),
    ("Ping max (Rust client)", "ping_rust.max_us", "µs", 1, "lower", None),
    ("Ping requests/s, one socket (Rust client)", "ping_rust.rps", "req/s", 1, "higher", None),
    ("8 concurrent clients, requests/s (Python clients)", "throughput_py.rps", "req/s", 1, "higher", (">=", 20000)),
    ("8 concurrent clients, p99 (Python clients)", "throughput_py.p99_us", "µs", 1, "lower", None),
    ("8 concurrent clients, requests/s (Rust client)", "throughput_rust.rps", "req/s", 1, "higher", (">=", 20000)),
    ("8 concurrent clients, p99 (Rust client)", "throughput_rust.p99_us", "µs", 1, "lower", None),
    ("send_commands p50", "calls_py.send_commands.p50_us", "µs", 1, "lower", None),
    ("get_devices p50 (10 devices)", "calls_py.get_devices.p50_us", "µs", 1, "lower", None),
    ("get_device_ids p50", "calls_py.get_device_ids.p50_us", "µs", 1, "lower", None),
    ("get_core_processes p50", "calls_py.get_core_processes.p50_us", "µs", 1, "lower", None),
    ("get_core_processes p50 (Rust client)", "get_core_processes_rust.p50_us", "µs", 1, "lower", None),
    ("service port get_process_status p50", "calls_py.service_get_process_status.p50_us", "µs", 1, "lower", None),
    (
        "get_device_process_status, 10 devices, p50 of rounds",
        "device_status_py.round.p50_us",
        "ms",
        1e-3,
        "lower",
        None,
    ),
    ("get_device_process_status, one call p50", "device_status_py.per_call.p50_us", "µs", 1, "lower", None),
    ("quit_server → process exit", "quit.exit_ms", "ms", 1, "lower", None),
    ("RSS after the whole run (peak)", "after_load_memory.peak_rss_kib", "MB", 1024 / 1e6, "lower", None),
    ("start 50 processes → all RUNNING", "supervisor_py.start.all_running_ms", "ms", 1, "lower", ("<", 300)),
    (
        "status of 50: list_processes p50 (Python client)",
        "supervisor_py.list_processes.p50_us",
        "µs",
        1,
        "lower",
        ("<", 1000),
    ),
    ("status of 50: list_processes p50 (Rust client)", "list_processes_rust.p50_us", "µs", 1, "lower", ("<", 1000)),
    (
        "crash → restarted (kill -9 → new pid RUNNING), p50",
        "supervisor_py.crash_restart.running_again.p50_us",
        "ms",
        1e-3,
        "lower",
        ("<", 20),
    ),
    ("crash → restarted, max", "supervisor_py.crash_restart.running_again.max_us", "ms", 1e-3, "lower", None),
    ("stop 50 processes → all STOPPED", "supervisor_py.stop.all_stopped_ms", "ms", 1, "lower", None),
]


def _fmt(v: float | None) -> str:
    if v is None:
        return "—"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


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
        if o and u:
            ratio = o / u if better == "lower" else u / o
        met = None
        if target and u is not None:
            op, val = target
            met = u < val if op == "<" else u >= val
        rows.append({"measure": label, "unit": unit, "original": o, "ours": u, "ratio": ratio, "met": met})
        tgt = f"{target[0]} {target[1]:g} {unit}" if target else ""
        out.append(
            f"| {label} | {unit} | {_fmt(o)} | {_fmt(u)} | {'' if ratio is None else f'{ratio:,.1f}×'} | {tgt} | "
            f"{'' if met is None else ('yes' if met else '**no**')} |"
        )
    return "\n".join(out), rows


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
    ap.add_argument("--only", choices=("original", "ours"), help="measure one server only")
    cfg = ap.parse_args()
    cfg.starts, cfg.idle, cfg.ping, cfg.duration, cfg.calls, cfg.rounds, cfg.kills = (
        (3, 5.0, 500, 1.0, 100, 5, 5) if cfg.quick else (7, 5.0, 2000, 3.0, 300, 20, 20)
    )
    if not in_private_netns():
        print("bench.py: run it inside a private network namespace: " + COMMAND, file=sys.stderr)
        return 2
    if not cfg.no_build:
        log("cargo build --release --bin pm_cs --example wire_bench")
        subprocess.run(
            ["cargo", "build", "--release", "--bin", "pm_cs", "--example", "wire_bench"], cwd=REPO, check=True
        )
    results: dict[str, Any] = {"command": COMMAND + (" --quick" if cfg.quick else ""), "machine": machine()}
    log(f"machine: {results['machine']}")
    dev_ports = free_ports(N_DEVICES)
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
        log(f"site {env.root}: starting registry, storage manager, configuration manager")
        env.start_core(("registry", "sm", "cm"))
        for kind in ("original", "ours"):
            if cfg.only and kind != cfg.only:
                continue
            results[kind] = measure(kind, env, cfg)
            time.sleep(1.0)
        results["machine"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    if cfg.only:
        print(json.dumps(results, indent=2))
        return 0
    md, rows = table(results)
    results["table"] = rows
    m = results["machine"]
    header = (
        f"Measured {m['date_utc']} with `{results['command']}` on {m['cpu']} ({m['cores']} cores, {m['memory']}), "
        f"Linux {m['kernel']}, load average {' '.join(m['loadavg'])} at the start and "
        f"{' '.join(m['loadavg_end'])} at the end; procman {m['procman_commit']} ({m['rustc']}); original "
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
