"""Relay, in-process (no systemd): upstream timeouts, clients that leave, RequestEnded, the upstream body.

The router's app runs on uvicorn in the test's loop, with a stand-in switcher that grants every
request at once, in front of a scripted engine (asyncio server) whose behaviour each request picks
with an `x-engine` header: answer, hang before the headers, or stall in the middle of the body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from router.app import create_app
from router.config import Backend, Config, Model, Timeouts
from router.events import Event, EventBus, RequestEnded
from router.scheduler import Ticket
from router.switcher import Granted, Status
from router.upstream import Upstream

pytestmark = pytest.mark.timeout(30)

CHUNK = ('data: {"id":"up-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":" t%d"},'
         '"finish_reason":null}]}\n\n')
USAGE = ('data: {"id":"up-1","object":"chat.completion.chunk","choices":[],'
         '"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}\n\n')
WHOLE = json.dumps({"id": "up-2", "object": "chat.completion", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}).encode()


SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
DEFAULT_TIMEOUTS = Timeouts()


def _chunked(text: str) -> bytes:
    data = text.encode()
    return b"%x\r\n%s\r\n" % (len(data), data)


@dataclass
class Engine:
    """A scripted engine: records each request body and notices when the router closes a connection."""

    port: int = 0
    bodies: list[bytes] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # a connection was closed by the router
    server: asyncio.AbstractServer | None = None
    connections: int = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
                length = int(head.split("content-length:")[1].split("\r\n")[0]) if "content-length:" in head else 0
                body = await reader.readexactly(length)
                self.bodies.append(body)
                mode = head.split("x-engine:")[1].split("\r\n")[0].strip() if "x-engine:" in head else "ok"
                stream = json.loads(body).get("stream", False)
                if mode == "hang":
                    await reader.read()  # nothing until the router hangs up
                    break
                if not stream:
                    if mode == "stall":  # headers and part of the body, then silence
                        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d"
                                     b"\r\n\r\n%s" % (len(WHOLE), WHOLE[:10]))
                        await reader.read()
                        break
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                                 % (len(WHOLE), WHOLE))
                    continue
                writer.write(SSE_HEAD)
                for i in range(3):
                    writer.write(_chunked(CHUNK % i))
                await writer.drain()
                if mode == "stall":
                    await reader.read()
                    break
                if mode == "slow":  # a token every 20 ms, for as long as someone reads
                    for i in range(3, 10_000):
                        writer.write(_chunked(CHUNK % i))
                        await writer.drain()
                        await asyncio.sleep(0.02)
                writer.write(_chunked(USAGE) + _chunked("data: [DONE]\n\n") + b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed.set()
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


class StandInSwitcher:
    """Grants every request at once; records which tickets were released and the events emitted."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.events = EventBus()
        self.seen: list[Event] = []
        self.events.subscribe(self.seen.append)
        self.released: list[Ticket] = []
        self.granted: list[Ticket] = []
        self._script: dict[int, list[Status]] = {}

        self.before_grant: list[Status] = []  # status lines every request gets before its grant

    def submit(self, model: str | None, priority: int = 1) -> Ticket:
        ticket = Ticket(model)
        self._script[ticket.id] = list(self.before_grant)
        return ticket

    async def next_update(self, ticket: Ticket, timeout: float | None = None) -> Granted | Status:
        if self._script.get(ticket.id):
            return self._script[ticket.id].pop(0)
        ticket.granted = True
        self.granted.append(ticket)
        model = self.config.models[ticket.model or ""]
        return Granted(model, self.config.backend_of(model), url=self.config.url_of(model))

    def done(self, ticket: Ticket) -> None:
        self.released.append(ticket)

    def ended(self) -> list[RequestEnded]:
        return [e for e in self.seen if isinstance(e, RequestEnded)]


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class Rig:
    engine: Engine
    switcher: StandInSwitcher
    url: str

    async def wait_released(self, n: int = 1) -> None:
        for _ in range(200):
            if len(self.switcher.released) >= n:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"only {len(self.switcher.released)} of {n} tickets released")


@contextlib.asynccontextmanager
async def rig(timeouts: Timeouts = DEFAULT_TIMEOUTS, stats: bool = True,
              engine_port: int | None = None, stats_channel: str = "event") -> AsyncIterator[Rig]:
    engine = Engine()
    await engine.start()
    port = engine_port or engine.port
    config = Config(config_dir=Path("/nonexistent"), stats=stats, timeouts=timeouts,
                    stats_channel=stats_channel,  # type: ignore[arg-type]
                    backends={"e": Backend("e", "e.service", f"http://127.0.0.1:{port}")},
                    models={"m": Model("m", "e", name="Model M")})
    switcher = StandInSwitcher(config)
    upstream = Upstream()
    app = create_app(switcher, upstream)  # type: ignore[arg-type]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        router_port = s.getsockname()[1]
    server = _Server(uvicorn.Config(app, host="127.0.0.1", port=router_port, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield Rig(engine, switcher, f"http://127.0.0.1:{router_port}")
    finally:
        server.should_exit = True
        await task
        await upstream.close()
        await engine.stop()


def body(stream: bool, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "stream": stream, "messages": [{"role": "user", "content": "hi"}], **extra}


def sse_events(raw: str) -> list[Any]:
    out: list[Any] = []
    for block in raw.split("\n\n"):
        if block.startswith("data: "):
            out.append(block[6:] if block[6:] == "[DONE]" else json.loads(block[6:]))
    return out


# --- upstream timeouts ------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_an_engine_that_never_answers_gets_a_504_after_first_byte(stream: bool) -> None:
    async with rig(Timeouts(connect=5, first_byte=0.3, idle=60)) as r, httpx.AsyncClient(timeout=10) as c:
        resp = await c.post(r.url + "/v1/chat/completions", json=body(stream), headers={"x-engine": "hang"})
        assert resp.status_code == 504
        error = resp.json()["error"]
        assert error["code"] == "backend_timeout"
        assert "timeouts.first_byte" in error["message"] and "m:" in error["message"]
        await r.wait_released()
        assert r.switcher.released == r.switcher.granted  # the model is free to switch
        await asyncio.wait_for(r.engine.closed.wait(), 2)  # the upstream connection was dropped
        [ended] = r.switcher.ended()
        assert (ended.status, ended.outcome) == (504, "timeout")


async def test_an_engine_that_stalls_mid_stream_ends_with_an_error_chunk_and_done() -> None:
    async with rig(Timeouts(connect=5, first_byte=60, idle=0.3)) as r, httpx.AsyncClient(timeout=10) as c:
        resp = await c.post(r.url + "/v1/chat/completions", json=body(True), headers={"x-engine": "stall"})
        assert resp.status_code == 200
        events = sse_events(resp.text)
        assert [e["choices"][0]["delta"]["content"] for e in events[:3]] == [" t0", " t1", " t2"]
        error = events[-2]["error"]
        assert error["code"] == "backend_timeout" and "timeouts.idle" in error["message"]
        assert events[-2]["choices"] == [] and events[-1] == "[DONE]"
        await r.wait_released()
        await asyncio.wait_for(r.engine.closed.wait(), 2)
        [ended] = r.switcher.ended()
        assert ended.outcome == "timeout" and ended.ttft is not None


async def test_a_whole_answer_that_stalls_is_a_504() -> None:
    async with rig(Timeouts(connect=5, first_byte=60, idle=0.3)) as r, httpx.AsyncClient(timeout=10) as c:
        resp = await c.post(r.url + "/v1/chat/completions", json=body(False), headers={"x-engine": "stall"})
        assert resp.status_code == 504 and "timeouts.idle" in resp.json()["error"]["message"]
        await r.wait_released()
        await asyncio.wait_for(r.engine.closed.wait(), 2)


async def test_an_engine_that_does_not_accept_connections_hits_the_connect_timeout() -> None:
    with socket.socket() as full:  # a listener whose queue is full: further SYNs go unanswered
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        fillers = []
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", port))
            fillers.append(s)
        await asyncio.sleep(0.1)
        try:
            async with rig(Timeouts(connect=0.3, first_byte=60, idle=60), engine_port=port) as r, \
                    httpx.AsyncClient(timeout=10) as c:
                resp = await c.post(r.url + "/v1/chat/completions", json=body(False))
                assert resp.status_code == 504, resp.text
                assert "timeouts.connect" in resp.json()["error"]["message"]
                await r.wait_released()
        finally:
            for s in fillers:
                s.close()


# --- clients that leave, and what the relay reports ---------------------------------------------


async def test_a_client_that_leaves_mid_stream_releases_the_model_and_the_engine() -> None:
    async with rig() as r, httpx.AsyncClient(timeout=10) as c:
        async with c.stream("POST", r.url + "/v1/chat/completions", json=body(True),
                            headers={"x-engine": "slow"}) as resp:
            async for piece in resp.aiter_raw():
                if b" t4" in piece:
                    break
        await r.wait_released()
        await asyncio.wait_for(r.engine.closed.wait(), 2)  # the engine stops computing for nobody
        [ended] = r.switcher.ended()
        assert (ended.status, ended.outcome) == (499, "client_gone")


async def test_a_client_that_leaves_before_the_headers_releases_the_model() -> None:
    async with rig() as r, httpx.AsyncClient(timeout=0.3) as c:
        with pytest.raises(httpx.ReadTimeout):
            await c.post(r.url + "/v1/chat/completions", json=body(False), headers={"x-engine": "hang"})
        await r.wait_released()
        await asyncio.wait_for(r.engine.closed.wait(), 2)
        assert r.switcher.ended()[0].outcome == "client_gone"


async def test_request_ended_carries_ttft_and_tokens_once_per_request() -> None:
    async with rig() as r, httpx.AsyncClient(timeout=10) as c:
        streamed = await c.post(r.url + "/v1/chat/completions", json=body(True))
        whole = await c.post(r.url + "/v1/chat/completions", json=body(False))
        assert streamed.status_code == whole.status_code == 200
        assert whole.content == WHOLE
        await r.wait_released(2)
        first, second = r.switcher.ended()
        assert (first.stream, first.outcome, first.status) == (True, "ok", 200)
        assert (first.prompt_tokens, first.completion_tokens) == (7, 3) and first.ttft is not None
        assert first.tok_per_s is not None and first.endpoint == "/v1/chat/completions"
        assert (second.stream, second.prompt_tokens, second.completion_tokens) == (False, 5, 1)
        assert len(r.switcher.released) == 2


# --- the body that goes upstream --------------------------------------------------------------


async def test_a_stream_gets_include_usage_spliced_into_the_clients_own_bytes() -> None:
    raw = b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": "h\\u00e9"}]}'
    async with rig() as r, httpx.AsyncClient(timeout=10) as c:
        resp = await c.post(r.url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert resp.status_code == 200
        assert r.engine.bodies[-1] == b'{"stream_options":{"include_usage":true},' + raw[1:]
        await c.post(r.url + "/v1/chat/completions", json=body(True, stream_options={"other": 1}))
        assert json.loads(r.engine.bodies[-1])["stream_options"] == {"other": 1, "include_usage": True}
        await c.post(r.url + "/v1/chat/completions", json=body(False))
        assert "stream_options" not in json.loads(r.engine.bodies[-1])


async def test_stats_off_passes_the_body_and_the_stream_through_untouched() -> None:
    raw = json.dumps(body(True)).encode()
    async with rig(stats=False) as r, httpx.AsyncClient(timeout=10) as c:
        resp = await c.post(r.url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert r.engine.bodies[-1] == raw
        assert resp.text == "".join(CHUNK % i for i in range(3)) + USAGE + "data: [DONE]\n\n"


def test_timeouts_default_to_the_documented_values() -> None:
    assert replace(Timeouts()) == Timeouts(connect=5.0, first_byte=600.0, idle=120.0)


async def test_the_idle_timer_does_not_outlive_a_finished_answer_on_a_pooled_connection() -> None:
    """A whole answer that arrives with its headers must not leave the idle timer armed on the
    connection it returns to the pool: it would break the next request sent on it."""
    async with rig(Timeouts(connect=5, first_byte=60, idle=0.2)) as r, httpx.AsyncClient(timeout=10) as c:
        for _ in range(3):
            resp = await c.post(r.url + "/v1/chat/completions", json=body(False))
            assert resp.status_code == 200, resp.text
            await asyncio.sleep(0.4)
        assert [e.outcome for e in r.switcher.ended()] == ["ok"] * 3
        assert r.engine.connections == 1  # kept alive, not dropped as timed out


# --- what a streamed answer ends with -----------------------------------------------------------


def _content(events: list[Any]) -> str:
    return "".join((c.get("delta") or {}).get("content") or "" for e in events if isinstance(e, dict)
                   for c in e.get("choices") or [])


async def test_the_speed_is_the_final_status_event_not_part_of_the_answer() -> None:
    async with rig() as r, httpx.AsyncClient(timeout=10) as c:
        resp = await c.post(r.url + "/v1/chat/completions", json=body(True))
        events = sse_events(resp.text)
        assert _content(events) == " t0 t1 t2" and events[-1] == "[DONE]"
        last = events[-2]
        assert last["choices"] == [] and last["id"] == "up-1"
        line = last["event"]["data"]["description"]
        assert re.fullmatch(r"✅ Model M · ⚡ [\d.]+ tok/s · 3 tokens in [\d.]+ s", line), line
        assert last["event"]["data"]["done"] is True
        assert last["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
        assert last["timings"]["predicted_n"] == 3 and last["timings"]["prompt_n"] == 7
        assert sum(1 for e in events if isinstance(e, dict) and "usage" in e) == 1


async def test_stats_content_keeps_the_inline_line() -> None:
    async with rig(stats_channel="content") as r, httpx.AsyncClient(timeout=10) as c:
        resp = await c.post(r.url + "/v1/chat/completions", json=body(True))
        events = sse_events(resp.text)
        assert re.fullmatch(r" t0 t1 t2\n\n⚡ [\d.]+ tok/s \(3 tokens in [\d.]+s\)", _content(events))
        assert not any("event" in e for e in events if isinstance(e, dict))


async def test_after_a_wait_the_ready_line_and_the_final_status_say_how_long_the_user_waited() -> None:
    async with rig() as r, httpx.AsyncClient(timeout=10) as c:
        r.switcher.before_grant = [Status("🔄 Switching to Model M…")]
        resp = await c.post(r.url + "/v1/chat/completions", json=body(True))
        events = [e for e in sse_events(resp.text) if isinstance(e, dict)]
        lines = [e["event"]["data"]["description"] for e in events if "event" in e]
        assert lines[:2] == ["🔄 Switching to Model M…", "✅ Model M ready (took 0 s)"], lines
        assert re.fullmatch(r"✅ Model M ready \(took 0 s\) · ⚡ [\d.]+ tok/s · 3 tokens in [\d.]+ s", lines[2])
        assert len({e["id"] for e in events}) == 1


async def test_streamed_text_completions_keep_the_cmpl_prefix_in_the_routers_chunks() -> None:
    prompt = {"model": "m", "stream": True, "prompt": "Once"}
    async with rig(Timeouts(connect=5, first_byte=60, idle=0.3)) as r, httpx.AsyncClient(timeout=10) as c:
        resp = await c.post(r.url + "/v1/completions", json=prompt, headers={"x-engine": "stall"})
        error = sse_events(resp.text)[-2]
        assert error["error"]["code"] == "backend_timeout"
        assert error["id"].startswith("cmpl-") and error["object"] == "text_completion"
        r.switcher.before_grant = [Status("🔄 Switching to Model M…")]
        resp = await c.post(r.url + "/v1/completions", json=prompt)
        events = [e for e in sse_events(resp.text) if isinstance(e, dict)]
        ids = {e["id"] for e in events}
        assert len(ids) == 1 and ids.pop().startswith("cmpl-router-")
        assert all(e["object"] == "text_completion" for e in events if "event" in e)
