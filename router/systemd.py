"""systemd over D-Bus (pydbus): reload the manager, start and stop units, read and watch their state.

pydbus calls block, and D-Bus signals are only dispatched while a GLib main loop runs. So one
thread runs GLib's default main loop (signals arrive there), one worker thread makes every
blocking call, and both hand results to asyncio with `call_soon_threadsafe`. Callers only see
coroutines.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

SD = "org.freedesktop.systemd1"
SD_PATH = "/org/freedesktop/systemd1"
MANAGER_IF = "org.freedesktop.systemd1.Manager"
UNIT_IF = "org.freedesktop.systemd1.Unit"
SERVICE_IF = "org.freedesktop.systemd1.Service"
PROPS_IF = "org.freedesktop.DBus.Properties"

T = TypeVar("T")


class SystemdError(Exception):
    """A D-Bus call to systemd failed; the message says which call and why."""


@dataclass(frozen=True)
class UnitState:
    name: str
    load_state: str = "not-found"
    active_state: str = "inactive"
    sub_state: str = "dead"
    result: str = "success"
    invocation_id: str = ""
    main_pid: int = 0
    exec_main_pid: int = 0  # the main process of the last run, also after it exited
    exec_main_start_us: int = 0  # when it started, µs since the epoch (0: never)
    exec_main_status: int = 0

    @property
    def is_running(self) -> bool:
        return self.active_state in ("active", "activating", "reloading")

    @property
    def has_failed(self) -> bool:
        return self.active_state == "failed" or (
            self.active_state == "inactive" and self.result != "success")

    def as_dict(self) -> dict[str, Any]:
        return {"active_state": self.active_state, "sub_state": self.sub_state, "result": self.result,
                "main_pid": self.main_pid, "invocation_id": self.invocation_id}


def bus_address(kind: str, environ: dict[str, str] | None = None) -> str:
    """The D-Bus address of the system bus, or of the user's session bus (`systemctl --user`)."""
    env = dict(os.environ if environ is None else environ)
    if kind == "system":
        return env.get("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/run/dbus/system_bus_socket")
    if env.get("DBUS_SESSION_BUS_ADDRESS"):
        return env["DBUS_SESSION_BUS_ADDRESS"]
    runtime = env.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    return f"unix:path={runtime}/bus"


class Systemd:
    """A connection to one systemd manager (system or user) with async methods."""

    def __init__(self, address: str, watched: Callable[[], set[str]]) -> None:
        self.address = address
        self._watched = watched  # the unit names whose state changes are reported
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="dbus")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._glib_loop: Any = None
        self._bus: Any = None
        self._mgr: Any = None
        self._paths: dict[str, str] = {}  # unit name -> object path
        self._names: dict[str, str] = {}  # object path -> unit name
        self._jobs: dict[str, asyncio.Future[str]] = {}
        self._early: OrderedDict[str, str] = OrderedDict()  # JobRemoved seen before its caller waited
        self.on_unit_change: Callable[[str], None] | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._run(self._open_sync)

    def _open_sync(self) -> None:
        import pydbus  # imported late: needs GLib's gi (Debian's python3-gi)
        from gi.repository import GLib

        try:
            self._bus = pydbus.connect(self.address)  # a private connection: no exit-on-close
        except GLib.Error as e:
            raise SystemdError(f"cannot connect to the D-Bus bus at {self.address}: {e.message}") from e
        self._mgr = self._bus.get(SD, SD_PATH)[MANAGER_IF]
        self._mgr.Subscribe()  # JobRemoved and units' PropertiesChanged are only sent to subscribers
        self._mgr.JobRemoved.connect(self._on_job_removed)
        self._bus.con.signal_subscribe(SD, PROPS_IF, "PropertiesChanged", None, None, 0,
                                       self._on_properties_changed)
        self._glib_loop = GLib.MainLoop()
        threading.Thread(target=self._glib_loop.run, name="glib", daemon=True).start()

    async def close(self) -> None:
        def close_sync() -> None:
            if self._glib_loop is not None:
                self._glib_loop.quit()
            if self._bus is not None:
                try:
                    self._bus.con.close_sync(None)
                except Exception:  # already gone: nothing to release
                    pass

        await self._run(close_sync)
        self._executor.shutdown(wait=False)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except SystemdError:
            raise
        except Exception as e:  # GLib.Error from a D-Bus call: say which call failed
            message = getattr(e, "message", None) or str(e)
            raise SystemdError(f"{getattr(fn, '__name__', 'D-Bus call')}: {message}") from e

    # --- signals (GLib thread) ----------------------------------------------------------------

    def _on_job_removed(self, _id: int, job: str, unit: str, result: str) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._job_done, job, unit, result)

    def _job_done(self, job: str, unit: str, result: str) -> None:
        fut = self._jobs.pop(job, None)
        if fut is not None:
            if not fut.done():
                fut.set_result(result)
        elif unit in self._watched():
            self._early[job] = result
            while len(self._early) > 256:
                self._early.popitem(last=False)

    def _on_properties_changed(self, _con: Any, _sender: str, path: str, _iface: str, _signal: str,
                               params: Any, _data: Any = None) -> None:
        name = self._names.get(path)
        if name is None or self._loop is None:
            return
        iface, changed, _invalidated = params.unpack()
        if iface == UNIT_IF and "ActiveState" in changed and self.on_unit_change is not None:
            self._loop.call_soon_threadsafe(self.on_unit_change, name)

    # --- calls --------------------------------------------------------------------------------

    async def reload(self) -> None:
        """daemon-reload; the reply comes once the reload is complete."""
        await self._run(self._reload_sync)

    def _reload_sync(self) -> None:
        self._mgr.Reload()

    def _path_sync(self, name: str) -> str:
        path = self._paths.get(name)
        if path is None:
            path = str(self._mgr.LoadUnit(name))
            self._paths[name], self._names[path] = path, name
        return path

    async def watch(self, names: list[str]) -> None:
        """Learn the object paths of these units so their state changes are reported."""
        await self._run(lambda: [self._path_sync(n) for n in names])

    async def state(self, name: str) -> UnitState:
        return await self._run(self._state_sync, name)

    def _state_sync(self, name: str) -> UnitState:
        path = self._path_sync(name)
        props = self._bus.con.call_sync(
            SD, path, PROPS_IF, "GetAll", _variant("(s)", (UNIT_IF,)), None, 0, -1, None).unpack()[0]
        svc: dict[str, Any] = {}
        if name.endswith(".service"):
            svc = self._bus.con.call_sync(
                SD, path, PROPS_IF, "GetAll", _variant("(s)", (SERVICE_IF,)), None, 0, -1, None).unpack()[0]
        return UnitState(
            name=name,
            load_state=props.get("LoadState", "not-found"),
            active_state=props.get("ActiveState", "inactive"),
            sub_state=props.get("SubState", "dead"),
            result=svc.get("Result", "success"),
            invocation_id=bytes(props.get("InvocationID", b"")).hex(),
            main_pid=int(svc.get("MainPID", 0)),
            exec_main_pid=int(svc.get("ExecMainPID", 0)),
            exec_main_start_us=int(svc.get("ExecMainStartTimestamp", 0)),
            exec_main_status=int(svc.get("ExecMainStatus", 0)),
        )

    async def states(self, names: list[str]) -> dict[str, UnitState]:
        return await self._run(lambda: {n: self._state_sync(n) for n in names})

    async def exec_start(self, name: str) -> list[list[str]]:
        """The argv of each ExecStart= line systemd will run for this unit (after a reload)."""
        def read() -> list[list[str]]:
            path = self._path_sync(name)
            value = self._bus.con.call_sync(
                SD, path, PROPS_IF, "Get", _variant("(ss)", (SERVICE_IF, "ExecStart")),
                None, 0, -1, None).unpack()[0]
            return [list(entry[1]) for entry in value]

        return await self._run(read)

    async def start(self, name: str, timeout: float) -> str:
        """Start a unit; return its job's result ('done', 'failed', 'timeout', …) once the job ends."""
        return await self._job(lambda: self._mgr.StartUnit(name, "replace"), timeout)

    async def stop(self, name: str, timeout: float) -> str:
        return await self._job(lambda: self._mgr.StopUnit(name, "replace"), timeout)

    async def reset_failed(self, name: str) -> None:
        def reset() -> None:
            try:
                self._mgr.ResetFailedUnit(name)
            except Exception:  # not failed, or not loaded: nothing to reset
                pass

        await self._run(reset)

    async def _job(self, call: Callable[[], str], timeout: float) -> str:
        assert self._loop is not None
        job = str(await self._run(call))
        # StartUnit's reply and its JobRemoved signal may arrive in either order.
        if job in self._early:
            return self._early.pop(job)
        fut = self._jobs.setdefault(job, self._loop.create_future())
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            self._jobs.pop(job, None)
            return "timeout"


def _variant(signature: str, value: tuple[Any, ...]) -> Any:
    from gi.repository import GLib

    return GLib.Variant(signature, value)
