"""Relay: forwards one completion request to its engine and streams the answer back (the hot path).

Bytes go through as the engine sends them (whatever one socket read brought, no re-framing); a
`StreamTap` looks only at the events that must change. While a request waits for a switch, the relay
streams the status lines, keep-alive comments and, at the end, either the engine's answer or a
readable error. One `ClientWatch` per request notices a client that hangs up, at any stage, and ends
the request at once; the upstream timeouts (router/upstream.py) end one whose engine went silent.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from router.chunks import DONE, KEEPALIVE, ChunkWriter, error_body, failed_line, ready_line
from router.config import Backend, Config, Model
from router.events import RequestEnded
from router.scheduler import Ticket
from router.streamtap import StreamTap
from router.switcher import Failed, Granted, Status, Switcher, Update, failure_status
from router.upstream import Upstream, UpstreamError, UpstreamResponse, UpstreamTimeout

log = structlog.get_logger("router.proxy")

# Headers that belong to one hop, or that the relay sets itself.
_HOP = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "upgrade",
        "proxy-authorization", "proxy-connection", "trailer", "accept-encoding", "content-encoding"}
RETRY_AFTER = 5  # seconds, with a 429 (queue full)
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
_PROMPT_TOKENS = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_USAGE_TAIL = 4096  # a whole answer's usage sits at its end: only its last bytes are searched
WATCH_AFTER = 0.05  # seconds into a request before its client is watched for hanging up (ClientWatch)


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
    outcome: str | None = None  # see RequestEnded.outcome; None: decided from the status at the end
    ttft: float | None = None  # request -> first byte of the engine's answer
    prompt_tokens: int | None = None
    summary: dict[str, Any] | None = None  # tokens, seconds, tok_per_s from the stream tap
    finished: bool = False

    @property
    def chat(self) -> bool:
        """A chat completion: the stats line is only ever added to those (text completions stay exact)."""
        return self.path == "/v1/chat/completions"


class ClientWatch:
    """Cancels the task serving a request once its client hangs up, until `stop()`.

    Until a response starts nothing else tells a handler that its client left; once it streams,
    uvicorn drops what is sent to a gone client without a word. Either way an abandoned request must
    neither keep its model busy nor let the engine compute for nobody. The watching task starts only
    once the request has lasted `WATCH_AFTER` seconds: most answers are over before that, and a task
    per request would cost more than the rest of the router's per-request work (a timer costs ~1 µs).
    """

    __slots__ = ("_armed", "_receive", "_task", "_timer", "_watcher", "gone")

    def __init__(self, receive: Callable[[], Awaitable[Mapping[str, Any]]], after: float | None = None) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._receive = receive
        self._armed = True
        self.gone = False
        self._watcher: asyncio.Future[None] | None = None
        self._timer = task.get_loop().call_later(WATCH_AFTER if after is None else after, self._start)

    def _start(self) -> None:
        if self._armed:
            self._watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        if self._armed:
            self.gone = True
            self._task.cancel()

    def stop(self) -> None:
        if self._armed:
            self._armed = False
            self._timer.cancel()
            if self._watcher is not None:
                self._watcher.cancel()

    def absorb(self) -> bool:
        """After a CancelledError: True if this watch caused it (it is then handled), else re-raise it."""
        if not self.gone:
            return False
        uncancel = getattr(self._task, "uncancel", None)  # Python >= 3.11
        if uncancel is not None:
            uncancel()
        return True


class RelayResponse(Response):
    """A streamed response that ends its call once it is over, whatever way: finished, broken, or its
    client gone (`on_close(client_gone)`). No task group: the request's `ClientWatch` does that job."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[bool], None], watch: ClientWatch,
                 status_code: int = 200, headers: Mapping[str, str] | None = None,
                 media_type: str | None = None) -> None:
        self.body_iterator = content
        self.on_close = on_close
        self.watch = watch
        self.status_code = status_code
        self.media_type = media_type
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        watch, gone = self.watch, False
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for piece in self.body_iterator:
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            watch.stop()  # the last send completes the response, which uvicorn reports as a disconnect
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not watch.absorb():
                raise
            gone = True
        finally:
            watch.stop()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
            self.on_close(gone)


def upstream_headers(request: Request, drop_auth: bool) -> dict[str, str]:
    headers = {k: v for k, v in request.headers.items() if k not in _HOP}
    if drop_auth:
        headers.pop("authorization", None)
        headers.pop("x-api-key", None)  # Anthropic clients' key header
    headers["accept-encoding"] = "identity"  # the bytes relayed are then the text itself
    headers.setdefault("content-type", "application/json")
    return headers


def response_headers(resp: UpstreamResponse) -> dict[str, str]:
    return {k: v for k, v in resp.headers.items() if k.lower() not in _HOP}


class Relay:
    def __init__(self, switcher: Switcher, upstream: Upstream) -> None:
        self.switcher = switcher
        self.upstream = upstream

    async def handle(self, request: Request, call: Call) -> Response:
        watch = ClientWatch(request.receive)
        try:
            response = await self._respond(call, watch)
        except asyncio.CancelledError:
            if not watch.absorb():
                watch.stop()
                raise
            self._finish(call, 499, "client_gone")
            response = Response(status_code=499)
        except BaseException:
            watch.stop()
            raise
        if not isinstance(response, RelayResponse):
            watch.stop()
        return response

    async def _respond(self, call: Call, watch: ClientWatch) -> Response:
        update = await self.switcher.next_update(call.ticket)
        if call.stream and not isinstance(update, Granted):
            return RelayResponse(self._wait_and_stream(call, update), lambda gone: self._closed(call, gone), watch,
                                 media_type="text/event-stream", headers=SSE_HEADERS)
        while not isinstance(update, (Granted, Failed)):  # not streamed: wait silently for the model
            update = await self.switcher.next_update(call.ticket)
        if isinstance(update, Failed):
            return self._failed(call, update)
        call.waited = time.monotonic() - call.started
        return await self._direct(call, update, watch)

    def _failed(self, call: Call, failed: Failed) -> Response:
        status = failure_status(failed.error)
        self._finish(call, status, "load_failed" if status == 503 else "rejected")
        kind = "invalid_request_error" if status in (404, 429) else "server_error"
        headers = {"retry-after": str(RETRY_AFTER)} if status == 429 else None
        return JSONResponse(error_body(failed.message, failed.error.code, kind, "model"), status_code=status,
                            headers=headers)

    # --- the model is loaded: straight through ------------------------------------------------

    async def _open(self, call: Call, granted: Granted) -> UpstreamResponse:
        return await self.upstream.post(granted.url + call.path, call.body, call.headers,
                                        self.switcher.config.timeouts)

    async def _direct(self, call: Call, granted: Granted, watch: ClientWatch) -> Response:
        config = self.switcher.config
        sent_at = time.monotonic()
        try:
            resp = await self._open(call, granted)
        except UpstreamError as e:
            status, outcome, failure = open_failed(config, granted.model, granted.backend, e)
            self._finish(call, status, outcome)
            return JSONResponse(failure, status_code=status)
        call.status = resp.status
        if not call.stream or resp.status != 200:  # a whole answer (or an error): read it, send it in one piece
            call.ttft = time.monotonic() - call.started
            try:
                body = await resp.read()
            except UpstreamTimeout as e:  # the connection is closed already
                self._finish(call, 504, "timeout")
                return JSONResponse(timed_out(config, granted.model, granted.backend, e), status_code=504)
            except UpstreamError as e:
                self._finish(call, 502, "upstream_error")
                return JSONResponse(broken_off(granted.model, e), status_code=502)
            except BaseException:  # the client left (cancelled): the engine must stop too
                resp.close()
                raise
            resp.release()
            tail = body[-_USAGE_TAIL:]
            if (m := _PROMPT_TOKENS.search(tail)) is not None:
                call.prompt_tokens = int(m.group(1))
            if (m := _COMPLETION_TOKENS.search(tail)) is not None:
                call.summary = {"tokens": int(m.group(1))}
            self._finish(call)
            return Response(body, status_code=resp.status, headers=response_headers(resp))
        tap = None
        if config.stats and call.chat:
            writer = ChunkWriter(call.model_id, role_sent=True)
            tap = StreamTap(writer, stats=True, client_usage=call.client_usage, rewrite_id=False,
                            stats_channel=config.stats_channel, display=granted.model.display_name, sent_at=sent_at)
        return RelayResponse(self._pipe(call, resp, tap, granted), lambda gone: self._closed(call, gone), watch,
                             status_code=resp.status, headers={**response_headers(resp), **SSE_HEADERS})

    async def _pipe(self, call: Call, resp: UpstreamResponse, tap: StreamTap | None,
                    granted: Granted) -> AsyncGenerator[bytes, None]:
        complete = False
        try:
            if tap is None:
                async for piece in resp:
                    if call.ttft is None:
                        call.ttft = time.monotonic() - call.started
                    yield piece
            else:
                async for piece in resp:
                    if call.ttft is None:
                        call.ttft = time.monotonic() - call.started
                    out = tap.feed(piece)
                    if out:
                        yield out
                rest = tap.finish()
                if rest:
                    yield rest
                call.summary = tap.summary
                call.prompt_tokens = tap.prompt_tokens
            complete = True
        except UpstreamError as e:  # the engine went away or fell silent mid-answer: end the stream readably
            writer = tap.writer if tap is not None else ChunkWriter(call.model_id, completions=not call.chat)
            if isinstance(e, UpstreamTimeout):
                call.status, call.outcome = 504, "timeout"
                body = timed_out(self.switcher.config, granted.model, granted.backend, e)["error"]
                log.warning("upstream_timeout", model=call.model_id, timeout=e.kind, seconds=e.seconds)
                yield writer.error(body["message"], body["code"])
            else:
                call.status, call.outcome = 502, "upstream_error"
                log.warning("upstream_broken", model=call.model_id, error=str(e))
                body = broken_off(granted.model, e)["error"]
                yield writer.error(body["message"], body["code"])
            yield DONE
        finally:  # the call itself is ended by RelayResponse, after this
            if complete:
                resp.release()  # read to its end: the connection goes back to the pool
            else:
                resp.close()  # client gone or engine broken: drop it, the engine stops computing

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
                call.status, call.outcome = failure_status(update.error), "load_failed"
                yield writer.status(failed_line(update.display, update.error.reason), done=True)
                yield writer.error(update.message, update.error.code)
                yield DONE
                return
            elif isinstance(update, Granted):
                call.waited = time.monotonic() - call.started  # the wait the user had, not only the load
                yield writer.status(ready_line(update.model.display_name, call.waited), done=True)
                break
            update = await self.switcher.next_update(call.ticket, config.switch.keepalive_every)
        assert isinstance(update, Granted)
        sent_at = time.monotonic()
        try:
            resp = await self._open(call, update)
        except UpstreamError as e:
            call.status, call.outcome, failure = open_failed(config, update.model, update.backend, e)
            yield writer.error(failure["error"]["message"], failure["error"]["code"])
            yield DONE
            return
        if resp.status != 200:
            call.status = resp.status
            text = await error_text(resp)
            yield writer.error(f"{call.model_id}: the backend answered HTTP {resp.status}: {text}",
                               "backend_error")
            yield DONE
            return
        tap = StreamTap(writer, stats=config.stats and call.chat, client_usage=call.client_usage, rewrite_id=True,
                        drop_role=writer.role_sent, stats_channel=config.stats_channel,
                        display=update.model.display_name, took=call.waited, sent_at=sent_at)
        writer.role_sent = True
        pipe = self._pipe(call, resp, tap, update)
        try:
            async for piece in pipe:
                yield piece
        finally:
            await pipe.aclose()

    def _closed(self, call: Call, client_gone: bool) -> None:
        if client_gone:
            self._finish(call, 499, "client_gone")
        else:
            self._finish(call)

    def _finish(self, call: Call, status: int | None = None, outcome: str | None = None) -> None:
        """The call is over: release its ticket, tell observers, log one line (once, whichever path is first)."""
        if call.finished:
            return
        call.finished = True
        if status is not None:
            call.status = status
        if outcome is not None:
            call.outcome = outcome
        elif call.outcome is None:
            call.outcome = "upstream_error" if call.status >= 500 else "ok"
        now = time.monotonic()
        if not call.ticket.granted:  # it waited all its life for a model that never came
            call.waited = now - call.started
        self.switcher.done(call.ticket)
        summary = call.summary or {}
        duration = now - call.started
        self.switcher.events.emit(RequestEnded(
            model=call.model_id, endpoint=call.path, status=call.status, outcome=call.outcome, stream=call.stream,
            duration=duration, waited=call.waited, ttft=call.ttft, prompt_tokens=call.prompt_tokens,
            completion_tokens=summary.get("tokens"), tok_per_s=summary.get("tok_per_s")))
        log.info("request", path=call.path, model=call.model_id, stream=call.stream, status=call.status,
                 waited=round(call.waited, 3), duration=round(duration, 3), **summary)


async def error_text(resp: UpstreamResponse) -> str:
    """The first 2000 characters of an engine's error answer (the response is released)."""
    try:
        return (await resp.read()).decode("utf-8", "replace")[:2000]
    except UpstreamError as e:
        return f"(its body broke off: {e})"
    finally:
        resp.release()


def open_failed(config: Config, model: Model, backend: Backend,
                error: UpstreamError) -> tuple[int, str, dict[str, Any]]:
    """Status, outcome and body when the request to the engine could not be opened: 504 for a timeout,
    else 502 (unreachable)."""
    if isinstance(error, UpstreamTimeout):
        return 504, "timeout", timed_out(config, model, backend, error)
    return 502, "upstream_error", unreachable(config, model, backend, error)


def unreachable(config: Config, model: Model, backend: Backend, error: Exception) -> dict[str, Any]:
    return error_body(
        f"{model.id}: the backend at {config.url_of(model)} (unit {config.unit_of(model)}) did not answer: "
        f"{error}. Check `{config.systemctl('status', config.unit_of(model))}` and "
        f"`{config.journalctl(config.unit_of(model))}`.",
        "backend_unreachable", "server_error")


def timed_out(config: Config, model: Model, backend: Backend, error: UpstreamTimeout) -> dict[str, Any]:
    return error_body(
        f"{model.id}: the backend at {config.url_of(model)} (unit {config.unit_of(model)}) {error}; the router "
        f"dropped the connection and the model is free again. If the engine is just slow, raise "
        f"timeouts.{error.kind}; otherwise check `{config.journalctl(config.unit_of(model))}`.",
        "backend_timeout", "server_error")


def broken_off(model: Model, error: Exception) -> dict[str, Any]:
    return error_body(f"{model.id}: the backend broke off the answer ({error}).", "backend_stream_broken",
                      "server_error")
