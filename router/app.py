"""HTTP API: the OpenAI endpoints, /health, /status and the admin endpoints, as a Starlette app."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from router import gpu
from router.chunks import error_body, strip_history
from router.proxy import Call, Relay, upstream_headers
from router.switcher import Failed, Granted, Status, Switcher
from router.upstream import Upstream

Handler = Callable[[Request], Awaitable[Response]]


def bad_request(message: str, code: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, code, "invalid_request_error", param), status_code=400)


class Api:
    """The request handlers; every state question goes to the switcher."""

    def __init__(self, switcher: Switcher, upstream: Upstream) -> None:
        self.switcher = switcher
        self.upstream = upstream
        self.relay = Relay(switcher, upstream)

    def _authorized(self, request: Request) -> bool:
        key = self.switcher.config.api_key
        if not key:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {key}".encode())

    def guarded(self, handler: Handler) -> Handler:
        async def wrapper(request: Request) -> Response:
            if not self._authorized(request):
                return JSONResponse(error_body("Missing or wrong API key: send `Authorization: Bearer <api_key>` "
                                               "with the api_key from config.yml.", "invalid_api_key"),
                                    status_code=401)
            return await handler(request)

        return wrapper

    # --- OpenAI endpoints ---------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        config = self.switcher.config
        data = [{"id": m.id, "object": "model", "created": 0, "owned_by": "llm-router",
                 "name": m.display_name, "state": self.switcher.model_state(m.id),
                 "backend": m.backend, "unit": config.unit_of(m)} for m in config.models.values()]
        return JSONResponse({"object": "list", "data": data})

    async def chat(self, request: Request) -> Response:
        return await self._complete(request, "/v1/chat/completions", "messages")

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, "/v1/completions", "prompt")

    async def embeddings(self, request: Request) -> Response:
        return await self._complete(request, "/v1/embeddings", "input")

    async def _complete(self, request: Request, path: str, required: str) -> Response:
        config = self.switcher.config
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError as e:
            return bad_request(f"The request body is not valid JSON: {e}.", "invalid_json")
        if not isinstance(body, dict):
            return bad_request("The request body must be a JSON object.", "invalid_json")
        model_id = body.get("model")
        if model_id is None or model_id == "":
            return bad_request("The request has no `model`: name one of GET /v1/models.", "missing_field", "model")
        if not isinstance(model_id, str):
            return bad_request(f"`model` must be a string (the id of one of GET /v1/models), not {model_id!r}.",
                               "invalid_field", "model")
        if required == "messages" and not isinstance(body.get("messages"), list):
            return bad_request("The request has no `messages` list.", "missing_field", "messages")
        if required in ("prompt", "input") and required not in body:
            return bad_request(f"The request has no `{required}`.", "missing_field", required)
        model = config.models.get(model_id)
        if model is None:
            known = ", ".join(config.models)
            return JSONResponse(error_body(f"The model `{model_id}` does not exist. Known models: {known}. "
                                           "Add it to models.yml to use it.", "model_not_found",
                                           "invalid_request_error", "model"), status_code=404)
        stream = bool(body.get("stream")) and required != "input"
        options = body.get("stream_options")
        client_usage = stream and isinstance(options, dict) and bool(options.get("include_usage"))
        changed, splice = False, False
        if model.upstream_model:
            body["model"], changed = model.upstream_model, True
        if required == "messages" and (config.switch.status_channel == "content" or config.stats):
            changed = strip_history(body["messages"]) or changed
        if stream and config.stats and not client_usage and required == "messages":
            splice = "stream_options" not in body  # nothing to merge with: the option goes in front of the bytes
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
            changed = changed or not splice
        upstream = _dumps(body) if changed else _with_usage_option(raw) if splice else raw
        call = Call(path=path, model_id=model_id, body=upstream,
                    headers=upstream_headers(request, drop_auth=bool(config.api_key)),
                    stream=stream, client_usage=client_usage, ticket=self.switcher.submit(model_id))
        try:
            return await self.relay.handle(request, call)
        except BaseException:
            self.switcher.done(call.ticket)
            raise

    # --- router endpoints ---------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        active = self.switcher.scheduler.active
        healthy: bool | None = None
        if active is not None:
            backend = self.switcher.config.backend_of(self.switcher.config.models[active])
            healthy = await self.upstream.probe(backend.url + backend.health, 1.0)
        return JSONResponse({"status": "ok", "active_model": active, "backend_healthy": healthy})

    async def status(self, request: Request) -> Response:
        s = self.switcher.scheduler
        config = self.switcher.config
        run = self.switcher.run_info
        switch = None
        if run is not None:
            switch = {"target": run.plan.target, "phase": run.phase,
                      "elapsed": round(time.monotonic() - run.started, 3),
                      "load_timeout": run.timeout}
        try:
            states = await self.switcher.systemd.states(config.managed_units())
            units: dict[str, Any] = {u: st.as_dict() for u, st in states.items()}
        except Exception as e:  # systemd unreachable: say so, keep answering
            units = {"error": str(e)}
        queued: dict[str, int] = {}
        for ticket in s.queue:
            key = ticket.model or "(unload)"
            queued[key] = queued.get(key, 0) + 1
        return JSONResponse({
            "active_model": s.active, "switch": switch, "queued": queued, "serving": dict(s.serving),
            "units": units, "last_switch": self.switcher.last_switch, "switches": s.switches_started,
            "gpu": await asyncio.to_thread(gpu.snapshot), "config_dir": str(config.config_dir),
            "config": {"loaded_at": round(self.switcher.config_loaded_at, 3),
                       "reload_error": self.switcher.reload_error},
        })

    async def admin_load(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError as e:
            return bad_request(f"The request body is not valid JSON: {e}.", "invalid_json")
        model_id = body.get("model") if isinstance(body, dict) else None
        if not isinstance(model_id, str) or model_id not in self.switcher.config.models:
            known = ", ".join(self.switcher.config.models)
            return JSONResponse(error_body(f"Unknown model `{model_id}`. Known models: {known}.",
                                           "model_not_found", param="model"), status_code=404)
        ticket = self.switcher.submit(model_id)

        async def lines() -> AsyncIterator[bytes]:
            try:
                while True:
                    update = await self.switcher.next_update(ticket)
                    if isinstance(update, Status):
                        yield _ndjson({"status": update.text})
                    elif isinstance(update, Granted):
                        yield _ndjson({"done": True, "model": model_id, "took": update.took})
                        return
                    elif isinstance(update, Failed):
                        yield _ndjson(error_body(update.message, update.error.code, "server_error"))
                        return
            finally:
                self.switcher.done(ticket)

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def admin_unload(self, request: Request) -> Response:
        config = self.switcher.config
        before = [u for u in config.managed_units() if u in self.switcher.scheduler.running]
        ticket = self.switcher.submit(None)
        try:
            update = await self.switcher.next_update(ticket)
            while isinstance(update, Status):
                update = await self.switcher.next_update(ticket)
        finally:
            self.switcher.done(ticket)
        if isinstance(update, Failed):
            return JSONResponse(error_body(update.message, update.error.code, "server_error"), status_code=503)
        return JSONResponse({"unloaded": before})


def _with_usage_option(raw: bytes) -> bytes:
    """The client's own bytes (a JSON object with at least `model`, and no `stream_options`) with
    `stream_options.include_usage` added at the front: no re-serialisation for the usual stream."""
    start = raw.find(b"{")
    return raw[:start] + b'{"stream_options":{"include_usage":true},' + raw[start + 1:]


def _dumps(obj: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(obj)
    except (TypeError, orjson.JSONEncodeError):  # an integer beyond 64 bits, say: the standard library can
        return json.dumps(obj, ensure_ascii=False).encode()


def _ndjson(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode() + b"\n"


def create_app(switcher: Switcher, upstream: Upstream) -> Starlette:
    api = Api(switcher, upstream)
    g = api.guarded
    routes = [
        Route("/health", api.health, methods=["GET"]),
        Route("/v1/models", g(api.models), methods=["GET"]),
        Route("/v1/chat/completions", g(api.chat), methods=["POST"]),
        Route("/v1/completions", g(api.completions), methods=["POST"]),
        Route("/v1/embeddings", g(api.embeddings), methods=["POST"]),
        Route("/status", g(api.status), methods=["GET"]),
        Route("/admin/load", g(api.admin_load), methods=["POST"]),
        Route("/admin/unload", g(api.admin_unload), methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})


async def _http_error(request: Request, exc: Exception) -> Response:
    """Unknown paths and wrong methods answer OpenAI-style JSON, like everything else."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = (f"No such endpoint: {request.url.path}. The router serves /v1/models, /v1/chat/completions, "
                   "/v1/completions, /v1/embeddings, /health, /status and /admin/{load,unload}.")
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}."
    else:
        message = str(exc.detail)
    return JSONResponse(error_body(message, "not_found" if exc.status_code == 404 else "invalid_request"),
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))
