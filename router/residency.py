"""Residency policy: which models leave the GPU, stopped or put to sleep, so another one fits (pure).

`make_room(view, target)` looks at the resident set (loaded and sleeping models), the models with
responses in flight, the memory budgets and what each model needs, and answers with a `Room` (what
to evict, and whether the target is woken or started) or a `NoRoom` (why it can never fit now).

The rules (README, "Residency"):
- A model needs `vram_gb` on its `gpu`, or what was measured after its last load. A model with
  neither is exclusive: it needs the whole GPU. Without a budget for the GPU (config.yml `gpus:`,
  else NVML), every model on it is exclusive, which is the one-model-at-a-time behaviour.
- Every resident model that still fits stays. Otherwise the least recently used idle models leave
  first, then busy ones (the switch waits for their responses to end); never a `persistent` model.
- A plain (non-template) unit runs one model: loading another model on it stops the one it runs.
- `max_loaded` caps the loaded models (sleepers do not count).
- An evicted model whose backend can sleep sleeps instead of stopping, when its host RAM
  (`ram_gb`, else its `vram_gb`) fits the host budget; sleepers that no longer fit are stopped,
  the longest asleep first.
- Running managed units that hold no resident model (a changed definition, a failed load) stop.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass, field
from typing import Literal

from router.config import Config, Model


@dataclass
class Resident:
    """A model whose engine runs: loaded on the GPU, or asleep (its unit runs, its GPU memory is free)."""

    model: str
    state: Literal["loaded", "sleeping"]
    last_used: float  # clock time of its last grant or response end (LRU)
    since: float  # clock time it reached this state


@dataclass(frozen=True)
class View:
    """What the policy decides from: a snapshot of the scheduler's state."""

    config: Config
    resident: Mapping[str, Resident]
    busy: Set[str] = frozenset()  # models with responses in flight
    running: Set[str] = frozenset()  # managed units systemd reports running
    measured: Mapping[str, float] = field(default_factory=dict)  # GB measured after a model's last load
    gpu_budget: Mapping[int, float] = field(default_factory=dict)  # GB per GPU index (config.yml, else NVML)
    host_ram_gb: float | None = None  # budget for sleepers (None: unlimited)


@dataclass(frozen=True)
class Room:
    """Make room for `target`: sleep these models, stop these units, then wake or start it."""

    target: str
    sleep: tuple[str, ...] = ()  # model ids to put to sleep
    stop: tuple[str, ...] = ()  # model ids stopped (evicted, or sharing the target's unit)
    stop_units: tuple[str, ...] = ()  # units to stop, in order (the stopped models' and stray ones)
    blocked_by: tuple[str, ...] = ()  # evicted models with responses in flight: wait for them
    wake: bool = False  # the target sleeps: wake it instead of starting it
    need_gb: float | None = None  # what the target needs on its GPU (None: all of it / unknown)

    @property
    def evicts(self) -> tuple[str, ...]:
        return self.sleep + self.stop


@dataclass(frozen=True)
class NoRoom:
    """The target cannot be loaded while the resident set stays as it is (persistent models, sizes)."""

    target: str
    what: str
    hint: str


def need_gb(view: View, model: Model) -> float | None:
    """GPU memory the model needs: declared, else measured; None: unknown (exclusive)."""
    return model.vram_gb if model.vram_gb is not None else view.measured.get(model.id)


def ram_gb(view: View, model: Model) -> float:
    """Host RAM the model holds while asleep: ram_gb, else its GPU memory, else 0 (unknown)."""
    if model.ram_gb is not None:
        return model.ram_gb
    return need_gb(view, model) or 0.0


def make_room(view: View, target: str) -> Room | NoRoom:
    config = view.config
    model = config.models[target]
    unit = config.unit_of(model)
    resident = {mid: r for mid, r in view.resident.items() if mid in config.models}
    target_state = resident.get(target)
    wake = target_state is not None and target_state.state == "sleeping"

    # a plain unit runs one model: another model on the target's unit must stop
    shared = [mid for mid in resident if mid != target and config.unit_of(config.models[mid]) == unit]
    persistent = [mid for mid in shared if config.models[mid].persistent]
    if persistent:
        return NoRoom(target, f"runs on unit {unit}, which holds the persistent model {persistent[0]}.",
                      f"Unload {persistent[0]} first (POST /models/unload), or give one of them its own unit.")

    loaded = [mid for mid, r in resident.items() if r.state == "loaded" and mid != target and mid not in shared]
    victims: list[str] = []
    budget = view.gpu_budget.get(model.gpu)
    need = need_gb(view, model)
    on_gpu = [mid for mid in loaded if config.models[mid].gpu == model.gpu]
    if budget is None or need is None:  # exclusive: the whole GPU
        blocking = [mid for mid in on_gpu if config.models[mid].persistent]
        if blocking:
            why = ("has no vram_gb (and none was measured yet), so it needs the whole GPU"
                   if budget is not None else "needs the whole GPU (no budget: config.yml has no gpus: and NVML "
                   "is not available)")
            return NoRoom(target, f"{why} {model.gpu}, where the persistent model {blocking[0]} is loaded.",
                          f"Set vram_gb for {target} in models.yml (and gpus: in config.yml), or unload "
                          f"{blocking[0]}.")
        victims = list(on_gpu)
    else:
        if need > budget:
            return NoRoom(target, f"needs {need:g} GB but GPU {model.gpu} has a budget of {budget:g} GB.",
                          "Lower its vram_gb in models.yml or raise the GPU's vram_gb in config.yml.")
        used = {mid: need_gb(view, config.models[mid]) for mid in on_gpu}
        total = sum(budget if gb is None else gb for gb in used.values())
        for mid in _eviction_order(view, on_gpu):
            if total + need <= budget:
                break
            victims.append(mid)
            gb = used[mid]
            total -= budget if gb is None else gb
        if total + need > budget:
            kept = sorted(mid for mid in on_gpu if mid not in victims)
            return NoRoom(target, f"needs {need:g} GB on GPU {model.gpu}; the persistent models there "
                          f"({', '.join(kept)}) leave {max(budget - total, 0):g} of {budget:g} GB.",
                          f"Unload one of them, or lower vram_gb for {target}.")

    max_loaded = config.residency.max_loaded
    if max_loaded is not None:
        kept = [mid for mid in loaded if mid not in victims]
        for mid in _eviction_order(view, kept):
            if len(kept) + 1 <= max_loaded:
                break
            victims.append(mid)
            kept.remove(mid)
        if len(kept) + 1 > max_loaded:
            return NoRoom(target, f"would be model {len(kept) + 1} on the GPU, past residency.max_loaded "
                          f"({max_loaded}), and the others are persistent.",
                          "Raise residency.max_loaded in config.yml, or unload a persistent model.")

    sleep, stop = sleep_or_stop(view, victims, exclude={*shared, target})
    stop += shared
    units = [config.unit_of(config.models[mid]) for mid in stop]
    holding = {config.unit_of(config.models[mid]) for mid in resident}
    # running units with no resident model (the target's own unit among them, if so) restart clean
    strays = [u for u in config.managed_units() if u in view.running and u not in holding and u not in units]
    units += strays
    blocked = [mid for mid in (*sleep, *stop) if mid in view.busy]
    blocked += [mid for mid in sorted(view.busy) if mid in config.models and mid not in blocked
                and config.unit_of(config.models[mid]) in strays]
    return Room(target, tuple(sleep), tuple(stop), tuple(dict.fromkeys(units)), tuple(blocked), wake, need)


def _eviction_order(view: View, models: list[str]) -> list[str]:
    """Evictable models, the best victim first: idle before busy, then least recently used."""
    candidates = [mid for mid in models if not view.config.models[mid].persistent]
    return sorted(candidates, key=lambda mid: (mid in view.busy, view.resident[mid].last_used, mid))


def sleep_or_stop(view: View, victims: list[str], exclude: Set[str] = frozenset()) -> tuple[list[str], list[str]]:
    """Which victims sleep and which stop; sleepers past the host RAM budget stop, the longest asleep
    first. (`exclude`: sleepers that leave anyway, or wake.) Returns (sleep, stop)."""
    config = view.config
    limit = view.host_ram_gb
    resident = view.resident
    sleepers = sorted((mid for mid, r in resident.items()
                       if r.state == "sleeping" and mid in config.models and mid not in exclude),
                      key=lambda mid: (resident[mid].since, mid))
    held = sum(ram_gb(view, config.models[mid]) for mid in sleepers)
    sleep: list[str] = []
    stop: list[str] = []
    for mid in victims:
        model = config.models[mid]
        ram = ram_gb(view, model)
        if config.backend_of(model).sleep is None or (limit is not None and ram > limit):
            stop.append(mid)
            continue
        while limit is not None and held + ram > limit and sleepers:
            oldest = sleepers.pop(0)
            stop.append(oldest)
            held -= ram_gb(view, config.models[oldest])
        if limit is not None and held + ram > limit:
            stop.append(mid)
            continue
        sleep.append(mid)
        held += ram
    return sleep, stop


def expired(view: View, now: float, serving: Set[str]) -> tuple[list[str], list[str], float | None]:
    """TTL: loaded models idle past their ttl, sleepers asleep past residency.sleep_ttl, and the next
    time one will be (None: never). Returns (models to evict, sleepers to stop, next expiry)."""
    config = view.config
    evict: list[str] = []
    stop: list[str] = []
    upcoming: list[float] = []
    for mid, r in view.resident.items():
        model = config.models.get(mid)
        if model is None or mid in serving:
            continue
        if r.state == "loaded":
            ttl = config.ttl_of(model)
            if ttl is None:
                continue
            due = r.last_used + ttl
            if now >= due:
                evict.append(mid)
            else:
                upcoming.append(due)
        else:
            ttl = config.residency.sleep_ttl
            if ttl is None:
                continue
            due = r.since + ttl
            if now >= due:
                stop.append(mid)
            else:
                upcoming.append(due)
    return evict, stop, min(upcoming) if upcoming else None
