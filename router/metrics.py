"""Prometheus metrics (GET /metrics): an EventBus observer plus collectors read at scrape time.

Events (router/events.py) update counters and histograms as they happen; the observer does a few
dictionary look-ups and counter/histogram updates per request and nothing else (it runs on the
relay's hot path). What is a state rather than a history — model states, queues, units, GPUs — is
read when Prometheus scrapes. Metric names are listed in the README (Observability).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from router import __version__
from router.events import Event, ModelState, QueueDepth, RequestEnded, SwitchEnded
from router.gpu import GpuSnapshot

MODEL_STATES = ("loading", "loaded", "failed", "unloaded", "sleeping")
UNIT_STATES = ("active", "activating", "deactivating", "reloading", "inactive", "failed", "maintenance")
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TOKS_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0, 500.0, 1000.0)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
SWITCH_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0)
NONE = "none"  # the label value for "no model" (a first load's from, an unload's to)
OTHER = "other"  # the label value for a model id that is not in the configuration


class Metrics:
    """The router's metrics registry; subscribe `observe` to the switcher's EventBus."""

    def __init__(self, models: Callable[[], Collection[str]] | None = None,
                 unit_states: Callable[[], Mapping[str, str]] = dict,
                 gpu: Callable[[], GpuSnapshot | None] = lambda: None,
                 events: Callable[[], tuple[int, int]] | None = None,
                 clock: Callable[[], float] = time.monotonic, process: bool = True) -> None:
        self.registry = r = CollectorRegistry(auto_describe=False)
        self._clock = clock
        self.requests = Counter("llm_router_requests", "Relayed requests by model, endpoint and outcome.",
                                ["model", "endpoint", "outcome"], registry=r)
        self.request_duration = Histogram("llm_router_request_duration_seconds",
                                          "Relayed requests, from arrival to their last byte.",
                                          ["model", "endpoint"], buckets=DURATION_BUCKETS, registry=r)
        self.ttft = Histogram("llm_router_time_to_first_token_seconds",
                              "From a request's arrival to the engine's first content (waiting for a load included).",
                              ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.tok_per_s = Histogram("llm_router_tokens_per_second", "Generation speed of each completed answer.",
                                   ["model"], buckets=TOKS_BUCKETS, registry=r)
        self.tokens = Counter("llm_router_tokens", "Tokens the engines read (prompt) and wrote (completion).",
                              ["model", "kind"], registry=r)
        self.switches = Counter("llm_router_switches", "Model switches by previous model, target and outcome.",
                                ["from", "to", "outcome"], registry=r)
        self.switch_duration = Histogram("llm_router_switch_duration_seconds",
                                         "How long switches took, from their start to their end.",
                                         ["from", "to", "outcome"], buckets=SWITCH_BUCKETS, registry=r)
        self.load_duration = Histogram("llm_router_model_load_seconds",
                                       "From a model's unit start to its engine answering healthy.",
                                       ["model"], buckets=SWITCH_BUCKETS, registry=r)
        self._models = models  # the configured ids: other names are labelled "other" (bounded series)
        self._state = _StateCollector(models or tuple, unit_states, gpu, clock)
        r.register(self._state)
        if events is not None:
            r.register(_EventsCollector(events))
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        # label children cached by label values: .labels() validates its arguments on every call
        self._request_children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self._model_children: dict[str, tuple[Any, Any, Any, Any]] = {}

    # --- the observer (hot path) ---------------------------------------------------------------

    def observe(self, event: Event) -> None:
        if isinstance(event, RequestEnded):
            self._request(event)
        elif isinstance(event, ModelState):
            self._state.model_states[event.model] = event.state
        elif isinstance(event, QueueDepth):
            now = self._clock()
            self._state.queues = {m: (n, now - event.oldest_wait.get(m, 0.0)) for m, n in event.waiting.items()}
        elif isinstance(event, SwitchEnded):
            labels = (event.from_model or NONE, event.target or NONE, event.outcome)
            self.switches.labels(*labels).inc()
            self.switch_duration.labels(*labels).observe(event.duration)
            if event.load_seconds is not None and event.target and event.outcome == "ok":
                self.load_duration.labels(event.target).observe(event.load_seconds)

    def _request(self, e: RequestEnded) -> None:
        model = e.model if self._models is None or e.model in self._models() else OTHER
        key = (model, e.endpoint, e.outcome)
        pair = self._request_children.get(key)
        if pair is None:
            pair = self._request_children[key] = (self.requests.labels(*key),
                                                  self.request_duration.labels(model, e.endpoint))
        pair[0].inc()
        pair[1].observe(e.duration)
        per_model = self._model_children.get(model)
        if per_model is None:
            per_model = self._model_children[model] = (
                self.ttft.labels(model), self.tok_per_s.labels(model),
                self.tokens.labels(model, "prompt"), self.tokens.labels(model, "completion"))
        if e.ttft is not None:
            per_model[0].observe(e.ttft)
        if e.tok_per_s is not None:
            per_model[1].observe(e.tok_per_s)
        if e.prompt_tokens:
            per_model[2].inc(e.prompt_tokens)
        if e.completion_tokens:
            per_model[3].inc(e.completion_tokens)

    # --- scrape --------------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _StateCollector(Collector):
    """What the router is now: models, queues, units, GPUs; read at every scrape."""

    def __init__(self, models: Callable[[], Iterable[str]], unit_states: Callable[[], Mapping[str, str]],
                 gpu: Callable[[], GpuSnapshot | None], clock: Callable[[], float]) -> None:
        self.models = models
        self.unit_states = unit_states
        self.gpu = gpu
        self.clock = clock
        self.model_states: dict[str, str] = {}
        self.queues: dict[str, tuple[int, float]] = {}  # model -> (waiting, oldest waiting since)

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("llm_router_build_info", "The router's version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        models = list(dict.fromkeys([*self.models(), *self.model_states, *self.queues]))
        state = GaugeMetricFamily("llm_router_model_state", "1 for each model's current state, 0 for the others.",
                                  labels=["model", "state"])
        loaded = GaugeMetricFamily("llm_router_model_loaded", "1 for the loaded model(s).", labels=["model"])
        depth = GaugeMetricFamily("llm_router_queue_depth", "Requests waiting for a model.", labels=["model"])
        oldest = GaugeMetricFamily("llm_router_queue_oldest_wait_seconds",
                                   "How long the oldest request waiting for a model has waited.", labels=["model"])
        now = self.clock()
        for model in models:
            current = self.model_states.get(model, "unloaded")
            for name in MODEL_STATES:
                state.add_metric([model, name], 1.0 if name == current else 0.0)
            loaded.add_metric([model], 1.0 if current == "loaded" else 0.0)
            waiting, since = self.queues.get(model, (0, now))
            depth.add_metric([model], waiting)
            oldest.add_metric([model], max(0.0, now - since) if waiting else 0.0)
        yield from (state, loaded, depth, oldest)
        yield self._units()
        yield from self._gpus()

    def _units(self) -> Metric:
        units = GaugeMetricFamily("llm_router_unit_state", "1 for each managed unit's ActiveState, 0 for the others.",
                                  labels=["unit", "state"])
        for unit, current in self.unit_states().items():
            names = UNIT_STATES if current in UNIT_STATES else (*UNIT_STATES, current)
            for name in names:
                units.add_metric([unit, name], 1.0 if name == current else 0.0)
        return units

    def _gpus(self) -> Iterator[Metric]:
        snap = self.gpu()
        available = GaugeMetricFamily("llm_router_gpu_available",
                                      "1 when GPU telemetry (NVML) works, 0 when unavailable.")
        available.add_metric([], 1.0 if snap is not None and snap.available else 0.0)
        yield available
        if snap is None or not snap.available:
            return
        labels = ["gpu", "name"]
        fields: list[tuple[str, str, str, float]] = [
            ("utilization_percent", "llm_router_gpu_utilization_ratio", "GPU busy time, 0 to 1.", 0.01),
            ("memory_used_bytes", "llm_router_gpu_memory_used_bytes", "GPU memory in use.", 1.0),
            ("memory_total_bytes", "llm_router_gpu_memory_total_bytes", "GPU memory in all.", 1.0),
            ("temperature_celsius", "llm_router_gpu_temperature_celsius", "GPU core temperature.", 1.0),
            ("power_watts", "llm_router_gpu_power_watts", "GPU power draw.", 1.0)]
        for attr, name, doc, scale in fields:
            family = GaugeMetricFamily(name, doc, labels=labels)
            for g in snap.gpus:
                value = getattr(g, attr)
                if value is not None:
                    family.add_metric([str(g.index), g.name], value * scale)
            yield family
        energy = CounterMetricFamily("llm_router_gpu_energy_joules", "GPU energy used since the router started.",
                                     labels=labels)
        for g in snap.gpus:
            if g.energy_joules is not None:
                energy.add_metric([str(g.index), g.name], g.energy_joules)
        yield energy


class _EventsCollector(Collector):
    """/events listeners and what slow ones lost: `events()` gives (clients, dropped in all)."""

    def __init__(self, events: Callable[[], tuple[int, int]]) -> None:
        self.events = events

    def collect(self) -> Iterator[Metric]:
        clients, dropped = self.events()
        yield GaugeMetricFamily("llm_router_events_clients", "Clients connected to GET /events.", value=clients)
        yield CounterMetricFamily("llm_router_events_dropped", "Events /events clients lost by reading too slowly.",
                                  value=dropped)
