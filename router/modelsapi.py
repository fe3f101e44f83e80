"""The llama.cpp server's router-mode model API: each model's status, load, unload and status events.

Open WebUI (a connection whose provider is "llama.cpp") reads `status.value` in GET /v1/models to
mark loaded models, and its Eject button posts POST /models/unload; other llama.cpp router clients use
GET /models, POST /models/load and GET /models/sse. The shapes follow llama.cpp's tools/server
(server-models.cpp and README.md, "Using multiple models"); tests/test_modelsapi.py names each source.

- GET /models and GET /v1/models (one list, as in llama.cpp): the OpenAI model list, every listed
  model with `status: {"value": loaded|loading|unloaded|sleeping, "args": [...]}`; a failed load is
  `{"value": "unloaded", "failed": true, "exit_code": N, "error": "…"}` (`error` is the router's own).
- GET /v1/models/{id}: one model (OpenAI `models.retrieve`), aliases and unlisted models included.
- POST /models/load {"model"}: starts the load the way a request would and answers `{"success": true}`
  at once, as llama.cpp does; 400 when the model already runs (loaded, loading or sleeping).
- POST /models/unload {"model"}: unloads it and answers `{"success": true}` once its unit stopped (or
  after UNLOAD_WAIT seconds while it still stops); 400 when it does not run.
- GET /models/sse: `data: {"model", "event": "model_status" | "status_change", "data": {"status", …}}`.
Errors are llama.cpp's `{"error": {"code": HTTP status, "message", "type"}}`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from router.chunks import error_body
from router.config import Model
from router.events import Event, ModelState
from router.hub import KEEPALIVE, Client
from router.requestbody import BadBody, ClientLeft, parse_body, read_body
from router.scheduler import Ticket
from router.switcher import Failed, Status, Switcher, Update, failure_status

Handler = Callable[[Request], Awaitable[Response]]

RUNNING = ("loaded", "loading", "sleeping")  # llama.cpp's is_running(): what can be unloaded, not loaded again
UNLOAD_WAIT = 20.0  # seconds POST /models/unload waits for the unit to stop (Open WebUI gives up after 30)
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 500: "server_error", 501: "not_supported_error", 503: "unavailable_error"}


def llama_error(status: int, message: str, close: bool = False) -> JSONResponse:
    """An error as llama.cpp's server answers it (format_error_response)."""
    return JSONResponse({"error": {"code": status, "message": message,
                                   "type": ERROR_TYPES.get(status, "unavailable_error")}}, status_code=status,
                        headers={"connection": "close"} if close else None)


def sse_event(event: ModelState) -> bytes:
    """A ModelState as llama.cpp's /models/sse sends it: `model_status` when a load starts, else `status_change`."""
    name = "status_change"
    data: dict[str, Any] = {"status": event.state}
    if event.state == "loading":
        name = "model_status"
    elif event.state == "unloaded":
        data["exit_code"] = 0
    elif event.state == "failed":
        data.update(status="unloaded", exit_code=event.exit_code, failed=True, error=event.error)
    body = {"model": event.model, "event": name, "data": data}
    return b"data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class ModelsApi:
    """The handlers; states come from the switcher, actions go through it like requests."""

    def __init__(self, switcher: Switcher, stopping: asyncio.Event | None = None, buffer: int = 256,
                 keepalive: float = 15.0) -> None:
        self.switcher = switcher
        self.stopping = stopping or asyncio.Event()  # set: every /models/sse stream ends (the router stops)
        self.buffer = buffer
        self.keepalive = keepalive
        self.clients: set[Client] = set()
        self._actions: set[asyncio.Task[Update]] = set()  # loads and unloads followed to their end
        self.unsubscribe = switcher.events.subscribe(self.observe)

    def routes(self, guarded: Callable[..., Handler]) -> list[Route]:
        return [
            Route("/models", guarded(self.list_models), methods=["GET"]),
            Route("/v1/models", guarded(self.list_models), methods=["GET"]),
            Route("/v1/models/{model_id:path}", guarded(self.retrieve), methods=["GET"]),
            Route("/models/load", guarded(self.load, admin=True), methods=["POST"]),
            Route("/models/unload", guarded(self.unload, admin=True), methods=["POST"]),
            Route("/models/sse", guarded(self.events), methods=["GET"]),
        ]

    # --- reading ----------------------------------------------------------------------------------

    def entry(self, model: Model) -> dict[str, Any]:
        """A model as the lists show it: the OpenAI fields, the router's, and llama.cpp's `status`."""
        state = self.switcher.model_state(model.id)
        status: dict[str, Any] = {"value": state, "args": list(model.command or ())}
        if state == "failed":  # llama.cpp: an unloaded model whose process exited non-zero
            cooldown = self.switcher.scheduler.cooldowns.get(model.id)
            failure = cooldown.failure if cooldown is not None else None
            status.update(value="unloaded", failed=True, exit_code=failure.exit_code if failure else None,
                          error=failure.message(model.display_name) if failure else None)
        return {"id": model.id, "object": "model", "created": 0, "owned_by": "llm-router",
                "name": model.display_name, "state": state, "backend": model.backend,
                "unit": self.switcher.config.unit_of(model), "aliases": list(model.aliases), "status": status}

    async def list_models(self, request: Request) -> Response:
        models = self.switcher.config.models.values()
        return JSONResponse({"object": "list", "data": [self.entry(m) for m in models if not m.unlisted]})

    async def retrieve(self, request: Request) -> Response:
        config = self.switcher.config
        name = request.path_params["model_id"]
        model_id = config.resolve(name)
        if model_id is None:
            return JSONResponse(error_body(f"The model `{name}` does not exist. Known models: "
                                           f"{', '.join(self._listed())}.", "model_not_found",
                                           "invalid_request_error", "model"), status_code=404)
        return JSONResponse(self.entry(config.models[model_id]))

    def _listed(self) -> list[str]:
        return [m.id for m in self.switcher.config.models.values() if not m.unlisted]

    # --- actions ----------------------------------------------------------------------------------

    async def load(self, request: Request) -> Response:
        model_id = await self._model_of(request, unknown_status=404)  # llama.cpp: 404 here, 400 on unload
        if isinstance(model_id, Response):
            return model_id
        state = self.switcher.model_state(model_id)
        if state in RUNNING:
            return llama_error(400, f"The model `{model_id}` is already {state}; POST /models/unload "
                                    "unloads it.")
        action = self._follow(self.switcher.submit(model_id))
        await asyncio.sleep(0)  # a refusal decided at once (failure cooldown, full queue, no systemd) is in now
        if action.done() and isinstance(failed := action.result(), Failed):
            return llama_error(failure_status(failed.error), failed.message)
        return JSONResponse({"success": True})  # llama.cpp answers when the load starts, not when it ends

    async def unload(self, request: Request) -> Response:
        model_id = await self._model_of(request, unknown_status=400)
        if isinstance(model_id, Response):
            return model_id
        state = self.switcher.model_state(model_id)
        if state not in RUNNING:
            return llama_error(400, f"The model `{model_id}` is not running (it is {state}); nothing to unload.")
        action = self._follow(self.switcher.unload(model_id))
        done, _ = await asyncio.wait({action}, timeout=UNLOAD_WAIT)  # past it, the unload goes on all the same
        if done and isinstance(failed := action.result(), Failed):
            return llama_error(failure_status(failed.error), failed.message)
        return JSONResponse({"success": True})

    async def _model_of(self, request: Request, unknown_status: int) -> str | Response:
        """The id the body's `model` names (an id or an alias), or the error to answer."""
        config = self.switcher.config
        try:
            raw = await read_body(request, config.limits.max_body_bytes)
        except ClientLeft:
            return Response(status_code=400)  # nobody reads it
        body = raw if isinstance(raw, BadBody) else parse_body(raw)
        if isinstance(body, BadBody):
            return llama_error(body.status, body.message, body.close)
        name = body.get("model")
        if not isinstance(name, str) or not name:
            return llama_error(400, 'The request has no `model`: send {"model": ID} with an id of GET /models.')
        model_id = config.resolve(name)
        if model_id is None:
            return llama_error(unknown_status, f"The model `{name}` does not exist. Known models: "
                                               f"{', '.join(self._listed())}. Add it to models.yml to use it.")
        return model_id

    def _follow(self, ticket: Ticket) -> asyncio.Task[Update]:
        """Hold the ticket until its outcome (Granted, Unloaded or Failed) whoever waits for it, then let go."""

        async def outcome() -> Update:
            try:
                while True:
                    update = await self.switcher.next_update(ticket)
                    if update is not None and not isinstance(update, Status):
                        return update
            finally:
                self.switcher.done(ticket)

        task = asyncio.create_task(outcome(), name=f"models-api-{ticket.model or 'unload'}")
        self._actions.add(task)
        task.add_done_callback(self._actions.discard)
        return task

    # --- events -----------------------------------------------------------------------------------

    def observe(self, event: Event) -> None:
        """EventBus observer: each model status change, once encoded, to every /models/sse client."""
        if not self.clients or not isinstance(event, ModelState):
            return
        frame = sse_event(event)
        for client in self.clients:
            client.put(frame)  # bounded: a client that does not read loses its oldest events, never slows us

    async def events(self, request: Request) -> Response:
        client = Client(self.buffer)
        self.clients.add(client)  # from now on: no change is lost between this answer and its first read
        return StreamingResponse(self._stream(client), media_type="text/event-stream", headers=SSE_HEADERS)

    async def _stream(self, client: Client) -> AsyncIterator[bytes]:
        stopping = asyncio.ensure_future(self.stopping.wait())
        try:
            yield b": connected\n\n"
            while not self.stopping.is_set():
                if not client.buffer:
                    client.wake.clear()
                    woken = asyncio.ensure_future(client.wake.wait())
                    done, _ = await asyncio.wait({woken, stopping}, timeout=self.keepalive,
                                                 return_when=asyncio.FIRST_COMPLETED)
                    woken.cancel()
                    if not done:
                        yield KEEPALIVE
                    continue
                frames = b"".join(client.buffer)
                client.buffer.clear()
                yield frames
        finally:
            stopping.cancel()
            self.clients.discard(client)
