"""Anthropic Messages API shapes: the streamed wait for a model, errors, and the router's lines in history.

Claude Code and the anthropic SDKs talk to llama.cpp's server or vLLM through `POST /v1/messages`
(and `/v1/messages/count_tokens`). A stream is a sequence of named SSE events: `message_start`,
then per content block `content_block_start` / `content_block_delta`... / `content_block_stop`
(each with the block's `index`), `message_delta` (stop reason, usage), `message_stop`; `ping` may
come at any time and every SDK skips it; `error` ends a stream with
`{"type": "error", "error": {"type": ..., "message": ...}}`, the same body as an HTTP error.

While the model loads, `ping` events keep the stream alive. When the request asked for thinking
(`thinking: {"type": "enabled" | "adaptive"}`) the status lines are shown as thinking, which is
where a client like Claude Code shows progress that is not the answer:

    message_start (the router's)  ->  content_block 0: thinking, one status line per delta,
    a signature_delta with `ROUTER_SIGNATURE`, content_block_stop  ->  the engine's events

The router's `message_start` already went out, so the engine's own is dropped (its usage is added
to the engine's `message_delta`, where the SDKs read usage as well), and every block index of the
engine is one higher (`MessageShift`): a client puts blocks at `content[index]`, so the router's
block must keep index 0 and the engine's follow it. The alternatives are worse: the status in a
text block would become the answer's text (and be sent back as the model's own words), and holding
the status until the engine's `message_start` would show nothing while the model loads. Without
thinking nothing but `ping` is added and the engine's bytes go through untouched. The router's
thinking block carries `ROUTER_SIGNATURE` so that a client sending it back in a later request's
history (Claude Code does, within a tool-use turn) gets it removed before the engine sees it.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import orjson
from starlette.responses import JSONResponse, Response

from router.chunks import failed_line, ready_line
from router.switcher import Failed, Granted, Status

ROUTER_SIGNATURE = "llm-router-status"  # the signature of the router's own thinking block
PING = b'event: ping\ndata: {"type":"ping"}\n\n'

# Anthropic's error types by HTTP status (docs: "HTTP errors"); other 4xx: invalid_request_error, 5xx: api_error
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
               529: "overloaded_error"}


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type(status), "message": message}}


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return JSONResponse(error_body(status, message), status_code=status, headers=headers)


def event(name: str, data: Mapping[str, Any]) -> bytes:
    """One named SSE event, as the Messages API writes them."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def wants_thinking(body: Mapping[str, Any]) -> bool:
    thinking = body.get("thinking")
    return isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive")


def strip_router_thinking(messages: Any) -> bool:
    """Remove the router's thinking blocks from assistant messages (in place); True if any was there."""
    changed = False
    if not isinstance(messages, list):
        return False
    for message in messages:
        if not isinstance(message, dict) or message.get("role") != "assistant":
            continue
        content = message.get("content")
        if not isinstance(content, list):
            continue
        kept = [b for b in content if not (isinstance(b, dict) and b.get("type") == "thinking"
                                           and b.get("signature") == ROUTER_SIGNATURE)]
        if len(kept) != len(content):
            message["content"], changed = kept, True
    return changed


class AnthropicShape:
    """The wait for a model, and errors, as Messages API events and bodies (see the module docstring)."""

    streams_wait = True

    def __init__(self, model: str, thinking: bool) -> None:
        self.model = model  # the name the client asked for
        self.thinking = thinking
        self.opened = False  # the router sent message_start and its thinking block
        self.closed = False  # ... and closed that block

    def waiting(self, status: Status | None) -> bytes:
        if status is None or not self.thinking:
            return PING
        return self._open() + self._thinking(status.text)

    def ready(self, granted: Granted) -> bytes:
        if not self.opened:
            return b""
        line = self._thinking(ready_line(granted.model.display_name, granted.took)) if granted.took is not None else b""
        return line + self._close()

    def failed(self, failed: Failed, status: int) -> bytes:
        out = b""
        if self.opened:
            out = self._thinking(failed_line(failed.display, failed.error.what.rstrip("."))) + self._close()
        return out + self.error(failed.message, failed.error.code, status)

    def error(self, message: str, code: str, status: int, tail: bytes = b"") -> bytes:
        close = self._close() if self.opened else b""
        return close + event("error", error_body(status, message))

    def error_response(self, status: int, message: str, code: str, param: str | None = None,
                       headers: Mapping[str, str] | None = None) -> Response:
        return error_response(status, message, headers)

    def tap(self) -> MessageShift | None:
        return MessageShift() if self.opened else None

    def _open(self) -> bytes:
        if self.opened:
            return b""
        self.opened = True
        message: dict[str, Any] = {"id": f"msg_router_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant",
                   "model": self.model, "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": 0, "output_tokens": 0}}
        return (event("message_start", {"type": "message_start", "message": message})
                + event("content_block_start", {"type": "content_block_start", "index": 0,
                                                "content_block": {"type": "thinking", "thinking": "",
                                                                  "signature": ""}}))

    def _thinking(self, line: str) -> bytes:
        if self.closed:
            return b""
        return event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                             "delta": {"type": "thinking_delta", "thinking": line + "\n"}})

    def _close(self) -> bytes:
        if self.closed:
            return b""
        self.closed = True
        return (event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                              "delta": {"type": "signature_delta", "signature": ROUTER_SIGNATURE}})
                + event("content_block_stop", {"type": "content_block_stop", "index": 0}))


_BLOCK_EVENTS = (b"content_block_start", b"content_block_delta", b"content_block_stop")


class MessageShift:
    """The engine's Messages stream after the router's own `message_start` and thinking block (index 0).

    Cuts the stream at event boundaries; drops the engine's `message_start` (keeping its usage for
    the `message_delta`), adds one to every content block index. Only events that change are
    parsed; the rest pass as they came.
    """

    def __init__(self) -> None:
        self._pending = b""
        self._usage: dict[str, Any] | None = None

    def feed(self, piece: bytes) -> bytes:
        buf = self._pending + piece if self._pending else piece
        cut = buf.rfind(b"\n\n")
        if cut < 0:
            self._pending = buf
            return b""
        head, self._pending = buf[: cut + 2], buf[cut + 2:]
        return b"".join(self._one(e + b"\n\n") for e in head.split(b"\n\n")[:-1] if e)

    def finish(self) -> bytes:
        rest, self._pending = self._pending, b""
        return self._one(rest) if rest.strip() else rest

    def _one(self, raw: bytes) -> bytes:
        data_at = raw.find(b"data:")
        if data_at < 0:
            return raw  # a comment or a bare `event:` line
        try:
            obj = orjson.loads(raw[data_at + 5:])
        except orjson.JSONDecodeError:
            return raw
        if not isinstance(obj, dict):
            return raw
        kind = obj.get("type")
        if kind == "message_start":
            message = obj.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            self._usage = usage if isinstance(usage, dict) else None
            return b""
        if isinstance(kind, str) and kind.encode() in _BLOCK_EVENTS and isinstance(obj.get("index"), int):
            obj["index"] += 1
            return event(kind, obj)
        if kind == "message_delta" and self._usage:
            usage = obj.get("usage")
            engine_usage: dict[str, Any] = usage if isinstance(usage, dict) else {}
            obj["usage"] = {**{k: v for k, v in self._usage.items() if k != "output_tokens"}, **engine_usage}
            return event(kind, obj)
        return raw
