"""HTTP API: the OpenAI endpoints, /health, /status and the admin endpoints, as a Starlette app."""

from __future__ import annotations

import asyncio
import hashlib
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
from router.apiroutes import ApiRoutes
from router.chunks import error_body, strip_history
from router.config import Config
from router.modelsapi import ModelsApi
from router.observability import Observability
from router.params import apply_params, has_params
from router.proxy import Call, Relay, upstream_headers
from router.requestbody import BadBody, ClientLeft, check_stream, parse_body, read_body
from router.scheduler import PRIORITIES, Ticket
from router.statuspage import index, models_overview
from router.switcher import Failed, Granted, Status, Switcher, failure_status
from router.upstream import Upstream

Handler = Callable[[Request], Awaitable[Response]]
HEALTH_HEARTBEAT = 2.0  # seconds the run loop has to answer /health


def bad_request(message: str, code: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, code, "invalid_request_error", param), status_code=400)


def refuse(bad: BadBody) -> JSONResponse:
    """The answer to a body router.requestbody refused."""
    return JSONResponse(error_body(bad.message, bad.code, "invalid_request_error", bad.param),
                        status_code=bad.status, headers={"connection": "close"} if bad.close else None)


def _digests(keys: tuple[str, ...]) -> tuple[bytes, ...]:
    return tuple(hashlib.sha256(k.encode("utf-8")).digest() for k in keys)


def _bearer(header: str | None) -> bytes | None:
    """The token of an `Authorization: Bearer TOKEN` header, as the bytes the client sent."""
    scheme, _, token = (header or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token.encode("latin-1")  # starlette decodes header bytes as latin-1: this gives them back


def _tokens(request: Request) -> list[bytes]:
    """The keys a request carries: `Authorization: Bearer KEY` and Anthropic clients' `x-api-key: KEY`."""
    tokens = []
    if (bearer := _bearer(request.headers.get("authorization"))) is not None:
        tokens.append(bearer)
    if key := request.headers.get("x-api-key", "").strip():
        tokens.append(key.encode("latin-1"))
    return tokens


class Api:
    """The request handlers; every state question goes to the switcher."""

    def __init__(self, switcher: Switcher, upstream: Upstream) -> None:
        self.switcher = switcher
        self.upstream = upstream
        self.relay = Relay(switcher, upstream)
        self._keys_of: Config | None = None  # the config the digests below were made from
        self._client_digests: tuple[bytes, ...] = ()
        self._admin_digests: tuple[bytes, ...] = ()

    def _allowed(self, admin: bool) -> tuple[bytes, ...]:
        """SHA-256 digests of the keys that open an endpoint (admin: admin_api_keys when set); () = open."""
        config = self.switcher.config
        if self._keys_of is not config:
            self._client_digests = _digests(config.client_keys)
            self._admin_digests = _digests(config.admin_api_keys)
            self._keys_of = config
        return self._admin_digests if admin and self._admin_digests else self._client_digests

    def _authorized(self, request: Request, admin: bool = False) -> bool:
        allowed = self._allowed(admin)
        if not allowed:
            return True
        match = False
        for token in _tokens(request):
            given = hashlib.sha256(token).digest()
            for digest in allowed:  # equal-length digests, every key compared: no timing hint at which one
                match |= hmac.compare_digest(digest, given)
        return match

    def guarded(self, handler: Handler, admin: bool = False,
                unauthorized: Callable[[str], Response] | None = None) -> Handler:
        """`handler` behind the API keys; admin: behind admin_api_keys when those are set; `unauthorized`
        writes the 401 in the endpoint's own error shape (default: OpenAI's)."""

        async def wrapper(request: Request) -> Response:
            if not self._authorized(request, admin):
                if admin and self.switcher.config.admin_api_keys:
                    which = f"one of the admin_api_keys from config.yml (client keys do not open {request.url.path})"
                else:
                    which = "one of the API keys (api_key or api_keys in config.yml, or $LLM_ROUTER_API_KEYS_FILE)"
                message = (f"Missing or wrong API key: send `Authorization: Bearer <key>` (or `x-api-key: <key>`) "
                           f"with {which}.")
                if unauthorized is not None:
                    return unauthorized(message)
                return JSONResponse(error_body(message, "invalid_api_key"), status_code=401)
            return await handler(request)

        return wrapper

    # --- OpenAI endpoints ---------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        return await self._complete(request, "/v1/chat/completions", "messages")

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, "/v1/completions", "prompt")

    async def embeddings(self, request: Request) -> Response:
        return await self._complete(request, "/v1/embeddings", "input")

    async def _complete(self, request: Request, path: str, required: str) -> Response:
        config = self.switcher.config
        try:
            raw = await read_body(request, config.limits.max_body_bytes)
        except ClientLeft:
            return Response(status_code=400)  # nobody reads it
        if isinstance(raw, BadBody):
            return refuse(raw)
        body = parse_body(raw)
        if isinstance(body, BadBody):
            return refuse(body)
        if (bad := check_stream(body)) is not None:
            return refuse(bad)
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
        resolved = config.resolve(model_id)  # an id or an alias
        model = config.models.get(resolved) if resolved is not None else None
        if model is None:
            known = ", ".join(m.id for m in config.models.values() if not m.unlisted)
            return JSONResponse(error_body(f"The model `{model_id}` does not exist. Known models: {known}. "
                                           "Add it to models.yml to use it.", "model_not_found",
                                           "invalid_request_error", "model"), status_code=404)
        changed, splice = has_params(model) and apply_params(body, model), False  # models.yml params: set/strip
        stream = bool(body.get("stream")) and required != "input"
        options = body.get("stream_options")
        client_usage = stream and isinstance(options, dict) and bool(options.get("include_usage"))
        if model.upstream_model:
            body["model"], changed = model.upstream_model, True
        elif model_id != model.id:
            body["model"], changed = model.id, True  # asked for by an alias
        if required == "messages" and (config.switch.status_channel == "content" or config.stats):
            changed = strip_history(body["messages"]) or changed
        if stream and config.stats and not client_usage and required == "messages" \
                and "stream_options" not in model.params_strip:
            splice = "stream_options" not in body  # nothing to merge with: the option goes in front of the bytes
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
            changed = changed or not splice
        priority = PRIORITIES.get(request.headers.get("x-request-priority", "normal").strip().lower())
        if priority is None:
            return bad_request("X-Request-Priority must be high, normal or low.", "invalid_header")
        upstream = _dumps(body) if changed else _with_usage_option(raw) if splice else raw
        call = Call(path=path, model_id=model.id, body=upstream,
                    headers=upstream_headers(request, drop_auth=bool(config.client_keys)),
                    stream=stream, client_usage=client_usage, ticket=self.switcher.submit(model.id, priority))
        try:
            return await self.relay.handle(request, call)
        except BaseException:
            self.switcher.done(call.ticket)
            raise

    # --- router endpoints ---------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        """Liveness that tells the truth: 503 with the reason when the run loop is stalled or systemd is
        unreachable; the backend's own health is reported, not judged (a model may simply be unloaded)."""
        switcher = self.switcher
        problems = []
        if not await switcher.heartbeat(timeout=HEALTH_HEARTBEAT):
            problems.append(f"the router's run loop did not answer within {HEALTH_HEARTBEAT:g} s "
                            "(requests are not being scheduled)")
        if not getattr(switcher.systemd, "connected", True):
            problems.append(f"systemd is not reachable over D-Bus: {getattr(switcher.systemd, 'last_error', '')}")
        active = switcher.scheduler.active
        healthy: bool | None = None
        if active is not None and active in switcher.config.models:
            model = switcher.config.models[active]
            url = switcher.config.url_of(model) + switcher.config.backend_of(model).health
            healthy = await self.upstream.probe(url, 1.0)
        body: dict[str, Any] = {"status": "ok" if not problems else "unavailable", "active_model": active,
                                "backend_healthy": healthy}
        if problems:
            body["problems"] = problems
        return JSONResponse(body, status_code=503 if problems else 200)

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
        waiting, oldest = s.waiting_counts()
        now = self.switcher.clock()
        cooldowns = {m: {"error": c.failure.message(), "failed_ago": round(now - c.at, 1),
                         "retry_in": round(max(c.at + config.switch.failure_cooldown - now, 0), 1)}
                     for m, c in s.cooldowns.items()}
        return JSONResponse({
            "active_model": s.active, "switch": switch, "queued": queued, "serving": dict(s.serving),
            "waiting": {m: {"requests": n, "oldest_wait": round(oldest.get(m, 0.0), 3)} for m, n in waiting.items()},
            "cooldowns": cooldowns,
            "run_loop": {"alive": self.switcher.alive, "handler_errors": self.switcher.handler_errors},
            "systemd_bus": {"connected": getattr(self.switcher.systemd, "connected", True),
                            "last_error": getattr(self.switcher.systemd, "last_error", None)},
            "models": models_overview(self.switcher),
            "units": units, "last_switch": self.switcher.last_switch, "switches": s.switches_started,
            "gpu": await asyncio.to_thread(gpu.snapshot), "config_dir": str(config.config_dir),
            "config": {"loaded_at": round(self.switcher.config_loaded_at, 3),
                       "reload_error": self.switcher.reload_error},
        })

    async def admin_load(self, request: Request) -> Response:
        model_id = await _admin_model(request, self.switcher.config)
        if model_id is None or isinstance(model_id, Response):
            return model_id or Response(status_code=400)
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

    async def admin_sleep(self, request: Request) -> Response:
        """Put a loaded model whose backend can sleep to sleep: {"model": id}."""
        config = self.switcher.config
        model_id = await _admin_model(request, config)
        if model_id is None or isinstance(model_id, Response):
            return model_id or Response(status_code=400)
        if config.backend_of(config.models[model_id]).sleep is None:
            return JSONResponse(error_body(f"{model_id} cannot sleep: its backend `{config.models[model_id].backend}` "
                                           "has no `sleep:` in config.yml.", "invalid_request_error", param="model"),
                                status_code=400)
        failed = await self._outcome(self.switcher.sleep(model_id))
        return failed or JSONResponse({"model": model_id, "state": self.switcher.model_state(model_id)})

    async def admin_unload(self, request: Request) -> Response:
        """Unload every model, or the one named by an optional body {"model": id}."""
        config = self.switcher.config
        model_id = await _admin_model(request, config, optional=True)
        if isinstance(model_id, Response):
            return model_id
        units = [config.unit_of(config.models[model_id])] if model_id is not None else config.managed_units()
        before = [u for u in units if u in self.switcher.scheduler.running]
        failed = await self._outcome(self.switcher.unload(model_id))
        return failed or JSONResponse({"unloaded": before})

    async def _outcome(self, ticket: Ticket) -> Response | None:
        """Wait for an admin action's end (status lines skipped): None when it went through, else the error."""
        try:
            update = await self.switcher.next_update(ticket)
            while isinstance(update, Status):
                update = await self.switcher.next_update(ticket)
        finally:
            self.switcher.done(ticket)
        if isinstance(update, Failed):
            return JSONResponse(error_body(update.message, update.error.code, "server_error"),
                                status_code=failure_status(update.error))
        return None


async def _admin_model(request: Request, config: Any, optional: bool = False) -> str | Response | None:
    """The model id an admin request's body names ({"model": id or alias}), or the error to answer
    (`optional`: None when the body names no model)."""
    try:
        raw = await read_body(request, config.limits.max_body_bytes)
    except ClientLeft:
        return Response(status_code=400)
    body = parse_body(raw or b"{}") if not isinstance(raw, BadBody) else raw
    if isinstance(body, BadBody):
        return refuse(body)
    name = body.get("model")
    model_id = config.resolve(name) if isinstance(name, str) else None
    if model_id is None and not (optional and name is None):
        return JSONResponse(error_body(f"Unknown model `{name}`. Known models: {', '.join(config.models)}.",
                                       "model_not_found", param="model"), status_code=404)
    return model_id


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


def create_app(switcher: Switcher, upstream: Upstream, observability: Observability | None = None) -> Starlette:
    api = Api(switcher, upstream)
    g = api.guarded
    models = ModelsApi(switcher, observability.stopping if observability else None)
    routes = models.routes(g) + [  # /models, /v1/models[/{id}], /models/{load,unload,sse}
        Route("/", index, methods=["GET"]),  # the status page, for browsers (router/statuspage.py)
        Route("/health", api.health, methods=["GET"]),
        Route("/v1/chat/completions", g(api.chat), methods=["POST"]),
        Route("/v1/completions", g(api.completions), methods=["POST"]),
        Route("/v1/embeddings", g(api.embeddings), methods=["POST"]),
        Route("/status", g(api.status), methods=["GET"]),
        Route("/admin/load", g(api.admin_load, admin=True), methods=["POST"]),
        Route("/admin/unload", g(api.admin_unload, admin=True), methods=["POST"]),
        Route("/admin/sleep", g(api.admin_sleep, admin=True), methods=["POST"]),
    ] + (observability.routes(g) if observability else [])  # /metrics, /events, /logs/{model}, /history
    routes += ApiRoutes(switcher, upstream).routes(g)  # /v1/messages, /v1/responses, rerank, audio, images, /upstream
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error, Exception: _internal_error})


async def _internal_error(request: Request, exc: Exception) -> Response:
    """A bug still answers JSON (uvicorn logs the traceback once, for the bug report)."""
    return JSONResponse(error_body(f"Internal error in the router ({type(exc).__name__}); the router's log has "
                                   "the details.", "internal_error", "server_error"), status_code=500)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Unknown paths and wrong methods answer OpenAI-style JSON, like everything else."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = (f"No such endpoint: {request.url.path}. The router serves /v1/models, /v1/chat/completions, "
                   "/v1/completions, /v1/embeddings, /v1/messages, /v1/responses, /v1/rerank, /v1/audio/*, "
                   "/v1/images/generations, /upstream/MODEL/PATH, /health, /status, /models, "
                   "/models/{load,unload,sse} and /admin/{load,unload,sleep}.")
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}."
    else:
        message = str(exc.detail)
    return JSONResponse(error_body(message, "not_found" if exc.status_code == 404 else "invalid_request"),
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))
