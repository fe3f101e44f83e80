"""GPU telemetry: real NVML where there is a GPU, a clear "unavailable" everywhere else, never an exception."""

from __future__ import annotations

import sys
import types

import pytest
import structlog

from router import gpu


def test_this_host_without_a_gpu_reports_unavailable_with_a_reason():
    snap = gpu.snapshot()
    if snap["available"]:
        pytest.skip("this host has a GPU")
    assert snap == {"available": False, "reason": snap["reason"]} and snap["reason"]


def test_missing_pynvml_is_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    assert gpu.GpuReader().read().as_dict() == {"available": False, "reason": "pynvml is not installed"}


class NotSupported(Exception):
    pass


def fake_nvml(init_error: Exception | None = None, query_error: Exception | None = None,
              unsupported: tuple[str, ...] = ()) -> types.ModuleType:
    m = types.ModuleType("pynvml")
    m.shutdowns = 0  # type: ignore[attr-defined]
    m.inits = 0  # type: ignore[attr-defined]
    m.energy_mj = 5_000_000  # type: ignore[attr-defined]

    def init() -> None:
        m.inits += 1  # type: ignore[attr-defined]
        if init_error:
            raise init_error

    def count() -> int:
        if query_error:
            raise query_error
        return 2

    def shutdown() -> None:
        m.shutdowns += 1  # type: ignore[attr-defined]

    def query(name: str, value: object) -> object:
        def call(*_args: object) -> object:
            if name in unsupported:
                raise NotSupported("Not Supported")
            return value() if callable(value) else value
        return call

    m.NVML_TEMPERATURE_GPU = 0  # type: ignore[attr-defined]
    m.nvmlInit = init  # type: ignore[attr-defined]
    m.nvmlShutdown = shutdown  # type: ignore[attr-defined]
    m.nvmlDeviceGetCount = count  # type: ignore[attr-defined]
    m.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    m.nvmlDeviceGetName = lambda h: b"NVIDIA RTX 4090"  # type: ignore[attr-defined]
    m.nvmlDeviceGetMemoryInfo = query("memory", types.SimpleNamespace(  # type: ignore[attr-defined]
        used=3 * 2**30, total=24 * 2**30))
    m.nvmlDeviceGetUtilizationRates = query("util", types.SimpleNamespace(gpu=42))  # type: ignore[attr-defined]
    m.nvmlDeviceGetTemperature = query("temp", 61)  # type: ignore[attr-defined]
    m.nvmlDeviceGetPowerUsage = query("power", 251_500)  # type: ignore[attr-defined]
    m.nvmlDeviceGetTotalEnergyConsumption = query("energy", lambda: m.energy_mj)  # type: ignore[attr-defined]
    return m


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_driver_not_loaded_is_unavailable_logged_once_and_retried_later(monkeypatch):
    nvml = fake_nvml(init_error=RuntimeError("Driver Not Loaded"))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    clock = Clock()
    reader = gpu.GpuReader(max_age=1.0, retry_every=60.0, clock=clock)
    with structlog.testing.capture_logs() as logs:
        for _ in range(5):
            clock.now += 2
            assert reader.read().as_dict() == {"available": False, "reason": "NVML unavailable: Driver Not Loaded"}
    assert [e["event"] for e in logs] == ["GPU telemetry unavailable: NVML unavailable: Driver Not Loaded"]
    assert nvml.inits == 1  # type: ignore[attr-defined]
    clock.now += 60
    reader.read()
    assert nvml.inits == 2  # type: ignore[attr-defined]


def test_a_failing_query_is_unavailable_and_nvml_is_shut_down(monkeypatch):
    nvml = fake_nvml(query_error=RuntimeError("GPU is lost"))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert gpu.GpuReader().read().as_dict() == {"available": False, "reason": "NVML query failed: GPU is lost"}
    assert nvml.shutdowns == 1  # type: ignore[attr-defined]


def test_gpus_are_reported_with_every_field(monkeypatch):
    nvml = fake_nvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    clock = Clock()
    reader = gpu.GpuReader(max_age=1.0, clock=clock)
    first = reader.read()
    assert first.available and len(first.gpus) == 2
    assert first.as_dict()["gpus"][0] == {
        "index": 0, "name": "NVIDIA RTX 4090", "utilization_percent": 42.0, "memory_used_mib": 3072,
        "memory_total_mib": 24576, "temperature_celsius": 61.0, "power_watts": 251.5, "energy_joules": 0.0}
    nvml.energy_mj += 1500  # type: ignore[attr-defined]
    assert reader.read() is first  # cached for max_age
    clock.now += 1.5
    assert reader.read().gpus[1].energy_joules == 1.5  # since the router's first reading
    assert nvml.inits == 1 and nvml.shutdowns == 0  # type: ignore[attr-defined]  # initialised once
    reader.close()
    assert nvml.shutdowns == 1  # type: ignore[attr-defined]


def test_fields_the_driver_does_not_have_are_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(unsupported=("temp", "power", "energy", "util")))
    g = gpu.GpuReader().read().gpus[0]
    assert (g.temperature_celsius, g.power_watts, g.energy_joules, g.utilization_percent) == (None,) * 4
    assert g.memory_total_bytes == 24 * 2**30
