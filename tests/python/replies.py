"""The typed way for a test to say "this reply is not a ``Failure``": the stubs type every command's reply as
``T | Failure``, and a test that indexes a reply states first that it succeeded."""

from __future__ import annotations

from typing import TypeVar

from egse.procman import Failure

T = TypeVar("T")


def ok(reply: T | Failure) -> T:
    """``reply`` itself, after asserting it is not a ``Failure`` (whose message the assertion shows)."""
    assert not isinstance(reply, Failure), reply
    return reply
