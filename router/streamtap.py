"""Stream tap: passes an engine's SSE bytes through, touching only the chunks that must change (pure).

The relay hands every piece it reads from the engine to `feed()` and sends on what comes back.
Pieces are cut only at event boundaries and otherwise left byte for byte as the engine wrote
them; only the usage chunk and `[DONE]` are parsed, to append the stats line exactly once.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

import orjson

from router.chunks import ChunkWriter, stats_line

_USAGE = re.compile(rb'"usage"\s*:\s*\{')
_ID = re.compile(rb'"id"\s*:\s*"([^"\\]*)"')
_DONE = b"data: [DONE]"
_ROLE = b'"role"'


class StreamTap:
    """Per-response state of the relay: event framing, id rewrite, usage and the stats chunk."""

    def __init__(self, writer: ChunkWriter, *, stats: bool, client_usage: bool, rewrite_id: bool,
                 drop_role: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        """rewrite_id: give the engine's chunks the writer's id (the router spoke first, with its id);
        otherwise the router's own chunks take the engine's id. drop_role: the router's chunks already
        said `role: assistant`, so the engine's first delta loses its role."""
        self.writer = writer
        self.stats = stats
        self.client_usage = client_usage
        self.rewrite_id = rewrite_id
        self.drop_role = drop_role
        self.clock = clock
        self._pending = b""
        self._id_from: bytes | None = None
        self._id_to = b'"id":"' + writer.id.encode() + b'"'
        self._started: float | None = None
        self._events = 0
        self._usage: dict[str, Any] | None = None
        self._timings: dict[str, Any] | None = None
        self._held_usage: bytes = b""
        self._usage_passed = False
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
        if _USAGE.search(head) is None and _DONE not in head:
            return head  # the hot path: nothing in these events needs the router
        return self._slow(head)

    @property
    def prompt_tokens(self) -> int | None:
        """The prompt's tokens, from the engine's usage (None until a usage chunk went by)."""
        value = self._usage.get("prompt_tokens") if self._usage is not None else None
        return value if isinstance(value, int) else None

    def finish(self) -> bytes:
        """The engine closed the stream: whatever is left, as it came."""
        rest, self._pending = self._pending, b""
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
            if _USAGE.search(event) and self._take_usage(event):
                if self.client_usage:
                    self._held_usage = event  # sent after the stats line, once
                continue
            if event.startswith(_DONE):
                out.append(self._stats_chunk())
                out.append(self._held_usage)
                self._held_usage = b""
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
        return True

    def _stats_chunk(self) -> bytes:
        if self.stats_sent:
            return b""
        self.stats_sent = True
        elapsed = max(self.clock() - (self._started or self.clock()), 1e-6)
        timings = self._timings
        if timings and timings.get("predicted_per_second"):
            tokens = int(timings.get("predicted_n") or 0)
            seconds = float(timings.get("predicted_ms") or 0) / 1000 or elapsed
            rate = float(timings["predicted_per_second"])
        else:
            if self._usage is not None:
                tokens = int(self._usage.get("completion_tokens") or 0)
            else:  # no usage from this engine: one token per content chunk, roughly
                tokens = max(self._events - 3, 0)
            seconds, rate = elapsed, tokens / elapsed
        self.summary = {"tokens": tokens, "seconds": round(seconds, 3), "tok_per_s": round(rate, 2)}
        line = "\n\n" + stats_line(tokens, seconds, rate)
        extra: dict[str, Any] = {}
        if not self.client_usage and self._usage is not None and not self._usage_passed:
            extra["usage"] = self._usage
            extra["timings"] = timings or {
                "predicted_n": tokens, "predicted_ms": round(seconds * 1000, 3),
                "predicted_per_second": round(rate, 3),
                "prompt_n": int(self._usage.get("prompt_tokens") or 0),
            }
        return self.writer.content(line, extra)
