"""Scheduler: decides, without I/O, when each request is served and which switch runs next.

The scheduler is driven by one owner (the switcher's run loop) through `on_*` methods and answers
through an `Effects` object. It never awaits, never touches D-Bus or HTTP, and so needs no lock:
every state change happens in one task, between awaits.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from router.config import Config
from router.plan import Plan, make_plan


@dataclass(eq=False)
class Ticket:
    """One request (or admin action) waiting for, or holding, a model."""

    model: str | None  # None: an unload request
    id: int = field(default_factory=itertools.count(1).__next__)
    told_switching: bool = False  # the "Switching to …" line was already sent to it
    granted: bool = False  # decided by the scheduler: it holds its model until on_done


@dataclass(frozen=True)
class LoadFailure:
    """Why a switch failed: enough for an error users can act on."""

    model: str
    unit: str | None
    what: str  # what failed, one sentence
    hint: str = ""  # what to do
    journal: tuple[str, ...] = ()  # the unit's last journal lines, this invocation only
    code: str = "model_load_failed"

    def message(self, display: str | None = None) -> str:
        unit = f" (unit {self.unit})" if self.unit else ""
        text = f"{display or self.model}{unit}: {self.what}"
        if self.hint:
            text += f" {self.hint}"
        if self.journal:
            text += "\nLast journal lines:\n" + "\n".join(self.journal)
        return text


@dataclass
class Switch:
    plan: Plan
    waiters: list[Ticket] = field(default_factory=list)
    aborting: bool = False  # every client of this load left and another model waits: it is being cut short

    @property
    def target(self) -> str | None:
        return self.plan.target


class Effects(Protocol):
    def start_switch(self, plan: Plan) -> None: ...
    def grant(self, ticket: Ticket) -> None: ...
    def fail(self, ticket: Ticket, error: LoadFailure) -> None: ...
    def abort_switch(self) -> None:
        """Cut the switch in flight short; it still ends with on_switch_done (with an error)."""
        ...
    def waiting(self, ticket: Ticket, switch: Switch | None) -> None:
        """The ticket must wait: queued (switch None) or attached to the switch that loads its model."""
        ...


class Scheduler:
    """Owns the active model, the switch in flight, the queue and the requests being served."""

    def __init__(self, config: Config, effects: Effects) -> None:
        self.config = config
        self.effects = effects
        self.active: str | None = None  # loaded and healthy
        self.running: set[str] = set()  # managed units systemd reports active (or activating)
        self.switch: Switch | None = None
        self.queue: list[Ticket] = []
        self.serving: Counter[str] = Counter()
        self.switches_started = 0

    # --- events -------------------------------------------------------------------------------

    def on_startup(self, running: set[str], adopt: str | None) -> None:
        """What systemd says is running when the router starts; `adopt` is the model found in it."""
        self.running = set(running)
        if adopt is not None:
            self._start(make_plan(self.config, adopt, self.running, adopt=True))

    def on_request(self, ticket: Ticket) -> None:
        if ticket.model is not None and ticket.model == self.active and self.switch is None:
            self._grant(ticket)
        elif (self.switch is not None and self.switch.target == ticket.model and ticket.model is not None
              and not self.switch.aborting):
            self.switch.waiters.append(ticket)
            self.effects.waiting(ticket, self.switch)
        else:
            self.queue.append(ticket)
            self.effects.waiting(ticket, None)
            self._abort_if_abandoned()
            self._next()

    def on_done(self, ticket: Ticket) -> None:
        """The request ended: its response finished, or its client went away before or after its grant.

        Whether it was granted is the scheduler's own record, not the handler's: a grant may be
        decided here while the handler is being cancelled, and must still be released.
        """
        if ticket.granted:
            if ticket.model is not None and self.serving[ticket.model] > 0:
                self.serving[ticket.model] -= 1
                if not self.serving[ticket.model]:
                    del self.serving[ticket.model]
        elif ticket in self.queue:
            self.queue.remove(ticket)  # a switch in flight for it goes on
        elif self.switch is not None and ticket in self.switch.waiters:
            self.switch.waiters.remove(ticket)
            self._abort_if_abandoned()
        self._next()

    def on_switch_done(self, error: LoadFailure | None, running: set[str]) -> None:
        switch, self.switch = self.switch, None
        assert switch is not None, "switch_done without a switch in flight"
        self.running = set(running)
        if error is None and switch.target is not None:
            self.active = switch.target
            for ticket in switch.waiters:
                self._grant(ticket)
        else:
            self.active = None
            for ticket in switch.waiters:
                if error is None:  # an unload that went well
                    ticket.granted = True
                    self.effects.grant(ticket)
                else:
                    self.effects.fail(ticket, error)
        self._next()

    def on_unit_state(self, unit: str, active_state: str) -> None:
        """systemd reports a managed unit's ActiveState changed (outside or inside a switch)."""
        if active_state in ("active", "activating", "reloading"):
            self.running.add(unit)
            return
        self.running.discard(unit)
        if self.switch is None and self.active is not None and active_state in ("inactive", "failed"):
            model = self.config.models.get(self.active)
            if model is None or self.config.unit_of(model) == unit:
                self.active = None  # the backend went away on its own: the next request reloads it

    def on_config(self, config: Config) -> None:
        """A new configuration: keep the active model when its definition did not change."""
        old = self.config
        self.config = config
        if self.active is not None and old.models.get(self.active) != config.models.get(self.active):
            self.active = None
        elif self.active is not None:
            model = config.models[self.active]
            if old.backend_of(old.models[self.active]) != config.backend_of(model):
                self.active = None
        for ticket in [t for t in self.queue if t.model is not None and t.model not in config.models]:
            self.queue.remove(ticket)
            self.effects.fail(ticket, LoadFailure(
                ticket.model or "", None, "was removed from models.yml by a configuration reload.",
                "Pick another model.", code="model_not_found"))
        self._next()

    # --- decisions ----------------------------------------------------------------------------

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

    def _next(self) -> None:
        """Start the next switch when nothing is in flight and no response is still streaming."""
        while self.switch is None and self.queue:
            head = self.queue[0]
            if head.model is not None and head.model == self.active:
                # queued behind a switch that has since brought this model back: serve them all
                for ticket in [t for t in self.queue if t.model == self.active]:
                    self.queue.remove(ticket)
                    self._grant(ticket)
                continue
            if self.serving:
                return  # never switch away while a response is still streaming
            if head.model is None and self.active is None and not self.running:
                self._grant(self.queue.pop(0))  # nothing to unload
                continue
            plan = make_plan(self.config, head.model, self.running)
            self._start(plan, [t for t in self.queue if t.model == head.model])

    def _start(self, plan: Plan, waiters: list[Ticket] | None = None) -> None:
        self.switch = Switch(plan, list(waiters or []))
        for ticket in self.switch.waiters:
            self.queue.remove(ticket)
        self.active = None
        if plan.target is not None and not plan.adopt:
            self.switches_started += 1  # loads only: adopting or unloading is not a switch
        self.effects.start_switch(plan)
        for ticket in self.switch.waiters:
            self.effects.waiting(ticket, self.switch)
