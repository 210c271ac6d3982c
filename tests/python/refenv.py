"""Harness that runs the reference CGSE services (cgse-core 0.25.11) for our tests.

This module is imported by our pytest suite, which runs in a venv WITHOUT cgse-core. It therefore never imports
``egse``: it drives the reference venv (made by ``scripts/setup-ref-venv.sh``) through subprocesses. It needs only
the standard library and pyzmq (present in both venvs).

Main pieces:

* ``ref_python()``: the reference interpreter.
* ``free_port()`` / ``free_ports(n)``: TCP ports that are free on all interfaces, outside the ephemeral range.
* ``CgseEnv``: a throw-away CGSE site (data, conf, log, local settings) with start/stop of the real services.
* ``RefProcess``: one running service (pid, log files, ``wait_ready``, ``stop``, ``kill``, ``restart``).
* ``run_ref`` / ``run_ref_json`` / ``run_ref_cli``: run code or the original CLIs under the reference interpreter.
* ``netns_status()`` / ``in_private_netns()``: are we inside a private network namespace with only ``lo``?

The real services bind ``tcp://*:<port>``; start them only inside a private network namespace
(``scripts/in-netns.sh``). ``CgseEnv`` refuses otherwise unless ``PROCMAN_ALLOW_HOST_NET=1``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import os
import pickle
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

if TYPE_CHECKING:
    from typing_extensions import Self  # only for the annotation (typing.Self needs 3.11)

try:
    from refenv_tagged import MARKER, canonical, from_tagged, to_tagged
except ImportError:  # imported by path from elsewhere: make the sibling module importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from refenv_tagged import MARKER, canonical, from_tagged, to_tagged

__all__ = [
    "CgseEnv",
    "Ports",
    "RefEnvError",
    "RefProcess",
    "RefRunError",
    "ServiceNotReady",
    "canonical",
    "control_server_request",
    "example_setup_yaml",
    "free_port",
    "free_ports",
    "from_tagged",
    "in_private_netns",
    "json_request",
    "netns_status",
    "ping_control_server",
    "ref_bin",
    "ref_python",
    "ref_venv_dir",
    "registry_request",
    "run_ref",
    "run_ref_cli",
    "run_ref_json",
    "to_tagged",
    "zero_setup_yaml",
]

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
CGSE_CORE_VERSION = "0.25.11"
DEFAULT_SITE_ID = "LAB42"
LOOPBACK = "127.0.0.1"

# Variables that must not leak from the caller's environment into the reference services.
_SCRUBBED_PREFIXES = ("CGSE_",)
_SCRUBBED = {
    "PROJECT",
    "SITE_ID",
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONSTARTUP",
    "PYTHONSAFEPATH",
    "VIRTUAL_ENV",
    "COLUMNS",
    "LINES",
    "FORCE_COLOR",
    "VERBOSE_DEBUG",
}


class RefEnvError(RuntimeError):
    """The reference environment is missing or misused."""


class ServiceNotReady(RefEnvError):
    """A reference service did not become ready in time (or died while starting)."""


class RefRunError(RefEnvError):
    """A snippet or CLI run under the reference interpreter failed."""

    def __init__(self, message: str, rc: int | None, stdout: str, stderr: str) -> None:
        super().__init__(f"{message}\n--- rc: {rc}\n--- stdout:\n{_tail(stdout)}\n--- stderr:\n{_tail(stderr)}")
        self.rc = rc
        self.stdout = stdout
        self.stderr = stderr


# ------------------------------------------------------------------------------------------------------------------
# The reference interpreter


def ref_venv_dir() -> Path:
    """Directory of the reference venv: ``$PROCMAN_REF_VENV`` or ``<repo>/.venv-ref``."""
    return Path(os.environ.get("PROCMAN_REF_VENV") or REPO_ROOT / ".venv-ref")


def ref_python() -> str:
    """Path of the reference interpreter: ``$PROCMAN_REF_PYTHON``, else ``<ref venv>/bin/python``."""
    explicit = os.environ.get("PROCMAN_REF_PYTHON")
    candidate = Path(explicit) if explicit else ref_venv_dir() / "bin" / "python"
    if not (candidate.is_file() and os.access(candidate, os.X_OK)):
        source = "$PROCMAN_REF_PYTHON" if explicit else "the reference venv"
        raise RefEnvError(
            f"reference interpreter not found: {candidate} (from {source}). "
            "Create it with scripts/setup-ref-venv.sh (cgse-core==0.25.11), "
            "or point PROCMAN_REF_PYTHON / PROCMAN_REF_VENV at an existing one."
        )
    # Keep the venv path (bin/python is a symlink; resolving it would leave the venv).
    return str(candidate.absolute())


def ref_bin(name: str) -> str:
    """Path of a console script of the reference venv (``pm_cs``, ``cgse``, ``reg_cs`` …)."""
    path = Path(ref_python()).parent / name
    if not path.exists():
        raise RefEnvError(f"no script {name!r} in {path.parent}")
    return str(path)


# ------------------------------------------------------------------------------------------------------------------
# Ports

_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _port_is_free(port: int) -> bool:
    for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 in this namespace
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address, port))
        except OSError:
            return False
        finally:
            sock.close()
    return True


def free_port() -> int:
    """A TCP port that is free on all interfaces and was not handed out before by this process.

    Ports are drawn below the kernel's ephemeral range, so an OS-assigned port (a pm_cs with port 0, the source port
    of an outgoing connection) cannot take one between our check and the service's bind.
    """
    low_ephemeral, _ = _ephemeral_range()
    high = max(low_ephemeral - 1, 12000)
    low = max(10000, high - 20000)
    rng = random.Random()
    for _ in range(2000):
        port = rng.randrange(low, high)
        if port in _handed_out:
            continue
        if _port_is_free(port):
            _handed_out.add(port)
            return port
    raise RefEnvError(f"no free TCP port found in {low}..{high}")


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (see ``free_port``)."""
    return [free_port() for _ in range(n)]


@dataclasses.dataclass
class Ports:
    """Every port of the CGSE core services, as written into the local settings file."""

    registry_req: int
    registry_pub: int
    registry_hb: int
    cm_cmd: int
    cm_mon: int
    cm_srv: int
    sm_cmd: int
    sm_mon: int
    sm_srv: int
    pm_cmd: int
    pm_mon: int
    pm_srv: int
    nh_collector: int
    nh_pub: int
    nh_req: int
    mh_collector: int
    mh_pub: int
    mh_req: int
    log_receiver: int
    log_commander: int

    @classmethod
    def allocate(cls, pm_zero: bool = False, **given: int) -> Ports:
        """Free ports for every field, except those ``given``; ``pm_zero`` sets the three pm ports to 0."""
        names = [field.name for field in dataclasses.fields(cls)]
        unknown = set(given) - set(names)
        if unknown:
            raise TypeError(f"unknown port names: {sorted(unknown)}")
        values: dict[str, int] = {}
        for name in names:
            if name in given:
                values[name] = given[name]
            elif pm_zero and name.startswith("pm_"):
                values[name] = 0
            else:
                values[name] = free_port()
        return cls(**values)


# ------------------------------------------------------------------------------------------------------------------
# Network namespace


def netns_status() -> dict[str, Any]:
    """Describe the current network namespace: interfaces, and which non-``lo`` interfaces have an address."""
    interfaces: list[str] = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/net/dev").read_text().splitlines()[2:]:
            interfaces.append(line.split(":", 1)[0].strip())
    with_address: set[str] = set()
    ip_cmd = shutil.which("ip")
    if ip_cmd:
        out = subprocess.run(
            [ip_cmd, "-o", "addr", "show"], check=False, capture_output=True, text=True, timeout=10
        ).stdout
        for line in out.splitlines():
            parts = line.split()
            if len(parts) > 1:
                with_address.add(parts[1].split("@", 1)[0])
    else:  # without iproute2: IPv6 addresses from /proc, IPv4 from the local routes in fib_trie
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/net/if_inet6").read_text().splitlines():
                with_address.add(line.split()[-1])
        if any(name != "lo" for name in interfaces):
            with contextlib.suppress(OSError):
                if re.search(r"/32 host LOCAL", Path("/proc/self/net/fib_trie").read_text()) and not with_address:
                    with_address.add("?")
    others = sorted(name for name in with_address if name != "lo")
    own = init = None
    with contextlib.suppress(OSError):
        own = os.readlink("/proc/self/ns/net")
        init = os.readlink("/proc/1/ns/net")
    return {
        "interfaces": interfaces,
        "addressed_non_lo": others,
        "lo_up": "lo" in with_address,
        "netns": own,
        "differs_from_pid1": own is not None and init is not None and own != init,
        "private": "lo" in interfaces and not others,
    }


def in_private_netns() -> bool:
    """True when no interface other than ``lo`` has an address (as inside ``scripts/in-netns.sh``)."""
    return bool(netns_status()["private"])


def _check_network_is_private() -> None:
    if os.environ.get("PROCMAN_ALLOW_HOST_NET") == "1":
        return
    status = netns_status()
    if not status["private"]:
        raise RefEnvError(
            "refusing to start CGSE services outside a private network namespace (they bind on all interfaces): "
            f"interfaces with addresses {status['addressed_non_lo']}. Run through scripts/in-netns.sh, "
            "or set PROCMAN_ALLOW_HOST_NET=1 if you know what you are doing."
        )
    if not status["lo_up"]:
        raise RefEnvError("the loopback interface is down: run `ip link set lo up` (scripts/in-netns.sh does)")


# ------------------------------------------------------------------------------------------------------------------
# Wire helpers (pyzmq + pickle of plain strings; no egse needed)


def json_request(
    port: int, payload: Mapping[str, Any], timeout: float = 1.0, host: str = LOOPBACK
) -> dict[str, Any] | None:
    """Send ``[b"REQ", json]`` on a fresh DEALER (registry / notify hub framing); the JSON reply, or None on timeout."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"tcp://{host}:{port}")
        sock.send_multipart([b"REQ", json.dumps(payload).encode()])
        if not sock.poll(int(timeout * 1000), zmq.POLLIN):
            return None
        frames = sock.recv_multipart()
        return json.loads(frames[-1]) if frames else None
    finally:
        sock.close()


def registry_request(ports: Ports, payload: Mapping[str, Any], timeout: float = 1.0) -> dict[str, Any] | None:
    """``json_request`` to the registry request port of ``ports``."""
    return json_request(ports.registry_req, payload, timeout)


def control_server_request(port: int, request: Any, timeout: float = 1.0, host: str = LOOPBACK) -> Any:
    """Send ``pickle.dumps(request)`` on a fresh REQ socket; the unpickled reply, or raise ``TimeoutError``.

    Only for built-in requests whose reply needs no ``egse`` to unpickle (``"Ping"``, ``"get_service_port"`` …).
    """
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"tcp://{host}:{port}")
        sock.send(pickle.dumps(request, protocol=4))
        if not sock.poll(int(timeout * 1000), zmq.POLLIN):
            raise TimeoutError(f"no reply from tcp://{host}:{port} within {timeout} s")
        return pickle.loads(sock.recv())  # our own reference services on loopback
    finally:
        sock.close()


def ping_control_server(port: int, timeout: float = 0.5, host: str = LOOPBACK) -> bool:
    """True when the control server on ``port`` answers a pickled ``"Ping"`` with ``"Pong"``."""
    try:
        return bool(control_server_request(port, "Ping", timeout, host) == "Pong")
    except (TimeoutError, zmq.ZMQError, pickle.UnpicklingError, EOFError):
        return False


# ------------------------------------------------------------------------------------------------------------------
# Setups


def zero_setup_yaml(site_id: str = DEFAULT_SITE_ID) -> str:
    """Setup 0: no devices."""
    return f'Setup:\n    site_id: {site_id}\n    history:\n        "0": Zero Setup, no devices\n'


def example_setup_yaml(site_id: str = DEFAULT_SITE_ID) -> str:
    """Setup 1 with four (not installed, except egse.dummy) devices, as in the reference material's example Setup."""
    return f"""\
# Example Setup with devices for the procman tests (site {site_id}, setup 1).
# A node is a device when it has both `device` and `device_name`; it has a device id when it also has `device_id`.
Setup:
    site_id: {site_id}
    history:
        "0": Zero Setup, no devices
        "1": Example setup with dummy devices

    gse:
        dummy:
            device: class//egse.dummy.DummyProxy
            device_name: Dummy Device
            device_id: DUMMY_01
            ID: 42

        hexapod:
            device: class//egse.hexapod.symetrie.puna.PunaProxy
            device_name: PUNA Hexapod
            device_id: PUNA_01
            device_args: [PUNA_01]
            ID: 172543

        aeu:
            psu1:
                device: class//egse.aeu.aeu.PSUProxy
                device_args: [1]
                device_name: AEU PSU1
                device_id: AEU_PSU1
            crio:
                device: class//egse.aeu.aeu.CRIOProxy
                device_name: AEU cRIO

    sut:
        ID: SUT_A
"""


def setup_filename(site_id: str, setup_id: int, when: _dt.datetime | None = None) -> str:
    """``SETUP_<SITE>_<NNNNN>_<YYMMDD>_<HHMMSS>.yaml`` (the pattern cm_cs searches for)."""
    when = when or _dt.datetime(2026, 11, 26, 11, 0, 0) + _dt.timedelta(minutes=setup_id)
    return f"SETUP_{site_id}_{setup_id:05d}_{when:%y%m%d_%H%M%S}.yaml"


# ------------------------------------------------------------------------------------------------------------------
# Processes


def _tail(text_or_path: str | Path, lines: int = 40) -> str:
    if isinstance(text_or_path, Path):
        try:
            text = text_or_path.read_text(errors="replace")
        except OSError:
            return f"<{text_or_path} unreadable>"
    else:
        text = text_or_path
    return "\n".join(text.splitlines()[-lines:])


def _die_with_parent() -> None:
    """``preexec_fn``: SIGKILL this child when the process that started it dies (Linux ``PR_SET_PDEATHSIG``).

    The services run in their own session, so without this a crashed or killed pytest would leave them running.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def _session_members(sid: int) -> list[int]:
    """Pids of the live processes in session ``sid`` (a session we created with ``start_new_session``)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:
            members.append(int(entry.name))
    return members


def _kill_session(sid: int) -> None:
    """SIGKILL every live process of session ``sid``, by pid."""
    for pid in _session_members(sid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _pid_alive(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


@dataclasses.dataclass(frozen=True)
class ServiceSpec:
    """How to run and probe one reference service."""

    name: str  # our short name: registry, nh, sm, cm, pm, log, mh
    module: str  # python -m <module> start
    service_type: str | None  # registry type it registers under (None: does not register)
    cmd_port: str | None  # Ports field of the pickle REP commanding port (control servers)
    json_port: str | None  # Ports field of the JSON DEALER/ROUTER request port (registry, notify hub)


SPECS: dict[str, ServiceSpec] = {
    "registry": ServiceSpec("registry", "egse.registry.server", None, None, "registry_req"),
    "nh": ServiceSpec("nh", "egse.notifyhub.server", "NH_CS", None, "nh_req"),
    "log": ServiceSpec("log", "egse.logger.log_cs", "LOG_CS", None, None),
    # The Metrics Hub; its backend comes from the environment (CGSE_METRICS_BACKEND, CGSE_DUCKDB_PATH …).
    "mh": ServiceSpec("mh", "egse.metricshub.server", "MH_CS", None, None),
    "sm": ServiceSpec("sm", "egse.storage.storage_cs", "SM_CS", "sm_cmd", None),
    "cm": ServiceSpec("cm", "egse.confman.confman_cs", "CM_CS", "cm_cmd", None),
    "pm": ServiceSpec("pm", "egse.procman.procman_cs", "PM_CS", "pm_cmd", None),
}


class RefProcess:
    """One reference service run as ``<ref python> -m <module> start`` in its own session (process group).

    stdout/stderr go to ``<env root>/procs/<name>.<n>.out|err`` (``n`` counts restarts).
    """

    def __init__(self, env: CgseEnv, spec: ServiceSpec, extra_args: Sequence[str] = ()) -> None:
        self.env = env
        self.spec = spec
        self.extra_args = list(extra_args)
        self.popen: subprocess.Popen[bytes] | None = None
        self.generation = 0
        self.started_at = 0.0
        self.ready_after: float | None = None
        self.stdout_path = Path()
        self.stderr_path = Path()
        self.pids: list[int] = []  # every pid this handle ever started

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise RefEnvError(f"{self.name} was never started")
        return self.popen.pid

    @property
    def argv(self) -> list[str]:
        return [ref_python(), "-m", self.spec.module, "start", *self.extra_args]

    def start(self) -> RefProcess:
        if self.popen is not None and self.popen.poll() is None:
            raise RefEnvError(f"{self.name} is already running (pid {self.popen.pid})")
        self.generation += 1
        self.stdout_path = self.env.procs_dir / f"{self.name}.{self.generation}.out"
        self.stderr_path = self.env.procs_dir / f"{self.name}.{self.generation}.err"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=self.env.run_dir,
                env=self.env.env(),
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,  # noqa: PLW1509 - only prctl() runs
            )
        self.pids.append(self.popen.pid)
        self.started_at = time.monotonic()
        self.ready_after = None
        return self

    def is_running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def command_port(self) -> int | None:
        """The commanding port: from the settings, or discovered in the registry when the setting is 0."""
        if self.spec.cmd_port is None:
            return None
        port = int(getattr(self.env.ports, self.spec.cmd_port))
        if port:
            return port
        record = self.env.registry_record(self.spec.service_type or "")
        return int(record["port"]) if record else None

    def probe(self) -> bool:
        """One readiness probe (no waiting)."""
        spec, ports = self.spec, self.env.ports
        if spec.json_port is not None:
            reply = json_request(getattr(ports, spec.json_port), {"action": "health"}, timeout=0.3)
            if not (reply and reply.get("success")):
                return False
        if spec.cmd_port is not None:
            port = self.command_port()
            if not port or not ping_control_server(port, timeout=0.3):
                return False
        return spec.service_type is None or self.env.registry_record(spec.service_type) is not None

    def wait_ready(self, timeout: float = 30.0) -> float:
        """Wait until the service answers its health check and is registered; seconds since start.

        Raises ``ServiceNotReady`` (with the tails of its logs) when it died or the timeout passed.
        """
        deadline = time.monotonic() + timeout
        while True:
            if not self.is_running():
                raise ServiceNotReady(f"{self.name} exited with rc={self.returncode} while starting\n{self.logs()}")
            if self.probe():
                self.ready_after = time.monotonic() - self.started_at
                return self.ready_after
            if time.monotonic() >= deadline:
                raise ServiceNotReady(f"{self.name} (pid {self.pid}) not ready after {timeout} s\n{self.logs()}")
            time.sleep(0.1)

    def logs(self, lines: int = 30) -> str:
        return (
            f"--- {self.stdout_path.name}:\n{_tail(self.stdout_path, lines)}\n"
            f"--- {self.stderr_path.name}:\n{_tail(self.stderr_path, lines)}"
        )

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; always reaped. Returns the exit code."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        self._kill_leftovers()
        return self.popen.returncode

    def wait_exit(self, timeout: float = 10.0) -> int | None:
        """Wait for the process to exit by itself (e.g. after ``pm_cs stop``); None if still running."""
        if self.popen is None:
            return None
        try:
            rc = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._kill_leftovers()
        return rc

    def kill(self) -> int | None:
        """SIGKILL (a crash, for tests): no clean-up happens in the service. Reaped."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)
        self._kill_leftovers()
        return self.popen.returncode

    def restart(self, timeout: float = 30.0, wait: bool = True) -> RefProcess:
        self.stop()
        self.start()
        if wait:
            self.wait_ready(timeout)
        return self

    def _kill_leftovers(self) -> None:
        """SIGKILL what is left in the session we created for this service (children it spawned), pid by pid."""
        if self.popen is not None:
            _kill_session(self.popen.pid)

    def __repr__(self) -> str:
        state = "running" if self.is_running() else f"exited rc={self.returncode}"
        pid = self.popen.pid if self.popen else None
        return f"<RefProcess {self.name} pid={pid} {state}>"


# ------------------------------------------------------------------------------------------------------------------
# The CGSE site


class CgseEnv:
    """A throw-away CGSE site for one test, and the reference services running in it.

    Layout under ``root``::

        data/<SITE_ID>/{daily,obs}/, data/<SITE_ID>/last_setup_id.txt   CGSE_DATA_STORAGE_LOCATION=root/data
        conf/SETUP_<SITE_ID>_<NNNNN>_<YYMMDD>_<HHMMSS>.yaml              CGSE_CONF_DATA_LOCATION
        log/                                                             CGSE_LOG_FILE_LOCATION (general.log)
        local_settings.yaml                                              CGSE_LOCAL_SETTINGS
        run/                                                             cwd of every process (service_registry.db)
        procs/<name>.<n>.out|err                                         stdout/stderr of every service

    Use as a context manager: everything it started is stopped on exit, also when the test failed.
    """

    def __init__(
        self,
        root: Path | str | None = None,
        *,
        site_id: str = DEFAULT_SITE_ID,
        setups: Mapping[int, str] | None = None,
        setup_id: int | None = 1,
        ports: Ports | None = None,
        pm_ports_zero: bool = False,
        extra_settings: Mapping[str, Mapping[str, Any]] | None = None,
        extra_env: Mapping[str, str] | None = None,
        keep: bool | None = None,
    ) -> None:
        """
        Args:
            root: directory to build the site in (created); default a new temporary directory.
            site_id: ``SITE_ID`` (environment) and ``SITE.ID`` (settings).
            setups: Setup YAML text per setup id; default setup 0 (no devices) and 1 (example with devices).
            setup_id: written to ``last_setup_id.txt`` (the setup cm_cs loads at start); None: no file.
            ports: all ports; default free ones (``Ports.allocate``).
            pm_ports_zero: the Process Manager ports are 0 (OS-assigned, discovered through the registry).
            extra_settings: more settings groups/keys merged into the local settings file.
            extra_env: more environment variables for every process.
            keep: keep ``root`` after ``close()``; default: keep when ``$PROCMAN_KEEP_REFENV=1`` or root was given.
        """
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="cgse-ref-") if root is None else root).absolute()
        self.keep = keep if keep is not None else (os.environ.get("PROCMAN_KEEP_REFENV") == "1" or root is not None)
        self.site_id = site_id
        self.ports = ports or Ports.allocate(pm_zero=pm_ports_zero)
        if pm_ports_zero:
            self.ports.pm_cmd = self.ports.pm_mon = self.ports.pm_srv = 0
        self.extra_settings = {group: dict(keys) for group, keys in (extra_settings or {}).items()}
        self.extra_env = dict(extra_env or {})
        self.processes: list[RefProcess] = []

        self.data_root = self.root / "data"
        self.data_dir = self.data_root / site_id  # what get_data_storage_location() returns
        self.conf_dir = self.root / "conf"
        self.log_dir = self.root / "log"
        self.run_dir = self.root / "run"
        self.procs_dir = self.root / "procs"
        self.settings_file = self.root / "local_settings.yaml"
        for path in (self.data_dir / "daily", self.data_dir / "obs", self.conf_dir, self.log_dir, self.run_dir):
            path.mkdir(parents=True, exist_ok=True)
        self.procs_dir.mkdir(parents=True, exist_ok=True)

        for number, text in (setups or {0: zero_setup_yaml(site_id), 1: example_setup_yaml(site_id)}).items():
            self.write_setup(number, text)
        if setup_id is not None:
            self.set_last_setup_id(setup_id)
        self.write_settings()

    # -- files ---------------------------------------------------------------------------------------------------

    def write_setup(self, setup_id: int, yaml_text: str, when: _dt.datetime | None = None) -> Path:
        """Write a Setup YAML file into the conf dir (replacing other files of the same id)."""
        for old in self.conf_dir.glob(f"SETUP_{self.site_id}_{setup_id:05d}_*.yaml"):
            old.unlink()
        path = self.conf_dir / setup_filename(self.site_id, setup_id, when)
        path.write_text(yaml_text)
        return path

    def set_last_setup_id(self, setup_id: int) -> None:
        (self.data_dir / "last_setup_id.txt").write_text(str(setup_id))

    def settings_groups(self) -> dict[str, dict[str, Any]]:
        """The local settings, as groups of keys (what ``write_settings`` writes)."""
        p = self.ports
        groups: dict[str, dict[str, Any]] = {
            "SITE": {"ID": self.site_id},
            "Service Registry": {
                "REQUESTER_PORT": p.registry_req,
                "PUBLISHER_PORT": p.registry_pub,
                "HEARTBEAT_PORT": p.registry_hb,
            },
            "Logging Control Server": {"RECEIVER_PORT": p.log_receiver, "COMMANDER_PORT": p.log_commander},
            "Configuration Manager Control Server": {
                "COMMANDING_PORT": p.cm_cmd,
                "MONITORING_PORT": p.cm_mon,
                "SERVICE_PORT": p.cm_srv,
            },
            "Storage Manager Control Server": {
                "COMMANDING_PORT": p.sm_cmd,
                "MONITORING_PORT": p.sm_mon,
                "SERVICE_PORT": p.sm_srv,
            },
            "Process Manager Control Server": {
                "COMMANDING_PORT": p.pm_cmd,
                "MONITORING_PORT": p.pm_mon,
                "SERVICE_PORT": p.pm_srv,
            },
            "Notify Hub": {"COLLECTOR_PORT": p.nh_collector, "PUBLISHER_PORT": p.nh_pub, "REQUESTS_PORT": p.nh_req},
            "Metrics Hub": {"COLLECTOR_PORT": p.mh_collector, "PUBLISHER_PORT": p.mh_pub, "REQUESTS_PORT": p.mh_req},
        }
        for group, keys in self.extra_settings.items():
            groups.setdefault(group, {}).update(keys)
        return groups

    def write_settings(self) -> Path:
        """(Re)write the local settings YAML from ``ports``, ``site_id`` and ``extra_settings``."""
        lines = ["# Local settings written by tests/python/refenv.py"]
        for group, keys in self.settings_groups().items():
            lines.append(f"{group}:")
            lines.extend(f"    {key}: {_yaml_scalar(value)}" for key, value in keys.items())
        self.settings_file.write_text("\n".join(lines) + "\n")
        return self.settings_file

    def hk_files(self, origin: str = "PM") -> list[Path]:
        """Daily CSV files written by the storage manager for ``origin``."""
        return sorted(self.data_dir.glob(f"daily/*/*_{self.site_id}_{origin}.csv"))

    def daily_csv_path(self, origin: str = "PM", day: _dt.date | None = None) -> Path:
        """``<data>/<SITE>/daily/YYYYMMDD/YYYYMMDD_<SITE>_<ORIGIN>.csv`` for ``day`` (default: today, UTC)."""
        stamp = f"{day:%Y%m%d}" if day else time.strftime("%Y%m%d", time.gmtime())
        return self.data_dir / "daily" / stamp / f"{stamp}_{self.site_id}_{origin}.csv"

    # -- environment ---------------------------------------------------------------------------------------------

    def env(self, **overrides: str) -> dict[str, str]:
        """Environment for every reference process of this site (the caller's, scrubbed of CGSE variables)."""
        base = {
            key: value
            for key, value in os.environ.items()
            if key not in _SCRUBBED and not key.startswith(_SCRUBBED_PREFIXES)
        }
        venv_bin = str(Path(ref_python()).parent)
        base.update(
            {
                "PROJECT": "CGSE",
                "SITE_ID": self.site_id,
                "CGSE_DATA_STORAGE_LOCATION": str(self.data_root),
                "CGSE_CONF_DATA_LOCATION": str(self.conf_dir),
                "CGSE_LOG_FILE_LOCATION": str(self.log_dir),
                "CGSE_LOCAL_SETTINGS": str(self.settings_file),
                "CGSE_DOTENV_DISABLED": "1",
                "PYTHONUNBUFFERED": "1",
                "PYTHONDONTWRITEBYTECODE": "1",
                "PATH": venv_bin + os.pathsep + base.get("PATH", "/usr/bin:/bin"),
                "VIRTUAL_ENV": str(Path(venv_bin).parent),
            }
        )
        base.update(self.extra_env)
        base.update(overrides)
        return base

    # -- services ------------------------------------------------------------------------------------------------

    def service(self, name: str, extra_args: Sequence[str] = ()) -> RefProcess:
        """A handle for service ``name`` (registry, nh, log, mh, sm, cm, pm), not started yet."""
        if name not in SPECS:
            raise RefEnvError(f"unknown service {name!r}; known: {sorted(SPECS)}")
        proc = RefProcess(self, SPECS[name], extra_args)
        self.processes.append(proc)
        return proc

    def start(
        self, name: str, *, wait: bool = True, timeout: float = 30.0, extra_args: Sequence[str] = ()
    ) -> RefProcess:
        """Start service ``name`` and (by default) wait until it is ready."""
        _check_network_is_private()
        proc = self.service(name, extra_args).start()
        if wait:
            proc.wait_ready(timeout)
        return proc

    def start_registry(self, **kw: Any) -> RefProcess:
        return self.start("registry", **kw)

    def start_notify_hub(self, **kw: Any) -> RefProcess:
        return self.start("nh", **kw)

    def start_logger(self, **kw: Any) -> RefProcess:
        return self.start("log", **kw)

    def start_metrics_hub(self, **kw: Any) -> RefProcess:
        return self.start("mh", **kw)

    def start_storage_manager(self, **kw: Any) -> RefProcess:
        return self.start("sm", **kw)

    def start_configuration_manager(self, **kw: Any) -> RefProcess:
        return self.start("cm", **kw)

    def start_process_manager(self, **kw: Any) -> RefProcess:
        return self.start("pm", **kw)

    def start_core(
        self, names: Sequence[str] = ("registry", "nh", "sm", "cm", "pm"), timeout: float = 30.0
    ) -> dict[str, RefProcess]:
        """Start services one after the other, each ready before the next (unlike ``cgse core start``)."""
        return {name: self.start(name, timeout=timeout) for name in names}

    def get(self, name: str) -> RefProcess:
        """The most recent handle for service ``name``."""
        for proc in reversed(self.processes):
            if proc.name == name:
                return proc
        raise RefEnvError(f"{name} was not started in this env")

    def stop_all(self, timeout: float = 10.0) -> None:
        """Stop every started service, newest first (pm, cm, sm, nh … registry last)."""
        errors: list[BaseException] = []
        for proc in reversed(self.processes):
            try:
                proc.stop(timeout)
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                errors.append(exc)
        if errors:
            raise RefEnvError(f"errors while stopping services: {errors!r}")

    def alive_pids(self) -> list[int]:
        """Pids started by this env that still exist (not reaped or not dead)."""
        return [pid for proc in self.processes for pid in proc.pids if _pid_alive(pid)]

    def registry_record(self, service_type: str, timeout: float = 0.5) -> dict[str, Any] | None:
        """The registry's ``discover`` record for ``service_type``, or None."""
        reply = registry_request(self.ports, {"action": "discover", "service_type": service_type}, timeout)
        if reply and reply.get("success"):
            return reply.get("service")
        return None

    def registry_list(self, timeout: float = 1.0) -> list[dict[str, Any]]:
        reply = registry_request(self.ports, {"action": "list"}, timeout)
        if not reply or not reply.get("success"):
            raise RefEnvError(f"registry list failed: {reply}")
        return list(reply["services"])

    # -- running code and CLIs -----------------------------------------------------------------------------------

    def run(self, code: str, timeout: float = 60.0) -> tuple[int, str, str]:
        return run_ref(code, self.env(), timeout, cwd=self.run_dir)

    def run_json(self, code: str, timeout: float = 60.0) -> Any:
        return run_ref_json(code, self.env(), timeout, cwd=self.run_dir)

    def cli(self, args: Sequence[str], timeout: float = 60.0) -> tuple[int, str, str]:
        return run_ref_cli(args, self.env(), timeout, cwd=self.run_dir)

    # -- lifetime ------------------------------------------------------------------------------------------------

    def close(self) -> None:
        try:
            self.stop_all()
        finally:
            if not self.keep and self._own_root:
                shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _yaml_scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid YAML double-quoted scalar
    raise TypeError(f"unsupported settings value {value!r}")


# ------------------------------------------------------------------------------------------------------------------
# Running code under the reference interpreter


def _minimal_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED and not k.startswith(_SCRUBBED_PREFIXES)}
    env.update({"CGSE_DOTENV_DISABLED": "1", "PYTHONUNBUFFERED": "1"})
    return env


def _run(
    argv: Sequence[str], env: Mapping[str, str] | None, timeout: float, cwd: Path | str | None
) -> tuple[int, str, str]:
    """Run ``argv`` in its own session; on timeout kill its process group and raise ``RefRunError``."""
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env) if env is not None else _minimal_env(),
        cwd=cwd,
        start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,  # noqa: PLW1509 - only prctl()
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
        raise RefRunError(f"timed out after {timeout} s: {' '.join(argv)}", None, out.decode(), err.decode()) from None
    _kill_session(proc.pid)  # whatever the command left behind in its session
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def run_ref(
    code: str, env: Mapping[str, str] | None = None, timeout: float = 60.0, cwd: Path | str | None = None
) -> tuple[int, str, str]:
    """Run ``code`` with ``<ref python> -c``; returns ``(rc, stdout, stderr)``.

    ``emit(value)`` (from ``refenv_tagged``) is available in the snippet.
    """
    prelude = f"import sys as _sys\n_sys.path.insert(0, {str(HERE)!r})\nfrom refenv_tagged import emit, to_tagged\n"
    return _run([ref_python(), "-c", prelude + code], env, timeout, cwd)


def run_ref_json(
    code: str, env: Mapping[str, str] | None = None, timeout: float = 60.0, cwd: Path | str | None = None
) -> Any:
    """Run ``code`` (which must call ``emit(value)`` last) and return the tagged value it emitted.

    Raises ``RefRunError`` when the snippet fails or its last stdout line is not an ``emit`` line.
    """
    rc, out, err = run_ref(code, env, timeout, cwd)
    lines = [line for line in out.splitlines() if line.strip()]
    if rc != 0:
        raise RefRunError("reference snippet failed", rc, out, err)
    if not lines or not lines[-1].startswith(MARKER):
        raise RefRunError("reference snippet printed no emit() line last", rc, out, err)
    return json.loads(lines[-1][len(MARKER) :])


def run_ref_cli(
    args: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 60.0, cwd: Path | str | None = None
) -> tuple[int, str, str]:
    """Run an original CLI of the reference venv; returns ``(rc, stdout, stderr)``.

    ``args[0]`` is a console script of the ref venv (``pm_cs``, ``cgse``, ``sm_cs`` …) or ``"-m"`` for a module
    (``["-m", "egse.procman.procman_cs", "status"]``).
    """
    if not args:
        raise ValueError("no command")
    argv = [ref_python(), *args] if args[0] == "-m" else [ref_bin(args[0]), *args[1:]]
    return _run(argv, env, timeout, cwd)


@contextlib.contextmanager
def cgse_env(**kwargs: Any) -> Iterator[CgseEnv]:
    """``with cgse_env(...) as env:`` (same as ``with CgseEnv(...) as env:``)."""
    env = CgseEnv(**kwargs)
    try:
        yield env
    finally:
        env.close()


if __name__ == "__main__":  # tiny self-check: python tests/python/refenv.py
    print(json.dumps({"ref_python": ref_python(), "netns": netns_status()}, indent=2))
    sys.exit(0)
