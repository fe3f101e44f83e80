"""router/sleep.py against an in-process aiohttp server that plays vLLM, SGLang and broken engines."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from router import sleep
from router.config import SLEEP_KINDS, Endpoint, SleepSpec

pytestmark = pytest.mark.timeout(20)

VLLM = SLEEP_KINDS["vllm"]
SGLANG = SLEEP_KINDS["sglang"]


@dataclass
class Engine:
    """What the fake engine saw and how it behaves."""

    sleeping: bool = False
    calls: list[tuple[str, str, bytes]] = field(default_factory=list)
    status: dict[str, int] = field(default_factory=dict)  # path -> forced HTTP status
    body: dict[str, bytes] = field(default_factory=dict)  # path -> forced body
    stays_asleep_checks: int = 0  # /is_sleeping says True this many times after a wake
    delay: float = 0.0


async def serve(engine: Engine) -> tuple[web.AppRunner, str]:
    async def handler(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        engine.calls.append((request.method, request.path_qs, raw))
        await asyncio.sleep(engine.delay)
        path = request.path
        if path in engine.status:
            return web.Response(status=engine.status[path], body=engine.body.get(path, b""))
        if path in ("/sleep", "/release_memory_occupation"):
            engine.sleeping = True
        elif path in ("/wake_up", "/resume_memory_occupation"):
            engine.sleeping = False
        elif path == "/is_sleeping":
            if engine.stays_asleep_checks > 0:
                engine.stays_asleep_checks -= 1
                return web.json_response({"is_sleeping": True})
            return web.json_response({"is_sleeping": engine.sleeping})
        elif path in engine.body:
            return web.Response(body=engine.body[path])
        else:
            return web.json_response({"detail": "Not Found"}, status=404)
        return web.Response(status=200)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
async def engine() -> AsyncIterator[tuple[Engine, str]]:
    e = Engine()
    runner, url = await serve(e)
    yield e, url
    await runner.cleanup()


async def test_vllm_sleep_check_and_wake(engine: tuple[Engine, str]) -> None:
    e, url = engine
    assert await sleep.is_sleeping(url, VLLM, 5) is False
    await sleep.enter(url, VLLM, 5)
    assert e.sleeping and await sleep.is_sleeping(url, VLLM, 5) is True
    await sleep.leave(url, VLLM, 5)
    assert not e.sleeping
    assert [(m, p) for m, p, _ in e.calls] == [("GET", "/is_sleeping"), ("POST", "/sleep?level=1"),
                                               ("GET", "/is_sleeping"), ("POST", "/wake_up"),
                                               ("GET", "/is_sleeping")]  # leave confirms the wake


async def test_sglang_posts_a_json_body_and_has_no_check(engine: tuple[Engine, str]) -> None:
    e, url = engine
    await sleep.enter(url, SGLANG, 5)
    assert e.sleeping
    assert await sleep.is_sleeping(url, SGLANG, 5) is None
    await sleep.leave(url, SGLANG, 5)
    assert [(m, p, b) for m, p, b in e.calls] == [("POST", "/release_memory_occupation", b"{}"),
                                                  ("POST", "/resume_memory_occupation", b"{}")]


async def test_with_the_callers_session(engine: tuple[Engine, str]) -> None:
    _, url = engine
    async with aiohttp.ClientSession() as s:
        await sleep.enter(url, VLLM, 5, session=s)
        assert await sleep.is_sleeping(url, VLLM, 5, session=s) is True
        await sleep.leave(url, VLLM, 5, session=s)
        assert not s.closed


async def test_a_failed_wake_names_the_call_status_and_engine_words(engine: tuple[Engine, str]) -> None:
    e, url = engine
    e.status["/wake_up"] = 500
    e.body["/wake_up"] = b'{"error": {"message": "CUDA error: out of memory"}}' + b"x" * 1000
    with pytest.raises(sleep.SleepError) as info:
        await sleep.leave(url, VLLM, 5)
    msg = str(info.value)
    assert msg.startswith(f"POST {url}/wake_up failed: HTTP 500 Internal Server Error: ")
    assert "CUDA error: out of memory" in msg and msg.endswith("…") and len(msg) < 420


async def test_missing_endpoint_says_how_to_enable_sleep_mode(engine: tuple[Engine, str]) -> None:
    _, url = engine
    custom = SleepSpec("custom", Endpoint("POST", "/nap"), Endpoint("POST", "/up"))
    with pytest.raises(sleep.SleepError, match=r"HTTP 404 Not Found: .*VLLM_SERVER_DEV_MODE=1"):
        await sleep.enter(url + "/v2", VLLM, 5)
    with pytest.raises(sleep.SleepError, match=r"--enable-memory-saver"):
        await sleep.enter(url + "/v2", SGLANG, 5)
    with pytest.raises(sleep.SleepError, match=r"POST .*/nap failed: HTTP 404.*sleep: spec"):
        await sleep.enter(url, custom, 5)


async def test_leave_waits_for_the_check_then_gives_up(engine: tuple[Engine, str]) -> None:
    e, url = engine
    e.stays_asleep_checks = 3  # the engine takes a few polls to say it is awake
    await sleep.leave(url, VLLM, 5)
    assert sum(1 for _, p, _ in e.calls if p == "/is_sleeping") == 4
    e.stays_asleep_checks = 10**6
    with pytest.raises(sleep.SleepError, match=r"still says the engine sleeps after 0.3s"):
        await sleep.leave(url, VLLM, 0.3)


async def test_a_check_that_does_not_answer_a_bool(engine: tuple[Engine, str]) -> None:
    e, url = engine
    spec = SleepSpec("custom", Endpoint("POST", "/sleep"), Endpoint("POST", "/wake_up"), Endpoint("GET", "/state"))
    e.body["/state"] = b'{"sleeping": true}'
    assert await sleep.is_sleeping(url, spec, 5) is True  # "sleeping" is understood too
    e.body["/state"] = b"<html>hello</html>"
    with pytest.raises(sleep.SleepError, match=r"GET .*/state answered <html>hello</html>, not"):
        await sleep.is_sleeping(url, spec, 5)


async def test_timeout_and_unreachable(engine: tuple[Engine, str]) -> None:
    e, url = engine
    e.delay = 2.0
    with pytest.raises(sleep.SleepError, match=r"POST .*/sleep\?level=1: no answer within 0.2s"):
        await sleep.enter(url, VLLM, 0.2)
    with pytest.raises(sleep.SleepError, match=r"could not reach the engine: .*is its unit running\?"):
        await sleep.enter("http://127.0.0.1:9", VLLM, 2)  # the discard port: nothing listens
