"""GPU snapshot through NVML (pynvml); degrades to {"available": false, "reason": …} without a GPU."""

from __future__ import annotations

from typing import Any


def snapshot() -> dict[str, Any]:
    """Memory and utilisation of each GPU, or why there is no GPU data. Never raises."""
    try:
        import pynvml
    except ImportError:
        return {"available": False, "reason": "pynvml is not installed"}
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, …: no GPU on this host
        return {"available": False, "reason": f"NVML unavailable: {e}"}
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            util = pynvml.nvmlDeviceGetUtilizationRates(handle)
            gpus.append({
                "index": i,
                "name": name.decode() if isinstance(name, bytes) else str(name),
                "memory_used_mib": mem.used // 2**20,
                "memory_total_mib": mem.total // 2**20,
                "utilization_percent": util.gpu,
            })
        return {"available": True, "gpus": gpus}
    except Exception as e:
        return {"available": False, "reason": f"NVML query failed: {e}"}
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # shutting down a half-initialised NVML: nothing to do
            pass
