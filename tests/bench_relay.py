#!/usr/bin/env python3
"""Relay benchmark: what the router adds to first-token latency and chunk throughput (prints figures).

Runs a private systemd user manager (router/demo/systemd-sandbox.sh, root), a burst SSE engine
as a real unit, and the router in front of it; then measures the same requests sent directly to
the engine and through the router. Not a test: it asserts nothing, it prints numbers.

    sudo .venv/bin/python tests/bench_relay.py [--requests 200] [--chunks 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from sandbox import SCRIPT, free_port, wait_until  # noqa: E402

ENGINE = r'''
import asyncio, json, sys
port = int(sys.argv[1])
def chunk(i):
    return ("data: " + json.dumps({"id": "bench", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": {"content": f" t{i}"}, "finish_reason": None}]}) + "\n\n").encode()
USAGE = ("data: " + json.dumps({"id": "bench", "object": "chat.completion.chunk", "choices": [],
         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}) + "\n\n").encode()
async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            body = json.loads(await reader.readexactly(length)) if length else {}
            if head.startswith(b"GET"):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n{}")
                await writer.drain()
                continue
            n = int(body.get("max_tokens") or 1)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            for i in range(n):
                c = chunk(i)
                writer.write(b"%x\r\n%s\r\n" % (len(c), c))
                if i % 64 == 0:
                    await writer.drain()
            tail = USAGE + b"data: [DONE]\n\n"
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(tail), tail))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print("engine ready", flush=True)
    await server.serve_forever()
asyncio.run(main())
'''


async def first_token(client: httpx.AsyncClient, url: str) -> float:
    body = {"model": "m", "stream": True, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    t0 = time.perf_counter()
    elapsed = None
    async with client.stream("POST", url, json=body) as r:
        async for piece in r.aiter_raw():
            if elapsed is None and b'"content"' in piece:
                elapsed = time.perf_counter() - t0
    if elapsed is None:
        raise RuntimeError("no content chunk")
    return elapsed


async def throughput(client: httpx.AsyncClient, url: str, chunks: int) -> float:
    body = {"model": "m", "stream": True, "max_tokens": chunks, "messages": [{"role": "user", "content": "hi"}]}
    t0 = time.perf_counter()
    seen = 0
    async with client.stream("POST", url, json=body) as r:
        async for piece in r.aiter_raw():
            seen += piece.count(b"data: ")
    elapsed = time.perf_counter() - t0
    if seen < chunks:
        raise RuntimeError(f"only {seen} of {chunks} chunks arrived")
    return chunks / elapsed


async def measure(engine: str, router: str, requests: int, chunks: int) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        await first_token(client, router)  # loads the model, warms connections
        for url in (engine, router):
            for _ in range(10):
                await first_token(client, url)
        ttft: dict[str, list[float]] = {"direct": [], "router": []}
        for _ in range(requests):  # interleaved, so both see the same machine load
            ttft["direct"].append(await first_token(client, engine))
            ttft["router"].append(await first_token(client, router))
        rates: dict[str, list[float]] = {"direct": [], "router": []}
        for _ in range(3):
            rates["direct"].append(await throughput(client, engine, chunks))
            rates["router"].append(await throughput(client, router, chunks))
    d, r = statistics.median(ttft["direct"]) * 1000, statistics.median(ttft["router"]) * 1000
    print(f"first token, median of {requests}: direct {d:.2f} ms, through the router {r:.2f} ms "
          f"(router adds {r - d:.2f} ms)")
    p95 = lambda xs: sorted(xs)[int(len(xs) * 0.95)] * 1000  # noqa: E731
    print(f"first token, p95: direct {p95(ttft['direct']):.2f} ms, router {p95(ttft['router']):.2f} ms")
    dr, rr = max(rates["direct"]), max(rates["router"])
    print(f"throughput, best of 3 x {chunks} chunks: direct {dr:,.0f} chunks/s, router {rr:,.0f} chunks/s "
          f"({rr / dr:.0%} of direct)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--chunks", type=int, default=20000)
    ap.add_argument("--stats", choices=["on", "off"], default="on")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        root = Path(tmp)
        sbx = root / "sbx"
        subprocess.run([str(SCRIPT), "start", str(sbx)], check=True, capture_output=True, timeout=60)
        router_proc = None
        try:
            (root / "engine.py").write_text(ENGINE)
            eport, rport = free_port(), free_port()
            unit_dir = sbx / "config" / "systemd" / "user"
            (unit_dir / "bench-engine.service").write_text(
                f"[Service]\nType=exec\nExecStart={sys.executable} {root / 'engine.py'} {eport}\n")
            cfg = root / "cfg"
            cfg.mkdir()
            (cfg / "config.yml").write_text(json.dumps({
                "listen": {"host": "127.0.0.1", "port": rport},
                "systemd": {"bus": "user", "dropin_dir": str(unit_dir)},
                "stats": a.stats == "on",
                "backends": {"bench": {"unit": "bench-engine.service", "url": f"http://127.0.0.1:{eport}"}}}))
            (cfg / "models.yml").write_text(json.dumps({"models": {"m": {"backend": "bench"}}}))
            router_proc = subprocess.Popen(
                [str(SCRIPT), "exec", str(sbx), "--", sys.executable, "-m", "router", "serve", "--config-dir",
                 str(cfg), "--log-level", "warning"], cwd=HERE.parent,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_until(lambda: _up(f"http://127.0.0.1:{rport}/health"), timeout=20, what="router /health")
            asyncio.run(measure(f"http://127.0.0.1:{eport}/v1/chat/completions",
                                f"http://127.0.0.1:{rport}/v1/chat/completions", a.requests, a.chunks))
            print(f"(stats line {'on' if a.stats == 'on' else 'off'}; 2-core machine; "
                  "engine and router share the cores)")
        finally:
            if router_proc is not None:
                router_proc.terminate()
                router_proc.wait(10)
            subprocess.run([str(SCRIPT), "stop", str(sbx)], capture_output=True, timeout=60)


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
