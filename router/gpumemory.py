"""GPU memory for the executor: wait until a GPU has room, and measure what a unit's processes use (NVML)."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from router import gpu

log = structlog.get_logger("router.gpumemory")


class NvmlMemory:
    """The executor's MemoryProbe on router/gpu.py (all NVML calls live there) and systemd's ControlGroup.

    Without NVML both answer at once: nothing to wait for, nothing measured."""

    def __init__(self, systemd: Any) -> None:
        self.systemd = systemd

    async def wait_free(self, gpu_index: int, need_gb: float, timeout: float) -> bool:
        free, free_gb = await gpu.wait_memory_free(gpu_index, need_gb, timeout)
        if free_gb is not None:
            log.info("gpu_memory_free", gpu=gpu_index, need_gb=need_gb, free_gb=round(free_gb, 2), enough=free)
        return free

    async def measure(self, unit: str) -> float | None:
        """GB the unit's processes hold over all GPUs (None: no NVML, or nothing found)."""
        if not await asyncio.to_thread(gpu.budget):
            return None  # no NVML: not even a D-Bus call
        cgroup = await self.systemd.control_group(unit)
        pids = await asyncio.to_thread(gpu.unit_pids, cgroup)
        if not pids:
            return None
        used = await asyncio.to_thread(gpu.unit_memory, pids)
        return round(sum(used.values()), 2) if used else None
