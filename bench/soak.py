"""Soak: our daemon under mixed load with a crash-looping child, for an hour (configurable).

    scripts/in-netns.sh .venv/bin/python bench/soak.py [--duration 3600] [--interval 10] [--out bench/results/soak]

Starts ``target/release/pm_cs`` in a throw-away site with a process table (``Procman.PROCESS_TABLE``) of:
``CRASHLOOP`` (prints two lines, exits 3 after 1 s; ``restart: always``, 0.2 s backoff, no crash-loop limit),
``CHATTY`` (a Python child printing ~10 KB/s, so the logs rotate) and ``SLEEPER`` (idle). Load, all at once
and bounded: 4 commanding clients (``Ping``, ``send_commands``, ``get_core_processes``, ``list_processes``,
``get_process_log``), 2 service clients (``get_process_status``, ``get_average_execution_times``), 1 client
that connects, pings and disconnects every 100 ms, and 2 monitoring subscribers (one reads everything, one
never reads). Every ``--interval`` s it samples the daemon's RSS, open fds and threads and writes a CSV row;
at the end a PNG (needs matplotlib: ``.venv/bin/pip install -r bench/requirements.txt``) and a JSON summary.

The clients here carry no cgse-core: table commands use the dict request form ``{"cmd": name, "args": [...]}``,
which procman accepts on every command (the original only for built-ins).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import zmq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "python"))

from refenv import free_ports, in_private_netns
from wireclient import PING, dict_cmd, is_failure, loads, request

PM_CS = REPO / "target" / "release" / "pm_cs"

TABLE = """\
# Process table of the soak (written by bench/soak.py).
python: {python}
allowed_programs: [cgse]
defaults:
  stop_timeout: 5
devices:
  CRASHLOOP:
    argv: [sh, -c, "echo soak child $$ starting; echo to stderr >&2; sleep 1; exit 3"]
    restart: always
    backoff: {{initial: 0.2, factor: 1, jitter: 0}}
    crash_loop: {{max_starts: 0}}
  CHATTY:
    argv: ["{{python}}", -u, -c, "import time\\nwhile True:\\n    print('chatty ' * 14)\\n    time.sleep(0.01)"]
    restart: always
  SLEEPER:
    argv: [sleep, "100000"]
"""


def proc_sample(pid: int) -> dict[str, int]:
    status = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        status[key] = value.strip()
    return {
        "rss_kib": int(status["VmRSS"].split()[0]),
        "threads": int(status["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


class Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ok = 0
        self.errors = 0
        self.timeouts = 0
        self.mon_received = 0
        self.last_error = ""

    def add(self, ok: int = 0, errors: int = 0, timeouts: int = 0, error: str = "") -> None:
        with self.lock:
            self.ok += ok
            self.errors += errors
            self.timeouts += timeouts
            if error:
                self.last_error = error


def req_loop(port: int, frames: list[bytes], stop: threading.Event, counters: Counters, pause: float) -> None:
    """One REQ socket cycling through ``frames``; a timeout recreates the socket (lazy pirate)."""
    ctx = zmq.Context.instance()

    def sock() -> zmq.Socket:
        s = ctx.socket(zmq.REQ)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(f"tcp://127.0.0.1:{port}")
        return s

    s = sock()
    i = 0
    while not stop.is_set():
        frame = frames[i % len(frames)]
        s.send(frame)
        if s.poll(5000):
            try:
                reply = loads(s.recv())
            except Exception as exc:  # noqa: BLE001 - garbage: an error
                counters.add(errors=1, error=f"{frame[:60]!r}: {exc}")
            else:
                if is_failure(reply):
                    counters.add(errors=1, error=repr(reply))
                else:
                    counters.add(ok=1)
        else:
            counters.add(timeouts=1, error=f"timeout on {frame[:60]!r}")
            s.close(0)
            s = sock()
        i += 1
        stop.wait(pause)
    s.close(0)


def churn_loop(port: int, stop: threading.Event, counters: Counters) -> None:
    """Connect, Ping, disconnect, every 100 ms."""
    ctx = zmq.Context.instance()
    while not stop.is_set():
        s = ctx.socket(zmq.REQ)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(f"tcp://127.0.0.1:{port}")
        s.send(PING)
        if s.poll(5000) and loads(s.recv()) == "Pong":
            counters.add(ok=1)
        else:
            counters.add(timeouts=1, error="churn: no Pong")
        s.close(0)
        stop.wait(0.1)


def sub_loop(port: int, stop: threading.Event, counters: Counters) -> None:
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.connect(f"tcp://127.0.0.1:{port}")
    while not stop.is_set():
        if s.poll(500):
            s.recv()
            with counters.lock:
                counters.mon_received += 1
    s.close(0)


def ping(port: int) -> bool:
    try:
        return request(port, PING, 300) == "Pong"
    except TimeoutError:
        return False


def list_processes(port: int) -> dict[str, dict[str, Any]]:
    try:
        reply = request(port, dict_cmd("list_processes"), 5000)
    except TimeoutError:
        return {}
    return {r["id"]: r for r in reply["processes"]}


def rss_slope_kib_per_hour(rows: list[dict[str, Any]]) -> float:
    """Least-squares slope of RSS over the run, after its first tenth (warm-up), in KiB per hour."""
    rs = rows[len(rows) // 10 :] if len(rows) >= 10 else rows
    xs = [float(r["elapsed_s"]) / 3600 for r in rs]
    ys = [float(r["rss_kib"]) for r in rs]
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0


def plot(csv_path: Path, png_path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("soak.py: matplotlib not installed; no PNG (pip install -r bench/requirements.txt)", file=sys.stderr)
        return False
    rows = list(csv.DictReader(csv_path.open()))
    t = [float(r["elapsed_s"]) / 60 for r in rows]
    fig, axes = plt.subplots(4, 1, figsize=(9, 9), sharex=True)
    series = [
        ("RSS (MiB)", [int(r["rss_kib"]) / 1024 for r in rows]),
        ("open fds", [int(r["fds"]) for r in rows]),
        ("threads", [int(r["threads"]) for r in rows]),
        ("CRASHLOOP restarts", [int(r["crashloop_restarts"]) for r in rows]),
    ]
    for ax, (label, ys) in zip(axes, series, strict=True):
        ax.plot(t, ys, linewidth=1.2)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if label != "CRASHLOOP restarts":
            lo, hi = min(ys), max(ys)
            pad = max(1.0, (hi - lo) * 0.5, hi * 0.1)
            ax.set_ylim(max(0, lo - pad), hi + pad)
    axes[-1].set_xlabel("minutes")
    fig.suptitle("\n".join(textwrap.wrap(title, 110)), fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=3600.0, help="seconds (default 3600)")
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between samples (default 10)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "soak", help="path prefix of outputs")
    ap.add_argument("--pause", type=float, default=0.01, help="pause between requests of one client (s)")
    ap.add_argument("--replot", type=Path, metavar="CSV", help="only draw the PNG of an existing CSV")
    ap.add_argument("--title", default="", help="title prefix of the plot")
    cfg = ap.parse_args()
    if cfg.replot:
        rows = list(csv.DictReader(cfg.replot.open()))
        last = rows[-1]
        title = (
            f"{cfg.title or 'procman soak'}: {float(last['elapsed_s']) / 60:.0f} min, {int(last['requests_ok']):,} "
            f"requests, {int(last['crashloop_restarts']):,} crash-loop restarts; RSS slope "
            f"{rss_slope_kib_per_hour(rows):+.0f} KiB/h"
        )
        return 0 if plot(cfg.replot, cfg.replot.with_suffix(".png"), title) else 1
    if not in_private_netns():
        print("soak.py: run it inside scripts/in-netns.sh", file=sys.stderr)
        return 2
    loadavg_start = Path("/proc/loadavg").read_text().split()[:3]
    commit_start = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    root = Path(tempfile.mkdtemp(prefix="procman-soak-"))
    cmd_port, mon_port, svc_port = free_ports(3)
    table = root / "procman.yaml"
    table.write_text(TABLE.format(python=json.dumps(sys.executable)))
    settings = root / "settings.yaml"
    settings.write_text(
        "Process Manager Control Server:\n"
        f"    COMMANDING_PORT: {cmd_port}\n    MONITORING_PORT: {mon_port}\n    SERVICE_PORT: {svc_port}\n"
        "Procman:\n"
        f"    STATE_DIR: {root / 'state'}\n    PROCESS_TABLE: {table}\n    STOP_CHILDREN_ON_EXIT: true\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CGSE_")}
    env.update({"PROCMAN_LOG": "info", "CGSE_LOG_FILE_LOCATION": str(root / "log")})
    err = open(root / "pm_cs.err", "wb")  # noqa: SIM115 - closed at the end
    daemon = subprocess.Popen(
        [str(PM_CS), "start", "--settings", str(settings)],
        stdin=subprocess.DEVNULL,
        stdout=err,
        stderr=err,
        env=env,
        cwd=root,
        start_new_session=True,
    )
    stop = threading.Event()
    counters = Counters()
    threads: list[threading.Thread] = []
    rows: list[dict[str, Any]] = []
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    csv_path = cfg.out.with_suffix(".csv")
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not ping(cmd_port):
            time.sleep(0.1)
        for pid in ("CRASHLOOP", "CHATTY", "SLEEPER"):
            start = {"device_id": pid, "cgse_cmd": "", "device_args": [], "is_simulator_mode": False}
            if not request(cmd_port, dict_cmd("start_process", start), 5000) is None:
                raise RuntimeError(f"start_process {pid} failed")
        cmd_mix = [
            PING,
            pickle.dumps("send_commands", protocol=4),
            dict_cmd("get_core_processes"),
            dict_cmd("list_processes"),
            dict_cmd("get_process_log", "CRASHLOOP", 20),
        ]
        svc_mix = [dict_cmd("get_process_status"), dict_cmd("get_average_execution_times")]
        for _ in range(4):
            threads.append(threading.Thread(target=req_loop, args=(cmd_port, cmd_mix, stop, counters, cfg.pause)))
        for _ in range(2):
            threads.append(threading.Thread(target=req_loop, args=(svc_port, svc_mix, stop, counters, cfg.pause)))
        threads.append(threading.Thread(target=churn_loop, args=(cmd_port, stop, counters)))
        threads.append(threading.Thread(target=sub_loop, args=(mon_port, stop, counters)))
        for th in threads:
            th.daemon = True
            th.start()
        # The subscriber that never reads.
        stuck_ctx = zmq.Context()
        stuck = stuck_ctx.socket(zmq.SUB)
        stuck.setsockopt(zmq.SUBSCRIBE, b"")
        stuck.setsockopt(zmq.RCVHWM, 1)
        stuck.setsockopt(zmq.RCVBUF, 4096)
        stuck.connect(f"tcp://127.0.0.1:{mon_port}")

        t0 = time.monotonic()
        with csv_path.open("w", newline="") as f:
            w = csv.DictWriter(
                f,
                fieldnames=[
                    "elapsed_s", "rss_kib", "fds", "threads", "crashloop_restarts", "chatty_pid",
                    "requests_ok", "errors", "timeouts", "monitoring_received",
                ],
            )  # fmt: skip
            w.writeheader()
            n = 0
            while True:
                if daemon.poll() is not None:
                    raise RuntimeError(f"the daemon exited with {daemon.returncode}")
                procs = list_processes(cmd_port)
                row = {
                    "elapsed_s": round(time.monotonic() - t0, 1),
                    **proc_sample(daemon.pid),
                    "crashloop_restarts": procs.get("CRASHLOOP", {}).get("restarts", -1),
                    "chatty_pid": procs.get("CHATTY", {}).get("pid"),
                    "requests_ok": counters.ok,
                    "errors": counters.errors,
                    "timeouts": counters.timeouts,
                    "monitoring_received": counters.mon_received,
                }
                w.writerow(row)
                f.flush()
                rows.append(row)
                if n % 6 == 0:
                    print(json.dumps(row), flush=True)
                n += 1
                if time.monotonic() - t0 >= cfg.duration:
                    break
                time.sleep(max(0.0, t0 + n * cfg.interval - time.monotonic()))
        stuck.close(0)
        stuck_ctx.term()
    finally:
        stop.set()
        for th in threads:
            th.join(10)
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait(5)
        err.close()
    first, last = rows[0], rows[-1]
    # Compare the first and last 10 % of the run: growth, not warm-up, is what matters.
    k = max(1, len(rows) // 10)
    early, late = rows[k : 2 * k] or rows[:k], rows[-k:]

    def avg(rs: list[dict[str, Any]], key: str) -> float:
        return sum(float(r[key]) for r in rs) / len(rs)

    summary = {
        "command": "scripts/in-netns.sh .venv/bin/python bench/soak.py " + " ".join(sys.argv[1:]),
        "procman_commit": commit_start,
        "loadavg_start": loadavg_start,
        "duration_s": last["elapsed_s"],
        "samples": len(rows),
        "rss_kib": {"first": first["rss_kib"], "last": last["rss_kib"], "min": min(r["rss_kib"] for r in rows),
                    "max": max(r["rss_kib"] for r in rows), "early_avg": avg(early, "rss_kib"),
                    "late_avg": avg(late, "rss_kib")},
        "fds": {"first": first["fds"], "last": last["fds"], "min": min(r["fds"] for r in rows),
                "max": max(r["fds"] for r in rows)},
        "threads": {"first": first["threads"], "last": last["threads"], "min": min(r["threads"] for r in rows),
                    "max": max(r["threads"] for r in rows)},
        "rss_slope_kib_per_hour": round(rss_slope_kib_per_hour(rows), 1),
        "crashloop_restarts": last["crashloop_restarts"],
        "requests_ok": last["requests_ok"],
        "errors": last["errors"],
        "timeouts": last["timeouts"],
        "last_error": counters.last_error,
        "monitoring_received": last["monitoring_received"],
        "daemon_exit_code": daemon.returncode,
        "loadavg_end": Path("/proc/loadavg").read_text().split()[:3],
        "site": str(root),
    }  # fmt: skip
    cfg.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    title = (
        f"{cfg.title or 'procman soak'}: {last['elapsed_s'] / 60:.0f} min, {last['requests_ok']:,} requests, "
        f"{last['crashloop_restarts']:,} crash-loop restarts, {last['errors']} errors, {last['timeouts']} timeouts; "
        f"RSS slope {summary['rss_slope_kib_per_hour']:+.0f} KiB/h"
    )
    plot(csv_path, cfg.out.with_suffix(".png"), title)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
