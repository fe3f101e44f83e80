"""In-process tests of the HTTP layer's edges (no root, no systemd): keys, body limits, bad JSON, and the
server's limits on raw sockets. Every refusal must answer OpenAI-style JSON, never a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from structlog.testing import capture_logs

from router import app as app_module
from router import httpserver
from router.config import Backend, Config, Limits, Model
from router.daemon import _Server, uvicorn_config
from router.events import EventBus
from router.requestbody import MAX_JSON_DEPTH

pytestmark = pytest.mark.timeout(30)

MODEL = Model(id="tiny", backend="llamacpp")
BASE = Config(config_dir=Path("/etc/llm-router"),
              backends={"llamacpp": Backend("llamacpp", "llamacpp.service", "http://127.0.0.1:9")},
              models={"tiny": MODEL})


@dataclass
class FakeScheduler:
    active: str | None = None
    queue: list[Any] = field(default_factory=list)
    serving: dict[str, int] = field(default_factory=dict)


class FakeSwitcher:
    """What the app asks of the switcher before a request reaches the relay."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.scheduler = FakeScheduler()
        self.submitted: list[str | None] = []
        self.released = 0
        self.events = EventBus()

    systemd = None  # /health reads `connected` from it (absent: reachable)

    def model_state(self, model_id: str) -> str:
        return "stopped"

    async def heartbeat(self, timeout: float) -> bool:
        return True

    def submit(self, model_id: str | None, priority: int = 1) -> object:
        self.submitted.append(model_id)
        return object()

    def done(self, ticket: object) -> None:
        self.released += 1


class EchoRelay:
    """Stands in for the relay: answers what it would have sent upstream."""

    def __init__(self, switcher: Any, http: Any) -> None:
        self.switcher = switcher

    async def handle(self, request: Request, call: Any) -> Response:
        self.switcher.done(call.ticket)
        return JSONResponse({"stream": call.stream, "body": json.loads(call.body), "headers": call.headers})


@pytest.fixture(autouse=True)
def echo_relay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_module, "Relay", EchoRelay)


def make_app(config: Config = BASE) -> tuple[Any, FakeSwitcher]:
    switcher = FakeSwitcher(config)
    return app_module.create_app(switcher, httpx.AsyncClient()), switcher  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def client(config: Config = BASE) -> AsyncIterator[httpx.AsyncClient]:
    app, _ = make_app(config)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as c:
        yield c


def error_of(r: httpx.Response) -> dict[str, Any]:
    assert r.headers["content-type"] == "application/json", r.text
    body = r.json()
    assert set(body) == {"error"}, body
    return dict(body["error"])


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


# --- keys --------------------------------------------------------------------------------------------------

KEYED = replace(BASE, api_key="main-key", api_keys=("k2", "k3"))


@pytest.mark.parametrize("key", ["main-key", "k2", "k3"])
async def test_every_client_key_opens_the_api(key: str) -> None:
    async with client(KEYED) as c:
        r = await c.post("/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {key}"})
        assert r.status_code == 200
        assert "authorization" not in r.json()["headers"]  # the client's key never goes to the engine
        r = await c.post("/admin/unload", headers={"authorization": f"bearer {key}"})
        assert r.status_code != 401  # without admin_api_keys, client keys open /admin too


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer wrong", "Basic main-key", "Bearer main-key2",
                                    "Bearer k", "main-key"])
async def test_wrong_or_missing_key_is_401_json(header: str | None) -> None:
    async with client(KEYED) as c:
        headers = {"authorization": header} if header is not None else {}
        r = await c.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert r.status_code == 401
        assert error_of(r)["code"] == "invalid_api_key"
        assert (await c.get("/health")).status_code == 200  # /health stays open


async def test_admin_keys_alone_open_admin() -> None:
    config = replace(KEYED, admin_api_keys=("boss",))
    async with client(config) as c:
        r = await c.post("/admin/load", json={"model": "nope"}, headers={"authorization": "Bearer k2"})
        assert r.status_code == 401
        assert "admin_api_keys" in error_of(r)["message"]
        r = await c.post("/admin/load", json={"model": "nope"}, headers={"authorization": "Bearer boss"})
        assert r.status_code == 404  # past the guard
        r = await c.get("/v1/models", headers={"authorization": "Bearer boss"})
        assert r.status_code == 401  # an admin key is not a client key
        assert (await c.get("/v1/models", headers={"authorization": "Bearer k3"})).status_code == 200


async def test_admin_keys_without_client_keys_leave_the_api_open() -> None:
    async with client(replace(BASE, admin_api_keys=("boss",))) as c:
        assert (await c.get("/v1/models")).status_code == 200
        assert (await c.post("/admin/unload")).status_code == 401


async def test_non_ascii_key() -> None:
    async with client(replace(BASE, api_key="clé-ü")) as c:
        raw = "Bearer clé-ü".encode()
        r = await c.get("/v1/models", headers=[(b"authorization", raw)])
        assert r.status_code == 200


# --- bodies ------------------------------------------------------------------------------------------------

SMALL = replace(BASE, limits=Limits(max_body_bytes=1000))


async def test_body_over_the_limit_is_413_with_content_length() -> None:
    async with client(SMALL) as c:
        r = await c.post("/v1/chat/completions", content=b"x" * 1001)
        assert r.status_code == 413
        assert error_of(r)["code"] == "request_too_large"
        assert r.headers["connection"] == "close"
        assert (await c.post("/v1/chat/completions", json={**CHAT, "pad": "x" * 800})).status_code == 200


async def test_chunked_body_over_the_limit_is_413_without_reading_it_all() -> None:
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(1000):
            sent += 100
            yield b"x" * 100

    async with client(SMALL) as c:
        r = await c.post("/v1/chat/completions", content=chunks())
        assert r.status_code == 413
        assert sent < 1000 * 100


async def test_admin_load_body_limit_and_bad_json() -> None:
    async with client(SMALL) as c:
        assert (await c.post("/admin/load", content=b"{" * 2000)).status_code == 413
        r = await c.post("/admin/load", content=b"[1]")
        assert r.status_code == 400 and error_of(r)["code"] == "invalid_json"
        r = await c.post("/admin/load", content=b'{"model": "\\ud800"}')
        assert r.status_code == 400 and error_of(r)["code"] == "invalid_json"


@pytest.mark.parametrize(("raw", "message"), [
    (b"[" * 5000 + b"]" * 5000, "nests deeper than"),
    (b'{"model": "tiny", "messages": ' + b"[" * 1000 + b"]" * 1000 + b"}", "nests deeper than"),
    (b'{"model": "tiny", "messages": ' + b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1) + b"}",
     "nests deeper than"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}', "lone UTF-16 surrogate"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff x"}]}', "lone UTF-16 surrogate"),
    (b'{"model": "tiny", "\\udc80": 1, "messages": []}', "lone UTF-16 surrogate"),
    (b'{"model": "tiny", "messages": [{"content": "\xed\xa0\x80"}]}', "not valid UTF-8"),
    (b'{"model": "tiny", "messages": [{"content": "\xff"}]}', "not valid UTF-8"),
    (b'{"model": "tiny", "messages": []', "not valid JSON"),
    (b"", "not valid JSON"),
    (b"null", "must be a JSON object"),
])
async def test_bad_json_is_400_invalid_json(raw: bytes, message: str) -> None:
    async with client() as c:
        r = await c.post("/v1/chat/completions", content=raw)
        assert r.status_code == 400, r.text
        err = error_of(r)
        assert err["code"] == "invalid_json"
        assert message in err["message"]


async def test_paired_surrogates_and_moderate_depth_are_fine() -> None:
    nested: Any = "deep"
    for _ in range(MAX_JSON_DEPTH - 5):
        nested = [nested]
    body = {**CHAT, "messages": [{"role": "user", "content": "\\ud83d\\ude00 \U0001f600"}], "tools": nested}
    async with client() as c:
        raw = json.dumps(body).replace("\\\\ud83d\\\\ude00", "\\ud83d\\ude00").encode()
        r = await c.post("/v1/chat/completions", content=raw)
        assert r.status_code == 200, r.text
        assert r.json()["body"]["messages"][0]["content"] == "\U0001f600 \U0001f600"


@pytest.mark.parametrize("value", ['"false"', '"true"', "0", "1", "[]", "{}"])
async def test_stream_must_be_a_boolean(value: str) -> None:
    async with client() as c:
        raw = f'{{"model": "tiny", "messages": [], "stream": {value}}}'.encode()
        r = await c.post("/v1/chat/completions", content=raw)
        assert r.status_code == 400
        err = error_of(r)
        assert (err["code"], err["param"]) == ("invalid_field", "stream")
        assert value in err["message"]


@pytest.mark.parametrize(("value", "stream"), [("true", True), ("false", False), ("null", False)])
async def test_stream_booleans_and_null(value: str, stream: bool) -> None:
    async with client() as c:
        raw = f'{{"model": "tiny", "messages": [], "stream": {value}}}'.encode()
        r = await c.post("/v1/chat/completions", content=raw)
        assert r.status_code == 200
        assert r.json()["stream"] is stream


async def test_client_leaving_mid_upload_logs_one_line_and_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    app, switcher = make_app()
    messages: list[dict[str, Any]] = [{"type": "http.request", "body": b'{"model": "tiny", ', "more_body": True},
                {"type": "http.disconnect"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "headers": [(b"content-type", b"application/json")], "http_version": "1.1",
             "scheme": "http", "server": ("127.0.0.1", 8002), "client": ("127.0.0.1", 5555), "root_path": ""}
    with caplog.at_level(logging.DEBUG), capture_logs() as logs:
        await app(scope, receive, send)
    assert [e["event"] for e in logs] == ["client_left_during_upload"]
    assert logs[0]["received"] == len(b'{"model": "tiny", ')
    assert "Traceback" not in caplog.text
    assert switcher.submitted == []  # never queued


async def test_unknown_path_and_method_are_json() -> None:
    async with client() as c:
        assert error_of(await c.get("/nope"))["code"] == "not_found"
        assert (await c.get("/v1/chat/completions")).status_code == 405


async def test_a_bug_answers_json_500(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Any, model_id: str) -> str:
        raise KeyError(model_id)

    monkeypatch.setattr(FakeSwitcher, "model_state", broken)
    async with client() as c:
        r = await c.get("/v1/models")
        assert r.status_code == 500
        assert error_of(r)["code"] == "internal_error"


# --- the HTTP server's limits, on raw sockets ---------------------------------------------------------------

TIGHT = Limits(max_body_bytes=10_000, max_header_bytes=2048, idle_connection=0.5, header_timeout=0.6,
               max_connections=20)


@contextlib.asynccontextmanager
async def server(limits: Limits = TIGHT) -> AsyncIterator[int]:
    app, _ = make_app(replace(BASE, limits=limits))
    config = uvicorn_config(app, replace(BASE, limits=limits))
    config.port = 0
    srv = _Server(config)  # leaves pytest's signal handlers alone
    config.load()
    task = asyncio.create_task(srv.serve(sockets=None))
    while not srv.started:
        await asyncio.sleep(0.01)
        if task.done():
            task.result()
    port = srv.servers[0].sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        srv.should_exit = True
        await asyncio.wait_for(task, 10)


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def read_response(reader: asyncio.StreamReader, timeout: float = 5) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one response; (0, {}, b"") when the server closes without one."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout) if not reader.at_eof() else b""
    if not head:
        return 0, {}, b""
    lines = head.decode("latin-1").split("\r\n")
    headers = dict((k.lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:] if line))
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), timeout)
    return int(lines[0].split()[1]), headers, body


async def closed(reader: asyncio.StreamReader, timeout: float = 5) -> bool:
    return await asyncio.wait_for(reader.read(65536), timeout) == b""


REQUEST = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
           b"content-length: %d\r\n\r\n")


def chat_request(body: bytes = json.dumps(CHAT).encode()) -> bytes:
    return REQUEST % len(body) + body


async def test_server_serves_keep_alive_requests() -> None:
    async with server() as port:
        reader, writer = await connect(port)
        for _ in range(3):
            writer.write(chat_request())
            status, _, body = await read_response(reader)
            assert status == 200 and json.loads(body)["body"]["model"] == "tiny"
        writer.close()


async def test_idle_connection_is_closed() -> None:
    async with server() as port:
        reader, writer = await connect(port)  # never sends a byte
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await closed(reader)
        assert loop.time() - t0 < 3
        reader, writer = await connect(port)  # idle after one request (keep-alive)
        writer.write(chat_request())
        assert (await read_response(reader))[0] == 200
        assert await closed(reader)
        writer.close()


async def test_slowloris_head_gets_408_and_is_closed() -> None:
    async with server() as port:
        reader, writer = await connect(port)
        writer.write(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n")
        status, body = 0, b""
        for i in range(30):
            writer.write(b"x-a%d: b\r\n" % i)  # a header every 0.1 s: never done
            try:
                status, _, body = await read_response(reader, timeout=0.1)
                break
            except TimeoutError:
                continue
        assert status == 408
        assert json.loads(body)["error"]["code"] == "request_timeout"
        assert await closed(reader)
        writer.close()


async def test_huge_headers_get_431_before_they_are_buffered() -> None:
    async with server() as port:
        reader, writer = await connect(port)
        writer.write(b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-big: ")
        with contextlib.suppress(ConnectionError):
            for _ in range(100):
                writer.write(b"a" * 1000)
                await writer.drain()
        status, headers, body = await read_response(reader)
        assert status == 431
        assert headers["connection"] == "close"
        assert json.loads(body)["error"]["code"] == "headers_too_large"
        writer.close()


async def test_headers_under_the_cap_with_a_body_in_the_same_packet_pass() -> None:
    async with server() as port:
        reader, writer = await connect(port)
        body = json.dumps({**CHAT, "pad": "x" * 8000}).encode()  # head + body > max_header_bytes, head alone not
        writer.write(REQUEST % len(body) + body)
        assert (await read_response(reader))[0] == 200
        writer.close()


async def test_pipelined_requests_and_a_later_oversized_head() -> None:
    async with server() as port:
        reader, writer = await connect(port)
        writer.write(chat_request() * 3)  # three requests in one packet
        for _ in range(3):
            assert (await read_response(reader))[0] == 200
        writer.write(b"GET /v1/models HTTP/1.1\r\nx-big: " + b"a" * 5000 + b"\r\n\r\n")  # over 2048
        status, _, body = await read_response(reader)
        assert status == 431 and json.loads(body)["error"]["code"] == "headers_too_large"
        assert await closed(reader)
        writer.close()


async def test_body_that_stops_arriving_closes_the_connection() -> None:
    async with server() as port:
        reader, writer = await connect(port)
        writer.write(REQUEST % 5000 + b'{"model": "tiny"')
        with capture_logs() as logs:
            assert await closed(reader)
        assert "client_left_during_upload" in [e["event"] for e in logs]
        writer.close()


async def test_body_over_the_limit_413_over_the_wire() -> None:
    async with server() as port:
        reader, writer = await connect(port)
        writer.write(REQUEST % 50_000_000 + b"{")
        status, headers, _body = await read_response(reader)
        assert status == 413 and headers["connection"] == "close"
        assert await closed(reader)
        writer.close()


async def test_invalid_http_is_json_400() -> None:
    async with server() as port:
        reader, writer = await connect(port)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        status, _, body = await read_response(reader)
        assert status == 400 and json.loads(body)["error"]["code"] == "invalid_http"
        writer.close()


async def test_websocket_upgrade_is_plain_http(caplog: pytest.LogCaptureFixture) -> None:
    async with server() as port:
        reader, writer = await connect(port)
        writer.write(b"GET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n"
                     b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n")
        status, _, body = await read_response(reader)
        assert status == 200 and json.loads(body)["object"] == "list"
        writer.close()
    assert "upgrade" not in caplog.text.lower()


async def test_connections_past_the_cap_get_503_and_one_warning() -> None:
    limits = replace(TIGHT, max_connections=5, idle_connection=5, header_timeout=5)
    async with server(limits) as port:
        with capture_logs() as logs:
            held = [await connect(port) for _ in range(5)]
            await asyncio.sleep(0.2)
            refused = [await connect(port) for _ in range(3)]
            for reader, _ in refused:
                status, _, body = await read_response(reader)
                assert status == 503 and json.loads(body)["error"]["code"] == "too_many_connections"
        assert [e["event"] for e in logs] == ["connections_refused"]
        for _, writer in held + refused:
            writer.close()
        await asyncio.sleep(0.2)
        reader, writer = await connect(port)  # room again
        writer.write(chat_request())
        assert (await read_response(reader))[0] == 200
        writer.close()


def test_connection_cap_stays_below_the_open_file_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpserver.resource, "getrlimit", lambda _: (1024, 4096))
    with capture_logs() as logs:
        assert httpserver.connection_cap(Limits(max_connections=4096)) == 1024 - httpserver.RESERVED_FDS
        assert httpserver.connection_cap(Limits(max_connections=100)) == 100
    assert [e["event"] for e in logs] == ["max_connections_lowered"]

