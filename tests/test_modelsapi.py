"""The llama.cpp router-mode model API in-process: a real switcher on a fake systemd, the app on uvicorn.

Where each shape comes from (read, not guessed):
- llama.cpp tools/server/server-models.cpp, `server_models_routes::init_routes`:
  GET /models (also GET /v1/models in router mode: `server_api.get_models = get_router_models`) answers
  `{"data": [...], "object": "list"}`, each model with `id`, `aliases`, `object: "model"`, `owned_by`,
  `created` and `status: {"value", "args"}` plus, for a failed one (`is_failed()`: unloaded with a
  non-zero exit code), `"failed": true, "exit_code": N`. Status values (server-models.h,
  `server_model_status_to_string`): unloaded, loading, loaded, sleeping (downloading/downloaded: not ours).
  POST /models/load: unknown model 404 `not_found_error`, a running one (loaded, loading, sleeping:
  `is_running()`) 400 `invalid_request_error` "model is already running", else it spawns the engine and
  answers `{"success": true}` at once (the load goes on). POST /models/unload: unknown model 400
  `invalid_request_error` (sic: not 404), not running 400 "model is not running", else `{"success": true}`.
  GET /models/sse: `data: {"model", "event", "data"}\n\n` frames; a load's start is event `model_status`
  `{"status": "loading"}`, later changes `status_change` `{"status", ...}` with `exit_code` when unloaded.
- llama.cpp tools/server/server-common.cpp, `format_error_response`: errors are
  `{"error": {"code": <HTTP status>, "message", "type"}}` (400 invalid_request_error, 404 not_found_error,
  500 server_error, 503 unavailable_error).
- Open WebUI 0.12.4 (PyPI wheel) backend/open_webui/routers/openai.py: a "llama.cpp" connection marks a
  model loaded when `status.value` is loaded or sleeping (`get_provider_model_loaded_state`), not loaded for
  loading or unloaded; it posts `{"model": id}` to `<url without /v1>/models/load` and `/models/unload`;
  main.py's /api/models/unload (the model selector's Eject) gives /models/unload 30 s.
- GET /v1/models/{id}: the OpenAI SDK's `models.retrieve`; an unknown id is a 404 in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fakes import FakeProbe, FakeSystemd

from router import journal
from router.app import create_app
from router.config import Backend, Config, Model, SwitchSettings, SystemdSettings
from router.events import ModelState
from router.gpu import GpuReader, GpuSnapshot
from router.modelsapi import sse_event
from router.observability import Observability
from router.switcher import Switcher

pytestmark = pytest.mark.timeout(30)

ADMIN = {"authorization": "Bearer boss"}
CLIENT = {"authorization": "Bearer client"}
MODEL_FIELDS = {"id", "object", "created", "owned_by", "name", "state", "backend", "unit", "aliases", "status"}


class NoGpu(GpuReader):
    def read(self) -> GpuSnapshot:
        self._last = GpuSnapshot(False, reason="no GPU in tests")
        return self._last


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_config(tmp_path: Path, **extra: Any) -> Config:
    backends = {"one": Backend("one", "one.service", "http://127.0.0.1:9")}
    models = {"a": Model("a", "one", name="Model A", unit="a.service", aliases=("alpha",),
                        command=("/bin/engine", "--model", "a")),
              "b": Model("b", "one", unit="b.service"),
              "hidden": Model("hidden", "one", unit="hidden.service", unlisted=True)}
    return Config(config_dir=tmp_path, backends=backends, models=models,
                  systemd=SystemdSettings(bus="user", dropin_dir=tmp_path),
                  switch=SwitchSettings(linger=0, health_interval=0.01, failure_cooldown=30), **extra)


@dataclass
class Rig:
    switcher: Switcher
    systemd: FakeSystemd
    observability: Observability
    url: str
    ready_in: dict[str, float]

    def client(self, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers=ADMIN if headers is None else headers, timeout=10)

    def units_running(self) -> set[str]:
        return self.systemd.running()


@pytest.fixture
async def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    async def no_journal(*_: Any, **__: Any) -> list[str]:
        return ["engine: model file not found"]

    monkeypatch.setattr(journal, "tail", no_journal)
    keys = getattr(request, "param", {"api_key": "client", "admin_api_keys": ("boss",)})
    keys = {**keys, "api_keys": (*keys.get("api_keys", ()), "boss")}  # the admin key reads too
    config = make_config(tmp_path, **keys)
    ready_in: dict[str, float] = {}
    systemd = FakeSystemd(tmp_path, lambda unit: "http://127.0.0.1:9", lambda m: ready_in.get(m or "", 0.0))
    switcher = Switcher(config, systemd, FakeProbe(systemd))
    obs = Observability(switcher, None, gpu=NoGpu(), process_metrics=False)
    await switcher.start()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(switcher, httpx.AsyncClient(), obs),  # type: ignore[arg-type]
                                           host="127.0.0.1", port=port, loop="none", lifespan="off",
                                           log_level="warning"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        assert not serving.done()
        await asyncio.sleep(0.01)
    try:
        yield Rig(switcher, systemd, obs, f"http://127.0.0.1:{port}", ready_in)
    finally:
        obs.stop_streams()
        server.should_exit = True
        await asyncio.wait_for(serving, 10)
        await obs.close()
        await switcher.close()


async def statuses(c: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    r = await c.get("/v1/models")
    assert r.status_code == 200, r.text
    return {m["id"]: m["status"] for m in r.json()["data"]}


async def until(c: httpx.AsyncClient, model: str, value: str, timeout: float = 5.0) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        status = (await statuses(c))[model]
        if status["value"] == value:
            return status
        assert loop.time() < deadline, f"{model} stayed {status} (waited for {value})"
        await asyncio.sleep(0.02)


def llama_error(r: httpx.Response, status: int, type_: str) -> str:
    """The message of a llama.cpp-shaped error, after checking the shape."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "type"}, body
    assert body["error"]["code"] == status and body["error"]["type"] == type_, body
    return str(body["error"]["message"])


# --- reading ------------------------------------------------------------------------------------------------


async def test_both_lists_carry_every_field_and_llama_cpp_status(rig: Rig) -> None:
    async with rig.client(CLIENT) as c:
        models = (await c.get("/models")).json()
        v1 = (await c.get("/v1/models")).json()
    assert models == v1 and models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["a", "b"]  # `hidden` is unlisted
    a = models["data"][0]
    assert set(a) == MODEL_FIELDS
    assert a == {"id": "a", "object": "model", "created": 0, "owned_by": "llm-router", "name": "Model A",
                 "state": "unloaded", "backend": "one", "unit": "a.service", "aliases": ["alpha"],
                 "status": {"value": "unloaded", "args": ["/bin/engine", "--model", "a"]}}
    assert models["data"][1]["status"] == {"value": "unloaded", "args": []}


async def test_retrieve_one_model_by_id_alias_or_unlisted_id(rig: Rig) -> None:
    async with rig.client(CLIENT) as c:
        a = (await c.get("/v1/models/a")).json()
        assert a["id"] == "a" and a["status"]["value"] == "unloaded" and set(a) == MODEL_FIELDS
        assert (await c.get("/v1/models/alpha")).json() == a
        assert (await c.get("/v1/models/hidden")).json()["id"] == "hidden"
        r = await c.get("/v1/models/nope")
    assert r.status_code == 404
    error = r.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}  # OpenAI's shape, for models.retrieve
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "`nope`" in error["message"] and "a, b" in error["message"] and "hidden" not in error["message"]


# --- load ---------------------------------------------------------------------------------------------------


async def test_load_answers_at_once_and_the_model_loads(rig: Rig) -> None:
    rig.ready_in["a"] = 0.5  # the engine answers its health check half a second after its start
    async with rig.client() as c:
        r = await asyncio.wait_for(c.post("/models/load", json={"model": "alpha"}), 0.4)
        assert r.status_code == 200 and r.json() == {"success": True}
        assert (await statuses(c))["a"]["value"] == "loading"
        await until(c, "a", "loaded")
        assert rig.units_running() == {"a.service"}
        message = llama_error(await c.post("/models/load", json={"model": "a"}), 400, "invalid_request_error")
        assert "already loaded" in message
    assert not rig.switcher.scheduler.serving  # the load's ticket was let go once granted


async def test_load_of_another_model_switches_like_a_request(rig: Rig) -> None:
    async with rig.client() as c:
        await c.post("/models/load", json={"model": "a"})
        await until(c, "a", "loaded")
        r = await c.post("/models/load", json={"model": "b"})
        assert r.json() == {"success": True}
        await until(c, "b", "loaded")
        assert (await statuses(c))["a"]["value"] == "unloaded"
    assert rig.units_running() == {"b.service"}


async def test_load_refusals(rig: Rig) -> None:
    async with rig.client() as c:
        assert "`nope`" in llama_error(await c.post("/models/load", json={"model": "nope"}), 404, "not_found_error")
        assert "no `model`" in llama_error(await c.post("/models/load", json={}), 400, "invalid_request_error")
        assert "no `model`" in llama_error(await c.post("/models/load", json={"model": 3}), 400,
                                           "invalid_request_error")
        r = await c.post("/models/load", content=b"{not json", headers={"content-type": "application/json"})
        llama_error(r, 400, "invalid_request_error")
    assert rig.units_running() == set()


async def test_a_failed_load_shows_failed_with_its_exit_code_and_error(rig: Rig) -> None:
    rig.systemd.script("start", "fail")  # the unit exits with status 3, twice (the load is retried once)
    rig.systemd.script("start", "fail")
    async with rig.client() as c:
        assert (await c.post("/models/load", json={"model": "b"})).json() == {"success": True}
        for _ in range(250):
            status = (await statuses(c))["b"]
            if status.get("failed"):
                break
            await asyncio.sleep(0.02)
        assert status["value"] == "unloaded" and status["failed"] is True and status["exit_code"] == 3
        assert "did not start" in status["error"] and "model file not found" in status["error"]
        assert (await c.get("/v1/models/b")).json()["state"] == "failed"  # the router's own field says it too
        # during the failure cooldown a load is refused at once, with the same error
        message = llama_error(await c.post("/models/load", json={"model": "b"}), 503, "unavailable_error")
        assert "did not start" in message and "next try in" in message


# --- unload -------------------------------------------------------------------------------------------------


async def test_unload_stops_the_model_and_answers_when_it_is_stopped(rig: Rig) -> None:
    async with rig.client() as c:
        await c.post("/models/load", json={"model": "a"})
        await until(c, "a", "loaded")
        r = await c.post("/models/unload", json={"model": "alpha"})
        assert r.status_code == 200 and r.json() == {"success": True}
        assert (await statuses(c))["a"]["value"] == "unloaded"  # already, when the answer comes
        assert rig.units_running() == set()
        message = llama_error(await c.post("/models/unload", json={"model": "a"}), 400, "invalid_request_error")
        assert "not running" in message


async def test_unload_leaves_other_models_alone(rig: Rig) -> None:
    async with rig.client() as c:
        await c.post("/models/load", json={"model": "a"})
        await until(c, "a", "loaded")
        message = llama_error(await c.post("/models/unload", json={"model": "b"}), 400, "invalid_request_error")
        assert "`b` is not running" in message
        # llama.cpp answers an unknown model on /models/unload with 400, not 404
        llama_error(await c.post("/models/unload", json={"model": "nope"}), 400, "invalid_request_error")
        assert (await statuses(c))["a"]["value"] == "loaded"
    assert rig.units_running() == {"a.service"}


async def test_admin_endpoints_keep_working(rig: Rig) -> None:
    async with rig.client() as c:
        r = await c.post("/admin/load", json={"model": "b"})
        assert r.status_code == 200 and '"done": true' in r.text
        assert (await statuses(c))["b"]["value"] == "loaded"
        r = await c.post("/admin/unload")
        assert r.status_code == 200 and r.json() == {"unloaded": ["b.service"]}
        assert (await statuses(c))["b"]["value"] == "unloaded"


# --- keys ---------------------------------------------------------------------------------------------------


async def test_reading_needs_a_client_key_and_actions_an_admin_key(rig: Rig) -> None:
    async with rig.client({}) as anonymous, rig.client(CLIENT) as client, rig.client(ADMIN) as admin:
        for path in ("/models", "/v1/models", "/v1/models/a", "/models/sse"):
            assert (await anonymous.get(path)).status_code == 401, path
        for path in ("/models", "/v1/models", "/v1/models/a"):
            assert (await client.get(path)).status_code == 200, path
        for path in ("/models/load", "/models/unload"):
            r = await client.post(path, json={"model": "a"})
            assert r.status_code == 401 and "admin_api_keys" in r.json()["error"]["message"], path
            assert path in r.json()["error"]["message"]
        assert (await admin.post("/models/load", json={"model": "a"})).status_code == 200
    assert not any(rig.switcher.scheduler.queue)


@pytest.mark.parametrize("rig", [{"api_key": "client"}], indirect=True)
async def test_without_admin_keys_client_keys_load_and_unload(rig: Rig) -> None:
    async with rig.client(CLIENT) as c:
        assert (await c.post("/models/load", json={"model": "a"})).status_code == 200
        await until(c, "a", "loaded")
        assert (await c.post("/models/unload", json={"model": "a"})).status_code == 200


# --- events -------------------------------------------------------------------------------------------------


async def read_events(lines: AsyncIterator[str], count: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    async for line in lines:
        if line.startswith("data: "):
            events.append(json.loads(line[len("data: "):]))
            if len(events) == count:
                return events
    raise AssertionError(f"the stream ended after {events}")


async def test_sse_sends_each_status_change_of_a_switch_in_llama_cpp_format(rig: Rig) -> None:
    async with rig.client(CLIENT) as reader, rig.client() as admin:
        async with reader.stream("GET", "/models/sse") as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            lines = r.aiter_lines()
            assert await anext(lines) == ": connected"
            await admin.post("/models/load", json={"model": "a"})
            first = await asyncio.wait_for(read_events(lines, 2), 5)
            await admin.post("/models/load", json={"model": "b"})
            switch = await asyncio.wait_for(read_events(lines, 3), 5)
    assert first == [{"model": "a", "event": "model_status", "data": {"status": "loading"}},
                     {"model": "a", "event": "status_change", "data": {"status": "loaded"}}]
    # b is loading while a is being stopped to make room; a is unloaded before b is loaded
    assert switch == [{"model": "b", "event": "model_status", "data": {"status": "loading"}},
                      {"model": "a", "event": "status_change", "data": {"status": "unloaded", "exit_code": 0}},
                      {"model": "b", "event": "status_change", "data": {"status": "loaded"}}]


async def test_sse_says_a_failed_load_with_its_exit_code(rig: Rig) -> None:
    rig.systemd.script("start", "fail")
    rig.systemd.script("start", "fail")
    async with rig.client(CLIENT) as reader, rig.client() as admin:
        async with reader.stream("GET", "/models/sse") as r:
            lines = r.aiter_lines()
            await anext(lines)
            await admin.post("/models/load", json={"model": "b"})
            events = await asyncio.wait_for(read_events(lines, 2), 5)
    assert events[0] == {"model": "b", "event": "model_status", "data": {"status": "loading"}}
    failed = events[1]
    assert failed["event"] == "status_change" and failed["model"] == "b"
    assert failed["data"]["status"] == "unloaded" and failed["data"]["exit_code"] == 3
    assert failed["data"]["failed"] is True and "did not start" in failed["data"]["error"]


async def test_sse_streams_end_when_the_router_stops(rig: Rig) -> None:
    async def rest(lines: AsyncIterator[str]) -> list[str]:
        return [line async for line in lines]

    async with rig.client(CLIENT) as reader:
        async with reader.stream("GET", "/models/sse") as r:
            lines = r.aiter_lines()
            await anext(lines)
            rig.observability.stop_streams()  # what the daemon does on SIGTERM
            assert [line for line in await asyncio.wait_for(rest(lines), 5) if line] == []


def test_sse_frame_of_a_sleeping_model() -> None:
    assert sse_event(ModelState("a", "sleeping")) == (
        b'data: {"model":"a","event":"status_change","data":{"status":"sleeping"}}\n\n')
