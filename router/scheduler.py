"""Scheduler: decides, without I/O, when each request is served and which switch runs next.

The scheduler is driven by one owner (the switcher's run loop) through `on_*` methods and answers
through an `Effects` object. It never awaits, never touches D-Bus or HTTP, and so needs no lock:
every state change happens in one task, between awaits. Time comes from an injected clock.

The policy (README, "Scheduling"):
- Requests for the loaded model are served at once, many at a time; a request for another model
  queues, and the switch starts once the responses already streaming have ended.
- Batching: queued requests are grouped by model, so A B A B becomes A A B B.
- `max_wait`: once a queued request has waited that long, new requests for the loaded model queue
  behind it instead of being served, so nothing starves.
- `linger`: after the loaded model's last response ends, it stays for this long for more requests
  for it (Open WebUI's title, follow-up and tags requests) before a waiting model is loaded; never
  past a waiting request's `max_wait`.
- `failure_cooldown`: a model whose load failed fails at once, with the same error, until the
  cooldown passes or a reload changes its definition. A load that failed transiently (the unit
  exited or its start job failed) is tried once more for the requests batched on it.
- `max_queue`: past it, requests are refused (429). Within the queue, priority (high, normal, low)
  comes first, then arrival; a request past `max_wait` goes first whatever its priority.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from router.config import Config, Model
from router.journal import engine_lead, fenced
from router.plan import Plan, make_plan

PRIORITIES = {"high": 0, "normal": 1, "low": 2}


@dataclass(eq=False)
class Ticket:
    """One request (or admin action) waiting for, or holding, a model."""

    model: str | None  # None: an unload request
    priority: int = PRIORITIES["normal"]  # 0 high, 1 normal, 2 low
    id: int = field(default_factory=itertools.count(1).__next__)
    arrived: float = 0.0  # set by the scheduler's clock when it first sees the ticket
    told_switching: bool = False  # the "Switching to …" line was already sent to it
    granted: bool = False  # decided by the scheduler: it holds its model until on_done
    ended: bool = False  # granted and done, or failed: the scheduler holds nothing of it


@dataclass(frozen=True)
class LoadFailure:
    """Why a switch failed: enough for an error users can act on."""

    model: str
    unit: str | None
    what: str  # what failed, one sentence
    hint: str = ""  # what to do
    journal: tuple[str, ...] = ()  # the unit's last journal lines, this invocation only
    code: str = "model_load_failed"
    transient: bool = False  # the unit started and went away: worth one more try for the same requests
    cooldown: bool = True  # the model's fault: later requests fail at once for switch.failure_cooldown
    note: str = ""  # said after `what`, e.g. "(failed 12 s ago; next try in 18 s)"

    @property
    def reason(self) -> str:
        """Why, in a few words: the engine's own last meaningful line when its journal has one, else `what`."""
        return engine_lead(self.journal) or self.what.rstrip(".")

    def message(self, display: str | None = None) -> str:
        """`M (unit U): what note hint`; with a journal tail, the engine's own line leads, `what` follows,
        and the tail ends the message in a fenced code block (systemd's own lines last, as they came)."""
        unit = f" (unit {self.unit})" if self.unit else ""
        lead = engine_lead(self.journal)
        text = f"{display or self.model}{unit}: {lead}\nIt {self.what}" if lead else \
            f"{display or self.model}{unit}: {self.what}"
        if self.note:
            text += f" {self.note}"
        if self.hint:
            text += f" {self.hint}"
        if self.journal:
            text += "\nLast journal lines:\n" + fenced(self.journal)
        return text


@dataclass
class Switch:
    plan: Plan
    waiters: list[Ticket] = field(default_factory=list)
    aborting: bool = False  # being cut short: its clients left, or a reload removed its model
    attempt: int = 1
    id: int = field(default_factory=itertools.count(1).__next__)

    @property
    def target(self) -> str | None:
        return self.plan.target


@dataclass(frozen=True)
class Cooldown:
    failure: LoadFailure
    at: float
    definition: tuple[Model, object]  # the model and its backend when it failed


class Effects(Protocol):
    def start_switch(self, switch: Switch) -> None: ...
    def grant(self, ticket: Ticket) -> None: ...
    def fail(self, ticket: Ticket, error: LoadFailure) -> None: ...
    def abort_switch(self) -> None:
        """Cut the switch in flight short; it still ends with on_switch_done (with an error)."""
        ...
    def waiting(self, ticket: Ticket, switch: Switch | None) -> None:
        """The ticket must wait: queued (switch None) or attached to the switch that loads its model."""
        ...
    def wake_at(self, when: float) -> None:
        """Call on_tick at (or soon after) this clock time."""
        ...


def unreachable_error(model: str, why: str) -> LoadFailure:
    return LoadFailure(model, None, f"cannot be loaded now: {why}.", "The router reconnects on its own; ask again in "
                       "a moment.", code="systemd_unreachable", cooldown=False)


def removed_error(model: str) -> LoadFailure:
    return LoadFailure(model, None, "was removed from models.yml by a configuration reload.",
                       "Pick another model (GET /v1/models).", code="model_not_found", cooldown=False)


class Scheduler:
    """Owns the active model, the switch in flight, the queue and the requests being served."""

    def __init__(self, config: Config, effects: Effects, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.effects = effects
        self.clock = clock
        self.active: str | None = None  # loaded and healthy
        self.running: set[str] = set()  # managed units systemd reports running (activating … deactivating)
        self.switch: Switch | None = None
        self.queue: list[Ticket] = []
        self.serving: Counter[str] = Counter()
        self.switches_started = 0
        self.idle_since: float | None = None  # when the active model's last response ended
        self.cooldowns: dict[str, Cooldown] = {}
        self.orphans: set[str] = set()  # units a reload dropped that still run a model the router loaded
        self.unreachable: str | None = None  # why systemd cannot be reached over D-Bus (None: it can)

    # --- events -------------------------------------------------------------------------------

    def on_startup(self, running: set[str], adopt: str | None) -> None:
        """What systemd says is running when the router starts; `adopt` is the model found in it."""
        self.running = set(running)
        if adopt is not None and adopt in self.config.models and self.switch is None:
            self._start(make_plan(self.config, adopt, self.running, adopt=True))

    def on_resync(self, running: set[str], adopt: str | None) -> None:
        """systemd is reachable again: what runs now. A model left running by a failed load is adopted."""
        self.running = set(running)
        if self.active is not None and self.config.unit_of(self.config.models[self.active]) not in self.running:
            self.active = None
        if self.switch is None and self.active is None and adopt is not None and adopt in self.config.models:
            self._start(make_plan(self.config, adopt, self.running, adopt=True))
        self._next()

    def on_request(self, ticket: Ticket) -> None:
        now = self.clock()
        ticket.arrived = now
        model = ticket.model
        if model is not None and model not in self.config.models:
            self._fail(ticket, removed_error(model))
            return
        if model is not None and self.unreachable is None and (cooled := self._cooling(model, now)) is not None:
            self._fail(ticket, cooled)  # (with systemd unreachable, that is the news: said below)
            return
        if self._queued() >= self.config.switch.max_queue and not (
                model is not None and model == self.active and self.switch is None and not self._starving(now)):
            self._fail(ticket, LoadFailure(
                model or "", None, f"{self._queued()} requests already wait for a model "
                f"(switch.max_queue is {self.config.switch.max_queue}).", "Try again in a few seconds.",
                code="queue_full", cooldown=False))
            return
        if model is not None and model == self.active and self.switch is None and not self._starving(now):
            self._grant(ticket)
        elif self.unreachable is not None:
            error = unreachable_error(model or "", self.unreachable)  # no switch can run now
            if model is not None and (cooled := self._cooling(model, now)) is not None:
                error = replace(error, note=f"(its last load failed too: {cooled.what} {cooled.note})")
            self._fail(ticket, error)
        elif (self.switch is not None and self.switch.target == model and model is not None
              and not self.switch.aborting):
            self.switch.waiters.append(ticket)
            self.effects.waiting(ticket, self.switch)
        else:
            self._enqueue(ticket)
            self.effects.waiting(ticket, None)
            self._abort_if_abandoned()
            self._next()

    def on_done(self, ticket: Ticket) -> None:
        """The request ended: its response finished, or its client went away before or after its grant.

        Whether it was granted is the scheduler's own record, not the handler's: a grant may be
        decided here while the handler is being cancelled, and must still be released.
        """
        if ticket.granted:
            if not ticket.ended and ticket.model is not None and self.serving[ticket.model] > 0:
                self.serving[ticket.model] -= 1
                if not self.serving[ticket.model]:
                    del self.serving[ticket.model]
                    if ticket.model == self.active:
                        self.idle_since = self.clock()
        elif ticket in self.queue:
            self.queue.remove(ticket)  # a switch in flight for it goes on
        elif self.switch is not None and ticket in self.switch.waiters:
            self.switch.waiters.remove(ticket)
            self._abort_if_abandoned()
        ticket.ended = True
        self._next()

    def on_bus(self, unreachable: str | None) -> None:
        """systemd became unreachable over D-Bus (with why), or reachable again (None)."""
        self.unreachable = unreachable
        if unreachable is not None:  # nothing can be switched until it is back: say so at once
            for ticket in [t for t in self.queue if t.model != self.active or t.model is None]:
                self.queue.remove(ticket)
                self._fail(ticket, unreachable_error(ticket.model or "", unreachable))
            switch = self.switch
            if switch is not None:
                for ticket in list(switch.waiters):  # its next D-Bus call fails anyway; a unit it left
                    switch.waiters.remove(ticket)  # running is adopted after the reconnection
                    self._fail(ticket, unreachable_error(ticket.model or "", unreachable))
                if not switch.aborting:
                    switch.aborting = True
                    self.effects.abort_switch()
        self._next()

    def on_tick(self) -> None:
        """A timer the scheduler asked for (wake_at) went off: linger ended, or a wait hit max_wait."""
        self._next()

    def on_switch_done(self, switch_id: int, error: LoadFailure | None, running: set[str]) -> None:
        switch = self.switch
        if switch is None or switch.id != switch_id:
            return  # a stale report (cannot happen with one owner, but must never corrupt state)
        self.switch = None
        self.running = set(running)
        if error is None or error.code != "systemd_unreachable":
            self.orphans -= set(switch.plan.stop)  # stopped, or failed to stop: not tried again (logged)
        target = switch.target
        if target is not None and target not in self.config.models:
            error = removed_error(target)  # a reload removed it while it loaded
        if error is None and target is not None:
            self.active = target
            self.idle_since = self.clock()
            self.cooldowns.pop(target, None)
            for ticket in switch.waiters:
                self._grant(ticket)
        elif error is None:  # an unload (or a clean-up) that went well
            self.active = None
            for ticket in switch.waiters:
                ticket.granted = True
                self.effects.grant(ticket)
        else:
            self.active = None
            if target is not None and error.transient and switch.attempt == 1 and switch.waiters:
                self._start(make_plan(self.config, target, self.running), switch.waiters, attempt=2)
                return
            if target is not None and error.cooldown and error.code != "model_not_found":
                model = self.config.models[target]
                self.cooldowns[target] = Cooldown(error, self.clock(), self._definition(model))
            for ticket in switch.waiters:
                self._fail(ticket, error)
        self._next()

    def on_unit_state(self, unit: str, active_state: str) -> None:
        """systemd reports a managed unit's ActiveState changed (outside or inside a switch)."""
        if active_state not in ("inactive", "failed"):
            self.running.add(unit)  # activating, active, reloading, deactivating: it holds its GPU memory
            return
        self.running.discard(unit)
        self.orphans.discard(unit)
        if self.switch is None and self.active is not None:
            model = self.config.models.get(self.active)
            if model is None or self.config.unit_of(model) == unit:
                self.active = None  # the backend went away on its own: the next request reloads it

    def on_config(self, config: Config, orphans: set[str] | None = None) -> None:
        """A new configuration: keep the active model when its definition did not change.

        `orphans`: units the old configuration managed and this one does not, that run a model the
        router loaded; they are stopped as soon as nothing streams from them.
        """
        old = self.config
        self.config = config
        if self.active is not None and (
                self.active not in config.models or old.models.get(self.active) != config.models[self.active]
                or old.backend_of(old.models[self.active]) != config.backend_of(config.models[self.active])):
            self.active = None
        for model_id, cooldown in list(self.cooldowns.items()):
            model = config.models.get(model_id)
            if model is None or self._definition(model) != cooldown.definition:
                del self.cooldowns[model_id]  # a changed definition deserves a new try
        self.orphans |= {u for u in orphans or set() if u in self.running}
        for ticket in [t for t in self.queue if t.model is not None and t.model not in config.models]:
            self.queue.remove(ticket)
            self._fail(ticket, removed_error(ticket.model or ""))
        switch = self.switch
        if switch is not None and switch.target is not None and switch.target not in config.models:
            for ticket in list(switch.waiters):
                switch.waiters.remove(ticket)
                self._fail(ticket, removed_error(switch.target))
            if not switch.aborting:
                switch.aborting = True
                self.effects.abort_switch()
        self._next()

    # --- queries ------------------------------------------------------------------------------

    def waiting_counts(self) -> tuple[dict[str, int], dict[str, float]]:
        """Requests waiting per model (queued or on the switch) and how long the oldest has waited."""
        now = self.clock()
        counts: Counter[str] = Counter()
        oldest: dict[str, float] = {}
        tickets = self.queue + (self.switch.waiters if self.switch is not None else [])
        for ticket in tickets:
            key = ticket.model or "(unload)"
            counts[key] += 1
            oldest[key] = max(oldest.get(key, 0.0), now - ticket.arrived)
        return dict(counts), oldest

    def ahead(self, ticket: Ticket) -> tuple[str | None, int]:
        """What a queued request waits behind: a model in the way (the one loading, else one still answering,
        else the next queued) and how many requests for other models come before it."""
        other: str | None = None
        count = 0
        if self.switch is not None and self.switch.target != ticket.model:
            other, count = self.switch.target, len(self.switch.waiters)
        for model, n in self.serving.items():
            if model != ticket.model:
                other, count = other or model, count + n
        for queued in self.queue:
            if queued is ticket:
                break
            if queued.model != ticket.model:
                other, count = other or queued.model, count + 1
        return other, count

    # --- decisions ----------------------------------------------------------------------------

    def _queued(self) -> int:
        return len(self.queue) + (len(self.switch.waiters) if self.switch is not None else 0)

    def _definition(self, model: Model) -> tuple[Model, object]:
        return model, self.config.backends.get(model.backend)

    def _cooling(self, model_id: str, now: float) -> LoadFailure | None:
        """The failure to answer with while the model's failure cooldown runs, else None."""
        cooldown = self.cooldowns.get(model_id)
        if cooldown is None:
            return None
        if self.switch is not None and self.switch.target == model_id:
            return None
        left = cooldown.at + self.config.switch.failure_cooldown - now
        if left <= 0:
            del self.cooldowns[model_id]
            return None
        ago = now - cooldown.at
        note = f"(failed {ago:.0f} s ago; next try in {max(left, 1):.0f} s)"
        f = cooldown.failure
        return LoadFailure(f.model, f.unit, f.what, f.hint, f.journal, f.code, cooldown=False, note=note)

    def _starving(self, now: float) -> bool:
        """Has a request for another model than the loaded one waited max_wait already?"""
        max_wait = self.config.switch.max_wait
        return any(t.model != self.active and now - t.arrived >= max_wait for t in self.queue)

    def _enqueue(self, ticket: Ticket) -> None:
        """Insert by priority, then arrival (a stable insertion after its equals)."""
        index = len(self.queue)
        while index > 0 and self.queue[index - 1].priority > ticket.priority:
            index -= 1
        self.queue.insert(index, ticket)

    def _head(self, now: float) -> Ticket:
        """The request whose model is loaded next: the oldest past max_wait, else the queue's first."""
        max_wait = self.config.switch.max_wait
        starving = [t for t in self.queue if t.model != self.active and now - t.arrived >= max_wait]
        return min(starving, key=lambda t: t.arrived) if starving else self.queue[0]

    def _abort_if_abandoned(self) -> None:
        """A load nobody waits for any more must not make a waiting request for another model sit out
        its load_timeout: cut it short. (With nobody else waiting it goes on: its client may return.)"""
        switch = self.switch
        if (switch is None or switch.aborting or switch.waiters or switch.target is None or switch.plan.adopt
                or not any(t.model != switch.target for t in self.queue)):
            return
        switch.aborting = True
        self.effects.abort_switch()

    def _grant(self, ticket: Ticket) -> None:
        ticket.granted = True
        if ticket.model is not None:
            self.serving[ticket.model] += 1
        self.effects.grant(ticket)

    def _fail(self, ticket: Ticket, error: LoadFailure) -> None:
        ticket.ended = True
        self.effects.fail(ticket, error)

    def _next(self) -> None:
        """Start the next switch when nothing is in flight and no response is still streaming."""
        while self.switch is None:
            now = self.clock()
            starving = self._starving(now)
            if self.active is not None and not starving:
                ready = [t for t in self.queue if t.model == self.active]
                for ticket in ready:  # queued behind a switch that has since brought this model back
                    self.queue.remove(ticket)
                    self._grant(ticket)
            if self.serving:
                return  # never switch away while a response is still streaming
            if self.orphans and self.unreachable is None:
                self._start(Plan(target=None, stop=tuple(sorted(self.orphans))), [])
                return
            if not self.queue:
                return
            if self.active is not None and not starving and self.config.switch.linger > 0:
                until = (self.idle_since or now) + self.config.switch.linger
                oldest = min(t.arrived for t in self.queue) + self.config.switch.max_wait
                if now < until:
                    self.effects.wake_at(min(until, oldest))
                    return
            head = self._head(now)
            if head.model is None and self.active is None and not self.running:
                self.queue.remove(head)
                self._grant(head)  # nothing to unload
                continue
            if head.model is not None and head.model == self.active:
                continue  # starving requests for the loaded model itself: granted above next round
            if head.model is not None and (cooled := self._cooling(head.model, now)) is not None:
                for ticket in [t for t in self.queue if t.model == head.model]:
                    self.queue.remove(ticket)
                    self._fail(ticket, cooled)
                continue
            plan = make_plan(self.config, head.model, self.running)
            self._start(plan, [t for t in self.queue if t.model == head.model])
            return

    def _start(self, plan: Plan, waiters: list[Ticket] | None = None, attempt: int = 1) -> None:
        self.switch = Switch(plan, list(waiters or []), attempt=attempt)
        for ticket in self.switch.waiters:
            if ticket in self.queue:
                self.queue.remove(ticket)
        self.active = None
        if plan.target is not None and not plan.adopt:
            self.switches_started += 1  # loads only: adopting or unloading is not a switch
        self.effects.start_switch(self.switch)
        for ticket in self.switch.waiters:
            self.effects.waiting(ticket, self.switch)
