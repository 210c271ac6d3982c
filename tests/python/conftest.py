"""pytest configuration and fixtures of the Python tests.

The module constants of ``egse.procman`` are read when it is imported, so this file gives the whole session
one local settings file with free ports before any test module imports ``egse.procman``
(``CGSE_LOCAL_SETTINGS``, ``PROJECT=CGSE``), and a scratch log location (``CGSE_LOG_FILE_LOCATION``).

Fixtures start OUR daemon on those ports — ``python -m egse.procman.procman_cs start`` by default, or the Rust
binary with ``PROCMAN_TEST_DAEMON=binary`` (``target/release/pm_cs``, else ``target/debug/pm_cs``) — and stop it
by pid. Networking tests belong in a private network namespace:
``unshare -n sh -c 'ip link set lo up; .venv/bin/python -m pytest tests/python'``.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from ourdaemon import OurDaemon
    from refenv import CgseEnv

# A suite started in the background by a non-interactive shell (`bash script &`) inherits SIGINT ignored, and
# so would every process it starts: the Ctrl-C tests would wait for an interrupt that can never arrive.
# Python only turns SIGINT into KeyboardInterrupt when it starts with the default disposition; give the
# session (and, through exec, its children) that default back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"

_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port free on all interfaces, below the ephemeral range (so no client socket takes it meanwhile)."""
    for _ in range(1000):
        port = random.randint(20000, 30999)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port found")


def write_settings(path: Path, commanding: int, monitoring: int, service: int, state_dir: Path) -> Path:
    path.write_text(
        "Process Manager Control Server:\n"
        f"    COMMANDING_PORT: {commanding}\n"
        f"    MONITORING_PORT: {monitoring}\n"
        f"    SERVICE_PORT: {service}\n"
        "Procman:\n"
        "    BIND_ADDRESS: 127.0.0.1\n"  # loopback only, also outside a private network namespace
        f"    STATE_DIR: {state_dir}\n"
    )
    return path


@dataclass(frozen=True)
class Ports:
    commanding: int
    monitoring: int
    service: int


SESSION_DIR = Path(tempfile.mkdtemp(prefix="procman-pytest-"))
PORTS = Ports(free_port(), free_port(), free_port())
SETTINGS_FILE = write_settings(
    SESSION_DIR / "local_settings.yaml", PORTS.commanding, PORTS.monitoring, PORTS.service, SESSION_DIR / "state"
)
LOG_DIR = SESSION_DIR / "log"

for _name in [n for n in os.environ if n.startswith("CGSE_")] + ["SITE_ID", "COLUMNS", "PROCMAN_LOG"]:
    os.environ.pop(_name, None)
os.environ["PROJECT"] = "CGSE"
os.environ["CGSE_LOCAL_SETTINGS"] = str(SETTINGS_FILE)
os.environ["CGSE_LOG_FILE_LOCATION"] = str(LOG_DIR)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes several seconds (starts real services or waits for HK)")
    config.addinivalue_line("markers", "refenv: needs the reference cgse-core venv and a private network namespace")
    config.addinivalue_line("markers", "timeout(seconds): per-test time limit (pytest-timeout; ignored without it)")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not os.environ.get("PROCMAN_KEEP_TEST_DIR"):
        shutil.rmtree(SESSION_DIR, ignore_errors=True)


def daemon_command() -> list[str]:
    """How the fixtures start the daemon."""
    if os.environ.get("PROCMAN_TEST_DAEMON") == "binary":
        for profile in ("release", "debug"):
            binary = ROOT / "target" / profile / "pm_cs"
            if binary.exists():
                return [str(binary), "start", "--settings", str(SETTINGS_FILE)]
        pytest.fail("PROCMAN_TEST_DAEMON=binary but no target/*/pm_cs: run cargo build --release")
    return [sys.executable, "-m", "egse.procman.procman_cs", "start"]


def is_active(port: int, timeout: float = 0.2) -> bool:
    from egse.procman import _native

    return _native.is_control_server_active(f"tcp://{LOOPBACK}:{port}", timeout)


def wait_until(predicate: object, timeout: float, step: float = 0.05) -> bool:
    """Poll ``predicate()`` until it is true or ``timeout`` seconds have passed."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


def stop_process(proc: subprocess.Popen[bytes], grace: float = 5.0) -> int:
    """SIGTERM, then SIGKILL after ``grace`` seconds; returns the exit code. Only this pid is signalled."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(5)
    return proc.returncode


def kill_pid(pid: int, grace: float = 5.0) -> None:
    """Stop a process we started indirectly (``start-bg``), by pid: SIGTERM, then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not wait_until(lambda: not pid_alive(pid), grace):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def pids_of(pattern: list[str], env_marker: str) -> list[int]:
    """Pids whose command line holds every item of ``pattern`` and whose environment contains ``env_marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if all(p.encode() in argv for p in pattern) and env_marker.encode() in environ:
            found.append(int(entry.name))
    return found


def daemon_pids() -> list[int]:
    """Daemons of this session: ``procman_cs start`` processes whose environment names our settings file."""
    return pids_of(["egse.procman.procman_cs", "start"], str(SETTINGS_FILE))


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    ports: Ports
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


@contextlib.contextmanager
def running_daemon(tag: str = "daemon") -> Iterator[Daemon]:
    """Start our daemon on the session ports, wait until it answers, stop it by pid afterwards."""
    if is_active(PORTS.commanding):
        pytest.fail(f"something already answers on port {PORTS.commanding}")
    SESSION_DIR.mkdir(parents=True, exist_ok=True)
    err = SESSION_DIR / f"{tag}.{time.monotonic_ns()}.stderr"
    with open(err, "wb") as stderr:
        proc = subprocess.Popen(
            daemon_command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, cwd=SESSION_DIR
        )
    daemon = Daemon(proc, PORTS, err)
    try:
        if not wait_until(lambda: proc.poll() is not None or is_active(PORTS.commanding), 20.0):
            pytest.fail(f"the daemon did not answer within 20 s:\n{daemon.stderr()}")
        if proc.poll() is not None:
            pytest.fail(f"the daemon exited with {proc.returncode}:\n{daemon.stderr()}")
        yield daemon
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    """Our daemon, shared by the tests of one module."""
    with running_daemon("module") as d:
        yield d


@pytest.fixture
def fresh_daemon() -> Iterator[Daemon]:
    """Our daemon for one test (which may stop it)."""
    with running_daemon("test") as d:
        yield d


@pytest.fixture
def no_daemon() -> Ports:
    """The session ports, with nothing answering on them."""
    assert not is_active(PORTS.commanding), "a daemon is still running on the session ports"
    return PORTS


@pytest.fixture
def ours(site: CgseEnv) -> Iterator[OurDaemon]:
    """Our daemon, started in the test module's CGSE site (the module defines ``site``), stopped after."""
    from ourdaemon import OurDaemon  # not at import: this file must run before anything else is imported

    with OurDaemon(site) as d:
        d.start()
        yield d
