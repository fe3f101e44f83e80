"""uvicorn's httptools protocol plus the limits uvicorn lacks: request-head size and time, a connection cap."""

from __future__ import annotations

import asyncio
import json
import resource
import time
from typing import Any, ClassVar, cast

import structlog
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from router.config import Limits

log = structlog.get_logger("router.http")

RESERVED_FDS = 256  # file descriptors kept for engines, D-Bus, journalctl and the log when clients hit the cap
WARN_EVERY = 10.0  # seconds between two "connections refused" warnings
LINGER = 2.0  # seconds a refused upload is still read (and dropped) so that the client gets the answer


def connection_cap(limits: Limits) -> int:
    """limits.max_connections, lowered to stay RESERVED_FDS below the open-file limit (warned once)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft - RESERVED_FDS >= limits.max_connections:
        return limits.max_connections
    cap = max(soft - RESERVED_FDS, 16)
    log.warning("max_connections_lowered", configured=limits.max_connections, cap=cap, open_file_limit=soft,
                hint="raise LimitNOFILE= in the unit (the shipped unit sets 65536) or lower limits.max_connections")
    return cap


def protocol_class(limits: Limits) -> type[LimitedHttpToolsProtocol]:
    """The protocol class to give uvicorn.Config(http=...) for these limits."""
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,),
                {"limits": limits, "max_connections": connection_cap(limits)})


def _response(status: int, reason: str, message: str, code: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


class _Transport:
    """The connection's transport as uvicorn sees it: close() may linger (see LimitedHttpToolsProtocol),
    and a lingering connection is closing: nothing more is written to it."""

    def __init__(self, transport: asyncio.Transport, protocol: LimitedHttpToolsProtocol) -> None:
        self.real = transport
        self._protocol = protocol
        self.write: Any = transport.write  # the hot path: no __getattr__ per call

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def is_closing(self) -> bool:
        return self._protocol.lingering or self.real.is_closing()

    def close(self) -> None:
        self._protocol.close_connection()

    def linger(self) -> None:
        """Half-close: the answer already written goes out, nothing more will."""
        self.write = _drop
        self.real.write_eof()


def _drop(data: bytes) -> None:
    pass


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """One client connection. On top of uvicorn's behaviour:

    - the request head (request line and headers) must arrive within limits.header_timeout seconds of
      the connection or of its first byte, and within limits.max_header_bytes: else 408 / 431 and close
      (slowloris, huge headers; the head is never buffered past the cap);
    - a request body that stops arriving for limits.header_timeout seconds closes the connection;
    - a connection that sits idle between requests is closed after limits.idle_connection (uvicorn's
      keep-alive timeout, set in daemon.serve);
    - past max_connections open connections, a new one gets 503 and is closed at once, so that file
      descriptors never run out (a warning is logged, at most every WARN_EVERY seconds);
    - a connection closed while the client still sends (a 413 or 431 answer) is half-closed and read
      for LINGER more seconds, its data dropped: closing at once would make the client's kernel
      discard the answer (TCP reset) before the client reads it.
    Every refusal answers OpenAI-style JSON, like the app.
    """

    limits: ClassVar[Limits] = Limits()
    max_connections: ClassVar[int] = Limits().max_connections
    _refused: ClassVar[int] = 0
    _last_warning: ClassVar[float] = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # reading a request head (or waiting for one): its bytes count against the cap
        self._head_bytes = 0
        self._head_started = False  # a byte of the current head has arrived
        self._heads_done = 0  # request heads parsed on this connection
        self._deadline: asyncio.TimerHandle | None = None
        self.lingering = False  # half-closed, reading and dropping until the LINGER timer closes it

    # --- connection ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_Transport(transport, self))  # type: ignore[arg-type]
        if len(self.connections) > self.max_connections:
            self._refuse_connection()
            return
        self._arm(self.limits.idle_connection)  # until the first byte of a request

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _refuse_connection(self) -> None:
        cls = type(self)
        cls._refused += 1
        now = time.monotonic()
        if now - cls._last_warning >= WARN_EVERY:
            log.warning("connections_refused", open=len(self.connections) - 1, cap=self.max_connections,
                        refused=cls._refused, hint="raise limits.max_connections (and LimitNOFILE=) if this "
                        "is real traffic; otherwise a client is opening connections without end")
            cls._last_warning = now
            cls._refused = 0
        self.connections.discard(self)
        self._refuse(_response(503, "Service Unavailable", "The router has too many open connections right now; "
                               "retry shortly.", "too_many_connections"))

    def _refuse(self, response: bytes) -> None:
        """Answer `response` (an error) and close, unless an answer is already on its way: then just close
        (writing now would corrupt it)."""
        self._disarm()
        if self.transport.is_closing():
            return
        if self.cycle is not None and self.cycle.response_started and not self.cycle.response_complete:
            self._real.close()
            return
        self.transport.write(response)
        self.transport.close()

    @property
    def _real(self) -> asyncio.Transport:
        return cast("_Transport", self.transport).real

    def close_connection(self) -> None:
        """Close, or linger first when the client may still be sending a request."""
        if self.lingering or self._real.is_closing():
            return
        self._disarm()
        sending = (self._in_head and self._head_started) or (
            not self._in_head and self.cycle is not None and self.cycle.more_body)
        if not sending or not self._real.can_write_eof():
            self._real.close()
            return
        self.lingering = True
        self.flow.resume_reading()
        cast("_Transport", self.transport).linger()
        self._deadline = self.loop.call_later(LINGER, self._real.close)

    # --- timers -------------------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if not self._in_head and self.flow.read_paused:  # the body waits for the app, not for the client
            self._arm(self.limits.header_timeout)
            return
        if self._in_head and self._head_started:
            self._refuse(_response(408, "Request Timeout", "The request head (request line and headers) did not "
                                   f"arrive within {self.limits.header_timeout:g}s.", "request_timeout"))
            return
        # a connection that never sent a byte, or a body that stopped arriving: close now (the app, if
        # it was reading the body, sees the client leave)
        self._real.close()

    # --- parsing ------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return
        if not self._in_head:
            if self.cycle is not None and not self.cycle.response_complete and self.cycle.more_body:
                self._arm(self.limits.header_timeout)  # body still coming: it may pause this long
            super().data_received(data)
            return
        room = self.limits.max_header_bytes - self._head_bytes
        if len(data) <= room:
            self._head_bytes += len(data)
            super().data_received(data)
            return
        heads_done = self._heads_done
        super().data_received(data[:room])  # the head may end within the cap...
        if self._heads_done == heads_done:  # ...it did not: refuse before buffering any more of it
            self._refuse(_response(431, "Request Header Fields Too Large", "The request line and headers are "
                                   f"larger than {self.limits.max_header_bytes} bytes (limits.max_header_bytes).",
                                   "headers_too_large"))
            return
        if self.parser is not None and not self.transport.is_closing():
            self.data_received(data[room:])

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0
        self._head_started = True
        self._arm(self.limits.header_timeout)  # from the request's first byte

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._heads_done += 1
        self._disarm()
        super().on_headers_complete()
        if self.cycle is not None and self.cycle.more_body:
            self._arm(self.limits.header_timeout)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()
        self._in_head = True  # what follows is the next request's head
        self._head_bytes = 0
        self._head_started = False

    def _unsupported_upgrade_warning(self) -> None:
        pass  # the router serves no WebSocket: such a request is answered as plain HTTP (404), no log noise

    def send_400_response(self, msg: str) -> None:
        self._refuse(_response(400, "Bad Request", f"{msg} The router speaks HTTP/1.1.", "invalid_http"))
