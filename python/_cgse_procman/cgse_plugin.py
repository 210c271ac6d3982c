"""``cgse procman …``: the operator commands of ``pm_cs`` as a ``cgse`` command group.

Registered under the ``cgse.command`` entry-point group (``pyproject.toml``), which cgse-common's ``cgse`` app
loads: a ``typer.Typer`` found there becomes a command group. Each command hands its arguments unparsed to
the Rust CLI (``_native.cli_main``), so ``cgse procman ps --json`` and ``pm_cs ps --json`` are one
implementation. typer is cgse's dependency, not ours: it is imported only when ``cgse`` loads this module.
"""

import importlib
from collections.abc import Callable, Sequence
from typing import Any

from egse.procman import _native

#: The ``pm_cs`` commands offered under ``cgse procman`` (``start``/``start-bg`` stay with ``cgse core``).
COMMANDS = (
    "status",
    "stop",
    "ps",
    "logs",
    "start-process",
    "stop-process",
    "restart",
    "reload",
    "events",
)

PROG = "cgse procman"


def procman_cli(argv: Sequence[str]) -> int:
    """Run ``cgse procman <argv>``: the exit code of the Rust CLI."""
    return _native.cli_main([PROG, *argv], "python")


def _command(typer: Any, name: str) -> Callable[..., None]:
    def command(ctx: typer.Context) -> None:
        raise typer.Exit(procman_cli([name, *ctx.args]))

    command.__name__ = name.replace("-", "_")
    command.__doc__ = f"pm_cs {name} (see `cgse procman {name} --help`)."
    return command


def build_app() -> Any:
    """The ``typer.Typer`` group with one pass-through command per entry of :data:`COMMANDS`."""
    typer: Any = importlib.import_module("typer")
    group = typer.Typer(name="procman", help="The Process Manager (procman): processes, logs, events, reload.")
    for name in COMMANDS:
        group.command(
            name=name,
            add_help_option=False,
            context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        )(_command(typer, name))
    return group


def __getattr__(name: str) -> Any:
    # `app` is built on first access, so importing this module does not need typer.
    if name == "app":
        return build_app()
    raise AttributeError(name)
