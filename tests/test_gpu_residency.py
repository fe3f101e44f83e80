"""router/gpu.py's residency helpers with a fake NVML (tests/fake_nvml/pynvml.py): no GPU here."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
from sandbox import FAKE_BACKEND, PYTHON, free_port, wait_until

from router import gpu

pytestmark = pytest.mark.timeout(30)

FAKE_NVML = Path(__file__).resolve().with_name("fake_nvml") / "pynvml.py"


def load_fake_nvml() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("pynvml", FAKE_NVML)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def nvml_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two fake GPUs (80 and 24 GiB) whose per-process memory is read from tmp_path."""
    monkeypatch.setitem(sys.modules, "pynvml", load_fake_nvml())
    monkeypatch.setenv("FAKE_NVML_DIR", str(tmp_path))
    (tmp_path / "gpus.json").write_text(json.dumps([
        {"index": 0, "name": "Fake H100", "total_gb": 80, "base_used_gb": 0.5},
        {"index": 1, "name": "Fake 4090", "total_gb": 24}]))
    return tmp_path


def holds(directory: Path, pid: int, gpu_index: int, gb: float) -> Path:
    path = directory / f"{pid}.json"
    path.write_text(json.dumps({"pid": pid, "gpu": gpu_index, "used_bytes": int(gb * gpu.GB)}))
    return path


def test_budget_from_the_driver(nvml_dir: Path) -> None:
    assert gpu.budget(gpu.GpuReader()) == {0: 80.0, 1: 24.0}


def test_unit_memory_counts_only_the_units_processes(nvml_dir: Path) -> None:
    me, parent = os.getpid(), os.getppid()
    holds(nvml_dir, me, 0, 30)
    holds(nvml_dir, parent, 1, 2)
    reader = gpu.GpuReader()
    assert gpu.unit_memory({me}, reader) == {0: 30.0}
    assert gpu.unit_memory({me, parent, 999_999_999}, reader) == {0: 30.0, 1: 2.0}
    assert gpu.unit_memory(set(), reader) == {}


def test_a_process_listed_twice_counts_once_and_unknown_memory_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = types.ModuleType("pynvml")
    p = types.SimpleNamespace
    nvml.nvmlInit = lambda: None  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetCount = lambda: 1  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetComputeRunningProcesses = lambda h: [  # type: ignore[attr-defined]
        p(pid=7, usedGpuMemory=4 * gpu.GB), p(pid=8, usedGpuMemory=None)]
    nvml.nvmlDeviceGetGraphicsRunningProcesses = lambda h: [p(pid=7, usedGpuMemory=4 * gpu.GB)]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert gpu.unit_memory({7, 8}, gpu.GpuReader()) == {0: 4.0}


def test_the_fake_engine_reports_what_it_holds_awake_and_asleep(nvml_dir: Path) -> None:
    import httpx

    port = free_port()
    proc = subprocess.Popen([PYTHON, FAKE_BACKEND, "--port", str(port), "--vram-gb", "12", "--gpu", "1",
                             "--gpu-memory-dir", str(nvml_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        reader = gpu.GpuReader()
        wait_until(lambda: gpu.unit_memory({proc.pid}, reader) == {1: 12.0}, timeout=10, what="engine's memory")
        wait_until(lambda: httpx.post(f"http://127.0.0.1:{port}/sleep?level=1").status_code == 200, timeout=5)
        assert gpu.unit_memory({proc.pid}, reader) == {}
        assert reader.memory(1) == (24 * gpu.GB, 24 * gpu.GB)
    finally:
        proc.terminate()
        proc.wait(10)


def test_unit_pids_reads_cgroup_procs_recursively(tmp_path: Path) -> None:
    unit = tmp_path / "user.slice" / "app.slice" / "vllm@a.service"
    (unit / "worker").mkdir(parents=True)
    (unit / "cgroup.procs").write_text("101\n102\n")
    (unit / "worker" / "cgroup.procs").write_text("201\n")
    (tmp_path / "cgroup.procs").write_text("1\n")
    assert gpu.unit_pids("/user.slice/app.slice/vllm@a.service", root=tmp_path) == {101, 102, 201}
    assert gpu.unit_pids("", root=tmp_path) == set()  # inactive unit: not the whole hierarchy
    assert gpu.unit_pids("/", root=tmp_path) == set()
    assert gpu.unit_pids("/gone.service", root=tmp_path) == set()


def test_unit_pids_of_this_process() -> None:
    try:
        own = Path("/proc/self/cgroup").read_text().strip().split("\n")[-1].split("::", 1)[1]
    except (OSError, IndexError):
        pytest.skip("no cgroup2 membership to read")
    root = gpu.cgroup2_root()
    if root is None or not own.strip("/") or not (root / own.lstrip("/") / "cgroup.procs").exists():
        pytest.skip("this process is in no cgroup2 group below the root")
    assert os.getpid() in gpu.unit_pids(own)


def test_cgroup2_root_pure_and_hybrid(tmp_path: Path) -> None:
    pure, hybrid, none = tmp_path / "pure", tmp_path / "hybrid", tmp_path / "none"
    pure.write_text("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n")
    hybrid.write_text("tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n")
    none.write_text("proc /proc proc rw 0 0\n")
    assert gpu.cgroup2_root(str(pure)) == Path("/sys/fs/cgroup")
    assert gpu.cgroup2_root(str(hybrid)) == Path("/sys/fs/cgroup/unified")
    assert gpu.cgroup2_root(str(none)) is None


async def test_wait_memory_free_waits_for_the_release(nvml_dir: Path) -> None:
    mem = holds(nvml_dir, os.getpid(), 0, 60)  # a stopped engine's memory, not yet released
    reader = gpu.GpuReader()
    threading.Timer(0.4, mem.unlink).start()
    t0 = time.monotonic()
    ok, free = await gpu.wait_memory_free(0, 50, timeout=5, poll=0.05, reader=reader)
    assert ok and free == 79.5 and 0.3 < time.monotonic() - t0 < 4
    holds(nvml_dir, os.getpid(), 0, 60)
    ok, free = await gpu.wait_memory_free(0, 50, timeout=0.2, poll=0.05, reader=reader)
    assert not ok and free == pytest.approx(19.5)


async def test_without_nvml_everything_answers_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", load_fake_nvml())
    monkeypatch.delenv("FAKE_NVML_DIR", raising=False)  # like a host without a driver
    reader = gpu.GpuReader()
    t0 = time.monotonic()
    assert await gpu.wait_memory_free(0, 50, timeout=30, reader=reader) == (True, None)
    assert gpu.budget(reader) == {} and gpu.unit_memory({os.getpid()}, reader) == {}
    assert reader.memory(0) is None
    assert time.monotonic() - t0 < 2


async def test_a_gpu_that_does_not_exist_is_not_waited_for(nvml_dir: Path) -> None:
    assert await asyncio.wait_for(gpu.wait_memory_free(5, 10, timeout=30, reader=gpu.GpuReader()), 5) == (True, None)
