"""ProcessManagerProxy, ServiceProxy and Proxy against our daemon and against scripted servers."""

from __future__ import annotations

import gc
import io
import logging
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import Any

import pytest
from conftest import PORTS, Daemon, free_port
from egse import procman
from egse.procman import (
    DynamicCommand,
    Failure,
    GlobalRef,
    ProcessManagerProxy,
    Proxy,
    RemoteObject,
    ServiceProxy,
    StartCommand,
    StatusCommand,
    StopCommand,
)
from fakeserver import FakeServer, answering, failure_pickle, plain
from replies import ok

# The seven commands of the original, in its order, then procman's own (docs/PROCESSES.md).
PM_COMMANDS = [
    "get_core_processes",
    "get_devices",
    "get_device_ids",
    "start_process",
    "stop_process",
    "get_core_service_status",
    "get_device_process_status",
    "list_processes",
    "restart_process",
    "get_process_log",
    "reload",
    "get_integration_status",
]
SERVICE_COMMANDS = [
    "set_monitoring_frequency",
    "set_hk_frequency",
    "set_logging_level",
    "quit_server",
    "get_process_status",
    "get_cs_module",
    "get_average_execution_times",
    "get_storage_mnemonic",
    "add_listener",
    "remove_listener",
    "get_listener_names",
    "register_to_storage",
]
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "protocol"


# --- against our daemon -----------------------------------------------------------------------------------


def test_defaults_come_from_the_settings(daemon: Daemon) -> None:
    pm = ProcessManagerProxy()
    assert pm.get_endpoint() == f"tcp://localhost:{PORTS.commanding}"
    assert repr(pm) == f"<ProcessManagerProxy tcp://localhost:{PORTS.commanding}>"
    explicit = ProcessManagerProxy("tcp", "127.0.0.1", PORTS.commanding, 2.0)
    assert explicit.get_endpoint() == f"tcp://127.0.0.1:{PORTS.commanding}"
    assert explicit.ping()


def test_commands_become_methods_with_name_and_doc(daemon: Daemon) -> None:
    pm = ProcessManagerProxy()
    assert pm.has_commands()
    assert pm.get_commands() == PM_COMMANDS
    for name in PM_COMMANDS:
        method = getattr(pm, name)
        assert isinstance(method, DynamicCommand)
        assert method.__name__ == name
        assert method.__doc__ is not None and method.__doc__.startswith(f"usage: {name}(nargs=")
    assert pm.start_process.__doc__ == (
        "usage: start_process(nargs=1, keys=['start_cmd'])\n       args & kwargs can be mixed (limited)\nStarts a process\n"
    )
    # The class keeps its stubs; only this instance got the commands.
    assert isinstance(pm.get_core_processes, DynamicCommand)
    assert not isinstance(ProcessManagerProxy.get_core_processes, DynamicCommand)


def test_context_manager(daemon: Daemon) -> None:
    pm = ProcessManagerProxy()
    with pm as entered:
        assert entered is pm
        assert pm.is_cs_connected()
    # After the context the connection is closed; a request reconnects.
    assert pm.ping()


def test_connection_methods(daemon: Daemon) -> None:
    pm = ProcessManagerProxy()
    pm.disconnect_cs()
    assert pm.ping(), "a request after disconnect_cs reconnects"
    pm.connect_cs()
    assert pm.ping()
    pm.reconnect_cs()
    assert pm.is_cs_connected()
    pm.reset_cs_connection()
    assert pm.is_cs_connected()
    assert pm.load_commands() is True
    assert pm.has_commands()


def test_send_builtins_and_failures(daemon: Daemon) -> None:
    with ProcessManagerProxy() as pm:
        assert pm.send("Ping") == "Pong"
        assert pm.send({"cmd": "get_service_port"}) == PORTS.service
        assert pm.send("get_storage_mnemonic") == "PM"
        failure = pm.send("foo")
        assert isinstance(failure, Failure) and isinstance(failure, Exception)
        assert failure.message == "Invalid command: foo"
        assert str(failure) == "Invalid command: foo"
        assert failure.successful is False
        assert failure.cause is None
        assert failure.args == ("Invalid command: foo",)
        assert pm.send(42).message == "Invalid command: None"


def test_ports_and_ip_address(daemon: Daemon) -> None:
    with ProcessManagerProxy() as pm:
        assert pm.get_commanding_port() == PORTS.commanding
        assert pm.get_monitoring_port() == PORTS.monitoring
        assert pm.get_service_port() == PORTS.service
        ip = pm.get_ip_address()
        assert ip is None or isinstance(ip, str)


def test_process_manager_commands(daemon: Daemon) -> None:
    with ProcessManagerProxy() as pm:
        assert pm.get_core_processes() == {
            "Configuration Manager": "CM_CS",
            "Logger": "LOG_CS",
            "Metrics Hub": "MH_CS",
            "Notification Hub": "NH_CS",
            "Process Manager": "PM_CS",
            "Storage Manager": "SM_CS",
        }
        assert pm.get_devices() == {}
        assert pm.get_device_ids() == {}
        # The process commands need the supervisor, which is configured elsewhere: whatever the daemon
        # answers (None, a dict, a Failure), the request and its arguments must make the round trip.
        for reply in (
            pm.start_process(StartCommand("X", "true", [], False)),
            pm.stop_process(StopCommand("X", [], "true")),
            pm.get_core_service_status(StatusCommand("X", [], "true")),
            pm.get_device_process_status(status_cmd=StatusCommand("X", None, "true")),
        ):
            assert reply is None or isinstance(reply, (dict, Failure)), reply


def test_get_status_answers_what_pm_cs_status_shows(daemon: Daemon) -> None:
    with ProcessManagerProxy() as pm:
        status = ok(pm.get_status())
        assert not isinstance(status, Failure), status
        integration = ok(pm.get_integration_status())
        listing = ok(pm.list_processes())
        address = pm.get_ip_address()
    assert set(status) == {
        "hostname",
        "commanding_port",
        "monitoring_port",
        "service_port",
        "registry",
        "setup",
        "housekeeping",
        "processes",
        "process_count",
        "logger",
        "metrics",
    }
    assert status["hostname"] == address
    assert (status["commanding_port"], status["monitoring_port"], status["service_port"]) == (
        PORTS.commanding,
        PORTS.monitoring,
        PORTS.service,
    )
    assert status["registry"] == integration["registry"] and status["registry"].startswith("Service Registry")
    assert status["setup"] == integration["setup"]
    assert status["housekeeping"] == integration["storage"]
    states: dict[str, int] = {}
    for record in listing["processes"]:
        states[record["state"]] = states.get(record["state"], 0) + 1
    assert status["processes"] == states
    assert status["process_count"] == len(listing["processes"]) == sum(states.values())
    assert status["logger"] == integration.get("logger") and status["metrics"] == integration.get("metrics")
    # The module-level function keeps the original's text.
    assert procman.get_status().startswith("Process Manager:\n    Status: [green]active[/]\n")


def test_get_status_needs_the_announced_commands() -> None:
    # A control server that is not procman: it answers the address requests, but announces no
    # get_integration_status / list_processes.
    replies = {"send_commands": {}, "get_ip_address": "127.0.0.1", "get_commanding_port": 1}
    with FakeServer(answering(replies)) as srv:
        pm = ProcessManagerProxy(protocol="tcp", hostname="127.0.0.1", port=srv.port, timeout=2.0)
        reply = pm.get_status()
    assert isinstance(reply, Failure)
    assert "does not announce" in reply.message


def test_argument_validation_logs_and_returns_none(daemon: Daemon, caplog: pytest.LogCaptureFixture) -> None:
    pm = ProcessManagerProxy()
    with caplog.at_level(logging.ERROR, logger="egse.procman"):
        assert pm.get_core_processes(1, 2) is None  # type: ignore[call-arg]
        assert pm.start_process() is None  # type: ignore[call-arg]
    assert "Expected 0 arguments for command get_core_processes, got 2 arguments." in caplog.messages
    assert "Expected 1 arguments for command start_process, got 0 arguments." in caplog.messages


def test_service_proxy(daemon: Daemon) -> None:
    pm = ProcessManagerProxy()
    with pm.get_service_proxy() as svc:
        assert isinstance(svc, ServiceProxy)
        assert svc.get_endpoint() == f"tcp://localhost:{PORTS.service}"
        assert svc.get_commands() == SERVICE_COMMANDS
        assert svc.get_cs_module() == "egse.procman.procman_cs"
        assert svc.get_storage_mnemonic() == "PM"
        status = ok(svc.get_process_status())
        assert isinstance(status["UUID"], uuid.UUID)
        assert status["PID"] == daemon.pid
        assert svc.add_listener({"name": "pytest", "proxy": ProcessManagerProxy}) == ("ACK",)
        assert svc.get_listener_names() == (["pytest"],)
        nack = ok(svc.add_listener({"name": "pytest"}))
        assert nack[0] == "NACK" and isinstance(nack[1], ValueError)
        assert svc.remove_listener({"name": "pytest"}) == ("ACK",)
        commands = svc.send("send_commands")
        quit_cmd = commands["quit_server"]
        assert isinstance(quit_cmd, RemoteObject)
        assert (quit_cmd.module, quit_cmd.qualname) == ("egse.services", "ServiceCommand")
        assert quit_cmd._name == "quit_server"  # type: ignore[attr-defined]
        assert quit_cmd.state["_response"] == GlobalRef("egse.services", "ServiceProtocol.handle_quit")
    by_type = ServiceProxy(service_type=procman.SERVICE_TYPE)
    assert by_type.get_endpoint() == f"tcp://localhost:{PORTS.service}"
    assert by_type.has_commands()


def test_the_command_table_objects(daemon: Daemon) -> None:
    table = ProcessManagerProxy().send("send_commands")
    assert list(table) == PM_COMMANDS
    cmd = table["get_devices"]
    assert isinstance(cmd, procman.ProcessManagerCommand)
    assert cmd.get_name() == "get_devices"
    assert cmd._device_method == GlobalRef("egse.procman", "ProcessManagerController.get_devices")
    assert (cmd.__doc__ or "").startswith("usage: get_devices(nargs=0, keys=[])")


def test_proxies_are_garbage_collected(daemon: Daemon) -> None:
    pm = ProcessManagerProxy()
    ref = weakref.ref(pm)
    method = pm.get_devices
    del pm
    gc.collect()
    assert ref() is not None, "a bound command keeps its proxy alive"
    del method
    gc.collect()
    assert ref() is None


# --- without a server ---------------------------------------------------------------------------------------


def test_not_running() -> None:
    port = free_port()
    started = time.monotonic()
    pm = ProcessManagerProxy(port=port, timeout=0.5)
    assert time.monotonic() - started < 3
    assert not pm.has_commands()
    assert pm.get_commands() == []
    with pytest.raises(NotImplementedError):
        pm.get_core_processes()
    with pytest.raises(NotImplementedError):
        pm.start_process(StartCommand("X", "true", []))
    with pytest.raises(ConnectionError) as info, pm:
        pass
    assert str(info.value) == "Proxy is not connected when entering the context."
    reply = pm.send("get_devices")
    assert isinstance(reply, Failure)
    assert reply.message == "Control Server seems to be off-line, abandoning (get_devices)"
    assert not pm.ping()
    assert not pm.is_cs_connected()
    assert pm.load_commands() is False


def test_port_zero_needs_the_registry() -> None:
    with pytest.raises(RuntimeError):
        ProcessManagerProxy(port=0)


def test_service_proxy_arguments() -> None:
    with pytest.raises(ValueError, match="No service_type or hostname/port information provided"):
        ServiceProxy()
    with pytest.raises(RuntimeError, match="No service registered as XX_CS"):
        ServiceProxy(service_type="XX_CS")
    with pytest.raises(ValueError):
        Proxy("no endpoint")


# --- against scripted servers ---------------------------------------------------------------------------------


def _unanswered_once(name: str, replies: dict[str, Any]) -> Any:
    """A handler that leaves the first ``name`` request unanswered and answers everything else."""
    answer = answering(replies)
    skipped: list[bytes] = []

    def handle(raw: bytes) -> bytes | None:
        if plain(raw) == name and not skipped:
            skipped.append(raw)
            return None
        return answer(raw)

    return handle


def test_timeout_returns_the_failure_and_leaves_the_proxy_usable() -> None:
    with FakeServer(_unanswered_once("get_devices", {"get_devices": {"a": 1}, "send_commands": {}})) as srv:
        p = Proxy(srv.endpoint, timeout=0.5)
        started = time.monotonic()
        reply = p.send("get_devices")
        elapsed = time.monotonic() - started
        assert isinstance(reply, Failure)
        assert reply.message == "Control Server seems to be off-line, abandoning (get_devices)"
        assert 0.4 < elapsed < 3.0
        assert p.send("get_devices") == {"a": 1}
        assert p.ping()


def test_retries_resend_after_a_timeout() -> None:
    with FakeServer(_unanswered_once("get_devices", {"get_devices": {"a": 1}, "send_commands": {}})) as srv:
        p = Proxy(srv.endpoint, timeout=5.0)
        assert p.send("get_devices", retries=1, timeout=0.3) == {"a": 1}
        assert [plain(r) for r in srv.requests].count("get_devices") == 2


def test_get_service_proxy_raises_the_failure() -> None:
    def handle(raw: bytes) -> bytes | None:
        if plain(raw) == "get_service_port":
            return failure_pickle("Invalid command: get_service_port")
        return answering({"send_commands": {}})(raw)

    with FakeServer(handle) as srv:
        p = Proxy(srv.endpoint, timeout=2.0)
        with pytest.raises(Failure, match="Invalid command: get_service_port"):
            p.get_service_proxy()


SAMPLE: dict[Any, Any] = {
    "none": None,
    "true": True,
    "false": False,
    "int": 42,
    "negative": -7,
    "i64 max": 2**63 - 1,
    "i64 min": -(2**63),
    "big": 2**100 + 1,
    "negative big": -(2**70),
    "float": 2.5,
    "str": "héllo wörld",
    "long str": "x" * 300,
    "bytes": b"\x00\x01\xff",
    "bytearray": bytearray(b"xy"),
    "list": [1, (2, 3), [4]],
    "ack": ("ACK",),
    "empty tuple": (),
    "set": {1, 2, 3},
    "frozenset": frozenset({"a"}),
    "nested": {"k": [{"x": None}]},
    (1, "two"): "tuple key",
    7: "int key",
    "uuid": uuid.UUID("d2692ef9-e99c-11f1-a127-b3c8dcc4cbac"),
}


class _Mapped(pickle.Unpickler):
    """Python's view of what we send: the wire classes mapped onto ours, nothing else importable."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("uuid", "UUID"):
            return uuid.UUID
        if module == "egse.response" and name in ("Failure", "Success", "Message"):
            return getattr(procman, name)
        if module == "egse.procman" and name in ("StartCommand", "StopCommand", "StatusCommand"):
            return getattr(procman, name)
        if module == "builtins" and name in ("ValueError", "TypeError", "KeyError"):
            return getattr(__import__("builtins"), name)
        return ("global", module, name)  # any other reference stays a name


def _echo_server() -> tuple[FakeServer, list[Any]]:
    seen: list[Any] = []
    answer = answering({"send_commands": {}})

    def handle(raw: bytes) -> bytes | None:
        if plain(raw) not in ("Ping", "send_commands"):
            try:
                seen.append(_Mapped(io.BytesIO(raw)).load())
            except Exception as exc:  # noqa: BLE001 - reported through `seen`
                seen.append(exc)
        return answer(raw)

    return FakeServer(handle), seen


def test_values_make_the_round_trip() -> None:
    srv, seen = _echo_server()
    with srv:
        p = Proxy(srv.endpoint, timeout=5.0)
        back = p.send(SAMPLE)
        assert back == SAMPLE
        assert seen == [SAMPLE], "Python's pickle reads what we send"
        for key in ("ack", "empty tuple", "list"):
            assert type(back[key]) is type(SAMPLE[key])
        assert type(back["bytearray"]) is bytearray and type(back["frozenset"]) is frozenset
        assert list(back) == list(SAMPLE), "dict order is kept"


def test_our_objects_make_the_round_trip() -> None:
    srv, seen = _echo_server()
    start = StartCommand("DUMMY", "dummy_cs", ["dummy-1"], True)
    status = StatusCommand("SM")
    failure = Failure("Executing x failed", ValueError("bad"))
    success = procman.Success("stored", 3)
    with srv:
        p = Proxy(srv.endpoint, timeout=5.0)
        back = p.send([start, status, failure, success, ProcessManagerProxy, GlobalRef("a.b", "C.d")])
    b_start, b_status, b_failure, b_success, b_class, b_global = back
    assert type(b_start) is StartCommand and b_start.__dict__ == start.__dict__
    assert list(b_start.__dict__) == ["_device_id", "_cgse_cmd", "_device_args", "_is_simulator_mode"]
    assert b_start.cmd == "dummy_cs start dummy-1 --sim"
    assert type(b_status) is StatusCommand and b_status.cmd == "None status"
    assert isinstance(b_failure, Failure) and b_failure.message == "Executing x failed: bad"
    assert isinstance(b_failure.cause, ValueError) and b_failure.cause.args == ("bad",)
    assert isinstance(b_success, procman.Success) and b_success.return_code == 3
    assert b_class == GlobalRef("egse.procman", "ProcessManagerProxy")
    assert b_global == GlobalRef("a.b", "C.d")
    # What a Python server unpickles from our bytes.
    (py_start, py_status, py_failure, py_success, *_rest) = seen[0]
    assert type(py_start) is StartCommand and py_start.__dict__ == start.__dict__
    assert py_status.__dict__ == status.__dict__
    assert py_failure.message == failure.message and repr(py_failure.args) == repr(failure.args)
    assert py_success.__dict__ == success.__dict__
    assert _rest == [("global", "egse.procman", "ProcessManagerProxy"), ("global", "a.b", "C.d")]


def test_unknown_classes_stay_data_and_are_never_imported(tmp_path: Path) -> None:
    marker = tmp_path / "imported"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    evil = pickle.dumps(Evil())

    def handle(raw: bytes) -> bytes | None:
        if plain(raw) == "evil":
            return evil
        return answering({"send_commands": {}})(raw)

    with FakeServer(handle) as srv:
        p = Proxy(srv.endpoint, timeout=5.0)
        reply = p.send("evil")
        assert isinstance(reply, RemoteObject)
        assert reply.module in ("posix", "os") and reply.qualname == "system"
        assert reply.args == (f"touch {marker}",)
        assert p.send(reply) == reply, "sent back unchanged"
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_replies_pickled_by_cpython_decode(protocol: int) -> None:
    def handle(raw: bytes) -> bytes | None:
        if plain(raw) == "sample":
            return pickle.dumps(SAMPLE, protocol=protocol)
        return answering({"send_commands": {}})(raw)

    with FakeServer(handle) as srv:
        assert Proxy(srv.endpoint, timeout=5.0).send("sample") == SAMPLE


def test_replies_of_the_original_server_decode() -> None:
    replies = {
        "failure": (FIXTURES / "cmd_controller_raises_statuscmd_none.rep.pickle").read_bytes(),
        "status": (FIXTURES / "svc_get_process_status.rep.pickle").read_bytes(),
        "devices": (FIXTURES / "cmd_get_devices.rep.pickle").read_bytes(),
    }

    def handle(raw: bytes) -> bytes | None:
        request = plain(raw)
        if request in replies:
            return replies[request]
        return answering({"send_commands": {}})(raw)

    with FakeServer(handle) as srv:
        p = Proxy(srv.endpoint, timeout=5.0)
        failure = p.send("failure")
        assert isinstance(failure, Failure)
        assert failure.message == "Executing get_core_service_status failed: : object of type 'NoneType' has no len()"
        assert isinstance(failure.cause, TypeError)
        assert isinstance(p.send("status")["UUID"], uuid.UUID)
        assert p.send("devices") == {"Dummy Device": ("class//egse.dummy.DummyProxy", "DUMMY", ["dummy-1"])}


def test_arguments_that_cannot_travel_are_refused() -> None:
    with FakeServer(answering({"send_commands": {}})) as srv:
        p = Proxy(srv.endpoint, timeout=5.0)
        with pytest.raises(TypeError, match="cannot send an object of type 'object'"):
            p.send(object())
        recursive: list[Any] = []
        recursive.append(recursive)
        with pytest.raises(ValueError, match="nested deeper"):
            p.send(recursive)
        with pytest.raises(TypeError, match="cannot be referenced by name"):
            p.send(lambda: None)


# --- GIL and Ctrl-C ------------------------------------------------------------------------------------------


def test_a_blocking_send_releases_the_gil() -> None:
    with FakeServer(lambda raw: None) as srv:
        p = Proxy.__new__(Proxy, srv.endpoint, 5.0)  # type: ignore[call-arg]  # no handshake: the server is silent
        beats: list[float] = []
        stop = threading.Event()

        def spin() -> None:
            while not stop.is_set():
                beats.append(time.monotonic())
                time.sleep(0.001)

        t = threading.Thread(target=spin)
        t.start()
        started = time.monotonic()
        reply = p.send("get_devices", timeout=2.0)
        ended = time.monotonic()
        stop.set()
        t.join()
    assert isinstance(reply, Failure)
    during = [b for b in beats if started <= b <= ended]
    gaps = [b - a for a, b in zip([started, *during], [*during, ended], strict=True)]
    # Had send() held the GIL, the other thread would not have run at all during the 2 s wait; half of it
    # leaves a busy machine room to deschedule the thread now and then.
    assert max(gaps) < 1.0, f"the other thread stalled for {max(gaps):.3f} s while send() waited"


def test_ctrl_c_interrupts_a_blocking_send() -> None:
    asked = threading.Event()

    def silent(raw: bytes) -> None:
        # Only the request the child blocks in: the proxy's own hand-shake comes first, and a Ctrl-C sent
        # then lands outside the child's try block.
        if b"get_devices" in raw:
            asked.set()

    with FakeServer(silent) as srv:  # the request arrives, no reply ever comes
        code = textwrap.dedent(
            f"""
            import sys, time
            from egse.procman import Failure, Proxy
            p = Proxy({srv.endpoint!r}, timeout=60.0)
            print("ready", flush=True)
            started = time.monotonic()
            try:
                p.send("get_devices")
            except KeyboardInterrupt:
                print(f"interrupted after {{time.monotonic() - started:.3f}}", flush=True)
                # The proxy is still usable: this request times out normally.
                print(type(p.send("Ping", timeout=0.3)).__name__, flush=True)
                sys.exit(42)
            print("not interrupted", flush=True)
            sys.exit(1)
            """
        )
        child = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
            assert asked.wait(60), "the request never reached the server"
            child.send_signal(signal.SIGINT)
            rc = child.wait(60)
            out = child.stdout.read()
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            if child.stdout is not None:
                child.stdout.close()
    assert rc == 42, out
    assert "interrupted after" in out and "Failure" in out
    # Interrupted, not timed out: well before the proxy's 60 s timeout.
    waited = float(out.split("interrupted after ", 1)[1].split()[0])
    assert waited < 30, out
