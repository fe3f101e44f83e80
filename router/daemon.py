"""The daemon: wires config, systemd, switcher and HTTP server together and handles signals."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import structlog
import uvicorn

from router import httpserver, notify, ports
from router.app import create_app
from router.config import Config, ConfigError, load_config
from router.executor import HealthProbe
from router.observability import Observability
from router.switcher import Switcher
from router.systemd import Systemd, SystemdError, bus_address

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


def make_probe(http: httpx.AsyncClient) -> HealthProbe:
    """The switcher's health check: GET url, True on 200."""
    async def probe(url: str, timeout: float) -> bool:
        try:
            return (await http.get(url, timeout=timeout)).status_code == 200
        except httpx.HTTPError:
            return False

    return probe


def make_http() -> httpx.AsyncClient:
    """One pooled client for all engines: warm keep-alive connections, no read timeout on streams."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(connect=10.0, read=None, write=60.0, pool=None),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64, keepalive_expiry=120),
        trust_env=False,
    )


async def serve(config_dir: Path) -> int:
    try:
        config = load_config(config_dir)
    except ConfigError as e:
        log.error("config_invalid", problems=[str(p) for p in e.problems])
        print(f"llm-router: the configuration in {config_dir} is not valid:\n{e}", flush=True)
        return 2
    http = make_http()
    switcher = Switcher(config, Systemd(bus_address(config.systemd.bus), lambda: set(
        switcher.config.managed_units())), make_probe(http), port_check=ports.url_in_use)
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
        await http.aclose()
        return 3
    app = create_app(switcher, http, observability)
    server = _Server(uvicorn_config(app, config))
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(reload(switcher, config_dir)))
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
    if feeder is not None:
        feeder.cancel()
    await switcher.close()
    await observability.close()
    await http.aclose()
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
        if replace(old.limits, max_body_bytes=0) != replace(config.limits, max_body_bytes=0):
            log.warning("reload_needs_restart", keys="limits (all but max_body_bytes)",
                        hint="the HTTP server's limits take effect at the next restart")
        switcher.reload(config)
        log.info("reloaded", models=len(config.models), backends=len(config.backends))
    notify.notify("READY=1")


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
