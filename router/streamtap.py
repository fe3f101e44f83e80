"""Stream tap: passes an engine's SSE bytes through, touching only the chunks that must change (pure).

The relay hands every piece it reads from the engine to `feed()` and sends on what comes back.
Pieces are cut only at event boundaries and otherwise left byte for byte as the engine wrote
them; only the usage chunk and `[DONE]` are parsed (with `stats: content`, also the finishing
chunk), to report the answer's speed exactly once:

- `stats: event` (default): the last chunk before `[DONE]` has no choices (OpenAI's usage-chunk
  shape, allowed after the finishing chunk) and carries `usage`, llama.cpp-style `timings` (Open
  WebUI's (i) tooltip) and the final status event `✅ M · ⚡ 41.2 tok/s · 512 tokens in 12.4 s`.
- `stats: content`: the `⚡` line is appended to the answer's text inside the finishing chunk (held
  until the usage arrives), never in a chunk after it.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

import orjson

from router.chunks import ChunkWriter, final_line, sse, stats_line

_USAGE = re.compile(rb'"usage"\s*:\s*\{')
_ID = re.compile(rb'"id"\s*:\s*"([^"\\]*)"')
_FINISH = re.compile(rb'"finish_reason"\s*:\s*"')  # a finishing chunk (null is the usual value)
_DONE = b"data: [DONE]"
_ROLE = b'"role"'


class StreamTap:
    """Per-response state of the relay: event framing, id rewrite, usage and the stats chunk."""

    def __init__(self, writer: ChunkWriter, *, stats: bool, client_usage: bool, rewrite_id: bool,
                 drop_role: bool = False, clock: Callable[[], float] = time.monotonic,
                 stats_channel: str = "event", display: str = "", took: float | None = None,
                 sent_at: float | None = None) -> None:
        """rewrite_id: give the engine's chunks the writer's id (the router spoke first, with its id);
        otherwise the router's own chunks take the engine's id. drop_role: the router's chunks already
        said `role: assistant`, so the engine's first delta loses its role. stats_channel: `event` (the
        final status event) or `content` (the inline `⚡` line). display: the model's name in the final
        status; took: the wait before the model was ready (said in it); sent_at: when the request went
        to the engine (clock time), for the prompt's part of made-up timings."""
        self.writer = writer
        self.stats = stats
        self.client_usage = client_usage
        self.rewrite_id = rewrite_id
        self.drop_role = drop_role
        self.clock = clock
        self.inline = stats_channel == "content"
        self.display = display or writer.model
        self.took = took
        self.sent_at = sent_at
        self._pending = b""
        self._id_from: bytes | None = None
        self._id_to = b'"id":"' + writer.id.encode() + b'"'
        self._started: float | None = None
        self._events = 0
        self._usage: dict[str, Any] | None = None
        self._timings: dict[str, Any] | None = None
        self._usage_chunk: dict[str, Any] | None = None  # the engine's usage-only chunk, parsed (held)
        self._usage_event = b""  # ... and as it came (stats: content, for a client that asked for usage)
        self._usage_passed = False
        self._held: list[bytes] = []  # stats: content: the finishing chunk and what followed it
        self.stats_sent = False
        self.summary: dict[str, Any] | None = None  # tokens, seconds, tok_per_s once known

    def feed(self, piece: bytes) -> bytes:
        if self._started is None:
            self._started = self.clock()
        buf = self._pending + piece if self._pending else piece
        cut = buf.rfind(b"\n\n")
        if cut < 0:
            self._pending = buf
            return b""
        head, self._pending = buf[: cut + 2], buf[cut + 2:]
        if self._id_from is None:
            self._learn_id(head)
        if self.rewrite_id and self._id_from is not None:
            head = head.replace(self._id_from, self._id_to)
        if self.drop_role:
            head = self._without_role(head)
        if not self.stats:
            return head
        self._events += head.count(b"data:")
        if (_USAGE.search(head) is None and _DONE not in head
                and not (self.inline and (self._held or _FINISH.search(head)))):
            return head  # the hot path: nothing in these events needs the router
        return self._slow(head)

    @property
    def prompt_tokens(self) -> int | None:
        """The prompt's tokens, from the engine's usage (None until a usage chunk went by)."""
        value = self._usage.get("prompt_tokens") if self._usage is not None else None
        return value if isinstance(value, int) else None

    def finish(self) -> bytes:
        """The engine closed the stream (without `[DONE]`: no stats): whatever is left, as it came."""
        rest = b"".join(self._held) + self._usage_event + self._pending
        if self._usage_chunk is not None and not self._usage_event and self.client_usage:
            rest = sse(self._usage_chunk) + rest
        self._held, self._usage_event, self._usage_chunk, self._pending = [], b"", None, b""
        return rest

    def _learn_id(self, head: bytes) -> None:
        m = _ID.search(head)
        if m is not None:
            self._id_from = m.group(0)
            if not self.rewrite_id:
                self.writer.id = m.group(1).decode("utf-8", "replace")

    def _without_role(self, head: bytes) -> bytes:
        """Remove `role` from the first delta that has one (once per response; it is parsed)."""
        if _ROLE not in head:
            return head
        out = []
        for event in head.split(b"\n\n")[:-1]:
            if self.drop_role and _ROLE in event and event.startswith(b"data: {"):
                try:
                    obj = orjson.loads(event[6:])
                    for choice in obj.get("choices") or []:
                        if isinstance(choice.get("delta"), dict) and choice["delta"].pop("role", None):
                            self.drop_role = False
                    event = b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
                except (ValueError, AttributeError):
                    pass
            out.append(event + b"\n\n")
        return b"".join(out)

    def _slow(self, head: bytes) -> bytes:
        out = []
        for event in head.split(b"\n\n"):
            if not event:
                continue
            event += b"\n\n"
            if event.startswith(_DONE):
                out.append(self._closing())
                out.append(event)
                continue
            if _USAGE.search(event) and self._take_usage(event):
                self._usage_event = event if self.inline and self.client_usage else b""
                continue  # held: its usage goes out once, with the stats
            if self.inline and (self._held or _FINISH.search(event)):
                self._held.append(event)  # the stats line goes into the finishing chunk, once usage is known
                continue
            out.append(event)
        return b"".join(out)

    def _take_usage(self, event: bytes) -> bool:
        """Read usage (and llama.cpp timings) from an event; True if it is a usage-only chunk."""
        try:
            obj = orjson.loads(event[event.index(b"{"):])
        except ValueError:
            return False
        if not isinstance(obj, dict) or not isinstance(obj.get("usage"), dict):
            return False
        self._usage = obj["usage"]
        if isinstance(obj.get("timings"), dict):
            self._timings = obj["timings"]
        if obj.get("choices"):
            self._usage_passed = True  # usage rides on a chunk with content: it went out as it came
            return False
        self._usage_chunk = obj
        return True

    def _measure(self) -> tuple[int, float, float]:
        """Tokens, seconds and tokens per second of the answer: the engine's timings, else its usage over
        the streaming time, else one token per chunk."""
        elapsed = max(self.clock() - (self._started or self.clock()), 1e-6)
        timings = self._timings
        if timings and timings.get("predicted_per_second"):
            tokens = int(timings.get("predicted_n") or 0)
            seconds = float(timings.get("predicted_ms") or 0) / 1000 or elapsed
            return tokens, seconds, float(timings["predicted_per_second"])
        if self._usage is not None:
            tokens = int(self._usage.get("completion_tokens") or 0)
        else:  # no usage from this engine: one token per content chunk, roughly
            tokens = max(self._events - 3, 0)
        return tokens, elapsed, tokens / elapsed

    def _made_up_timings(self, tokens: int, seconds: float, rate: float) -> dict[str, Any]:
        """llama.cpp's `timings` fields, for an engine that sends only usage."""
        ms = seconds * 1000
        timings: dict[str, Any] = {}
        prompt = self.prompt_tokens
        if prompt is not None and self.sent_at is not None and self._started is not None:
            prompt_ms = max((self._started - self.sent_at) * 1000, 1e-3)
            timings = {"prompt_n": prompt, "prompt_ms": round(prompt_ms, 3),
                       "prompt_per_token_ms": round(prompt_ms / prompt, 3) if prompt else 0.0,
                       "prompt_per_second": round(prompt / prompt_ms * 1000, 3)}
        elif prompt is not None:
            timings = {"prompt_n": prompt}
        return {**timings, "predicted_n": tokens, "predicted_ms": round(ms, 3),
                "predicted_per_token_ms": round(ms / tokens, 3) if tokens else 0.0,
                "predicted_per_second": round(rate, 3)}

    def _closing(self) -> bytes:
        """What goes before `[DONE]`: the stats, once, with usage and timings when they are the router's
        to report, and whatever was held for them."""
        if self.stats_sent:
            return b""
        self.stats_sent = True
        tokens, seconds, rate = self._measure()
        chunk, self._usage_chunk = self._usage_chunk, None  # its usage goes out here, or went already
        self.summary = {"tokens": tokens, "seconds": round(seconds, 3), "tok_per_s": round(rate, 2)}
        usage: dict[str, Any] = {}  # usage + timings, when they have not gone out yet
        if self._usage is not None and not self._usage_passed:
            usage = {"usage": self._usage,
                     "timings": self._timings or self._made_up_timings(tokens, seconds, rate)}
        if not self.inline:
            line = final_line(self.display, tokens, seconds, rate, self.took)
            if chunk is None:
                return self.writer.final(line, usage)
            status = {"type": "status", "data": {"description": line, "done": True}}
            return sse({**chunk, **usage, "event": status})  # the engine's usage chunk: one usage, one id
        text = "\n\n" + stats_line(tokens, seconds, rate)
        extra = usage if not self.client_usage else {}
        after = self._usage_event if self.client_usage else b""
        held, self._held, self._usage_event = self._held, [], b""
        for i, event in enumerate(held):
            if _FINISH.search(event) and (finishing := _with_text(event, text, extra)) is not None:
                held[i] = finishing
                return b"".join(held) + after
        return self.writer.content(text, extra) + b"".join(held) + after  # no finishing chunk seen


def _with_text(event: bytes, text: str, extra: dict[str, Any]) -> bytes | None:
    """The finishing chunk with `text` appended to its first choice's content (and `extra` keys)."""
    try:
        obj = orjson.loads(event[event.index(b"{"):])
        delta = obj["choices"][0]["delta"]
        if not isinstance(delta, dict):
            return None
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    delta["content"] = (delta.get("content") or "") + text
    obj.update(extra)
    return sse(obj)
