"""Upstream client: the daemon's one HTTP client (aiohttp, C parser) to every engine, with its timeouts.

aiohttp parses the engine's HTTP in C and hands over whatever bytes have arrived in one read, so a
relayed stream costs one pass through Python per socket read, not one per HTTP chunk. The three
timeouts of `timeouts:` in config.yml are enforced here: `connect` (TCP connect), `first_byte`
(request sent -> response headers) and `idle` (no byte while the body arrives). A timeout raises
`UpstreamTimeout`; any other failure `UpstreamError`. Both leave the connection closed.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import Literal

import aiohttp
from yarl import URL

from router.config import Timeouts

# Engines behind uvicorn close idle keep-alive connections after 5 s: reuse ours for less than that,
# so a request never races the engine's close.
KEEPALIVE = 4.0

Probe = Callable[[str, float], Awaitable[bool]]

TimeoutKind = Literal["connect", "first_byte", "idle"]


class UpstreamError(Exception):
    """The engine could not be reached, or broke off its answer."""


class UpstreamTimeout(UpstreamError):
    """One of the upstream timeouts fired (`kind`: connect, first_byte or idle, after `seconds`)."""

    def __init__(self, kind: TimeoutKind, seconds: float) -> None:
        self.kind = kind
        self.seconds = seconds
        super().__init__(describe_timeout(kind, seconds))


def describe_timeout(kind: TimeoutKind, seconds: float) -> str:
    what = {"connect": "could not connect", "first_byte": "sent no response headers",
            "idle": "sent nothing more"}[kind]
    return f"{what} within {seconds:g}s (timeouts.{kind} in config.yml)"


@functools.lru_cache(maxsize=16)
def _request_timeout(connect: float, first_byte: float) -> aiohttp.ClientTimeout:
    # sock_read starts once the request is written (aiohttp's start_timeout), and counts until the
    # headers are in; the relay then switches it to `idle` for the body.
    return aiohttp.ClientTimeout(total=None, sock_connect=connect or None, sock_read=first_byte or None)


class UpstreamResponse:
    """An engine's answer whose headers are in: iterate it for the body as it arrives (bytes, any cut)."""

    __slots__ = ("_content", "_idle", "_resp", "headers", "status")

    def __init__(self, resp: aiohttp.ClientResponse, idle: float) -> None:
        self._resp = resp
        self._content = resp.content
        self._idle = idle
        self.status = resp.status
        self.headers: Mapping[str, str] = resp.headers

    def __aiter__(self) -> UpstreamResponse:
        return self

    async def __anext__(self) -> bytes:
        try:
            piece = await self._content.readany()
        except asyncio.TimeoutError:
            self.close()
            raise UpstreamTimeout("idle", self._idle) from None
        except (aiohttp.ClientError, OSError) as e:
            self.close()
            raise UpstreamError(_reason(e)) from e
        if not piece:
            raise StopAsyncIteration
        return piece

    async def read(self) -> bytes:
        """The whole body (under the idle timeout between reads)."""
        pieces = [piece async for piece in self]
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def release(self) -> None:
        """Done with it: the connection goes back to the pool if the body was read to its end, else closes."""
        self._resp.release()

    def close(self) -> None:
        """Drop the connection (the engine sees the client go and stops computing)."""
        self._resp.close()


class Upstream:
    """One pooled aiohttp session for every engine, opened on first use inside the running loop."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, URL] = {}  # parsed once: a handful of engine endpoints, each used again and again

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE, ttl_dns_cache=None),
                timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(), skip_auto_headers=("User-Agent",))
        return self._session

    async def post(self, url: str, body: bytes, headers: Mapping[str, str], timeouts: Timeouts) -> UpstreamResponse:
        """Send one request; return once the engine's response headers are in."""
        return await self.request("POST", url, body, headers, timeouts)

    async def request(self, method: str, url: str, body: bytes, headers: Mapping[str, str],
                      timeouts: Timeouts) -> UpstreamResponse:
        """Send one request with any method (an empty body is sent as none); return once the headers are in."""
        parsed = self._urls.get(url)
        if parsed is None:
            if len(self._urls) > 256:
                self._urls.clear()
            parsed = self._urls[url] = URL(url, encoded=True)  # the path and query as the client sent them
        try:
            resp = await self.session.request(method, parsed, data=body or None, headers=headers,
                                              timeout=_request_timeout(timeouts.connect, timeouts.first_byte))
        except aiohttp.ConnectionTimeoutError:
            raise UpstreamTimeout("connect", timeouts.connect) from None
        except asyncio.TimeoutError:
            raise UpstreamTimeout("first_byte", timeouts.first_byte) from None
        except (aiohttp.ClientError, OSError) as e:
            raise UpstreamError(_reason(e)) from e
        connection = resp.connection
        if connection is not None and connection.protocol is not None:
            connection.protocol.read_timeout = timeouts.idle or None
            connection.protocol.start_timeout()
        return UpstreamResponse(resp, timeouts.idle)

    async def probe(self, url: str, timeout: float) -> bool:
        """GET url: True if it answered 200 within `timeout` seconds (a health check)."""
        try:
            async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                await resp.read()
                return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _reason(e: BaseException) -> str:
    """aiohttp's errors, in words (some have an empty str())."""
    text = str(e)
    return text if text else type(e).__name__
