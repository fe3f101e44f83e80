"""GPU telemetry through NVML (pynvml): per GPU, or "unavailable" with a reason; never an exception.

Every NVML call of the router is in this module. `GpuReader.read()` initialises NVML once and keeps
it; without a driver (or without pynvml) every reading says unavailable with the reason, the log
says so once, and initialisation is retried at most every `retry_every` seconds (a driver loaded
after the router started is picked up). A field the driver does not report is None.

For residency: `budget()` (each GPU's memory from the driver), `unit_memory(pids)` (what a unit's
processes use, per GPU), `unit_pids(cgroup)` (a unit's processes, from its cgroup) and
`wait_memory_free()` (after a stop, until the next engine fits). Without NVML they answer at once:
empty, or "free". 1 GB here is 2**30 bytes, the unit nvidia-smi's MiB figures add up to.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import structlog

log = structlog.get_logger("router.gpu")

GB = 2**30


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
        self._init_reason = ""  # why NVML could not be initialised, the last time it was tried
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

    def process_memory(self, pids: set[int]) -> dict[int, int]:
        """Bytes of GPU memory these processes use, per GPU index; empty without NVML (uncached)."""
        with self._lock:
            nvml = self._init(self._clock())
            if isinstance(nvml, str) or not pids:
                return {}
            try:
                used = {i: _used_by(nvml, nvml.nvmlDeviceGetHandleByIndex(i), pids)
                        for i in range(nvml.nvmlDeviceGetCount())}
            except Exception:  # the driver went away: no figure now, start over next time
                self._shutdown()
                return {}
            return {i: b for i, b in used.items() if b}

    def memory(self, index: int) -> tuple[int, int] | None:
        """(free, total) bytes of GPU `index` now (uncached); None without NVML or without that GPU."""
        with self._lock:
            nvml = self._init(self._clock())
            if isinstance(nvml, str):
                return None
            try:
                if not 0 <= index < nvml.nvmlDeviceGetCount():
                    return None
                info = nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(index))
            except Exception:
                self._shutdown()
                return None
            return int(info.free), int(info.total)

    def _init(self, now: float) -> Any:
        """The initialised pynvml module, or (a str) why there is none; retried every `retry_every` s."""
        if self._nvml is not None:
            return self._nvml
        if self._init_failed_at is not None and now - self._init_failed_at < self.retry_every:
            return self._init_reason
        try:
            import pynvml
        except ImportError:
            self._init_failed_at, self._init_reason = now, "pynvml is not installed"
            return self._init_reason
        try:
            pynvml.nvmlInit()
        except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, …: no GPU on this host
            self._init_failed_at, self._init_reason = now, f"NVML unavailable: {e}"
            return self._init_reason
        self._nvml, self._init_failed_at = pynvml, None
        return pynvml

    def _read(self, now: float) -> GpuSnapshot:
        nvml = self._init(now)
        if isinstance(nvml, str):
            return GpuSnapshot(False, reason=nvml)
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


def _used_by(nvml: Any, handle: Any, pids: set[int]) -> int:
    """Bytes one GPU gives these processes (compute and graphics; a process listed twice counts once)."""
    used: dict[int, int] = {}
    for query in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
        for proc in _optional(functools.partial(query, handle)) or ():
            if proc.pid in pids and proc.usedGpuMemory is not None:  # None: the driver won't say (some VMs)
                used[proc.pid] = max(used.get(proc.pid, 0), int(proc.usedGpuMemory))
    return sum(used.values())


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


def budget(reader: GpuReader | None = None) -> dict[int, float]:
    """Each GPU's total memory in GB, from the driver (config.yml without `gpus:`); empty without NVML."""
    snap = (reader or _reader).read()
    return {g.index: g.memory_total_bytes / GB for g in snap.gpus if g.memory_total_bytes is not None}


def unit_memory(pids: set[int], reader: GpuReader | None = None) -> dict[int, float]:
    """GB of GPU memory these processes (a unit's) use, per GPU index; empty without NVML."""
    return {i: b / GB for i, b in (reader or _reader).process_memory(pids).items()}


@functools.cache
def cgroup2_root(mounts: str = "/proc/self/mounts") -> Path | None:
    """Where the cgroup2 hierarchy is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts)."""
    try:
        with open(mounts, encoding="utf-8") as f:
            rows = [line.split() for line in f]
        points = [row[1] for row in rows if len(row) > 2 and row[2] == "cgroup2"]
    except OSError:
        return None
    for preferred in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if preferred in points:
            return Path(preferred)
    return Path(points[0]) if points else None


def unit_pids(cgroup: str, root: Path | None = None) -> set[int]:
    """Every process in a cgroup2 group and its children; `cgroup` is systemd's ControlGroup ('': none).

    NVML reports host PIDs: in a container with its own PID namespace they won't match these.
    """
    root = root or cgroup2_root()
    if root is None or not cgroup.strip("/"):
        return set()  # no cgroup2, or an inactive unit (no cgroup): never read the whole hierarchy
    pids: set[int] = set()
    for directory, _dirs, files in os.walk(root / cgroup.lstrip("/")):
        if "cgroup.procs" in files:
            try:
                text = (Path(directory) / "cgroup.procs").read_text(encoding="ascii")
            except OSError:  # a child group removed while we walk
                continue
            pids.update(int(word) for word in text.split() if word.isdigit())
    return pids


async def wait_memory_free(gpu_index: int, need_gb: float, timeout: float, poll: float = 0.2,
                           reader: GpuReader | None = None) -> tuple[bool, float | None]:
    """Wait until GPU `gpu_index` has `need_gb` free: (True, free GB), or (False, free GB) after `timeout`.

    Without NVML (or without that GPU) it answers (True, None) at once: nothing to wait for.
    """
    r = reader or _reader
    deadline = time.monotonic() + timeout
    while True:
        mem = await asyncio.to_thread(r.memory, gpu_index)
        if mem is None:
            return True, None
        free_gb = mem[0] / GB
        if free_gb >= need_gb:
            return True, free_gb
        if time.monotonic() >= deadline:
            return False, free_gb
        await asyncio.sleep(poll)
