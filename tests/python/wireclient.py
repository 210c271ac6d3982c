"""Small pyzmq + pickle helpers for clients that run WITHOUT cgse-core (the load tests and the soak).

Replies of a CGSE control server can name ``egse`` classes (``egse.response.Failure``, the command objects of
``send_commands``). ``loads`` turns every class it cannot import into a stand-in with the same name, so such a
reply still loads and a ``Failure`` can be recognised (``is_failure``). Only for our own servers on loopback.
Table commands go either as the original clients send them (``command_execution``: a pickled
``egse.command.CommandExecution`` of the command object from ``send_commands``, through stand-in classes that
pickle under the original names), or in the dict form ``{"cmd": name, "args": [...]}`` (``dict_cmd``), which
procman accepts for every command.
"""

from __future__ import annotations

import io
import pickle
import sys
import types
from typing import Any

import zmq

PING = pickle.dumps("Ping", protocol=4)
REQUEST_TIMEOUT_MS = 10_000


class StandIn:
    """An instance of a class that is not installed here; keeps its state (and pickles back the same way)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<{type(self).__module__}.{type(self).__qualname__} {self.__dict__!r}>"


def stand_in(module: str, name: str) -> type:
    """The stand-in class ``module.name``, registered in ``sys.modules`` so that ``pickle.dumps`` finds it."""
    parts = module.split(".")
    for i in range(1, len(parts) + 1):  # parents too: pickle imports the module by name
        name_i = ".".join(parts[:i])
        if name_i not in sys.modules:
            sys.modules[name_i] = types.ModuleType(name_i)
            if i > 1:
                setattr(sys.modules[".".join(parts[: i - 1])], parts[i - 1], sys.modules[name_i])
    owner: Any = sys.modules[module]
    names = name.split(".")  # a qualified name (Class.method) is looked up attribute by attribute
    for i, part in enumerate(names):
        found = getattr(owner, part, None)
        if found is None:
            qualname = ".".join(names[: i + 1])
            found = type(part, (StandIn,), {"__module__": module, "__qualname__": qualname})
            setattr(owner, part, found)
        owner = found
    return owner  # type: ignore[no-any-return]


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return stand_in(module, name)


def loads(data: bytes) -> Any:
    """``pickle.loads`` with stand-ins for classes that are not installed."""
    return _Unpickler(io.BytesIO(data)).load()


def command_execution(cmd: Any, *args: Any, **kwargs: Any) -> bytes:
    """``pickle.dumps(egse.command.CommandExecution(cmd, *args, **kwargs))`` as the original proxies send it;
    ``cmd`` is a command object from a ``send_commands`` reply loaded with ``loads``."""
    ce_cls = stand_in("egse.command", "CommandExecution")
    ce: Any = object.__new__(ce_cls)
    ce.__dict__.update({"_cmd": cmd, "_args": args, "_kwargs": kwargs})
    return pickle.dumps(ce)


def process_command(
    kind: str, device_id: str, cgse_cmd: str = "", device_args: Any = (), simulator: bool = False
) -> Any:
    """An ``egse.procman`` ``StartCommand`` / ``StopCommand`` / ``StatusCommand`` with its original state."""
    cls = stand_in("egse.procman", kind)
    # Without __init__: once another test has imported our egse.procman, this is the real class.
    obj: Any = object.__new__(cls)
    obj.__dict__.update({"_device_id": device_id, "_cgse_cmd": cgse_cmd, "_device_args": list(device_args)})
    if kind == "StartCommand":
        obj.__dict__["_is_simulator_mode"] = simulator
    return obj


def is_failure(reply: Any) -> bool:
    """True for an ``egse.response.Failure`` (or any class named ``Failure``)."""
    return type(reply).__name__ == "Failure"


def dict_cmd(name: str, *args: Any, **kwargs: Any) -> bytes:
    """A pickled dict-form request for command ``name``."""
    return pickle.dumps({"cmd": name, "args": list(args), "kwargs": kwargs}, protocol=4)


def request(port: int, frame: bytes, timeout_ms: int = REQUEST_TIMEOUT_MS) -> Any:
    """One request on a fresh REQ socket to 127.0.0.1:``port``; the reply (``loads``), or ``TimeoutError``."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    s = ctx.socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://127.0.0.1:{port}")
    try:
        s.send(frame)
        if not s.poll(timeout_ms):
            raise TimeoutError(f"no reply on port {port} within {timeout_ms} ms")
        return loads(s.recv())
    finally:
        s.close(0)
