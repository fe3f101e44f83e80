"""The daemon: wires config, systemd, switcher and HTTP server together and handles signals."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog
import uvicorn

from router import httpserver, notify, ports
from router import sleep as engine_sleep
from router.app import create_app
from router.config import Config, ConfigError, load_config
from router.control import ControlServer
from router.gpumemory import NvmlMemory
from router.observability import Observability
from router.switcher import Switcher
from router.systemd import Systemd, SystemdError, bus_address
from router.upstream import Upstream

log = structlog.get_logger("router.daemon")

SHUTDOWN_GRACE = 30.0  # seconds in-flight streams may take to finish on SIGTERM


class _Server(uvicorn.Server):
    """uvicorn's server, minus its signal handling: it re-raises SIGTERM after shutting down, which
    would end the process before the router has closed its D-Bus connection and said so."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _stop(server: uvicorn.Server, *then: Callable[[], None]) -> None:
    log.info("stopping", grace=SHUTDOWN_GRACE)
    server.should_exit = True
    for call in then:
        call()


def make_http() -> Upstream:
    """The daemon's one HTTP client, for all engines (relay and health checks): pooled keep-alive
    connections, aiohttp's C parser; timeouts come from config.yml per request."""
    return Upstream()


async def serve(config_dir: Path) -> int:
    try:
        config = load_config(config_dir)
    except ConfigError as e:
        log.error("config_invalid", problems=[str(p) for p in e.problems])
        print(f"llm-router: the configuration in {config_dir} is not valid:\n{e}", flush=True)
        return 2
    http = make_http()
    systemd = Systemd(bus_address(config.systemd.bus), lambda: set(switcher.config.managed_units()))
    switcher = Switcher(config, systemd, http.probe, port_check=ports.url_in_use, memory=NvmlMemory(systemd),
                        sleeper=engine_sleep)
    observability = await Observability.start(switcher)  # before the switcher starts: it sees the adoption
    switcher.expected_load = observability.expected_load_seconds
    try:
        await switcher.start()
    except SystemdError as e:
        print(f"llm-router: cannot reach the systemd {config.systemd.bus} manager over D-Bus: "
              f"{getattr(e, 'reason', e)}\n"
              f"Check systemd.bus in {config_dir}/config.yml (system needs root or polkit rights; user needs "
              "a running `systemd --user` and DBUS_SESSION_BUS_ADDRESS).", flush=True)
        await observability.close()
        await http.close()
        return 3
    app = create_app(switcher, http, observability)
    server = _Server(uvicorn_config(app, config))
    loop = asyncio.get_running_loop()
    reloader = Reloader(switcher, config_dir)
    loop.add_signal_handler(signal.SIGHUP, reloader.request)
    control = ControlServer(config_dir, reloader.answer)
    await control.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _stop, server, observability.stop_streams)
    serving = asyncio.create_task(server.serve())
    while not server.started and not serving.done():
        await asyncio.sleep(0.01)
    feeder: asyncio.Task[None] | None = None
    if server.started:
        log.info("listening", host=config.listen.host, port=config.listen.port, config_dir=str(config_dir),
                 models=len(config.models), bus=config.systemd.bus)
        notify.notify(f"READY=1\nSTATUS=listening on {config.listen.host}:{config.listen.port}")
        watchdog = notify.watchdog_interval()
        feeder = asyncio.create_task(_feed_watchdog(switcher, watchdog)) if watchdog else None
    await serving
    notify.notify("STOPPING=1")
    await control.close()
    if feeder is not None:
        feeder.cancel()
    await switcher.close()
    await observability.close()
    await http.close()
    log.info("stopped")
    return 0 if server.started else 4


def uvicorn_config(app: Any, config: Config) -> uvicorn.Config:
    """The HTTP server's settings: httptools with the router's limits (router/httpserver.py); the
    keep-alive timeout is limits.idle_connection. Limits other than max_body_bytes apply at start only."""
    return uvicorn.Config(
        app, host=config.listen.host, port=config.listen.port, loop="none",
        http=httpserver.protocol_class(config.limits), ws="none", lifespan="off", log_level="warning", access_log=False,
        timeout_graceful_shutdown=SHUTDOWN_GRACE, timeout_keep_alive=config.limits.idle_connection,  # type: ignore[arg-type]
        backlog=2048)


@dataclass(frozen=True)
class ReloadOutcome:
    """What one reload did: applied (with counts and what waits for a restart) or rejected (problems)."""

    ok: bool
    problems: tuple[str, ...] = ()
    models: int = 0
    backends: int = 0
    needs_restart: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "problems": list(self.problems), "models": self.models,
                "backends": self.backends, "needs_restart": list(self.needs_restart)}


async def reload(switcher: Switcher, config_dir: Path) -> ReloadOutcome:
    """Re-read both files; a valid config applies to the next request, an invalid one is refused.

    Never raises, and always ends with READY=1, so systemd never stays in `reloading`: anything
    unexpected is a rejected reload too, shown in /status like a config error.
    """
    notify.notify("RELOADING=1")
    try:
        try:
            config = await asyncio.to_thread(load_config, config_dir)
        except ConfigError as e:
            return _rejected(switcher, [str(p) for p in e.problems])
        old = switcher.config
        needs_restart = tuple(k for k in ("listen", "systemd") if getattr(old, k) != getattr(config, k))
        if needs_restart:
            log.warning("reload_needs_restart", keys="/".join(needs_restart),
                        hint="listen and systemd settings take effect at the next restart")
            config = _keep_fixed(config, old)
        if replace(old.limits, max_body_bytes=0) != replace(config.limits, max_body_bytes=0):
            log.warning("reload_needs_restart", keys="limits (all but max_body_bytes)",
                        hint="the HTTP server's limits take effect at the next restart")
        switcher.reload(config)
        log.info("reloaded", models=len(config.models), backends=len(config.backends))
        return ReloadOutcome(True, models=len(config.models), backends=len(config.backends),
                             needs_restart=needs_restart)
    except Exception as e:  # a bug or an unreadable file must not leave systemd waiting, nor go unseen
        log.exception("reload_failed")
        return _rejected(switcher, [f"{config_dir}: the reload failed unexpectedly ({type(e).__name__}: {e}); "
                                    "the journal has the traceback"])
    finally:
        notify.notify("READY=1")


def _rejected(switcher: Switcher, problems: list[str]) -> ReloadOutcome:
    switcher.reload_error = problems
    log.error("reload_rejected", problems=problems,
              hint="the previous configuration keeps serving; fix the files and reload again")
    return ReloadOutcome(False, problems=tuple(problems))


class Reloader:
    """Applies reload requests (SIGHUP, `llm-router reload`) one at a time, in the order they came.

    A request is answered by a load that started after it arrived, so the newest files always win;
    the requests that arrive while a load runs share the next one.
    """

    def __init__(self, switcher: Switcher, config_dir: Path) -> None:
        self.switcher = switcher
        self.config_dir = config_dir
        self._requested = 0  # requests so far; each waiter remembers its number
        self._waiters: list[tuple[int, asyncio.Future[ReloadOutcome]]] = []
        self._worker: asyncio.Task[None] | None = None

    def request(self) -> asyncio.Future[ReloadOutcome]:
        """Ask for a reload; the future resolves with the outcome of a load that started after now."""
        self._requested += 1
        future: asyncio.Future[ReloadOutcome] = asyncio.get_running_loop().create_future()
        self._waiters.append((self._requested, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work(), name="reload")
        return future

    async def answer(self, command: str) -> dict[str, object]:
        """The control socket's commands (`llm-router reload`)."""
        if command != "reload":
            return {"ok": False, "error": f"unknown command {command!r} (known: reload)"}
        return (await self.request()).as_dict()

    async def _work(self) -> None:
        while self._waiters:
            covered = self._requested  # every request so far came before this load starts
            outcome = await reload(self.switcher, self.config_dir)
            for number, future in self._waiters:
                if number <= covered and not future.done():
                    future.set_result(outcome)
            self._waiters = [(n, f) for n, f in self._waiters if n > covered]


def _keep_fixed(config: Config, old: Config) -> Config:
    return replace(config, listen=old.listen, systemd=old.systemd)


async def _feed_watchdog(switcher: Switcher, every: float) -> None:
    """Feed systemd's watchdog only while the run loop answers its heartbeat: a wedged or dead owner
    of state gets the router restarted instead of a daemon that accepts requests and never answers."""
    missed = 0
    while True:
        if await switcher.heartbeat(timeout=every):
            notify.notify("WATCHDOG=1")
            missed = 0
        else:
            missed += 1
            log.error("run_loop_stalled", missed=missed, hint="not feeding the watchdog: systemd will restart "
                      "the router if this goes on")
        await asyncio.sleep(every)


def run(config_dir: Path) -> int:
    try:
        import uvloop

        return uvloop.run(serve(config_dir))
    except ImportError:
        return asyncio.run(serve(config_dir))
