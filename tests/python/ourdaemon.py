"""Run OUR daemon (the Rust ``pm_cs`` binary) inside a ``refenv.CgseEnv`` site, for tests.

The daemon reads the site's local settings (``CGSE_LOCAL_SETTINGS``), so it listens on the ports the site
allocated for the Process Manager, next to whichever reference services the test started. Every daemon is
stopped and reaped by pid, also when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Self  # only for the annotation (typing.Self needs 3.11)

from refenv import CgseEnv, ping_control_server

REPO = Path(__file__).resolve().parents[2]


def pm_cs_binary() -> str:
    """The daemon binary: ``$PROCMAN_PM_CS``, else ``target/release/pm_cs``, else ``target/debug/pm_cs``."""
    explicit = os.environ.get("PROCMAN_PM_CS")
    if explicit:
        return explicit
    for profile in ("release", "debug"):
        candidate = REPO / "target" / profile / "pm_cs"
        if candidate.exists():
            return str(candidate)
    raise RuntimeError("no pm_cs binary: run `cargo build --release --bin pm_cs` or set PROCMAN_PM_CS")


def our_cli(
    site: CgseEnv, *args: str, program: list[str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Our ``pm_cs <args>`` as an operator would run it in the site (its settings, its environment);
    ``program`` instead of the binary, e.g. ``python -m egse.procman.procman_cs``."""
    return subprocess.run(
        [*(program or [pm_cs_binary()]), *args],
        env=site.env(),
        cwd=site.run_dir,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class OurDaemon:
    """One ``pm_cs start`` of ours in a CGSE site."""

    def __init__(self, env: CgseEnv, name: str = "ours", extra_env: dict[str, str] | None = None) -> None:
        self.env = env
        self.name = name
        self.extra_env = dict(extra_env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.stdout = env.procs_dir / f"{name}.out"
        self.stderr = env.procs_dir / f"{name}.err"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("not started")
        return self.proc.pid

    def start(self, wait: bool = True, timeout: float = 10.0) -> Self:
        environment = self.env.env(PROCMAN_LOG=os.environ.get("PROCMAN_LOG", "info"), **self.extra_env)
        with open(self.stdout, "ab") as out, open(self.stderr, "ab") as err:
            self.proc = subprocess.Popen(
                [pm_cs_binary(), "start"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=environment,
                cwd=self.env.run_dir,
                start_new_session=True,
            )
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 10.0) -> float:
        """Wait until the commanding port answers ``Ping`` (static ports only); returns the seconds taken."""
        started = time.monotonic()
        port = self.env.ports.pm_cmd
        while time.monotonic() - started < timeout:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"our daemon exited with {self.proc.returncode}:\n{self.logs()}")
            if port and ping_control_server(port, timeout=0.3):
                return time.monotonic() - started
            time.sleep(0.02)
        raise RuntimeError(f"our daemon not ready after {timeout} s:\n{self.logs()}")

    def logs(self, lines: int = 40) -> str:
        text = self.stderr.read_text(errors="replace") if self.stderr.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_exit(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        rc = self.wait_exit(timeout)
        if rc is None:
            self.kill()
            rc = self.wait_exit(5)
        return rc

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
