#!/usr/bin/env python3
"""Bench engine: a fast fake OpenAI engine for relay benchmarks (raw asyncio protocol, uvloop if present).

GET /health answers 200. POST /v1/chat/completions answers `tokens` content tokens, streamed
(vLLM-style: a role chunk, the content chunks, a finish chunk, a usage chunk if asked, `[DONE]`,
each SSE event its own HTTP chunk) or whole. Per request, headers `x-bench-tokens` and
`x-bench-rate` (tokens/s per stream, 0 = as fast as possible) override --tokens and --rate, so one
engine serves every scenario. Chunks are rendered once per request: the engine costs little CPU.

    python bench/engine.py --port 18100 [--tokens 256] [--rate 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

HEAD_STREAM = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
               b"transfer-encoding: chunked\r\n\r\n")


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def render_stream(n: int, rid: str, usage: bool) -> tuple[bytes, list[bytes], bytes]:
    head = b'data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":"bench","choices":[{"index":0,' % (
        rid.encode(), int(time.time()))
    role = _chunk(head + b'"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n')
    tokens = [_chunk(head + b'"delta":{"content":" tok%d"},"finish_reason":null}]}\n\n' % i) for i in range(n)]
    tail = _chunk(head + b'"delta":{},"finish_reason":"stop"}]}\n\n')
    if usage:
        tail += _chunk(b'data: {"id":"%s","object":"chat.completion.chunk","model":"bench","choices":[],'
                       b'"usage":{"prompt_tokens":8,"completion_tokens":%d,"total_tokens":%d}}\n\n'
                       % (rid.encode(), n, n + 8))
    tail += _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
    return role, tokens, tail


def render_whole(n: int, rid: str) -> bytes:
    body = json.dumps({
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": "bench",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(f" tok{i}" for i in range(n))},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": n + 8}}, separators=(",", ":")).encode()
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


class Engine(asyncio.Protocol):
    """One client connection: parses requests (content-length bodies), answers them one after another."""

    def __init__(self, tokens: int, rate: float) -> None:
        self.tokens, self.rate = tokens, rate
        self.buf = b""
        self.busy = False
        self.closed = False
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None
        self.count = 0
        self.task: asyncio.Future[None] | None = None  # the answer being written

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._next()

    def _next(self) -> None:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buf[:end].decode("latin-1")
        lines = head.split("\r\n")
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        if len(self.buf) < end + 4 + length:
            return
        body = self.buf[end + 4:end + 4 + length]
        self.buf = self.buf[end + 4 + length:]
        method, path = lines[0].split(" ")[:2]
        self.busy = True
        self.task = asyncio.ensure_future(self._answer(method, path, headers, body))

    async def _answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        assert self.transport is not None
        try:
            if method == "GET":
                self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n"
                                     b'{"status":"ok"}')
            else:
                await self._complete(headers, body)
        finally:
            self.busy = False
        if not self.closed and self.buf:
            self._next()

    async def _complete(self, headers: dict[str, str], raw: bytes) -> None:
        assert self.transport is not None
        request = json.loads(raw or b"{}")
        n = int(headers.get("x-bench-tokens") or request.get("max_tokens") or self.tokens)
        rate = float(headers.get("x-bench-rate") or self.rate)
        self.count += 1
        rid = f"chatcmpl-bench-{id(self):x}-{self.count}"
        if not request.get("stream"):
            if rate > 0:
                await asyncio.sleep(n / rate)
            self.transport.write(render_whole(n, rid))
            return
        usage = bool((request.get("stream_options") or {}).get("include_usage"))
        role, tokens, tail = render_stream(n, rid, usage)
        self.transport.write(HEAD_STREAM + role)
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i, token in enumerate(tokens):
            if self.closed:
                return
            if rate > 0:
                delay = start + (i + 1) / rate - loop.time()
                await asyncio.sleep(max(delay, 0))
            else:
                await asyncio.sleep(0)  # one token per loop turn: concurrent streams interleave like a real engine
            self.transport.write(token)
            if self.paused:
                self.waiter = loop.create_future()
                await self.waiter
        if not self.closed:
            self.transport.write(tail)


async def serve(port: int, tokens: int, rate: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Engine(tokens, rate), "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rate", type=float, default=0.0)
    a = ap.parse_args()
    try:
        import uvloop

        uvloop.run(serve(a.port, a.tokens, a.rate))
    except ImportError:
        asyncio.run(serve(a.port, a.tokens, a.rate))


if __name__ == "__main__":
    main()
