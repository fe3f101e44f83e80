"""Plan executor: carries out one switch plan — stop units, write drop-ins, reload, start, wait healthy.

It holds no scheduling state. The switcher runs `carry_out` as a task and observes its end; the
executor only reports progress through a `Progress` object and returns a `LoadFailure` or None.
Cancellation reaches it only between these steps' awaits; it never outlives its task.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from router import journal
from router.atomicfile import read_text, remove_file, write_atomic
from router.backendconf import set_model_name
from router.chunks import loading_line, waking_line
from router.config import Backend, Config, Model, SleepSpec
from router.execstart import DROPIN_NAME, needs_dropin, render_dropin
from router.plan import Plan
from router.scheduler import LoadFailure
from router.systemd import SystemdError, SystemdUnreachable, UnitState

log = structlog.get_logger("router.executor")

HealthProbe = Callable[[str, float], Awaitable[bool]]  # GET url within timeout s: True on 200
QUOTE_LIMIT = 300  # characters of an argv quoted in an error


@dataclass
class SwitchRun:
    """Progress of the switch in flight, published for status lines and /status."""

    plan: Plan
    display: str
    timeout: float
    switch_id: int = 0
    clock: Callable[[], float] = time.monotonic
    started: float = 0.0
    phase: str = "stopping"
    load_started: float | None = None
    load_seconds: float | None = None  # unit start -> healthy, once known
    aborted: bool = False  # cut short by the scheduler (abort_switch), not by a shutdown
    expected: float | None = None  # typical load time from history, for "20s/~45s"
    extra: dict[str, Any] = field(default_factory=dict)
    slept: set[str] = field(default_factory=set)  # models put to sleep by this switch
    measured_gb: float | None = None  # GPU memory the target's processes use once loaded (NVML)
    asleep: bool = False  # an adopted engine was found asleep
    woke: bool = False  # the target was woken, not started
    wake_seconds: float | None = None  # the wake call's own time

    def __post_init__(self) -> None:
        if not self.started:
            self.started = self.clock()

    def elapsed(self) -> float:
        return self.clock() - self.started

    def loading_text(self) -> str:
        if self.phase == "waking":
            return waking_line(self.display, self.clock() - (self.load_started or self.started))
        return loading_line(self.display, self.clock() - (self.load_started or self.started), self.timeout,
                            self.expected)


class Progress(Protocol):
    def phase(self, run: SwitchRun, phase: str, **fields: Any) -> None: ...
    def loading(self, run: SwitchRun) -> None:
        """Say the current "Loading…" line to every request waiting for this switch."""
        ...


class MemoryProbe(Protocol):
    """GPU memory, by NVML (router/gpumemory.py); absent without a GPU."""

    async def wait_free(self, gpu: int, need_gb: float, timeout: float) -> bool:
        """Wait until `need_gb` are free on the GPU (True), or `timeout` passed (False)."""
        ...

    async def measure(self, unit: str) -> float | None:
        """GB the unit's processes use on the GPUs now (None: unknown)."""
        ...


class SleepDriver(Protocol):
    """An engine's sleep protocol over HTTP (router/sleep.py)."""

    async def enter(self, url: str, spec: SleepSpec, timeout: float) -> None: ...
    async def leave(self, url: str, spec: SleepSpec, timeout: float) -> None: ...
    async def is_sleeping(self, url: str, spec: SleepSpec, timeout: float) -> bool | None: ...


class Systemdish(Protocol):
    """What the executor needs of router.systemd.Systemd (a fake in tests)."""

    async def reload(self) -> None: ...
    async def state(self, name: str) -> UnitState: ...
    async def exec_start(self, name: str) -> list[list[str]]: ...
    async def start(self, name: str, timeout: float) -> str: ...
    async def stop(self, name: str, timeout: float) -> str: ...
    async def reset_failed(self, name: str) -> None: ...


def quote_argv(argv: object, limit: int = QUOTE_LIMIT) -> str:
    """An argv for an error message, cut to `limit` characters."""
    text = repr(argv)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


class PlanExecutor:
    """Carries out plans against systemd, the file system and the engines' health URLs."""

    def __init__(self, systemd: Systemdish, probe: HealthProbe, progress: Progress,
                 clock: Callable[[], float] = time.monotonic,
                 port_check: Callable[[str], str | None] | None = None,
                 memory: MemoryProbe | None = None, sleeper: SleepDriver | None = None) -> None:
        self.systemd = systemd
        self.probe = probe
        self.progress = progress
        self.clock = clock
        self.port_check = port_check  # url -> "127.0.0.1:8085 is already in use by pid 12 (cmd)", or None
        self.memory = memory  # None: no GPU to watch
        self.sleeper = sleeper
        self.unit_changed = asyncio.Event()  # set by the switcher on every PropertiesChanged

    async def carry_out(self, plan: Plan, config: Config, run: SwitchRun) -> LoadFailure | None:
        try:
            return await self._steps(plan, config, run)
        except SystemdError as e:
            if not getattr(self.systemd, "connected", True) and not isinstance(e, SystemdUnreachable):
                e = SystemdUnreachable(f"{e} (the bus connection is gone)")  # whatever failed, the bus is down
            return systemd_failure(config, plan.target or "", plan.start, e)

    async def abandon(self, plan: Plan, config: Config, run: SwitchRun) -> LoadFailure:
        """The switch was cut short: stop what was being started."""
        log.info("switch_abandoned", target=plan.target, phase=run.phase, elapsed=round(run.elapsed(), 3))
        if plan.start is not None:
            with contextlib.suppress(SystemdError):  # what is still running shows in the states read next
                await self.systemd.stop(plan.start, config.switch.stop_timeout + 5)
        return LoadFailure(plan.target or "", plan.start,
                           "was no longer waited for: its clients left, or a reload removed it.",
                           code="model_load_abandoned", cooldown=False)

    async def _steps(self, plan: Plan, config: Config, run: SwitchRun) -> LoadFailure | None:
        target = plan.target or ""
        stop = list(plan.stop)
        for model_id in plan.sleep:
            if not await self._sleep(config, model_id, run):
                stop.append(config.unit_of(config.models[model_id]))  # it would not sleep: stop it
        for unit in stop:
            self.progress.phase(run, "stopping", unit=unit)
            result = await self.systemd.stop(unit, config.switch.stop_timeout + 5)
            state = await self.systemd.state(unit)
            if state.is_running or result not in ("done", "canceled"):
                return LoadFailure(target, unit, f"did not stop (job {result}, state {state.active_state}).",
                                   f"Check `{config.journalctl(unit)}`; the unit may need a shorter "
                                   "TimeoutStopSec.", code="unit_stop_failed", cooldown=False)
        if plan.target is None:
            return None
        model = config.models[plan.target]
        backend = config.backend_of(model)
        unit = config.unit_of(model)
        if (stop or run.slept) and plan.need_gb is not None and self.memory is not None:
            await self._memory_free(plan, config, run)
        if plan.wake and await self._wake(config, model, backend, unit, run):
            return None
        if plan.adopt and backend.sleep is not None and self.sleeper is not None:
            with contextlib.suppress(Exception):  # unknown: treated as awake, as before
                run.asleep = bool(await self.sleeper.is_sleeping(config.url_of(model), backend.sleep, 5.0))
            if run.asleep:
                return None
        if not plan.adopt:
            error = await self._rewrite(plan, config, model, run)
            if error is not None:
                return error
            state = await self.systemd.state(unit)
            if state.is_running:  # started behind the router's back (a state change it missed): StartUnit
                self.progress.phase(run, "stopping", unit=unit, reason="running_unexpectedly")  # would be a no-op
                result = await self.systemd.stop(unit, config.switch.stop_timeout + 5)
                if (await self.systemd.state(unit)).is_running or result not in ("done", "canceled"):
                    return LoadFailure(model.id, unit, f"was already running and did not stop (job {result}).",
                                       f"Check `{config.journalctl(unit)}`.", code="unit_stop_failed",
                                       cooldown=False)
            error = await self._port_in_use(model, config.url_of(model), unit)
            if error is not None:
                return error
            self.progress.phase(run, "starting", unit=unit)
            await self.systemd.reset_failed(unit)
            result = await self.systemd.start(unit, config.load_timeout_of(model))
            if result != "done":
                return await self._unit_failure(config, model, unit, f"did not start (job result {result})",
                                                transient=True)
        self.progress.phase(run, "loading", unit=unit)
        run.load_started = self.clock()
        self.progress.loading(run)
        ticker = asyncio.create_task(self._tick(run, config.switch.status_every))
        try:
            error = await self._wait_healthy(model, backend, unit, config, run)
        finally:
            ticker.cancel()
        if error is not None:
            return error
        run.load_seconds = self.clock() - run.load_started
        warmup = config.warmup_of(model)
        if warmup > 0:
            self.progress.phase(run, "warmup", seconds=warmup)
            await asyncio.sleep(warmup)
        await self._measure(run, unit)
        return None

    async def _sleep(self, config: Config, model_id: str, run: SwitchRun) -> bool:
        """Put an evicted model to sleep; False when it would not (it is stopped instead)."""
        model = config.models[model_id]
        spec = config.backend_of(model).sleep
        if spec is None or self.sleeper is None:
            return False
        self.progress.phase(run, "sleeping", model=model_id, unit=config.unit_of(model))
        try:
            await self.sleeper.enter(config.url_of(model), spec, config.switch.stop_timeout)
        except Exception as e:  # the engine's own error, logged; stopping frees the memory all the same
            log.error("sleep_failed", model=model_id, unit=config.unit_of(model), error=str(e),
                      action="stopping the unit instead")
            return False
        run.slept.add(model_id)
        return True

    async def _wake(self, config: Config, model: Model, backend: Backend, unit: str, run: SwitchRun) -> bool:
        """Wake a sleeping target; False when the wake failed (the caller restarts it, cold)."""
        if backend.sleep is None or self.sleeper is None:
            return False
        self.progress.phase(run, "waking", unit=unit)
        run.load_started = self.clock()
        self.progress.loading(run)
        started = self.clock()
        try:
            await self.sleeper.leave(config.url_of(model), backend.sleep, config.load_timeout_of(model))
            healthy = await self.probe(config.url_of(model) + backend.health, 5.0)
            if not healthy:
                raise RuntimeError(f"{config.url_of(model) + backend.health} did not answer 200 after the wake")
        except Exception as e:
            log.error("wake_failed", model=model.id, unit=unit, error=str(e), action="restarting the unit")
            self.progress.phase(run, "stopping", unit=unit, reason="wake_failed")
            await self.systemd.stop(unit, config.switch.stop_timeout + 5)
            run.load_started = None
            return False
        run.woke = True
        run.wake_seconds = run.load_seconds = self.clock() - started
        await self._measure(run, unit)
        return True

    async def _memory_free(self, plan: Plan, config: Config, run: SwitchRun) -> None:
        """After stops and sleeps, wait (bounded) until the GPU shows the room the target needs."""
        assert self.memory is not None and plan.need_gb is not None
        self.progress.phase(run, "freeing", gpu=plan.gpu, need_gb=plan.need_gb)
        timeout = config.residency.memory_free_timeout
        try:
            free = await self.memory.wait_free(plan.gpu, plan.need_gb, timeout)
        except Exception as e:
            log.warning("gpu_memory_unknown", gpu=plan.gpu, error=repr(e))
            return
        if not free:
            log.warning("gpu_memory_not_free", gpu=plan.gpu, need_gb=plan.need_gb, waited=timeout,
                        action="starting anyway")

    async def _measure(self, run: SwitchRun, unit: str) -> None:
        if self.memory is None:
            return
        try:
            run.measured_gb = await self.memory.measure(unit)
        except Exception as e:  # a nicety: never fail a load over it
            log.warning("gpu_measure_failed", unit=unit, error=repr(e))

    async def _tick(self, run: SwitchRun, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            self.progress.loading(run)

    async def _port_in_use(self, model: Model, url: str, unit: str) -> LoadFailure | None:
        """Something else listening on the engine's port would answer its health checks: refuse."""
        if self.port_check is None:
            return None
        try:
            holder = await asyncio.to_thread(self.port_check, url)
        except (OSError, ValueError):  # /proc unreadable or an odd URL: the health checks still run
            return None
        if holder is None:
            return None
        return LoadFailure(model.id, unit, f"cannot start: {holder} (the backend's url is {url}).",
                           "Stop that process, or give the backend another port in config.yml and in the "
                           "model's command.", code="port_in_use")

    async def _rewrite(self, plan: Plan, config: Config, model: Model, run: SwitchRun) -> LoadFailure | None:
        unit = config.unit_of(model)
        self.progress.phase(run, "writing", unit=unit)
        changed = False
        if plan.dropin is not None:
            path = config.systemd.dropin_dir / f"{plan.dropin}.d" / DROPIN_NAME
            try:
                if needs_dropin(model):
                    changed = write_atomic(path, render_dropin(model))
                else:
                    changed = remove_file(path)
            except OSError as e:
                return LoadFailure(model.id, unit, f"cannot write the drop-in {path}: {e.strerror or e}.",
                                   "Check the permissions of systemd.dropin_dir in config.yml.")
        if plan.config_file is not None and model.model_name is not None:
            try:
                text = read_text(plan.config_file)  # refuses a symlink, naming it
                write_atomic(plan.config_file, set_model_name(text, model.model_name))
            except (OSError, ValueError) as e:
                return LoadFailure(model.id, unit, f"cannot set model_name in {plan.config_file}: {e}.",
                                   "Fix the file or its permissions; it was left as it was.")
        check = plan.dropin is not None and model.command is not None
        if not changed and (not check or await self._exec_start_mismatch(unit, model) is None):
            return None  # systemd already runs what the files say: no daemon-reload (about 0.1-0.3 s)
        self.progress.phase(run, "reloading")
        await self.systemd.reload()
        if check and (argv := await self._exec_start_mismatch(unit, model)) is not None:
            return LoadFailure(model.id, unit,
                               f"after the reload systemd would run {quote_argv(argv)} instead of "
                               f"{quote_argv(list(model.command or ()))}.",
                               f"Another drop-in overrides ExecStart=: see `{config.systemctl('cat', unit)}`.")
        return None

    async def _exec_start_mismatch(self, unit: str, model: Model) -> list[list[str]] | None:
        """What systemd would run for the unit, when that is not the model's command; None when it is."""
        argv = await self.systemd.exec_start(unit)
        # systemd keeps "$$" in the parsed argv and turns it into "$" only when it runs the command
        return None if argv == [[arg.replace("$", "$$") for arg in model.command or ()]] else argv

    async def _wait_healthy(self, model: Model, backend: Backend, unit: str, config: Config,
                            run: SwitchRun) -> LoadFailure | None:
        url = config.url_of(model) + backend.health
        timeout = config.load_timeout_of(model)
        deadline = (run.load_started or self.clock()) + timeout
        polls = 0
        while True:
            remaining = deadline - self.clock()
            if remaining <= 0:
                break
            healthy = await self.probe(url, min(2.0, max(remaining, 0.1)))
            state = await self.systemd.state(unit)
            if not state.is_running or state.is_stopping:
                return await self._gone_while_loading(config, model, unit, state)
            if healthy:
                # the unit is still up after its health check passed: the answer came from it, not from
                # something else on its port that it failed to bind beside
                return None
            self.unit_changed.clear()
            # poll fast at first (small engines are up in tens of ms), then every health_interval
            pause = min(config.switch.health_interval, 0.01 * 1.5 ** polls, max(deadline - self.clock(), 0))
            polls += 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.unit_changed.wait(), pause)
        state = await self.systemd.state(unit)
        lines = await journal_tail(state)
        self.progress.phase(run, "stopping", unit=unit, reason="load_timeout")
        await self.systemd.stop(unit, config.switch.stop_timeout + 5)
        return LoadFailure(model.id, unit,
                           f"did not answer {url} with 200 within {timeout:g}s; the unit was stopped.",
                           "If the model needs longer, raise its load_timeout in models.yml; otherwise check "
                           "the backend's url/health in config.yml and its log.", tuple(lines))

    async def _gone_while_loading(self, config: Config, model: Model, unit: str, state: UnitState) -> LoadFailure:
        if state.result == "success":  # ended cleanly while loading: a stop job, not a crash
            lines = await journal_tail(state)
            return LoadFailure(model.id, unit, "was stopped while it loaded, not by the router "
                               f"(`{config.systemctl('stop', unit)}` by someone else, or the engine quit on its "
                               "own with status 0).", "Ask for the model again to load it.", tuple(lines),
                               code="model_load_interrupted", cooldown=False)
        return await self._unit_failure(config, model, unit, f"exited while loading ({describe(state)})",
                                        state, transient=True)

    async def _unit_failure(self, config: Config, model: Model, unit: str, what: str,
                            state: UnitState | None = None, transient: bool = False) -> LoadFailure:
        state = state or await self.systemd.state(unit)
        lines = await journal_tail(state)
        return LoadFailure(model.id, unit, f"{what}.",
                           f"Fix the model's command in models.yml or the backend; `{config.journalctl(unit)}` "
                           "has the whole log.", tuple(lines), transient=transient)


def systemd_failure(config: Config, target: str, unit: str | None, error: SystemdError) -> LoadFailure:
    """A D-Bus call failed: unreachable systemd, or a refusal (permissions, a unit that does not exist)."""
    if isinstance(error, SystemdUnreachable):
        return LoadFailure(target, unit, f"{error}.", "The router reconnects on its own; ask again in a moment.",
                           code="systemd_unreachable", cooldown=False)
    if config.systemd.bus == "system":
        hint = ("Check that the router may manage this unit: it runs as root (or with polkit rights) on the "
                f"system bus, and `{config.systemctl('status', unit or '')}` knows the unit.")
    else:
        hint = (f"Check that the unit exists for the router's user: `{config.systemctl('status', unit or '')}` "
                "(a user unit under ~/.config/systemd/user).")
    return LoadFailure(target, unit, f"systemd did not do what was asked: {error}.", hint)


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
