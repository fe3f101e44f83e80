"""Read and check a client's request body: a size cap while it streams in, then JSON that is safe to handle."""

from __future__ import annotations

import gc
import json
import re
from dataclasses import dataclass
from typing import Any

import structlog
from starlette.requests import ClientDisconnect, Request

log = structlog.get_logger("router.http")

# JSON nested deeper than this is refused. OpenAI requests nest about 6 levels, tool schemas a few
# more per nested object; Python's own parser fails near 1,000 (RecursionError), orjson at 1,024.
MAX_JSON_DEPTH = 128

_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


@dataclass(frozen=True)
class BadBody:
    """Why a body is refused: the HTTP status, an OpenAI-style error code and a message a user can act on."""

    status: int
    message: str
    code: str
    param: str | None = None
    close: bool = False  # the connection must close (the rest of the body was not read)


class ClientLeft(Exception):
    """The client closed the connection before its whole body arrived."""


async def read_body(request: Request, max_bytes: int) -> bytes | BadBody:
    """The whole body, never holding more than `max_bytes` of it; BadBody 413 past that.

    Raises ClientLeft (after logging one line) when the client leaves mid-upload.
    """
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        return _too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                return _too_large(max_bytes)
            chunks.append(chunk)
    except ClientDisconnect:
        log.info("client_left_during_upload", path=request.url.path, received=size,
                 client=request.client.host if request.client else None)
        raise ClientLeft from None
    return b"".join(chunks)


def _too_large(max_bytes: int) -> BadBody:
    return BadBody(413, f"The request body is larger than {max_bytes} bytes (limits.max_body_bytes in "
                        "config.yml).", "request_too_large", close=True)


def parse_body(raw: bytes) -> dict[str, Any] | BadBody:
    """A JSON object from UTF-8 bytes, or BadBody 400 (`invalid_json`) saying what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadBody(400, f"The request body is not valid UTF-8 (byte {e.start}: {e.reason}).", "invalid_json")
    gc_was_on = gc.isenabled()
    gc.disable()  # a body of many small arrays would run the cycle collector over and over (4x slower)
    try:
        body = json.loads(text)
        too_deep = (isinstance(body, dict) and text.count("[") + text.count("{") > MAX_JSON_DEPTH
                    and _depth_over(body, MAX_JSON_DEPTH))
    except RecursionError:
        return _too_deep()
    except ValueError as e:
        return BadBody(400, f"The request body is not valid JSON: {e}.", "invalid_json")
    finally:
        if gc_was_on:
            gc.enable()
    if not isinstance(body, dict):
        return BadBody(400, "The request body must be a JSON object.", "invalid_json")
    if too_deep:
        return _too_deep()
    if _ESCAPED_SURROGATE.search(text) and _has_lone_surrogate(body):
        return BadBody(400, "The request body holds a lone UTF-16 surrogate escape (like \\ud800 without its "
                            "pair): not a character; fix the client's JSON encoder.", "invalid_json")
    return body


def _too_deep() -> BadBody:
    return BadBody(400, f"The request body's JSON nests deeper than {MAX_JSON_DEPTH} levels.", "invalid_json")


def _depth_over(value: dict[str, Any] | list[Any], limit: int) -> bool:
    """Whether `value` nests more than `limit` levels: one pass per level, each container seen once."""
    level: list[Any] = [value]
    for _ in range(limit):
        deeper: list[Any] = []
        for node in level:
            for child in node.values() if type(node) is dict else node:
                if type(child) is list or type(child) is dict:
                    deeper.append(child)
        if not deeper:
            return False
        level = deeper
    return True


def _has_lone_surrogate(value: Any) -> bool:
    stack: list[Any] = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def check_stream(body: dict[str, Any]) -> BadBody | None:
    """`stream` must be a boolean (or absent/null): the string "false" is not false."""
    stream = body.get("stream")
    if stream is None or isinstance(stream, bool):
        return None
    return BadBody(400, f"`stream` must be true or false, not {json.dumps(stream)[:40]}.", "invalid_field",
                   "stream")
