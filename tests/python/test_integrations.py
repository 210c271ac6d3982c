"""OUR daemon as a CGSE core service, next to the REAL Service Registry, Storage Manager and Configuration Manager
(cgse-core 0.25.11 in the reference venv).

Run inside a private network namespace:

    scripts/in-netns.sh .venv/bin/python -m pytest tests/python/test_integrations.py -v -s

``-s`` shows the measured figures (registration after ``kill -9``, re-registration delay, ``Ping`` latency with the
peers up and down). Without the reference venv or outside a namespace the tests are skipped, or fail when
``CI=true`` or ``PROCMAN_REQUIRE_REF=1``.
"""

from __future__ import annotations

import calendar
import contextlib
import itertools
import re
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import refenv
import zmq
from gate import refenv_marks, wait_for
from ourdaemon import OurDaemon, our_cli
from refenv import CgseEnv, canonical, ping_control_server

pytestmark = refenv_marks(slow=True)

TIMESTAMP = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+0000$")
OUR_COLUMNS = b"timestamp,processes,running,starting,backoff,stopping,stopped,exited,fatal,restarts,rss,cpu_percent\r\n"

# A Setup that exercises the walk: groups nested three deep, a device without device_id, device_args of several
# kinds, a device_id that is an int, a later duplicate device name (it overwrites the earlier one), a list (not
# walked) and a node below a device (not searched). (cm_cs cannot load a Setup with a list of mappings.)
RICH_SETUP = """\
Setup:
    site_id: LAB42
    history:
        "0": Zero Setup, no devices
        "1": Example setup with dummy devices
        "2": Rich setup for the integration tests
    gse:
        dummy:
            device: class//egse.dummy.DummyProxy
            device_name: Dummy Device
            device_id: DUMMY_01
            inner:
                device: class//egse.dummy.DummyProxy
                device_name: Hidden below a device
                device_id: HIDDEN_01
        lab:
            rack_a:
                shelf_1:
                    psu:
                        device: class//egse.aeu.aeu.PSUProxy
                        device_name: Deep PSU
                        device_id: DEEP_PSU
                        device_args: [3, "volts", 1.5, true]
                    thermo:
                        device: class//egse.tempcontrol.lakeshore.lakeshore336.LakeShore336Proxy
                        device_name: Thermometer without id
                        device_args: []
            rack_b:
                counter:
                    device: class//egse.dummy.DummyProxy
                    device_name: Counter
                    device_id: 17
                    device_args: [COUNTER]
        channels: [1, 2, 3]
        again:
            device: class//egse.hexapod.symetrie.puna.PunaProxy
            device_name: Dummy Device
            device_id: PUNA_01
            device_args: [PUNA_01]
    sut:
        ID: SUT_A
"""


# ------------------------------------------------------------------------------------------------------------------
# Helpers


class Ours(OurDaemon):
    """Our daemon; with ports 0 it is ready when its registry record answers ``Ping``."""

    def record(self) -> dict[str, Any] | None:
        return self.env.registry_record("PM_CS")

    def wait_registered(self, timeout: float = 10.0, other_than: int | None = None) -> dict[str, Any]:
        """Wait for a PM_CS record whose commanding port answers Ping (and differs from ``other_than``)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"our daemon exited with {self.proc.returncode}:\n{self.logs()}")
            rec = self.record()
            if rec and rec["port"] != other_than and ping_control_server(int(rec["port"]), timeout=0.2):
                return rec
            if time.monotonic() > deadline:
                raise RuntimeError(f"our daemon not registered after {timeout} s (record {rec}):\n{self.logs()}")
            time.sleep(0.01)

    def log_text(self) -> str:
        return self.stderr.read_text(errors="replace") if self.stderr.exists() else ""

    def kill9(self) -> None:
        """SIGKILL the daemon only (a crash): no deregistration, no unregistration."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(5)


def set_hk_frequency(site: CgseEnv, service_port: int, freq: float) -> float:
    """The original ``ServiceProxy.set_hk_frequency`` against our service port; the new period in ms."""
    return float(
        site.run_json(
            "from egse.services import ServiceProxy\n"
            f"with ServiceProxy(hostname='localhost', port={service_port}) as sp:\n"
            f"    emit(sp.set_hk_frequency({freq}))\n"
        )
    )


def register_to_storage(site: CgseEnv, service_port: int) -> Any:
    return site.run_json(
        "from egse.services import ServiceProxy\n"
        f"with ServiceProxy(hostname='localhost', port={service_port}) as sp:\n"
        "    emit(repr(sp.register_to_storage()))\n"
    )


def device_lists(site: CgseEnv) -> Any:
    """``get_devices`` / ``get_device_ids`` through the original ``ProcessManagerProxy``."""
    return site.run_json(
        "from egse.procman import ProcessManagerProxy\n"
        "with ProcessManagerProxy() as pm:\n"
        "    emit({'devices': pm.get_devices(), 'ids': pm.get_device_ids()})\n"
    )


def hk_rows(path: Path) -> list[bytes]:
    """The data rows of a daily file (CRLF kept), after checking its single header."""
    data = path.read_bytes()
    assert data.startswith(OUR_COLUMNS), data[:200]
    assert data.count(b"timestamp,") == 1, "one header only"
    rows = data[len(OUR_COLUMNS) :].split(b"\r\n")
    assert rows[-1] == b"", "every row ends in CRLF"
    return rows[:-1]


def row_times(rows: list[bytes]) -> list[float]:
    out = []
    for r in rows:
        stamp = r.split(b",", 1)[0]
        assert TIMESTAMP.match(stamp), r
        t = time.strptime(stamp[:19].decode(), "%Y-%m-%dT%H:%M:%S")
        out.append(time.mktime(t) - time.timezone + int(stamp[20:23]) / 1000)
    return out


def ping_latencies(port: int, n: int) -> list[float]:
    """``n`` round trips of a pickled ``Ping`` on one REQ socket, in milliseconds."""
    import pickle

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{port}")
    ping = pickle.dumps("Ping", protocol=4)
    out = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            sock.send(ping)
            assert sock.poll(2000), "Ping not answered within 2 s"
            assert pickle.loads(sock.recv()) == "Pong"
            out.append((time.perf_counter() - t0) * 1000)
    finally:
        sock.close()
    return out


def figures(lat: list[float]) -> dict[str, float]:
    lat = sorted(lat)
    return {
        "median_ms": round(statistics.median(lat), 3),
        "p99_ms": round(lat[int(len(lat) * 0.99) - 1], 3),
        "max_ms": round(lat[-1], 3),
    }


@pytest.fixture
def site_zero(tmp_path: Path) -> Iterator[CgseEnv]:
    """A site whose Process Manager ports are 0."""
    with CgseEnv(tmp_path / "site", pm_ports_zero=True) as env:
        yield env


@pytest.fixture
def site(tmp_path: Path) -> Iterator[CgseEnv]:
    """A site with fixed (free) Process Manager ports."""
    with CgseEnv(tmp_path / "site") as env:
        yield env


@contextlib.contextmanager
def ours_in(site: CgseEnv, name: str = "ours") -> Iterator[Ours]:
    d = Ours(site, name=name)
    try:
        yield d
    finally:
        d.stop()


# ------------------------------------------------------------------------------------------------------------------
# Registry: ports 0, discovery by the original clients and by ours


@pytest.mark.timeout(120)
def test_ports_zero_register_and_every_client_finds_us(site_zero: CgseEnv) -> None:
    site = site_zero
    site.start_core(("registry", "sm", "cm"))
    with ours_in(site) as ours:
        ours.start(wait=False)
        rec = ours.wait_registered()
        cmd, svc, mon = rec["port"], rec["metadata"]["service_port"], rec["metadata"]["monitoring_port"]
        assert rec["name"] == "pm_cs" and rec["tags"] == ["PM_CS"] and rec["health"] == "passing"
        assert 0 not in (cmd, svc, mon) and len({cmd, svc, mon}) == 3
        # The log says where it listens: the same ports.
        listening = re.search(
            r"commanding tcp://\*:(\d+), monitoring tcp://\*:(\d+), service tcp://\*:(\d+)", ours.log_text()
        )
        assert listening and tuple(map(int, listening.groups())) == (cmd, mon, svc), ours.logs()

        # cgse-core's own `pm_cs status` discovers us through the registry.
        rc, out, err = site.cli(["pm_cs", "status"])
        assert rc == 0, err
        assert "Status: active" in out, out
        assert f"Commanding port: {cmd}" in out and f"Service port: {svc}" in out and f"Monitoring port: {mon}" in out

        # The original ProcessManagerProxy() (port 0 in the settings) finds us.
        got = site.run_json(
            "from egse.procman import ProcessManagerProxy\n"
            "with ProcessManagerProxy() as pm:\n"
            "    emit([pm.ping(), pm.get_commanding_port(), pm.get_service_port(), pm.get_monitoring_port()])\n"
        )
        assert got == [True, cmd, svc, mon]

        # Our own CLI (the same port-0 settings) discovers us too.
        res = our_cli(site, "status")
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"Commanding port: {cmd}" in res.stdout and f"Service port: {svc}" in res.stdout
        # ... and says where the integrations stand.
        assert f"    Service Registry: registered as {rec['id']}" in res.stdout, res.stdout

        # Our `stop` finds the service port in the record's metadata; the daemon deregisters on the way out.
        res = our_cli(site, "stop")
        assert res.returncode == 0, res.stdout + res.stderr
        assert ours.wait_exit(10) == 0
        assert ours.record() is None, "deregistered at shutdown"
        assert "deregistered from the Service Registry" in ours.log_text()


@pytest.mark.timeout(120)
def test_starts_without_registry_and_registers_when_it_appears(site_zero: CgseEnv) -> None:
    site = site_zero
    with ours_in(site) as ours:
        ours.start(wait=False)
        wait_for(lambda: "listening" in ours.log_text(), 10, "our daemon listens without a registry")
        listening = re.search(r"commanding tcp://\*:(\d+)", ours.log_text())
        assert listening
        port = int(listening.group(1))
        assert ping_control_server(port, timeout=1.0), "serving without a registry"
        wait_for(lambda: "not registered with the Service Registry" in ours.log_text(), 10, "the failure is logged")
        t0 = time.monotonic()
        site.start("registry")
        rec = ours.wait_registered(timeout=60)
        took = time.monotonic() - t0
        print(f"\n[figure] registry started after the daemon (ports 0): registered {took:.2f} s after the registry")
        assert rec["port"] == port


# ------------------------------------------------------------------------------------------------------------------
# Configuration Manager: device lists equal the original's; new Setups; the CM down


@pytest.mark.timeout(180)
def test_device_lists_equal_the_original_pm(tmp_path: Path) -> None:
    setups = {0: refenv.zero_setup_yaml(), 1: refenv.example_setup_yaml(), 2: RICH_SETUP}
    with CgseEnv(tmp_path / "site", setups=setups, setup_id=2) as site:
        site.start_core(("registry", "nh", "sm", "cm"))
        original = site.start("pm")
        expected = device_lists(site)
        original.stop()
        wait_for(lambda: site.registry_record("PM_CS") is None, 10, "the original pm_cs deregistered")
        # The original's walk: the later "Dummy Device" wins, nothing below a device, the list is not walked.
        assert sorted(expected["devices"]) == ["Counter", "Deep PSU", "Dummy Device", "Thermometer without id"]
        assert "Hidden below a device" not in str(expected) and "PUNA_01" in str(expected["devices"]["Dummy Device"])

        with ours_in(site) as ours:
            ours.start()
            got = device_lists(site)
            assert canonical(got) == canonical(expected), (got, expected)

            # A new Setup loaded in the CM is what the next get_devices answers.
            site.run(
                "from egse.confman import ConfigurationManagerProxy\n"
                "with ConfigurationManagerProxy() as cm:\n"
                "    cm.load_setup(1)\n"
            )
            got1 = device_lists(site)
            assert sorted(got1["devices"]) == ["AEU PSU1", "AEU cRIO", "Dummy Device", "PUNA Hexapod"], got1
            # cm_cs announced it on the Notify Hub, and we heard it.
            wait_for(lambda: "new Setup announced by the Notify Hub" in ours.log_text(), 10, "the new_setup event")

            # The CM goes away: answers come at once, from the cached Setup, and the log says so.
            site.get("cm").stop()
            t0 = time.monotonic()
            cached = device_lists(site)
            assert canonical(cached) == canonical(got1)
            slow = site.run_json(
                "import time\nfrom egse.procman import ProcessManagerProxy\n"
                "with ProcessManagerProxy() as pm:\n"
                "    pm.get_devices()\n"
                "    t0 = time.perf_counter()\n"
                "    for _ in range(20):\n"
                "        pm.get_devices()\n"
                "    emit((time.perf_counter() - t0) / 20)\n"
            )
            print(f"\n[figure] get_devices with the CM down (from the cache): {slow * 1000:.2f} ms per call")
            assert slow < 0.1, "a dead CM must not cost every call a timeout"
            assert time.monotonic() - t0 < 20
            # While the Notify Hub is followed and last_setup_id.txt is unchanged the calls above may all have
            # come from the cache without asking the CM; the background re-read (SETUP_REFRESH) notices it.
            wait_for(lambda: "Configuration Manager unreachable" in ours.log_text(), 20, "the CM noticed down")
            assert "cached Setup 00001" in ours.log_text()


LOAD_THEN_ASK = """\
import pickle, statistics, time
import zmq
from egse.command import CommandExecution
from egse.confman import ConfigurationManagerProxy
from egse.notifyhub import DEFAULT_PUBLISHER_PORT
ctx = zmq.Context.instance()
sub = ctx.socket(zmq.SUB)
sub.setsockopt(zmq.LINGER, 0)
sub.connect(f"tcp://127.0.0.1:{DEFAULT_PUBLISHER_PORT}")
sub.setsockopt(zmq.SUBSCRIBE, b"new_setup")
# get_devices as the original clients send it (pickled CommandExecution of the announced command) on a REQ socket.
req = ctx.socket(zmq.REQ)
req.setsockopt(zmq.LINGER, 0)
req.connect(f"tcp://127.0.0.1:{PM_PORT}")
def ask(msg):
    req.send(msg)
    assert req.poll(5000), "no reply within 5 s"
    return pickle.loads(req.recv())
get_devices = pickle.dumps(CommandExecution(ask(pickle.dumps("send_commands"))["get_devices"]))
def p50(n):
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        ask(get_devices)
        lat.append(time.perf_counter() - t0)
    return statistics.median(lat)
time.sleep(0.5)  # the SUB's subscription reaches the hub
out = {"rounds": [], "p50_before": p50(300)}
with ConfigurationManagerProxy() as cm:
    for k in [1, 2] * ROUNDS:
        t0 = time.perf_counter()
        cm.load_setup(k)
        t1 = time.perf_counter()
        devices = sorted(ask(get_devices))
        t2 = time.perf_counter()
        # When the event reached a subscriber of our own (relative to the load_setup reply).
        event = None
        if sub.poll(EVENT_WAIT_MS):
            topic, body = sub.recv_multipart()
            event = time.perf_counter()
            while sub.poll(0):
                sub.recv_multipart()
        out["rounds"].append({"id": k, "devices": devices, "load_ms": (t1 - t0) * 1e3, "ask_ms": (t2 - t1) * 1e3,
                              "event_after_reply_ms": None if event is None else (event - t1) * 1e3})
out["p50_after"] = p50(300)
emit(out)
"""


@pytest.mark.timeout(180)
def test_get_devices_right_after_load_setup_is_the_new_setup(tmp_path: Path) -> None:
    """A client loads a Setup through the real CM and asks our get_devices at once (same process, no pause): the
    answer is the new Setup, every time. Also measures when cm_cs's ``new_setup`` event reaches a subscriber,
    relative to the ``load_setup`` reply, and our ``get_devices`` latency with the CM and Notify Hub up."""
    setups = {0: refenv.zero_setup_yaml(), 1: refenv.example_setup_yaml(), 2: RICH_SETUP}
    expected = {
        1: ["AEU PSU1", "AEU cRIO", "Dummy Device", "PUNA Hexapod"],
        2: ["Counter", "Deep PSU", "Dummy Device", "Thermometer without id"],
    }
    with CgseEnv(tmp_path / "site", setups=setups, setup_id=2) as site:
        site.start_core(("registry", "nh", "sm", "cm"))
        with ours_in(site) as ours:
            ours.start()
            wait_for(lambda: "following new_setup events" in ours.log_text(), 10, "our Notify Hub subscription")
            code = LOAD_THEN_ASK.replace("PM_PORT", str(site.ports.pm_cmd))
            out = site.run_json(code.replace("ROUNDS", "10").replace("EVENT_WAIT_MS", "2000"), timeout=120)
            rounds = out["rounds"]
            for r in rounds:
                assert r["devices"] == expected[r["id"]], r
            # The answers between the loads came from the cache (the log says when it may be used).
            assert "names the Configuration Manager's Setup: answering from the cache" in ours.log_text()
            assert "new Setup announced by the Notify Hub" in ours.log_text()

            # The Notify Hub goes away: nothing would announce a load, so every call asks the CM again.
            site.get("nh").stop()
            wait_for(lambda: "Notify Hub subscription lost" in ours.log_text(), 10, "the subscription lost")
            without_hub = site.run_json(code.replace("ROUNDS", "2").replace("EVENT_WAIT_MS", "0"), timeout=120)
            for r in without_hub["rounds"]:
                assert r["devices"] == expected[r["id"]], r
            print(
                f"[figure] get_devices p50 with the Notify Hub down (asks the CM): "
                f"{without_hub['p50_after'] * 1e3:.3f} ms"
            )
            after = sorted(r["event_after_reply_ms"] for r in rounds if r["event_after_reply_ms"] is not None)
            ask = sorted(r["ask_ms"] for r in rounds)
            print(
                f"\n[figure] new_setup event after the load_setup reply: median {statistics.median(after):.2f} ms, "
                f"min {after[0]:.2f}, max {after[-1]:.2f} ({len(after)}/{len(rounds)} events seen)"
                f"\n[figure] get_devices right after load_setup: median {statistics.median(ask):.3f} ms, "
                f"max {ask[-1]:.3f}"
                f"\n[figure] get_devices p50 (REQ, CM and Notify Hub up): {out['p50_before'] * 1e3:.3f} ms before the "
                f"loads, {out['p50_after'] * 1e3:.3f} ms after"
            )


# ------------------------------------------------------------------------------------------------------------------
# Storage Manager: rows in its CSV, an outage of 30 s, register_to_storage


@pytest.mark.timeout(240)
def test_housekeeping_survives_a_storage_manager_outage(site: CgseEnv) -> None:
    site.start_core(("registry", "sm"))
    path = site.daily_csv_path()
    with ours_in(site) as ours:
        ours.start()
        assert set_hk_frequency(site, site.ports.pm_srv, 4) == 250.0
        wait_for(lambda: path.exists() and len(hk_rows(path)) >= 8, 20, "rows through the Storage Manager")
        assert "housekeeping goes to the Storage Manager" in ours.log_text()

        sm = site.get("sm")
        before = len(hk_rows(path))
        sm.stop()  # SIGTERM: the SM closes its files and forgets every registration
        t_down = time.monotonic()
        time.sleep(30)
        during = len(hk_rows(path))
        assert during - before >= 60, f"rows during the outage: {during - before}"
        assert "Storage Manager not storing" in ours.log_text()
        sm.start()
        sm.wait_ready()
        outage = time.monotonic() - t_down
        wait_for(lambda: "forgot our registration" in ours.log_text(), 10, "re-registration after the SM restart")
        n_back = len(hk_rows(path))
        wait_for(lambda: len(hk_rows(path)) >= n_back + 8, 30, "rows continue after the restart")
        # ... written by the Storage Manager again: it has our registration.
        names = site.run_json(
            "from egse.storage import StorageProxy\nwith StorageProxy() as sm:\n    emit(sm.get_registry_names())\n"
        )
        assert "PM" in names
        log = ours.log_text()
        assert log.rfind("housekeeping goes to the Storage Manager") > log.rfind("Storage Manager not storing")

        rows = hk_rows(path)
        assert len(rows) == len(set(rows)), "no record twice"
        times = row_times(rows)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(g >= 0 for g in gaps), "in order"
        print(
            f"\n[figure] SM outage of {outage:.1f} s: {len(rows)} rows, {during - before} written directly, "
            f"largest gap between consecutive records {max(gaps):.3f} s"
        )
        assert max(gaps) < 1.5, "no record of the outage is missing"
    # At shutdown we unregistered.
    names = site.run_json(
        "from egse.storage import StorageProxy\nwith StorageProxy() as sm:\n    emit(sm.get_registry_names())\n"
    )
    assert "PM" not in names


@pytest.mark.timeout(120)
def test_embedded_defaults_then_register_to_storage(site: CgseEnv) -> None:
    """No CGSE service at all: the local Setup, local CSV files; then the SM appears and register_to_storage
    moves housekeeping to it."""
    path = site.daily_csv_path()
    with ours_in(site) as ours:
        ours.start()
        # The Setup the site's last_setup_id.txt names (1), read from the conf folder.
        devices = device_lists(site)["devices"]
        assert sorted(devices) == ["AEU PSU1", "AEU cRIO", "Dummy Device", "PUNA Hexapod"]
        assert set_hk_frequency(site, site.ports.pm_srv, 4) == 250.0
        wait_for(lambda: path.exists() and len(hk_rows(path)) >= 4, 10, "rows in the local CSV file")
        nack = register_to_storage(site, site.ports.pm_srv)
        assert nack.startswith("('NACK'") and "local CSV" in nack, nack
        site.start_core(("registry", "sm"))
        assert register_to_storage(site, site.ports.pm_srv) == "('ACK',)"
        n = len(hk_rows(path))
        wait_for(lambda: len(hk_rows(path)) >= n + 4, 30, "rows through the Storage Manager")
        names = site.run_json(
            "from egse.storage import StorageProxy\nwith StorageProxy() as sm:\n    emit(sm.get_registry_names())\n"
        )
        assert "PM" in names
        rows = hk_rows(path)
        assert len(rows) == len(set(rows))


# ------------------------------------------------------------------------------------------------------------------
# Registry outages and our own crash


@pytest.mark.timeout(180)
def test_registry_killed_and_restarted(site_zero: CgseEnv) -> None:
    site = site_zero
    registry = site.start("registry")
    with ours_in(site) as ours:
        ours.start(wait=False)
        rec = ours.wait_registered()
        port = int(rec["port"])
        registry.kill()
        # The registry's database survives a restart; wipe it so that our record is really gone.
        for f in site.run_dir.glob("service_registry.db*"):
            f.unlink()
        # We keep answering while the registry is away (longer than one heartbeat period).
        t_end = time.monotonic() + 12
        lat = []
        while time.monotonic() < t_end:
            lat += ping_latencies(port, 20)
            time.sleep(0.2)
        assert figures(lat)["max_ms"] < 100, figures(lat)
        assert "registry heartbeat failed" in ours.log_text()
        w0 = time.time()
        registry.start()
        rec2 = ours.wait_registered(timeout=11)
        took = registered_at(ours) - w0
        print(f"\n[figure] registry down for 12 s, restarted empty: registered again {took:.2f} s after its start")
        assert took < 3, "the daemon retries every second while the registry is away"
        assert rec2["id"] == rec["id"] and rec2["port"] == port

        # A short outage that no heartbeat sees: the next heartbeat finds the restarted (empty) registry without
        # our record and registers again at once: at most one heartbeat period (ttl 30 s / 3) after the last
        # heartbeat, which came before the kill, so within one period of the restart.
        last_beat = registered_at(ours)
        registry.kill()
        for f in site.run_dir.glob("service_registry.db*"):
            f.unlink()
        w0 = time.time()
        registry.start()
        ours.wait_registered(timeout=12)
        at = registered_at(ours)
        print(
            f"[figure] registry restarted empty between two heartbeats: registered again {at - w0:.2f} s after its "
            f"start, {at - last_beat:.2f} s after the last heartbeat"
        )
        assert at - last_beat < 10.5


def registered_at(ours: Ours) -> float:
    """Wall-clock time of the daemon's last "registered with the Service Registry" log line."""
    lines = [line for line in ours.log_text().splitlines() if "registered with the Service Registry" in line]
    assert lines, ours.logs()
    stamp = re.sub(r"\x1b\[[0-9;]*m", "", lines[-1]).split()[0]  # 2026-11-26T14:11:49.899272Z
    whole, frac = stamp.rstrip("Z").split(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + float("0." + frac)


@pytest.mark.timeout(120)
def test_kill_9_then_restart_registers_and_serves_within_a_second(site_zero: CgseEnv) -> None:
    site = site_zero
    site.start("registry")
    with ours_in(site, "first") as first:
        first.start(wait=False)
        rec = first.wait_registered()
        first.kill9()
    stale = site.registry_record("PM_CS")
    assert stale is not None and stale["id"] == rec["id"], "the crashed daemon's record stays"
    with ours_in(site, "second") as second:
        t0 = time.monotonic()
        second.start(wait=False)
        rec2 = second.wait_registered(timeout=30, other_than=rec["port"])
        took = time.monotonic() - t0
        print(f"\n[figure] kill -9 and restart at once: registered and serving after {took:.3f} s")
        assert rec2["id"] == rec["id"], "the same record, updated in place"


# ------------------------------------------------------------------------------------------------------------------
# Ping latency with the peers up and down


@pytest.mark.timeout(180)
def test_ping_latency_does_not_depend_on_the_peers(site: CgseEnv) -> None:
    site.start_core(("registry", "sm", "cm"))
    with ours_in(site) as ours:
        ours.start()
        set_hk_frequency(site, site.ports.pm_srv, 4)  # the HK task talks to the SM four times a second
        ping_latencies(site.ports.pm_cmd, 200)  # warm up
        up = ping_latencies(site.ports.pm_cmd, 2000)
        site.get("cm").stop()
        site.get("sm").stop()
        site.get("registry").stop()
        wait_for(lambda: "Storage Manager not storing" in ours.log_text(), 30, "the daemon notices the SM is gone")
        down = ping_latencies(site.ports.pm_cmd, 2000)
        fu, fd = figures(up), figures(down)
        print(f"\n[figure] Ping latency, SM+CM+registry up: {fu}; down: {fd}")
        # A dead peer costs PEER_CONNECT_TIMEOUT (0.3 s) per attempt, four attempts a second: a Ping that waited
        # on one would see hundreds of milliseconds at the median and the p99. The bounds are a fraction of
        # that, far above what a busy machine adds (p99 5 ms, max 13 ms with both cores saturated); the
        # latencies themselves are the benchmark's figures.
        assert fd["median_ms"] < 30, (fu, fd)
        assert fd["p99_ms"] < 100, (fu, fd)
