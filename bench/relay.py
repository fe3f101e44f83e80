#!/usr/bin/env python3
"""Minimal relay: the yardstick for the router's hot path (what the same stack costs with nothing else).

Starlette on uvicorn (uvloop, httptools) with one aiohttp session upstream; a request's body goes to
the engine as it came and the engine's bytes come back as they arrive. No switching, no stats, no
timeouts, no disconnect watching: the router must come close to this, not beat it.

    python bench/relay.py --port 18102 --upstream http://127.0.0.1:18101
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

UPSTREAM = ""
session: aiohttp.ClientSession | None = None


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    global session
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4),
                                    timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False)
    yield
    await session.close()


async def chat(request: Request) -> Response:
    assert session is not None
    headers = {k: v for k, v in request.headers.items() if k.startswith(("x-bench", "content-type"))}
    resp = await session.post(UPSTREAM + "/v1/chat/completions", data=await request.body(), headers=headers)
    if not resp.headers.get("content-type", "").startswith("text/event-stream"):
        body = await resp.read()
        resp.release()
        return Response(body, status_code=resp.status, media_type="application/json")

    async def pieces() -> AsyncIterator[bytes]:
        try:
            async for piece in resp.content.iter_any():
                yield piece
        finally:
            resp.release()

    return StreamingResponse(pieces(), status_code=resp.status, media_type="text/event-stream")


def main() -> None:
    global UPSTREAM
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True)
    a = ap.parse_args()
    UPSTREAM = a.upstream.rstrip("/")
    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])], lifespan=lifespan)
    uvicorn.run(app, host="127.0.0.1", port=a.port, loop="uvloop", http="httptools", log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
