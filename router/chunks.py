"""Chunk formatting: status lines, SSE chunks, errors and the stats line (pure, no I/O)."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": loading\n\n"


def switching_line(display: str) -> str:
    return f"🔄 Switching to {display}…"


def waking_line(display: str, elapsed: float | None = None) -> str:
    """`⏰ Waking M…`: a sleeping engine gets its GPU memory back (seconds, not a cold start)."""
    return f"⏰ Waking {display}…" + (f" {int(elapsed)}s" if elapsed is not None else "")


def loading_line(display: str, elapsed: float, timeout: float, expected: float | None = None) -> str:
    """`⏳ Loading M… 20s/180s`; with `expected` (the model's typical load time from history)
    `⏳ Loading M… 20s/~45s`, until the load takes longer than that: then the timeout again."""
    if expected is not None and expected > 0 and elapsed <= expected:
        return f"⏳ Loading {display}… {int(elapsed)}s/~{max(1, round(expected))}s"
    return f"⏳ Loading {display}… {int(elapsed)}s/{int(timeout)}s"


def ready_line(display: str, took: float) -> str:
    return f"✅ {display} ready (took {round(took)}s)"


def failed_line(display: str, reason: str) -> str:
    return f"❌ {display} failed to load: {reason}"


def stats_line(tokens: int, seconds: float, tok_per_s: float) -> str:
    return f"⚡ {tok_per_s:.1f} tok/s ({tokens} tokens in {seconds:.1f}s)"


# The router's own lines, as they come back inside assistant messages of later requests.
_OWN_LINE = re.compile(
    r"^(?:🔄 Switching to .*…|⏳ Loading .*… \d+s/~?\d+s|✅ .* ready \(took \d+s\)|❌ .* failed to load: .*"
    r"|⚡ \d+(?:\.\d+)? tok/s \(\d+ tokens in \d+(?:\.\d+)?s\))$")


def strip_own_lines(text: str) -> str:
    """Remove the router's status and stats lines from an assistant message."""
    if not any(mark in text for mark in ("🔄", "⏳", "✅", "❌", "⚡")):
        return text
    kept = [line for line in text.split("\n") if not _OWN_LINE.match(line)]
    return "\n".join(kept).strip("\n")


def strip_history(messages: list[Any]) -> bool:
    """Strip the router's lines from every assistant message in place; True if anything changed."""
    changed = False
    for message in messages:
        if not isinstance(message, dict) or message.get("role") != "assistant":
            continue
        content = message.get("content")
        if isinstance(content, str):
            new = strip_own_lines(content)
            if new != content:
                message["content"], changed = new, True
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                    new = strip_own_lines(part["text"])
                    if new != part["text"]:
                        part["text"], changed = new, True
    return changed


def sse(obj: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


@dataclass
class ChunkWriter:
    """Makes the router's own chunks for one streamed response (one id, role on the first delta)."""

    model: str
    channel: str = "event"  # event | reasoning | content | none
    completions: bool = False  # /v1/completions (text choices) rather than chat
    id: str = field(default_factory=lambda: f"chatcmpl-router-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))
    role_sent: bool = False  # the engine or an earlier chunk already said role: assistant

    def _base(self) -> dict[str, Any]:
        obj = "text_completion" if self.completions else "chat.completion.chunk"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _choice(self, key: str, text: str) -> dict[str, Any]:
        if self.completions:
            return {"index": 0, "text": text, "finish_reason": None}
        delta: dict[str, Any] = {key: text}
        if not self.role_sent:
            delta = {"role": "assistant", **delta}
            self.role_sent = True
        return {"index": 0, "delta": delta, "finish_reason": None}

    def status(self, line: str, done: bool = False) -> bytes:
        """A status line through the configured channel; b"" for channel none."""
        channel = self.channel
        if self.completions and channel in ("reasoning", "content"):
            channel = "event"  # a text completion's text must stay exactly the engine's (autocomplete, FIM)
        if channel == "none":
            return b""
        if channel == "event":
            return sse({**self._base(), "choices": [],
                        "event": {"type": "status", "data": {"description": line, "done": done}}})
        key = "reasoning_content" if channel == "reasoning" else "content"
        return sse({**self._base(), "choices": [self._choice(key, line + "\n")]})

    def error(self, message: str, code: str, type_: str = "server_error") -> bytes:
        """An error chunk without choices (Open WebUI shows `error` only where choices is empty)."""
        return sse({**self._base(), "choices": [], "error": {"message": message, "type": type_, "code": code}})

    def content(self, text: str, extra: Mapping[str, Any] | None = None) -> bytes:
        return sse({**self._base(), "choices": [self._choice("content", text)], **(extra or {})})


def error_body(message: str, code: str, type_: str = "invalid_request_error",
               param: str | None = None) -> dict[str, Any]:
    """An OpenAI-style error body."""
    return {"error": {"message": message, "type": type_, "code": code, "param": param}}
