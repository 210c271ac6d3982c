"""Small pyzmq + pickle helpers for clients that run WITHOUT cgse-core (the load tests and the soak).

Replies of a CGSE control server can name ``egse`` classes (``egse.response.Failure``, the command objects of
``send_commands``). ``loads`` turns every class it cannot import into a stand-in with the same name, so such a
reply still loads and a ``Failure`` can be recognised (``is_failure``). Only for our own servers on loopback.
Table commands are sent in the dict form ``{"cmd": name, "args": [...], "kwargs": {}}`` (``dict_cmd``), which
procman accepts for every command.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

PING = pickle.dumps("Ping", protocol=4)


class StandIn:
    """An instance of a class that is not installed here; keeps its state."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        obj = super().__new__(cls)
        obj.__dict__["_args"] = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    def __repr__(self) -> str:
        return f"<{type(self).__module__}.{type(self).__qualname__} {self.__dict__!r}>"


_stand_ins: dict[tuple[str, str], type] = {}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            key = (module, name)
            if key not in _stand_ins:
                _stand_ins[key] = type(name, (StandIn,), {"__module__": module, "__qualname__": name})
            return _stand_ins[key]


def loads(data: bytes) -> Any:
    """``pickle.loads`` with stand-ins for classes that are not installed."""
    return _Unpickler(io.BytesIO(data)).load()


def is_failure(reply: Any) -> bool:
    """True for an ``egse.response.Failure`` (or any class named ``Failure``)."""
    return type(reply).__name__ == "Failure"


def dict_cmd(name: str, *args: Any, **kwargs: Any) -> bytes:
    """A pickled dict-form request for command ``name``."""
    return pickle.dumps({"cmd": name, "args": list(args), "kwargs": kwargs}, protocol=4)
