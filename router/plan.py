"""Switch plans: which models sleep, which units stop, what to rewrite and what starts or wakes (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from router.config import Config
from router.residency import Room


@dataclass(frozen=True)
class Plan:
    """One switch, carried out in order by the executor: sleep, stop, wait for the memory, then wake the
    target, or rewrite, reload, start it and wait until it is healthy."""

    target: str | None  # the model to load; None: only evict (an unload, a ttl, orphans)
    stop: tuple[str, ...] = ()  # units to stop first, in this order
    start: str | None = None  # the unit to start (None: nothing to start)
    dropin: str | None = None  # unit whose router-owned drop-in is (re)written or removed
    config_file: Path | None = None  # backend config file whose model.model_name is rewritten
    adopt: bool = False  # the unit already runs this model: only wait for it to be healthy
    sleep: tuple[str, ...] = ()  # models put to sleep before anything stops (their units keep running)
    evicts: tuple[str, ...] = ()  # every model that leaves the GPU (slept or stopped): not served meanwhile
    wake: bool = False  # the target sleeps: wake it (a failed wake falls back to a restart)
    need_gb: float | None = None  # memory the target needs on its GPU: waited for after the stops
    gpu: int = 0
    reason: str = "load"  # load, unload, ttl, orphans, adopt, preload (logs and events)


def units_to_stop(config: Config, target: str | None, running: set[str]) -> list[str]:
    """Eviction policy: to load `target`, which running units must stop?

    Today one model is on the GPU at a time, so every running managed unit stops, the target's own
    unit included (it is restarted with the new model). Groups and co-resident models will be other
    policies with this signature.
    """
    return [unit for unit in config.managed_units() if unit in running]


def plan_room(config: Config, room: Room, reason: str = "load") -> Plan:
    """The plan that carries out the residency policy's decision for `room.target`."""
    model = config.models[room.target]
    unit = config.unit_of(model)
    backend = config.backend_of(model)
    return Plan(target=room.target, stop=room.stop_units, start=unit, dropin=None if model.unit else unit,
                config_file=backend.config_file if model.model_name is not None else None,
                sleep=room.sleep, evicts=room.evicts, wake=room.wake, need_gb=room.need_gb, gpu=model.gpu,
                reason=reason)


def plan_evict(config: Config, sleep: list[str], stop: list[str], reason: str) -> Plan:
    """Models leave the GPU with nothing loaded after: an unload, or ttls that ran out."""
    units = [config.unit_of(config.models[mid]) for mid in stop]
    return Plan(target=None, stop=tuple(dict.fromkeys(units)), sleep=tuple(sleep), evicts=tuple(sleep + stop),
                reason=reason)


def make_plan(config: Config, target: str | None, running: set[str], adopt: bool = False) -> Plan:
    if target is None:
        return Plan(target=None, stop=tuple(units_to_stop(config, None, running)))
    model = config.models[target]
    unit = config.unit_of(model)
    if adopt:
        return Plan(target=target, adopt=True)
    backend = config.backend_of(model)
    return Plan(
        target=target,
        stop=tuple(units_to_stop(config, target, running)),
        start=unit,
        dropin=None if model.unit else unit,
        config_file=backend.config_file if model.model_name is not None else None,
    )
