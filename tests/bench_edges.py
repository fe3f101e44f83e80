"""Benchmark the abuse cases of issue 8 against the router's HTTP server (in-process, fake switcher).

Prints peak RSS and timings for: huge headers, huge bodies, idle connections, slowloris, YAML bombs.
Run: .venv/bin/python tests/bench_edges.py
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from pathlib import Path

from test_config import LAUGHS, MERGE_BOMB, MIN_CONFIG, MIN_MODELS
from test_http_edges import BASE, EchoRelay, chat_request, make_app, read_response

from router import app as app_module
from router.config import ConfigError, Limits, parse_config
from router.daemon import _Server, uvicorn_config

MiB = 1024 * 1024


def rss() -> tuple[float, float]:
    """(current, peak) resident set size of this process, MiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


async def flood(port: int, head: bytes, total: int) -> tuple[int, float]:
    """Send `head`, then `total` bytes of filler, until the server answers; its status and the time."""
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    chunk = b"a" * (64 * 1024)

    async def send() -> None:
        sent = 0
        try:
            while sent < total:
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
        except ConnectionError:
            pass

    sender = asyncio.create_task(send())
    try:
        status = (await read_response(reader, timeout=60))[0]
    except (ConnectionError, asyncio.IncompleteReadError):
        status = 0
    sender.cancel()
    writer.close()
    return status, time.monotonic() - t0


async def main() -> None:
    limits = Limits(idle_connection=2.0, header_timeout=3.0)
    config = replace(BASE, limits=limits)
    app_module.Relay = EchoRelay  # type: ignore[misc,assignment]  # no engine: answer what would go upstream
    app, _ = make_app(config)
    uconfig = uvicorn_config(app, config)
    uconfig.port = 0
    server = _Server(uconfig)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    print(f"limits: {limits}")
    print(f"start: RSS {rss()[0]:.0f} MiB")

    results = await asyncio.gather(*(flood(port, b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-big: ", 64 * MiB)
                                     for _ in range(4)))
    print(f"4 x 64 MiB header: statuses {[s for s, _ in results]}, refused within "
          f"{max(t for _, t in results):.2f}s; RSS now {rss()[0]:.0f} MiB, peak {rss()[1]:.0f} MiB")

    head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: chunked\r\n\r\n")
    results = await asyncio.gather(*(flood(port, head + b"%x\r\n" % (50 * MiB), 50 * MiB) for _ in range(4)))
    print(f"4 x 50 MiB chunked body: statuses {[s for s, _ in results]}, answered within "
          f"{max(t for _, t in results):.2f}s; RSS now {rss()[0]:.0f} MiB, peak {rss()[1]:.0f} MiB")

    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(1100)]
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(chat_request())
    status = (await read_response(reader))[0]
    print(f"1100 silent connections open: a real request still gets {status} in "
          f"{(time.monotonic() - t0) * 1000:.1f} ms")
    writer.close()
    closed = await asyncio.gather(*(asyncio.wait_for(r.read(1), 10) for r, _ in conns))
    print(f"  all {sum(1 for c in closed if c == b'')} closed by the server within "
          f"{time.monotonic() - t0:.1f}s (idle_connection {limits.idle_connection}s)")
    for _, w in conns:
        w.close()

    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /v1/models HTTP/1.1\r\n")
    status = 0
    for i in range(100):
        writer.write(b"x-%d: y\r\n" % i)
        try:
            status = (await read_response(reader, timeout=0.5))[0]
            break
        except TimeoutError:
            continue
    print(f"slowloris (a header every 0.5 s): {status} after {time.monotonic() - t0:.1f}s")
    writer.close()

    for name, bomb in (("merge-key bomb", MERGE_BOMB), ("billion laughs", LAUGHS),
                       ("100,000 '['", "backends: " + "[" * 100_000 + "\n")):
        t0 = time.monotonic()
        try:
            parse_config(bomb + MIN_CONFIG, MIN_MODELS, Path("/etc/llm-router"), {})
        except ConfigError as e:
            print(f"{name}: refused in {(time.monotonic() - t0) * 1000:.0f} ms: {e.problems[0]}")
    server.should_exit = True
    await task
    print(json.dumps({"peak_rss_mib": round(rss()[1])}))


if __name__ == "__main__":
    asyncio.run(main())
