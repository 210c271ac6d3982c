"""A stand-in device control server for the supervision tests: a REP socket answering the built-ins.

Usage: python fake_device_cs.py PORT [--fork N]

It answers a pickled ``"Ping"`` with ``"Pong"`` and ``"send_commands"`` with ``{}`` (no device commands), which is
all the Process Manager asks of a control server. ``--fork N`` first starts N grandchildren (``sleep``) that stay in
its process group, to check that stopping the process leaves none behind. Only the daemon under test talks to it,
on loopback.
"""

from __future__ import annotations

import pickle
import subprocess
import sys

import zmq


def main() -> int:
    port = int(sys.argv[1])
    forks = int(sys.argv[sys.argv.index("--fork") + 1]) if "--fork" in sys.argv else 0
    children = [subprocess.Popen(["sleep", "1000"]) for _ in range(forks)]
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.REP)
    sock.bind(f"tcp://127.0.0.1:{port}")
    print(f"fake device control server on port {port}, {len(children)} children", flush=True)
    while True:
        request = pickle.loads(sock.recv())  # only the daemon under test connects
        if request == "Ping":
            reply: object = "Pong"
        elif request == "send_commands":
            reply = {}
        else:
            reply = f"unknown request {request!r}"
        sock.send(pickle.dumps(reply, protocol=4))


if __name__ == "__main__":
    sys.exit(main())
