"""router/systemd.py without a systemd: unit states, error words, and what calls do with no bus."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from router.systemd import Systemd, SystemdError, SystemdUnreachable, UnitState, _error_text

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(("active_state", "running"), [
    ("active", True), ("activating", True), ("reloading", True),
    ("deactivating", True),  # still stopping: its processes may hold the GPU
    ("inactive", False), ("failed", False),
])
def test_is_running_is_anything_but_stopped(active_state: str, running: bool) -> None:
    state = UnitState("x.service", active_state=active_state)
    assert state.is_running is running
    assert state.is_stopping is (active_state == "deactivating")


def test_unreachable_is_a_systemd_error_with_its_reason() -> None:
    e = SystemdUnreachable("the connection to the bus at unix:path=/x was closed")
    assert isinstance(e, SystemdError)
    assert str(e) == "systemd is not reachable over D-Bus: the connection to the bus at unix:path=/x was closed"
    assert e.reason == "the connection to the bus at unix:path=/x was closed"


def test_dbus_errors_in_words() -> None:
    from gi.repository import Gio, GLib

    e = Gio.DBusError.new_for_dbus_error("org.freedesktop.systemd1.NoSuchUnit", "Unit x.service not found.")
    assert _error_text(e) == "Unit x.service not found (org.freedesktop.systemd1.NoSuchUnit)"
    assert _error_text(GLib.Error("The connection is closed")) == "The connection is closed"


async def test_calls_before_open_fail_at_once() -> None:
    sd = Systemd("unix:path=/nonexistent", set)
    assert not sd.connected
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: sd.state("x.service"), lambda: sd.start("x.service", 60), lambda: sd.stop("x.service", 60),
        sd.reload, lambda: sd.watch(["x.service"]), lambda: sd.exec_start("x.service"),
        lambda: sd.reset_failed("x.service")]
    for call in calls:
        with pytest.raises(SystemdUnreachable, match=r"^systemd is not reachable over D-Bus: not connected$"):
            await asyncio.wait_for(call(), 5)


async def test_open_without_a_bus_says_where(tmp_path: Path) -> None:
    address = f"unix:path={tmp_path}/no-bus"
    sd = Systemd(address, set)
    with pytest.raises(SystemdUnreachable, match=f"cannot connect to the bus at {address}: Could not connect"):
        await asyncio.wait_for(sd.open(), 10)
    assert not sd.connected
    await sd.close()
