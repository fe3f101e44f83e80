"""GPU telemetry through NVML (pynvml): per GPU, or "unavailable" with a reason; never an exception.

Every NVML call of the router is in this module. `GpuReader.read()` initialises NVML once and keeps
it; without a driver (or without pynvml) every reading says unavailable with the reason, the log
says so once, and initialisation is retried at most every `retry_every` seconds (a driver loaded
after the router started is picked up). A field the driver does not report is None.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any

import structlog

log = structlog.get_logger("router.gpu")


@dataclass(frozen=True)
class GpuReading:
    """One GPU at one moment; None where the driver does not say."""

    index: int
    name: str
    utilization_percent: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None
    energy_joules: float | None = None  # consumed since this router first read the GPU

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("memory_used", "memory_total"):  # /status and `llm-router status` speak MiB
            value = d.pop(f"{key}_bytes")
            d[f"{key}_mib"] = None if value is None else value // 2**20
        return d


@dataclass(frozen=True)
class GpuSnapshot:
    """Every GPU, or why there is no GPU data."""

    available: bool
    gpus: tuple[GpuReading, ...] = ()
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        if not self.available:
            return {"available": False, "reason": self.reason}
        return {"available": True, "gpus": [g.as_dict() for g in self.gpus]}


class GpuReader:
    """Reads NVML, caching a snapshot for `max_age` seconds; thread-safe (reads run in threads)."""

    def __init__(self, max_age: float = 1.0, retry_every: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age = max_age
        self.retry_every = retry_every
        self._clock = clock
        self._lock = threading.Lock()
        self._nvml: ModuleType | None = None  # the initialised pynvml module
        self._last: GpuSnapshot | None = None
        self._last_at = 0.0
        self._init_failed_at: float | None = None
        self._said_unavailable = False
        self._energy_base: dict[int, float] = {}  # GPU index -> driver's mJ at our first reading

    @property
    def last(self) -> GpuSnapshot | None:
        """The latest snapshot read, without reading (for collectors on the event loop)."""
        return self._last

    def read(self) -> GpuSnapshot:
        with self._lock:
            now = self._clock()
            if self._last is not None and now - self._last_at < self.max_age:
                return self._last
            snap = self._read(now)
            self._last, self._last_at = snap, now
            if not snap.available and not self._said_unavailable:
                self._said_unavailable = True
                log.warning(f"GPU telemetry unavailable: {snap.reason}",
                            hint="GPU metrics and events report unavailable; everything else works")
            elif snap.available and self._said_unavailable:
                self._said_unavailable = False
                log.info("GPU telemetry available", gpus=len(snap.gpus))
            return snap

    def close(self) -> None:
        with self._lock:
            self._shutdown()

    def _read(self, now: float) -> GpuSnapshot:
        if self._nvml is None:
            if self._init_failed_at is not None and now - self._init_failed_at < self.retry_every:
                assert self._last is not None
                return self._last
            try:
                import pynvml
            except ImportError:
                self._init_failed_at = now
                return GpuSnapshot(False, reason="pynvml is not installed")
            try:
                pynvml.nvmlInit()
            except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, …: no GPU on this host
                self._init_failed_at = now
                return GpuSnapshot(False, reason=f"NVML unavailable: {e}")
            self._nvml, self._init_failed_at = pynvml, None
        nvml = self._nvml
        try:
            return GpuSnapshot(True, tuple(self._device(nvml, i) for i in range(nvml.nvmlDeviceGetCount())))
        except Exception as e:  # a GPU fell off the bus, the driver went away: start over next time
            self._shutdown()
            return GpuSnapshot(False, reason=f"NVML query failed: {e}")

    def _device(self, nvml: Any, index: int) -> GpuReading:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        name = nvml.nvmlDeviceGetName(handle)
        mem = _optional(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        util = _optional(lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        temp = _optional(lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
        milliwatts = _optional(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
        millijoules = _optional(lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
        energy = None
        if millijoules is not None:
            base = self._energy_base.setdefault(index, float(millijoules))
            energy = max(0.0, (millijoules - base) / 1000.0)
        return GpuReading(
            index=index, name=name.decode() if isinstance(name, bytes) else str(name),
            utilization_percent=None if util is None else float(util),
            memory_used_bytes=None if mem is None else int(mem.used),
            memory_total_bytes=None if mem is None else int(mem.total),
            temperature_celsius=None if temp is None else float(temp),
            power_watts=None if milliwatts is None else milliwatts / 1000.0,
            energy_joules=energy)

    def _shutdown(self) -> None:
        nvml, self._nvml = self._nvml, None
        if nvml is not None:
            try:
                nvml.nvmlShutdown()
            except Exception:  # shutting down a half-initialised NVML: nothing to do
                pass


def _optional(query: Callable[[], Any]) -> Any:
    """A query the driver may not support for this GPU (NVMLError_NotSupported): None then."""
    try:
        return query()
    except Exception as e:
        if type(e).__name__ in ("NVMLError_GpuIsLost", "NVMLError_DriverNotLoaded", "NVMLError_Uninitialized"):
            raise
        return None


_reader = GpuReader()


def reader() -> GpuReader:
    """The process's one reader (NVML is initialised once per process)."""
    return _reader


def snapshot() -> dict[str, Any]:
    """Every GPU's telemetry, or why there is none, as JSON (/status). Never raises."""
    return _reader.read().as_dict()
