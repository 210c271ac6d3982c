"""A scriptable control server for the proxy tests: a pyzmq ROUTER on loopback in a thread.

``handler(raw_request) -> raw_reply or None``; None leaves the request unanswered (a silent server).
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

import zmq

if TYPE_CHECKING:
    from typing_extensions import Self

Handler = Callable[[bytes], bytes | None]


class FakeServer:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[bytes] = []
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self.port = self._sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close(0)
        self._ctx.term()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not dict(poller.poll(50)):
                continue
            frames = self._sock.recv_multipart()
            envelope, body = frames[:-1], frames[-1]
            self.requests.append(body)
            reply = self.handler(body)
            if reply is not None:
                self._sock.send_multipart([*envelope, reply])


class _Restricted(pickle.Unpickler):
    """Unpickles only plain data: any class reference is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refused {module}.{name}")


def plain(raw: bytes) -> Any:
    """The request as plain data, or None if it references any class."""
    try:
        return _Restricted(__import__("io").BytesIO(raw)).load()
    except pickle.UnpicklingError:
        return None


def answering(replies: dict[str, Any]) -> Handler:
    """Answer string requests from ``replies`` (``Ping`` → ``Pong`` built in), echo everything else raw."""

    def handle(raw: bytes) -> bytes:
        request = plain(raw)
        if request == "Ping":
            return pickle.dumps("Pong")
        if isinstance(request, str) and request in replies:
            return pickle.dumps(replies[request])
        return raw

    return handle


def failure_pickle(message: str) -> bytes:
    """``egse.response.Failure(message)`` as the original server pickles it, without importing anything
    (the minimal form; ``message`` shorter than 256 UTF-8 bytes)."""

    def short(s: str) -> bytes:
        b = s.encode()
        assert len(b) < 256
        return b"\x8c" + bytes([len(b)]) + b

    msg = short(message)
    return (
        b"\x80\x04"
        + short("egse.response")
        + short("Failure")
        + b"\x93"
        + msg
        + b"\x85R}("
        + short("message")
        + msg
        + short("cause")
        + b"Nub."
    )
