"""The Rust side of ``egse.procman``: proxies, value conversion, settings and the daemon.

Every call that waits for the network releases the GIL and can be interrupted with Ctrl-C
(``KeyboardInterrupt``); an interrupted request leaves the proxy usable (it reconnects).
"""

from os import PathLike
from pathlib import Path
from typing import Any, TypedDict, final

from egse.procman import Failure
from typing_extensions import Self, disjoint_base

__all__ = [
    "DynamicCommand",
    "GlobalRef",
    "ProcessManagerProxy",
    "Proxy",
    "RemoteObject",
    "ServiceProxy",
    "__version__",
    "cli_main",
    "is_control_server_active",
    "is_process_manager_active",
    "load_settings",
    "log_location",
    "process_manager_settings",
    "render_markup",
    "serve",
    "wrap_line",
]

__version__: str

class _ProcessManagerStatus(TypedDict):
    """``ProcessManagerProxy.get_status()``: what ``pm_cs status`` shows."""

    hostname: str
    commanding_port: int
    monitoring_port: int
    service_port: int
    registry: str
    setup: str
    housekeeping: str
    processes: dict[str, int]
    process_count: int
    logger: str | None
    metrics: str | None

def serve(settings_path: str | PathLike[str] | None = None) -> int:
    """Run the Process Manager daemon in the foreground.

    Returns 0 after an orderly shutdown, caused by Ctrl-C, SIGTERM, SIGHUP, SIGQUIT or ``quit_server``.
    Raises ``FileNotFoundError``/``OSError``/``ValueError`` for unusable settings and ``RuntimeError`` when
    the daemon cannot start (for example a port in use).

    Args:
        settings_path: a local settings file to merge over the defaults instead of the one named by
            ``<PROJECT>_LOCAL_SETTINGS``.
    """

def load_settings(settings_path: str | PathLike[str] | None = None) -> dict[str, Any]:
    """The merged settings as ``{group: {key: value}}``: the embedded defaults, then the local settings file."""

class _ProcessManagerSettings(TypedDict):
    PROCESS_NAME: str
    SERVICE_TYPE: str
    PROTOCOL: str
    HOSTNAME: str
    COMMANDING_PORT: int
    SERVICE_PORT: int
    MONITORING_PORT: int
    STORAGE_MNEMONIC: str
    DELAY: float
    PROXY_TIMEOUT: float

def process_manager_settings(settings_path: str | PathLike[str] | None = None) -> _ProcessManagerSettings:
    """The ``Process Manager Control Server`` group as the daemon reads it, defaults applied (the source of
    ``egse.procman``'s constants); raises ``ValueError`` for a value the daemon would refuse."""

def log_location(settings_path: str | PathLike[str] | None = None) -> Path:
    """The directory the daemon logs to: ``<PROJECT>_LOG_FILE_LOCATION``, else
    ``<PROJECT>_DATA_STORAGE_LOCATION/<SITE_ID>/log``, else ``~/.local/state/procman/log``."""

def is_process_manager_active(timeout: float = 0.5) -> bool:
    """True if the Process Manager answers a ``Ping`` within ``timeout`` seconds.

    Uses the configured commanding port; with port 0, the endpoint the Service Registry knows.
    """

def is_control_server_active(endpoint: str, timeout: float = 0.5) -> bool:
    """True if the control server at ``endpoint`` (``tcp://host:port``) answers a ``Ping`` within ``timeout``."""

def cli_main(argv: list[str], flavour: str = "python") -> int:
    """Run the command line (``argv[0]`` is the program name); returns the exit code (0, 1, 2, or 130 on Ctrl-C)."""

def render_markup(text: str, width: int, colour: bool) -> str:
    """Rich-style markup: ANSI colours when ``colour``, else plain text broken at ``width``."""

def wrap_line(line: str, width: int) -> list[str]:
    """Break a line at spaces so that no part exceeds ``width``, keeping the space at the break."""

@final
class GlobalRef:
    """A class or function reference from a reply, kept as its name: nothing is imported."""

    @property
    def module(self) -> str: ...
    @property
    def qualname(self) -> str: ...
    def __new__(cls, module: str, qualname: str) -> Self: ...
    def __eq__(self, value: object, /) -> bool: ...
    def __hash__(self) -> int: ...

@final
class RemoteObject:
    """An object of a class outside the allow-list, kept as data; sent back unchanged when used as an argument.

    The state's keys can also be read as attributes at run time (``obj._name``), unknown to type checkers.
    """

    @property
    def module(self) -> str | None: ...
    @property
    def qualname(self) -> str | None: ...
    @property
    def args(self) -> tuple[Any, ...]: ...
    @property
    def state(self) -> Any: ...
    def __eq__(self, value: object, /) -> bool: ...

@final
class DynamicCommand:
    """A command announced by the control server, bound to its proxy.

    Calling it checks the number of arguments like the original proxy (on a mismatch it logs the error and
    returns None) and sends a ``CommandExecution``; it returns the reply, or a ``Failure``.
    """

    __name__: str
    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

@disjoint_base
class Proxy:
    """A proxy for any CGSE control server at ``endpoint`` (``tcp://host:port``).

    Constructing it sends ``Ping`` and, when the server answers, ``send_commands``: each announced command
    becomes a method (a :class:`DynamicCommand`). Requests time out after ``timeout`` seconds and then return
    ``Failure("Control Server seems to be off-line, abandoning (<request>)")``.

    Like the REQ socket under it, a proxy serves one request at a time: a call from a second thread while
    one is waiting raises ``RuntimeError`` (use one proxy per thread).
    """

    def __init__(self, endpoint: str, timeout: float = 30.0) -> None: ...
    def __enter__(self) -> Self:
        """Connect if needed, ``Ping`` (``ConnectionError`` without a ``Pong``) and load the commands if needed."""
    def __exit__(
        self,
        *exc_info: object,
    ) -> None:
        """Disconnect (exceptions propagate)."""
    def connect_cs(self) -> None:
        """Ready the connection (the socket is opened by the next request)."""
    def disconnect_cs(self) -> None:
        """Close the connection; a later request connects again."""
    def reconnect_cs(self) -> None:
        """Close and open the connection."""
    def reset_cs_connection(self) -> None:
        """Close and open the connection."""
    def is_cs_connected(self) -> bool:
        """True if the control server answers a ``Ping``."""
    def ping(self) -> bool:
        """``Ping`` with a 1 s timeout; True on ``Pong``."""
    def send(self, data: Any, retries: int = 0, timeout: float | None = None) -> Any:
        """Send ``data`` (pickled) and return the reply.

        Args:
            data: a string command (``"Ping"``, ``"get_service_port"`` …) or any value the wire can carry.
            retries: how many times to resend after a timeout.
            timeout: seconds to wait for the reply; None or 0 for the proxy's timeout.

        Returns:
            The decoded reply, or a ``Failure`` when no reply came in time.
        """
    def get_endpoint(self) -> str:
        """The endpoint, e.g. ``tcp://localhost:6120``."""
    def get_commanding_port(self) -> int | Failure:
        """The commanding port the server reports (an int, or a ``Failure``)."""
    def get_monitoring_port(self) -> int | Failure:
        """The monitoring port the server reports (an int, or a ``Failure``)."""
    def get_service_port(self) -> int | Failure:
        """The service port the server reports (an int, or a ``Failure``)."""
    def get_ip_address(self) -> str | None | Failure:
        """The server's host address (a str, None if it has none, or a ``Failure``)."""
    def get_service_proxy(self) -> ServiceProxy:
        """A ``ServiceProxy`` for the same host and the reported service port; raises the ``Failure`` on error."""
    def load_commands(self) -> bool:
        """Ask the server for its commands and make them methods; False if it does not answer."""
    def get_commands(self) -> list[str]:
        """The names of the loaded commands."""
    def has_commands(self) -> bool:
        """True if commands have been loaded."""

class ProcessManagerProxy(Proxy):
    """The client of the Process Manager's commanding port.

    The defaults come from the settings (``PROTOCOL``, ``HOSTNAME``, ``COMMANDING_PORT``, ``PROXY_TIMEOUT``:
    ``tcp``, ``localhost``, 6120, 10 s by default); port 0 takes the endpoint from the Service Registry
    (``RuntimeError`` when it is not registered). The methods below are replaced by the commands the server
    announces; until then they raise ``NotImplementedError``.
    """

    def __init__(
        self,
        protocol: str | None = None,
        hostname: str | None = None,
        port: int | None = None,
        timeout: float | None = None,
    ) -> None: ...
    def get_core_processes(self) -> dict[str, str] | Failure:
        """The core CGSE services: ``{name: service type}``."""
    def get_devices(self) -> dict[str, tuple[Any, ...]] | Failure:
        """The devices of the current Setup: ``{device name: (device, device id or None, device args)}``."""
    def get_device_ids(self) -> dict[str, tuple[Any, ...]] | Failure:
        """The devices of the current Setup by id: ``{device id: (device name, device, device args)}``."""
    def start_process(self, start_cmd: Any) -> Failure | None:
        """Start a device control server (a ``StartCommand``)."""
    def stop_process(self, stop_cmd: Any) -> Failure | None:
        """Stop a device control server (a ``StopCommand``)."""
    def get_core_service_status(self, status_cmd: Any) -> dict[str, Any] | Failure:
        """``{"core_service_name", "core_service_is_active"}`` for a ``StatusCommand``."""
    def get_device_process_status(self, status_cmd: Any) -> dict[str, Any] | Failure:
        """``{"device_id", "cs_is_active", …}`` for a ``StatusCommand``."""
    def list_processes(self) -> dict[str, Any] | Failure:
        """``{"seq": n, "processes": [state record, …]}``: every managed process, as of event ``seq``."""
    def restart_process(self, process_id: str) -> Failure | None:
        """Stop (if needed) and start a managed process with its current definition."""
    def get_process_log(self, process_id: str, lines: int) -> list[str] | Failure:
        """The last ``lines`` lines of a managed process's output (stdout and stderr)."""
    def reload(self) -> dict[str, Any] | Failure:
        """Re-read the process definitions and the Setup, apply only the differences; the plan."""
    def get_integration_status(self) -> dict[str, Any] | Failure:
        """``{"registry", "setup", "storage", "processes"}``: where the integrations stand now."""
    def get_status(self) -> _ProcessManagerStatus | Failure:
        """What ``pm_cs status`` shows, as a dict (the call the CGSE documentation shows); a ``Failure`` when the
        server does not answer or does not announce ``get_integration_status``/``list_processes``.

        Keys: ``hostname``, ``commanding_port``, ``monitoring_port``, ``service_port``; ``registry`` (the
        registration line, e.g. ``Service Registry: registered …``), ``setup`` (where the Setup comes from),
        ``housekeeping`` (where the housekeeping goes), ``processes`` (managed processes by state,
        ``{"RUNNING": 2}``) and ``process_count``. The module-level ``egse.procman.get_status()`` keeps the
        original's text.
        """

class ServiceProxy(Proxy):
    """The client of a control server's service port (``egse.services.ServiceProxy``).

    Give ``hostname`` and ``port``, or a ``service_type`` to look up (the Process Manager's only).
    """

    def __init__(
        self,
        service_type: str | None = None,
        protocol: str = "tcp",
        hostname: str | None = None,
        port: int | None = None,
        timeout: float = 30.0,
    ) -> None: ...
    def set_monitoring_frequency(self, freq: float) -> float | Failure:
        """The new monitoring period in ms (clamped to the configured range)."""
    def set_hk_frequency(self, freq: float) -> float | Failure:
        """The new housekeeping period in ms (clamped to the configured range)."""
    def set_logging_level(self, name: str, level: int | str) -> str | Failure:
        """A sentence saying what was set (``name`` ``"all"`` for every logger)."""
    def quit_server(self) -> str | Failure:
        """The server's acknowledgement; it shuts down after replying."""
    def get_process_status(self) -> dict[str, Any] | Failure:
        """The status dict (``PID``, ``Up``, ``RSS``, ``CPU%`` …) as the monitoring socket publishes it."""
    def get_cs_module(self) -> str | Failure:
        """The control server's module name."""
    def get_average_execution_times(self) -> dict[str, float] | Failure:
        """Mean time (s) of ``get_status`` and ``get_housekeeping`` so far."""
    def get_storage_mnemonic(self) -> str | Failure:
        """The origin under which housekeeping is stored (``PM``)."""
    def add_listener(self, listener: dict[str, Any]) -> tuple[Any, ...] | Failure:
        """``("ACK",)``, or ``("NACK", exception)`` when the listener is refused."""
    def remove_listener(self, listener: dict[str, Any]) -> tuple[Any, ...] | Failure:
        """``("ACK",)``, or ``("NACK", exception)`` when no such listener is registered."""
    def get_listener_names(self) -> tuple[list[str]] | Failure:
        """The registered listeners' names, as a 1-tuple like the original."""
    def register_to_storage(self) -> tuple[Any, ...] | Failure:
        """``("ACK",)`` once registered with the Storage Manager (or the local CSV), else ``("NACK", exception)``."""
