"""Every API besides chat, in-process (no systemd): Anthropic Messages, Responses, rerank, audio, images,
/upstream, params, with recorded real-client requests (tests/fixtures/) against the fake engine.

The router's app runs on uvicorn in the test's loop in front of tests/fake_backend.py's engine
(served in-process), with a stand-in switcher that plays a scripted wait per request: status lines,
keep-alive ticks (None), then Granted or Failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import fake_backend
import httpx
import pytest
import uvicorn

from router.anthropic import ROUTER_SIGNATURE
from router.app import create_app
from router.config import Backend, Config, Limits, Model, Timeouts
from router.events import EventBus, RequestEnded
from router.scheduler import LoadFailure, Ticket
from router.switcher import Failed, Granted, Status, Update

pytestmark = pytest.mark.timeout(30)

FIXTURES = Path(__file__).parent / "fixtures"
KEY = "sk-local-test"  # the key the fixtures were recorded with
FAILURE = LoadFailure(model="m", unit="fake.service", what="the unit failed (exit code 1).",
                      hint="Check the journal.", journal=("fake_backend: model file not found: /m.gguf",))


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text(encoding="utf-8"))
    return data


class ScriptedSwitcher:
    """Plays `script` (a list of updates; None is a keep-alive tick) to each request, then grants it."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.events = EventBus()
        self.ended: list[RequestEnded] = []
        self.events.subscribe(lambda e: self.ended.append(e) if isinstance(e, RequestEnded) else None)
        self.script: list[Update | None] = []
        self.submitted: list[str | None] = []
        self.released: list[Ticket] = []
        self._plays: dict[int, list[Update | None]] = {}

    def submit(self, model: str | None, priority: int = 1) -> Ticket:
        ticket = Ticket(model)
        self.submitted.append(model)
        self._plays[ticket.id] = list(self.script)
        return ticket

    async def next_update(self, ticket: Ticket, timeout: float | None = None) -> Update | None:
        await asyncio.sleep(0)
        play = self._plays[ticket.id]
        if play:
            update = play.pop(0)
            if update is None and timeout is None:  # a silent wait: ticks are not seen
                return await self.next_update(ticket, timeout)
            return update
        ticket.granted = True
        model = self.config.models[ticket.model or ""]
        return Granted(model, self.config.backend_of(model), url=self.config.url_of(model))

    def done(self, ticket: Ticket) -> None:
        self.released.append(ticket)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class Rig:
    engine: fake_backend.FakeBackend
    switcher: ScriptedSwitcher
    url: str
    client: httpx.AsyncClient
    records: Path

    def bodies(self, path: str) -> list[dict[str, Any]]:
        """What the engine received at `path` (parsed), in order."""
        lines = self.records.read_text(encoding="utf-8").splitlines() if self.records.exists() else []
        return [r["body"] for r in map(json.loads, lines) if r["path"] == path]

    def raw(self, path: str) -> bytes:
        return [body for p, _, _, body in self.engine.received if p == path][-1]

    async def released(self, n: int = 1) -> None:
        for _ in range(300):
            if len(self.switcher.released) >= n:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{len(self.switcher.released)} of {n} tickets released")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def rig(tmp_path: Path, models: dict[str, Model] | None = None, engine_args: tuple[str, ...] = (),
              engine_port: int | None = None, **config: Any) -> AsyncIterator[Rig]:
    records = tmp_path / "engine.jsonl"
    engine = fake_backend.FakeBackend(fake_backend.parse_args(["--tokens", "4", "--record", str(records),
                                                               *engine_args]), "m")
    server = await asyncio.start_server(engine.handle, "127.0.0.1", 0)
    port = engine_port or server.sockets[0].getsockname()[1]
    models = models or {"m": Model("m", "e", name="Model M")}
    cfg = Config(config_dir=tmp_path, backends={"e": Backend("e", "fake.service", f"http://127.0.0.1:{port}")},
                 models=models, **config)
    switcher = ScriptedSwitcher(cfg)
    from router.upstream import Upstream

    upstream = Upstream()
    app = create_app(switcher, upstream)  # type: ignore[arg-type]
    router_port = free_port()
    web = _Server(uvicorn.Config(app, host="127.0.0.1", port=router_port, log_level="warning", lifespan="off"))
    task = asyncio.create_task(web.serve())
    while not web.started:
        await asyncio.sleep(0.01)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{router_port}", timeout=10) as client:
            yield Rig(engine, switcher, f"http://127.0.0.1:{router_port}", client, records)
    finally:
        web.should_exit = True
        await task
        await upstream.close()
        server.close()


@dataclass
class Event:
    name: str | None
    data: Any = None
    comment: str | None = None


@dataclass
class Events:
    items: list[Event] = field(default_factory=list)

    @property
    def named(self) -> list[Event]:
        return [e for e in self.items if e.name is not None]

    def names(self) -> list[str]:
        return [e.name for e in self.named if e.name]

    def of(self, name: str) -> list[Any]:
        return [e.data for e in self.named if e.name == name]


def parse_sse(text: str) -> Events:
    out = Events()
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        name, data, comment = None, None, None
        for line in block.split("\n"):
            if line.startswith(":"):
                comment = line[1:].strip()
            elif line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data = json.loads(line[5:])
        if data is not None and name is None and isinstance(data, dict):
            name = data.get("type")
        out.items.append(Event(name, data, comment))
    return out


def accumulate_message(events: Events) -> dict[str, Any]:
    """What the anthropic SDKs build from a Messages stream (content[index], in order), with their checks."""
    message: dict[str, Any] | None = None
    for e in events.named:
        if e.name == "ping":
            continue
        if e.name == "error":
            raise AssertionError(f"error event: {e.data}")
        if e.name == "message_start":
            assert message is None, "a second message_start"
            message = dict(e.data["message"])
            message["content"] = []
            continue
        assert message is not None, f"{e.name} before message_start"
        if e.name == "content_block_start":
            assert e.data["index"] == len(message["content"]), (e.data, message["content"])
            message["content"].append(dict(e.data["content_block"]))
        elif e.name == "content_block_delta":
            block, delta = message["content"][e.data["index"]], e.data["delta"]
            key = {"text_delta": ("text", "text"), "thinking_delta": ("thinking", "thinking"),
                   "signature_delta": ("signature", "signature"),
                   "input_json_delta": ("partial_json", "partial_json")}[delta["type"]]
            block[key[0]] = block.get(key[0], "") + delta[key[1]]
        elif e.name == "message_delta":
            message.update(e.data["delta"])
            message["usage"] = {**message["usage"], **e.data["usage"]}
    assert message is not None
    return message


def messages_body(stream: bool = True, thinking: bool = False, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "m", "max_tokens": 256, "stream": stream,
                            "messages": [{"role": "user", "content": "hello there"}], **extra}
    if thinking:
        body["thinking"] = {"type": "enabled", "budget_tokens": 1024}
    return body


LOADING: list[Update | None] = [Status("🔄 Switching to Model M…"), None, Status("⏳ Loading Model M… 1s/180s")]


def granted(r: Rig, took: float | None = 3.0) -> Granted:
    model = r.switcher.config.models["m"]
    return Granted(model, r.switcher.config.backend_of(model), took=took, url=r.switcher.config.url_of(model))


# --- Anthropic Messages -----------------------------------------------------------------------------


async def test_a_loaded_model_streams_the_engines_messages_untouched(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        resp = await r.client.post("/v1/messages", json=messages_body(thinking=True))
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(resp.text)
        assert events.names()[0] == "message_start" and events.of("message_start")[0]["message"]["id"].startswith(
            "msg_fake_")
        message = accumulate_message(events)
        assert [b["type"] for b in message["content"]] == ["thinking", "text"]
        assert message["content"][1]["text"] == "I am m. token1 token2 token3"
        await r.released()
        [ended] = r.switcher.ended
        assert (ended.endpoint, ended.status, ended.outcome, ended.completion_tokens) == ("/v1/messages", 200, "ok", 4)


async def test_while_loading_thinking_requests_get_the_status_as_a_thinking_block_before_the_engines(
        tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        r.switcher.script = [*LOADING, granted(r)]
        resp = await r.client.post("/v1/messages", json=messages_body(thinking=True))
        events = parse_sse(resp.text)
        assert events.names()[:3] == ["message_start", "content_block_start", "content_block_delta"]
        assert events.of("message_start")[0]["message"]["id"].startswith("msg_router_")
        assert events.names().count("message_start") == 1 and "ping" in events.names()
        message = accumulate_message(events)
        assert [b["type"] for b in message["content"]] == ["thinking", "thinking", "text"]
        status = message["content"][0]
        assert status["thinking"].splitlines() == ["🔄 Switching to Model M…", "⏳ Loading Model M… 1s/180s",
                                                   "✅ Model M ready (took 3 s)"]
        assert status["signature"] == ROUTER_SIGNATURE
        assert message["content"][1]["thinking"] == "Hmm."  # the engine's own thinking, index 1
        assert message["content"][2]["text"] == "I am m. token1 token2 token3"
        assert message["stop_reason"] == "end_turn"
        assert message["usage"]["input_tokens"] == 2 and message["usage"]["output_tokens"] == 4  # the engine's


async def test_while_loading_without_thinking_only_pings_go_before_the_engines_stream(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        r.switcher.script = [*LOADING, granted(r)]
        resp = await r.client.post("/v1/messages", json=messages_body())
        names = parse_sse(resp.text).names()
        assert names[:3] == ["ping", "ping", "ping"] and names[3] == "message_start"
        engine_part = resp.text[resp.text.index("event: message_start"):]
        assert "msg_fake_" in engine_part and "msg_router_" not in resp.text
        message = accumulate_message(parse_sse(resp.text))
        assert [b["type"] for b in message["content"]] == ["text"]


@pytest.mark.parametrize("thinking", [True, False])
async def test_a_failed_load_ends_the_stream_with_an_anthropic_error_event(tmp_path: Path, thinking: bool) -> None:
    async with rig(tmp_path) as r:
        r.switcher.script = [Status("🔄 Switching to Model M…"), Failed(FAILURE, "Model M")]
        resp = await r.client.post("/v1/messages", json=messages_body(thinking=thinking))
        assert resp.status_code == 200
        events = parse_sse(resp.text)
        assert events.names()[-1] == "error"
        error = events.of("error")[0]
        assert error["type"] == "error" and error["error"]["type"] == "api_error"
        assert "model file not found" in error["error"]["message"] and "fake.service" in error["error"]["message"]
        if thinking:
            thinking_text = "".join(d["delta"].get("thinking", "") for d in events.of("content_block_delta"))
            assert "❌ Model M failed to load: the unit failed (exit code 1)" in thinking_text
            assert events.of("content_block_stop") == [{"type": "content_block_stop", "index": 0}]
        else:
            assert events.names() == ["ping", "error"]
        await r.released()
        assert r.switcher.ended[0].outcome == "load_failed"


async def test_a_failed_load_without_stream_is_an_anthropic_json_error(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        r.switcher.script = [*LOADING, Failed(FAILURE, "Model M")]
        resp = await r.client.post("/v1/messages", json=messages_body(stream=False))
        assert resp.status_code == 503
        body = resp.json()
        assert body["type"] == "error" and body["error"]["type"] == "api_error"
        assert "model file not found" in body["error"]["message"]


async def test_messages_refusals_are_anthropic_shaped(tmp_path: Path) -> None:
    async with rig(tmp_path, limits=Limits(max_body_bytes=2000)) as r:
        unknown = await r.client.post("/v1/messages", json={**messages_body(), "model": "claude-opus"})
        assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"
        assert "claude-opus" in unknown.json()["error"]["message"]
        no_messages = await r.client.post("/v1/messages", json={"model": "m", "max_tokens": 5})
        assert no_messages.status_code == 400 and no_messages.json()["error"]["type"] == "invalid_request_error"
        broken = await r.client.post("/v1/messages", content=b"{", headers={"content-type": "application/json"})
        assert broken.status_code == 400 and broken.json()["type"] == "error"
        big = await r.client.post("/v1/messages", json=messages_body(system="x" * 3000))
        assert big.status_code == 413 and big.json()["error"]["type"] == "request_too_large"
        assert r.switcher.submitted == []


async def test_anthropic_clients_authenticate_with_x_api_key_and_it_never_reaches_the_engine(tmp_path: Path) -> None:
    async with rig(tmp_path, api_key=KEY) as r:
        missing = await r.client.post("/v1/messages", json=messages_body())
        assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
        assert "x-api-key" in missing.json()["error"]["message"]
        ok = await r.client.post("/v1/messages", json=messages_body(stream=False), headers={"x-api-key": KEY})
        assert ok.status_code == 200, ok.text
        echo = await r.client.post("/upstream/m/echo", headers={"x-api-key": KEY, "authorization": f"Bearer {KEY}"})
        assert echo.status_code == 200
        sent = echo.json()["headers"]
        assert "x-api-key" not in sent and "authorization" not in sent
        openai = await r.client.post("/v1/rerank", json={"model": "m", "query": "q", "documents": ["a"]})
        assert openai.status_code == 401 and openai.json()["error"]["code"] == "invalid_api_key"


async def test_claude_codes_recorded_request_goes_through_with_the_routers_thinking_stripped(tmp_path: Path) -> None:
    recorded = fixture("claude_code_messages.json")
    history = recorded["body"]["messages"]
    assert any(b.get("signature") == ROUTER_SIGNATURE for m in history if m["role"] == "assistant"
               for b in m["content"])
    models = {"m": Model("m", "e", aliases=("tiny-a",))}  # Claude Code asked for `tiny-a`
    async with rig(tmp_path, models=models, api_key=KEY) as r:
        r.switcher.script = [*LOADING, granted(r)]
        headers = {k: v for k, v in recorded["headers"].items() if k not in ("accept-encoding",)}
        resp = await r.client.post(recorded["path"], content=json.dumps(recorded["body"]).encode(), headers=headers)
        assert resp.status_code == 200, resp.text
        message = accumulate_message(parse_sse(resp.text))
        assert message["model"] == "tiny-a"  # the router's message_start names what the client asked for
        assert [b["type"] for b in message["content"]] == ["thinking", "thinking", "text"]
        assert r.switcher.submitted == ["m"]
        [sent] = r.bodies("/v1/messages")
        assistant = [m for m in sent["messages"] if m["role"] == "assistant"]
        assert [b["type"] for m in assistant for b in m["content"]] == ["tool_use"]  # the router's block is gone
        expected = {**recorded["body"], "model": "m"}  # the alias becomes the id the engine knows
        expected["messages"] = [m if m["role"] != "assistant" else
                                {**m, "content": [b for b in m["content"] if b.get("signature") != ROUTER_SIGNATURE]}
                                for m in history]
        assert sent == expected  # everything else exactly as Claude Code sent it: tools, thinking, context_management
        assert r.engine.received[-1][:2] == ("/v1/messages", "beta=true")  # the query goes along


async def test_the_anthropic_sdks_recorded_requests_stream_and_count(tmp_path: Path) -> None:
    stream, count = fixture("anthropic_sdk_messages_stream.json"), fixture("anthropic_sdk_count_tokens.json")
    models = {"m": Model("m", "e", aliases=("tiny-a",))}
    async with rig(tmp_path, models=models) as r:
        r.switcher.script = [*LOADING, granted(r)]
        raw = json.dumps(stream["body"]).encode()
        resp = await r.client.post(stream["path"], content=raw, headers=stream["headers"])
        message = accumulate_message(parse_sse(resp.text))
        assert [b["type"] for b in message["content"]] == ["thinking", "thinking", "text"]
        assert json.loads(r.raw("/v1/messages")) == {**stream["body"], "model": "m"}  # the alias: the id
        r.switcher.script = []
        counted = await r.client.post(count["path"], json=count["body"], headers=count["headers"])
        assert counted.status_code == 200 and counted.json() == {"input_tokens": 3}


async def test_an_engine_that_never_answers_a_message_is_an_anthropic_504(tmp_path: Path) -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    hang = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = hang.sockets[0].getsockname()[1]
    try:
        async with rig(tmp_path, engine_port=port, timeouts=Timeouts(connect=5, first_byte=0.3, idle=5)) as r:
            resp = await r.client.post("/v1/messages", json=messages_body(stream=False))
            assert resp.status_code == 504 and resp.json()["error"]["type"] == "api_error"
            assert "timeouts.first_byte" in resp.json()["error"]["message"]
            r.switcher.script = [*LOADING, granted(r)]
            streamed = await r.client.post("/v1/messages", json=messages_body(thinking=True))
            events = parse_sse(streamed.text)
            assert events.names()[-1] == "error" and "timeouts.first_byte" in events.of("error")[0]["error"]["message"]
            assert events.of("content_block_stop") == [{"type": "content_block_stop", "index": 0}]
            await r.released(2)
            assert [e.outcome for e in r.switcher.ended] == ["timeout", "timeout"]
    finally:
        hang.close()


# --- the Responses API ----------------------------------------------------------------------------


async def test_codexs_recorded_request_streams_the_engines_response_after_keepalives(tmp_path: Path) -> None:
    recorded = fixture("codex_responses.json")
    models = {"m": Model("m", "e", aliases=("tiny-a",))}
    async with rig(tmp_path, models=models) as r:
        r.switcher.script = [*LOADING, granted(r)]
        headers = {k: v for k, v in recorded["headers"].items() if k not in ("accept-encoding",)}
        raw = json.dumps(recorded["body"]).encode()
        resp = await r.client.post(recorded["path"], content=raw, headers=headers)
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(resp.text)
        comments = [e.comment for e in events.items if e.comment]
        assert comments == ["loading"] * 3 and events.items[0].comment == "loading"
        assert events.names()[0] == "response.created" and events.names()[-1] == "response.completed"
        assert [d["sequence_number"] for d in (e.data for e in events.named)] == list(range(len(events.named)))
        text = "".join(d["delta"] for d in events.of("response.output_text.delta"))
        assert text == "I am m. token1 token2 token3"
        assert json.loads(r.raw("/v1/responses")) == {**recorded["body"], "model": "m"}
        await r.released()
        assert r.switcher.ended[0].prompt_tokens is not None and r.switcher.ended[0].completion_tokens == 4


async def test_the_openai_sdks_recorded_responses_request_with_the_model_loaded(tmp_path: Path) -> None:
    recorded = fixture("openai_sdk_responses_stream.json")
    models = {"m": Model("m", "e", aliases=("tiny-a",))}
    async with rig(tmp_path, models=models) as r:
        resp = await r.client.post(recorded["path"], json=recorded["body"], headers=recorded["headers"])
        events = parse_sse(resp.text)
        assert not [e for e in events.items if e.comment] and events.names()[0] == "response.created"
        whole = await r.client.post("/v1/responses", json={**recorded["body"], "stream": False})
        assert whole.status_code == 200 and whole.json()["status"] == "completed"


async def test_a_failed_load_ends_a_responses_stream_with_error_and_response_failed(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        r.switcher.script = [*LOADING, Failed(FAILURE, "Model M")]
        resp = await r.client.post("/v1/responses", json={"model": "m", "input": "hi", "stream": True})
        events = parse_sse(resp.text)
        assert events.names() == ["error", "response.failed"]
        error, failed = events.of("error")[0], events.of("response.failed")[0]
        assert error["code"] == "model_load_failed" and "model file not found" in error["message"]
        assert (error["sequence_number"], failed["sequence_number"]) == (0, 1)
        assert failed["response"]["status"] == "failed" and failed["response"]["error"]["code"] == "model_load_failed"
        plain = await r.client.post("/v1/responses", json={"model": "m", "input": "hi"})
        assert plain.status_code == 503 and plain.json()["error"]["code"] == "model_load_failed"


# --- rerank, images, audio --------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank"])
async def test_rerank_waits_for_its_model_and_passes_through(tmp_path: Path, path: str) -> None:
    async with rig(tmp_path) as r:
        r.switcher.script = [*LOADING, granted(r)]
        body = {"model": "m", "query": "which?", "documents": ["a", "b", "c"], "top_n": 3}  # Open WebUI's shape
        resp = await r.client.post(path, json=body)
        assert resp.status_code == 200 and [x["index"] for x in resp.json()["results"]] == [0, 1, 2]
        assert r.bodies(path) == [body]


async def test_images_and_speech_pass_through_speech_as_it_streams(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        image = await r.client.post("/v1/images/generations", json={"model": "m", "prompt": "a cat"})
        assert image.status_code == 200 and image.json()["data"][0]["b64_json"] == "aW1hZ2U="
        speech = await r.client.post("/v1/audio/speech", json={"model": "m", "input": "hi", "voice": "x"})
        assert speech.status_code == 200 and speech.headers["content-type"] == "audio/mpeg"
        assert speech.content == b"".join(b"ID3 m audio frame %d\n" % i for i in range(3))
        await r.released(2)


def form(fields: list[tuple[str, bytes, str | None]], boundary: str = "b0und4ry") -> tuple[bytes, dict[str, str]]:
    parts = []
    for name, value, filename in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
        head += "Content-Type: audio/wav\r\n" if filename else ""
        parts.append(head.encode() + b"\r\n" + value + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"content-type": f"multipart/form-data; boundary={boundary}"}


async def test_a_transcription_is_routed_by_its_form_field_and_forwarded_as_sent(tmp_path: Path) -> None:
    audio = bytes(range(256)) * 200  # 51 kB, every byte value (a boundary-like run included below)
    models = {"m": Model("m", "e", aliases=("whisper-1",)),
              "w": Model("w", "e", upstream_model="whisper-large-v3")}
    async with rig(tmp_path, models=models, limits=Limits(max_body_bytes=60_000)) as r:
        r.switcher.script = [*LOADING, granted(r)]
        body, headers = form([("file", audio + b"\r\n--b0und4", "a.wav"), ("model", b"whisper-1", None)])
        resp = await r.client.post("/v1/audio/transcriptions", content=body, headers=headers)  # model after the file
        assert resp.status_code == 200, resp.text
        assert resp.json()["text"] == f"I am m. I heard {len(audio) + 10} bytes."
        sent = r.raw("/v1/audio/transcriptions")  # the same bytes, the alias replaced by the id in its field
        assert sent == body.replace(b"whisper-1", b"m") and r.switcher.submitted == ["m"]
        r.switcher.script = []
        body, headers = form([("model", b"w", None), ("file", audio, "a.wav"), ("stream", b"false", None)])
        resp = await r.client.post("/v1/audio/transcriptions", content=body, headers=headers)
        assert resp.status_code == 200
        assert r.bodies("/v1/audio/transcriptions")[-1] == {"model": "whisper-large-v3", "file_bytes": len(audio)}
        no_model, headers = form([("file", audio, "a.wav")])
        missing = await r.client.post("/v1/audio/transcriptions", content=no_model, headers=headers)
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "model"
        not_form = await r.client.post("/v1/audio/transcriptions", json={"model": "m"})
        assert not_form.status_code == 400 and not_form.json()["error"]["code"] == "invalid_content_type"
        big, headers = form([("model", b"m", None), ("file", audio + audio, "a.wav")])
        too_big = await r.client.post("/v1/audio/transcriptions", content=big, headers=headers)
        assert too_big.status_code == 413
        assert r.switcher.submitted == ["m", "w"]


# --- params, aliases, /upstream -------------------------------------------------------------------


async def test_params_set_and_strip_reach_the_engine_on_every_json_api(tmp_path: Path) -> None:
    capped = Model("m", "e", params_set={"max_tokens": 3, "temperature": 0.2, "chat_template_kwargs": {"a": 1}},
                   params_strip=("metadata", "context_management"))
    async with rig(tmp_path, models={"m": capped}) as r:
        await r.client.post("/v1/messages", json=messages_body(stream=False, max_tokens=4096, metadata={"u": 1},
                                                               context_management={}))
        [sent] = r.bodies("/v1/messages")
        assert sent["max_tokens"] == 3 and sent["temperature"] == 0.2 and sent["chat_template_kwargs"] == {"a": 1}
        assert "metadata" not in sent and "context_management" not in sent
        chat = await r.client.post("/v1/chat/completions", json={"model": "m", "messages": [
            {"role": "user", "content": "hi"}], "max_tokens": 100, "metadata": {"u": 1}})
        assert chat.json()["choices"][0]["message"]["content"] == "I am m. token1 token2"  # 3 tokens: capped
        [sent] = r.bodies("/v1/chat/completions")
        assert sent["max_tokens"] == 3 and "metadata" not in sent
        await r.client.post("/v1/responses", json={"model": "m", "input": "hi", "metadata": {"u": 1}})
        [sent] = r.bodies("/v1/responses")
        assert sent["max_tokens"] == 3 and "metadata" not in sent
    strip_options = Model("m", "e", params_strip=("stream_options",))
    async with rig(tmp_path / "2", models={"m": strip_options}) as r:
        (tmp_path / "2").mkdir(exist_ok=True)
        await r.client.post("/v1/chat/completions", json={"model": "m", "stream": True, "stream_options": {
            "include_usage": True}, "messages": [{"role": "user", "content": "hi"}]})
        assert "stream_options" not in r.bodies("/v1/chat/completions")[-1]  # the stats option is not re-added


async def test_without_params_the_clients_bytes_go_to_the_engine(tmp_path: Path) -> None:
    raw = b'{"model":  "m", "max_tokens": 9, "messages": [{"role": "user", "content": "h\\u00e9"}]}'
    async with rig(tmp_path) as r:
        for path in ("/v1/messages", "/v1/responses", "/v1/rerank"):
            await r.client.post(path, content=raw, headers={"content-type": "application/json"})
            assert r.raw(path) == raw


async def test_upstream_reaches_the_engines_own_endpoints_with_any_method(tmp_path: Path) -> None:
    models = {"m": Model("m", "e"), "org/tiny": Model("org/tiny", "e", aliases=("tiny",))}
    async with rig(tmp_path, models=models) as r:
        r.switcher.script = [*LOADING, granted(r)]
        props = await r.client.get("/upstream/m/props?verbose=1&x=%2F")
        assert props.status_code == 200
        assert props.json() | {"headers": None} == {"model": "m", "method": "GET", "path": "/props",
                                                   "query": "verbose=1&x=%2F", "body_bytes": 0, "headers": None}
        r.switcher.script = []
        echo = await r.client.put("/upstream/org/tiny/echo", content=b"x" * 1000)
        assert echo.json()["method"] == "PUT" and echo.json()["body_bytes"] == 1000
        aliased = await r.client.delete("/upstream/tiny/echo")
        assert aliased.json()["method"] == "DELETE"
        assert r.switcher.submitted == ["m", "org/tiny", "org/tiny"]
        engine_404 = await r.client.get("/upstream/m/nothing/here")
        assert engine_404.status_code == 404 and "no route /nothing/here" in engine_404.text  # the engine's own
        unknown = await r.client.get("/upstream/nope/props")
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
        wrong = await r.client.post("/upstream/m/props")
        assert wrong.status_code == 405  # the engine's answer, passed through
        await r.released(5)
        assert {e.endpoint for e in r.switcher.ended} == {"/upstream"}


async def test_a_failed_load_for_upstream_and_rerank_is_an_openai_error(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        r.switcher.script = [*LOADING, Failed(FAILURE, "Model M")]
        for resp in (await r.client.get("/upstream/m/props"),
                     await r.client.post("/v1/rerank", json={"model": "m", "query": "q", "documents": ["a"]})):
            assert resp.status_code == 503
            assert resp.json()["error"]["code"] == "model_load_failed"
            assert "model file not found" in resp.json()["error"]["message"]
        queue_full = replace(FAILURE, code="queue_full")
        r.switcher.script = [Failed(queue_full, "Model M")]
        full = await r.client.post("/v1/messages", json=messages_body(stream=False))
        assert full.status_code == 429 and full.headers["retry-after"] == "5"
        assert full.json()["error"]["type"] == "rate_limit_error"


# --- the pure pieces ------------------------------------------------------------------------------


def engine_stream() -> bytes:
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": {"id": "msg_e", "type": "message", "role": "assistant",
                                                                "content": [], "usage": {"input_tokens": 7,
                                                                                         "output_tokens": 0}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "tool_use", "id": "t", "name": "f", "input": {}}}),
        ("ping", {"type": "ping"}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "input_json_delta", "partial_json": '{"index": 0, "a": "\\n\\n"'}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
                           "usage": {"output_tokens": 3}}),
        ("message_stop", {"type": "message_stop"}),
    ]
    return b"".join(fake_backend.sse_event(name, data) for name, data in events)


@pytest.mark.parametrize("cut", [1, 2, 7, 64, 10_000])
def test_message_shift_moves_every_block_up_one_whatever_the_reads(cut: int) -> None:
    from router.anthropic import MessageShift

    raw = engine_stream()
    shift = MessageShift()
    out = b"".join(shift.feed(raw[i:i + cut]) for i in range(0, len(raw), cut)) + shift.finish()
    events = parse_sse(out.decode())
    assert events.names() == ["content_block_start", "ping", "content_block_delta", "content_block_stop",
                              "message_delta", "message_stop"]
    assert {e.data["index"] for e in events.named if "index" in e.data} == {1}
    assert events.of("content_block_delta")[0]["delta"]["partial_json"] == '{"index": 0, "a": "\\n\\n"'
    assert events.of("message_delta")[0]["usage"] == {"input_tokens": 7, "output_tokens": 3}
    assert b'event: ping\ndata: {"type": "ping"}\n\n' in out  # untouched events keep their bytes


def test_multipart_fields_are_found_without_touching_the_file() -> None:
    from router import multipart

    body, headers = form([("file", b"--b0und4ry-ish\r\n\r\nname=\"model\"", "x.wav"), ("model", b"tiny", None),
                          ("stream", b"true", None)])
    boundary = multipart.boundary_of(headers["content-type"])
    assert boundary == "b0und4ry"
    assert multipart.boundary_of('multipart/form-data; boundary="q b"') == "q b"
    assert multipart.boundary_of("application/json") is None
    fields = multipart.find_fields(body, boundary, ("model", "stream"))
    assert fields is not None and fields["model"].value == b"tiny" and fields["stream"].value == b"true"
    renamed = multipart.replace_field(body, fields["model"], b"org/tiny-v2")
    again = multipart.find_fields(renamed, boundary, ("model",))
    assert again is not None and again["model"].value == b"org/tiny-v2"
    assert multipart.find_fields(body[:40], boundary, ("model",)) is None  # cut short
    assert multipart.find_fields(b"no parts", boundary, ("model",)) is None
    assert multipart.find_fields(form([("file", b"x", "a")])[0], boundary, ("model",)) == {}


async def test_an_engine_that_stalls_mid_message_ends_the_stream_with_an_error_event(tmp_path: Path) -> None:
    head = fake_backend.sse_event("message_start", {"type": "message_start", "message": {"id": "msg_e", "content": [],
                                                                                         "usage": {}}})

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                     + b"%x\r\n%s\r\n" % (len(head), head))
        await writer.drain()
        await reader.read()

    server = await asyncio.start_server(stall, "127.0.0.1", 0)
    try:
        async with rig(tmp_path, engine_port=server.sockets[0].getsockname()[1],
                       timeouts=Timeouts(connect=5, first_byte=5, idle=0.3)) as r:
            resp = await r.client.post("/v1/messages", json=messages_body())
            events = parse_sse(resp.text)
            assert events.names() == ["message_start", "error"]
            assert "timeouts.idle" in events.of("error")[0]["error"]["message"]
            await r.released()
            assert (r.switcher.ended[0].status, r.switcher.ended[0].outcome) == (504, "timeout")
    finally:
        server.close()


async def test_a_responses_stream_that_stalls_ends_with_an_error_numbered_after_the_engines_events(
        tmp_path: Path) -> None:
    head = fake_backend.sse_event("response.created", {"type": "response.created", "sequence_number": 0,
                                                       "response": {"id": "resp_e", "status": "in_progress"}})

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                     + b"%x\r\n%s\r\n" % (len(head), head))
        await writer.drain()
        await reader.read()

    server = await asyncio.start_server(stall, "127.0.0.1", 0)
    try:
        async with rig(tmp_path, engine_port=server.sockets[0].getsockname()[1],
                       timeouts=Timeouts(connect=5, first_byte=5, idle=0.3)) as r:
            r.switcher.script = [*LOADING, granted(r)]
            resp = await r.client.post("/v1/responses", json={"model": "m", "input": "hi", "stream": True})
            events = parse_sse(resp.text)
            assert events.names() == ["response.created", "error"]  # no second response: the engine's failed
            error = events.of("error")[0]
            assert error["sequence_number"] == 1 and error["code"] == "backend_timeout"
    finally:
        server.close()
