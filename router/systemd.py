"""systemd over D-Bus (pydbus/Gio): reload the manager, start and stop units, read and watch their
state, and reconnect on its own when the bus goes away.

pydbus calls block, and D-Bus signals are only dispatched while a GLib main loop runs. So one
thread runs GLib's default main loop (signals arrive there), one worker thread makes every
blocking call, and both hand results to asyncio with `call_soon_threadsafe`. Callers only see
coroutines.

When the connection closes (the bus daemon restarted), or systemd leaves the bus, every call
fails at once with `SystemdUnreachable`, jobs in flight end with it, and a background task
connects again with a growing pause (0.1 s doubling up to 5 s); once it has subscribed to
systemd's signals again it calls `on_reconnect`, so the owner re-reads the units' states.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

log = structlog.get_logger("router.systemd")

SD = "org.freedesktop.systemd1"
SD_PATH = "/org/freedesktop/systemd1"
MANAGER_IF = "org.freedesktop.systemd1.Manager"
UNIT_IF = "org.freedesktop.systemd1.Unit"
SERVICE_IF = "org.freedesktop.systemd1.Service"
PROPS_IF = "org.freedesktop.DBus.Properties"
DBUS = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"

# D-Bus errors that mean "systemd is not on the bus (any more)", not "systemd refused"
GONE_ERRORS = frozenset({
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.Disconnected",
})
ALREADY_SUBSCRIBED = "org.freedesktop.systemd1.AlreadySubscribed"
STOPPED_STATES = frozenset({"inactive", "failed"})

# Every D-Bus connection this module opens stays referenced until the process exits. pydbus ties a
# Bus to each connection in a reference cycle, so Python's cyclic GC would free the connection on
# whatever thread allocates next, holding the GIL; GLib 2.74's dispose then takes the global
# message-bus lock, while GDBus's worker thread may hold that lock waiting for the GIL (PyGObject's
# toggle-ref notify on g_object_ref): a deadlock, seen here within a few bus restarts. Closed
# connections cost little and are few: one per loss of the bus, since a connection that is still
# open is reused until systemd answers on it again.
_CONNECTIONS: list[Any] = []

T = TypeVar("T")


class SystemdError(Exception):
    """A D-Bus call to systemd failed; the message says which call, on which unit, and why."""


class SystemdUnreachable(SystemdError):
    """The bus connection is gone (or systemd left the bus); the client is reconnecting."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"systemd is not reachable over D-Bus: {reason}")
        self.reason = reason


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
        """Anything but inactive or failed: starting, up, reloading, or still stopping
        (`deactivating`: its processes may still hold the GPU)."""
        return self.active_state not in STOPPED_STATES

    @property
    def is_stopping(self) -> bool:
        """systemd is stopping it (ExecStop=, SIGTERM, waiting for the processes to exit)."""
        return self.active_state == "deactivating"

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


@dataclass(frozen=True)
class _Session:
    """One working connection: Subscribe()d to systemd, with our signal handlers on it."""

    con: Any  # Gio.DBusConnection
    owner: str  # systemd's unique name on the bus when we subscribed


class Systemd:
    """A connection to one systemd manager (system or user) with async methods; it heals itself."""

    def __init__(self, address: str, watched: Callable[[], set[str]],
                 reconnect_delays: tuple[float, float] = (0.1, 5.0)) -> None:
        self.address = address
        self._watched = watched  # the unit names whose state changes are reported
        self._first_delay, self._max_delay = reconnect_delays
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="dbus")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._glib_loop: Any = None
        self._session: _Session | None = None  # None while disconnected
        self._spare: Any = None  # an open connection on which systemd did not answer (yet): reused
        self._generation = 0  # +1 at every connect and every loss
        self._last_error: str | None = None
        self._closing = False
        self._reconnect_task: asyncio.Task[None] | None = None
        self._systemd_back = asyncio.Event()  # cuts a reconnect pause short: systemd is on the bus again
        self._paths: dict[str, str] = {}  # unit name -> object path (fixed by the name: kept across reconnects)
        self._names: dict[str, str] = {}  # object path -> unit name
        self._jobs: dict[str, tuple[str, asyncio.Future[str]]] = {}  # job path -> (what, its end)
        self._early: OrderedDict[str, str] = OrderedDict()  # JobRemoved seen before its caller waited
        self.on_unit_change: Callable[[str], None] | None = None
        self.on_reconnect: Callable[[], None] | None = None  # after a reconnect: re-read the units

    @property
    def connected(self) -> bool:
        return self._session is not None

    @property
    def last_error(self) -> str | None:
        """Why systemd is unreachable right now (the latest failed attempt), or None when connected."""
        return self._last_error

    # --- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and subscribe; raises SystemdUnreachable when that fails (no retry here)."""
        from gi.repository import GLib  # imported late: needs GLib's gi (Debian's python3-gi)

        self._loop = asyncio.get_running_loop()
        self._closing = False
        if self._glib_loop is None:
            self._glib_loop = GLib.MainLoop()
            threading.Thread(target=self._glib_loop.run, name="glib", daemon=True).start()
        session = await self._loop.run_in_executor(self._executor, self._connect_sync)
        self._connected(session)

    async def close(self) -> None:
        self._closing = True
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            await asyncio.wait([self._reconnect_task])
        session, self._session = self._session, None
        self._fail_jobs("the router is shutting down")
        loop = asyncio.get_running_loop()

        def close_sync() -> None:  # after a connect still running on this thread: it may have made a spare
            for con in (session.con if session else None, self._spare):
                if con is not None:  # closed, still referenced (see _CONNECTIONS)
                    with contextlib.suppress(Exception):  # already gone: nothing to release
                        con.close_sync(None)
            self._spare = None
            if self._glib_loop is not None:
                self._glib_loop.quit()

        await loop.run_in_executor(self._executor, close_sync)
        self._executor.shutdown(wait=False)

    def _connect_sync(self) -> _Session:
        """A connection with our signal handlers, Subscribe()d (worker thread). The spare connection
        is reused while it is open; a new one is made otherwise."""
        import pydbus
        from gi.repository import GLib

        con = self._spare
        if con is None or con.is_closed():
            try:
                con = pydbus.connect(self.address).con  # a private connection: no exit-on-close
            except GLib.Error as e:
                raise SystemdUnreachable(f"cannot connect to the bus at {self.address}: {e.message}") from e
            _CONNECTIONS.append(con)
            self._spare = con
            # handlers first, so no signal sent after Subscribe() is missed
            con.connect("closed", self._on_closed)
            con.signal_subscribe(DBUS, DBUS, "NameOwnerChanged", DBUS_PATH, SD, 0, self._on_name_owner_changed)
            con.signal_subscribe(SD, MANAGER_IF, "JobRemoved", SD_PATH, None, 0, self._on_job_removed)
            con.signal_subscribe(SD, PROPS_IF, "PropertiesChanged", None, None, 0, self._on_properties_changed)
        try:
            # JobRemoved and units' PropertiesChanged are only sent to subscribers
            try:
                _call(con, SD, SD_PATH, MANAGER_IF, "Subscribe")
            except GLib.Error as e:
                if _remote_error(e) != ALREADY_SUBSCRIBED:  # systemd kept us through a daemon-reexec: fine
                    raise
            owner = str(_call(con, DBUS, DBUS_PATH, DBUS, "GetNameOwner", "(s)", (SD,))[0])
        except GLib.Error as e:
            raise SystemdUnreachable(f"systemd does not answer on the bus at {self.address}: "
                                     f"{_error_text(e)}") from e
        self._spare = None
        return _Session(con, owner)

    def _connected(self, session: _Session) -> None:
        self._session, self._last_error = session, None
        self._generation += 1

    def _lost(self, con: Any, reason: str) -> None:
        """The connection `con` is no good any more: fail what waits on it and reconnect (loop thread)."""
        session = self._session
        if session is None or session.con is not con or self._closing:
            return  # an old connection, or already handled
        self._session, self._last_error = None, reason
        self._generation += 1
        log.warning("systemd_unreachable", reason=reason, address=self.address)
        self._fail_jobs(reason)
        self._spare = con  # reused if still open (systemd left the bus, the bus stayed)
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect(), name="dbus-reconnect")

    def _fail_jobs(self, reason: str) -> None:
        jobs, self._jobs = self._jobs, {}
        self._early.clear()
        for job, (what, fut) in jobs.items():
            if not fut.done():
                fut.set_exception(SystemdUnreachable(f"{reason} (while waiting for the {what} job {job})"))

    async def _reconnect(self) -> None:
        loop = asyncio.get_running_loop()
        delay, attempts, since = self._first_delay, 0, time.monotonic()
        while not self._closing:
            self._systemd_back.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._systemd_back.wait(), delay)
            attempts += 1
            try:
                session = await loop.run_in_executor(self._executor, self._connect_sync)
            except SystemdUnreachable as e:
                self._last_error = e.reason
                delay = min(delay * 2, self._max_delay)
                continue
            if self._closing:
                with contextlib.suppress(Exception):
                    session.con.close(None, None, None)  # asynchronous; still referenced (_CONNECTIONS)
                return
            self._connected(session)
            log.info("systemd_reconnected", attempts=attempts, down=round(time.monotonic() - since, 3))
            if self.on_reconnect is not None:
                try:
                    self.on_reconnect()
                except Exception:  # the owner's bug must not stop the client
                    log.exception("on_reconnect_failed")
            return

    async def _run(self, method: str, unit: str | None, fn: Callable[..., T], *args: Any) -> T:
        """fn(con, *args) on the worker thread; a failure names the D-Bus method and the unit."""
        session = self._session
        if session is None:
            raise SystemdUnreachable(self._last_error or "not connected")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, session.con, *args)
        except SystemdError:
            raise
        except Exception as e:  # GLib.Error from a D-Bus call
            what = f"{method} {unit}" if unit else method
            text = _error_text(e)
            if _means_gone(e, session.con):
                self._lost(session.con, f"{what} failed: {text}")
                raise SystemdUnreachable(self._last_error or f"{what} failed: {text}") from e
            raise SystemdError(f"{what}: {text}") from e

    # --- signals (GLib thread) ----------------------------------------------------------------

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the router is gone
                loop.call_soon_threadsafe(fn, *args)

    def _on_closed(self, con: Any, _remote_vanished: bool, error: Any) -> None:
        why = f": {error.message}" if error is not None else ""
        self._post(self._lost, con, f"the connection to the bus at {self.address} was closed{why}")

    def _on_name_owner_changed(self, con: Any, _sender: str, _path: str, _iface: str, _signal: str,
                               params: Any, _data: Any = None) -> None:
        _name, _old, new = params.unpack()
        self._post(self._owner_changed, con, new)

    def _owner_changed(self, con: Any, new: str) -> None:
        session = self._session
        if session is None and con is self._spare and new:
            self._systemd_back.set()  # waiting on this connection for systemd: try now
            return
        if session is None or session.con is not con or new == session.owner:
            return
        # systemd left the bus, or came back under a new name (daemon-reexec): signals may have been missed
        self._lost(con, f"{SD} left the bus" if not new else f"{SD} re-registered on the bus")

    def _on_job_removed(self, con: Any, _sender: str, _path: str, _iface: str, _signal: str,
                        params: Any, _data: Any = None) -> None:
        _id, job, unit, result = params.unpack()
        self._post(self._job_done, con, job, unit, result)

    def _job_done(self, con: Any, job: str, unit: str, result: str) -> None:
        if self._session is None or self._session.con is not con:
            return
        entry = self._jobs.pop(job, None)
        if entry is not None:
            if not entry[1].done():
                entry[1].set_result(result)
        elif unit in self._watched():
            self._early[job] = result
            while len(self._early) > 256:
                self._early.popitem(last=False)

    def _on_properties_changed(self, _con: Any, _sender: str, path: str, _iface: str, _signal: str,
                               params: Any, _data: Any = None) -> None:
        name = self._names.get(path)
        if name is None:
            return
        iface, changed, _invalidated = params.unpack()
        if iface == UNIT_IF and "ActiveState" in changed:
            self._post(self._unit_changed, name)

    def _unit_changed(self, name: str) -> None:
        if self.on_unit_change is not None:
            self.on_unit_change(name)

    # --- calls --------------------------------------------------------------------------------

    async def reload(self) -> None:
        """daemon-reload; the reply comes once the reload is complete."""
        await self._run("Reload", None, _call, SD, SD_PATH, MANAGER_IF, "Reload")

    def _path_sync(self, con: Any, name: str) -> str:
        path = self._paths.get(name)
        if path is None:
            path = str(_call(con, SD, SD_PATH, MANAGER_IF, "LoadUnit", "(s)", (name,))[0])
            self._paths[name], self._names[path] = path, name
        return path

    async def watch(self, names: list[str]) -> None:
        """Learn the object paths of these units so their state changes are reported."""
        for name in names:
            await self._run("LoadUnit", name, self._path_sync, name)

    async def state(self, name: str) -> UnitState:
        return await self._run("GetAll", name, self._state_sync, name)

    def _state_sync(self, con: Any, name: str) -> UnitState:
        path = self._path_sync(con, name)
        props = _call(con, SD, path, PROPS_IF, "GetAll", "(s)", (UNIT_IF,))[0]
        svc: dict[str, Any] = {}
        if name.endswith(".service"):
            svc = _call(con, SD, path, PROPS_IF, "GetAll", "(s)", (SERVICE_IF,))[0]
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
        return {name: await self.state(name) for name in names}

    async def exec_start(self, name: str) -> list[list[str]]:
        """The argv of each ExecStart= line systemd will run for this unit (after a reload)."""
        def read(con: Any) -> list[list[str]]:
            path = self._path_sync(con, name)
            value = _call(con, SD, path, PROPS_IF, "Get", "(ss)", (SERVICE_IF, "ExecStart"))[0]
            return [list(entry[1]) for entry in value]

        return await self._run("Get ExecStart", name, read)

    async def control_group(self, name: str) -> str:
        """The unit's cgroup below the cgroup2 root ('' while it runs nothing): whose GPU memory is whose."""
        def read(con: Any) -> str:
            path = self._path_sync(con, name)
            return str(_call(con, SD, path, PROPS_IF, "Get", "(ss)", (SERVICE_IF, "ControlGroup"))[0])

        return await self._run("Get ControlGroup", name, read)

    async def start(self, name: str, timeout: float) -> str:
        """Start a unit; return its job's result ('done', 'failed', 'timeout', …) once the job ends."""
        return await self._job("StartUnit", name, timeout)

    async def stop(self, name: str, timeout: float) -> str:
        return await self._job("StopUnit", name, timeout)

    async def reset_failed(self, name: str) -> None:
        try:
            await self._run("ResetFailedUnit", name, _call, SD, SD_PATH, MANAGER_IF, "ResetFailedUnit",
                            "(s)", (name,))
        except SystemdUnreachable:
            raise
        except SystemdError:  # not failed, or not loaded: nothing to reset
            pass

    async def _job(self, method: str, name: str, timeout: float) -> str:
        generation = self._generation
        reply = await self._run(method, name, _call, SD, SD_PATH, MANAGER_IF, method, "(ss)", (name, "replace"))
        job = str(reply[0])
        if self._generation != generation:  # the bus went away right after the reply: JobRemoved is lost
            raise SystemdUnreachable(f"{self._last_error or 'the connection was replaced'} "
                                     f"(while waiting for the {method} {name} job {job})")
        # StartUnit's reply and its JobRemoved signal may arrive in either order.
        if job in self._early:
            return self._early.pop(job)
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._jobs[job] = (f"{method} {name}", fut)
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            return "timeout"
        finally:
            if self._jobs.get(job, (None, None))[1] is fut:
                del self._jobs[job]


def _call(con: Any, dest: str, path: str, iface: str, method: str, signature: str | None = None,
          args: tuple[Any, ...] = ()) -> Any:
    """One blocking D-Bus method call; the unpacked reply tuple (worker thread)."""
    from gi.repository import GLib

    params = GLib.Variant(signature, args) if signature is not None else None
    reply = con.call_sync(dest, path, iface, method, params, None, 0, -1, None)
    return reply.unpack() if reply is not None else ()


def _remote_error(e: BaseException) -> str | None:
    """The D-Bus error name of a failed call (org.freedesktop.systemd1.NoSuchUnit, …), if any."""
    from gi.repository import Gio

    try:
        return Gio.DBusError.get_remote_error(e)  # type: ignore[no-any-return]
    except TypeError:  # not a GLib.Error
        return None


def _error_text(e: BaseException) -> str:
    """A GLib.Error in words: 'Unit x.service not found (org.freedesktop.systemd1.NoSuchUnit)'."""
    message = str(getattr(e, "message", None) or e)
    name = _remote_error(e)
    if name is not None:
        message = message.split(f"{name}: ", 1)[-1].removeprefix("GDBus.Error:")
        return f"{message.rstrip('.')} ({name})"
    return message.rstrip(".")


def _means_gone(e: BaseException, con: Any) -> bool:
    """Did this call fail because the connection or systemd went away (not because systemd said no)?"""
    from gi.repository import Gio, GLib

    with contextlib.suppress(Exception):
        if con.is_closed():
            return True
    if isinstance(e, GLib.Error) and e.matches(Gio.io_error_quark(), Gio.IOErrorEnum.CLOSED):
        return True
    return _remote_error(e) in GONE_ERRORS
