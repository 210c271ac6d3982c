"""Measurement client of bench/bench.py, run by the REFERENCE interpreter (cgse-core 0.25.11 installed).

It talks to a control server exactly as the original CGSE clients do: a pyzmq REQ socket, ``pickle.dumps`` of
the request (a plain string for built-ins, ``egse.command.CommandExecution(cmd, *args)`` for table commands,
with ``cmd`` the command object the server announced through ``send_commands``) and ``pickle.loads`` of the
reply. The same code measures the original ``pm_cs`` and ours, so any client overhead is the same for both.

    <ref python> bench/pyclient.py '<json spec>'

The spec names one phase (``{"phase": "ping", ...}``); the last stdout line is ``RESULT <json>``. Every wait
is bounded; errors and timeouts are counted and reported, never hidden.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import signal
import sys
import time
from typing import Any

import zmq

TIMEOUT_MS = 10_000


class _Timeout:
    """What ``Client.raw`` returns when no reply came (``None`` is a valid reply: start_process)."""

    def __repr__(self) -> str:
        return "<timeout>"


TIMEOUT = _Timeout()


def _socket(ctx: zmq.Context, port: int, kind: int = zmq.REQ) -> zmq.Socket:
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, TIMEOUT_MS)
    s.setsockopt(zmq.SNDTIMEO, TIMEOUT_MS)
    s.connect(f"tcp://127.0.0.1:{port}")
    return s


class Client:
    """One REQ socket; requests are pickled and replies unpickled as egse.proxy.Proxy does."""

    def __init__(self, ctx: zmq.Context, port: int) -> None:
        self.ctx, self.port = ctx, port
        self.sock = _socket(ctx, port)
        self.commands: dict[str, Any] | None = None
        self.errors = 0

    def raw(self, data: bytes) -> Any:
        try:
            self.sock.send(data)
            return pickle.loads(self.sock.recv())
        except zmq.ZMQError:  # timeout: a REQ socket is unusable afterwards (lazy pirate)
            self.errors += 1
            self.sock.close(0)
            self.sock = _socket(self.ctx, self.port)
            return TIMEOUT

    def request(self, value: Any) -> Any:
        return self.raw(pickle.dumps(value))

    def table_request(self, name: str, *args: Any) -> bytes:
        from egse.command import CommandExecution

        if self.commands is None:
            self.commands = self.request("send_commands")
        return pickle.dumps(CommandExecution(self.commands[name], *args))

    def call(self, name: str, *args: Any) -> Any:
        return self.raw(self.table_request(name, *args))

    def close(self) -> None:
        self.sock.close(0)


def is_failure(reply: Any) -> bool:
    """No reply, or an ``egse.response.Failure``."""
    return reply is TIMEOUT or type(reply).__name__ == "Failure"


def stats(lat_s: list[float], errors: int = 0, elapsed: float | None = None) -> dict[str, Any]:
    """Latency summary in microseconds."""
    lat = sorted(lat_s)
    n = len(lat)
    if not n:
        return {"n": 0, "errors": errors}

    def pct(p: float) -> float:
        return round(lat[min(n - 1, round((n - 1) * p))] * 1e6, 1)

    out: dict[str, Any] = {
        "n": n,
        "errors": errors,
        "p50_us": pct(0.5),
        "p99_us": pct(0.99),
        "p999_us": pct(0.999),
        "max_us": round(lat[-1] * 1e6, 1),
        "mean_us": round(sum(lat) / n * 1e6, 1),
    }
    if elapsed:
        out["rps"] = round(n / elapsed)
    return out


def timed(client: Client, data: bytes, n: int, check: Any = None) -> dict[str, Any]:
    """``n`` sequential requests of the same bytes on one socket (after a short warm-up)."""
    for _ in range(min(20, n)):
        client.raw(data)
    lat: list[float] = []
    bad = 0
    t0 = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        reply = client.raw(data)
        dt = time.perf_counter() - t
        if is_failure(reply) or (check is not None and not check(reply)):
            bad += 1
        else:
            lat.append(dt)
    elapsed = time.perf_counter() - t0
    return stats(lat, bad, elapsed)


# ---------------------------------------------------------------------------------------------------- phases


def phase_ping(spec: dict[str, Any]) -> dict[str, Any]:
    ctx = zmq.Context()
    c = Client(ctx, spec["port"])
    out = timed(c, pickle.dumps("Ping"), spec.get("n", 2000), lambda r: r == "Pong")
    c.close()
    ctx.term()
    return out


def _throughput_worker(port: int, barrier: Any, stop_at: Any, queue: Any) -> None:
    ctx = zmq.Context()
    c = Client(ctx, port)
    data = pickle.dumps("Ping")
    for _ in range(20):
        c.raw(data)
    barrier.wait()
    end = stop_at.value
    lat: list[float] = []
    bad = 0
    while True:
        t = time.perf_counter()
        if t >= end:
            break
        reply = c.raw(data)
        if reply == "Pong":
            lat.append(time.perf_counter() - t)
        else:
            bad += 1
    c.close()
    ctx.term()
    queue.put((lat, bad))


def phase_throughput(spec: dict[str, Any]) -> dict[str, Any]:
    """``clients`` processes (not threads: one GIL per client), each with one REQ socket sending ``Ping``."""
    mp = multiprocessing.get_context("fork")
    n, duration = spec.get("clients", 8), spec.get("duration", 3.0)
    barrier = mp.Barrier(n + 1)
    stop_at = mp.Value("d", 0.0)
    queue = mp.Queue()
    procs = [mp.Process(target=_throughput_worker, args=(spec["port"], barrier, stop_at, queue)) for _ in range(n)]
    for p in procs:
        p.start()
    # perf_counter is CLOCK_MONOTONIC on Linux: comparable across processes.
    stop_at.value = time.perf_counter() + 0.05 + duration
    barrier.wait(timeout=60)
    t0 = time.perf_counter()
    results = [queue.get(timeout=duration + 60) for _ in procs]
    elapsed = min(time.perf_counter(), stop_at.value) - t0
    for p in procs:
        p.join(10)
    lat = [x for r in results for x in r[0]]
    bad = sum(r[1] for r in results)
    out = stats(lat, bad)
    out["rps"] = round(len(lat) / (stop_at.value - t0 if stop_at.value > t0 else elapsed))
    out["clients"] = n
    out["duration_s"] = duration
    return out


def phase_calls(spec: dict[str, Any]) -> dict[str, Any]:
    """p50 of the commanding table's read commands, ``send_commands``, and the service port's status."""
    ctx = zmq.Context()
    n = spec.get("n", 300)
    cmd = Client(ctx, spec["cmd_port"])
    svc = Client(ctx, spec["svc_port"])
    out: dict[str, Any] = {"send_commands": timed(cmd, pickle.dumps("send_commands"), n)}
    for name in ("get_devices", "get_device_ids", "get_core_processes"):
        out[name] = timed(cmd, cmd.table_request(name), n)
    out["get_devices_count"] = len(cmd.call("get_devices") or {})
    out["service_get_process_status"] = timed(svc, svc.table_request("get_process_status"), n)
    cmd.close()
    svc.close()
    ctx.term()
    return out


def phase_device_status(spec: dict[str, Any]) -> dict[str, Any]:
    """``get_device_process_status`` for every device, one after the other (as the PM UI refreshes), per round."""
    from egse.procman import StatusCommand

    ctx = zmq.Context()
    c = Client(ctx, spec["port"])
    ids = spec["device_ids"]
    requests = [c.table_request("get_device_process_status", StatusCommand(d, [], spec["cgse_cmd"])) for d in ids]
    rounds, per_call, bad = [], [], 0
    replies: list[Any] = []
    for r in range(spec.get("rounds", 20) + 1):
        t0 = time.perf_counter()
        replies = []
        for data in requests:
            t = time.perf_counter()
            reply = c.raw(data)
            per_call.append(time.perf_counter() - t)
            bad += is_failure(reply)
            replies.append(reply)
        if r:  # the first round is a warm-up
            rounds.append(time.perf_counter() - t0)
    c.close()
    ctx.term()
    active = sum(1 for x in replies if isinstance(x, dict) and x.get("cs_is_active"))
    return {
        "devices": len(ids),
        "round": stats(rounds),
        "per_call": stats(per_call, bad),
        "active_in_last_round": active,
        "example_reply": repr(replies[0]) if replies else None,
    }


def _pid_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def phase_quit(spec: dict[str, Any]) -> dict[str, Any]:
    """``quit_server`` on the service port; time to its reply and to the process's exit (zombie or gone)."""
    ctx = zmq.Context()
    svc = Client(ctx, spec["svc_port"])
    data = svc.table_request("quit_server")
    pid = spec["pid"]
    t0 = time.perf_counter()
    reply = svc.raw(data)
    t_reply = time.perf_counter() - t0
    deadline = t0 + 30
    while not _pid_gone(pid) and time.perf_counter() < deadline:
        time.sleep(0.0002)
    t_exit = time.perf_counter() - t0
    svc.close()
    ctx.term()
    return {"reply_ms": round(t_reply * 1e3, 2), "exit_ms": round(t_exit * 1e3, 2), "reply": repr(reply)}


class Events:
    """A SUB socket on the monitoring port that collects process events (dicts with ``event``)."""

    def __init__(self, ctx: zmq.Context, port: int) -> None:
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(f"tcp://127.0.0.1:{port}")

    def wait(self, pred: Any, count: int = 1, timeout: float = 30.0) -> tuple[float, list[dict[str, Any]]]:
        """Wait for ``count`` events matching ``pred``; returns (perf_counter of the last, the events)."""
        got: list[dict[str, Any]] = []
        deadline = time.perf_counter() + timeout
        t_last = 0.0
        while len(got) < count:
            left = deadline - time.perf_counter()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1):
                raise TimeoutError(f"{len(got)} of {count} events after {timeout} s")
            msg = pickle.loads(self.sock.recv())
            if isinstance(msg, dict) and msg.get("event") == "process_state" and pred(msg):
                t_last = time.perf_counter()
                got.append(msg)
        return t_last, got

    def drain(self) -> None:
        while self.sock.poll(0):
            self.sock.recv()


def _processes(c: Client) -> dict[str, dict[str, Any]]:
    reply = c.call("list_processes")
    return {r["id"]: r for r in reply["processes"]} if isinstance(reply, dict) else {}


def phase_start_devices(spec: dict[str, Any]) -> dict[str, Any]:
    """start_process for each device, then wait until all are RUNNING (ready: they answer Ping)."""
    from egse.procman import StartCommand

    ctx = zmq.Context()
    c = Client(ctx, spec["port"])
    replies = [c.call("start_process", StartCommand(d, "", [], False)) for d in spec["device_ids"]]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        procs = _processes(c)
        if all(procs.get(d, {}).get("state") == "RUNNING" for d in spec["device_ids"]):
            break
        time.sleep(0.1)
    states = {d: _processes(c).get(d, {}).get("state") for d in spec["device_ids"]}
    c.close()
    ctx.term()
    return {"replies": [repr(r) for r in replies], "states": states}


def phase_stop_processes(spec: dict[str, Any]) -> dict[str, Any]:
    from egse.procman import StopCommand

    ctx = zmq.Context()
    c = Client(ctx, spec["port"])
    for d in spec["ids"]:
        c.call("stop_process", StopCommand(d, [], ""))
    deadline = time.monotonic() + 60
    procs: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        procs = _processes(c)
        if all(r.get("pid") is None for r in procs.values()):
            break
        time.sleep(0.1)
    running = [i for i, r in procs.items() if r.get("pid") is not None]
    c.close()
    ctx.term()
    return {"still_running": running}


def _supervisor_setup(spec: dict[str, Any]) -> tuple[zmq.Context, Client, Events, dict[str, bytes], dict[str, bytes]]:
    from egse.procman import StartCommand, StopCommand

    ctx = zmq.Context()
    c = Client(ctx, spec["cmd_port"])
    ev = Events(ctx, spec["mon_port"])
    ids = spec["ids"] + ([spec["crash_id"]] if "crash_id" in spec else [])
    start_req = {i: c.table_request("start_process", StartCommand(i, "", [], False)) for i in ids}
    stop_req = {i: c.table_request("stop_process", StopCommand(i, [], "")) for i in ids}
    time.sleep(0.3)  # let the SUB connect before the first event
    ev.drain()
    return ctx, c, ev, start_req, stop_req


def phase_sup_start(spec: dict[str, Any]) -> dict[str, Any]:
    """Ours only: start N processes and the status of all (list_processes), through the wire protocol."""
    ctx, c, ev, start_req, _ = _supervisor_setup(spec)
    ids: list[str] = spec["ids"]
    idset = set(ids)
    out: dict[str, Any] = {"n": len(ids)}
    # Every start_process replied, then every process RUNNING (events on the monitoring port).
    t0 = time.perf_counter()
    bad = sum(is_failure(c.raw(start_req[i])) for i in ids)
    t_issued = time.perf_counter() - t0
    t_last, _ = ev.wait(lambda e: e["id"] in idset and e["new_state"] == "RUNNING", len(ids))
    out["start"] = {
        "calls_returned_ms": round(t_issued * 1e3, 2),
        "all_running_ms": round((t_last - t0) * 1e3, 2),
        "failures": bad,
    }
    # Status of all: list_processes round trip (the reply carries every record).
    data = c.table_request("list_processes")
    procs = _processes(c)
    out["list_processes"] = timed(c, data, spec.get("list_n", 1000))
    out["list_processes"]["records"] = len(procs)
    out["list_processes"]["running"] = sum(1 for r in procs.values() if r["state"] == "RUNNING")
    ev.sock.close(0)
    c.close()
    ctx.term()
    return out


def phase_sup_crash_stop(spec: dict[str, Any]) -> dict[str, Any]:
    """Ours only: crash -> restart (kill -9, zero backoff) and stop N, through the wire protocol."""
    ctx, c, ev, start_req, stop_req = _supervisor_setup(spec)
    ids: list[str] = spec["ids"]
    crash: str = spec["crash_id"]
    idset = set(ids)
    out: dict[str, Any] = {}
    c.raw(start_req[crash])
    ev.wait(lambda e: e["id"] == crash and e["new_state"] == "RUNNING")
    detect, restart = [], []
    for _ in range(spec.get("kills", 20)):
        old = _processes(c)[crash]["pid"]
        ev.drain()
        t0 = time.perf_counter()
        os.kill(old, signal.SIGKILL)
        t_exit, _ = ev.wait(lambda e: e["id"] == crash and e["old_state"] == "RUNNING")
        t_run, _ = ev.wait(lambda e, old=old: e["id"] == crash and e["new_state"] == "RUNNING" and e["pid"] != old)
        detect.append(t_exit - t0)
        restart.append(t_run - t0)
        time.sleep(0.05)
    out["crash_restart"] = {"exit_seen": stats(detect), "running_again": stats(restart)}
    out["crash_restart"]["restarts"] = _processes(c)[crash]["restarts"]
    # Every stop_process replied, then every process STOPPED.
    ev.drain()
    t0 = time.perf_counter()
    bad = sum(is_failure(c.raw(stop_req[i])) for i in ids)
    t_issued = time.perf_counter() - t0
    t_last, _ = ev.wait(lambda e: e["id"] in idset and e["new_state"] == "STOPPED", len(ids))
    out["stop"] = {
        "calls_returned_ms": round(t_issued * 1e3, 2),
        "all_stopped_ms": round((t_last - t0) * 1e3, 2),
        "failures": bad,
    }
    c.raw(stop_req[crash])
    ev.sock.close(0)
    c.close()
    ctx.term()
    return out


def phase_sup_start_rounds(spec: dict[str, Any]) -> dict[str, Any]:
    """For bench/profile.sh: ``rounds`` × (start N → all RUNNING, stop N → all STOPPED), with a profiler told
    through its control FIFO (``perf record --control fifo:ctl,ack``) to record the starts only. Both are
    timed (for A/B runs of two binaries)."""
    ctx, c, ev, start_req, stop_req = _supervisor_setup(spec)
    ids: list[str] = spec["ids"]
    idset = set(ids)

    def control(word: str) -> None:
        if spec.get("ctl"):
            with open(spec["ctl"], "w") as ctl:
                ctl.write(word + "\n")
            with open(spec["ack"]) as ack:
                ack.readline()

    running, returned, stopped, stop_returned = [], [], [], []
    for _ in range(spec.get("rounds", 5)):
        ev.drain()
        control("enable")
        t0 = time.perf_counter()
        bad = sum(is_failure(c.raw(start_req[i])) for i in ids)
        t_ret = time.perf_counter()
        t_last, _ = ev.wait(lambda e: e["id"] in idset and e["new_state"] == "RUNNING", len(ids))
        control("disable")
        if bad:
            raise RuntimeError(f"{bad} start_process calls failed")
        running.append(t_last - t0)
        returned.append(t_ret - t0)
        ev.drain()
        t0 = time.perf_counter()
        for i in ids:
            c.raw(stop_req[i])
        t_ret = time.perf_counter()
        t_last, _ = ev.wait(lambda e: e["id"] in idset and e["new_state"] == "STOPPED", len(ids))
        stopped.append(t_last - t0)
        stop_returned.append(t_ret - t0)
    ev.sock.close(0)
    c.close()
    ctx.term()
    return {
        "all_running": stats(running),
        "calls_returned": stats(returned),
        "all_stopped": stats(stopped),
        "stop_calls_returned": stats(stop_returned),
    }


def phase_table_call(spec: dict[str, Any]) -> dict[str, Any]:
    """One table command with arguments (e.g. the service port's ``set_logging_level``); its reply's repr."""
    ctx = zmq.Context()
    c = Client(ctx, spec["port"])
    reply = c.call(spec["name"], *spec.get("args", []))
    c.close()
    ctx.term()
    return {"reply": repr(reply), "failure": is_failure(reply)}


PHASES = {
    "ping": phase_ping,
    "throughput": phase_throughput,
    "calls": phase_calls,
    "device_status": phase_device_status,
    "quit": phase_quit,
    "start_devices": phase_start_devices,
    "stop_processes": phase_stop_processes,
    "sup_start": phase_sup_start,
    "sup_crash_stop": phase_sup_crash_stop,
    "sup_start_rounds": phase_sup_start_rounds,
    "table_call": phase_table_call,
}


def main() -> int:
    spec = json.loads(sys.argv[1])
    result = PHASES[spec["phase"]](spec)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
