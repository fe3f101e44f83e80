"""Relay: forwards one completion request to its engine and streams the answer back (the hot path).

Bytes go through as the engine sends them (`aiter_raw`, no re-framing); a `StreamTap` looks only
at the events that must change. While a request waits for a switch, the relay streams the status
lines, keep-alive comments and, at the end, either the engine's answer or a readable error.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from router.chunks import DONE, KEEPALIVE, ChunkWriter, error_body, failed_line, ready_line
from router.config import Backend, Config, Model
from router.scheduler import Ticket
from router.streamtap import StreamTap
from router.switcher import Failed, Granted, Status, Switcher, Update, failure_status

log = structlog.get_logger("router.proxy")

# Headers that belong to one hop, or that the relay sets itself.
_HOP = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "upgrade",
        "proxy-authorization", "proxy-connection", "trailer", "accept-encoding", "content-encoding"}
RETRY_AFTER = 5  # seconds, with a 429 (queue full)
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


@dataclass
class Call:
    """One completion request as the relay needs it."""

    path: str  # /v1/chat/completions or /v1/completions
    model_id: str
    body: bytes  # what goes upstream
    headers: dict[str, str]
    stream: bool
    client_usage: bool  # the client asked for stream_options.include_usage
    ticket: Ticket
    started: float = field(default_factory=time.monotonic)
    waited: float = 0.0
    status: int = 200
    summary: dict[str, Any] | None = None
    finished: bool = False

    @property
    def chat(self) -> bool:
        """A chat completion: the stats line is only ever added to those (text completions stay exact)."""
        return self.path == "/v1/chat/completions"


class RelayResponse(StreamingResponse):
    """A streamed response that ends its call (ticket released, one log line) once it is over, whatever
    way: also when the client is gone before the first byte, when a generator that never started would
    have no `finally` to run and the model would stay held."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
            self.on_close()


def upstream_headers(request: Request, drop_auth: bool) -> dict[str, str]:
    headers = {k: v for k, v in request.headers.items() if k not in _HOP}
    if drop_auth:
        headers.pop("authorization", None)
    headers["accept-encoding"] = "identity"  # raw bytes from aiter_raw() are then the text itself
    return headers


def response_headers(resp: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in resp.headers.items() if k not in _HOP}


class Relay:
    def __init__(self, switcher: Switcher, http: httpx.AsyncClient) -> None:
        self.switcher = switcher
        self.http = http

    async def handle(self, request: Request, call: Call) -> Response:
        first = await self.switcher.next_update(call.ticket)
        if call.stream and not isinstance(first, Granted):
            return RelayResponse(self._wait_and_stream(call, first), lambda: self._finish(call),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
        # Until a response starts, nothing tells a handler that its client left: watch for it, so that
        # an abandoned request neither keeps its model busy nor lets the engine compute for nobody.
        gone = asyncio.ensure_future(_disconnected(request))
        work = asyncio.ensure_future(self._respond(call, first))
        try:
            await asyncio.wait({gone, work}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                return work.result()
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
            self._finish(call, status=499)
            return Response(status_code=499)
        finally:
            gone.cancel()
            work.cancel()

    async def _respond(self, call: Call, update: Update | None) -> Response:
        """Wait silently for the model (non-streaming), then open the engine's response."""
        while not isinstance(update, (Granted, Failed)):
            update = await self.switcher.next_update(call.ticket)
        if isinstance(update, Failed):
            return self._failed(call, update)
        call.waited = time.monotonic() - call.started
        return await self._direct(call, update)

    def _failed(self, call: Call, failed: Failed) -> Response:
        status = failure_status(failed.error)
        self._finish(call, status=status)
        kind = "invalid_request_error" if status in (404, 429) else "server_error"
        headers = {"retry-after": str(RETRY_AFTER)} if status == 429 else None
        return JSONResponse(error_body(failed.message, failed.error.code, kind, "model"), status_code=status,
                            headers=headers)

    # --- the model is loaded: straight through ------------------------------------------------

    async def _open(self, call: Call, backend: Backend) -> httpx.Response:
        req = self.http.build_request("POST", backend.url + call.path, content=call.body, headers=call.headers)
        return await self.http.send(req, stream=True)

    async def _direct(self, call: Call, granted: Granted) -> Response:
        try:
            resp = await self._open(call, granted.backend)
        except httpx.HTTPError as e:
            self._finish(call, status=502)
            return JSONResponse(unreachable(self.switcher.config, granted.model, granted.backend, e), status_code=502)
        call.status = resp.status_code
        tap = None
        if call.stream and resp.status_code == 200 and self.switcher.config.stats and call.chat:
            writer = ChunkWriter(call.model_id, role_sent=True)
            tap = StreamTap(writer, stats=True, client_usage=call.client_usage, rewrite_id=False)
        return RelayResponse(self._pipe(call, resp, tap), lambda: self._finish(call), status_code=resp.status_code,
                             headers={**response_headers(resp), **(SSE_HEADERS if call.stream else {})})

    async def _pipe(self, call: Call, resp: httpx.Response, tap: StreamTap | None) -> AsyncIterator[bytes]:
        try:
            if tap is None:
                async for piece in resp.aiter_raw():
                    yield piece
            else:
                async for piece in resp.aiter_raw():
                    out = tap.feed(piece)
                    if out:
                        yield out
                rest = tap.finish()
                if rest:
                    yield rest
                call.summary = tap.summary
        except httpx.HTTPError as e:  # the engine went away mid-answer
            log.warning("upstream_broken", model=call.model_id, error=str(e))
            if call.stream:
                writer = tap.writer if tap is not None else ChunkWriter(call.model_id)
                yield writer.error(f"{call.model_id}: the backend broke off the answer ({e}).",
                                   "backend_stream_broken")
                yield DONE
        finally:
            await resp.aclose()  # the call itself is ended by RelayResponse, after this

    # --- the model must be loaded first -------------------------------------------------------

    async def _wait_and_stream(self, call: Call, first: Update | None) -> AsyncIterator[bytes]:
        config = self.switcher.config
        writer = ChunkWriter(call.model_id, config.switch.status_channel, completions=not call.chat)
        update = first
        while True:
            if update is None:
                yield KEEPALIVE
            elif isinstance(update, Status):
                chunk = writer.status(update.text, update.done)
                if chunk:
                    yield chunk
            elif isinstance(update, Failed):
                call.status = failure_status(update.error)
                yield writer.status(failed_line(update.display, update.error.what.rstrip(".")), done=True)
                yield writer.error(update.message, update.error.code)
                yield DONE
                return
            elif isinstance(update, Granted):
                call.waited = time.monotonic() - call.started
                if update.took is not None:
                    yield writer.status(ready_line(update.model.display_name, update.took), done=True)
                break
            update = await self.switcher.next_update(call.ticket, config.switch.keepalive_every)
        assert isinstance(update, Granted)
        try:
            resp = await self._open(call, update.backend)
        except httpx.HTTPError as e:
            call.status = 502
            body = unreachable(config, update.model, update.backend, e)["error"]
            yield writer.error(body["message"], body["code"])
            yield DONE
            return
        if resp.status_code != 200:
            call.status = resp.status_code
            text = (await resp.aread()).decode("utf-8", "replace")[:2000]
            await resp.aclose()
            yield writer.error(f"{call.model_id}: the backend answered HTTP {resp.status_code}: {text}",
                               "backend_error")
            yield DONE
            return
        tap = StreamTap(writer, stats=config.stats and call.chat, client_usage=call.client_usage, rewrite_id=True,
                        drop_role=writer.role_sent)
        writer.role_sent = True
        async with contextlib.aclosing(self._pipe(call, resp, tap)) as pipe:
            async for piece in pipe:
                yield piece

    def _finish(self, call: Call, status: int | None = None) -> None:
        """The call is over: release its ticket and log one line (once, whichever path gets here first)."""
        if call.finished:
            return
        call.finished = True
        if status is not None:
            call.status = status
        if not call.ticket.granted:  # it waited all its life for a model that never came
            call.waited = time.monotonic() - call.started
        self.switcher.done(call.ticket)
        log.info("request", path=call.path, model=call.model_id, stream=call.stream, status=call.status,
                 waited=round(call.waited, 3), duration=round(time.monotonic() - call.started, 3),
                 **(call.summary or {}))


async def _disconnected(request: Request) -> None:
    """Return once the client has hung up (the request body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def unreachable(config: Config, model: Model, backend: Backend, error: Exception) -> dict[str, Any]:
    return error_body(
        f"{model.id}: the backend at {backend.url} (unit {backend.unit}) did not answer: {error}. "
        f"Check `{config.systemctl('status', backend.unit)}` and `{config.journalctl(backend.unit)}`.",
        "backend_unreachable", "server_error")
