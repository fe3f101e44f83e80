#!/usr/bin/env python3
"""Bench load generator: C concurrent clients send N chat completions to one URL and report one JSON line.

Streamed: TTFT p50/p99 (request sent -> first content chunk), content chunks/s over the run, and
whether every stream carried all its tokens and ended with `[DONE]`. Whole answers: req/s and latency.
aiohttp + uvloop, one keep-alive pool; C warm-up requests first so every connection is open.

    python bench/load.py --url http://127.0.0.1:18100 -c 32 -n 640 [--no-stream] [--tokens 256] [--rate 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import time
from typing import Any

import aiohttp

CONTENT = b'{"content":" tok'  # the bench engine's content deltas; the role chunk's content is ""
DONE = b"data: [DONE]"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def one(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str],
              stream: bool) -> tuple[float | None, int, bool, float]:
    """One request: (ttft, content chunks, ended well, latency)."""
    t0 = time.perf_counter()
    async with session.post(url, data=body, headers=headers) as resp:
        if not stream:
            data = await resp.read()
            return None, 0, resp.status == 200 and b'"choices"' in data, time.perf_counter() - t0
        ttft = None
        chunks = 0
        tail = b""  # the stream's last bytes: a pattern cut by a read is found across the cut
        async for piece in resp.content.iter_any():
            text = tail[-(len(CONTENT) - 1):] + piece
            found = text.count(CONTENT)
            if found and ttft is None:
                ttft = time.perf_counter() - t0
            chunks += found
            tail = (tail + piece)[-64:]
        return ttft, chunks, resp.status == 200 and DONE in tail, time.perf_counter() - t0


async def run(url: str, concurrency: int, requests: int, stream: bool, tokens: int, rate: float,
              model: str) -> dict[str, Any]:
    body = json.dumps({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}).encode()
    headers = {"content-type": "application/json", "x-bench-tokens": str(tokens), "x-bench-rate": str(rate)}
    warm_headers = {**headers, "x-bench-tokens": "2", "x-bench-rate": "0"}
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600),
                                     auto_decompress=False) as session:
        await asyncio.gather(*(one(session, url, body, warm_headers, stream) for _ in range(concurrency)))
        ttfts: list[float] = []
        latencies: list[float] = []
        chunks = 0
        bad = 0
        left = requests

        async def client() -> None:
            nonlocal left, chunks, bad
            while left > 0:
                left -= 1
                try:
                    ttft, n, ok, latency = await one(session, url, body, headers, stream)
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    bad += 1
                    continue
                if ttft is not None:
                    ttfts.append(ttft)
                latencies.append(latency)
                chunks += n
                if not ok or (stream and n != tokens):
                    bad += 1

        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    out: dict[str, Any] = {
        "url": url, "stream": stream, "concurrency": concurrency, "requests": requests, "tokens": tokens,
        "rate": rate, "wall_s": round(wall, 3), "errors": bad, "req_per_s": round(requests / wall, 1),
        "latency_p50_ms": round(statistics.median(latencies) * 1000, 2) if latencies else None,
        "client_cpu_s": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 3)}
    if stream:
        out.update(ttft_p50_ms=round(percentile(ttfts, 0.5) * 1000, 2),
                   ttft_p99_ms=round(percentile(ttfts, 0.99) * 1000, 2), chunks_per_s=round(chunks / wall))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--url", required=True, help="base URL (…/v1/chat/completions is added)")
    ap.add_argument("-c", "--concurrency", type=int, default=1)
    ap.add_argument("-n", "--requests", type=int, default=100)
    ap.add_argument("--no-stream", action="store_true")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rate", type=float, default=0.0)
    ap.add_argument("--model", default="bench")
    a = ap.parse_args()
    coro = run(a.url.rstrip("/") + "/v1/chat/completions", a.concurrency, a.requests, not a.no_stream, a.tokens,
               a.rate, a.model)
    try:
        import uvloop

        result = uvloop.run(coro)
    except ImportError:
        result = asyncio.run(coro)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
