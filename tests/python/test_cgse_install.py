"""Our wheel in a real CGSE installation: one venv with cgse-core 0.25.11 (and its siblings) and cgse-procman.

The inputs are made by ``scripts/prepare-cgse-install.sh`` (our wheel, built once with ``maturin build --release``,
and a wheelhouse with cgse-core's pinned dependencies, downloaded once), so the venv is installed offline, inside
the private network namespace. The steps share one venv and run in order:

1. our wheel alone; 2. cgse-core after it; 3. ``pip install --force-reinstall --no-deps cgse-core``;
4. ``pip uninstall cgse-procman`` (the original is back and works); 5. our wheel after cgse-core;
6. ``PROCMAN_USE_ORIGINAL=1`` switches back without uninstalling; 7. ``cgse core start`` / ``status`` / ``stop``
with the Logger and the Metrics Hub (DuckDB): the Process Manager that runs is ours, and nothing is left behind.

At every step we check who provides ``egse.procman``, ``egse.procman.procman_cs`` and the ``pm_cs`` script, that
cgse-core's ``procman_ui`` and ``procman_protocol`` import, that every name CGSE imports from ``egse.procman.*``
exists, that cgse-core's files are byte for byte what its RECORD says, and ``pip check``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import venv
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import pids_of

REPO = Path(__file__).resolve().parents[2]
PREPARE = REPO / "scripts" / "prepare-cgse-install.sh"
INPUTS = Path(os.environ.get("PROCMAN_CGSE_INSTALL_DIR") or REPO / "target" / "cgse-install")

pytestmark = pytest.mark.timeout(900)

# Runs inside the test venv: who provides what, as JSON on stdout.
PROBE = r"""
import base64, csv, hashlib, importlib, importlib.metadata as md, json, os, shutil, sys, warnings
warnings.simplefilter("ignore")
out = {}
import egse.procman as m
import egse.procman.procman_cs as cs
out["init"] = m.__file__
out["cs"] = cs.__file__
out["path"] = list(m.__path__)
out["ours"] = "_cgse_procman" in m.__file__
names = {}
for module, wanted in {
    "egse.procman": ["ProcessManagerProxy", "ProcessManagerController", "ProcessManagerCommand", "StartCommand",
                     "StopCommand", "StatusCommand", "LOGGER", "get_status", "is_process_manager_active",
                     "PROCESS_NAME", "SERVICE_TYPE", "COMMANDING_PORT", "SERVICE_PORT", "MONITORING_PORT"],
    "egse.procman.procman_cs": ["PROCESS_NAME", "app"],
}.items():
    mod = importlib.import_module(module)
    names[module] = [n for n in wanted if not hasattr(mod, n)]
out["missing"] = names
out["process_name"] = cs.PROCESS_NAME
try:
    import egse.procman.procman_protocol as pp
    out["protocol"] = [pp.__file__, sorted(pp.COMMAND_SETTINGS.Commands)]
except Exception as exc:
    out["protocol"] = repr(exc)
try:
    import egse.procman.procman_ui as ui
    out["ui"] = [ui.__file__, callable(ui.main)]
except Exception as exc:
    out["ui"] = repr(exc)
try:
    import cgse_core.services  # its `pm re-register` imports PROCESS_NAME from egse.procman.procman_cs
    out["services"] = True
except ImportError as exc:
    out["services"] = repr(exc)
except Exception as exc:
    out["services"] = repr(exc)
# cgse-core's files, checked against its RECORD: nothing of it was overwritten.
try:
    dist = md.distribution("cgse-core")
    bad = []
    for f in dist.files or []:
        if f.hash is None or not str(f).startswith("egse/procman/"):
            continue
        digest = base64.urlsafe_b64encode(hashlib.new(f.hash.mode, f.locate().read_bytes()).digest()).rstrip(b"=")
        if digest.decode() != f.hash.value:
            bad.append(str(f))
    out["core_files_changed"] = bad
except md.PackageNotFoundError:
    out["core_files_changed"] = None
bindir = os.path.dirname(sys.executable)
out["scripts"] = sorted(n for n in ("pm_cs", "procman_cs", "pm_ui") if os.path.exists(os.path.join(bindir, n)))
print(json.dumps(out))
"""


@dataclass
class Venv:
    """The venv of this module, with helpers to run its tools offline."""

    root: Path
    wheel: Path
    wheelhouse: Path

    @property
    def python(self) -> str:
        return str(self.root / "bin" / "python")

    def bin(self, name: str) -> str:
        return str(self.root / "bin" / name)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CGSE_") and k not in ("PYTHONPATH",)}
        env.pop("PROCMAN_USE_ORIGINAL", None)
        env.update(
            {
                "PROJECT": "CGSE",
                "SITE_ID": "LAB",
                "CGSE_DOTENV_DISABLED": "1",
                "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                "PIP_NO_INPUT": "1",
            }
        )
        env.update(extra)
        return env

    def run(
        self, argv: list[str], timeout: float = 300, extra: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(**(extra or {})),
            cwd=self.root,
            check=False,
        )

    def pip(self, *args: str) -> None:
        r = self.run([self.python, "-m", "pip", *args, "--no-index", "--find-links", str(self.wheelhouse)])
        assert r.returncode == 0, f"pip {' '.join(args)}:\n{r.stdout}\n{r.stderr}"

    def uninstall(self, name: str) -> None:
        r = self.run([self.python, "-m", "pip", "uninstall", "-y", name])
        assert r.returncode == 0, r.stderr

    def probe(self, **extra: str) -> dict[str, Any]:
        r = self.run([self.python, "-c", PROBE], extra=extra)
        assert r.returncode == 0, f"probe failed:\n{r.stdout}\n{r.stderr}"
        result: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
        return result

    def pip_check(self) -> None:
        r = self.run([self.python, "-m", "pip", "check"])
        assert r.returncode == 0, f"pip check:\n{r.stdout}\n{r.stderr}"

    def script_is_ours(self, argv: list[str], **extra: str) -> bool:
        """Our CLI's help names procman; the original's (typer) does not."""
        r = self.run([*argv, "--help"], timeout=60, extra=extra)
        assert r.returncode == 0, f"{argv} --help:\n{r.stdout}\n{r.stderr}"
        return "(procman)" in r.stdout


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Venv]:
    prepared = subprocess.run(
        ["bash", str(PREPARE), "--offline"], capture_output=True, text=True, timeout=1800, check=False
    )
    if prepared.returncode != 0:
        message = f"scripts/prepare-cgse-install.sh failed:\n{prepared.stderr[-3000:]}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    wheel = Path(prepared.stdout.strip().splitlines()[-1])
    root = tmp_path_factory.mktemp("cgse-lab") / "venv"
    venv.create(root, with_pip=True)
    yield Venv(root, wheel, INPUTS / "wheelhouse")


def assert_ours(v: Venv, state: dict[str, Any]) -> None:
    assert state["ours"], state["init"]
    assert "_cgse_procman" in state["cs"], state["cs"]
    assert state["missing"] == {"egse.procman": [], "egse.procman.procman_cs": []}
    assert state["process_name"] == "pm_cs"
    assert v.script_is_ours([v.python, "-m", "egse.procman.procman_cs"])
    assert v.script_is_ours([v.bin("procman_cs")])


def assert_core_intact(v: Venv, state: dict[str, Any]) -> None:
    """cgse-core's modules import (theirs, next to ours), its files are unchanged, pip check is clean."""
    assert state["core_files_changed"] == []
    assert isinstance(state["protocol"], list), state["protocol"]
    assert state["protocol"][0].endswith("egse/procman/procman_protocol.py")
    assert "get_device_process_status" in state["protocol"][1]
    assert isinstance(state["ui"], list), state["ui"]
    assert state["ui"][0].endswith("egse/procman/procman_ui.py") and state["ui"][1]
    assert state["services"] is True, state["services"]
    assert "pm_cs" in state["scripts"] and "pm_ui" in state["scripts"]
    v.pip_check()


def test_install_orders_reinstall_uninstall_and_switch(lab: Venv) -> None:
    v = lab
    # 1. Ours alone: egse.procman and the procman_cs script are ours; there is no pm_cs of ours.
    v.pip("install", "-q", str(v.wheel))
    state = v.probe()
    assert_ours(v, state)
    assert state["path"] == [str(Path(state["init"]).parent)]
    assert state["scripts"] == ["procman_cs"]
    assert state["core_files_changed"] is None
    v.pip_check()

    # 2. cgse-core after ours: still ours, cgse-core's own modules behind it.
    v.pip("install", "-q", "cgse-core==0.25.11")
    state = v.probe()
    assert_ours(v, state)
    assert_core_intact(v, state)
    assert state["path"][1].endswith("site-packages/egse/procman"), state["path"]
    assert v.script_is_ours([v.bin("pm_cs")]), "cgse-core's pm_cs runs egse.procman.procman_cs:app: ours"

    # 3. cgse-core reinstalled: nothing of ours was in its files, so nothing changes.
    v.pip("install", "-q", "--force-reinstall", "--no-deps", "cgse-core==0.25.11")
    state = v.probe()
    assert_ours(v, state)
    assert_core_intact(v, state)
    assert v.script_is_ours([v.bin("pm_cs")])

    # 4. Our uninstall: cgse-core's original is back, whole.
    v.uninstall("cgse-procman")
    state = v.probe()
    assert not state["ours"], state["init"]
    assert state["init"].endswith("site-packages/egse/procman/__init__.py")
    assert state["cs"].endswith("site-packages/egse/procman/procman_cs.py")
    assert_core_intact(v, state)
    assert "procman_cs" not in state["scripts"]
    assert not v.script_is_ours([v.bin("pm_cs")])
    assert not list(v.root.glob("lib/python3*/site-packages/cgse_procman_hook.pth")), "the .pth went with us"

    # 5. Ours after cgse-core.
    v.pip("install", "-q", str(v.wheel))
    state = v.probe()
    assert_ours(v, state)
    assert_core_intact(v, state)
    assert v.script_is_ours([v.bin("pm_cs")])

    # 6. The switch back to the original, without uninstalling.
    state = v.probe(PROCMAN_USE_ORIGINAL="1")
    assert not state["ours"] and state["init"].endswith("site-packages/egse/procman/__init__.py")
    assert not v.script_is_ours([v.bin("pm_cs")], PROCMAN_USE_ORIGINAL="1")


# -- 7. cgse core start / status / stop with our Process Manager ------------------------------------------------------

# What the lab reads after `cgse core start/stop`: our records in the Logger's general.log, our housekeeping in the
# Metrics Hub's DuckDB. Each is one function of the finished site.
PM_SENDER = re.compile(r"^\S+ \[\s*\w+\] \[\s*pm_cs\] ")


def pm_lines_in_general_log(site: Site) -> bool:
    """A record the Process Manager itself sent: the Logger writes the sender's process name in the second
    bracket (``… [   INFO] [       pm_cs] …``); the registry's lines about pm_cs name ``rs_cs`` there."""
    log = site.log_dir / "general.log"
    return log.exists() and any(PM_SENDER.search(line) for line in log.read_text().splitlines())


def pm_points_in_duckdb(site: Site) -> bool:
    code = (
        "import duckdb, sys; c = duckdb.connect(sys.argv[1], read_only=True); "
        "print(c.execute(\"select count(*) from timeseries where measurement = 'pm'\").fetchone()[0])"
    )
    r = site.venv.run([site.venv.python, "-c", code, str(site.duckdb)], timeout=60)
    return r.returncode == 0 and int(r.stdout.strip() or 0) > 0


@dataclass
class Site:
    venv: Venv
    root: Path
    log_dir: Path
    duckdb: Path
    env: dict[str, str]
    ran: bool = False  # cgse core start/stop ran to its end in this site


def _site_pids(marker: str) -> list[int]:
    """Every process whose environment names this site (the services cgse core start spawned)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                stat = (entry / "stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for: {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def site(lab: Venv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    if not sys.platform.startswith("linux"):
        pytest.skip("Linux only")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from refenv import in_private_netns, setup_filename, zero_setup_yaml

    if not in_private_netns() and os.environ.get("PROCMAN_ALLOW_HOST_NET") != "1":
        pytest.skip("cgse core start binds the default CGSE ports: run in a private network namespace")
    v = lab
    try:
        state = v.probe()
    except AssertionError:  # this test alone, on an empty venv: nothing to import yet
        state = {"ours": False, "core_files_changed": None}
    if not state["ours"] or state["core_files_changed"] is None:  # this test alone: put both in
        v.pip("install", "-q", "cgse-core==0.25.11", str(v.wheel))
    root = tmp_path_factory.mktemp("cgse-site")
    for sub in ("data/LAB/daily", "data/LAB/obs", "conf", "log", "run"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "data/LAB/last_setup_id.txt").write_text("0")
    (root / "conf" / setup_filename("LAB", 0)).write_text(zero_setup_yaml("LAB"))
    duck = root / "metrics.duckdb"
    env = v.env(
        CGSE_DATA_STORAGE_LOCATION=str(root / "data"),
        CGSE_CONF_DATA_LOCATION=str(root / "conf"),
        CGSE_LOG_FILE_LOCATION=str(root / "log"),
        CGSE_METRICS_BACKEND="duckdb",
        CGSE_DUCKDB_PATH=str(duck),
        PROCMAN_SITE_MARKER=str(root),
        PATH=str(v.root / "bin") + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"),
    )
    s = Site(v, root, root / "log", duck, env)
    try:
        yield s
    finally:
        for pid in _site_pids(str(root)):  # whatever the test left running, by pid
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


def _cgse(s: Site, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [s.venv.bin("cgse"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=s.env,
        cwd=s.root / "run",
        check=False,
    )


def test_cgse_core_start_status_stop_runs_our_process_manager(site: Site) -> None:
    s = site
    r = _cgse(s, "core", "start")
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    marker = str(s.root)

    def pm_pids() -> list[int]:
        return pids_of(["egse.procman.procman_cs", "start"], marker)

    _wait(lambda: len(pm_pids()) == 1, 60, "one `procman_cs start` process")
    (pid,) = pm_pids()
    # Ours: the module it runs is our procman_cs (the hook) and our daemon answers our commanding command.
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "_cgse_procman/_native" in maps, "the Process Manager process has not loaded our extension"

    def pm_status() -> str:
        return subprocess.run(
            [s.venv.bin("pm_cs"), "status"], capture_output=True, text=True, timeout=60, env=s.env, check=False
        ).stdout

    def active() -> bool:
        return "Status: active" in pm_status()

    def metrics_line() -> str:
        code = "from egse.procman import ProcessManagerProxy\nwith ProcessManagerProxy() as pm:\n"
        code += "    print(pm.get_status()['metrics'])"
        r = subprocess.run(
            [s.venv.python, "-c", code], capture_output=True, text=True, timeout=60, env=s.env, check=False
        )
        return r.stdout + r.stderr

    _wait(active, 60, "pm_cs status: active")
    # The first housekeeping period (Procman.HOUSEKEEPING_PERIOD, 10 s) has gone to the Metrics Hub before the
    # core is stopped: the points are then in its database once it has flushed on stop.
    sent = re.compile(r"Metrics Hub: connected to \S+ \(([1-9]\d*) sent")
    # (what `pm_cs status` of the Rust binary prints; the Python CLI keeps the original's text)
    last = [""]

    def points_sent() -> bool:
        last[0] = metrics_line()
        return bool(sent.search(last[0]))

    try:
        _wait(points_sent, 60, "pm_cs status: points sent to the Metrics Hub")
    except AssertionError as e:
        raise AssertionError(f"{e}; last status:\n{last[0]}") from None
    status = _cgse(s, "core", "status", timeout=180)
    assert "Process Manager:" in status.stdout and "Status: active" in status.stdout, status.stdout
    # The call the CGSE documentation shows, in the lab's venv, against the daemon cgse core start started.
    code = "import json\nfrom egse.procman import ProcessManagerProxy\nwith ProcessManagerProxy() as pm:\n"
    code += "    print(json.dumps(pm.get_status()))"
    r = subprocess.run([s.venv.python, "-c", code], capture_output=True, text=True, timeout=60, env=s.env, check=False)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    status = json.loads(r.stdout.strip().splitlines()[-1])
    assert status["commanding_port"] == 6120 and status["service_port"] == 6122, status
    assert status["registry"].startswith("Service Registry"), status

    r = _cgse(s, "core", "stop", timeout=180)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    _wait(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid), 30, f"the Process Manager {pid} exits")
    _wait(lambda: _site_pids(marker) == [], 30, f"no process of the site left (left: {_site_pids(marker)})")
    s.ran = True


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_pm_lines_in_general_log(site: Site) -> None:
    assert site.ran, "the cgse core start/stop run above did not finish"
    assert pm_lines_in_general_log(site), f"no Process Manager line in {site.log_dir / 'general.log'}"


def test_pm_points_in_duckdb(site: Site) -> None:
    assert site.ran, "the cgse core start/stop run above did not finish"
    assert pm_points_in_duckdb(site), f"no measurement 'pm' in {site.duckdb}"
