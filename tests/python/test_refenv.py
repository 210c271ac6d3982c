"""Tests of the reference-services harness (tests/python/refenv.py) against the real cgse-core 0.25.11.

Run inside a private network namespace:

    scripts/setup-ref-venv.sh && scripts/in-netns.sh .venv/bin/python -m pytest tests/python/test_refenv.py

Without the reference venv or outside a private namespace the service tests are skipped, or fail when ``CI=true``
or ``PROCMAN_REQUIRE_REF=1``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import refenv
from gate import refenv_marks
from refenv import CgseEnv, RefRunError, ServiceNotReady, canonical, to_tagged

pytestmark = refenv_marks(ours=False)

# The original results for the example setup, as Python values: tuples vs lists matter.
EXPECTED_DEVICES = {
    "Dummy Device": ("class//egse.dummy.DummyProxy", "DUMMY_01", ()),
    "PUNA Hexapod": ("class//egse.hexapod.symetrie.puna.PunaProxy", "PUNA_01", ["PUNA_01"]),
    "AEU PSU1": ("class//egse.aeu.aeu.PSUProxy", "AEU_PSU1", [1]),
    "AEU cRIO": ("class//egse.aeu.aeu.CRIOProxy", None, ()),
}
EXPECTED_DEVICE_IDS = {
    "DUMMY_01": ("Dummy Device", "class//egse.dummy.DummyProxy", ()),
    "PUNA_01": ("PUNA Hexapod", "class//egse.hexapod.symetrie.puna.PunaProxy", ["PUNA_01"]),
    "AEU_PSU1": ("AEU PSU1", "class//egse.aeu.aeu.PSUProxy", [1]),
}
EXPECTED_CORE = {
    "Configuration Manager": "CM_CS",
    "Logger": "LOG_CS",
    "Metrics Hub": "MH_CS",
    "Notification Hub": "NH_CS",
    "Process Manager": "PM_CS",
    "Storage Manager": "SM_CS",
}
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+0000$")


def same(tagged: Any, value: Any) -> bool:
    """Exact comparison of a value tagged in the reference venv with a local Python value."""
    return canonical(tagged) == canonical(to_tagged(value))


# ------------------------------------------------------------------------------------------------------------------
# No services needed


@pytest.mark.timeout(30)
def test_tagged_values_round_trip_between_venvs() -> None:
    """run_ref_json returns exactly what the reference interpreter computed (tuple/list, int/float/bool, order)."""
    code = "emit({'t': (1, 2.0, True, None), 'l': [()], 'k': {2: 'b', 1: 'a'}, 'b': b'\\x00', 's': {3}})"
    got = refenv.run_ref_json(code, timeout=20)
    assert same(got, {"t": (1, 2.0, True, None), "l": [()], "k": {2: "b", 1: "a"}, "b": b"\x00", "s": {3}})
    assert not same(got, {"t": [1, 2.0, True, None], "l": [()], "k": {2: "b", 1: "a"}, "b": b"\x00", "s": {3}})
    assert not same(got, {"t": (1, 2, True, None), "l": [()], "k": {2: "b", 1: "a"}, "b": b"\x00", "s": {3}})
    assert not same(got, {"t": (1, 2.0, 1, None), "l": [()], "k": {2: "b", 1: "a"}, "b": b"\x00", "s": {3}})
    assert not same(got, {"t": (1, 2.0, True, None), "l": [()], "k": {1: "a", 2: "b"}, "b": b"\x00", "s": {3}})
    assert refenv.from_tagged(got) == {
        "t": (1, 2.0, True, None),
        "l": [()],
        "k": {2: "b", 1: "a"},
        "b": b"\x00",
        "s": {3},
    }


@pytest.mark.timeout(30)
def test_objects_are_tagged_with_class_args_and_state() -> None:
    got = refenv.run_ref_json(
        "import uuid\nfrom egse.response import Failure\nemit([Failure('boom'), uuid.UUID(int=7)])",
        timeout=20,
    )
    assert got == [
        {"__class__": "egse.response.Failure", "args": ["boom"], "state": {"message": "boom", "cause": None}},
        {"__class__": "uuid.UUID", "args": [], "state": {"int": 7}},
    ]


@pytest.mark.timeout(30)
def test_run_ref_reports_failures() -> None:
    with pytest.raises(RefRunError, match="ZeroDivisionError"):
        refenv.run_ref_json("1 / 0", timeout=20)
    with pytest.raises(RefRunError, match="no emit"):
        refenv.run_ref_json("print('hello')", timeout=20)
    with pytest.raises(RefRunError, match="timed out"):
        refenv.run_ref("import time; time.sleep(30)", timeout=1)


def test_we_are_in_a_private_netns() -> None:
    status = refenv.netns_status()
    assert status["private"] and status["lo_up"], status
    assert status["addressed_non_lo"] == []


def test_free_ports_are_distinct_and_below_the_ephemeral_range() -> None:
    ports = refenv.free_ports(30)
    assert len(set(ports)) == 30
    low, _ = refenv._ephemeral_range()
    assert all(1024 < port < low for port in ports)


def test_env_layout_and_settings(tmp_path: Path) -> None:
    env = CgseEnv(tmp_path / "site", pm_ports_zero=True, site_id="LAB7")
    variables = env.env()
    assert variables["PROJECT"] == "CGSE" and variables["SITE_ID"] == "LAB7"
    assert variables["CGSE_DATA_STORAGE_LOCATION"] == str(tmp_path / "site" / "data")
    assert variables["CGSE_DOTENV_DISABLED"] == "1"
    for sub in ("daily", "obs"):
        assert (tmp_path / "site" / "data" / "LAB7" / sub).is_dir()
    assert (tmp_path / "site" / "data" / "LAB7" / "last_setup_id.txt").read_text() == "1"
    assert sorted(p.name for p in env.conf_dir.iterdir()) == [
        "SETUP_LAB7_00000_261126_110000.yaml",
        "SETUP_LAB7_00001_261126_110100.yaml",
    ]
    text = env.settings_file.read_text()
    assert "Process Manager Control Server:\n    COMMANDING_PORT: 0\n" in text
    assert f"    REQUESTER_PORT: {env.ports.registry_req}\n" in text
    # The reference Settings machinery reads our file as intended.
    got = env.run_json(
        "from egse.settings import Settings\n"
        "emit([Settings.load('Process Manager Control Server')['COMMANDING_PORT'],"
        " Settings.load('Service Registry')['REQUESTER_PORT'], Settings.load('SITE')['ID']])",
        timeout=20,
    )
    assert got == [0, env.ports.registry_req, "LAB7"]


# ------------------------------------------------------------------------------------------------------------------
# The full core: registry, notify hub, storage manager, configuration manager and the ORIGINAL pm_cs


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CgseEnv]:
    with CgseEnv(tmp_path_factory.mktemp("core")) as env:
        env.start_core(("registry", "nh", "sm", "cm", "pm"), timeout=30)
        yield env


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_core_services_are_registered(core: CgseEnv) -> None:
    names = sorted(record["name"] for record in core.registry_list())
    assert names == ["cm_cs", "nh_cs", "pm_cs", "sm_cs"]
    pm = core.registry_record("PM_CS")
    assert pm is not None
    assert (pm["port"], pm["metadata"]["service_port"], pm["metadata"]["monitoring_port"]) == (
        core.ports.pm_cmd,
        core.ports.pm_srv,
        core.ports.pm_mon,
    )
    assert pm["health"] == "passing" and pm["host"] == "127.0.0.1"
    for name in ("registry", "nh", "sm", "cm", "pm"):
        assert core.get(name).is_running(), core.get(name).logs()


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_original_process_manager_proxy(core: CgseEnv) -> None:
    got = core.run_json(
        "from egse.procman import ProcessManagerProxy\n"
        "with ProcessManagerProxy() as pm:\n"
        "    emit({'ping': pm.ping(), 'devices': pm.get_devices(), 'ids': pm.get_device_ids(),\n"
        "          'core': pm.get_core_processes(), 'commands': sorted(pm.get_commands()),\n"
        "          'ports': (pm.get_commanding_port(), pm.get_monitoring_port(), pm.get_service_port()),\n"
        "          'ip': pm.get_ip_address()})\n",
        timeout=40,
    )
    assert got["ping"] is True
    assert same(got["devices"], EXPECTED_DEVICES), got["devices"]
    assert same(got["ids"], EXPECTED_DEVICE_IDS), got["ids"]
    assert same(got["core"], EXPECTED_CORE), got["core"]
    assert got["commands"] == sorted(
        [
            "get_core_processes",
            "get_devices",
            "get_device_ids",
            "start_process",
            "stop_process",
            "get_core_service_status",
            "get_device_process_status",
        ]
    )
    assert same(got["ports"], (core.ports.pm_cmd, core.ports.pm_mon, core.ports.pm_srv))
    assert got["ip"] == "127.0.0.1"
    # The harness' own pickle ping agrees.
    assert refenv.ping_control_server(core.ports.pm_cmd)
    assert refenv.control_server_request(core.ports.pm_srv, "get_commanding_port") == core.ports.pm_cmd


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_pm_cs_status_cli(core: CgseEnv) -> None:
    rc, out, _ = core.cli(["pm_cs", "status"], timeout=40)
    assert rc == 0
    assert out == (
        "Process Manager:\n"
        "    Status: active\n"
        "    Hostname: 127.0.0.1\n"
        f"    Monitoring port: {core.ports.pm_mon}\n"
        f"    Commanding port: {core.ports.pm_cmd}\n"
        f"    Service port: {core.ports.pm_srv}\n"
    )
    # Same through the module form the cgse tools use.
    rc2, out2, _ = core.cli(["-m", "egse.procman.procman_cs", "status"], timeout=40)
    assert (rc2, out2) == (rc, out)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_pm_housekeeping_reaches_the_daily_csv(core: CgseEnv) -> None:
    csv_path = core.daily_csv_path("PM")
    got = core.run_json(
        "from egse.procman import ProcessManagerProxy\n"
        "with ProcessManagerProxy() as pm:\n"
        "    sp = pm.get_service_proxy()\n"
        "    emit(sp.set_hk_frequency(4.0))\n",
        timeout=40,
    )
    assert isinstance(got, float), got  # the new delay in ms: max(250, execution time + 200)
    deadline = time.monotonic() + 20
    rows: list[str] = []
    while time.monotonic() < deadline:
        if csv_path.exists():
            rows = csv_path.read_bytes().decode().split("\r\n")
            if len(rows) >= 4:  # header, 2+ rows, "" after the last CRLF
                break
        time.sleep(0.2)
    assert csv_path.exists(), f"no HK file; daily/ has {sorted(core.data_dir.rglob('*.csv'))}"
    assert core.hk_files("PM") == [csv_path]
    assert rows[0] == "timestamp,random"
    assert rows[-1] == "" and len(rows) >= 4, rows
    for row in rows[1:-1]:
        stamp, value = row.split(",")
        assert TIMESTAMP.match(stamp), row
        assert 0 <= int(value) <= 100
    assert b"\n" not in csv_path.read_bytes().replace(b"\r\n", b"")


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_stop_everything_leaves_no_process(core: CgseEnv) -> None:
    pm = core.get("pm")
    rc, out, _ = core.cli(["pm_cs", "stop"], timeout=30)
    assert (rc, out) == (0, "Sending 'quit' command to process manager..\n")
    assert pm.wait_exit(15) == 0, pm.logs()
    assert core.registry_record("PM_CS") is None  # deregistered on quit_server
    core.stop_all()
    assert core.alive_pids() == []
    for proc in core.processes:
        assert not proc.is_running()
        assert not Path(f"/proc/{proc.pid}").exists()


# ------------------------------------------------------------------------------------------------------------------
# Process Manager with ports 0: clients discover it through the registry


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_pm_with_ports_zero_is_discovered_through_the_registry(tmp_path: Path) -> None:
    with CgseEnv(tmp_path / "site", pm_ports_zero=True) as env:
        env.start_registry()
        pm = env.start_process_manager()
        record = env.registry_record("PM_CS")
        assert record is not None
        port, service_port = record["port"], record["metadata"]["service_port"]
        assert port > 0 and service_port > 0 and port != service_port
        assert pm.command_port() == port
        got = env.run_json(
            "from egse.procman import ProcessManagerProxy\n"
            "with ProcessManagerProxy() as pm:\n"
            "    emit((pm.ping(), pm.get_endpoint(), pm.get_service_port()))\n",
            timeout=40,
        )
        assert same(got, (True, f"tcp://127.0.0.1:{port}", service_port))
        rc, out, _ = env.cli(["pm_cs", "status"], timeout=40)
        assert rc == 0 and f"    Commanding port: {port}\n" in out
        rc, out, _ = env.cli(["pm_cs", "stop"], timeout=30)
        assert rc == 0
        # `service = ` and the registry record, pretty-printed by rich (wrapped over lines beyond 80 columns).
        assert out.startswith("service = ") and f"'id': '{record['id']}'" in out
        assert out.endswith("Sending 'quit' command to process manager..\n")
        assert pm.wait_exit(15) == 0, pm.logs()
        env.stop_all()
        assert env.alive_pids() == []


# ------------------------------------------------------------------------------------------------------------------
# The harness notices failures


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_wait_ready_fails_when_a_service_dies(tmp_path: Path) -> None:
    with CgseEnv(tmp_path / "site") as env:
        env.start_registry()
        (env.data_dir / "obs").rmdir()  # sm_cs checks its prerequisites, logs an error and exits with 0
        with pytest.raises(ServiceNotReady, match="sm exited with rc=0"):
            env.start_storage_manager(timeout=20)
        env.stop_all()
        assert env.alive_pids() == []


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_killed_pm_leaves_a_stale_record_that_blocks_a_restart(tmp_path: Path) -> None:
    with CgseEnv(tmp_path / "site") as env:
        env.start_registry()
        pm = env.start_process_manager()
        old = env.registry_record("PM_CS")
        assert pm.kill() == -9
        assert env.registry_record("PM_CS") == old  # still "passing" until its ttl (30 s) runs out
        with pytest.raises(ServiceNotReady, match="pm exited with rc=0"):
            pm.restart(timeout=20)  # duplicate_service_type -> ServiceRegistrationError, exit code 0
        assert "duplicate_service_type" in pm.stdout_path.read_text() + pm.stderr_path.read_text()
        env.stop_all()
        assert env.alive_pids() == []
