"""The daemon's local control socket: `llm-router reload` asks the running daemon to reload and gets its answer.

`systemctl reload llm-router` runs `llm-router reload` (ExecReload=): the daemon itself validates and
applies the files and answers with the outcome, so a rejected reload fails `systemctl reload` with the
daemon's own problems, and /status shows the same rejection. No HTTP: the request must reach the running
daemon even when the edited config.yml changes its port or api_key.

The socket is in the abstract namespace (nothing on disk; `ProtectSystem=strict` allows it), named after
the daemon's config directory, so that the CLI finds it from `--config-dir` alone. Both ends check who
is on the other side (SO_PEERCRED): the daemon answers only root and its own user; the CLI talks only to
the expected process (`--pid`, systemd's $MAINPID) or, without one, to root or its own user.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("router.control")

MAX_LINE = 64 * 1024
REQUEST_TIMEOUT = 5.0  # seconds a client may take to send its request


def address(config_dir: Path) -> bytes:
    """The abstract socket name of the daemon serving `config_dir`."""
    digest = hashlib.sha256(os.path.realpath(config_dir).encode()).hexdigest()[:32]
    return b"\0llm-router/" + digest.encode()


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected AF_UNIX socket."""
    fmt = "3i"
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(fmt))
    pid, uid, gid = struct.unpack(fmt, data)
    return pid, uid, gid


Handler = Callable[[str], Awaitable[dict[str, Any]]]


class ControlServer:
    """Listens on the abstract socket; each connection sends one JSON line and gets one JSON line back."""

    def __init__(self, config_dir: Path, handle: Handler) -> None:
        self.name = address(config_dir)
        self.handle = handle
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> bool:
        """Listen; False (logged) when the name is taken, e.g. by another daemon with the same config dir."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self.name)
            sock.listen(16)
        except OSError as e:
            sock.close()
            log.warning("control_socket_unavailable", error=str(e),
                        hint="`llm-router reload` falls back to SIGHUP; is another router running "
                             "with the same config directory?")
            return False
        self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_LINE)
        return True

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            pid, uid, _ = peer_credentials(writer.get_extra_info("socket"))
            if uid not in (0, os.getuid()):
                log.warning("control_refused", peer_pid=pid, peer_uid=uid)
                answer: dict[str, Any] = {"ok": False, "error": "only root and the router's own user may ask"}
            else:
                line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT)
                try:
                    command = json.loads(line).get("command")
                except (ValueError, AttributeError):
                    command = None
                if not isinstance(command, str):
                    answer = {"ok": False, "error": 'expected one JSON line: {"command": "reload"}'}
                else:
                    log.info("control_request", command=command, peer_pid=pid, peer_uid=uid)
                    answer = await self.handle(command)
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (OSError, asyncio.TimeoutError, ValueError) as e:
            log.warning("control_connection_failed", error=str(e) or type(e).__name__)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class NoDaemon(Exception):
    """Nothing listens on the control socket of that config directory."""


class Squatted(NoDaemon):
    """Another user's process holds the socket's name (the daemon could not listen): as good as none."""


class Untrusted(Exception):
    """Something of root's or this user's listens there, but not the expected process."""


def request(config_dir: Path, command: str, *, expect_pid: int | None = None, timeout: float = 60.0) -> Any:
    """Send one command to the daemon serving `config_dir` and return its JSON answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(address(config_dir))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise NoDaemon(f"no router serving {config_dir} answers on its control socket") from e
        pid, uid, _ = peer_credentials(sock)
        if uid not in (0, os.getuid()):
            raise Squatted(f"the control socket of {config_dir} is held by process {pid} of user {uid}, "
                           "not by the router")
        if expect_pid is not None and pid != expect_pid:
            raise Untrusted(f"the control socket of {config_dir} belongs to process {pid}, not to {expect_pid}")
        sock.sendall(json.dumps({"command": command}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n") and len(data) < MAX_LINE:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    try:
        return json.loads(data)
    except ValueError as e:
        raise Untrusted(f"the router serving {config_dir} gave no answer ({data[:200]!r})") from e
