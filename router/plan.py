"""Switch plans: which units to stop, what to rewrite and which unit to start (pure, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from router.config import Config


@dataclass(frozen=True)
class Plan:
    """One switch, carried out in order by the switcher: stop, rewrite, reload, start, wait healthy."""

    target: str | None  # the model to load; None = unload everything
    stop: tuple[str, ...] = ()  # units to stop first, in this order
    start: str | None = None  # the unit to start (None: nothing to start)
    dropin: str | None = None  # unit whose router-owned drop-in is (re)written or removed
    config_file: Path | None = None  # backend config file whose model.model_name is rewritten
    adopt: bool = False  # the unit already runs this model: only wait for it to be healthy


def units_to_stop(config: Config, target: str | None, running: set[str]) -> list[str]:
    """Eviction policy: to load `target`, which running units must stop?

    Today one model is on the GPU at a time, so every running managed unit stops, the target's own
    unit included (it is restarted with the new model). Groups and co-resident models will be other
    policies with this signature.
    """
    return [unit for unit in config.managed_units() if unit in running]


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
