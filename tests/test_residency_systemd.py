"""Residency on a real systemd user manager with the fake engine: template instances, the memory
budget, eviction, ttl, preload, names, and sleeping engines (issue 10's integration tests).

The first tests drive the engine pieces alone (router/sleep.py, router/gpu.py's cgroup and NVML
helpers with the fake NVML); the rest go through a running router. Figures: the switch time of a
cold start and of a wake, and the router's own share of each (the total minus what the engine says
its start, load, sleep and wake took, from the fake's /fake/state).
"""

from __future__ import annotations

import functools
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sandbox import (
    FAKE_BACKEND,
    PYTHON,
    RouterHandle,
    Sandbox,
    Units,
    chat_body,
    fake_argv,
    free_port,
    print_figures,
    stream_request,
    wait_until,
)

from router import gpu, sleep
from router.config import SLEEP_KINDS, instance_name
from router.systemd import Systemd

pytestmark = pytest.mark.timeout(120)

Router = Callable[..., RouterHandle]
FAKE_NVML_DIR = Path(__file__).resolve().with_name("fake_nvml")
VLLM = SLEEP_KINDS["vllm"]


# --- helpers -------------------------------------------------------------------------------------


def template(units: Units, tag: str, *args: str) -> str:
    """A template unit running the fake engine; an instance named by a port listens there."""
    name = units.name(tag).removesuffix(".service") + "@.service"
    argv = " ".join([PYTHON, FAKE_BACKEND, "--port", "%i", "--model-id", "instance-%i", *args])
    units.write(name, (
        "[Unit]\n"
        f"Description=llm-router test engine %i ({tag})\n"
        "StartLimitIntervalSec=0\n"
        "[Service]\n"
        "Type=exec\n"
        f"ExecStart={argv}\n"
        "Environment=PYTHONUNBUFFERED=1\n"
        "TimeoutStopSec=5\n"))
    return name


def instance(units: Units, tmpl: str, name: str) -> str:
    """The instance unit of `tmpl` for `name` (a model id or a port), cleaned up with the test's units."""
    unit = tmpl.removesuffix("@.service") + "@" + instance_name(name) + ".service"
    if unit not in units.names:
        units.names.append(unit)
    return unit


class Engines:
    """Models on one template backend, each its own instance on its own port."""

    def __init__(self, units: Units, tag: str = "eng", sleep_kind: str | None = None) -> None:
        self.units = units
        self.template = template(units, tag)
        self.ports: dict[str, int] = {}
        self.sleep_kind = sleep_kind

    def backend(self) -> dict[str, Any]:
        b: dict[str, Any] = {"unit": self.template, "url": "http://127.0.0.1:{port}", "health": "/health"}
        if self.sleep_kind:
            b["sleep"] = self.sleep_kind
        return b

    def model(self, mid: str, *args: str, backend: str = "tpl", **extra: Any) -> dict[str, Any]:
        port = self.ports.setdefault(mid, free_port())
        return {"backend": backend, "port": port, "command": fake_argv(port, mid, *args), **extra}

    def unit(self, mid: str) -> str:
        return instance(self.units, self.template, mid)

    def url(self, mid: str) -> str:
        return f"http://127.0.0.1:{self.ports[mid]}"

    def state(self, mid: str) -> dict[str, Any]:
        return dict(httpx.get(self.url(mid) + "/fake/state", timeout=5).json())


def answer(c: httpx.Client, model: str, path: str = "/v1/chat/completions") -> str:
    body: dict[str, Any] = chat_body(model) if "chat" in path else {"model": model, "input": "hello"}
    r = c.post(path, json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    return str(data["choices"][0]["message"]["content"]) if "chat" in path else str(data["model"])


def invocation(sandbox: Sandbox, unit: str) -> str:
    return sandbox.unit_state(unit)["InvocationID"]


def model_states(rt: RouterHandle) -> dict[str, str]:
    return {mid: str(m.get("state")) for mid, m in rt.models().items()}


@pytest.fixture
def fake_nvml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fake NVML for this process and for routers started now (PYTHONPATH, FAKE_NVML_DIR): one GPU
    of 100 GiB whose per-process memory is what the fake engines write with --gpu-memory-dir."""
    d = tmp_path / "nvml"
    d.mkdir()
    (d / "gpus.json").write_text('[{"index": 0, "name": "Fake GPU 100GB", "total_gb": 100}]')
    monkeypatch.setenv("FAKE_NVML_DIR", str(d))
    monkeypatch.setenv("PYTHONPATH", f"{FAKE_NVML_DIR}:{Path(__file__).resolve().parent.parent}")
    import importlib.util

    spec = importlib.util.spec_from_file_location("pynvml", FAKE_NVML_DIR / "pynvml.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    yield d



# --- the engine pieces alone ---------------------------------------------------------------------


async def test_sleep_keeps_the_unit_and_frees_its_gpu_memory(sandbox: Sandbox, units: Units,
                                                             fake_nvml: Path) -> None:
    """router/sleep.py on a template instance: the unit stays active with the same InvocationID while
    the engine sleeps; NVML (fake) finds the unit's processes through its cgroup and sees the memory go."""
    tmpl = template(units, "sleepy", "--vram-gb", "40", "--gpu-memory-dir", str(fake_nvml), "--wake-time", "0.2")
    port = free_port()
    unit = instance(units, tmpl, str(port))
    url = f"http://127.0.0.1:{port}"
    sandbox.start_unit(unit)
    wait_until(lambda: _healthy(url), timeout=20, what="engine healthy")
    before = sandbox.unit_state(unit)
    sd = Systemd(sandbox.outside_bus, lambda: set())
    await sd.open()
    try:
        cgroup = await sd.control_group(unit)
    finally:
        await sd.close()
    assert cgroup.endswith(f"/{unit}"), cgroup
    pids = gpu.unit_pids(cgroup)
    assert int(before["MainPID"]) in pids
    reader = gpu.GpuReader()
    assert gpu.unit_memory(pids, reader) == {0: 40.0}

    await sleep.enter(url, VLLM, 10)
    assert await sleep.is_sleeping(url, VLLM, 5) is True
    assert gpu.unit_memory(pids, reader) == {}
    ok, free = await gpu.wait_memory_free(0, 90, timeout=5, poll=0.05, reader=reader)
    assert ok and free == 100.0
    r = httpx.post(url + "/v1/chat/completions", json=chat_body("x"))
    assert r.status_code == 503 and "sleeping" in r.json()["error"]["message"]

    await sleep.leave(url, VLLM, 10)
    assert gpu.unit_memory(pids, reader) == {0: 40.0}
    after = sandbox.unit_state(unit)
    assert (after["ActiveState"], after["InvocationID"], after["MainPID"]) == (
        "active", before["InvocationID"], before["MainPID"])
    assert httpx.post(url + "/v1/chat/completions", json=chat_body("x")).status_code == 200


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


# --- through the router --------------------------------------------------------------------------


def test_persistent_embedding_model_answers_through_ten_chat_switches(sandbox: Sandbox, units: Units,
                                                                     router: Router) -> None:
    eng = Engines(units, "emb")
    chat = units.fake("chat")
    rt = router({"tpl": eng.backend(), "chat": chat.backend()}, {
        "emb": eng.model("emb", vram_gb=10, persistent=True),
        "c1": {"backend": "chat", "command": chat.command("c1"), "vram_gb": 40},
        "c2": {"backend": "chat", "command": chat.command("c2"), "vram_gb": 40},
    }, gpus=[{"index": 0, "vram_gb": 100}])
    with rt.client() as c:
        assert answer(c, "emb", "/v1/embeddings") == "emb"
    emb_unit = eng.unit("emb")
    inv = invocation(sandbox, emb_unit)
    stop = threading.Event()
    results: list[int] = []

    def embed_all_along() -> None:
        with httpx.Client(base_url=rt.url, timeout=30) as c:
            while not stop.is_set():
                results.append(c.post("/v1/embeddings", json={"model": "emb", "input": "x"}).status_code)
                time.sleep(0.02)

    t = threading.Thread(target=embed_all_along)
    t.start()
    try:
        with rt.client() as c:
            for i in range(10):
                mid = ("c1", "c2")[i % 2]
                assert answer(c, mid).startswith(f"I am {mid}.")
    finally:
        stop.set()
        t.join(30)
    assert results and set(results) == {200}, results
    assert invocation(sandbox, emb_unit) == inv
    assert sandbox.active_state(emb_unit) == "active"


def test_three_40gb_models_on_100gb_evict_the_least_recently_used(sandbox: Sandbox, units: Units,
                                                                 router: Router) -> None:
    eng = Engines(units, "lru")
    rt = router({"tpl": eng.backend()}, {mid: eng.model(mid, vram_gb=40) for mid in ("a", "b", "c")},
                gpus=[{"index": 0, "vram_gb": 100}])
    with rt.client() as c:
        for mid in ("a", "b", "a"):  # a is now more recently used than b
            assert answer(c, mid).startswith(f"I am {mid}.")
        inv_a = invocation(sandbox, eng.unit("a"))
        assert answer(c, "c").startswith("I am c.")
    assert sandbox.active_state(eng.unit("b")) == "inactive"
    assert sandbox.active_state(eng.unit("a")) == "active" and invocation(sandbox, eng.unit("a")) == inv_a
    assert sandbox.active_state(eng.unit("c")) == "active"
    states = model_states(rt)
    assert (states["a"], states["b"], states["c"]) == ("loaded", "unloaded", "loaded"), states


def test_a_model_without_vram_gb_stops_everything_else(sandbox: Sandbox, units: Units, router: Router) -> None:
    eng = Engines(units, "excl")
    rt = router({"tpl": eng.backend()}, {"a": eng.model("a", vram_gb=40), "b": eng.model("b", vram_gb=40),
                                         "big": eng.model("big")}, gpus=[{"index": 0, "vram_gb": 100}])
    with rt.client() as c:
        for mid in ("a", "b", "big"):
            assert answer(c, mid).startswith(f"I am {mid}.")
    assert [sandbox.active_state(eng.unit(m)) for m in ("a", "b", "big")] == ["inactive", "inactive", "active"]


def test_ttl_unloads_an_idle_model(sandbox: Sandbox, units: Units, router: Router) -> None:
    eng = Engines(units, "ttl")
    rt = router({"tpl": eng.backend()}, {"brief": eng.model("brief", vram_gb=10, ttl=1),
                                         "kept": eng.model("kept", vram_gb=10)}, gpus=[{"index": 0, "vram_gb": 100}])
    with rt.client() as c:
        assert answer(c, "brief").startswith("I am brief.")
        assert answer(c, "kept").startswith("I am kept.")
    sandbox.wait_state(eng.unit("brief"), "inactive", timeout=15)
    time.sleep(0.5)
    assert sandbox.active_state(eng.unit("kept")) == "active"  # no ttl, no default_ttl: stays
    assert model_states(rt)["brief"] == "unloaded"


def test_preload_at_start(sandbox: Sandbox, units: Units, router: Router) -> None:
    eng = Engines(units, "pre")
    router({"tpl": eng.backend()}, {m: eng.model(m, vram_gb=10) for m in ("p1", "p2", "lazy")},
           gpus=[{"index": 0, "vram_gb": 100}], preload=["p1", "p2"])
    for m in ("p1", "p2"):
        sandbox.wait_state(eng.unit(m), "active", timeout=20)
        wait_until(functools.partial(_healthy, eng.url(m)), timeout=20, what=f"{m} healthy")
    assert sandbox.active_state(eng.unit("lazy")) == "inactive"


def test_aliases_and_unlisted(sandbox: Sandbox, units: Units, router: Router) -> None:
    eng = Engines(units, "names")
    rt = router({"tpl": eng.backend()}, {
        "named": eng.model("named", vram_gb=10, aliases=["nick", "gpt-4o"]),
        "hidden": eng.model("hidden", vram_gb=10, unlisted=True),
    }, gpus=[{"index": 0, "vram_gb": 100}])
    assert set(rt.models()) == {"named"}  # listed under its id; the unlisted one not at all
    with rt.client() as c:
        for name in ("nick", "gpt-4o", "named"):
            assert answer(c, name).startswith("I am named.")
        assert answer(c, "hidden").startswith("I am hidden.")
    assert sandbox.active_state(eng.unit("named")) == "active"
    assert sandbox.active_state(eng.unit("hidden")) == "active"


def test_switching_away_sleeps_and_back_wakes(sandbox: Sandbox, units: Units, router: Router) -> None:
    eng = Engines(units, "slp", sleep_kind="vllm")
    rt = router({"tpl": eng.backend()}, {m: eng.model(m, "--wake-time", "0.2", vram_gb=40) for m in ("s1", "s2")},
                gpus=[{"index": 0, "vram_gb": 60}], residency={"host_ram_gb": 100})
    with rt.client() as c:
        assert answer(c, "s1").startswith("I am s1.")
        s1 = eng.unit("s1")
        inv = invocation(sandbox, s1)
        assert answer(c, "s2").startswith("I am s2.")
        # switching away put s1 to sleep: same process, same invocation, unit active
        assert eng.state("s1")["sleeping"] is True
        assert sandbox.unit_state(s1)["ActiveState"] == "active" and invocation(sandbox, s1) == inv
        assert model_states(rt)["s1"] == "sleeping"
        res = stream_request(c, rt.url + "/v1/chat/completions", chat_body("s1", stream=True))
        assert res.status == 200 and res.content.startswith("I am s1."), res.content
    descriptions = [str(e["data"].get("description", "")) for e in res.status_events]
    assert any(d.startswith("⏰ Waking s1") for d in descriptions), descriptions
    # switching back woke it: no unit start, one wake; s2 sleeps now
    assert invocation(sandbox, s1) == inv
    st = eng.state("s1")
    assert (st["sleeping"], st["wakes"], st["refused_while_asleep"]) == (False, 1, 0)
    assert eng.state("s2")["sleeping"] is True
    assert model_states(rt)["s1"] == "loaded"


def test_a_failed_wake_falls_back_to_a_restart(sandbox: Sandbox, units: Units, router: Router) -> None:
    eng = Engines(units, "wakefail", sleep_kind="vllm")
    rt = router({"tpl": eng.backend()}, {"f": eng.model("f", "--fail-wake", vram_gb=40),
                                         "g": eng.model("g", vram_gb=40)},
                gpus=[{"index": 0, "vram_gb": 60}], residency={"host_ram_gb": 100})
    with rt.client() as c:
        assert answer(c, "f").startswith("I am f.")
        inv = invocation(sandbox, eng.unit("f"))
        assert answer(c, "g").startswith("I am g.")
        assert eng.state("f")["sleeping"] is True
        assert answer(c, "f").startswith("I am f.")  # the wake failed; a restart served it
    assert invocation(sandbox, eng.unit("f")) != inv
    assert eng.state("f")["sleeping"] is False
    assert "wake" in rt.log_text().lower() and "out of memory" in rt.log_text()


def test_host_ram_pressure_stops_the_oldest_sleeper(sandbox: Sandbox, units: Units, router: Router) -> None:
    eng = Engines(units, "ram", sleep_kind="vllm")
    rt = router({"tpl": eng.backend()}, {m: eng.model(m, vram_gb=40) for m in ("r1", "r2", "r3")},
                gpus=[{"index": 0, "vram_gb": 50}], residency={"host_ram_gb": 50})
    with rt.client() as c:
        for m in ("r1", "r2", "r3"):
            assert answer(c, m).startswith(f"I am {m}.")
    assert sandbox.active_state(eng.unit("r1")) == "inactive"  # the oldest sleeper: stopped
    assert sandbox.active_state(eng.unit("r2")) == "active" and eng.state("r2")["sleeping"] is True
    assert sandbox.active_state(eng.unit("r3")) == "active" and eng.state("r3")["sleeping"] is False
    assert model_states(rt) == {"r1": "unloaded", "r2": "sleeping", "r3": "loaded"}


def test_switch_time_cold_start_vs_wake(sandbox: Sandbox, units: Units, router: Router,
                                        request: pytest.FixtureRequest) -> None:
    """Figures: a request that cold-starts its model vs one that wakes it, and the router's share of
    each: the total minus what the engine itself took (its process start and load for a cold start;
    the other engine's sleep plus its own wake for a wake), as the fake engine reports them."""
    load, wake, nap = 1.0, 0.3, 0.1
    eng = Engines(units, "fig", sleep_kind="vllm")
    args = ("--load-delay", str(load), "--wake-time", str(wake), "--sleep-time", str(nap))
    rt = router({"tpl": eng.backend()}, {m: eng.model(m, *args, vram_gb=40) for m in ("w1", "w2")},
                gpus=[{"index": 0, "vram_gb": 60}], residency={"host_ram_gb": 100})
    cold: list[tuple[float, float]] = []  # (total, engine)
    warm: list[tuple[float, float]] = []
    with rt.client() as c:
        for mid in ("w1", "w2"):  # first requests: cold starts (w1 sleeps for w2)
            t0 = time.monotonic()
            answer(c, mid)
            total = time.monotonic() - t0
            st = eng.state(mid)
            other = eng.state("w1")["last_sleep_seconds"] if mid == "w2" else 0.0
            cold.append((total, st["startup_seconds"] + st["load_seconds"] + (other or 0.0)))
        for i in range(6):  # then each request wakes one and puts the other to sleep
            mid, other = ("w1", "w2") if i % 2 == 0 else ("w2", "w1")
            t0 = time.monotonic()
            answer(c, mid)
            total = time.monotonic() - t0
            engine = eng.state(mid)["last_wake_seconds"] + eng.state(other)["last_sleep_seconds"]
            warm.append((total, engine))
    for mid in ("w1", "w2"):
        assert eng.state(mid)["wakes"] == 3  # every switch after the first two was a wake

    def line(kind: str, rows: list[tuple[float, float]]) -> str:
        totals = [t for t, _ in rows]
        shares = [t - e for t, e in rows]
        return (f"{kind}: total median {statistics.median(totals) * 1000:.0f} ms, engine-reported "
                f"{statistics.median([e for _, e in rows]) * 1000:.0f} ms, router's share median "
                f"{statistics.median(shares) * 1000:.0f} ms (max {max(shares) * 1000:.0f} ms), n={len(rows)}")

    print_figures(request.config, "residency: switch time, cold start vs wake (fake engine)", [
        f"fake engine: --load-delay {load}s --wake-time {wake}s --sleep-time {nap}s",
        line("cold start", cold), line("wake", warm),
        "router's share = request total - (engine process start + load, or the other's sleep + this wake)"])
