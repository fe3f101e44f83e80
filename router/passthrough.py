"""Pass-through relay: every API but chat and text completions, with the same switching, timeouts and client watch.

A request for /v1/messages, /v1/responses, /v1/rerank, the audio and image endpoints or
/upstream/{model}/... waits for its model exactly like a chat request (same ticket, same
`ClientWatch`, same upstream timeouts, same `RequestEnded`), then goes to the engine with the
client's method, path, query and body bytes, and the engine's answer comes back as it is sent:
a JSON answer (or any error) read whole, anything else (SSE, audio, images) relayed a socket read at
a time. What differs between the APIs is how a streamed wait looks and how an error is written:
that is a `WaitShape` — `PlainShape` (OpenAI errors, the wait is silent), `ResponsesShape` (the
Responses API: keep-alive comments while loading) and router/anthropic.py's `AnthropicShape`.

`PassThrough` is a `Relay` (router/proxy.py) with its own `_respond`: the chat relay's request
life cycle (`handle`, `_finish`, `_closed`) is shared, nothing of its chat-specific streaming is.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from starlette.responses import JSONResponse, Response

from router.chunks import KEEPALIVE, error_body, sse
from router.proxy import (
    RETRY_AFTER,
    SSE_HEADERS,
    Call,
    ClientWatch,
    Relay,
    RelayResponse,
    broken_off,
    error_text,
    open_failed,
    response_headers,
    timed_out,
)
from router.switcher import Failed, Granted, Status, Update, failure_status
from router.upstream import UpstreamError, UpstreamResponse, UpstreamTimeout

log = structlog.get_logger("router.passthrough")

SNIFF = 4096  # bytes kept of a text answer's start and end to read its token counts
_PROMPT = re.compile(rb'"(?:prompt_tokens|input_tokens)"\s*:\s*(\d+)')
_COMPLETION = re.compile(rb'"(?:completion_tokens|output_tokens)"\s*:\s*(\d+)')
_SEQUENCE = re.compile(rb'"sequence_number"\s*:\s*(\d+)')


class StreamRewrite(Protocol):
    """Rewrites an engine's stream after the router spoke first (see router/anthropic.py)."""

    def feed(self, piece: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class WaitShape(Protocol):
    """How one API streams the wait for a model and writes its errors."""

    streams_wait: bool  # a streamed request gets its response headers at once and the wait as events

    def waiting(self, status: Status | None) -> bytes:
        """A status line (or, for None, a keep-alive) while the model loads."""
        ...

    def ready(self, granted: Granted) -> bytes:
        """The model is loaded: the last bytes before the engine's own stream."""
        ...

    def failed(self, failed: Failed, status: int) -> bytes:
        """The load failed: the events that end the stream."""
        ...

    def error(self, message: str, code: str, status: int, tail: bytes = b"") -> bytes:
        """An error inside a stream (the engine unreachable, silent, or broken off); `tail`: its last bytes."""
        ...

    def error_response(self, status: int, message: str, code: str, param: str | None = None,
                       headers: Mapping[str, str] | None = None) -> Response:
        """An error before anything was sent, as this API writes it."""
        ...

    def tap(self) -> StreamRewrite | None:
        """What rewrites the engine's stream after a streamed wait (None: its bytes as they come)."""
        ...


class PlainShape:
    """OpenAI-style errors; a request waits silently for its model (rerank, audio, images, /upstream)."""

    streams_wait = False

    def waiting(self, status: Status | None) -> bytes:
        return KEEPALIVE

    def ready(self, granted: Granted) -> bytes:
        return b""

    def failed(self, failed: Failed, status: int) -> bytes:
        return self.error(failed.message, failed.error.code, status)

    def error(self, message: str, code: str, status: int, tail: bytes = b"") -> bytes:
        return sse(error_body(message, code, "server_error"))

    def error_response(self, status: int, message: str, code: str, param: str | None = None,
                       headers: Mapping[str, str] | None = None) -> Response:
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse(error_body(message, code, kind, param), status_code=status, headers=headers)

    def tap(self) -> StreamRewrite | None:
        return None


class ResponsesShape(PlainShape):
    """The OpenAI Responses API (`POST /v1/responses`, Codex and the openai SDK).

    A Responses stream has no event for "waiting for the model": every event belongs to one
    response, `response.created` must come first (the openai SDK's stream helper raises on anything
    before it) and the engine creates its own response with its own id. So a streamed wait is SSE
    comments only (`: loading`), which every SSE parser skips, and the engine's events follow
    untouched. A failed load ends the stream with an `error` event and a `response.failed` carrying
    the same error, so that clients which watch either one see it.
    """

    streams_wait = True

    def __init__(self, model: str) -> None:
        self.model = model

    def failed(self, failed: Failed, status: int) -> bytes:
        return self.error(failed.message, failed.error.code, status)

    def error(self, message: str, code: str, status: int, tail: bytes = b"") -> bytes:
        """`error`, numbered after the engine's last event; `response.failed` too when the engine never
        spoke (once it did, its response is the one that failed: a second response id would confuse)."""
        found = _SEQUENCE.findall(tail)
        seq = int(found[-1]) + 1 if found else 0
        error = _event("error", {"type": "error", "code": code, "message": message, "param": None,
                                 "sequence_number": seq})
        if tail:
            return error
        response = {"id": f"resp_router_{uuid.uuid4().hex[:24]}", "object": "response",
                    "created_at": int(time.time()), "status": "failed", "model": self.model, "output": [],
                    "error": {"code": code, "message": message}}
        return error + _event("response.failed", {"type": "response.failed", "response": response,
                                                  "sequence_number": seq + 1})


def _event(name: str, data: Mapping[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\n" + sse(data)


@dataclass
class ApiCall(Call):
    """A pass-through request: `path` is its endpoint (metrics, logs), `target` what goes to the engine."""

    target: str = ""  # path and query at the engine
    method: str = "POST"
    shape: WaitShape = field(default_factory=PlainShape)


@dataclass
class _Sniff:
    """The start and end of a text answer, for its token counts (cheap: two small buffers)."""

    head: bytes = b""
    tail: bytes = b""
    first_at: float | None = None

    def feed(self, piece: bytes) -> None:
        if len(self.head) < SNIFF:
            self.head += piece[: SNIFF - len(self.head)]
        self.tail = (self.tail + piece)[-SNIFF:] if len(piece) < SNIFF else piece[-SNIFF:]

    def summarize(self, call: Call, streamed: bool) -> None:
        prompt = _PROMPT.findall(self.tail) or _PROMPT.findall(self.head)
        completion = _COMPLETION.findall(self.tail)
        if prompt:
            call.prompt_tokens = int(prompt[-1])
        if completion:
            tokens = int(completion[-1])
            call.summary = {"tokens": tokens}
            if streamed and self.first_at is not None:
                seconds = max(time.monotonic() - self.first_at, 1e-6)
                call.summary.update(seconds=round(seconds, 3), tok_per_s=round(tokens / seconds, 2))


def _is_text(content_type: str) -> bool:
    return content_type.startswith(("application/json", "text/event-stream"))


class PassThrough(Relay):
    """Relays an `ApiCall`: waits for the model (streaming the wait in the call's shape), then the engine's answer."""

    async def _respond(self, call: Call, watch: ClientWatch) -> Response:
        assert isinstance(call, ApiCall)
        update = await self.switcher.next_update(call.ticket)
        if call.stream and call.shape.streams_wait and not isinstance(update, Granted):
            return RelayResponse(self._wait_then_relay(call, update), lambda gone: self._closed(call, gone), watch,
                                 media_type="text/event-stream", headers=SSE_HEADERS)
        while not isinstance(update, (Granted, Failed)):  # wait silently for the model
            update = await self.switcher.next_update(call.ticket)
        if isinstance(update, Failed):
            status = failure_status(update.error)
            self._finish(call, status, "load_failed" if status == 503 else "rejected")
            headers = {"retry-after": str(RETRY_AFTER)} if status == 429 else None
            return call.shape.error_response(status, update.message, update.error.code, "model", headers)
        call.waited = time.monotonic() - call.started
        return await self._forward(call, update, watch)

    async def _send(self, call: ApiCall, granted: Granted) -> UpstreamResponse:
        return await self.upstream.request(call.method, granted.url + call.target, call.body, call.headers,
                                           self.switcher.config.timeouts)

    async def _forward(self, call: ApiCall, granted: Granted, watch: ClientWatch) -> Response:
        """The model is loaded: send the request, answer with the engine's status, headers and body."""
        config = self.switcher.config
        try:
            resp = await self._send(call, granted)
        except UpstreamError as e:
            status, outcome, failure = open_failed(config, granted.model, granted.backend, e)
            self._finish(call, status, outcome)
            return call.shape.error_response(status, failure["error"]["message"], failure["error"]["code"])
        call.status = resp.status
        content_type = resp.headers.get("content-type", "").lower()
        if resp.status != 200 or content_type.startswith("application/json"):  # read whole, then send
            call.ttft = time.monotonic() - call.started
            try:
                body = await resp.read()
            except UpstreamTimeout as e:
                self._finish(call, 504, "timeout")
                error = timed_out(config, granted.model, granted.backend, e)["error"]
                return call.shape.error_response(504, error["message"], error["code"])
            except UpstreamError as e:
                self._finish(call, 502, "upstream_error")
                error = broken_off(granted.model, e)["error"]
                return call.shape.error_response(502, error["message"], error["code"])
            except BaseException:  # the client left: the engine must stop too
                resp.close()
                raise
            resp.release()
            sniff = _Sniff(head=body[:SNIFF], tail=body[-SNIFF:])
            sniff.summarize(call, streamed=False)
            self._finish(call)
            return Response(body, status_code=resp.status, headers=response_headers(resp))
        headers = response_headers(resp)
        if content_type.startswith("text/event-stream"):
            headers.update(SSE_HEADERS)
        return RelayResponse(self._relay(call, resp, None, granted, _is_text(content_type)),
                             lambda gone: self._closed(call, gone), watch, status_code=resp.status, headers=headers)

    async def _relay(self, call: ApiCall, resp: UpstreamResponse, rewrite: StreamRewrite | None,
                     granted: Granted, text: bool) -> AsyncGenerator[bytes, None]:
        """The engine's body, a socket read at a time (through `rewrite` after a streamed wait)."""
        sniff = _Sniff() if text else None
        complete = False
        try:
            async for piece in resp:
                if call.ttft is None:
                    call.ttft = time.monotonic() - call.started
                if sniff is not None:
                    if sniff.first_at is None:
                        sniff.first_at = time.monotonic()
                    sniff.feed(piece)
                out = rewrite.feed(piece) if rewrite is not None else piece
                if out:
                    yield out
            if rewrite is not None and (rest := rewrite.finish()):
                yield rest
            complete = True
        except UpstreamError as e:  # the engine went away or fell silent mid-answer
            if isinstance(e, UpstreamTimeout):
                call.status, call.outcome = 504, "timeout"
                error = timed_out(self.switcher.config, granted.model, granted.backend, e)["error"]
                log.warning("upstream_timeout", model=call.model_id, path=call.path, timeout=e.kind,
                            seconds=e.seconds)
            else:
                call.status, call.outcome = 502, "upstream_error"
                error = broken_off(granted.model, e)["error"]
                log.warning("upstream_broken", model=call.model_id, path=call.path, error=str(e))
            if text:  # an SSE or JSON body can say so; a binary one just ends short
                yield call.shape.error(error["message"], error["code"], call.status,
                                       sniff.tail if sniff is not None else b"")
        finally:  # the call itself is ended by RelayResponse, after this
            if sniff is not None:
                sniff.summarize(call, streamed=True)
            if complete:
                resp.release()
            else:
                resp.close()

    async def _wait_then_relay(self, call: ApiCall, first: Update | None) -> AsyncIterator[bytes]:
        """A streamed request whose model is not loaded: the wait in the call's shape, then the engine's stream."""
        shape = call.shape
        update = first
        keepalive = self.switcher.config.switch.keepalive_every
        while True:
            if update is None or isinstance(update, Status):
                out = shape.waiting(update)
                if out:
                    yield out
            elif isinstance(update, Failed):
                call.status, call.outcome = failure_status(update.error), "load_failed"
                yield shape.failed(update, call.status)
                return
            elif isinstance(update, Granted):
                call.waited = time.monotonic() - call.started
                out = shape.ready(update)
                if out:
                    yield out
                break
            update = await self.switcher.next_update(call.ticket, keepalive)
        granted = update
        try:
            resp = await self._send(call, granted)
        except UpstreamError as e:
            call.status, call.outcome, failure = open_failed(self.switcher.config, granted.model, granted.backend, e)
            yield shape.error(failure["error"]["message"], failure["error"]["code"], call.status)
            return
        if resp.status != 200:
            call.status = resp.status
            text = await error_text(resp)
            yield shape.error(f"{call.model_id}: the backend answered HTTP {resp.status}: {text}", "backend_error",
                              resp.status)
            return
        content_type = resp.headers.get("content-type", "").lower()
        pipe = self._relay(call, resp, shape.tap(), granted, _is_text(content_type))
        try:
            async for piece in pipe:
                yield piece
        finally:
            await pipe.aclose()
