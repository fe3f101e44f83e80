"""Server-Sent Events for dashboards (GET /events): the router's events fanned out to bounded client buffers.

`EventHub.observe` is an EventBus observer. With no client connected it returns at once; otherwise it
encodes the event once and appends the frame to every client's buffer, a deque of at most `buffer`
frames: a client that reads too slowly (or not at all) loses its oldest frames, never slows the
router, and is told, before the frames that follow the gap, how many it lost (a `dropped` event).
While at least one client listens, a task reads the GPUs every `gpu_every` seconds and sends `gpu`.

Wire format (`event:` name, `data:` one JSON object; README, Observability):
state, switch, request, queue, gpu, dropped; a `: keepalive` comment every `keepalive` seconds.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import fields
from typing import Any

import structlog

from router.events import Event, ModelState, QueueDepth, RequestEnded, SwitchEnded, SwitchProgress
from router.gpu import GpuSnapshot

log = structlog.get_logger("router.hub")

KEEPALIVE = b": keepalive\n\n"
_REQUEST_FIELDS = tuple(f.name for f in fields(RequestEnded))


def frame(name: str, data: dict[str, Any]) -> bytes:
    """One SSE event."""
    return b"event: " + name.encode() + b"\ndata: " + json.dumps(
        data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def wire(event: Event) -> tuple[str, dict[str, Any]] | None:
    """The SSE event name and data of a typed event."""
    if isinstance(event, ModelState):
        return "state", {"model": event.model, "state": event.state, "unit": event.unit, "error": event.error}
    if isinstance(event, SwitchProgress):
        return "switch", {"switch_id": event.switch_id, "target": event.target, "phase": event.phase,
                          "elapsed": round(event.elapsed, 3), "line": event.line}
    if isinstance(event, SwitchEnded):
        return "switch", {"switch_id": event.switch_id, "target": event.target, "phase": "ended",
                          "from": event.from_model, "outcome": event.outcome, "duration": round(event.duration, 3),
                          "load_seconds": event.load_seconds, "error": event.error}
    if isinstance(event, RequestEnded):
        data = {name: getattr(event, name) for name in _REQUEST_FIELDS}  # dataclasses.asdict: 5x slower
        data["tokens"] = event.completion_tokens
        return "request", data
    if isinstance(event, QueueDepth):
        return "queue", {"waiting": event.waiting, "oldest_wait": event.oldest_wait}
    return None


class Client:
    """One /events listener: a bounded buffer of encoded frames, and how many it lost."""

    def __init__(self, size: int) -> None:
        self.buffer: deque[bytes] = deque(maxlen=size)
        self.dropped = 0  # frames lost since it connected
        self.unreported = 0  # lost and not yet told
        self.wake = asyncio.Event()

    def put(self, data: bytes) -> bool:
        """Buffer one frame; True if the oldest had to go to make room."""
        full = len(self.buffer) == self.buffer.maxlen
        if full:
            self.dropped += 1
            self.unreported += 1
        self.buffer.append(data)  # a full deque drops its oldest
        self.wake.set()
        return full


class EventHub:
    """Fans events out to /events clients."""

    def __init__(self, gpu: Callable[[], GpuSnapshot] | None = None, gpu_every: float = 5.0,
                 buffer: int = 512, keepalive: float = 15.0) -> None:
        self.gpu = gpu
        self.gpu_every = gpu_every
        self.buffer = buffer
        self.keepalive = keepalive
        self.clients: set[Client] = set()
        self.states: dict[str, dict[str, Any]] = {}  # each model's last `state`, sent to new clients
        self.closed = False
        self.dropped_total = 0  # events lost by slow clients, all clients together (a metric)
        self._gpu_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    # --- the observer ---------------------------------------------------------------------------

    def observe(self, event: Event) -> None:
        if isinstance(event, ModelState):
            self.states[event.model] = wire(event)[1]  # type: ignore[index]
        if not self.clients:
            return
        named = wire(event)
        if named is not None:
            self.publish(*named)

    def publish(self, name: str, data: dict[str, Any]) -> None:
        """Send one event (`data` gains a `time`) to every client, from any thread; encoded once."""
        if not self.clients:
            return
        data["time"] = round(time.time(), 3)
        encoded = frame(name, data)
        if self._loop is not None and threading.get_ident() != self._loop_thread:
            self._loop.call_soon_threadsafe(self._put, encoded)
        else:
            self._put(encoded)

    def _put(self, encoded: bytes) -> None:
        for client in self.clients:
            if client.put(encoded):
                self.dropped_total += 1

    # --- clients ----------------------------------------------------------------------------------

    def subscribe(self) -> Client:
        """A new client (call on the event loop), primed with every model's last state."""
        self._loop, self._loop_thread = asyncio.get_running_loop(), threading.get_ident()
        client = Client(self.buffer)
        for data in self.states.values():
            client.put(frame("state", data))
        self.clients.add(client)
        if self.gpu is not None and self._gpu_task is None:
            self._gpu_task = asyncio.create_task(self._send_gpu(), name="events-gpu")
        return client

    def unsubscribe(self, client: Client) -> None:
        self.clients.discard(client)
        if not self.clients and self._gpu_task is not None:
            self._gpu_task.cancel()
            self._gpu_task = None

    async def stream(self, client: Client | None = None) -> AsyncIterator[bytes]:
        """A client's SSE body (a new client unless given): frames as they come, `dropped` where it lost some."""
        if client is None:
            client = self.subscribe()
        try:
            yield b": connected\n\n"
            while not self.closed:
                if not client.buffer:
                    client.wake.clear()
                    try:
                        await asyncio.wait_for(client.wake.wait(), self.keepalive)
                    except asyncio.TimeoutError:
                        yield KEEPALIVE
                    continue
                chunk = []
                if client.unreported:
                    chunk.append(frame("dropped", {"dropped": client.unreported, "total": client.dropped,
                                                   "buffer": self.buffer}))
                    client.unreported = 0
                chunk.extend(client.buffer)
                client.buffer.clear()
                yield b"".join(chunk)  # waits while the client does not read: its buffer keeps the rest
        finally:
            self.unsubscribe(client)

    def close(self) -> None:
        """End every stream (shutdown: SSE responses never end on their own)."""
        self.closed = True
        for client in list(self.clients):
            client.wake.set()
        if self._gpu_task is not None:
            self._gpu_task.cancel()
            self._gpu_task = None

    async def _send_gpu(self) -> None:
        assert self.gpu is not None
        while True:
            try:
                snap = await asyncio.to_thread(self.gpu)
            except Exception:  # GpuReader never raises; a stand-in might: keep the ticker alive
                log.exception("gpu_read_failed")
            else:
                self.publish("gpu", snap.as_dict())
            await asyncio.sleep(self.gpu_every)
