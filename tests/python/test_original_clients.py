"""The ORIGINAL Python clients (cgse-core 0.25.11, in the reference venv) against OUR daemon.

``ProcessManagerProxy``, ``ServiceProxy``, a pyzmq SUB unpickling status messages, and cgse-core's own
``pm_cs status`` / ``pm_cs stop`` — unchanged CGSE code, talking to the Rust daemon.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from ourdaemon import OurDaemon, pm_cs_binary
from refenv import CgseEnv, in_private_netns, ref_python, run_ref

pytestmark = [pytest.mark.refenv, pytest.mark.timeout(120)]

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "protocol"


@pytest.fixture
def site(tmp_path: Path) -> Iterator[CgseEnv]:
    if not in_private_netns():
        pytest.skip("needs a private network namespace (scripts/in-netns.sh)")
    with CgseEnv(tmp_path / "site") as env:
        yield env


def test_process_manager_proxy(site: CgseEnv, ours: OurDaemon) -> None:
    p = site.ports
    got = site.run_json(
        "from egse.procman import ProcessManagerProxy\n"
        "with ProcessManagerProxy() as pm:\n"
        "    emit({'commands': pm.get_commands(), 'ping': pm.ping(), 'cmd': pm.get_commanding_port(),\n"
        "          'mon': pm.get_monitoring_port(), 'svc': pm.get_service_port(), 'ip': pm.get_ip_address(),\n"
        "          'has': pm.has_commands(), 'doc': pm.start_process.__doc__, 'core': pm.get_core_processes()})\n"
    )
    assert got["commands"][:7] == [
        "get_core_processes",
        "get_devices",
        "get_device_ids",
        "start_process",
        "stop_process",
        "get_core_service_status",
        "get_device_process_status",
    ]
    assert got["ping"] is True and got["has"] is True
    assert (got["cmd"], got["mon"], got["svc"]) == (p.pm_cmd, p.pm_mon, p.pm_srv)
    assert isinstance(got["ip"], str)
    assert got["doc"] == (
        "usage: start_process(nargs=1, keys=['start_cmd'])\n       args & kwargs can be mixed (limited)\nStarts a process\n"
    )
    assert got["core"]["Storage Manager"] == "SM_CS"


def test_service_proxy(site: CgseEnv, ours: OurDaemon) -> None:
    got = site.run_json(
        "from egse.services import ServiceProxy\n"
        "from egse.procman import ProcessManagerProxy\n"
        f"with ServiceProxy(hostname='localhost', port={site.ports.pm_srv}) as sp:\n"
        "    st = sp.get_process_status()\n"
        "    listener = {'name': 'capture', 'proxy': ProcessManagerProxy}\n"
        "    emit({'commands': sp.get_commands(), 'keys': list(st), 'types': [type(v).__name__ for v in st.values()],\n"
        "          'uuid_version': st['UUID'].version, 'pid': st['PID'],\n"
        "          'f4': sp.set_monitoring_frequency(4), 'f1': sp.set_monitoring_frequency(1),\n"
        "          'f0': str(sp.set_monitoring_frequency(0)), 'module': sp.get_cs_module(),\n"
        "          'add': sp.add_listener(listener), 'again': repr(sp.add_listener(listener)),\n"
        "          'names': sp.get_listener_names(), 'remove': sp.remove_listener({'name': 'capture'}),\n"
        "          'log': sp.set_logging_level('egse.procman', 10), 'times': sorted(sp.get_average_execution_times()),\n"
        "          'mnemonic': sp.get_storage_mnemonic()})\n"
    )
    assert len(got["commands"]) == 12 and "quit_server" in got["commands"]
    assert got["keys"] == [
        "timestamp",
        "delay",
        "PID",
        "Up",
        "UUID",
        "RSS",
        "USS",
        "CPU User",
        "CPU System",
        "CPU count",
        "CPU%",
    ]
    assert got["types"] == ["str", "float", "int", "float", "UUID", "int", "int", "float", "float", "int", "float"]
    assert got["uuid_version"] == 1 and got["pid"] == ours.pid
    assert (got["f4"], got["f1"]) == (250.0, 1000.0)
    assert "Executing set_monitoring_frequency failed" in got["f0"]
    assert got["module"] == "egse.procman.procman_cs"
    assert got["add"] == {"__tuple__": ["ACK"]}
    assert "already registered as a listener" in got["again"]
    assert got["names"] == {"__tuple__": [["capture"]]}
    assert got["remove"] == {"__tuple__": ["ACK"]}
    assert got["log"] == "Logging level for egse.procman set to 10."
    assert "get_status" in got["times"]
    assert got["mnemonic"] == "PM"


def test_sub_receives_status_dicts(site: CgseEnv, ours: OurDaemon) -> None:
    got = site.run_json(
        "import pickle, zmq\n"
        "ctx = zmq.Context()\n"
        "s = ctx.socket(zmq.SUB)\n"
        f"s.connect('tcp://localhost:{site.ports.pm_mon}')\n"
        "s.setsockopt(zmq.SUBSCRIBE, b'')\n"
        "msgs = []\n"
        "while len(msgs) < 2 and s.poll(3000):\n"
        "    frames = s.recv_multipart()\n"
        "    msgs.append((len(frames), pickle.loads(frames[0])))\n"
        "s.close(0); ctx.term()\n"
        "emit([[n, sorted(m), m['PID']] for n, m in msgs])\n"
    )
    assert len(got) == 2
    for frames, keys, pid in got:
        assert frames == 1 and pid == ours.pid and "UUID" in keys


def test_cgse_pm_cs_status_and_stop(site: CgseEnv, ours: OurDaemon) -> None:
    p = site.ports
    rc, out, _ = site.cli(["pm_cs", "status"])
    assert rc == 0
    assert out.startswith("Process Manager:\n    Status: active\n")
    assert f"Monitoring port: {p.pm_mon}\n    Commanding port: {p.pm_cmd}\n    Service port: {p.pm_srv}\n" in out
    rc, out, _ = site.cli(["pm_cs", "stop"])
    assert rc == 0 and out == "Sending 'quit' command to process manager..\n"
    assert ours.wait_exit(5) == 0, ours.logs()


def test_our_cli_against_our_daemon(site: CgseEnv, ours: OurDaemon) -> None:
    env = site.env()
    status = subprocess.run(
        [pm_cs_binary(), "status"], env=env, capture_output=True, text=True, timeout=20, check=False
    )
    assert status.returncode == 0 and "Status: active" in status.stdout
    # After the original's lines, where the integrations stand: no registry runs in this site.
    assert "\n    Service Registry: not registered" in status.stdout, status.stdout
    assert "\n    Housekeeping: " in status.stdout and "\n    Setup: " in status.stdout, status.stdout
    stop = subprocess.run([pm_cs_binary(), "stop"], env=env, capture_output=True, text=True, timeout=20, check=False)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert ours.wait_exit(5) == 0
    stop = subprocess.run([pm_cs_binary(), "stop"], env=env, capture_output=True, text=True, timeout=20, check=False)
    assert stop.returncode == 1 and "ERROR: Couldn't connect to process manager" in stop.stdout


COMPARE = r"""
import pickle, sys, types
def same(a, b, path='$'):
    if type(a) is not type(b):
        return f'{path}: {type(a).__name__} != {type(b).__name__}'
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return f'{path}: length {len(a)} != {len(b)}'
        for i, (x, y) in enumerate(zip(a, b)):
            r = same(x, y, f'{path}[{i}]')
            if r: return r
        return None
    if isinstance(a, dict):
        if list(a) != list(b):
            return f'{path}: keys {list(a)} != {list(b)}'
        for k in a:
            r = same(a[k], b[k], f'{path}[{k!r}]')
            if r: return r
        return None
    if isinstance(a, (str, bytes, int, float, bool, type(None), type, types.FunctionType)):
        return None if a == b or (a != a and b != b) else f'{path}: {a!r} != {b!r}'
    if isinstance(a, BaseException):
        r = same(a.args, b.args, path + '.args')
        if r: return r
    if not hasattr(a, '__dict__'):  # slotted values such as uuid.UUID compare by value
        return None if a == b else f'{path}: {a!r} != {b!r}'
    return same(vars(a), vars(b), path + '.__dict__')
bad = []
for orig, ours in zip(sys.argv[1::2], sys.argv[2::2]):
    a = pickle.load(open(orig, 'rb')); b = pickle.load(open(ours, 'rb'))
    r = same(a, b)
    if r: bad.append(f'{orig}: {r}')
emit({'compared': (len(sys.argv) - 1) // 2, 'bad': bad})
"""


def test_reencoded_replies_load_in_cpython_equal_to_the_originals(tmp_path: Path, site: CgseEnv) -> None:
    """Every captured reply, decoded and re-encoded by us, loads in CPython with the real cgse-core classes
    into the same structure as the original bytes (structures, not bytes, are compared)."""
    replies = sorted(FIXTURES.glob("*.rep.pickle")) + sorted(FIXTURES.glob("mon_*.bin"))
    assert len(replies) >= 55, f"fixtures not found under {FIXTURES}"
    pairs: list[str] = []
    for f in replies:
        out = tmp_path / (f.name + ".ours")
        r = subprocess.run(
            [pm_cs_binary(), "pickle", "reencode", str(f), str(out)], capture_output=True, timeout=20, check=False
        )
        assert r.returncode == 0, r.stderr
        pairs += [str(f), str(out)]
    code = "import sys\nsys.argv = ['x'] + " + repr(pairs) + "\n" + COMPARE
    rc, stdout, stderr = run_ref(code, env=site.env(), timeout=120)
    assert rc == 0, stderr
    result = json.loads(stdout.strip().splitlines()[-1].split(":", 1)[1])
    assert result["compared"] == len(replies)
    assert result["bad"] == []
    assert Path(ref_python()).exists()
