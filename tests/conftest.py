"""Pytest fixtures: a session-wide systemd sandbox, per-test backend units, and a router factory."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sandbox import (
    FIGURES_DIR,
    SCRIPT,
    FakeUnit,
    RouterHandle,
    Sandbox,
    Units,
    free_port,
    require_sandbox,
    running_sandbox,
)

DEFAULT_TIMEOUT = 90  # seconds per test unless it sets its own @pytest.mark.timeout


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM (e.g. from run.sh's overall `timeout`) ends the run like Ctrl-C, so fixtures still
    stop the router processes and the systemd sandbox instead of leaking them."""
    signal.signal(signal.SIGTERM, _interrupt)


def pytest_sessionstart(session: pytest.Session) -> None:
    """A new run: forget the figures of the last one (in the main process, not in xdist workers)."""
    if not hasattr(session.config, "workerinput"):
        for old in FIGURES_DIR.glob("*.txt"):
            old.unlink()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """The figures the suites measured (fault suite, stateful test), whichever process ran them."""
    if hasattr(config, "workerinput"):
        return
    for path in sorted(FIGURES_DIR.glob("*.txt")):
        terminalreporter.write_line(path.read_text(encoding="utf-8").rstrip())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Bound every test in time (pytest-timeout), unless it sets its own limit."""
    if not config.pluginmanager.hasplugin("timeout"):
        return
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TIMEOUT))


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Remember each phase's report on the item, so fixtures can dump logs of failed tests."""
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{rep.when}", rep)


def _failed(request: pytest.FixtureRequest) -> bool:
    rep = getattr(request.node, "rep_call", None)
    return rep is None or rep.failed


# --- sandbox and units ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """One private systemd user manager for the whole session (skips when this host cannot run it)."""
    require_sandbox()
    subprocess.run([str(SCRIPT), "gc"], check=False, capture_output=True, timeout=60)
    with running_sandbox(tmp_path_factory.mktemp("sbx")) as sbx:
        yield sbx


@pytest.fixture
def units(sandbox: Sandbox, request: pytest.FixtureRequest) -> Iterator[Units]:
    reg = Units(sandbox, request.node.name)
    try:
        yield reg
    finally:
        reg.cleanup()


@pytest.fixture
def write_unit(units: Units) -> Callable[..., str]:
    """write_unit(name, text, dropins=None): write a unit file that is removed after the test."""
    return units.write


@pytest.fixture
def fake_unit(units: Units) -> Callable[..., FakeUnit]:
    """fake_unit(tag, port=None, model_id=..., args=()): a Type=exec unit running fake_backend.py."""
    return units.fake


# --- the router ----------------------------------------------------------------------------------


@pytest.fixture
def router(sandbox: Sandbox, units: Units, tmp_path: Path,
           request: pytest.FixtureRequest) -> Iterator[Callable[..., RouterHandle]]:
    """router(backends, models, switch={...}, start=True, **config) -> a running RouterHandle.

    The config dir is a fresh tmp dir; systemd is the sandbox's user manager. Every router is
    stopped (SIGTERM, then SIGKILL) at teardown, before the test's units are stopped and removed.
    """
    handles: list[RouterHandle] = []

    def make(backends: dict[str, Any], models: dict[str, Any], start: bool = True,
             **config: Any) -> RouterHandle:
        n = len(handles)
        cdir = tmp_path / f"router{n}"
        cdir.mkdir()
        h = RouterHandle(sandbox, cdir, free_port(), tmp_path / f"router{n}.log")
        h.write_config(backends, models, **config)
        handles.append(h)
        if start:
            h.start()
        return h

    try:
        yield make
    finally:
        for h in handles:
            code = h.stop()
            if _failed(request):
                print(f"\n----- router log {h.log_path} (exit {code}) -----\n{h.log_text()[-8000:]}")
