"""Switcher: the one owner of switching state; runs the scheduler's loop and starts plans' execution.

Request handlers `submit()` a ticket and read what happens to it with `next_update(ticket)`:
`Status` lines while a switch runs, then `Granted` or `Failed`. Every state change goes through
one asyncio queue and one task (`_run`), so switches never interleave and nothing needs a lock.
Carrying out a plan (D-Bus, files, health polls) is router/executor.py's, run as a task whose end
the run loop observes (a done-callback), so no cancellation can lose it. Nothing ends the run loop:
an error in an event handler is logged and fails only the ticket involved; `heartbeat()` proves it
turns (the watchdog and /health ask it).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import structlog

from router import gpu, hostmem
from router.atomicfile import read_text
from router.backendconf import read_model_name
from router.chunks import switching_line, waiting_line, waking_line
from router.config import Backend, Config, Model
from router.events import EventBus, ModelState, ModelStateName, QueueDepth, SwitchEnded, SwitchProgress
from router.execstart import DROPIN_NAME, dropin_model_id, needs_dropin
from router.executor import HealthProbe, MemoryProbe, PlanExecutor, SleepDriver, SwitchRun
from router.scheduler import PRIORITIES, LoadFailure, Scheduler, Switch, SwitchOutcome, Ticket
from router.systemd import SystemdError

log = structlog.get_logger("router.switcher")


@dataclass(frozen=True)
class Status:
    text: str
    done: bool = False


@dataclass(frozen=True)
class Granted:
    model: Model
    backend: Backend
    took: float | None = None  # the switch this request waited for took this long
    url: str = ""  # the engine's base URL (a template backend's instance port filled in)


@dataclass(frozen=True)
class Unloaded:
    """An unload request went through: no model is loaded now."""


@dataclass(frozen=True)
class Failed:
    error: LoadFailure
    display: str

    @property
    def message(self) -> str:
        return self.error.message(self.display)


Update = Status | Granted | Unloaded | Failed

# HTTP status for a failure code (anything else: 503)
FAILURE_STATUS = {"model_not_found": 404, "queue_full": 429, "internal_error": 500}


def failure_status(error: LoadFailure) -> int:
    return FAILURE_STATUS.get(error.code, 503)


class Switcher:
    """Owns the scheduler and the switch in flight; the only place where switching state changes."""

    def __init__(self, config: Config, systemd: Any, probe: HealthProbe,
                 clock: Callable[[], float] = time.monotonic,
                 port_check: Callable[[str], str | None] | None = None,
                 memory: MemoryProbe | None = None, sleeper: SleepDriver | None = None) -> None:
        self.systemd = systemd
        self.clock = clock
        self.scheduler = Scheduler(config, self, clock)
        self.executor = PlanExecutor(systemd, probe, self, clock, port_check, memory, sleeper)
        self.events = EventBus()  # typed events for metrics, /events and history (router/events.py)
        self.expected_load: Callable[[str], float | None] | None = None  # typical load time, from history
        self.run_info: SwitchRun | None = None
        self.last_switch: dict[str, Any] | None = None
        self.config_loaded_at = time.time()
        self.reload_error: list[str] | None = None  # problems of the last rejected reload, until a good one
        self.handler_errors = 0  # exceptions caught in event handlers (each one a bug)
        self._events: asyncio.Queue[tuple[Callable[..., None], tuple[Any, ...]]] = asyncio.Queue()
        self._inbox: dict[int, asyncio.Queue[Update]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._switch_task: asyncio.Task[Any] | None = None
        self._closing = False
        self._dispatching = False  # a handler runs inline (_dispatch): a nested event is queued instead
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._seen: tuple[Any, ...] = (-1, None, 0)
        self._states: dict[str, str] = {}  # each model's state as observers last heard it

    @property
    def config(self) -> Config:
        return self.scheduler.config

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to systemd, adopt a model that is already running, and start the run loop."""
        self.systemd.on_unit_change = self._on_unit_change
        if hasattr(self.systemd, "on_reconnect"):
            self.systemd.on_reconnect = self._on_reconnect
        await self.systemd.open()
        units = self.config.managed_units()
        await self.systemd.watch(units)
        states = await self.systemd.states(units)
        running = {u for u, s in states.items() if s.is_running}
        adopt = find_running_models(self.config, running)
        with contextlib.suppress(Exception):  # budgets the config does not give: from the driver and the host
            self.scheduler.gpu_budget = await asyncio.to_thread(gpu.budget)
            self.scheduler.host_ram_gb = hostmem.default_budget_gb()
        log.info("startup", running=sorted(running), adopt=adopt)
        self._start_loop()
        self._post(self.scheduler.on_startup, running, adopt)

    async def close(self) -> None:
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        for task in [*self._tasks, self._loop_task]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*[t for t in [*self._tasks, self._loop_task] if t], return_exceptions=True)
        await self.systemd.close()

    @property
    def alive(self) -> bool:
        """The run loop is running (it is restarted at once should it ever end)."""
        return self._loop_task is not None and not self._loop_task.done()

    async def heartbeat(self, timeout: float) -> bool:
        """True when the run loop handles an event within `timeout` seconds: it turns, it is not stuck."""
        if not self.alive:
            return False
        answered = asyncio.get_running_loop().create_future()
        self._post(_answer, answered)
        try:
            await asyncio.wait_for(answered, timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def _start_loop(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="switcher")
        self._loop_task.add_done_callback(self._loop_ended)

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        if self._closing:
            return
        error = None if task.cancelled() else task.exception()
        log.error("run_loop_ended", error=repr(error), hint="restarted; this is a bug, please report it")
        self._start_loop()

    async def _run(self) -> None:
        while True:
            handler, args = await self._events.get()
            try:
                handler(*args)
                self._observe()
            except Exception as e:  # a bug must not kill the owner of all state: log it and go on
                self._handler_failed(handler, args, e)

    def _handler_failed(self, handler: Callable[..., None], args: tuple[Any, ...], error: Exception) -> None:
        self.handler_errors += 1
        log.error("scheduler_error", handler=getattr(handler, "__name__", repr(handler)), error=repr(error),
                  traceback="".join(traceback.format_exception(error)))
        for ticket in [a for a in args if isinstance(a, Ticket)]:
            with contextlib.suppress(Exception):
                self._forget(ticket)
                if not ticket.granted:
                    ticket.ended = True
                    self.fail(ticket, LoadFailure(
                        ticket.model or "", None, f"the router hit an internal error: {error!r}.",
                        "See the router's journal and report it; asking again may work.",
                        code="internal_error", cooldown=False))

    def _forget(self, ticket: Ticket) -> None:
        s = self.scheduler
        if ticket in s.queue:
            s.queue.remove(ticket)
        if s.switch is not None and ticket in s.switch.waiters:
            s.switch.waiters.remove(ticket)

    def _post(self, handler: Callable[..., None], *args: Any) -> None:
        self._events.put_nowait((handler, args))

    def _dispatch(self, handler: Callable[..., None], *args: Any) -> None:
        """Handle a request's event at once when nothing is queued before it (the hot path: a request
        for the loaded model costs no trip through the run loop), else queue it in order. Handlers never
        await, so running one here is the same as the run loop picking it up next."""
        if self._dispatching or not self._events.empty() or not self.alive:
            self._post(handler, *args)
            return
        self._dispatching = True
        try:
            handler(*args)
            self._observe()
        except Exception as e:
            self._handler_failed(handler, args, e)
        finally:
            self._dispatching = False

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- what request handlers call -----------------------------------------------------------

    def submit(self, model: str | None, priority: int = 1, unload: bool = False, sleep: bool = False) -> Ticket:
        ticket = Ticket(model, priority, unload=unload or sleep or model is None, sleep=sleep)
        self._inbox[ticket.id] = asyncio.Queue()
        self._dispatch(self._on_request, ticket)
        return ticket

    def unload(self, model_id: str | None) -> Ticket:
        """Unload one model (None: every model): it leaves the GPU and its unit stops, even a persistent
        one; waits for its responses in flight. Read the outcome with next_update: Unloaded or Failed, then
        done(ticket). Queued ahead of waiting requests (high priority)."""
        return self.submit(model_id, PRIORITIES["high"], unload=True)

    def sleep(self, model_id: str) -> Ticket:
        """Put a loaded model to sleep now (an admin's choice): Unloaded when done, or Failed."""
        return self.submit(model_id, PRIORITIES["high"], sleep=True)

    def _on_request(self, ticket: Ticket) -> None:
        self._check_bus()
        self.scheduler.on_request(ticket)

    def _check_bus(self) -> None:
        """Tell the scheduler when systemd's reachability changed (read from the connection, in the loop)."""
        connected = getattr(self.systemd, "connected", True)
        if connected == (self.scheduler.unreachable is None):
            return
        why = None
        if not connected:
            why = str(getattr(self.systemd, "last_error", None) or "the connection is closed")
            if not why.startswith("systemd is not reachable"):
                why = f"systemd is not reachable over D-Bus: {why}"
        self.scheduler.on_bus(why)

    async def next_update(self, ticket: Ticket, timeout: float | None = None) -> Update | None:
        """The next thing that happened to this ticket, or None after `timeout` seconds."""
        inbox = self._inbox[ticket.id]
        if timeout is None:
            return await inbox.get()
        try:
            return await asyncio.wait_for(inbox.get(), timeout)
        except asyncio.TimeoutError:
            return None

    def done(self, ticket: Ticket) -> None:
        """The request ended, whatever way: its response finished, failed, or its client went away."""
        if self._inbox.pop(ticket.id, None) is None:
            return
        self._dispatch(self.scheduler.on_done, ticket)

    def reload(self, config: Config) -> None:
        """Apply a new configuration; units it no longer manages are stopped if they run a router model."""
        old = self.config
        dropped = [u for u in old.managed_units() if u not in set(config.managed_units())]
        sched = self.scheduler
        ours = set(sched.resident) | set(sched.to_adopt)  # loaded, asleep, found running, or loading now
        if sched.switch is not None and sched.switch.target is not None:
            ours.add(sched.switch.target)
        orphans = {u for u in dropped if u in sched.running and (u in sched.started or router_loaded(old, u, ours))}
        self.config_loaded_at, self.reload_error = time.time(), None
        if orphans:
            log.warning("reload_orphans", units=sorted(orphans), action="stopping them: they run a model the "
                        "router loaded and the new configuration no longer manages them")
        self._post(self.scheduler.on_config, config, orphans)
        self._spawn(self.systemd.watch(config.managed_units()), "watch")

    def model_state(self, model_id: str) -> str:
        """loading, loaded, sleeping, failed (its last load failed) or unloaded."""
        s = self.scheduler
        if s.switch is not None and s.switch.target == model_id and not s.switch.plan.adopt:
            return "loading"
        state = s.state_of(model_id)
        if state is not None:
            return state
        if s.switch is not None and s.switch.target == model_id:
            return "loading"
        return "failed" if model_id in s.cooldowns else "unloaded"

    # --- Effects: called by the scheduler, inside the run loop --------------------------------

    def _send(self, ticket: Ticket, update: Update) -> None:
        inbox = self._inbox.get(ticket.id)
        if inbox is not None:
            inbox.put_nowait(update)

    def _display(self, model_id: str | None) -> str:
        model = self.config.models.get(model_id or "")
        return model.display_name if model else (model_id or "all models")

    def waiting(self, ticket: Ticket, switch: Switch | None) -> None:
        if switch is None and ticket.model is not None and not ticket.unload and not ticket.told_switching:
            self._post(self._queued, ticket)  # once the scheduler is done with it: still queued? behind what?
            return
        if not ticket.told_switching and ticket.model is not None and not ticket.unload:
            self._tell_switching(ticket, switch.plan.wake if switch is not None else None)
        if switch is not None and self.run_info is not None and self.run_info.load_started is not None:
            self._send(ticket, Status(self.run_info.loading_text()))

    def _queued(self, ticket: Ticket) -> None:
        """A request the scheduler queued: `⏳ Waiting for M (2 requests ahead)…` when something is in its
        way, else `🔄 Switching to M…` (its switch starts as soon as linger allows). Said once the
        scheduler is done with it, so that a switch it started at once says "Switching…" itself."""
        if ticket.told_switching or ticket not in self.scheduler.queue or self._tell_waiting(ticket):
            return
        self._tell_switching(ticket, None)

    def _tell_switching(self, ticket: Ticket, wake: bool | None) -> None:
        """`🔄 Switching to M…`, or `⏰ Waking M…` for a sleeping model (wake None: ask the resident set)."""
        ticket.told_switching = True
        display = self._display(ticket.model)
        if wake is None:
            wake = self.scheduler.state_of(ticket.model or "") == "sleeping"
        self._send(ticket, Status(waking_line(display) if wake else switching_line(display)))

    def _tell_waiting(self, ticket: Ticket) -> bool:
        """`⏳ Waiting for M (2 requests ahead)…` to a queued request with something in its way."""
        if ticket.model is None or ticket.unload:
            return False
        other, ahead = self.scheduler.ahead(ticket)
        if other is None:
            return False
        self._send(ticket, Status(waiting_line(self._display(other), ahead)))
        return True

    def grant(self, ticket: Ticket) -> None:
        if ticket.model is None or ticket.unload:
            self._send(ticket, Unloaded())
            return
        model = self.config.models[ticket.model]
        took = None
        if ticket.told_switching and self.last_switch is not None:
            took = self.last_switch.get("took")
        self._send(ticket, Granted(model, self.config.backend_of(model), took, self.config.url_of(model)))

    def fail(self, ticket: Ticket, error: LoadFailure) -> None:
        self._send(ticket, Failed(error, self._display(ticket.model)))

    def wake_at(self, when: float) -> None:
        if self._timer is not None and self._timer_at is not None and self._timer_at <= when:
            return  # an earlier (or the same) wake-up is already set; on_tick asks again if needed
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = asyncio.get_running_loop().call_later(max(when - self.clock(), 0.0), self._tick)

    def _tick(self) -> None:
        self._timer = self._timer_at = None
        self._post(self.scheduler.on_tick)

    def start_switch(self, switch: Switch) -> None:
        config = self.config
        plan = switch.plan
        model = config.models.get(plan.target or "")
        timeout = config.load_timeout_of(model) if model else config.switch.stop_timeout
        run = SwitchRun(plan, self._display(plan.target), timeout, switch_id=switch.id, clock=self.clock)
        if self.expected_load is not None and plan.target is not None and not plan.adopt:
            with contextlib.suppress(Exception):  # history is a nicety: never let it stop a switch
                run.expected = self.expected_load(plan.target)
        self.run_info = run
        task = self._spawn(self._execute(plan, config, run), f"switch-{plan.target}")
        task.add_done_callback(lambda t: self._switch_task_ended(t, switch, run))
        self._switch_task = task

    def abort_switch(self) -> None:
        if self.run_info is not None and self._switch_task is not None and not self._switch_task.done():
            self.run_info.aborted = True
            self._switch_task.cancel()

    # --- the switch task and its end ----------------------------------------------------------

    async def _execute(self, plan: Any, config: Config,
                       run: SwitchRun) -> tuple[LoadFailure | None, set[str], SwitchOutcome]:
        log.info("switch_start", switch_id=run.switch_id, target=plan.target, stop=list(plan.stop),
                 start=plan.start, adopt=plan.adopt)
        try:
            error = await self.executor.carry_out(plan, config, run)
        except asyncio.CancelledError:
            if not run.aborted:
                raise  # the router is shutting down: leave the unit as it is
            uncancel = getattr(asyncio.current_task(), "uncancel", None)  # Python >= 3.11
            if uncancel is not None:
                uncancel()  # the cancellation is handled here: later awaits and timeouts work as usual
            error = await self.executor.abandon(plan, config, run)
        except Exception as e:
            log.exception("switch_crashed", target=plan.target)
            error = LoadFailure(plan.target or "", plan.start, f"the router hit an internal error: {e!r}.",
                                "See the router's own journal and report it.", code="internal_error",
                                cooldown=False)
        outcome = SwitchOutcome(frozenset(run.slept), run.measured_gb, run.asleep)
        return error, await self._running_units(config), outcome

    async def _running_units(self, config: Config) -> set[str]:
        try:
            states = await self.systemd.states(config.managed_units())
            return {u for u, s in states.items() if s.is_running}
        except SystemdError:
            return set(self.scheduler.running)

    def _switch_task_ended(self, task: asyncio.Task[Any], switch: Switch, run: SwitchRun) -> None:
        """The owner's view of a switch's end: whatever way the task ended, the scheduler hears of it once."""
        if self._closing:
            return
        running = set(self.scheduler.running)
        outcome = SwitchOutcome(frozenset(run.slept))
        if task.cancelled():
            error: LoadFailure | None = LoadFailure(switch.target or "", switch.plan.start,
                                                    "was cut short.", code="model_load_abandoned", cooldown=False)
        elif task.exception() is not None:
            e = task.exception()
            log.error("switch_task_failed", target=switch.target, error=repr(e))
            error = LoadFailure(switch.target or "", switch.plan.start, f"the router hit an internal error: {e!r}.",
                                "See the router's own journal and report it.", code="internal_error",
                                cooldown=False)
        else:
            error, running, outcome = task.result()
        took = run.elapsed()
        display = run.display
        if switch.target is not None:  # /status's last_switch describes the last load, not an unload
            self.last_switch = {"target": switch.target, "ok": error is None, "took": round(took, 3),
                                "error": error.message(display) if error else None,
                                "woke": run.woke, "reason": switch.plan.reason}
        if error is None:
            log.info("switch_done", switch_id=switch.id, target=switch.target, took=round(took, 3))
        else:
            log.error("switch_failed", switch_id=switch.id, target=switch.target, took=round(took, 3),
                      error=error.message(display))
        result: Literal["ok", "failed", "aborted"] = (
            "ok" if error is None else "aborted" if error.code == "model_load_abandoned" else "failed")
        evicted = switch.plan.evicts[0] if switch.plan.evicts else None
        self.events.emit(SwitchEnded(switch.id, evicted, switch.target, result, round(took, 3),
                                     run.load_seconds, error.message(display) if error else None))
        if error is not None and switch.target is not None:
            self.events.emit(ModelState(switch.target, "failed", switch.plan.start, error.message(display),
                                        error.exit_code))
        if self.run_info is run:
            self.run_info = None
        self._post(self._check_bus)  # a switch that failed for an unreachable bus: the queue learns it first
        self._post(self.scheduler.on_switch_done, switch.id, error, running, outcome)

    # --- Progress: called by the executor ----------------------------------------------------

    def phase(self, run: SwitchRun, phase: str, **fields: Any) -> None:
        log.info("switch_phase", switch_id=run.switch_id, target=run.plan.target, phase=phase,
                 elapsed=round(run.elapsed(), 3), **fields)
        run.phase = phase
        self.events.emit(SwitchProgress(run.switch_id, run.plan.target, phase, round(run.elapsed(), 3)))

    def loading(self, run: SwitchRun) -> None:
        """Send the current "Loading…" line to every request waiting for this switch."""
        switch = self.scheduler.switch
        if switch is not None and switch.plan is run.plan:
            text = run.loading_text()
            for ticket in switch.waiters:
                self._send(ticket, Status(text))
            for ticket in self.scheduler.queue:  # the requests queued behind this load: how far they are
                self._tell_waiting(ticket)
            self.events.emit(SwitchProgress(run.switch_id, run.plan.target, run.phase, round(run.elapsed(), 3),
                                            text))

    # --- observers ----------------------------------------------------------------------------

    def _observe(self) -> None:
        """After each event: tell observers what changed (model states, load started, queue)."""
        s = self.scheduler
        target = s.switch.target if s.switch is not None else None
        waiting = len(s.queue) + (len(s.switch.waiters) if s.switch is not None else 0)
        seen = (s.version, target, waiting, len(s.cooldowns))
        if seen == self._seen:
            return
        old_waiting = self._seen[2]
        self._seen = seen
        if not self.events.has_observers:
            return
        for model_id in self.config.models:
            state = self.model_state(model_id)
            if self._states.get(model_id, "unloaded") == state:
                continue
            self._states[model_id] = state
            if state == "failed":
                continue  # said with its error by _switch_task_ended
            unit = self.config.unit_of(self.config.models[model_id]) if state != "unloaded" else None
            self.events.emit(ModelState(model_id, cast(ModelStateName, state), unit))
        if waiting != old_waiting:
            counts, oldest = s.waiting_counts()
            self.events.emit(QueueDepth(counts, oldest))

    # --- systemd signals ----------------------------------------------------------------------

    def _on_unit_change(self, unit: str) -> None:
        self.executor.unit_changed.set()
        self._spawn(self._report_unit(unit), "unit-state")

    async def _report_unit(self, unit: str) -> None:
        with contextlib.suppress(SystemdError):
            state = await self.systemd.state(unit)
            self._post(self.scheduler.on_unit_state, unit, state.active_state)

    def _on_reconnect(self) -> None:
        """D-Bus is back: re-read what runs, and adopt a model a broken-off load left running."""
        self._post(self._check_bus)
        self._spawn(self._resync(), "resync")

    async def _resync(self) -> None:
        config = self.config
        with contextlib.suppress(SystemdError):
            await self.systemd.watch(config.managed_units())
            running = await self._running_units(config)
            adopt = find_running_models(config, running)
            log.info("systemd_resync", running=sorted(running), adopt=adopt)
            self._post(self.scheduler.on_resync, running, adopt)


def _answer(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def router_loaded(config: Config, unit: str, resident: set[str]) -> bool:
    """Does this unit run a model the router loaded? (a resident model, or the router's drop-in in it)"""
    if any(m in config.models and config.unit_of(config.models[m]) == unit for m in resident):
        return True
    return dropin_model_id(_read(config.systemd.dropin_dir / f"{unit}.d" / DROPIN_NAME) or "") is not None


def find_running_models(config: Config, running: set[str]) -> list[str]:
    """Every model the running units serve: one a unit (a template instance runs its own model)."""
    found: list[str] = []
    for unit in running:
        model = find_running_model(config, {unit})
        if model is not None and model not in found:
            found.append(model)
    return sorted(found)


def find_running_model(config: Config, running: set[str]) -> str | None:
    """Which model the running units serve, from the units, drop-ins and config files the router wrote."""
    for model in config.models.values():
        if model.unit and model.unit in running:
            return model.id
    for model in config.models.values():
        if not model.unit and config.backend_of(model).template and config.unit_of(model) in running:
            marked = dropin_model_id(_read(config.systemd.dropin_dir / f"{config.unit_of(model)}.d" / DROPIN_NAME)
                                     or "")
            if marked == model.id or not needs_dropin(model):
                return model.id
    for backend in config.backends.values():
        if backend.template or backend.unit not in running:
            continue
        on_backend = [m for m in config.models.values() if m.backend == backend.name and not m.unit]
        dropin = config.systemd.dropin_dir / f"{backend.unit}.d" / DROPIN_NAME
        marked = dropin_model_id(_read(dropin) or "")
        if marked is not None and any(m.id == marked for m in on_backend):
            return marked
        if backend.config_file is not None:
            name = read_model_name(_read(backend.config_file) or "")
            for m in on_backend:
                if m.model_name is not None and m.model_name == name and not needs_dropin(m):
                    return m.id
        if len(on_backend) == 1 and not needs_dropin(on_backend[0]) and on_backend[0].model_name is None:
            return on_backend[0].id
    return None


def _read(path: Path) -> str | None:
    try:
        return read_text(path)  # never through a symlink
    except (OSError, UnicodeDecodeError):
        return None
