"""Our daemon next to the REAL cgse-core Logger (``log_cs``), Metrics Hub (``mh_cs``, DuckDB backend) and the
file signals ``cgse_core.services`` writes.

- Our log lines reach the lab's ``general.log`` through ``log_cs``, formatted like the lines of a CGSE process.
- Housekeeping reaches the Metrics Hub: points of measurement ``pm`` and ``pm_process`` land in DuckDB.
- A ``reregister`` signal file is consumed and re-registers us with the Service Registry.

Runs inside a private network namespace (``scripts/in-netns.sh``) with the reference venv; skipped otherwise.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import refenv
from gate import refenv_marks, wait_for
from ourdaemon import OurDaemon, our_cli
from refenv import CgseEnv, RefEnvError

pytestmark = refenv_marks(slow=True)

# log_cs's file format: "{asctime} [{levelname:>8s}] [{processName:>12s}] {message} ({name}:{process}:
# {package_name}:{filename}:{lineno:d})", asctime as YYYY-MM-DDTHH:MM:SS.mmm.
LINE = re.compile(
    r"^(?P<asctime>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}) \[(?P<level>[ A-Z]{8,})\] \[(?P<process_name>[^\]]{12,})\] "
    r"(?P<message>.*) \((?P<name>[^:()]+):(?P<pid>\d+):(?P<package>[^:()]+):(?P<file>[^:()]+):(?P<line>\d+)\)$"
)


def our_status(site: CgseEnv) -> str:
    return our_cli(site, "status").stdout


@pytest.fixture
def site(tmp_path: Path) -> Iterator[CgseEnv]:
    extra = {"Procman": {"SIGNAL_DIR": str(tmp_path / "signals"), "HOUSEKEEPING_PERIOD": 1}}
    env_vars = {"CGSE_METRICS_BACKEND": "duckdb", "CGSE_DUCKDB_PATH": str(tmp_path / "metrics.duckdb")}
    with CgseEnv(tmp_path / "site", extra_settings=extra, extra_env=env_vars) as env:
        yield env


@pytest.fixture
def ours(site: CgseEnv) -> Iterator[OurDaemon]:
    d = OurDaemon(site)
    try:
        yield d
    finally:
        d.stop()


@pytest.mark.timeout(120)
def test_our_log_lines_reach_general_log_formatted_like_the_others(site: CgseEnv, ours: OurDaemon) -> None:
    site.start_registry()
    site.start_logger()
    ours.start()
    general = site.log_dir / "general.log"

    def ours_lines() -> list[re.Match[str]]:
        text = general.read_text(errors="replace") if general.exists() else ""
        found = [LINE.match(line) for line in text.splitlines()]
        return [m for m in found if m and m["process_name"].strip() == "pm_cs" and int(m["pid"]) == ours.pid]

    lines = wait_for(ours_lines, 20, "a line of our daemon in general.log")
    # A line from a CGSE Python process through egse.logger, for comparison. Its handler sends with IMMEDIATE and
    # NOBLOCK, so a record emitted before the connection is up is dropped: it logs until the line is in the file.
    rc, _, err = site.run(
        "import logging, pathlib, time\n"
        "from egse.logger import remote_logging\n"
        f"general = pathlib.Path({str(general)!r})\n"
        "deadline = time.monotonic() + 20\n"
        "with remote_logging():\n"
        "    while 'hello from python' not in general.read_text(errors='replace'):\n"
        "        assert time.monotonic() < deadline, 'the line never reached general.log'\n"
        "        logging.getLogger('egse.peers_test').warning('hello from python')\n"
        "        time.sleep(0.2)\n",
        timeout=40,
    )
    assert rc == 0, err
    python_line = wait_for(
        lambda: [
            m for line in general.read_text().splitlines() if (m := LINE.match(line)) and "hello from python" in line
        ],
        20,
        "the reference Python line in general.log",
    )[0]
    assert python_line["level"].strip() == "WARNING"
    first = lines[0]
    assert first["level"].strip() in {"INFO", "WARNING", "DEBUG", "ERROR"}
    assert first["name"].startswith("procman")
    assert first["file"].endswith(".rs") and int(first["line"]) > 0
    # The daemon logs its listening line at INFO with the ports.
    wait_for(lambda: any("listening" in m["message"] for m in ours_lines()), 20, "the 'listening' line")
    # Nothing below INFO arrives (PROCMAN_LOG=info decides for the Logger too).
    assert all(m["level"].strip() != "DEBUG" for m in ours_lines())
    status = wait_for(lambda: (s := our_status(site)) and "Logger: connected to" in s and s, 20, "status line")
    assert re.search(r"Logger: connected to tcp://\S+ \(\d+ sent, 0 dropped\)", status), status


def _mh_statistics(site: CgseEnv) -> dict[str, Any]:
    code = (
        "from egse.metricshub.client import MetricsHubClient\n"
        "with MetricsHubClient() as c:\n"
        "    emit(c.server_status())\n"
    )
    try:
        reply = site.run_json(code, timeout=30)
    except RefEnvError:
        return {}
    return dict(reply.get("statistics", {})) if isinstance(reply, dict) else {}


@pytest.mark.timeout(180)
def test_housekeeping_points_reach_the_metrics_hub_duckdb(site: CgseEnv, ours: OurDaemon, tmp_path: Path) -> None:
    site.start_registry()
    site.start_metrics_hub()
    ours.start()
    # Points flow: the hub reports them written (it holds the DuckDB file while it runs).
    stats = wait_for(
        lambda: (s := _mh_statistics(site)) and s.get("written", 0) >= 4 and s, 60, "points written by the hub"
    )
    assert stats.get("errors", 0) == 0, stats
    status = our_status(site)
    assert re.search(r"Metrics Hub: connected to tcp://\S+ \(\d+ sent, 0 dropped\)", status), status
    site.get("mh").stop()
    db = tmp_path / "metrics.duckdb"
    rows = site.run_json(
        "import duckdb, json\n"
        f"con = duckdb.connect({str(db)!r}, read_only=True)\n"
        "rows = con.execute('SELECT measurement, tags, fields FROM timeseries ORDER BY time').fetchall()\n"
        "emit([[m, json.loads(t), json.loads(f)] for m, t, f in rows])\n",
        timeout=60,
    )
    pm = [r for r in rows if r[0] == "pm"]
    per_process = [r for r in rows if r[0] == "pm_process"]
    assert pm and per_process, rows[:5]
    assert pm[0][1] == {"site_id": site.site_id, "origin": "PM"}
    assert set(pm[0][2]) == {
        "processes",
        "running",
        "starting",
        "backoff",
        "stopping",
        "stopped",
        "exited",
        "fatal",
        "restarts",
        "rss",
        "cpu_percent",
    }
    assert pm[0][2]["rss"] > 0
    tags = per_process[0][1]
    assert tags["site_id"] == site.site_id and tags["origin"] == "PM" and tags["process_id"]
    assert set(per_process[0][2]) == {"state_code", "restarts", "cpu_percent", "rss", "uptime"}


@pytest.mark.timeout(120)
def test_a_reregister_signal_file_is_consumed_and_reregisters(site: CgseEnv, ours: OurDaemon, tmp_path: Path) -> None:
    site.extra_settings.setdefault("Procman", {})["REGISTRY_TTL"] = 600  # renewals far apart: only the signal acts
    site.write_settings()
    site.start_registry()
    ours.start()
    record = wait_for(lambda: site.registry_record("PM_CS"), 20, "our registry record")
    signals = tmp_path / "signals"

    # The registry loses our record; a non-forced re-register brings it back (the heartbeat is 200 s away).
    reply = refenv.registry_request(site.ports, {"action": "deregister", "service_id": record["id"]})
    assert reply and reply.get("success"), reply
    assert site.registry_record("PM_CS") is None

    def signal(force: bool) -> None:
        # Exactly what `cgse core pm_cs re-register` does, into our directory.
        site.run(
            "from pathlib import Path\n"
            "from egse.signal import create_signal_command_file\n"
            "from egse.procman.procman_cs import PROCESS_NAME\n"
            f"create_signal_command_file(Path({str(signals)!r}), PROCESS_NAME, "
            f"{{'action': 'reregister', 'params': {{'force': {force!r}}}}})\n"
        )

    signal(False)
    again = wait_for(lambda: site.registry_record("PM_CS"), 20, "our record back after the signal")
    assert again["id"] == record["id"]
    wait_for(lambda: not list(signals.glob("pm_cs_*.json")), 10, "the signal file consumed")

    # A forced one, and a bad file: removed, logged, and the daemon keeps serving.
    (signals / "pm_cs_bad.json").write_text("{not json")
    signal(True)
    wait_for(lambda: not list(signals.glob("pm_cs_*.json")), 10, "both files consumed")
    status = wait_for(
        lambda: (s := our_status(site)) and "2 re-registration(s) on signal" in s and s, 20, "status after signals"
    )
    assert "registered as" in status, status
    assert site.registry_record("PM_CS") is not None
    assert refenv.ping_control_server(site.ports.pm_cmd)
    log = ours.stderr.read_text(errors="replace")
    assert "signal file is not a valid command" in log
    assert json.dumps(record["id"])  # the id stayed ours throughout
