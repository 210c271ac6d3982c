"""Our proxy and CLI against the ORIGINAL Python pm_cs (cgse-core 0.25.11), compared with the original proxy.

The original services run under the reference venv through the harness of ``refenv.py`` (registry, notify hub,
storage, configuration and process manager, with the example Setup), inside a private network namespace:

    PROCMAN_REF_PYTHON=<ref venv>/bin/python unshare -n sh -c \\
        'ip link set lo up; .venv/bin/python -m pytest tests/python/test_proxy_vs_original.py'

Every value our ``ProcessManagerProxy`` gets must equal, exactly (tuple vs list, int vs float, key order), what the
original ``egse.procman.ProcessManagerProxy`` gets from the same server: the wire is the same in both directions.
Skipped without the reference venv or outside a private namespace; failing instead when ``CI=true`` or
``PROCMAN_REQUIRE_REF=1``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from egse.procman import ProcessManagerProxy, ServiceProxy, StatusCommand
from gate import refenv_marks
from ourdaemon import our_cli
from replies import ok

refenv = pytest.importorskip("refenv", reason="the reference-services harness (tests/python/refenv.py) is absent")
CgseEnv = refenv.CgseEnv

pytestmark = refenv_marks(ours=False)

# What both proxies are asked, as one snippet of the original's API (ours is the same API).
QUESTIONS = """
with ProcessManagerProxy({args}) as pm:
    answers = {{
        "ping": pm.ping(),
        "commands": pm.get_commands(),
        "commanding_port": pm.get_commanding_port(),
        "monitoring_port": pm.get_monitoring_port(),
        "service_port": pm.get_service_port(),
        "ip": pm.get_ip_address(),
        "core": pm.get_core_processes(),
        "devices": pm.get_devices(),
        "device_ids": pm.get_device_ids(),
        "sm_status": pm.get_core_service_status(StatusCommand("Storage Manager", [], "sm_cs")),
        "unknown": pm.send("no_such_command"),
    }}
"""


def same(tagged: Any, value: Any) -> bool:
    return bool(refenv.canonical(tagged) == refenv.canonical(refenv.to_tagged(value)))


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with CgseEnv(tmp_path_factory.mktemp("original")) as env:
        env.start_core(("registry", "nh", "sm", "cm", "pm"), timeout=30)
        yield env


def _ours(port: int) -> dict[str, Any]:
    scope: dict[str, Any] = {"ProcessManagerProxy": ProcessManagerProxy, "StatusCommand": StatusCommand}
    exec(QUESTIONS.format(args=f"'tcp', 'localhost', {port}"), scope)  # noqa: S102 - the same snippet runs in both venvs
    answers: dict[str, Any] = scope["answers"]
    return answers


def _theirs(env: Any) -> Any:
    code = "from egse.procman import ProcessManagerProxy, StatusCommand\n" + QUESTIONS.format(args="") + "emit(answers)"
    return env.run_json(code, timeout=60)


@pytest.mark.timeout(120)
def test_the_same_answers_as_the_original_proxy(original: Any) -> None:
    theirs = _theirs(original)
    ours = _ours(original.ports.pm_cmd)
    # A Failure is compared by its message (our class is egse.procman.Failure, theirs egse.response.Failure).
    unknown_theirs = theirs.pop("unknown")
    unknown_ours = ours.pop("unknown")
    assert unknown_theirs["__class__"] == "egse.response.Failure"
    assert unknown_ours.message == unknown_theirs["state"]["message"] == "Invalid command: no_such_command"
    assert same(theirs, ours), f"\n theirs: {refenv.from_tagged(theirs)}\n ours:   {ours}"
    assert ours["commanding_port"] == original.ports.pm_cmd
    assert ours["devices"]["PUNA Hexapod"] == ("class//egse.hexapod.symetrie.puna.PunaProxy", "PUNA_01", ["PUNA_01"])


@pytest.mark.timeout(120)
def test_the_service_port_of_the_original(original: Any) -> None:
    with ServiceProxy(hostname="localhost", port=original.ports.pm_srv) as svc:
        ours = {"commands": svc.get_commands(), "module": svc.get_cs_module(), "mnemonic": svc.get_storage_mnemonic()}
        status = ok(svc.get_process_status())
    theirs = original.run_json(
        "from egse.services import ServiceProxy\n"
        f"with ServiceProxy(hostname='localhost', port={original.ports.pm_srv}) as svc:\n"
        "    emit({'commands': svc.get_commands(), 'module': svc.get_cs_module(), "
        "'mnemonic': svc.get_storage_mnemonic()})\n",
        timeout=60,
    )
    assert same(theirs, ours)
    assert status["PID"] == original.get("pm").pid


def _our_cli(env: Any, command: str) -> subprocess.CompletedProcess[str]:
    """Our ``python -m egse.procman.procman_cs <command>`` with the original site's settings."""
    return our_cli(env, command, program=[sys.executable, "-m", "egse.procman.procman_cs"], timeout=60)


@pytest.mark.timeout(120)
def test_our_cli_against_the_original(original: Any) -> None:
    rc, theirs, _ = original.cli(["pm_cs", "status"], timeout=60)
    ours = _our_cli(original, "status")
    assert (ours.returncode, ours.stdout) == (rc, theirs)
    # Last: our `stop` sends quit_server through our ServiceProxy; the original pm_cs must exit normally.
    ours = _our_cli(original, "stop")
    assert (ours.returncode, ours.stdout) == (0, "Sending 'quit' command to process manager..\n")
    assert original.get("pm").wait_exit(10) == 0
