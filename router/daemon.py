"""The daemon: wires config, systemd, switcher and HTTP server together and handles signals."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import structlog
import uvicorn

from router import notify
from router.app import create_app
from router.config import Config, ConfigError, load_config
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


def _stop(server: uvicorn.Server) -> None:
    log.info("stopping", grace=SHUTDOWN_GRACE)
    server.should_exit = True


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
    switcher = Switcher(config, Systemd(bus_address(config.systemd.bus), lambda: set(
        switcher.config.managed_units())), http.probe)
    try:
        await switcher.start()
    except SystemdError as e:
        print(f"llm-router: cannot reach the systemd {config.systemd.bus} manager over D-Bus: {e}\n"
              f"Check systemd.bus in {config_dir}/config.yml (system needs root or polkit rights; user needs "
              "a running `systemd --user` and DBUS_SESSION_BUS_ADDRESS).", flush=True)
        await http.close()
        return 3
    app = create_app(switcher, http)
    server = _Server(uvicorn.Config(
        app, host=config.listen.host, port=config.listen.port, loop="none", http="httptools",
        lifespan="off", log_level="warning", access_log=False, timeout_graceful_shutdown=SHUTDOWN_GRACE,
        timeout_keep_alive=75))
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(reload(switcher, config_dir)))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _stop, server)
    serving = asyncio.create_task(server.serve())
    while not server.started and not serving.done():
        await asyncio.sleep(0.01)
    feeder: asyncio.Task[None] | None = None
    if server.started:
        log.info("listening", host=config.listen.host, port=config.listen.port, config_dir=str(config_dir),
                 models=len(config.models), bus=config.systemd.bus)
        notify.notify(f"READY=1\nSTATUS=listening on {config.listen.host}:{config.listen.port}")
        watchdog = notify.watchdog_interval()
        feeder = asyncio.create_task(_feed_watchdog(watchdog)) if watchdog else None
    await serving
    notify.notify("STOPPING=1")
    if feeder is not None:
        feeder.cancel()
    await switcher.close()
    await http.close()
    log.info("stopped")
    return 0 if server.started else 4


async def reload(switcher: Switcher, config_dir: Path) -> None:
    """SIGHUP: re-read both files; a valid config applies to the next request, an invalid one is refused."""
    notify.notify("RELOADING=1")
    try:
        config = await asyncio.to_thread(load_config, config_dir)
    except ConfigError as e:
        switcher.reload_error = [str(p) for p in e.problems]
        log.error("reload_rejected", problems=switcher.reload_error,
                  hint="the previous configuration keeps serving; fix the files and reload again")
    else:
        old = switcher.config
        if (old.listen != config.listen) or (old.systemd != config.systemd):
            log.warning("reload_needs_restart", keys="listen/systemd",
                        hint="listen and systemd settings take effect at the next restart")
            config = _keep_fixed(config, old)
        switcher.reload(config)
        log.info("reloaded", models=len(config.models), backends=len(config.backends))
    notify.notify("READY=1")


def _keep_fixed(config: Config, old: Config) -> Config:
    return replace(config, listen=old.listen, systemd=old.systemd)


async def _feed_watchdog(every: float) -> None:
    while True:
        notify.notify("WATCHDOG=1")
        await asyncio.sleep(every)


def run(config_dir: Path) -> int:
    try:
        import uvloop

        return uvloop.run(serve(config_dir))
    except ImportError:
        return asyncio.run(serve(config_dir))
