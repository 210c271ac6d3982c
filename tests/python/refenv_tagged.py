"""Exact, JSON-able ("tagged") representation of Python values.

Standard library only. The same module is used in two interpreters:

* in the reference venv (cgse-core installed), where ``refenv.run_ref_json`` prepends an import of this file to the
  snippet it runs, so ``emit(value)`` prints the tagged form of a value computed by the original CGSE code;
* in our pytest venv, where tests tag the values produced by our own implementation and compare.

Two values are "the same" when ``canonical(a) == canonical(b)``: the canonical string keeps the difference between
tuple and list, int, float and bool, ``None``, dict order, and the class of every object.

Tagged form (``to_tagged``):

============================  ==========================================================================
Python value                  tagged
============================  ==========================================================================
``None``, ``bool``, ``str``   unchanged (JSON null / true / false / string)
``int``                       unchanged (JSON integer, arbitrary size)
``float``                     unchanged when finite, else ``{"__float__": "nan" | "inf" | "-inf"}``
``list``                      JSON array of tagged items
``tuple``                     ``{"__tuple__": [items]}``
``dict`` with str keys        JSON object in insertion order, when no key starts with ``"__"``
other ``dict``                ``{"__dict__": [[key, value], ...]}`` (tagged keys and values, in order)
``set`` / ``frozenset``       ``{"__set__" | "__frozenset__": [items sorted by canonical form]}``
``bytes`` / ``bytearray``     ``{"__bytes__" | "__bytearray__": "<hex>"}``
class, function               ``{"__global__": "module.qualname"}``
any other object              ``{"__class__": "module.qualname", "args": [...], "state": ...}`` from
                              ``__reduce_ex__(4)``; ``"items"`` / ``"list"`` are added for dict and list
                              subclasses (their dict items / list items, tagged)
============================  ==========================================================================

For example ``Failure("boom")`` becomes
``{"__class__": "egse.response.Failure", "args": ["boom"], "state": {"message": "boom", "cause": null}}``.
"""

from __future__ import annotations

import copyreg
import json
import math
import types
from typing import Any

__all__ = ["MARKER", "canonical", "emit", "from_tagged", "to_tagged"]

MARKER = "REFENV-JSON:"
"""Prefix of the stdout line printed by ``emit``; ``refenv.run_ref_json`` looks for it on the last line."""

_GLOBAL_TYPES = (type, types.FunctionType, types.BuiltinFunctionType, types.MethodDescriptorType)


def _qualified_name(obj: Any) -> str:
    module = getattr(obj, "__module__", None) or "builtins"
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or repr(obj)
    return f"{module}.{name}"


def to_tagged(value: Any, _active: frozenset[int] = frozenset()) -> Any:
    """Return the tagged (JSON-able, exact) form of ``value``. See the module docstring."""
    if value is None or type(value) in (bool, str):
        return value
    if type(value) is int:
        return value
    if type(value) is float:
        if math.isnan(value):
            return {"__float__": "nan"}
        if math.isinf(value):
            return {"__float__": "inf" if value > 0 else "-inf"}
        return value

    if id(value) in _active:
        return {"__cycle__": _qualified_name(type(value))}
    active = _active | {id(value)}

    kind = type(value)
    if kind is list:
        return [to_tagged(item, active) for item in value]
    if kind is tuple:
        return {"__tuple__": [to_tagged(item, active) for item in value]}
    if kind is dict:
        if all(isinstance(key, str) and not key.startswith("__") for key in value):
            return {key: to_tagged(item, active) for key, item in value.items()}
        return {"__dict__": [[to_tagged(key, active), to_tagged(item, active)] for key, item in value.items()]}
    if kind in (set, frozenset):
        items = sorted((to_tagged(item, active) for item in value), key=canonical)
        return {"__set__" if kind is set else "__frozenset__": items}
    if kind in (bytes, bytearray):
        return {"__bytes__" if kind is bytes else "__bytearray__": bytes(value).hex()}
    if isinstance(value, _GLOBAL_TYPES):
        return {"__global__": _qualified_name(value)}
    return _tag_object(value, active)


def _tag_object(value: Any, active: frozenset[int]) -> dict[str, Any]:
    try:
        reduced = value.__reduce_ex__(4)
    except Exception as exc:  # noqa: BLE001 - an unpicklable object is still described
        return {"__class__": _qualified_name(type(value)), "repr": repr(value), "error": f"{type(exc).__name__}"}
    if isinstance(reduced, str):
        return {"__global__": f"{getattr(value, '__module__', 'builtins')}.{reduced}"}

    func, args, *rest = reduced
    rest += [None] * (4 - len(rest))
    state, list_items, dict_items = rest[0], rest[1], rest[2]
    kwargs: dict[str, Any] | None = None
    if func is getattr(copyreg, "__newobj__", None):
        cls, args = args[0], args[1:]
    elif func is getattr(copyreg, "__newobj_ex__", None):
        cls, args, kwargs = args
    elif isinstance(func, type):
        cls = func
    else:
        cls = type(value)
        args = (func, *args)

    tagged: dict[str, Any] = {"__class__": _qualified_name(cls), "args": [to_tagged(arg, active) for arg in args]}
    if kwargs:
        tagged["kwargs"] = to_tagged(dict(kwargs), active)
    tagged["state"] = to_tagged(state, active)
    if list_items is not None:
        tagged["list"] = [to_tagged(item, active) for item in list_items]
    if dict_items is not None:
        tagged["items"] = [[to_tagged(key, active), to_tagged(item, active)] for key, item in dict_items]
    return tagged


def canonical(tagged: Any) -> str:
    """Canonical JSON text of an already tagged value (keeps key order; ``1``, ``1.0`` and ``true`` differ)."""
    return json.dumps(tagged, ensure_ascii=True, separators=(",", ":"), allow_nan=False)


def from_tagged(tagged: Any) -> Any:
    """Rebuild plain Python values from a tagged form.

    Containers and scalars come back exactly (tuple, dict with any keys, set, bytes, non-finite floats). Objects are
    not re-created: a ``{"__class__": ...}`` or ``{"__global__": ...}`` node is returned as a dict with its parts
    converted, so it can still be inspected or compared.
    """
    if isinstance(tagged, list):
        return [from_tagged(item) for item in tagged]
    if not isinstance(tagged, dict):
        return tagged
    if len(tagged) == 1:
        ((key, body),) = tagged.items()
        if key == "__tuple__":
            return tuple(from_tagged(item) for item in body)
        if key == "__dict__":
            return {_hashable(from_tagged(k)): from_tagged(v) for k, v in body}
        if key == "__set__":
            return {_hashable(from_tagged(item)) for item in body}
        if key == "__frozenset__":
            return frozenset(_hashable(from_tagged(item)) for item in body)
        if key == "__bytes__":
            return bytes.fromhex(body)
        if key == "__bytearray__":
            return bytearray.fromhex(body)
        if key == "__float__":
            return float(body)
    return {key: from_tagged(item) for key, item in tagged.items()}


def _hashable(value: Any) -> Any:
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=False)
    if isinstance(value, list):
        return tuple(_hashable(item) for item in value)
    return value


def emit(value: Any) -> None:
    """Print the tagged form of ``value`` as the last stdout line, prefixed with ``MARKER``."""
    print(MARKER + canonical(to_tagged(value)), flush=True)
