"""A fake `pynvml` for a host without a GPU: GPUs and per-process memory come from files.

Put tests/fake_nvml first on PYTHONPATH (or in sys.modules["pynvml"]) and set FAKE_NVML_DIR:
- FAKE_NVML_DIR/gpus.json: [{"index": 0, "name": "...", "total_gb": 80, "base_used_gb": 0.5}, ...]
  (absent: one 80 GiB GPU);
- FAKE_NVML_DIR/<pid>.json: {"pid": N, "gpu": 0, "used_bytes": B}, as tests/fake_backend.py
  --gpu-memory-dir writes it; a file whose process is gone does not count.
Without FAKE_NVML_DIR (or without that directory) nvmlInit fails like a host without a driver.
Only the calls router/gpu.py makes are here; the sensors it treats as optional raise NotSupported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

NVML_TEMPERATURE_GPU = 0
GB = 2**30


class NVMLError(Exception):
    pass


class NVMLError_DriverNotLoaded(NVMLError):  # pynvml's own spelling
    pass


class NVMLError_NotSupported(NVMLError):
    pass


def _dir() -> Path:
    d = os.environ.get("FAKE_NVML_DIR")
    if not d or not Path(d).is_dir():
        raise NVMLError_DriverNotLoaded("Driver Not Loaded (fake NVML: FAKE_NVML_DIR is not a directory)")
    return Path(d)


def _gpus() -> list[dict[str, Any]]:
    path = _dir() / "gpus.json"
    if not path.exists():
        return [{"index": 0, "name": "Fake GPU 80GB", "total_gb": 80}]
    return list(json.loads(path.read_text(encoding="utf-8")))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _processes(index: int) -> list[SimpleNamespace]:
    out = []
    for path in sorted(_dir().glob("*.json")):
        if path.name == "gpus.json":
            continue
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # removed or being replaced right now
            continue
        if entry.get("gpu", 0) == index and _alive(int(entry["pid"])):
            out.append(SimpleNamespace(pid=int(entry["pid"]), usedGpuMemory=int(entry["used_bytes"])))
    return out


def nvmlInit() -> None:
    _dir()


def nvmlShutdown() -> None:
    pass


def nvmlDeviceGetCount() -> int:
    return len(_gpus())


def nvmlDeviceGetHandleByIndex(index: int) -> int:
    if not 0 <= index < len(_gpus()):
        raise NVMLError("Invalid Argument")
    return index


def nvmlDeviceGetName(handle: int) -> str:
    return str(_gpus()[handle].get("name", f"Fake GPU {handle}"))


def nvmlDeviceGetMemoryInfo(handle: int) -> SimpleNamespace:
    gpu = _gpus()[handle]
    total = int(float(gpu.get("total_gb", 80)) * GB)
    used = int(float(gpu.get("base_used_gb", 0)) * GB) + sum(p.usedGpuMemory for p in _processes(handle))
    return SimpleNamespace(total=total, used=min(used, total), free=max(total - used, 0))


def nvmlDeviceGetComputeRunningProcesses(handle: int) -> list[SimpleNamespace]:
    return _processes(handle)


def nvmlDeviceGetGraphicsRunningProcesses(handle: int) -> list[SimpleNamespace]:
    return []


def _not_supported(*_args: Any) -> Any:
    raise NVMLError_NotSupported("Not Supported")


nvmlDeviceGetUtilizationRates = _not_supported
nvmlDeviceGetTemperature = _not_supported
nvmlDeviceGetPowerUsage = _not_supported
nvmlDeviceGetTotalEnergyConsumption = _not_supported
