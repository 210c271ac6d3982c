"""The module API of ``egse.procman``."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PORTS, ROOT, SETTINGS_FILE, Daemon, running_daemon
from egse import procman
from egse.procman import (
    Failure,
    Message,
    ProcessCommand,
    StartCommand,
    StatusCommand,
    StopCommand,
    Success,
    _native,
)


def test_constants_come_from_the_settings() -> None:
    assert procman.PROCESS_NAME == "pm_cs"
    assert procman.SERVICE_TYPE == "PM_CS"
    assert procman.PROTOCOL == "tcp"
    assert procman.HOSTNAME == "localhost"
    assert (procman.COMMANDING_PORT, procman.MONITORING_PORT, procman.SERVICE_PORT) == (
        PORTS.commanding,
        PORTS.monitoring,
        PORTS.service,
    )
    assert procman.STORAGE_MNEMONIC == "PM"
    assert procman.PROXY_TIMEOUT == 10.0
    assert procman.settings["COMMANDING_PORT"] == PORTS.commanding
    assert procman.settings.SERVICE_TYPE == "PM_CS", "attribute access, as on the original's Settings"
    with pytest.raises(AttributeError):
        _ = procman.settings.NO_SUCH_KEY


def test_the_settings_are_the_daemons() -> None:
    merged = _native.load_settings()
    assert merged["Process Manager Control Server"]["SERVICE_PORT"] == PORTS.service
    assert merged["Procman"]["SHUTDOWN_TIMEOUT"] == 2, "embedded defaults are merged in"
    assert _native.load_settings(SETTINGS_FILE) == merged
    defaults = subprocess.run(
        [
            sys.executable,
            "-c",
            "import egse.procman as m; print(m.COMMANDING_PORT, m.SERVICE_PORT, m.MONITORING_PORT, m.PROXY_TIMEOUT)",
        ],
        env={k: v for k, v in os.environ.items() if not k.startswith("CGSE_")},
        capture_output=True,
        text=True,
        check=True,
    )
    assert defaults.stdout.split() == ["6120", "6122", "6121", "10.0"]


def test_a_missing_local_settings_file_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(FileNotFoundError, match="CGSE_LOCAL_SETTINGS"):
        os.environ["CGSE_LOCAL_SETTINGS"] = str(missing)
        try:
            _native.load_settings()
        finally:
            os.environ["CGSE_LOCAL_SETTINGS"] = str(SETTINGS_FILE)


def test_egse_stays_a_namespace_package() -> None:
    import egse

    assert getattr(egse, "__file__", None) is None
    assert not (ROOT / "python" / "egse" / "__init__.py").exists()
    spec = importlib.util.find_spec("egse.procman._native")
    assert spec is not None and spec.origin is not None and spec.origin.endswith(".so")


def test_get_status_running(fresh_daemon: Daemon) -> None:
    status = procman.get_status()
    with procman.ProcessManagerProxy() as pm:
        ip = pm.get_ip_address()
    assert status == (
        "Process Manager:\n"
        "    Status: [green]active[/]\n"
        f"    Hostname: {ip}\n"
        f"    Monitoring port: {PORTS.monitoring}\n"
        f"    Commanding port: {PORTS.commanding}\n"
        f"    Service port: {PORTS.service}\n"
    )
    assert procman.is_process_manager_active()
    assert procman.is_process_manager_active(timeout=0.1)


def _stub_methods(cls: str) -> set[str]:
    tree = ast.parse((ROOT / "python" / "_cgse_procman" / "_native.pyi").read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return {n.name for n in node.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")}
    raise AssertionError(f"no class {cls} in the stubs")


def _placeholders(cls: type) -> set[str]:
    return {name for name, v in vars(cls).items() if not name.startswith("_") and callable(v)}


def test_command_names_agree_everywhere(fresh_daemon: Daemon) -> None:
    """``settings/commands.yaml`` (what the daemon announces) is the source; the native classes' placeholder
    methods (what a proxy has before it loads the commands) and the stubs list exactly those names."""
    with procman.ProcessManagerProxy() as pm:
        commanding = set(pm.get_commands())
        svc = pm.get_service_proxy()
    with svc:
        service = set(svc.get_commands())
    assert commanding and service
    # get_status is ours, answered from two commands on the client side (not a command of the server).
    assert _placeholders(_native.ProcessManagerProxy) - {"get_status"} == commanding
    assert _stub_methods("ProcessManagerProxy") - {"get_status"} == commanding
    assert _placeholders(_native.ServiceProxy) == service
    assert _stub_methods("ServiceProxy") == service


def test_get_status_not_running(no_daemon: object) -> None:
    started = time.monotonic()
    assert procman.get_status() == (
        "Process Manager Status: [red]not active[/] (Proxy is not connected when entering the context.)"
    )
    assert time.monotonic() - started < 5
    assert procman.is_process_manager_active(timeout=0.2) is False


def test_is_process_manager_active_follows_the_daemon() -> None:
    assert not procman.is_process_manager_active(0.2)
    with running_daemon():
        assert procman.is_process_manager_active()
    assert not procman.is_process_manager_active(0.2)


def test_process_commands() -> None:
    base = ProcessCommand("DUMMY", ["dummy-1"], "dummy_cs")
    assert (base.device_id, base.device_args) == ("DUMMY", ["dummy-1"])
    with pytest.raises(NotImplementedError):
        _ = base.cmd

    start = StartCommand("DUMMY", "dummy_cs", ["dummy-1", "x"])
    assert start.cmd == "dummy_cs start dummy-1"
    assert start.simulator_mode is False
    assert StartCommand("DUMMY", "dummy_cs", ["dummy-1"], is_simulator_mode=True).cmd == "dummy_cs start dummy-1 --sim"
    assert StartCommand("SM", "sm_cs", None, True).cmd == "sm_cs start --sim"
    assert StartCommand("SM", "sm_cs", []).cmd == "sm_cs start"
    assert list(start.__dict__) == ["_device_id", "_cgse_cmd", "_device_args", "_is_simulator_mode"]

    stop = StopCommand("DUMMY", ["dummy-1"], "dummy_cs")
    assert stop.cmd == "dummy_cs stop dummy-1"
    assert StopCommand("SM", [], "sm_cs").cmd == "sm_cs stop"
    assert list(stop.__dict__) == ["_device_id", "_cgse_cmd", "_device_args"]

    # The two upstream bugs, fixed: no list repr in the command, and None arguments are fine.
    assert StatusCommand("DUMMY", ["dummy-1"], "dummy_cs").cmd == "dummy_cs status dummy-1"
    assert StatusCommand("SM", [], "sm_cs").cmd == "sm_cs status"
    assert StatusCommand("SM", None, "sm_cs").cmd == "sm_cs status"
    assert StatusCommand("SM").device_args is None


def test_responses() -> None:
    cause = ValueError("bad")
    f = Failure("Executing x failed", cause)
    assert isinstance(f, Exception)
    assert (f.message, f.cause, f.successful) == ("Executing x failed: bad", cause, False)
    assert str(f) == "Executing x failed: bad"
    assert f.args == ("Executing x failed", cause)
    with pytest.raises(Failure):
        raise f
    s = Success("stored", 3)
    assert (s.message, s.return_code, s.response, s.successful) == ("stored: 3", 3, 3, True)
    assert Success("stored").message == "stored"
    m = Message("hello")
    assert (m.message, str(m), m.successful) == ("hello", "hello", True)


def test_public_names() -> None:
    for name in (
        "PROCESS_NAME",
        "SERVICE_TYPE",
        "PROTOCOL",
        "HOSTNAME",
        "COMMANDING_PORT",
        "SERVICE_PORT",
        "MONITORING_PORT",
        "STORAGE_MNEMONIC",
        "PROXY_TIMEOUT",
        "settings",
        "is_process_manager_active",
        "get_status",
        "ProcessCommand",
        "StartCommand",
        "StopCommand",
        "StatusCommand",
        "ProcessManagerCommand",
        "ProcessManagerProxy",
        "Failure",
    ):
        assert hasattr(procman, name), name
        assert name in procman.__all__, name
    assert procman.ProcessManagerProxy.__module__ == "egse.procman"
    assert procman.__version__ == _native.__version__


def test_send_commands_reply_unpickles_against_this_package(
    fresh_daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cgse-core's generic ``Proxy`` unpickles ``send_commands`` itself. Where this package provides
    ``egse.procman``, every reference in the pickle must resolve: the command class and the controller
    methods here, the response handler in cgse-core's ``egse.protocol`` (faked, as it is not installed)."""
    import pickle
    import types

    import zmq

    protocol = types.ModuleType("egse.protocol")

    class CommandProtocol:
        def handle_device_method(self) -> None: ...

    protocol.CommandProtocol = CommandProtocol  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "egse.protocol", protocol)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"tcp://127.0.0.1:{PORTS.commanding}")
        sock.send(pickle.dumps("send_commands"))
        assert sock.poll(5000), "no reply"
        table = pickle.loads(sock.recv())  # our own daemon, on loopback
    finally:
        sock.close()
        ctx.term()
    assert isinstance(table["get_devices"], procman.ProcessManagerCommand)
    assert table["get_devices"]._device_method is procman.ProcessManagerController.get_devices
    assert table["start_process"]._name == "start_process"
    assert table["list_processes"]._device_method is None
