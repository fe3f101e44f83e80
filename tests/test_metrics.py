"""GET /metrics content: events become counters and histograms; states, queues, units and GPUs are read at scrape."""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

from router.events import ModelState, QueueDepth, RequestEnded, SwitchEnded, SwitchProgress
from router.gpu import GpuReading, GpuSnapshot
from router.metrics import Metrics


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """name + sorted labels -> value, parsed back from the exposition text (what Prometheus sees)."""
    text = m.render()[0].decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: Metrics, metric: str, **labels: str) -> float | None:
    return samples(m).get((metric, tuple(sorted(labels.items()))))


def request(model: str = "qwen", outcome: str = "ok", **kw: object) -> RequestEnded:
    base: dict[str, object] = {"model": model, "endpoint": "/v1/chat/completions", "status": 200, "outcome": outcome,
                               "stream": True, "duration": 2.0, "waited": 0.0}
    return RequestEnded(**{**base, **kw})  # type: ignore[arg-type]


def test_requests_by_model_endpoint_outcome_with_ttft_speed_and_tokens():
    m = Metrics(process=False)
    m.observe(request(ttft=0.3, prompt_tokens=10, completion_tokens=100, tok_per_s=50.0))
    m.observe(request(ttft=0.7, prompt_tokens=5, completion_tokens=20, tok_per_s=40.0))
    m.observe(request(outcome="client_gone", status=499))
    m.observe(request(model="mistral", endpoint="/v1/embeddings", stream=False))
    chat = "/v1/chat/completions"
    assert value(m, "llm_router_requests_total", model="qwen", endpoint=chat, outcome="ok") == 2
    assert value(m, "llm_router_requests_total", model="qwen", endpoint=chat, outcome="client_gone") == 1
    assert value(m, "llm_router_requests_total", model="mistral", endpoint="/v1/embeddings", outcome="ok") == 1
    assert value(m, "llm_router_time_to_first_token_seconds_count", model="qwen") == 2
    assert value(m, "llm_router_time_to_first_token_seconds_sum", model="qwen") == 1.0
    assert value(m, "llm_router_time_to_first_token_seconds_bucket", model="qwen", le="0.5") == 1
    assert value(m, "llm_router_tokens_per_second_sum", model="qwen") == 90.0
    assert value(m, "llm_router_tokens_total", model="qwen", kind="prompt") == 15
    assert value(m, "llm_router_tokens_total", model="qwen", kind="completion") == 120
    assert value(m, "llm_router_request_duration_seconds_count", model="qwen", endpoint=chat) == 3


def test_a_model_id_not_in_the_configuration_is_labelled_other():
    m = Metrics(models=lambda: {"qwen": 1}, process=False)
    for i in range(50):
        m.observe(request(model=f"made-up-{i}", outcome="rejected", status=404))
    m.observe(request(model="qwen"))
    assert value(m, "llm_router_requests_total", model="other", endpoint="/v1/chat/completions",
                 outcome="rejected") == 50
    assert value(m, "llm_router_requests_total", model="qwen", endpoint="/v1/chat/completions", outcome="ok") == 1
    assert not [k for k in samples(m) if "made-up" in str(k)]


def test_switches_by_from_to_outcome_with_durations_and_load_times():
    m = Metrics(process=False)
    m.observe(SwitchProgress(1, "qwen", "loading", 3.0, "⏳ Loading qwen… 3s/180s"))  # not a metric
    m.observe(SwitchEnded(1, None, "qwen", "ok", 12.5, load_seconds=11.0))
    m.observe(SwitchEnded(2, "qwen", "mistral", "failed", 30.0, error="exit 1"))
    m.observe(SwitchEnded(3, "mistral", "qwen", "aborted", 1.0))
    assert value(m, "llm_router_switches_total", **{"from": "none", "to": "qwen", "outcome": "ok"}) == 1
    assert value(m, "llm_router_switches_total", **{"from": "qwen", "to": "mistral", "outcome": "failed"}) == 1
    assert value(m, "llm_router_switch_duration_seconds_sum",
                 **{"from": "qwen", "to": "mistral", "outcome": "failed"}) == 30.0
    assert value(m, "llm_router_switch_duration_seconds_count",
                 **{"from": "mistral", "to": "qwen", "outcome": "aborted"}) == 1
    assert value(m, "llm_router_model_load_seconds_sum", model="qwen") == 11.0
    assert value(m, "llm_router_model_load_seconds_count", model="mistral") is None  # failed: no load time


def test_model_states_loaded_model_and_queues_at_scrape_time():
    clock = Clock()
    m = Metrics(models=lambda: ["qwen", "mistral"], clock=clock, process=False)
    assert value(m, "llm_router_model_state", model="qwen", state="unloaded") == 1
    m.observe(ModelState("qwen", "loading", unit="llamacpp.service"))
    assert value(m, "llm_router_model_state", model="qwen", state="loading") == 1
    assert value(m, "llm_router_model_state", model="qwen", state="unloaded") == 0
    m.observe(ModelState("qwen", "loaded", unit="llamacpp.service"))
    assert value(m, "llm_router_model_loaded", model="qwen") == 1
    assert value(m, "llm_router_model_loaded", model="mistral") == 0
    m.observe(QueueDepth({"mistral": 3}, {"mistral": 4.0}))
    clock.now += 6  # the oldest keeps waiting between events: its wait grows at scrape time
    assert value(m, "llm_router_queue_depth", model="mistral") == 3
    assert value(m, "llm_router_queue_oldest_wait_seconds", model="mistral") == 10.0
    assert value(m, "llm_router_queue_depth", model="qwen") == 0
    m.observe(QueueDepth({}, {}))
    assert value(m, "llm_router_queue_depth", model="mistral") == 0
    assert value(m, "llm_router_queue_oldest_wait_seconds", model="mistral") == 0


def test_unit_states_are_read_from_the_callable_at_each_scrape():
    states = {"llamacpp.service": "active", "vllm.service": "inactive"}
    m = Metrics(unit_states=lambda: states, process=False)
    assert value(m, "llm_router_unit_state", unit="llamacpp.service", state="active") == 1
    assert value(m, "llm_router_unit_state", unit="vllm.service", state="active") == 0
    states["vllm.service"] = "failed"
    assert value(m, "llm_router_unit_state", unit="vllm.service", state="failed") == 1


def test_without_a_gpu_every_gpu_metric_says_unavailable_and_nothing_fails():
    unavailable = GpuSnapshot(False, reason="NVML unavailable: NVML Shared Library Not Found")
    for gpu in (unavailable, None):
        m = Metrics(gpu=lambda g=gpu: g, process=False)  # type: ignore[misc]
        got = samples(m)
        assert got[("llm_router_gpu_available", ())] == 0
        assert not [k for k in got if k[0].startswith("llm_router_gpu_") and k[0] != "llm_router_gpu_available"]


def test_gpu_metrics_per_gpu():
    snap = GpuSnapshot(True, (
        GpuReading(0, "RTX 4090", utilization_percent=42.0, memory_used_bytes=3 * 2**30, memory_total_bytes=24 * 2**30,
                   temperature_celsius=61.0, power_watts=251.5, energy_joules=12.5),
        GpuReading(1, "RTX 3090", memory_used_bytes=0, memory_total_bytes=24 * 2**30)))  # the rest unsupported
    m = Metrics(gpu=lambda: snap, process=False)
    g0 = {"gpu": "0", "name": "RTX 4090"}
    assert value(m, "llm_router_gpu_available") == 1
    assert value(m, "llm_router_gpu_utilization_ratio", **g0) == 0.42
    assert value(m, "llm_router_gpu_memory_used_bytes", **g0) == 3 * 2**30
    assert value(m, "llm_router_gpu_memory_total_bytes", gpu="1", name="RTX 3090") == 24 * 2**30
    assert value(m, "llm_router_gpu_temperature_celsius", **g0) == 61
    assert value(m, "llm_router_gpu_power_watts", **g0) == 251.5
    assert value(m, "llm_router_gpu_energy_joules_total", **g0) == 12.5
    assert value(m, "llm_router_gpu_power_watts", gpu="1", name="RTX 3090") is None


def test_process_metrics_and_content_type():
    body, content_type = Metrics().render()
    assert content_type.startswith("text/plain; version=")
    text = body.decode()
    assert re.search(r"^process_resident_memory_bytes \d", text, re.M)
    assert re.search(r'^llm_router_build_info\{version="[^"]+"\} 1.0$', text, re.M)
