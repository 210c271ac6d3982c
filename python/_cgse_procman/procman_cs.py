"""Command line of the Process Manager: ``pm_cs`` and ``python -m egse.procman.procman_cs``.

Commands (the output is the original's):

``start``
    Run the daemon in the foreground until Ctrl-C, SIGTERM or ``pm_cs stop``. Exit code 0 after an
    orderly shutdown, 1 (with a one-line reason on stderr) when it cannot start.
``start-bg``
    Start ``python -m egse.procman.procman_cs start`` detached, in its own session. Its output goes to
    ``<log location>/pm_cs.start-bg.log``: the log location is ``<PROJECT>_LOG_FILE_LOCATION``, else
    ``<PROJECT>_DATA_STORAGE_LOCATION/<SITE_ID>/log``, else ``~/.local/state/procman/log``. Exit code 1
    if the daemon exits at once.
``status``
    Print whether the Process Manager is active, with its address and ports.
``stop [--all]``
    Send ``quit_server`` to the service port (with ``--all``: stop every managed process first). Exit code 1
    when the daemon cannot be reached.
``ps``, ``logs``, ``start-process``, ``stop-process``, ``restart``, ``reload``, ``events``
    The operator commands (README, "Command line").

Everything but ``start`` and ``start-bg`` is parsed and run by the Rust implementation the ``pm_cs`` binary
shares (``_native.cli_main``); ``status`` and ``stop`` print the original's texts. Settings come from the
embedded defaults and the file named by ``<PROJECT>_LOCAL_SETTINGS``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from egse.procman import (
    COMMANDING_PORT,
    HOSTNAME,
    PROCESS_NAME,
    PROTOCOL,
    _native,
)

#: The file ``start-bg`` sends the daemon's output to, inside the log location.
START_BG_LOG = "pm_cs.start-bg.log"


def strip_markup(text: str) -> str:
    """The text without its rich markup tags."""
    return "\n".join(_native.render_markup(line, 2**31, False) for line in text.split("\n"))


def wrap(line: str, width: int) -> list[str]:
    """Break a line at spaces so that no part exceeds ``width``, keeping the space at the break (as rich does)."""
    return _native.wrap_line(line, width)


def render(text: str, *, width: int | None = None, tty: bool | None = None) -> str:
    """Rich markup for the terminal: colours on a TTY; plain text wrapped at ``width`` (``COLUMNS`` or 80) otherwise."""
    if tty is None:
        tty = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    if width is None:
        try:
            width = int(os.environ.get("COLUMNS", "80"))
        except ValueError:
            width = 80
    return _native.render_markup(text, max(width, 1), tty)


def echo(text: str, *, end: str = "\n", width: int | None = None) -> None:
    sys.stdout.write(render(text, width=width) + end)
    sys.stdout.flush()


def start() -> int:
    """Run the daemon in the foreground."""
    try:
        return _native.serve()
    except KeyboardInterrupt:
        print("Shutdown requested...exiting")
        return 0
    except Exception as exc:  # noqa: BLE001 - a one-line reason instead of a traceback
        print(f"pm_cs start: {exc}", file=sys.stderr)
        return 1


def start_bg() -> int:
    """Start the daemon detached, its output in the log location."""
    endpoint = f"{PROTOCOL}://{HOSTNAME}:{COMMANDING_PORT}" if COMMANDING_PORT else None
    if endpoint is not None and _native.is_control_server_active(endpoint, 0.5):
        print(f"pm_cs start-bg: the Process Manager is already running at {endpoint}", file=sys.stderr)
        return 0
    try:
        log_dir = Path(_native.log_location())
        log_dir.mkdir(parents=True, exist_ok=True)
        log_file = log_dir / START_BG_LOG
        with open(log_file, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "egse.procman.procman_cs", "start"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
    except Exception as exc:  # noqa: BLE001 - a one-line reason instead of a traceback
        print(f"pm_cs start-bg: {exc}", file=sys.stderr)
        return 1
    # A daemon that cannot start (a port in use, bad settings) exits within moments: report it.
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        rc = proc.poll()
        if rc is not None:
            print(f"pm_cs start-bg: the daemon exited with code {rc}, see {log_file}", file=sys.stderr)
            return 1
        if endpoint is not None and _native.is_control_server_active(endpoint, 0.2):
            break
        if endpoint is None:
            time.sleep(0.1)
    return 0


def run(argv: Sequence[str], prog: str = "pm_cs") -> int:
    """Run a command of the Rust CLI (everything but ``start`` and ``start-bg``): parse, run, exit code."""
    sys.stdout.flush()
    return _native.cli_main([prog, *argv], "python")


def status() -> int:
    """Print the status of the Process Manager (the original's text)."""
    return run(["status"])


def stop() -> int:
    """Send ``quit_server`` to the Process Manager's service port."""
    return run(["stop"])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pm_cs`` and ``python -m egse.procman.procman_cs``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["start"]:
        return start()
    if args == ["start-bg"]:
        return start_bg()
    return run(args)


def app(argv: Sequence[str] | None = None) -> int:
    """The original's entry-point name: cgse-core's ``pm_cs`` script runs ``egse.procman.procman_cs:app``."""
    return main(argv)


#: Module-level names CGSE imports from here (``cgse pm re-register`` reads ``PROCESS_NAME``).
__all__ = ["PROCESS_NAME", "app", "main"]


if __name__ == "__main__":
    sys.exit(main())
