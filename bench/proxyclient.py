"""The Python face: per-call latency of ``egse.procman.ProcessManagerProxy``, run by either interpreter.

    <python> bench/proxyclient.py '{"port": P, "n": 2000, "calls": ["ping", "get_devices", "list_processes"]}'

Run by ``/work/…/.venv/bin/python`` it measures procman's proxy (Rust, ``egse.procman._native``); run by the
reference interpreter, cgse-core's original proxy. bench/bench.py points both at the same server (ours), so the
difference between the two is the client's. The last stdout line is ``RESULT <json>``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pyclient import stats


def timed(fn: Callable[[], Any], n: int, check: Callable[[Any], bool]) -> dict[str, Any]:
    for _ in range(min(20, n)):
        fn()
    lat: list[float] = []
    bad = 0
    t0 = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        reply = fn()
        dt = time.perf_counter() - t
        if check(reply):
            lat.append(dt)
        else:
            bad += 1
    return stats(lat, bad, time.perf_counter() - t0)


def main() -> int:
    spec = json.loads(sys.argv[1])
    from egse.procman import ProcessManagerProxy

    n = spec.get("n", 2000)
    out: dict[str, Any] = {"module": ProcessManagerProxy.__module__}
    with ProcessManagerProxy("tcp", "127.0.0.1", spec["port"]) as pm:
        checks: dict[str, Callable[[Any], bool]] = {
            "ping": lambda r: r is True,
            "get_devices": lambda r: isinstance(r, dict),
            "list_processes": lambda r: isinstance(r, dict) and len(r.get("processes", ())) >= 100,
        }
        for name in spec.get("calls", ["ping", "get_devices"]):
            fn = getattr(pm, name)
            out[name] = timed(fn, n if name != "list_processes" else spec.get("list_n", n), checks[name])
    print("RESULT " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
