"""Typed events: what the switcher and the relay tell observers (metrics, /events, history, logs).

The switcher and the relay call `EventBus.emit(event)`; observers subscribe a plain callable that
must return at once and never raise into the emitter (the bus logs and drops an observer's error).
Observers that do I/O (the SSE hub, the SQLite history) queue the event and do the work elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import structlog

log = structlog.get_logger("router.events")

ModelStateName = Literal["loading", "loaded", "failed", "unloaded", "sleeping"]


@dataclass(frozen=True)
class ModelState:
    """A model's state changed (loading, loaded, failed, unloaded, sleeping)."""

    model: str
    state: ModelStateName
    unit: str | None = None
    error: str | None = None  # with state "failed": the message users see
    exit_code: int | None = None  # with state "failed": the engine's exit status, when its unit exited


@dataclass(frozen=True)
class SwitchProgress:
    """A switch in flight moved to a phase, or said a line to the chat."""

    switch_id: int
    target: str | None
    phase: str  # stopping, writing, reloading, starting, loading, warmup
    elapsed: float
    line: str | None = None  # the status line the chat gets, if any


@dataclass(frozen=True)
class SwitchEnded:
    """A switch ended: `outcome` is ok, failed or aborted."""

    switch_id: int
    from_model: str | None
    target: str | None
    outcome: Literal["ok", "failed", "aborted"]
    duration: float  # seconds, from the plan's start
    load_seconds: float | None = None  # unit start -> healthy, when a unit was started
    error: str | None = None


@dataclass(frozen=True)
class RequestEnded:
    """A relayed request ended, whatever way."""

    model: str
    endpoint: str  # /v1/chat/completions, ...
    status: int  # HTTP status, or 499 for a client that left
    outcome: str  # ok, client_gone, load_failed, upstream_error, timeout, rejected
    stream: bool
    duration: float
    waited: float  # seconds spent waiting for the model
    ttft: float | None = None  # request -> first content byte from the engine
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tok_per_s: float | None = None


@dataclass(frozen=True)
class QueueDepth:
    """How many requests wait per model, and since when the oldest one waits (after every change)."""

    waiting: dict[str, int]
    oldest_wait: dict[str, float]


Event = ModelState | SwitchProgress | SwitchEnded | RequestEnded | QueueDepth
Observer = Callable[[Event], None]


class EventBus:
    """Fans events out to observers, synchronously; an observer's error is logged, never raised."""

    def __init__(self) -> None:
        self._observers: list[Observer] = []

    @property
    def has_observers(self) -> bool:
        return bool(self._observers)

    def subscribe(self, observer: Observer) -> Callable[[], None]:
        """Add an observer; returns the function that removes it."""
        self._observers.append(observer)
        return lambda: self._observers.remove(observer) if observer in self._observers else None

    def emit(self, event: Event) -> None:
        for observer in list(self._observers):
            try:
                observer(event)
            except Exception:
                log.exception("observer_failed", observer=getattr(observer, "__qualname__", repr(observer)),
                              event=type(event).__name__)
