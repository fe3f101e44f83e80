"""Scheduler: decides, without I/O, when each request is served and which switch runs next.

The scheduler is driven by one owner (the switcher's run loop) through `on_*` methods and answers
through an `Effects` object. It never awaits, never touches D-Bus or HTTP, and so needs no lock:
every state change happens in one task, between awaits. Time comes from an injected clock.

It owns the resident set (models loaded or asleep); which of them leave to make room for another is
the residency policy's (router/residency.py). One switch runs at a time; requests for resident
models the switch keeps are served while it runs.

The policy (README, "Scheduling"):
- Requests for a loaded model are served at once, many at a time (up to its `max_concurrent`); a
  request for another model queues, and the switch starts once the responses streaming from the
  models it evicts have ended.
- Batching: queued requests are grouped by model, so A B A B becomes A A B B.
- `max_wait`: once a queued request has waited that long, new requests for the loaded model queue
  behind it instead of being served, so nothing starves.
- `linger`: after a loaded model's last response ends, it stays for this long for more requests
  for it (Open WebUI's title, follow-up and tags requests) before a switch evicts it; never past a
  waiting request's `max_wait`.
- `ttl`: a model idle that long leaves the GPU (a sleeper is stopped after `residency.sleep_ttl`);
  `preload` models load at start, after the requests waiting then.
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
from router.plan import Plan, make_plan, plan_evict, plan_room
from router.residency import NoRoom, Resident, Room, View, expired, make_room, sleep_or_stop

PRIORITIES = {"high": 0, "normal": 1, "low": 2}


@dataclass(eq=False)
class Ticket:
    """One request (or admin action) waiting for, or holding, a model."""

    model: str | None  # None: an unload request (of every model)
    priority: int = PRIORITIES["normal"]  # 0 high, 1 normal, 2 low
    unload: bool = False  # unload `model` (with model None: every model)
    sleep: bool = False  # with unload: put `model` to sleep instead of stopping it (its backend can sleep)
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
    exit_code: int | None = None  # the engine's exit status when its unit exited (128+N: killed by signal N)

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


@dataclass(frozen=True)
class SwitchOutcome:
    """What a switch did besides loading its target, as the executor saw it."""

    slept: frozenset[str] = frozenset()  # models put to sleep (their units still run)
    measured_gb: float | None = None  # GPU memory the target's processes use after the load (NVML)
    asleep: bool = False  # an adopted engine was found asleep


def removed_error(model: str) -> LoadFailure:
    return LoadFailure(model, None, "was removed from models.yml by a configuration reload.",
                       "Pick another model (GET /v1/models).", code="model_not_found", cooldown=False)


class Scheduler:
    """Owns the resident set, the switch in flight, the queue and the requests being served."""

    def __init__(self, config: Config, effects: Effects, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.effects = effects
        self.clock = clock
        self.resident: dict[str, Resident] = {}  # models whose engines run: loaded or asleep
        self.running: set[str] = set()  # managed units systemd reports running (activating … deactivating)
        self.switch: Switch | None = None
        self.queue: list[Ticket] = []
        self.serving: Counter[str] = Counter()
        self.switches_started = 0
        self.cooldowns: dict[str, Cooldown] = {}
        self.orphans: set[str] = set()  # units a reload dropped that still run a model the router loaded
        self.unreachable: str | None = None  # why systemd cannot be reached over D-Bus (None: it can)
        self.measured: dict[str, float] = {}  # GB a model's processes used after its last load (NVML)
        self.gpu_budget: dict[int, float] = {}  # GB per GPU from NVML; config.yml gpus: wins
        self.host_ram_gb: float | None = None  # sleepers' budget from the host; residency.host_ram_gb wins
        self.to_adopt: list[str] = []  # models found running at start (or after a reconnect)
        self.started: set[str] = set()  # units the router started (or adopted) that have not stopped since
        self.to_preload: list[str] = []  # config.yml preload, loaded once nothing waits
        self.blocked: set[str] = set()  # loaded models that take no new requests: a starving switch evicts them
        self.version = 0  # bumped whenever the resident set changes (observers compare it)
        self._ttl_cache: tuple[Config, bool] | None = None

    # --- the resident set -----------------------------------------------------------------------

    @property
    def active(self) -> str | None:
        """The most recently used loaded model (None: nothing loaded)."""
        loaded = [r for r in self.resident.values() if r.state == "loaded"]
        return max(loaded, key=lambda r: (r.last_used, r.model)).model if loaded else None

    def loaded(self) -> list[str]:
        return [mid for mid, r in self.resident.items() if r.state == "loaded"]

    def state_of(self, model_id: str) -> str | None:
        """loaded, sleeping, or None (not resident)."""
        r = self.resident.get(model_id)
        return r.state if r is not None else None

    def view(self) -> View:
        config = self.config
        budget = dict(self.gpu_budget)
        budget.update({g.index: g.vram_gb for g in config.gpus})
        host = config.residency.host_ram_gb if config.residency.host_ram_gb is not None else self.host_ram_gb
        return View(config, self.resident, frozenset(self.serving), frozenset(self.running), self.measured,
                    budget, host)

    def _set_resident(self, model_id: str, state: str, now: float) -> None:
        old = self.resident.get(model_id)
        if old is not None and old.state == state:
            return
        last = old.last_used if old is not None else now
        self.resident[model_id] = Resident(model_id, state, now if state == "loaded" else last, now)  # type: ignore[arg-type]
        self.version += 1

    def _drop_resident(self, model_id: str) -> None:
        if self.resident.pop(model_id, None) is not None:
            self.version += 1

    def _reconcile(self) -> None:
        """Forget resident models whose unit no longer runs (or that a reload removed)."""
        for mid in list(self.resident):
            model = self.config.models.get(mid)
            if model is None or self.config.unit_of(model) not in self.running:
                self._drop_resident(mid)

    # --- events -------------------------------------------------------------------------------

    def on_startup(self, running: set[str], adopt: str | list[str] | None) -> None:
        """What systemd says is running when the router starts; `adopt`: the models found in it."""
        self.running = set(running)
        adopt_list = [adopt] if isinstance(adopt, str) else list(adopt or [])
        self.to_adopt = [m for m in adopt_list if m in self.config.models]
        self.to_preload = [m for m in self.config.preload if m in self.config.models and m not in self.to_adopt]
        self._next()

    def on_resync(self, running: set[str], adopt: str | list[str] | None) -> None:
        """systemd is reachable again: what runs now. Models left running by a failed load are adopted."""
        self.running = set(running)
        self._reconcile()
        adopt_list = [adopt] if isinstance(adopt, str) else list(adopt or [])
        target = self.switch.target if self.switch is not None else None
        self.to_adopt += [m for m in adopt_list if m in self.config.models and m not in self.resident
                          and m != target and m not in self.to_adopt]
        self._next()

    def on_request(self, ticket: Ticket) -> None:
        now = self.clock()
        ticket.arrived = now
        model = ticket.model
        if ticket.unload or model is None:
            ticket.unload = True
            if model is not None and model not in self.config.models:
                self._fail(ticket, removed_error(model))
                return
            self._enqueue(ticket)
            self.effects.waiting(ticket, None)
            self._next()
            return
        if model not in self.config.models:
            self._fail(ticket, removed_error(model))
            return
        if self.unreachable is None and (cooled := self._cooling(model, now)) is not None:
            self._fail(ticket, cooled)  # (with systemd unreachable, that is the news: said below)
            return
        servable = self._servable(model) and not self._queued_for(model)
        if self._queued() >= self.config.switch.max_queue and not servable:
            self._fail(ticket, LoadFailure(
                model, None, f"{self._queued()} requests already wait for a model "
                f"(switch.max_queue is {self.config.switch.max_queue}).", "Try again in a few seconds.",
                code="queue_full", cooldown=False))
            return
        if servable:
            self._grant(ticket)
        elif self.unreachable is not None and self.state_of(model) != "loaded":
            error = unreachable_error(model, self.unreachable)  # no switch can run now
            if (cooled := self._cooling(model, now)) is not None:
                error = replace(error, note=f"(its last load failed too: {cooled.what} {cooled.note})")
            self._fail(ticket, error)
        elif self.switch is not None and self.switch.target == model and not self.switch.aborting:
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
            if not ticket.ended and ticket.model is not None and not ticket.unload and self.serving[ticket.model] > 0:
                self.serving[ticket.model] -= 1
                if not self.serving[ticket.model]:
                    del self.serving[ticket.model]
                r = self.resident.get(ticket.model)
                if r is not None and r.state == "loaded":
                    r.last_used = self.clock()
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
            for ticket in [t for t in self.queue if t.unload or self.state_of(t.model or "") != "loaded"]:
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
        """A timer the scheduler asked for (wake_at) went off: linger or a ttl ended, or a wait hit max_wait."""
        self._next()

    def on_switch_done(self, switch_id: int, error: LoadFailure | None, running: set[str],
                       outcome: SwitchOutcome | None = None) -> None:
        switch = self.switch
        if switch is None or switch.id != switch_id:
            return  # a stale report (cannot happen with one owner, but must never corrupt state)
        outcome = outcome or SwitchOutcome()
        now = self.clock()
        self.switch = None
        self.running = set(running)
        self.started &= self.running  # a unit it started that no longer runs is not its own any more
        plan = switch.plan
        if error is None or error.code != "systemd_unreachable":
            self.orphans -= set(plan.stop)  # stopped, or failed to stop: not tried again (logged)
        for mid in plan.sleep:
            if mid in outcome.slept:
                self._set_resident(mid, "sleeping", now)
        for mid in plan.evicts:
            if mid not in outcome.slept and mid != plan.target:
                self._drop_resident(mid)
        self._reconcile()
        target = switch.target
        if target is not None and target not in self.config.models:
            error = removed_error(target)  # a reload removed it while it loaded
        if error is None and target is not None:
            self._set_resident(target, "sleeping" if outcome.asleep else "loaded", now)
            self.resident[target].last_used = now
            if outcome.measured_gb is not None:
                self.measured[target] = outcome.measured_gb
            self.cooldowns.pop(target, None)
            if outcome.asleep:  # adopted asleep: they wait for a wake
                self.queue[:0] = switch.waiters
            else:
                for ticket in switch.waiters:
                    self._grant(ticket)
        elif error is None:  # an unload, a ttl or a clean-up that went well
            for ticket in switch.waiters:
                ticket.granted = True
                self.effects.grant(ticket)
        else:
            if target is not None:
                self._drop_resident(target)  # a failed load or wake: a unit it left running is a stray
            if target is not None and error.transient and switch.attempt == 1 and switch.waiters:
                self._retry(target, switch.waiters)
                return
            if target is not None and error.cooldown and error.code != "model_not_found":
                model = self.config.models[target]
                self.cooldowns[target] = Cooldown(error, now, self._definition(model))
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
        self.started.discard(unit)
        for mid in list(self.resident):
            model = self.config.models.get(mid)
            if model is None or self.config.unit_of(model) == unit:
                self._drop_resident(mid)  # the engine went away on its own: the next request reloads it

    def on_config(self, config: Config, orphans: set[str] | None = None) -> None:
        """A new configuration: keep each resident model whose definition did not change.

        `orphans`: units the old configuration managed and this one does not, that run a model the
        router loaded; they are stopped as soon as nothing streams from them.
        """
        old = self.config
        self.config = config
        for mid in list(self.resident):
            if (mid not in config.models or old.models.get(mid) != config.models[mid]
                    or old.backend_of(old.models[mid]) != config.backend_of(config.models[mid])):
                self._drop_resident(mid)  # its unit, still running, is stopped by the next switch
        for model_id, cooldown in list(self.cooldowns.items()):
            model = config.models.get(model_id)
            if model is None or self._definition(model) != cooldown.definition:
                del self.cooldowns[model_id]  # a changed definition deserves a new try
        self.measured = {m: gb for m, gb in self.measured.items()
                         if m in config.models and old.models.get(m) == config.models[m]}
        self.orphans |= {u for u in orphans or set() if u in self.running}
        self.to_preload += [m for m in config.preload if m not in old.preload and m not in self.to_preload]
        self.to_adopt = [m for m in self.to_adopt if m in config.models]
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

    def ahead_of(self, ticket: Ticket) -> int:
        """Requests for other models that will be served before this queued one (its place in line)."""
        if ticket not in self.queue:
            return 0
        index = self.queue.index(ticket)
        ahead = {t.model for t in self.queue[:index] if t.model != ticket.model}
        return sum(1 for t in self.queue[:index] if t.model in ahead) + (
            len(self.switch.waiters) if self.switch is not None and self.switch.target != ticket.model else 0)

    def ahead(self, ticket: Ticket) -> tuple[str | None, int]:
        """What a queued request waits behind, for its `⏳ Waiting for M (N requests ahead)…` line: the model
        in its way (the one loading, else the next one queued before it, else its own or another
        model whose answers must end first) and how many requests come before it."""
        count = self.ahead_of(ticket)
        if self.switch is not None and self.switch.target is not None and self.switch.target != ticket.model:
            return self.switch.target, count
        for queued in self.queue:
            if queued is ticket:
                break
            if queued.model is not None and queued.model != ticket.model:
                return queued.model, count
        model = ticket.model
        if model is not None and self.serving[model] and self.state_of(model) == "loaded":
            return model, count + self.serving[model]  # its own model is busy (max_concurrent, a starving switch)
        busy = [(m, n) for m, n in self.serving.items() if m != model and m in self.config.models
                and not self.config.models[m].persistent]
        return (busy[0][0], count + sum(n for _, n in busy)) if busy else (None, count)

    # --- decisions ----------------------------------------------------------------------------

    def _queued(self) -> int:
        return len(self.queue) + (len(self.switch.waiters) if self.switch is not None else 0)

    def _queued_for(self, model: str) -> bool:
        return any(t.model == model for t in self.queue)

    def _servable(self, model: str) -> bool:
        """Can a request for this model be served now: loaded, kept by the switch in flight, not
        blocked by a starving switch, and under its max_concurrent."""
        r = self.resident.get(model)
        if r is None or r.state != "loaded" or model in self.blocked:
            return False
        if self.switch is not None and model in self.switch.plan.evicts:
            return False
        limit = self.config.models[model].max_concurrent
        return limit is None or self.serving[model] < limit

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
        return LoadFailure(f.model, f.unit, f.what, f.hint, f.journal, f.code, cooldown=False, note=note,
                           exit_code=f.exit_code)

    def _needs_switch(self, ticket: Ticket) -> bool:
        return ticket.unload or self.state_of(ticket.model or "") != "loaded"

    def _enqueue(self, ticket: Ticket) -> None:
        """Insert by priority, then arrival (a stable insertion after its equals)."""
        index = len(self.queue)
        while index > 0 and self.queue[index - 1].priority > ticket.priority:
            index -= 1
        self.queue.insert(index, ticket)

    def _head(self, now: float) -> Ticket | None:
        """The request whose switch runs next: the oldest past max_wait, else the first in line."""
        needing = [t for t in self.queue if self._needs_switch(t)]
        if not needing:
            return None
        max_wait = self.config.switch.max_wait
        starving = [t for t in needing if now - t.arrived >= max_wait]
        return min(starving, key=lambda t: t.arrived) if starving else needing[0]

    def _abort_if_abandoned(self) -> None:
        """A load nobody waits for any more must not make a waiting request for another model sit out
        its load_timeout: cut it short. (With nobody else waiting it goes on: its client may return.)"""
        switch = self.switch
        if (switch is None or switch.aborting or switch.waiters or switch.target is None or switch.plan.adopt
                or switch.plan.reason == "preload"
                or not any(t.model != switch.target for t in self.queue)):
            return
        switch.aborting = True
        self.effects.abort_switch()

    def _grant(self, ticket: Ticket) -> None:
        ticket.granted = True
        if ticket.model is not None:
            self.serving[ticket.model] += 1
            r = self.resident.get(ticket.model)
            if r is not None:
                r.last_used = self.clock()
        self.effects.grant(ticket)

    def _fail(self, ticket: Ticket, error: LoadFailure) -> None:
        ticket.ended = True
        self.effects.fail(ticket, error)

    def _grant_ready(self) -> None:
        """Queued requests whose model is servable now, in queue order."""
        for ticket in [t for t in self.queue if not t.unload and t.model is not None]:
            if ticket.model is not None and self._servable(ticket.model):
                self.queue.remove(ticket)
                self._grant(ticket)

    def _next(self) -> None:
        """Serve what can be served; start the next switch when none is in flight and its victims are idle."""
        while True:
            now = self.clock()
            head = self._head(now)
            room = self._decide(head) if head is not None else None
            starving = head is not None and now - head.arrived >= self.config.switch.max_wait
            self.blocked = set()
            if starving and isinstance(room, Room):
                self.blocked = set(room.evicts)
            elif head is not None and head.unload:  # an unload takes no new requests for what it unloads
                self.blocked = set(self._unload_models(head))
            self._grant_ready()
            if self.switch is not None or self.unreachable is not None:
                return
            if self.orphans:  # units a reload dropped hold memory nobody budgets: nothing loads before they stop
                if not self._orphans_busy():
                    self._start(Plan(target=None, stop=tuple(sorted(self.orphans)), reason="orphans"), [])
                return
            if self.to_adopt:
                model = self.to_adopt.pop(0)
                if model in self.config.models and model not in self.resident:
                    self._start(make_plan(self.config, model, self.running, adopt=True))
                    return
                continue
            if head is None:
                self._idle_work(now)
                return
            if not head.unload and head.model is not None and (cooled := self._cooling(head.model, now)):
                for ticket in [t for t in self.queue if t.model == head.model and not t.unload]:
                    self.queue.remove(ticket)
                    self._fail(ticket, cooled)
                continue
            if not isinstance(room, Room):
                if self._unload_or_fail(head, room):
                    continue
                return
            if not self._victims_ready(room, head, now, starving):
                return
            plan = plan_room(self.config, room)
            self._start(plan, [t for t in self.queue if t.model == head.model and not t.unload])
            return

    def _decide(self, head: Ticket) -> Room | NoRoom | None:
        if head.unload or head.model is None:
            return None
        return make_room(self.view(), head.model)

    def _victims_ready(self, room: Room, head: Ticket, now: float, starving: bool) -> bool:
        """May the switch evict its victims now: none busy, none within its linger? Else wake up later."""
        deadline = head.arrived + self.config.switch.max_wait
        if room.blocked_by:
            if not starving:
                self.effects.wake_at(deadline)  # then new requests for the victims queue behind it
            return False
        linger = self.config.switch.linger
        if linger > 0 and not starving and room.evicts:
            until = max(self.resident[mid].last_used for mid in room.evicts if mid in self.resident) + linger
            if now < until:
                self.effects.wake_at(min(until, deadline))
                return False
        return True

    def _unload_or_fail(self, head: Ticket, room: Room | NoRoom | None) -> bool:
        """The head is an unload, or its model can never fit now. True: go on with the next head."""
        if isinstance(room, NoRoom):
            error = LoadFailure(room.target, None, f"cannot be loaded: it {room.what}", room.hint,
                                code="model_unavailable", cooldown=False)
            for ticket in [t for t in self.queue if t.model == room.target and not t.unload]:
                self.queue.remove(ticket)
                self._fail(ticket, error)
            return True
        models = self._unload_models(head)
        if head.sleep and head.model is not None:
            return self._sleep_one(head, models)
        if head.model is None:
            units = [u for u in self.config.managed_units() if u in self.running]
        else:
            unit = self.config.unit_of(self.config.models[head.model])
            units = [unit] if unit in self.running else []
        config = self.config
        if any(m in models or m not in config.models or config.unit_of(config.models[m]) in units
               for m in self.serving):
            return False  # it waits for the responses streaming from what it stops (and takes no new ones)
        if not units:
            self.queue.remove(head)
            for mid in models:
                self._drop_resident(mid)
            head.granted = True
            self.effects.grant(head)  # nothing to unload
            return True
        plan = Plan(target=None, stop=tuple(units), evicts=tuple(models), reason="unload")
        self._start(plan, [head])
        return False

    def _sleep_one(self, head: Ticket, models: list[str]) -> bool:
        """An admin's sleep: the loaded model sleeps now (its responses in flight end first)."""
        model = head.model or ""
        if self.state_of(model) != "loaded" or self.config.backend_of(self.config.models[model]).sleep is None:
            self.queue.remove(head)
            head.granted = True
            self.effects.grant(head)  # asleep already, not loaded, or cannot sleep: nothing to do (said by the API)
            return True
        if model in self.serving:
            return False
        sleep, stop = sleep_or_stop(self.view(), [model])
        self._start(plan_evict(self.config, sleep, stop, "sleep"), [head])
        return False

    def _unload_models(self, head: Ticket) -> list[str]:
        if head.model is None:
            return list(self.resident)
        return [head.model] if head.model in self.resident else []

    def _orphans_busy(self) -> bool:
        """Does a response still stream from a unit a reload dropped (its model gone or moved)?"""
        for mid in self.serving:
            model = self.config.models.get(mid)
            if model is None or self.config.unit_of(model) in self.orphans:
                return True
        return False

    def _idle_work(self, now: float) -> None:
        """Nothing waits: ttls that ran out, then preloads."""
        if not self.to_preload and not self._ttls():
            return  # the usual case, after every response: nothing to look at
        view = self.view()
        evict, stop, upcoming = expired(view, now, set(self.serving))
        if evict or stop:
            sleep, stopped = sleep_or_stop(view, evict, exclude=set(stop))
            self._start(plan_evict(self.config, sleep, stopped + stop, "ttl"), [])
            return
        while self.to_preload:
            model = self.to_preload.pop(0)
            if model in self.config.models and model not in self.resident and self._cooling(model, now) is None:
                room = make_room(self.view(), model)
                if isinstance(room, Room) and not room.blocked_by:
                    self._start(plan_room(self.config, room, "preload"))
                    return
        if upcoming is not None:
            self.effects.wake_at(upcoming)

    def _ttls(self) -> bool:
        """Does anything in this configuration ever expire? (cached per configuration)"""
        cached = self._ttl_cache
        if cached is None or cached[0] is not self.config:
            c = self.config
            any_ttl = c.residency.sleep_ttl is not None or any(c.ttl_of(m) is not None for m in c.models.values())
            cached = self._ttl_cache = (c, any_ttl)
        return cached[1]

    def _retry(self, target: str, waiters: list[Ticket]) -> None:
        room = make_room(self.view(), target)
        if isinstance(room, NoRoom):
            self._start(make_plan(self.config, target, self.running), waiters, attempt=2)
        else:
            self._start(plan_room(self.config, room), waiters, attempt=2)

    def _start(self, plan: Plan, waiters: list[Ticket] | None = None, attempt: int = 1) -> None:
        self.switch = Switch(plan, list(waiters or []), attempt=attempt)
        if plan.start is not None:
            self.started.add(plan.start)
        elif plan.adopt and plan.target is not None and plan.target in self.config.models:
            self.started.add(self.config.unit_of(self.config.models[plan.target]))
        for ticket in self.switch.waiters:
            if ticket in self.queue:
                self.queue.remove(ticket)
        if plan.target is not None and not plan.adopt:
            self.switches_started += 1  # loads only: adopting or unloading is not a switch
        self.effects.start_switch(self.switch)
        for ticket in self.switch.waiters:
            self.effects.waiting(ticket, self.switch)
