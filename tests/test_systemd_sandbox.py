"""router/systemd.py against a real systemd user manager: jobs, signals, error words, and healing
after the D-Bus daemon goes away (on a sandbox of its own: that takes every bus client down)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from sandbox import Sandbox, Units, require_sandbox, running_sandbox

from router.systemd import Systemd, SystemdError, SystemdUnreachable

pytestmark = pytest.mark.timeout(90)


class Watcher:
    """A Systemd client on a sandbox, with what its callbacks reported."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.names: set[str] = set()
        self.sd = Systemd(sandbox.outside_bus, lambda: set(self.names), reconnect_delays=(0.05, 0.5))
        self.changes: list[str] = []
        self.changed = asyncio.Event()
        self.reconnects = 0
        self.reconnected = asyncio.Event()
        self.sd.on_unit_change = self._on_change
        self.sd.on_reconnect = self._on_reconnect

    def _on_change(self, name: str) -> None:
        self.changes.append(name)
        self.changed.set()

    def _on_reconnect(self) -> None:
        self.reconnects += 1
        self.reconnected.set()

    async def watch(self, *names: str) -> None:
        self.names.update(names)
        await self.sd.watch(list(names))

    async def wait_for_change(self, name: str, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while name not in self.changes:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), max(end - time.monotonic(), 0.01))


@contextlib.asynccontextmanager
async def watcher(sandbox: Sandbox) -> AsyncIterator[Watcher]:
    w = Watcher(sandbox)
    await asyncio.wait_for(w.sd.open(), 10)
    try:
        yield w
    finally:
        await asyncio.wait_for(w.sd.close(), 10)


async def until(pred: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise TimeoutError(f"{what} not within {timeout}s")
        await asyncio.sleep(0.02)


def sleeper(units: Units, tag: str, service: str) -> str:
    """A unit that runs /bin/sleep, with extra [Service] lines."""
    name = units.name(tag)
    return units.write(name, f"[Unit]\nDescription=llm-router test {tag}\n[Service]\n{service}")


# --- on the shared sandbox ------------------------------------------------------------------------


async def test_jobs_and_state_changes(sandbox: Sandbox, units: Units) -> None:
    name = sleeper(units, "jobs", "Type=exec\nExecStart=/bin/sleep 60\n")
    sandbox.daemon_reload()
    async with watcher(sandbox) as w:
        await w.watch(name)
        assert await w.sd.start(name, 20) == "done"
        await w.wait_for_change(name)
        state = await w.sd.state(name)
        assert state.active_state == "active" and state.is_running and state.main_pid > 0
        w.changes.clear()
        assert await w.sd.stop(name, 20) == "done"
        await w.wait_for_change(name)
        assert not (await w.sd.state(name)).is_running


async def test_errors_name_the_method_and_the_unit(sandbox: Sandbox, units: Units) -> None:
    missing = units.name("missing")  # no unit file
    async with watcher(sandbox) as w:
        with pytest.raises(SystemdError) as err:
            await w.sd.start(missing, 10)
        assert not isinstance(err.value, SystemdUnreachable)
        assert str(err.value) == f"StartUnit {missing}: Unit {missing} not found (org.freedesktop.systemd1.NoSuchUnit)"
        assert "<lambda>" not in str(err.value)
        assert w.sd.connected  # systemd said no: the connection is fine


async def test_a_unit_still_stopping_counts_as_running(sandbox: Sandbox, units: Units) -> None:
    """`deactivating` (ExecStop= running, processes being killed) must not read as stopped."""
    name = sleeper(units, "stopping", "Type=exec\nExecStart=/bin/sleep 60\nExecStop=/bin/sleep 30\n"
                                      "TimeoutStopSec=3\n")
    sandbox.daemon_reload()
    async with watcher(sandbox) as w:
        await w.watch(name)
        assert await w.sd.start(name, 20) == "done"
        sandbox.systemctl("stop", "--no-block", name)
        await until(lambda: sandbox.active_state(name) == "deactivating", "deactivating")
        state = await w.sd.state(name)
        assert state.active_state == "deactivating" and state.is_stopping and state.is_running
        await w.sd.stop(name, 20)
        assert not (await w.sd.state(name)).is_running


# --- on a sandbox of its own: its bus goes away -------------------------------------------------


@pytest.fixture(scope="module")
def own_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    require_sandbox()
    with running_sandbox(tmp_path_factory.mktemp("sbx-bus")) as sbx:
        yield sbx


@pytest.fixture
def own_units(own_sandbox: Sandbox, request: pytest.FixtureRequest) -> Iterator[Units]:
    reg = Units(own_sandbox, request.node.name)
    try:
        yield reg
    finally:
        with contextlib.suppress(Exception):
            own_sandbox.start_bus()  # a failed test may leave the bus stopped
        reg.cleanup()


async def test_bus_stopped_calls_fail_at_once_then_it_heals(own_sandbox: Sandbox, own_units: Units) -> None:
    sbx = own_sandbox
    name = sleeper(own_units, "heal", "Type=exec\nExecStart=/bin/sleep 60\n")
    sbx.daemon_reload()
    async with watcher(sbx) as w:
        await w.watch(name)
        sbx.stop_bus()
        await until(lambda: not w.sd.connected, "the client sees the bus closed")
        for call in (lambda: w.sd.state(name), lambda: w.sd.start(name, 60), w.sd.reload):
            with pytest.raises(SystemdUnreachable, match=r"^systemd is not reachable over D-Bus: "):
                await asyncio.wait_for(call(), 5)  # at once: nothing waits for a D-Bus timeout
        await asyncio.sleep(0.3)  # a few reconnect attempts fail meanwhile
        assert w.sd.last_error is not None and "Connection refused" in w.sd.last_error, w.sd.last_error
        assert w.reconnects == 0

        sbx.start_bus()
        await asyncio.wait_for(w.reconnected.wait(), 10)
        assert w.sd.connected and w.sd.last_error is None and w.reconnects == 1
        # Subscribe()d again: JobRemoved ends jobs, PropertiesChanged reports state changes
        w.changes.clear()
        assert await w.sd.start(name, 20) == "done"
        await w.wait_for_change(name)
        assert (await w.sd.state(name)).active_state == "active"
        assert await w.sd.stop(name, 20) == "done"


async def test_bus_killed_during_a_job_ends_it_at_once(own_sandbox: Sandbox, own_units: Units) -> None:
    """A start job in flight fails as soon as the bus dies; the unit itself goes on (systemd keeps
    running without the bus); the client reconnects on its own (its own attempt socket-activates
    a new dbus-daemon) and sees systemd again."""
    sbx = own_sandbox
    name = sleeper(own_units, "job", "Type=oneshot\nExecStart=/bin/sleep 60\n")  # the job runs 60 s
    sbx.daemon_reload()
    async with watcher(sbx) as w:
        await w.watch(name)
        job = asyncio.create_task(w.sd.start(name, 60))
        await until(lambda: sbx.active_state(name) == "activating", "start job running")
        old = sbx.kill_bus()
        with pytest.raises(SystemdUnreachable, match=r"^systemd is not reachable over D-Bus: .*StartUnit"):
            await asyncio.wait_for(job, 10)
        await asyncio.wait_for(w.reconnected.wait(), 10)
        assert sbx.bus_pid() not in (0, old)
        state = await w.sd.state(name)
        assert state.active_state == "activating" and state.is_running  # the job outlived the bus
        assert await w.sd.stop(name, 20) == "done"



async def test_systemd_reexec_resubscribes(own_sandbox: Sandbox, own_units: Units) -> None:
    """daemon-reexec: systemd leaves the bus and comes back under a new name, keeping its
    subscribers; the client sees it (NameOwnerChanged), subscribes again on the same connection
    (AlreadySubscribed counts as done), and signals flow."""
    sbx = own_sandbox
    name = sleeper(own_units, "reexec", "Type=exec\nExecStart=/bin/sleep 60\n")
    sbx.daemon_reload()
    async with watcher(sbx) as w:
        await w.watch(name)
        await asyncio.to_thread(sbx.systemctl, "daemon-reexec")
        await asyncio.wait_for(w.reconnected.wait(), 10)
        assert w.sd.connected and w.reconnects == 1
        w.changes.clear()
        assert await w.sd.start(name, 20) == "done"
        await w.wait_for_change(name)
        assert await w.sd.stop(name, 20) == "done"


async def test_close_while_reconnecting(own_sandbox: Sandbox, own_units: Units) -> None:
    w = Watcher(own_sandbox)
    await asyncio.wait_for(w.sd.open(), 10)
    own_sandbox.stop_bus()
    await until(lambda: not w.sd.connected, "the client sees the bus closed")
    await asyncio.sleep(0.2)  # the reconnect task is retrying
    await asyncio.wait_for(w.sd.close(), 10)
    own_sandbox.start_bus()
    await asyncio.sleep(0.3)
    assert not w.sd.connected and w.reconnects == 0
    with pytest.raises(SystemdUnreachable):
        await w.sd.state("dbus.service")
