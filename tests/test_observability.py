"""The observability endpoints through the HTTP app (in-process uvicorn, a stub systemd, a fake journalctl):
/metrics, /events with a slow consumer, /logs/{model} (tail, follow, bounds, 404), /history, the API key."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from router.app import create_app
from router.chunks import loading_line, strip_own_lines
from router.config import Backend, Config, Model, SystemdSettings
from router.events import ModelState, RequestEnded, SwitchEnded
from router.gpu import GpuReader, GpuSnapshot
from router.history import FILENAME, History
from router.observability import Observability
from router.switcher import Switcher
from router.systemd import UnitState

pytestmark = pytest.mark.timeout(60)

KEY = "sekret"
AUTH = {"authorization": f"Bearer {KEY}"}


class StubSystemd:
    """What /metrics asks systemd: each unit's state."""

    async def states(self, names: list[str]) -> dict[str, UnitState]:
        return {n: UnitState(n, "loaded", "active" if n == "llamacpp.service" else "inactive") for n in names}


class NoGpu(GpuReader):
    def read(self) -> GpuSnapshot:
        self._last = GpuSnapshot(False, reason="NVML unavailable: NVML Shared Library Not Found")
        return self._last


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Running:
    def __init__(self, obs: Observability, url: str) -> None:
        self.obs = obs
        self.url = url
        self.bus = obs.switcher.events


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    config = Config(config_dir=tmp_path, api_key=KEY, systemd=SystemdSettings(bus="user"),
                    backends={"llamacpp": Backend("llamacpp", "llamacpp.service", "http://127.0.0.1:9")},
                    models={"qwen": Model("qwen", "llamacpp"), "mistral": Model("mistral", "llamacpp"),
                            "embed": Model("embed", "llamacpp", unit="embed.service"),
                            "org/tiny": Model("org/tiny", "llamacpp")})
    http = httpx.AsyncClient()
    async def probe(url: str, timeout: float) -> bool:
        return True

    switcher = Switcher(config, StubSystemd(), probe)  # not started: no run loop needed
    history = History(tmp_path / "state" / FILENAME, batch_wait=0.01)
    obs = Observability(switcher, history, gpu=NoGpu(), gpu_every=0.1, events_buffer=64)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(switcher, http, obs), host="127.0.0.1", port=port,
                                           loop="none", lifespan="off", log_level="warning"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        assert not serving.done()
        await asyncio.sleep(0.01)
    try:
        yield Running(obs, f"http://127.0.0.1:{port}")
    finally:
        obs.stop_streams()
        server.should_exit = True
        await asyncio.wait_for(serving, 10)
        await obs.close()
        await http.aclose()


def ended(model: str = "qwen", endpoint: str = "/v1/chat/completions", **kw: Any) -> RequestEnded:
    return RequestEnded(**{"model": model, "endpoint": endpoint, "status": 200, "outcome": "ok", "stream": True,
                           "duration": 1.0, "waited": 0.0, "ttft": 0.2, "prompt_tokens": 5,
                           "completion_tokens": 40, "tok_per_s": 40.0, **kw})


async def test_every_endpoint_needs_the_api_key(running: Running):
    async with httpx.AsyncClient(base_url=running.url) as c:
        for path in ("/metrics", "/events", "/logs/qwen", "/history"):
            r = await c.get(path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path


async def test_metrics_over_http_without_a_gpu(running: Running):
    running.bus.emit(ModelState("qwen", "loaded", unit="llamacpp.service"))
    running.bus.emit(SwitchEnded(1, None, "qwen", "ok", 12.0, load_seconds=11.0))
    running.bus.emit(ended())
    async with httpx.AsyncClient(base_url=running.url, headers=AUTH) as c:
        r = await c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    lines = set(r.text.splitlines())
    assert 'llm_router_requests_total{endpoint="/v1/chat/completions",model="qwen",outcome="ok"} 1.0' in lines
    assert 'llm_router_model_loaded{model="qwen"} 1.0' in lines
    assert 'llm_router_model_loaded{model="mistral"} 0.0' in lines
    assert 'llm_router_unit_state{state="active",unit="llamacpp.service"} 1.0' in lines
    assert 'llm_router_unit_state{state="inactive",unit="embed.service"} 1.0' in lines
    assert "llm_router_gpu_available 0.0" in lines
    assert 'llm_router_switches_total{from="none",outcome="ok",to="qwen"} 1.0' in lines
    assert any(line.startswith("process_cpu_seconds_total ") for line in lines)


async def read_sse(lines: AsyncIterator[str], until: str, timeout: float = 10.0) -> list[tuple[str, dict]]:
    """SSE events from a line iterator until one named `until`."""
    got: list[tuple[str, dict]] = []
    name = None

    async def run() -> None:
        nonlocal name
        async for line in lines:
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: ") and name:
                got.append((name, json.loads(line[6:])))
                if name == until:
                    return

    await asyncio.wait_for(run(), timeout)
    return got


async def test_events_a_slow_consumer_never_slows_the_router(running: Running):
    hub = running.obs.hub
    # a client that sends its request and then never reads a byte
    _reader, writer = await asyncio.open_connection("127.0.0.1", int(running.url.rsplit(":", 1)[1]))
    writer.write(f"GET /events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode())
    await writer.drain()
    async with httpx.AsyncClient(base_url=running.url, headers=AUTH, timeout=10) as c, \
            c.stream("GET", "/events") as fast:
        assert fast.headers["content-type"].startswith("text/event-stream")
        deadline = time.monotonic() + 5
        while len(hub.clients) < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        big = "/v1/" + "x" * 4000  # 4 kB per frame: the stuck socket's buffers fill quickly
        took = []
        for burst in range(40):
            for i in range(100):
                started = time.perf_counter()
                running.bus.emit(ended(endpoint=big, duration=float(burst * 100 + i)))
                took.append(time.perf_counter() - started)
            await asyncio.sleep(0)  # let the streams run between bursts
        running.bus.emit(ended(model="mistral"))
        took.sort()
        print(f"\nemit() with a stuck /events client, 4 kB events: median {took[len(took) // 2] * 1e6:.0f} µs, "
              f"p99 {took[len(took) * 99 // 100] * 1e6:.0f} µs, max {took[-1] * 1e6:.0f} µs (4000 events)")
        buffers = [len(cl.buffer) for cl in hub.clients]
        assert max(buffers) <= 64, buffers  # bounded by the per-client buffer
        assert sum(cl.dropped for cl in hub.clients) > 0  # the stuck one lost events, counted
        lines = fast.aiter_lines()
        got = await read_sse(lines, "request", timeout=10)
        while not (got and got[-1][1]["model"] == "mistral"):  # the fast one reads up to the last event
            got += await read_sse(lines, "request", timeout=10)
    writer.close()
    deadline = time.monotonic() + 10
    while hub.clients:  # both gone: their buffers freed, the GPU ticker stopped
        assert time.monotonic() < deadline, hub.clients
        await asyncio.sleep(0.05)


async def test_events_say_how_many_were_dropped_and_send_gpu(running: Running):
    hub = running.obs.hub
    async with httpx.AsyncClient(base_url=running.url, headers=AUTH, timeout=10) as c, \
            c.stream("GET", "/events") as r:
        lines = r.aiter_lines()
        gpu = await read_sse(lines, "gpu")
        assert gpu[-1][1]["available"] is False and "NVML" in gpu[-1][1]["reason"]
        client = next(iter(hub.clients))
        for i in range(200):  # synchronously: the stream cannot run in between
            running.bus.emit(ended(duration=float(i)))
        assert len(client.buffer) == 64
        got = await read_sse(lines, "dropped")
        assert got[-1][1]["dropped"] >= 136 and got[-1][1]["buffer"] == 64
        got = await read_sse(lines, "request")
        assert got[-1][1]["duration"] >= 136.0  # the oldest went, the newest stayed
        metrics = (await c.get("/metrics")).text.splitlines()
        assert "llm_router_events_clients 1.0" in metrics
        dropped = next(float(m.split()[1]) for m in metrics if m.startswith("llm_router_events_dropped_total "))
        assert dropped >= 136


FAKE_JOURNALCTL = """\
#!{python}
import json, os, sys, time
args = sys.argv[1:]
with open(os.environ["FAKE_JOURNAL_LOG"], "a") as f:
    f.write(json.dumps({{"pid": os.getpid(), "args": args}}) + "\\n")
n = int(args[args.index("-n") + 1])
def entry(i):
    print(json.dumps({{"MESSAGE": f"line {{i}}", "SYSLOG_IDENTIFIER": "llama-server", "_PID": "4242",
                      "__REALTIME_TIMESTAMP": str(1764441214123000 + i * 1000)}}), flush=True)
for i in range(min(n, 3)):
    entry(i)
if "--follow" in args:
    i = 3
    while True:
        time.sleep(0.05)
        entry(i)
        i += 1
"""


@pytest.fixture
def journalctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "journalctl"
    script.write_text(FAKE_JOURNALCTL.format(python=sys.executable))
    script.chmod(0o755)
    calls = tmp_path / "journalctl-calls"
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_JOURNAL_LOG", str(calls))
    return calls


def calls(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def test_logs_tail(running: Running, journalctl: Path):
    async with httpx.AsyncClient(base_url=running.url, headers=AUTH, timeout=10) as c:
        r = await c.get("/logs/qwen", params={"lines": 2})
        assert r.status_code == 200, r.text
        assert r.json() == {"model": "qwen", "unit": "llamacpp.service", "lines": [
            "2025-11-29T18:33:34.123Z llama-server[4242]: line 0",
            "2025-11-29T18:33:34.124Z llama-server[4242]: line 1"]}
        assert calls(journalctl)[-1]["args"] == ["--no-pager", "-o", "json", "-n", "2",
                                                 "--user-unit=llamacpp.service"]
        r = await c.get("/logs/embed")  # a model with its own unit; 100 lines by default
        assert r.json()["unit"] == "embed.service" and calls(journalctl)[-1]["args"][4] == "100"
        r = await c.get("/logs/org/tiny")  # model ids may hold slashes (Hugging Face names)
        assert r.status_code == 200 and r.json()["model"] == "org/tiny"
        r = await c.get("/logs/nope")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert "qwen" in r.json()["error"]["message"]
        for bad in ("0", "10001", "lots", "-5"):
            r = await c.get("/logs/qwen", params={"lines": bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == "lines", bad


async def test_logs_without_journalctl_is_a_clear_503(running: Running, monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    async with httpx.AsyncClient(base_url=running.url, headers=AUTH, timeout=10) as c:
        r = await c.get("/logs/qwen")
    assert r.status_code == 503
    message = r.json()["error"]["message"]
    assert "llamacpp.service" in message and "journalctl --user-unit=llamacpp.service" in message


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].startswith("Z")
    except FileNotFoundError:
        return True


async def test_logs_follow_streams_and_stops_journalctl_when_the_client_leaves(running: Running, journalctl: Path):
    async with httpx.AsyncClient(base_url=running.url, headers=AUTH, timeout=10) as c, \
            c.stream("GET", "/logs/qwen", params={"follow": "1", "lines": "3"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        got: list[str] = []
        lines = r.aiter_lines()
        while len(got) < 6:
            line = await asyncio.wait_for(anext(lines), 10)
            if line.startswith("data: "):
                got.append(json.loads(line[6:])["line"])
        assert [g.rsplit(": ", 1)[1] for g in got] == [f"line {i}" for i in range(6)]  # backlog, then new ones
    (call,) = calls(journalctl)
    assert call["args"] == ["--no-pager", "-o", "json", "-n", "3", "--follow", "--user-unit=llamacpp.service"]
    deadline = time.monotonic() + 10
    while not gone(call["pid"]):
        assert time.monotonic() < deadline, "journalctl still runs after the client left"
        await asyncio.sleep(0.05)


async def test_logs_follow_ends_when_the_router_stops(running: Running, journalctl: Path):
    async with httpx.AsyncClient(base_url=running.url, headers=AUTH, timeout=10) as c, \
            c.stream("GET", "/logs/qwen", params={"follow": "1"}) as r:
        lines = r.aiter_lines()
        await read_sse(lines, "log")
        running.obs.stop_streams()
        got = await read_sse(lines, "end")
        assert got[-1] == ("end", {"reason": "the router is stopping"})
    (call,) = calls(journalctl)
    deadline = time.monotonic() + 10
    while not gone(call["pid"]):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def test_history_over_http(running: Running):
    running.bus.emit(SwitchEnded(1, None, "qwen", "ok", 46.0, load_seconds=45.0))
    running.bus.emit(ended(tok_per_s=41.0, ttft=0.25))
    running.bus.emit(ended(model="made-up", outcome="rejected", status=404))  # not a configured model: not kept
    async with httpx.AsyncClient(base_url=running.url, headers=AUTH) as c:
        body = (await c.get("/history")).json()
    assert set(body["models"]) == {"qwen"}
    assert body["available"] is True
    assert body["models"]["qwen"] | {"last_used": 0} == {
        "requests": 1, "failed": 0, "prompt_tokens": 5, "completion_tokens": 40, "loads": 1, "load_failures": 0,
        "last_used": 0, "tok_per_s": 41.0, "ttft": 0.25, "load_seconds": 45.0}
    assert running.obs.expected_load_seconds("qwen") == 45.0 and running.obs.expected_load_seconds("mistral") is None


def test_the_loading_line_with_a_typical_load_time():
    assert loading_line("Qwen", 20.4, 180) == "⏳ Loading Qwen… 20s/180s"
    assert loading_line("Qwen", 20.4, 180, expected=44.6) == "⏳ Loading Qwen… 20s/~45s"
    assert loading_line("Qwen", 50.0, 180, expected=44.6) == "⏳ Loading Qwen… 50s/180s"  # slower than usual
    assert loading_line("Qwen", 0.2, 180, expected=0.3) == "⏳ Loading Qwen… 0s/~1s"
    assert strip_own_lines("⏳ Loading Qwen… 20s/~45s\nHello") == "Hello"  # never sent back to a model


async def test_cli_models_shows_the_history(running: Running, capsys: pytest.CaptureFixture[str]):
    from router import cli

    running.bus.emit(SwitchEnded(1, None, "qwen", "ok", 46.0, load_seconds=44.6))
    for _ in range(3):
        running.bus.emit(ended(tok_per_s=41.25, ttft=0.3125, prompt_tokens=1500, completion_tokens=400))
    running.bus.emit(ended(outcome="client_gone", status=499, tok_per_s=None, ttft=None, prompt_tokens=None,
                           completion_tokens=None))
    code = await asyncio.to_thread(cli.main, ["models", "--url", running.url, "--api-key", KEY,
                                              "--config-dir", "/nonexistent"])
    assert code == 0
    table = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert table[0] == ["MODEL", "BACKEND", "UNIT", "STATE", "REQUESTS", "FAILED", "TOKENS_IN/OUT", "TOK/S", "TTFT",
                        "LOAD"]
    assert table[1] == ["qwen", "llamacpp", "llamacpp.service", "unloaded", "4", "1", "4.5k/1.2k", "41.2", "0.31s",
                        "45s"]
    assert table[2] == ["mistral", "llamacpp", "llamacpp.service", "unloaded", *["-"] * 6]
