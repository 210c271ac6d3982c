"""Shared by the tests that run against the real CGSE services: whether they can run here (in CI they must),
and one bounded wait."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import pytest
import refenv

#: In CI (or with PROCMAN_REQUIRE_REF=1) a missing reference environment fails the run instead of skipping.
REQUIRE = os.environ.get("CI") == "true" or os.environ.get("PROCMAN_REQUIRE_REF") == "1"


def unavailable_reason(*, ours: bool) -> str | None:
    """Why the reference tests cannot run here (None: they can). ``ours``: they also need our ``pm_cs``."""
    try:
        refenv.ref_python()
        if ours:
            from ourdaemon import pm_cs_binary

            pm_cs_binary()
    except (refenv.RefEnvError, RuntimeError) as exc:
        return str(exc)
    if not refenv.in_private_netns():
        return "not inside a private network namespace with only lo: run through scripts/in-netns.sh"
    return None


def refenv_marks(*, ours: bool = True, slow: bool = False) -> list[pytest.MarkDecorator]:
    """The ``pytestmark`` of a reference-services test module: skipped where it cannot run, failed in CI."""
    reason = unavailable_reason(ours=ours)
    if reason and REQUIRE:
        pytest.fail(f"reference environment required but unavailable: {reason}", pytrace=False)
    marks = [pytest.mark.refenv, pytest.mark.skipif(reason is not None, reason=reason or "")]
    if slow:
        marks.append(pytest.mark.slow)
    return marks


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy, which is returned; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
