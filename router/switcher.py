"""Switcher: the one owner of switching state; runs the scheduler's loop and carries out its plans.

Request handlers `submit()` a ticket and read what happens to it from `updates(ticket)`:
`Status` lines while a switch runs, then `Granted` or `Failed`. Every state change goes through
one asyncio queue and one task (`_run`), so switches never interleave and nothing needs a lock.
The slow work of a plan (D-Bus, files, health polls) runs as a task that reports back as an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from router import journal
from router.atomicfile import remove_file, write_atomic
from router.backendconf import read_model_name, set_model_name
from router.chunks import loading_line, switching_line
from router.config import Backend, Config, Model
from router.events import EventBus
from router.execstart import DROPIN_NAME, dropin_model_id, needs_dropin, render_dropin
from router.plan import Plan
from router.scheduler import LoadFailure, Scheduler, Switch, Ticket
from router.systemd import Systemd, SystemdError, UnitState
from router.upstream import Probe

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


@dataclass
class SwitchRun:
    """Progress of the switch in flight, published for status lines and /status."""

    plan: Plan
    display: str
    timeout: float
    started: float = field(default_factory=time.monotonic)
    phase: str = "stopping"
    load_started: float | None = None
    aborted: bool = False  # cut short by the scheduler (abort_switch), not by a shutdown

    def loading_text(self) -> str:
        return loading_line(self.display, time.monotonic() - (self.load_started or self.started), self.timeout)


class Switcher:
    """Owns the scheduler and the switch in flight; the only place where switching state changes."""

    def __init__(self, config: Config, systemd: Systemd, probe: Probe) -> None:
        self.systemd = systemd
        self.probe = probe  # async (url, timeout) -> True if it answered 200
        self.scheduler = Scheduler(config, self)
        self.events = EventBus()  # typed events for metrics, /events and history (router/events.py)
        self.run_info: SwitchRun | None = None
        self.last_switch: dict[str, Any] | None = None
        self.config_loaded_at = time.time()
        self.reload_error: list[str] | None = None  # problems of the last rejected reload, until a good one
        self._events: asyncio.Queue[tuple[Callable[..., None], tuple[Any, ...]]] = asyncio.Queue()
        self._inbox: dict[int, asyncio.Queue[Update]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._switch_task: asyncio.Task[Any] | None = None
        self._unit_changed = asyncio.Event()

    @property
    def config(self) -> Config:
        return self.scheduler.config

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to systemd, adopt a model that is already running, and start the run loop."""
        self.systemd.on_unit_change = self._on_unit_change
        await self.systemd.open()
        units = self.config.managed_units()
        await self.systemd.watch(units)
        states = await self.systemd.states(units)
        running = {u for u, s in states.items() if s.is_running}
        adopt = find_running_model(self.config, running)
        log.info("startup", running=sorted(running), adopt=adopt)
        self._loop_task = asyncio.create_task(self._run(), name="switcher")
        self._post(self.scheduler.on_startup, running, adopt)

    async def close(self) -> None:
        for task in [*self._tasks, self._loop_task]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*[t for t in [*self._tasks, self._loop_task] if t], return_exceptions=True)
        await self.systemd.close()

    async def _run(self) -> None:
        while True:
            handler, args = await self._events.get()
            try:
                handler(*args)
            except Exception:  # a bug must not kill the owner of all state: log it and go on
                log.exception("scheduler_error", event=getattr(handler, "__name__", "?"))

    def _post(self, handler: Callable[..., None], *args: Any) -> None:
        self._events.put_nowait((handler, args))

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- what request handlers call -----------------------------------------------------------

    def submit(self, model: str | None) -> Ticket:
        ticket = Ticket(model)
        self._inbox[ticket.id] = asyncio.Queue()
        self._post(self.scheduler.on_request, ticket)
        return ticket

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
        self._post(self.scheduler.on_done, ticket)

    def reload(self, config: Config) -> None:
        self.config_loaded_at, self.reload_error = time.time(), None
        self._post(self.scheduler.on_config, config)
        self._spawn(self.systemd.watch(config.managed_units()), "watch")

    def model_state(self, model_id: str) -> str:
        s = self.scheduler
        if s.switch is not None and s.switch.target == model_id:
            return "loading"
        return "loaded" if s.active == model_id else "unloaded"

    # --- Effects: called by the scheduler, inside the run loop --------------------------------

    def _send(self, ticket: Ticket, update: Update) -> None:
        inbox = self._inbox.get(ticket.id)
        if inbox is not None:
            inbox.put_nowait(update)

    def _display(self, model_id: str | None) -> str:
        model = self.config.models.get(model_id or "")
        return model.display_name if model else (model_id or "all models")

    def waiting(self, ticket: Ticket, switch: Switch | None) -> None:
        if not ticket.told_switching and ticket.model is not None:
            ticket.told_switching = True
            self._send(ticket, Status(switching_line(self._display(ticket.model))))
        if switch is not None and self.run_info is not None and self.run_info.load_started is not None:
            self._send(ticket, Status(self.run_info.loading_text()))

    def grant(self, ticket: Ticket) -> None:
        if ticket.model is None:
            self._send(ticket, Unloaded())
            return
        model = self.config.models[ticket.model]
        took = None
        if ticket.told_switching and self.last_switch is not None:
            took = self.last_switch.get("took")
        self._send(ticket, Granted(model, self.config.backend_of(model), took))

    def fail(self, ticket: Ticket, error: LoadFailure) -> None:
        self._send(ticket, Failed(error, self._display(ticket.model)))

    def start_switch(self, plan: Plan) -> None:
        config = self.config
        model = config.models.get(plan.target or "")
        timeout = config.load_timeout_of(model) if model else config.switch.stop_timeout
        self.run_info = SwitchRun(plan, self._display(plan.target), timeout)
        self._switch_task = self._spawn(self._execute(plan, config, self.run_info), f"switch-{plan.target}")

    def abort_switch(self) -> None:
        if self.run_info is not None and self._switch_task is not None and not self._switch_task.done():
            self.run_info.aborted = True
            self._switch_task.cancel()

    # --- carrying out a plan ------------------------------------------------------------------

    async def _execute(self, plan: Plan, config: Config, run: SwitchRun) -> None:
        log.info("switch_start", target=plan.target, stop=list(plan.stop), start=plan.start, adopt=plan.adopt)
        try:
            error = await self._carry_out(plan, config, run)
        except asyncio.CancelledError:
            if not run.aborted:
                raise  # the router is shutting down: leave the unit as it is
            uncancel = getattr(asyncio.current_task(), "uncancel", None)  # Python >= 3.11
            if uncancel is not None:
                uncancel()  # the cancellation is handled here: later awaits and timeouts work as usual
            error = await self._abandon(plan, config, run)
        except SystemdError as e:
            error = LoadFailure(plan.target or "", plan.start, f"systemd did not do what was asked: {e}.",
                                "Check that the router may manage this unit (root on the system bus).")
        except Exception as e:
            log.exception("switch_crashed", target=plan.target)
            error = LoadFailure(plan.target or "", plan.start, f"the router hit an internal error: {e!r}.",
                                "See the router's own journal and report it.")
        try:
            states = await self.systemd.states(config.managed_units())
            running = {u for u, s in states.items() if s.is_running}
        except SystemdError:
            running = set(self.scheduler.running)
        took = time.monotonic() - run.started
        if plan.target is not None:  # /status's last_switch describes the last load, not an unload
            self.last_switch = {"target": plan.target, "ok": error is None, "took": round(took, 3),
                                "error": error.message(run.display) if error else None}
        if error is None:
            log.info("switch_done", target=plan.target, took=round(took, 3))
        else:
            log.error("switch_failed", target=plan.target, took=round(took, 3), error=error.message(run.display))
        self.run_info = None
        self._post(self._switch_done, error, running)

    async def _abandon(self, plan: Plan, config: Config, run: SwitchRun) -> LoadFailure:
        """Every client of this load left while another model waits: stop what was being started."""
        log.info("switch_abandoned", target=plan.target, phase=run.phase,
                 elapsed=round(time.monotonic() - run.started, 3))
        if plan.start is not None:
            with contextlib.suppress(SystemdError):  # what is still running shows in the states read next
                await self.systemd.stop(plan.start, config.switch.stop_timeout + 5)
        return LoadFailure(plan.target or "", plan.start,
                           "was no longer waited for: its clients left and another model was asked for.",
                           code="model_load_abandoned")

    def _switch_done(self, error: LoadFailure | None, running: set[str]) -> None:
        self.scheduler.on_switch_done(error, running)

    def _broadcast(self, run: SwitchRun) -> None:
        """Send the current "Loading…" line to every request waiting for this switch."""
        switch = self.scheduler.switch
        if switch is not None and switch.plan is run.plan:
            text = run.loading_text()
            for ticket in switch.waiters:
                self._send(ticket, Status(text))

    async def _tick(self, run: SwitchRun, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            self._broadcast(run)

    def _phase(self, run: SwitchRun, phase: str, **fields: Any) -> None:
        log.info("switch_phase", target=run.plan.target, phase=phase,
                 elapsed=round(time.monotonic() - run.started, 3), **fields)
        run.phase = phase

    async def _carry_out(self, plan: Plan, config: Config, run: SwitchRun) -> LoadFailure | None:
        target = plan.target or ""
        for unit in plan.stop:
            self._phase(run, "stopping", unit=unit)
            result = await self.systemd.stop(unit, config.switch.stop_timeout + 5)
            state = await self.systemd.state(unit)
            if state.is_running or result not in ("done", "canceled"):
                return LoadFailure(target, unit, f"did not stop (job {result}, state {state.active_state}).",
                                   f"Check `{config.journalctl(unit)}`; the unit may need a shorter TimeoutStopSec.")
        if plan.target is None:
            return None
        model = config.models[plan.target]
        backend = config.backend_of(model)
        unit = config.unit_of(model)
        if not plan.adopt:
            error = await self._rewrite(plan, config, model, run)
            if error is not None:
                return error
            self._phase(run, "starting", unit=unit)
            await self.systemd.reset_failed(unit)
            result = await self.systemd.start(unit, config.load_timeout_of(model))
            if result != "done":
                return await self._unit_failure(model, unit, f"did not start (job result {result})")
        self._phase(run, "loading", unit=unit)
        run.load_started = time.monotonic()
        self._broadcast(run)
        ticker = asyncio.create_task(self._tick(run, config.switch.status_every))
        try:
            error = await self._wait_healthy(model, backend, unit, config, run)
        finally:
            ticker.cancel()
        if error is not None:
            return error
        warmup = config.warmup_of(model)
        if warmup > 0:
            self._phase(run, "warmup", seconds=warmup)
            await asyncio.sleep(warmup)
        return None

    async def _rewrite(self, plan: Plan, config: Config, model: Model, run: SwitchRun) -> LoadFailure | None:
        unit = config.unit_of(model)
        self._phase(run, "writing", unit=unit)
        if plan.dropin is not None:
            path = config.systemd.dropin_dir / f"{plan.dropin}.d" / DROPIN_NAME
            try:
                if needs_dropin(model):
                    write_atomic(path, render_dropin(model))
                else:
                    remove_file(path)
            except OSError as e:
                return LoadFailure(model.id, unit, f"cannot write the drop-in {path}: {e.strerror or e}.",
                                   "Check the permissions of systemd.dropin_dir in config.yml.")
        if plan.config_file is not None and model.model_name is not None:
            try:
                text = plan.config_file.read_text(encoding="utf-8")
                write_atomic(plan.config_file, set_model_name(text, model.model_name))
            except (OSError, ValueError) as e:
                return LoadFailure(model.id, unit, f"cannot set model_name in {plan.config_file}: {e}.",
                                   "Fix the file or its permissions; it was left as it was.")
        self._phase(run, "reloading")
        await self.systemd.reload()
        if plan.dropin is not None and model.command is not None:
            argv = await self.systemd.exec_start(unit)
            # systemd keeps "$$" in the parsed argv and turns it into "$" only when it runs the command
            if argv != [[arg.replace("$", "$$") for arg in model.command]]:
                return LoadFailure(model.id, unit,
                                   f"after the reload systemd would run {argv} instead of {list(model.command)}.",
                                   f"Another drop-in overrides ExecStart=: see `{config.systemctl('cat', unit)}`.")
        return None

    async def _wait_healthy(self, model: Model, backend: Backend, unit: str, config: Config,
                            run: SwitchRun) -> LoadFailure | None:
        url = backend.url + backend.health
        timeout = config.load_timeout_of(model)
        deadline = (run.load_started or time.monotonic()) + timeout
        polls = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if await self.probe(url, min(2.0, max(remaining, 0.1))):
                return None
            state = await self.systemd.state(unit)
            if not state.is_running:
                return await self._unit_failure(model, unit, f"exited while loading ({describe(state)})",
                                                state)
            self._unit_changed.clear()
            # poll fast at first (small engines are up in tens of ms), then every health_interval
            pause = min(config.switch.health_interval, 0.02 * 2 ** polls, max(deadline - time.monotonic(), 0))
            polls += 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._unit_changed.wait(), pause)
        state = await self.systemd.state(unit)
        lines = await journal_tail(state)
        self._phase(run, "stopping", unit=unit, reason="load_timeout")
        await self.systemd.stop(unit, config.switch.stop_timeout + 5)
        return LoadFailure(model.id, unit,
                           f"did not answer {url} with 200 within {timeout:g}s; the unit was stopped.",
                           "If the model needs longer, raise its load_timeout in models.yml; otherwise check "
                           "the backend's url/health in config.yml and its log.", tuple(lines))

    async def _unit_failure(self, model: Model, unit: str, what: str,
                            state: UnitState | None = None) -> LoadFailure:
        state = state or await self.systemd.state(unit)
        lines = await journal_tail(state)
        return LoadFailure(model.id, unit, f"{what}.",
                           f"Fix the model's command in models.yml or the backend; `{self.config.journalctl(unit)}` "
                           "has the whole log.", tuple(lines))

    def _on_unit_change(self, unit: str) -> None:
        self._unit_changed.set()
        self._spawn(self._report_unit(unit), "unit-state")

    async def _report_unit(self, unit: str) -> None:
        with contextlib.suppress(SystemdError):
            state = await self.systemd.state(unit)
            self._post(self.scheduler.on_unit_state, unit, state.active_state)


async def journal_tail(state: UnitState) -> list[str]:
    """The last journal lines of the unit's latest run (matched by invocation, and by PID since start)."""
    return await journal.tail(state.invocation_id, pid=state.exec_main_pid, since_us=state.exec_main_start_us)


def describe(state: UnitState) -> str:
    """How a unit ended, in words: 'exited with status 2', 'killed by a signal', …"""
    if state.result == "exit-code":
        return f"exited with status {state.exec_main_status}"
    if state.result in ("signal", "core-dump"):
        return f"killed by signal {state.exec_main_status} (result {state.result})"
    if state.result == "success":
        return f"exited with status 0 (state {state.active_state})"
    return f"result {state.result}, state {state.active_state}"


def find_running_model(config: Config, running: set[str]) -> str | None:
    """Which model the running units serve, from the units, drop-ins and config files the router wrote."""
    for model in config.models.values():
        if model.unit and model.unit in running:
            return model.id
    for backend in config.backends.values():
        if backend.unit not in running:
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
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None
