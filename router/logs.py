"""Logging setup (structlog): journal entries with fields under systemd, readable lines on a terminal, JSON otherwise.

Under systemd (stdout or stderr is the journal: $JOURNAL_STREAM names it) each record goes to
journald over its native socket protocol with fields — MESSAGE (a readable line), PRIORITY,
SYSLOG_IDENTIFIER=llm-router, ROUTER_EVENT, and MODEL, UNIT, REQUEST_ID, SWITCH_ID taken from the
record's `model` (else `target`), `unit`, `request_id` and `switch_id` — so that
`journalctl -u llm-router MODEL=qwen` filters. A record journald cannot take (too large, journald
away) is written to stderr instead. On a terminal: readable lines; piped to a file: one JSON object
per line (tests and log shippers parse those).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, Literal, TextIO

import structlog

JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "llm-router"
PRIORITIES = {"debug": 7, "info": 6, "notice": 5, "warning": 4, "warn": 4, "error": 3, "exception": 3,
              "critical": 2, "fatal": 2}
# journal field <- the record keys it is taken from, first present wins
JOURNAL_FIELDS = {"MODEL": ("model", "target"), "UNIT": ("unit",), "REQUEST_ID": ("request_id",),
                  "SWITCH_ID": ("switch_id",)}
Output = Literal["auto", "journal", "console", "json"]


def journal_stream_is(*streams: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """True if one of `streams` is the journal stream systemd connected ($JOURNAL_STREAM = dev:inode)."""
    value = environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
    except ValueError:
        return False
    for stream in streams:
        try:
            st = os.fstat(stream.fileno())
        except (OSError, ValueError, AttributeError):
            continue
        if (st.st_dev, st.st_ino) == (dev, ino):
            return True
    return False


def _value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False) if (not value or any(c in value for c in ' ="\n')) else value
    if isinstance(value, float):
        return f"{value:.6g}"
    if value is None or isinstance(value, bool | int):
        return json.dumps(value)
    return json.dumps(value, ensure_ascii=False, default=str)


def readable(event_dict: Mapping[str, Any]) -> str:
    """`event key=value …` (then a traceback, if any), without time and level (journald has them)."""
    rest = {k: v for k, v in event_dict.items() if k not in ("event", "level", "timestamp", "exception")}
    line = " ".join([str(event_dict.get("event", "")), *(f"{k}={_value(v)}" for k, v in rest.items())])
    exception = event_dict.get("exception")
    return f"{line}\n{exception}" if exception else line


def journal_fields(event_dict: Mapping[str, Any]) -> dict[str, str]:
    """The journal fields of one log record."""
    fields = {"MESSAGE": readable(event_dict),
              "PRIORITY": str(PRIORITIES.get(str(event_dict.get("level", "info")), 6)),
              "SYSLOG_IDENTIFIER": IDENTIFIER, "ROUTER_EVENT": str(event_dict.get("event", ""))}
    for field, keys in JOURNAL_FIELDS.items():
        for key in keys:
            value = event_dict.get(key)
            if value is not None and value != "":
                fields[field] = str(value)
                break
    return fields


def encode_journal(fields: Mapping[str, str]) -> bytes:
    """journald's native protocol: `KEY=value\\n`, or `KEY\\n<u64 LE length>value\\n` for values with newlines."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalLogger:
    """A structlog logger that sends each record as one datagram to journald's socket."""

    def __init__(self, path: str = JOURNAL_SOCKET, fallback: TextIO | None = None) -> None:
        self.path = path
        self.fallback = fallback
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 * 2**20)

    def msg(self, datagram: bytes, line: str) -> None:
        try:
            self._sock.sendto(datagram, self.path)
        except OSError:  # too large for a datagram, or journald is away: the line still goes somewhere
            stream = self.fallback or sys.stderr
            stream.write(line + "\n")
            stream.flush()

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


class JournalLoggerFactory:
    def __init__(self, path: str = JOURNAL_SOCKET, fallback: TextIO | None = None) -> None:
        self._logger = JournalLogger(path, fallback)

    def __call__(self, *args: Any) -> JournalLogger:
        return self._logger


def _to_journal(logger: Any, method: str,
                event_dict: MutableMapping[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (encode_journal(journal_fields(event_dict)), readable(event_dict)), {}


def setup(level: str = "info", output: Output = "auto", journal_socket: str = JOURNAL_SOCKET,
          stream: TextIO | None = None) -> Output:
    """Configure structlog for the daemon; returns the output chosen (auto: journal, console or json)."""
    stream = stream or sys.stdout
    if output == "auto":
        if journal_stream_is(stream, sys.stderr) and os.path.exists(journal_socket):
            output = "journal"
        else:
            output = "console" if stream.isatty() else "json"
    processors: list[structlog.types.Processor] = [structlog.contextvars.merge_contextvars,
                                                   structlog.processors.add_log_level]
    factory: Any
    if output == "journal":
        processors += [structlog.processors.format_exc_info, _to_journal]
        factory = JournalLoggerFactory(journal_socket, stream)
    else:
        processors += [structlog.processors.TimeStamper(fmt="iso", utc=True)]
        if output == "console":
            processors.append(structlog.dev.ConsoleRenderer(colors=False))
        else:
            processors += [structlog.processors.format_exc_info,
                           structlog.processors.JSONRenderer(ensure_ascii=False)]
        factory = structlog.PrintLoggerFactory(stream)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    return output
