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
``stop``
    Send ``quit_server`` to the service port. Exit code 1 when the daemon cannot be reached.

Settings come from the embedded defaults and the file named by ``<PROJECT>_LOCAL_SETTINGS``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from egse.procman import (
    COMMANDING_PORT,
    HOSTNAME,
    PROTOCOL,
    SERVICE_PORT,
    SERVICE_TYPE,
    Failure,
    ServiceProxy,
    _native,
    get_status,
)

#: The file ``start-bg`` sends the daemon's output to, inside the log location.
START_BG_LOG = "pm_cs.start-bg.log"

# Rich markup tags as the original's texts use them: [green], [red], [bold red], [/], [/green].
_TAG = re.compile(r"\[(/?[a-z]+(?: [a-z]+)*|/)\]")
_ANSI = {"red": "31", "green": "32", "yellow": "33", "blue": "34", "bold": "1"}


def strip_markup(text: str) -> str:
    """The text without its rich markup tags."""
    return _TAG.sub("", text)


def wrap(line: str, width: int) -> list[str]:
    """Break a line at spaces so that no part exceeds ``width``, keeping the space at the break (as rich does)."""
    if len(line) <= width:
        return [line]
    parts: list[str] = []
    current = ""
    for word in re.findall(r"\S+\s*|\s+", line):
        if current and len(current) + len(word.rstrip()) > width:
            parts.append(current)
            current = word
        else:
            current += word
    parts.append(current)
    return parts


def render(text: str, *, width: int | None = None, tty: bool | None = None) -> str:
    """Rich markup for the terminal: colours on a TTY; plain text wrapped at ``width`` (``COLUMNS`` or 80) otherwise."""
    if tty is None:
        tty = sys.stdout.isatty()
    if tty:

        def colour(m: re.Match[str]) -> str:
            tag = m.group(1)
            if tag.startswith("/"):
                return "\x1b[0m"
            codes = [_ANSI[t] for t in tag.split() if t in _ANSI]
            return f"\x1b[{';'.join(codes)}m" if codes else ""

        return _TAG.sub(colour, text)
    if width is None:
        try:
            width = int(os.environ.get("COLUMNS", "80"))
        except ValueError:
            width = 80
    width = max(width, 1)
    return "\n".join("\n".join(wrap(line, width)) for line in strip_markup(text).split("\n"))


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


def status() -> int:
    """Print the status of the Process Manager."""
    try:
        text = get_status()
    except Exception as exc:  # noqa: BLE001 - e.g. dynamic ports and no registry entry
        text = f"Process Manager Status: [red]not active[/] ({exc})"
    echo(text, end="")
    return 0


def stop() -> int:
    """Send ``quit_server`` to the Process Manager's service port."""
    if COMMANDING_PORT == 0 or SERVICE_PORT == 0:
        try:
            endpoint = ServiceProxy(service_type=SERVICE_TYPE).get_endpoint()
            _, hostname, port = endpoint.replace("://", ":").split(":")
            service_port = int(port)
        except Exception:  # noqa: BLE001 - no registry, no entry, bad endpoint: all mean the same here
            echo("[red]ERROR: Couldn't determine how to connect to the process manager. No service defined.[/]")
            return 1
    else:
        hostname, service_port = HOSTNAME, SERVICE_PORT

    echo("[green]Sending 'quit' command to process manager..[/]")
    try:
        with ServiceProxy(protocol=PROTOCOL, hostname=hostname, port=service_port) as proxy:
            reply = proxy.quit_server()
    except ConnectionError as exc:
        echo(f"[red]ERROR: Couldn't connect to process manager: {exc}[/]", width=120)
        return 1
    if isinstance(reply, Failure):
        echo(f"[red]ERROR: the process manager did not confirm: {reply}[/]", width=120)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pm_cs`` and ``python -m egse.procman.procman_cs``."""
    parser = argparse.ArgumentParser(
        prog="pm_cs",
        description="The CGSE Process Manager control server (procman).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser("start", help="run the Process Manager in the foreground")
    commands.add_parser("start-bg", help="start the Process Manager in the background")
    commands.add_parser("status", help="print the status of the Process Manager")
    commands.add_parser("stop", help="ask the Process Manager to quit")
    args = parser.parse_args(argv)
    handlers = {"start": start, "start-bg": start_bg, "status": status, "stop": stop}
    return handlers[args.command]()


if __name__ == "__main__":
    sys.exit(main())
