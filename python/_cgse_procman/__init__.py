"""The CGSE Process Manager: cgse-core's ``egse.procman`` API, backed by procman's Rust code.

Scripts keep writing::

    from egse.procman import ProcessManagerProxy

    with ProcessManagerProxy() as pm:
        print(pm.get_core_processes())

The proxies (``ProcessManagerProxy``, ``ServiceProxy``), the pickle codec and the daemon are Rust
(``egse.procman._native``); this module holds the settings constants, the process-command objects that
travel as arguments, the response objects that come back, and the two module functions of the original.

The constants come from the same settings the daemon reads: the embedded defaults, overridden by the
local settings file named by ``<PROJECT>_LOCAL_SETTINGS``.

Differences from cgse-core (deliberate):

* ``StatusCommand.cmd`` puts the first device argument into the command like ``StartCommand`` and
  ``StopCommand`` do (the original inserted the Python repr of the whole list, ``status ['dummy-1']``),
  and accepts ``device_args=None`` (the original raised ``TypeError`` for its own default).
* A proxy whose request timed out stays usable: the next request reconnects.
* ``is_process_manager_active`` pings the configured commanding port; only when that port is 0 does it
  ask the Service Registry.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from egse.procman import _native
from egse.procman._native import (
    DynamicCommand,
    GlobalRef,
    ProcessManagerProxy,
    Proxy,
    RemoteObject,
    ServiceProxy,
)

__all__ = [
    "COMMANDING_PORT",
    "HOSTNAME",
    "MONITORING_PORT",
    "PROCESS_NAME",
    "PROTOCOL",
    "PROXY_TIMEOUT",
    "SERVICE_PORT",
    "SERVICE_TYPE",
    "STORAGE_MNEMONIC",
    "DynamicCommand",
    "Failure",
    "GlobalRef",
    "Message",
    "ProcessCommand",
    "ProcessManagerCommand",
    "ProcessManagerController",
    "ProcessManagerProxy",
    "Proxy",
    "RemoteObject",
    "Response",
    "ServiceProxy",
    "StartCommand",
    "StatusCommand",
    "StopCommand",
    "Success",
    "get_status",
    "is_process_manager_active",
    "settings",
]

__version__: str = _native.__version__

LOGGER = logging.getLogger("egse.procman")

#: The settings group of the Process Manager in CGSE settings files.
SETTINGS_GROUP = "Process Manager Control Server"


class SettingsGroup(dict[str, Any]):
    """One settings group: a dict whose keys are also attributes (``settings.COMMANDING_PORT``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"settings group has no key '{name}'") from None


#: The ``Process Manager Control Server`` settings, merged as the daemon merges them.
settings = SettingsGroup(_native.load_settings().get(SETTINGS_GROUP) or {})

# The constants as the daemon reads them, defaults included (one source: the Rust settings reader).
_pm = _native.process_manager_settings()
PROCESS_NAME: str = _pm["PROCESS_NAME"]
SERVICE_TYPE: str = _pm["SERVICE_TYPE"]
PROTOCOL: str = _pm["PROTOCOL"]
HOSTNAME: str = _pm["HOSTNAME"]
COMMANDING_PORT: int = _pm["COMMANDING_PORT"]  # 0: dynamic, found through the registry
SERVICE_PORT: int = _pm["SERVICE_PORT"]
MONITORING_PORT: int = _pm["MONITORING_PORT"]
STORAGE_MNEMONIC: str = _pm["STORAGE_MNEMONIC"]
PROXY_TIMEOUT: float = _pm["PROXY_TIMEOUT"]


def is_process_manager_active(timeout: float = 0.5) -> bool:
    """Return True if the Process Manager answers a ``Ping`` within ``timeout`` seconds."""
    return _native.is_process_manager_active(timeout)


def get_status() -> str:
    """The status of the Process Manager as text with rich markup (``[green]active[/]``)."""
    try:
        with ProcessManagerProxy() as pm:
            return (
                "Process Manager:\n"
                "    Status: [green]active[/]\n"
                f"    Hostname: {pm.get_ip_address()}\n"
                f"    Monitoring port: {pm.get_monitoring_port()}\n"
                f"    Commanding port: {pm.get_commanding_port()}\n"
                f"    Service port: {pm.get_service_port()}\n"
            )
    except ConnectionError as exc:
        return f"Process Manager Status: [red]not active[/] ({exc})"


class Response:
    """A reply of a control server that carries a message (``egse.response.Response``)."""

    message: Any

    def __init__(self, message: str) -> None:
        self.message = message

    def __str__(self) -> str:
        return str(self.message)

    @property
    def successful(self) -> bool:
        """False for a ``Failure``, True otherwise."""
        return not isinstance(self, Exception)


class Failure(Response, Exception):
    """An error reply (``egse.response.Failure``): ``message``, and the exception that caused it as ``cause``.

    Returned, not raised, by the proxies, including when the control server does not answer in time.
    """

    cause: BaseException | None

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        Response.__init__(self, f"{message}: {cause}" if cause is not None else message)
        self.cause = cause

    def __repr__(self) -> str:
        if self.cause is None:
            return f"Failure({self.message!r})"
        return f"Failure({self.message!r}, cause={self.cause!r})"


class Success(Response):
    """A success reply (``egse.response.Success``) with an optional ``return_code``."""

    return_code: Any

    def __init__(self, message: str, return_code: Any = None) -> None:
        super().__init__(f"{message}: {return_code}" if return_code is not None else message)
        self.return_code = return_code

    @property
    def response(self) -> Any:
        return self.return_code

    def __repr__(self) -> str:
        return f"Success({self.message!r}, return_code={self.return_code!r})"


class Message(Response):
    """A reply with only a message (``egse.response.Message``)."""

    def __repr__(self) -> str:
        return f"Message({self.message!r})"


class ProcessCommand:
    """What the Process Manager needs to start, stop or query a device control server.

    Sent as the argument of ``start_process``, ``stop_process``, ``get_core_service_status`` and
    ``get_device_process_status``; the daemon rebuilds the shell command from the attributes.
    """

    def __init__(self, device_id: str, device_args: Sequence[Any] | None, cgse_cmd: str | None) -> None:
        # The attribute order is the wire order of the pickled state.
        self._device_id = device_id
        self._cgse_cmd = cgse_cmd
        self._device_args = device_args

    @property
    def device_id(self) -> str:
        """The device identifier."""
        return self._device_id

    @property
    def device_args(self) -> Sequence[Any] | None:
        """The device arguments (a list), or None."""
        return self._device_args

    @property
    def cmd(self) -> str:
        """The shell command; defined by the subclasses."""
        raise NotImplementedError

    def _with_first_arg(self, action: str) -> str:
        cmd = f"{self._cgse_cmd} {action}"
        if self._device_args:
            cmd = f"{cmd} {self._device_args[0]}"
        return cmd

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device_id={self._device_id!r}, cmd={self._cgse_cmd!r})"


class StartCommand(ProcessCommand):
    """Start a device control server: ``<cgse_cmd> start [<first device arg>] [--sim]``."""

    def __init__(
        self,
        device_id: str,
        cgse_cmd: str,
        device_args: Sequence[Any] | None,
        is_simulator_mode: bool = False,
    ) -> None:
        super().__init__(device_id, device_args, cgse_cmd)
        self._is_simulator_mode = is_simulator_mode

    @property
    def cmd(self) -> str:
        cmd = self._with_first_arg("start")
        if self.simulator_mode:
            cmd = f"{cmd} --sim"
        return cmd

    @property
    def simulator_mode(self) -> bool:
        """True to start the control server in simulator mode."""
        return self._is_simulator_mode


class StopCommand(ProcessCommand):
    """Stop a device control server: ``<cgse_cmd> stop [<first device arg>]``."""

    def __init__(self, device_id: str, device_args: Sequence[Any] | None, cgse_cmd: str) -> None:
        super().__init__(device_id, device_args, cgse_cmd)

    @property
    def cmd(self) -> str:
        return self._with_first_arg("stop")


class StatusCommand(ProcessCommand):
    """Query a control server: ``<cgse_cmd> status [<first device arg>]``.

    Fixed upstream bugs: the original put the Python repr of the whole argument list into the command
    (``status ['dummy-1']``) and raised ``TypeError`` for ``device_args=None``, its own default.
    """

    def __init__(self, device_id: str, device_args: Sequence[Any] | None = None, cgse_cmd: str | None = None) -> None:
        super().__init__(device_id, device_args, cgse_cmd)

    @property
    def cmd(self) -> str:
        return self._with_first_arg("status")


class ProcessManagerController:
    """The server-side methods the pickled command objects name (``_device_method``).

    The daemon is Rust and dispatches on the command name, so these are never called. They exist because a
    CGSE client that unpickles the ``send_commands`` reply itself (cgse-core's generic ``Proxy``, in an
    environment where this package provides ``egse.procman``) must find every function the pickle refers to.
    """

    def get_core_processes(self) -> Any:
        raise NotImplementedError("served by the Process Manager daemon")

    def get_devices(self) -> Any:
        raise NotImplementedError("served by the Process Manager daemon")

    def get_device_ids(self) -> Any:
        raise NotImplementedError("served by the Process Manager daemon")

    def start_process(self, start_cmd: Any) -> Any:
        raise NotImplementedError("served by the Process Manager daemon")

    def stop_process(self, stop_cmd: Any) -> Any:
        raise NotImplementedError("served by the Process Manager daemon")

    def get_core_service_status(self, status_cmd: Any) -> Any:
        raise NotImplementedError("served by the Process Manager daemon")

    def get_device_process_status(self, status_cmd: Any) -> Any:
        raise NotImplementedError("served by the Process Manager daemon")


class ProcessManagerCommand:
    """A command of the Process Manager's commanding table, as ``send_commands`` announces it.

    The proxies turn these into methods; the objects themselves only matter to tools that look at the
    command table. The attributes are the original's (``_name``, ``_cmd``, ``_description`` …).
    """

    _name: str
    _cmd: str
    _description: str | None
    _response: Any
    _device_method: Any

    def get_name(self) -> str:
        return self._name

    def get_description(self) -> str | None:
        return getattr(self, "_description", None)

    def __repr__(self) -> str:
        return f"<{type(self).__name__}({getattr(self, '_name', None)})>"
