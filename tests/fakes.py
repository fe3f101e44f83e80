"""Fakes for driving the switcher without systemd, HTTP or wall-clock time: a virtual-time event loop,
a programmable fake systemd (every operation can succeed, fail, hang or raise) and a fake health probe.

The fake systemd behaves like router/systemd.py's `Systemd` as the switcher sees it: units move
activating -> active -> deactivating -> inactive/failed, report each change through
`on_unit_change`, and a unit started after a daemon-reload runs the command of the router's drop-in
read at that reload (so a test can tell which model a unit really serves). Every operation yields to
the event loop on entry and between state changes, so a cancellation can land at any await.
"""

from __future__ import annotations

import asyncio
import re
import selectors
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from router.execstart import DROPIN_NAME, dropin_model_id
from router.systemd import SystemdError, UnitState

try:  # coming with D-Bus reconnection (issue 8); a SystemdError either way
    from router.systemd import SystemdUnreachable  # type: ignore[attr-defined]
except ImportError:
    SystemdUnreachable = SystemdError

Behaviour = Literal["ok", "fail", "hang", "raise"]
OPS = ("start", "stop", "state", "states", "reload", "exec_start", "reset_failed", "watch")
DBUS_TIMEOUT = 25.0  # a D-Bus call that gets no reply fails after this long (GDBus' default)
VIRTUAL_EPOCH = 1000.0  # virtual time starts here: 0.0 would read as "not set" in `x or now()` code


# --- virtual time -----------------------------------------------------------------------------------


class _JumpingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """Never sleeps: a select() with a timeout and no I/O ready moves the virtual clock instead."""

    def __init__(self) -> None:
        super().__init__()
        self.now = VIRTUAL_EPOCH

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = super().select(0)
        if events or timeout == 0:
            return events
        if timeout is None:  # nothing ready and no timer: only another thread could wake the loop
            events = super().select(1.0)
            if not events:
                raise RuntimeError("virtual-time loop deadlocked: nothing is ready and no timer is set")
            return events
        self.now += timeout
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An asyncio loop whose time() is virtual: when nothing is ready it jumps to the next timer, so
    sleeps, timeouts and backoffs of any length run instantly and in a deterministic order."""

    def __init__(self) -> None:
        self._jumping = _JumpingSelector()
        super().__init__(self._jumping)

    def time(self) -> float:
        return self._jumping.now

    def run_for(self, seconds: float) -> None:
        """Run everything due within the next `seconds` of virtual time."""
        self.run_until_complete(asyncio.sleep(seconds))
        self.settle()

    def settle(self, limit: int = 10_000) -> None:
        """Run until nothing is ready at the current virtual time (timers later on stay pending)."""
        for _ in range(limit):
            if not self._ready and not self._due():  # type: ignore[attr-defined]
                return
            self.step()
        raise RuntimeError(f"the loop did not settle within {limit} iterations (a busy loop?)")

    def step(self) -> None:
        """Run one iteration of the loop (what is ready now), without moving the clock."""
        self.call_soon(self.stop)
        self.run_forever()

    def _due(self) -> bool:
        scheduled = self._scheduled  # type: ignore[attr-defined]
        return bool(scheduled) and scheduled[0].when() <= self.time() + self._clock_resolution  # type: ignore[attr-defined]


# --- fake systemd -----------------------------------------------------------------------------------

_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|.)")


def _unescape(word: str) -> str:
    def one(m: re.Match[str]) -> str:
        e = m.group(1)
        if e.startswith("x"):
            return chr(int(e[1:], 16))
        return {"t": "\t", "n": "\n"}.get(e, e)

    return _ESCAPE.sub(one, word).replace("%%", "%")


def parse_exec_start(dropin: str) -> list[list[str]] | None:
    """The argv systemd would show over D-Bus for the router's drop-in (its own quoting only; "$$" stays
    doubled, as systemd keeps it until it runs the command); None when the drop-in sets no ExecStart."""
    commands: list[list[str]] | None = None
    for line in dropin.splitlines():
        if line == "ExecStart=":
            commands = []
        elif line.startswith("ExecStart="):
            commands = (commands or []) + [[_unescape(w) for w in _QUOTED.findall(line[len("ExecStart="):])]]
    return commands


@dataclass
class FakeUnit:
    name: str
    active_state: str = "inactive"
    sub_state: str = "dead"
    result: str = "success"
    invocation: int = 0
    pid: int = 0
    exit_status: int = 0
    base_argv: list[str] = field(default_factory=lambda: ["/bin/engine", "--unit-default"])
    loaded_argv: list[list[str]] | None = None  # from the drop-in at the last reload
    loaded_model: str | None = None  # the drop-in's model marker at the last reload
    running_model: str | None = None  # what the running process serves ("unit:NAME" without a drop-in)
    by_router: bool = False  # the running process was started by the router (not by `systemctl start`)

    def to_state(self) -> UnitState:
        return UnitState(name=self.name, load_state="loaded", active_state=self.active_state,
                         sub_state=self.sub_state, result=self.result,
                         invocation_id=f"{self.invocation:032x}" if self.invocation else "",
                         main_pid=self.pid if self.active_state in ("active", "activating", "deactivating") else 0,
                         exec_main_pid=self.pid, exec_main_start_us=0, exec_main_status=self.exit_status)


@dataclass
class Engine:
    """The process a started unit runs: it listens on `url` and serves `model`, healthy from `ready_at`."""

    unit: str
    url: str
    model: str | None
    ready_at: float


@dataclass
class Call:
    op: str
    unit: str | None
    behaviour: str
    at: float
    outcome: str = "pending"


class FakeSystemd:
    """The public API of router.systemd.Systemd over an in-memory manager with scripted faults.

    `script(op, behaviour)` queues how the next call of `op` goes: "ok", "fail" (start: the unit
    fails; stop: the job fails and the unit keeps running; others: SystemdError), "hang" (start/stop:
    no job result until the caller's timeout, then "timeout"; others: no reply for DBUS_TIMEOUT, then
    SystemdError) or "raise" (SystemdError at once). `url_of(unit)` and `ready_in(model)` come from the
    test: where a started unit's engine listens, and how long its model takes to become healthy.
    """

    def __init__(self, dropin_dir: Path, url_of: Callable[[str], str | None],
                 ready_in: Callable[[str | None], float]) -> None:
        self.dropin_dir = dropin_dir
        self.url_of = url_of
        self.ready_in = ready_in
        self.units: dict[str, FakeUnit] = {}
        self.engines: dict[str, Engine] = {}  # unit -> its running engine
        self.scripted: dict[str, deque[str]] = {op: deque() for op in OPS}
        self.calls: list[Call] = []
        self.mutating: dict[int, str] = {}  # id(task) -> unit, for tasks inside start()/stop() now
        self.max_concurrent_mutations = 0
        self.on_unit_change: Callable[[str], None] | None = None
        self.on_reconnect: Callable[[], None] | None = None
        self.connected = False
        self.opened = 0
        self.closed = 0
        self.reconnects = 0
        self._pids = iter(range(1000, 10**9))

    # --- test controls ------------------------------------------------------------------------

    def script(self, op: str, behaviour: str) -> None:
        self.scripted[op].append(behaviour)

    def clear_script(self) -> None:
        for q in self.scripted.values():
            q.clear()

    def unit(self, name: str) -> FakeUnit:
        if name not in self.units:
            self.units[name] = FakeUnit(name)
        return self.units[name]

    def running(self) -> set[str]:
        return {n for n, u in self.units.items() if u.active_state in ("active", "activating", "deactivating",
                                                                         "reloading")}

    def crash(self, name: str, result: str = "signal") -> None:
        """The unit's process dies on its own (OOM, SIGKILL, a bug): failed, as systemd reports it."""
        u = self.unit(name)
        if u.active_state not in ("active", "activating"):
            return
        self._set(u, "failed", "failed", result=result, status=9)
        u.running_model = None
        self.engines.pop(name, None)

    def external_stop(self, name: str) -> None:
        """`systemctl stop` behind the router's back."""
        u = self.unit(name)
        if u.active_state in ("active", "activating"):
            self._set(u, "inactive", "dead")
            u.running_model = None
            self.engines.pop(name, None)

    def external_start(self, name: str) -> None:
        """`systemctl start` behind the router's back: runs whatever its configuration says."""
        u = self.unit(name)
        if u.active_state in ("inactive", "failed"):
            self._launch(u)
            u.by_router = False

    def bus_down(self) -> None:
        """The D-Bus connection is lost: every call fails at once and no state change is reported."""
        self.connected = False

    def bus_up(self) -> None:
        """The bus is back: the connection is re-made and the router is told (on_reconnect)."""
        if self.connected:
            return
        self.connected = True
        self.reconnects += 1
        if self.on_reconnect is not None:
            asyncio.get_event_loop().call_soon(self.on_reconnect)

    def engine_at(self, url: str) -> list[Engine]:
        """The engine that answers at url: the first one that bound its port (a later one fails to bind)."""
        return [e for e in self.engines.values() if e.url == url][:1]

    # --- internals ----------------------------------------------------------------------------

    def _set(self, u: FakeUnit, active: str, sub: str, result: str | None = None, status: int = 0) -> None:
        u.active_state, u.sub_state = active, sub
        if result is not None:
            u.result, u.exit_status = result, status
        if self.on_unit_change is not None and self.connected:  # signals are lost while the bus is down
            asyncio.get_event_loop().call_soon(self.on_unit_change, u.name)

    def _launch(self, u: FakeUnit) -> None:
        u.invocation += 1
        u.pid = next(self._pids)
        u.result, u.exit_status = "success", 0
        u.running_model = u.loaded_model if u.loaded_argv is not None else f"unit:{u.name}"
        url = self.url_of(u.name)
        if url is not None:
            now = asyncio.get_event_loop().time()
            self.engines[u.name] = Engine(u.name, url, u.running_model, now + self.ready_in(u.running_model))
        self._set(u, "active", "running")

    async def _enter(self, op: str, unit: str | None) -> tuple[str, Call]:
        behaviour = self.scripted[op].popleft() if self.scripted[op] else "ok"
        call = Call(op, unit, behaviour, asyncio.get_running_loop().time())
        self.calls.append(call)
        await asyncio.sleep(0)  # every call yields: a cancellation may land here
        if not self.connected:
            call.outcome = "unreachable"
            raise SystemdUnreachable(f"{op}: The connection is closed (fake: the bus is down)")
        return behaviour, call

    async def _plain(self, op: str, unit: str | None) -> Call:
        """The common part of the calls that only read or reload: hang/raise/fail are D-Bus errors."""
        behaviour, call = await self._enter(op, unit)
        if behaviour == "hang":
            await asyncio.sleep(DBUS_TIMEOUT)
            call.outcome = "timeout"
            raise SystemdError(f"{op}: Timeout was reached (fake)")
        if behaviour in ("raise", "fail"):
            call.outcome = "raised"
            raise SystemdError(f"{op}: the fake manager refused ({behaviour})")
        call.outcome = "ok"
        return call

    def _track(self, unit: str) -> int:
        task = asyncio.current_task()
        key = id(task)
        self.mutating[key] = unit
        self.max_concurrent_mutations = max(self.max_concurrent_mutations, len(self.mutating))
        return key

    # --- the Systemd API ----------------------------------------------------------------------

    async def open(self) -> None:
        await asyncio.sleep(0)
        self.opened += 1
        self.connected = True  # a test that wants the bus down at start calls bus_down() after open

    async def close(self) -> None:
        self.closed += 1
        self.connected = False

    async def watch(self, names: list[str]) -> None:
        await self._plain("watch", None)
        for n in names:
            self.unit(n)

    async def state(self, name: str) -> UnitState:
        await self._plain("state", name)
        return self.unit(name).to_state()

    async def states(self, names: list[str]) -> dict[str, UnitState]:
        await self._plain("states", None)
        return {n: self.unit(n).to_state() for n in names}

    async def exec_start(self, name: str) -> list[list[str]]:
        await self._plain("exec_start", name)
        u = self.unit(name)
        return u.loaded_argv if u.loaded_argv is not None else [list(u.base_argv)]

    async def reset_failed(self, name: str) -> None:
        behaviour, call = await self._enter("reset_failed", name)
        if behaviour == "hang":
            await asyncio.sleep(DBUS_TIMEOUT)
        u = self.unit(name)
        if u.active_state == "failed":
            u.result = "success"
            self._set(u, "inactive", "dead")
        call.outcome = "ok"

    async def reload(self) -> None:
        await self._plain("reload", None)
        for u in self.units.values():
            try:
                text = (self.dropin_dir / f"{u.name}.d" / DROPIN_NAME).read_text(encoding="utf-8")
            except OSError:
                u.loaded_argv, u.loaded_model = None, None
                continue
            u.loaded_argv = parse_exec_start(text)
            u.loaded_model = dropin_model_id(text)

    async def start(self, name: str, timeout: float) -> str:
        behaviour, call = await self._enter("start", name)
        key = self._track(name)
        try:
            u = self.unit(name)
            if behaviour == "raise":
                call.outcome = "raised"
                raise SystemdError(f"StartUnit {name}: the fake manager refused")
            if u.active_state in ("active", "activating"):
                call.outcome = "done"
                return "done"
            self._set(u, "activating", "start")
            await asyncio.sleep(0)
            if behaviour == "fail":
                u.invocation += 1
                u.pid = next(self._pids)
                self._set(u, "failed", "failed", result="exit-code", status=3)
                call.outcome = "failed"
                return "failed"
            if behaviour == "hang":
                await asyncio.sleep(timeout)  # the job is still running when the caller gives up
                call.outcome = "timeout"
                return "timeout"
            self._launch(u)
            u.by_router = True
            await asyncio.sleep(0)
            call.outcome = "done"
            return "done"
        finally:
            self.mutating.pop(key, None)

    async def stop(self, name: str, timeout: float) -> str:
        behaviour, call = await self._enter("stop", name)
        key = self._track(name)
        try:
            u = self.unit(name)
            if behaviour == "raise":
                call.outcome = "raised"
                raise SystemdError(f"StopUnit {name}: the fake manager refused")
            if behaviour == "hang":
                await asyncio.sleep(timeout)
                call.outcome = "timeout"
                return "timeout"
            if behaviour == "fail":
                call.outcome = "failed"
                return "failed"
            if u.active_state in ("active", "activating", "deactivating"):
                self._set(u, "deactivating", "stop-sigterm")
                await asyncio.sleep(0)
                self._set(u, "inactive", "dead")
                u.running_model = None
                self.engines.pop(name, None)
            call.outcome = "done"
            return "done"
        finally:
            self.mutating.pop(key, None)


# --- fake health probe ------------------------------------------------------------------------------


class FakeProbe:
    """`probe(url, timeout) -> bool`: True when an engine listening on url is healthy by now.

    `script(behaviour)` queues how the next probes go: "ok" (answer the truth), "hang" (no answer
    until the timeout, then False), "raise" (connection refused: False at once)."""

    def __init__(self, systemd: FakeSystemd) -> None:
        self.systemd = systemd
        self.scripted: deque[str] = deque()
        self.count = 0

    def script(self, behaviour: str) -> None:
        self.scripted.append(behaviour)

    async def __call__(self, url: str, timeout: float) -> bool:
        self.count += 1
        behaviour = self.scripted.popleft() if self.scripted else "ok"
        await asyncio.sleep(0)
        if behaviour == "hang":
            await asyncio.sleep(timeout)
            return False
        if behaviour == "raise":
            return False
        now = asyncio.get_running_loop().time()
        return any(url.startswith(e.url) and now >= e.ready_at for e in self.systemd.engines.values())


@dataclass
class FakeResponse:
    status_code: int


class ProbeAsHttp:
    """The httpx-client face of a probe, for a Switcher that takes `http` and calls `http.get(url, timeout=)`."""

    def __init__(self, probe: Callable[[str, float], Any]) -> None:
        self.probe = probe

    async def get(self, url: str, timeout: float = 5.0, **_: Any) -> FakeResponse:
        import httpx

        ok = await self.probe(url, timeout)
        if ok is None:
            raise httpx.ConnectError("fake: connection refused")
        return FakeResponse(200 if ok else 503)
