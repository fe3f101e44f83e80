"""The plan executor's residency steps with fakes: sleep before stop, wait for GPU memory before a start,
measure a loaded unit, wake a sleeper, and restart one whose wake failed."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from test_switcher import FakeSystemd, answer, healthy

from router.config import SLEEP_KINDS, Backend, Config, Gpu, Model, Residency, SwitchSettings
from router.gpumemory import NvmlMemory
from router.switcher import Granted, Switcher

pytestmark = pytest.mark.timeout(20)


class Recorder:
    """A fake MemoryProbe and SleepDriver that write down what happened, in order, with the units' state."""

    def __init__(self, systemd: FakeSystemd, fail_wake: bool = False) -> None:
        self.systemd = systemd
        self.log: list[str] = []
        self.fail_wake = fail_wake

    async def wait_free(self, gpu: int, need_gb: float, timeout: float) -> bool:
        self.log.append(f"wait_free {need_gb:g} running={sorted(self.systemd.active)}")
        return True

    async def measure(self, unit: str) -> float | None:
        self.log.append(f"measure {unit}")
        return 33.5

    async def enter(self, url: str, spec: Any, timeout: float) -> None:
        self.log.append(f"sleep {url}")

    async def leave(self, url: str, spec: Any, timeout: float) -> None:
        self.log.append(f"wake {url}")
        if self.fail_wake:
            raise RuntimeError("POST /wake_up answered 500: CUDA out of memory")

    async def is_sleeping(self, url: str, spec: Any, timeout: float) -> bool | None:
        return False


def make_config(tmp_path: Path, sleep: bool = False) -> Config:
    backends = {"tpl": Backend("tpl", "eng@.service", "http://127.0.0.1:{port}",
                               sleep=SLEEP_KINDS["vllm"] if sleep else None)}
    models = {m: Model(m, "tpl", command=(f"/bin/{m}",), port=port, vram_gb=60)
              for m, port in (("a", 9101), ("b", 9102))}
    return Config(config_dir=tmp_path, backends=backends, models=models, gpus=(Gpu(0, 100),),
                  residency=Residency(host_ram_gb=200), switch=SwitchSettings(linger=0, health_interval=0.01))


class TemplateSystemd(FakeSystemd):
    async def exec_start(self, name: str) -> list[list[str]]:
        return [[f"/bin/{name.split('@')[1].split('.')[0]}"]]  # what the drop-in says: eng@a.service runs /bin/a


async def started(config: Config, fail_wake: bool = False) -> tuple[Switcher, FakeSystemd, Recorder]:
    systemd = TemplateSystemd()
    rec = Recorder(systemd, fail_wake)
    sw = Switcher(config, systemd, healthy, memory=rec, sleeper=rec)
    await sw.start()
    return sw, systemd, rec


async def test_memory_is_waited_for_after_the_stop_and_the_load_is_measured(tmp_path: Path) -> None:
    sw, systemd, rec = await started(make_config(tmp_path))
    try:
        assert isinstance(await answer(sw, "a"), Granted)
        assert isinstance(await answer(sw, "b"), Granted)  # 60 + 60 > 100: a stops first
        assert rec.log == ["measure eng@a.service", "wait_free 60 running=[]", "measure eng@b.service"]
        assert sw.scheduler.measured == {"a": 33.5, "b": 33.5}
        assert systemd.active == {"eng@b.service"}
    finally:
        await sw.close()


async def test_switching_away_sleeps_and_back_wakes_without_a_start(tmp_path: Path) -> None:
    sw, systemd, rec = await started(make_config(tmp_path, sleep=True))
    try:
        assert isinstance(await answer(sw, "a"), Granted)
        assert isinstance(await answer(sw, "b"), Granted)
        assert sw.model_state("a") == "sleeping" and systemd.active == {"eng@a.service", "eng@b.service"}
        assert isinstance(await answer(sw, "a"), Granted)
        assert systemd.starts == ["eng@a.service", "eng@b.service"]  # the wake started nothing
        assert "wake http://127.0.0.1:9101" in rec.log
        assert sw.model_state("a") == "loaded" and sw.model_state("b") == "sleeping"
        assert sw.last_switch is not None and sw.last_switch["woke"] is True
    finally:
        await sw.close()


async def test_a_failed_wake_restarts_the_unit(tmp_path: Path) -> None:
    sw, systemd, _rec = await started(make_config(tmp_path, sleep=True), fail_wake=True)
    try:
        assert isinstance(await answer(sw, "a"), Granted)
        assert isinstance(await answer(sw, "b"), Granted)
        assert isinstance(await answer(sw, "a"), Granted)
        assert systemd.starts == ["eng@a.service", "eng@b.service", "eng@a.service"]  # restarted cold
        assert sw.model_state("a") == "loaded"
    finally:
        await sw.close()


async def test_nvml_memory_without_a_gpu_answers_at_once_and_asks_systemd_nothing() -> None:
    class NoBus:
        async def control_group(self, unit: str) -> str:
            raise AssertionError("no D-Bus call without NVML")

    memory = NvmlMemory(NoBus())
    assert await asyncio.wait_for(memory.wait_free(0, 80, 30), 2) is True
    assert await memory.measure("x.service") is None
