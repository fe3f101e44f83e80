"""/events hub: events reach every client as SSE; a slow client never slows emit() and its buffer stays bounded."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from router.events import EventBus, ModelState, QueueDepth, RequestEnded, SwitchEnded, SwitchProgress
from router.gpu import GpuSnapshot
from router.hub import EventHub

pytestmark = pytest.mark.timeout(30)


def parse(chunk: bytes) -> list[tuple[str, dict]]:
    """(event name, data) of every SSE event in a chunk; comments skipped."""
    out = []
    for block in chunk.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":"))
        if "event" in fields:
            out.append((fields["event"], json.loads(fields["data"])))
    return out


async def read_events(stream, n: int, timeout: float = 5.0) -> list[tuple[str, dict]]:
    got: list[tuple[str, dict]] = []
    while len(got) < n:
        got += parse(await asyncio.wait_for(anext(stream), timeout))
    return got


def ended(i: int = 0) -> RequestEnded:
    return RequestEnded(model="qwen", endpoint="/v1/chat/completions", status=200, outcome="ok", stream=True,
                        duration=2.0 + i, waited=0.0, ttft=0.25, prompt_tokens=12, completion_tokens=80,
                        tok_per_s=40.0)


async def test_every_event_kind_reaches_a_client_in_order():
    bus, hub = EventBus(), EventHub()
    bus.subscribe(hub.observe)
    stream = hub.stream()
    assert (await anext(stream)).startswith(b": connected")
    bus.emit(ModelState("qwen", "loading", unit="llamacpp.service"))
    bus.emit(SwitchProgress(7, "qwen", "loading", 20.4, "⏳ Loading qwen… 20s/~45s"))
    bus.emit(SwitchEnded(7, "mistral", "qwen", "ok", 41.0, load_seconds=39.5))
    bus.emit(ModelState("qwen", "loaded", unit="llamacpp.service"))
    bus.emit(QueueDepth({"qwen": 1}, {"qwen": 0.5}))
    bus.emit(ended())
    got = await read_events(stream, 6)
    assert [name for name, _ in got] == ["state", "switch", "switch", "state", "queue", "request"]
    assert got[0][1] | {"time": 0} == {"model": "qwen", "state": "loading", "unit": "llamacpp.service",
                                       "error": None, "time": 0}
    assert got[1][1]["line"] == "⏳ Loading qwen… 20s/~45s" and got[1][1]["phase"] == "loading"
    assert got[2][1]["phase"] == "ended" and got[2][1]["outcome"] == "ok" and got[2][1]["from"] == "mistral"
    request = got[5][1]
    assert (request["model"], request["tokens"], request["tok_per_s"], request["ttft"], request["duration"],
            request["outcome"]) == ("qwen", 80, 40.0, 0.25, 2.0, "ok")
    await stream.aclose()
    assert not hub.clients


async def test_a_new_client_first_gets_each_models_last_state():
    hub = EventHub()
    hub.observe(ModelState("qwen", "loading"))  # nobody listens yet: remembered, not sent
    hub.observe(ModelState("qwen", "loaded"))
    hub.observe(ModelState("mistral", "failed", error="exit 1"))
    stream = hub.stream()
    got = await read_events(stream, 2)
    assert {(d["model"], d["state"]) for _, d in got} == {("qwen", "loaded"), ("mistral", "failed")}
    await stream.aclose()


async def test_a_client_that_never_reads_does_not_slow_emit_and_stays_bounded():
    bus, hub = EventBus(), EventHub(buffer=100)
    bus.subscribe(hub.observe)
    slow = hub.subscribe()  # connected, never reads
    fast = hub.stream()
    await anext(fast)
    n = 20_000
    started = time.perf_counter()
    for i in range(n):
        bus.emit(ended(i))
    per_event = (time.perf_counter() - started) / n
    print(f"\nemit() with 2 /events clients, one stuck: {per_event * 1e6:.1f} µs per event")
    assert len(slow.buffer) == 100  # bounded: the oldest went
    assert slow.dropped == n - 100
    # the other client lost events too (it did not read during the burst) but gets told how many, first
    got = await read_events(fast, 101)
    assert got[0] == ("dropped", {"dropped": n - 100, "total": n - 100, "buffer": 100})
    assert [d["duration"] for _, d in got[1:]] == [2.0 + i for i in range(n - 100, n)]  # the newest kept, in order
    hub.unsubscribe(slow)
    await fast.aclose()


async def test_the_stuck_client_is_told_what_it_lost_when_it_reads_again():
    hub = EventHub(buffer=3)
    stream = hub.stream()
    await anext(stream)
    for i in range(10):
        hub.observe(ended(i))
    chunk = parse(await anext(stream))
    assert chunk[0][0] == "dropped" and chunk[0][1]["dropped"] == 7
    assert [d["duration"] for _, d in chunk[1:]] == [9.0, 10.0, 11.0]
    hub.observe(ended(20))
    chunk = parse(await anext(stream))
    assert [name for name, _ in chunk] == ["request"]  # nothing lost since: no dropped event
    await stream.aclose()


async def test_gpu_events_only_while_someone_listens():
    reads = []

    def gpu() -> GpuSnapshot:
        reads.append(time.monotonic())
        return GpuSnapshot(False, reason="NVML unavailable: Driver Not Loaded")

    hub = EventHub(gpu=gpu, gpu_every=0.05)
    await asyncio.sleep(0.15)
    assert reads == []  # nobody listens: no GPU reads
    stream = hub.stream()
    got = await read_events(stream, 2)
    assert got[0] == ("gpu", {"available": False, "reason": "NVML unavailable: Driver Not Loaded",
                              "time": got[0][1]["time"]})
    await stream.aclose()
    count = len(reads)
    await asyncio.sleep(0.15)
    assert len(reads) == count  # the ticker stopped with the last client


async def test_keepalive_comments_and_close_ends_every_stream():
    hub = EventHub(keepalive=0.05)
    stream = hub.stream()
    await anext(stream)
    assert await asyncio.wait_for(anext(stream), 2) == b": keepalive\n\n"
    hub.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(stream), 2)
    assert not hub.clients


async def test_an_emit_from_another_thread_is_delivered_on_the_loop():
    hub = EventHub()
    stream = hub.stream()
    await anext(stream)
    await asyncio.to_thread(hub.publish, "gpu", {"available": False, "reason": "x"})
    got = await read_events(stream, 1)
    assert got[0][0] == "gpu"
    await stream.aclose()
