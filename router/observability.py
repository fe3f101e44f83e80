"""Observability wiring: metrics, the /events hub, GPU telemetry and history on the switcher's events, and their routes.

`Observability(switcher, history)` subscribes its observers to `switcher.events`; `routes(guarded)`
gives GET /metrics, /events, /logs/{model} and /history behind the API-key guard; `stop_streams()`
ends the never-ending responses (SSE) when the daemon stops; `close()` also writes out the history.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from router import gpu as gpu_module
from router.chunks import error_body
from router.events import Event, RequestEnded
from router.gpu import GpuReader
from router.history import History
from router.hub import EventHub, frame
from router.journal import MAX_LINES, JournalUnavailable, unit_follow, unit_tail
from router.metrics import Metrics
from router.switcher import Switcher

log = structlog.get_logger("router.observability")

Handler = Callable[[Request], Awaitable[Response]]
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
DEFAULT_LOG_LINES = 100


class Observability:
    """Everything GET /metrics, /events, /logs and /history need, fed by the switcher's EventBus."""

    def __init__(self, switcher: Switcher, history: History | None = None, gpu: GpuReader | None = None,
                 gpu_every: float = 5.0, events_buffer: int = 512, process_metrics: bool = True) -> None:
        self.switcher = switcher
        self.history = history
        self.gpu = gpu or gpu_module.reader()
        self.hub = EventHub(self.gpu.read, gpu_every=gpu_every, buffer=events_buffer)
        self._unit_states: dict[str, str] = {}
        self.metrics = Metrics(models=lambda: switcher.config.models, unit_states=lambda: self._unit_states,
                               gpu=lambda: self.gpu.last, process=process_metrics,
                               events=lambda: (len(self.hub.clients), self.hub.dropped_total))
        self.stopping = asyncio.Event()
        observers = [self.metrics.observe, self.hub.observe] + ([self._observe_history] if history else [])
        self._unsubscribe = [switcher.events.subscribe(o) for o in observers]

    def _observe_history(self, event: Event) -> None:
        """History keeps configured models only: a client's made-up model names must not grow the database."""
        assert self.history is not None
        if not isinstance(event, RequestEnded) or event.model in self.switcher.config.models:
            self.history.observe(event)

    @classmethod
    async def start(cls, switcher: Switcher) -> Observability:
        """The daemon's: history from the state directory, and a first GPU reading (the log says if there is none)."""
        history = await asyncio.to_thread(History.open)
        observability = cls(switcher, history)
        await asyncio.to_thread(observability.gpu.read)
        return observability

    def routes(self, guarded: Callable[[Handler], Handler]) -> list[Route]:
        return [
            Route("/metrics", guarded(self.get_metrics), methods=["GET"]),
            Route("/events", guarded(self.get_events), methods=["GET"]),
            Route("/logs/{model:path}", guarded(self.get_logs), methods=["GET"]),
            Route("/history", guarded(self.get_history), methods=["GET"]),
        ]

    def expected_load_seconds(self, model_id: str) -> float | None:
        """The model's typical load time from history (for `loading_line(..., expected=)`); None if unknown."""
        return self.history.typical_load_seconds(model_id) if self.history is not None else None

    def stop_streams(self) -> None:
        """End every /events and /logs?follow=1 response (they never end on their own)."""
        self.hub.close()
        self.stopping.set()

    async def close(self) -> None:
        self.stop_streams()
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        if self.history is not None:
            await asyncio.to_thread(self.history.close)

    # --- handlers ------------------------------------------------------------------------------

    async def get_metrics(self, request: Request) -> Response:
        config = self.switcher.config
        try:
            states = await asyncio.wait_for(self.switcher.systemd.states(config.managed_units()), 2.0)
            self._unit_states = {unit: state.active_state for unit, state in states.items()}
        except Exception as e:  # systemd unreachable for a moment: keep the last states, keep answering
            log.warning("metrics_unit_states_unavailable", error=str(e))
        await asyncio.to_thread(self.gpu.read)  # NVML may block: read off the loop, then render from .last
        body, content_type = self.metrics.render()
        return Response(body, headers={"content-type": content_type})

    async def get_events(self, request: Request) -> Response:
        return StreamingResponse(self.hub.stream(), media_type="text/event-stream", headers=SSE_HEADERS)

    async def get_history(self, request: Request) -> Response:
        if self.history is None:
            return JSONResponse({"available": False, "models": {}})
        return JSONResponse({"available": True, "path": str(self.history.path), "models": self.history.summary()})

    async def get_logs(self, request: Request) -> Response:
        config = self.switcher.config
        model_id = request.path_params["model"]
        model = config.models.get(model_id)
        if model is None:
            return JSONResponse(error_body(f"The model `{model_id}` does not exist. Known models: "
                                           f"{', '.join(config.models)}.", "model_not_found", param="model"),
                                status_code=404)
        raw = request.query_params.get("lines", str(DEFAULT_LOG_LINES))
        try:
            lines = int(raw)
        except ValueError:
            lines = -1
        if not 1 <= lines <= MAX_LINES:
            return JSONResponse(error_body(f"`lines` must be a whole number from 1 to {MAX_LINES}, not {raw!r}.",
                                           "invalid_field", param="lines"), status_code=400)
        unit = config.unit_of(model)
        user_bus = config.systemd.bus == "user"
        if request.query_params.get("follow", "0").lower() in ("1", "true", "yes"):
            return StreamingResponse(self._follow(model_id, unit, user_bus, lines), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        try:
            text = await unit_tail(unit, user_bus, lines)
        except JournalUnavailable as e:
            return JSONResponse(error_body(
                f"Cannot read the journal of {unit} (model `{model_id}`): {e}. On the host, "
                f"`{config.journalctl(unit)}` shows it.", "journal_unavailable", "server_error"), status_code=503)
        return JSONResponse({"model": model_id, "unit": unit, "lines": text})

    async def _follow(self, model_id: str, unit: str, user_bus: bool, lines: int) -> AsyncIterator[bytes]:
        yield b": following " + unit.encode() + b"\n\n"
        try:
            async for line in unit_follow(unit, user_bus, lines, stop=self.stopping):
                yield frame("log", {"line": line})
        except JournalUnavailable as e:
            yield frame("end", {"reason": f"cannot follow the journal of {unit} (model `{model_id}`): {e}"})
            return
        yield frame("end", {"reason": "the router is stopping"})
