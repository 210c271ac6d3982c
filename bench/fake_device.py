"""A minimal device control server for the benchmarks: a REP socket that answers ``Ping`` with ``Pong``.

    python bench/fake_device.py PORT

``send_commands`` gets an empty command table (so procman's status asks nothing more than the ``Ping``), any
other request a plain error string. Loopback only; stops on SIGTERM. Needs pyzmq.
"""

from __future__ import annotations

import pickle
import signal
import sys

import zmq


def main() -> int:
    port = int(sys.argv[1])
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(f"tcp://127.0.0.1:{port}")
    running = True

    def stop(*_: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    while running:
        if not sock.poll(200):
            continue
        data = sock.recv()
        try:
            request = pickle.loads(data)  # our own benchmark clients, on loopback
        except Exception:  # noqa: BLE001 - egse classes are not installed here
            request = None
        if request == "Ping":
            reply: object = "Pong"
        elif request == "send_commands":
            reply = {}
        else:
            reply = "fake_device: unknown request"
        sock.send(pickle.dumps(reply, protocol=4))
    sock.close(0)
    ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
