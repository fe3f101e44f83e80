"""GPU snapshot: real NVML where there is a GPU, a clear "unavailable" everywhere else, never an exception."""

from __future__ import annotations

import sys
import types

import pytest

from router import gpu


def test_this_host_without_a_gpu_reports_unavailable_with_a_reason():
    snap = gpu.snapshot()
    if snap["available"]:
        pytest.skip("this host has a GPU")
    assert snap == {"available": False, "reason": snap["reason"]} and snap["reason"]


def test_missing_pynvml_is_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    assert gpu.snapshot() == {"available": False, "reason": "pynvml is not installed"}


def fake_nvml(init_error: Exception | None = None, query_error: Exception | None = None) -> types.ModuleType:
    m = types.ModuleType("pynvml")
    m.shutdowns = 0  # type: ignore[attr-defined]

    def init() -> None:
        if init_error:
            raise init_error

    def count() -> int:
        if query_error:
            raise query_error
        return 1

    def shutdown() -> None:
        m.shutdowns += 1  # type: ignore[attr-defined]

    m.nvmlInit = init  # type: ignore[attr-defined]
    m.nvmlShutdown = shutdown  # type: ignore[attr-defined]
    m.nvmlDeviceGetCount = count  # type: ignore[attr-defined]
    m.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=3 * 2**30, total=24 * 2**30)  # type: ignore[attr-defined]
    m.nvmlDeviceGetName = lambda h: b"NVIDIA RTX 4090"  # type: ignore[attr-defined]
    m.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=42)  # type: ignore[attr-defined]
    return m


def test_driver_not_loaded_is_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(init_error=RuntimeError("Driver Not Loaded")))
    assert gpu.snapshot() == {"available": False, "reason": "NVML unavailable: Driver Not Loaded"}


def test_a_failing_query_is_unavailable_and_nvml_is_shut_down(monkeypatch):
    nvml = fake_nvml(query_error=RuntimeError("GPU is lost"))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert gpu.snapshot() == {"available": False, "reason": "NVML query failed: GPU is lost"}
    assert nvml.shutdowns == 1  # type: ignore[attr-defined]


def test_a_gpu_is_reported(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    assert gpu.snapshot() == {"available": True, "gpus": [{
        "index": 0, "name": "NVIDIA RTX 4090", "memory_used_mib": 3072, "memory_total_mib": 24576,
        "utilization_percent": 42}]}
