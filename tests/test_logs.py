"""Router log output: journal entries with MODEL/UNIT/REQUEST_ID/SWITCH_ID fields under systemd (native
protocol, checked on a fake journald socket), readable lines on a terminal, JSON lines otherwise."""

from __future__ import annotations

import io
import json
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from router import logs

pytestmark = pytest.mark.timeout(30)


def decode_journal(datagram: bytes) -> dict[str, str]:
    """journald's side of the native protocol."""
    fields: dict[str, str] = {}
    i = 0
    while i < len(datagram):
        nl = datagram.index(b"\n", i)
        line = datagram[i:nl]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            fields[key.decode()] = value.decode()
            i = nl + 1
        else:
            (size,) = struct.unpack("<Q", datagram[nl + 1:nl + 9])
            fields[line.decode()] = datagram[nl + 9:nl + 9 + size].decode()
            assert datagram[nl + 9 + size:nl + 10 + size] == b"\n"
            i = nl + 10 + size
    return fields


@pytest.fixture
def journald(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "journal.socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()
    structlog.reset_defaults()


def test_records_go_to_the_journal_with_fields(journald: tuple[str, socket.socket]):
    path, sock = journald
    fallback = io.StringIO()
    assert logs.setup("info", output="journal", journal_socket=path, stream=fallback) == "journal"
    log = structlog.get_logger("test")
    with structlog.contextvars.bound_contextvars(request_id="req-42"):
        log.info("switch_started", model="qwen", unit="llamacpp.service", switch_id=7, took=1.5)
    fields = decode_journal(sock.recv(65536))
    assert fields == {"MESSAGE": "switch_started model=qwen unit=llamacpp.service switch_id=7 took=1.5 "
                                 "request_id=req-42",
                      "PRIORITY": "6", "SYSLOG_IDENTIFIER": "llm-router", "ROUTER_EVENT": "switch_started",
                      "MODEL": "qwen", "UNIT": "llamacpp.service", "REQUEST_ID": "req-42", "SWITCH_ID": "7"}
    log.debug("not shown")
    log.warning("load_failed", target="mistral", error="exit status 1\nsecond line")
    fields = decode_journal(sock.recv(65536))
    assert fields["PRIORITY"] == "4" and fields["MODEL"] == "mistral"  # a switch's target is its model
    assert fields["MESSAGE"] == 'load_failed target=mistral error="exit status 1\\nsecond line"'
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("observer_failed")
    fields = decode_journal(sock.recv(65536))
    assert fields["PRIORITY"] == "3"
    assert fields["MESSAGE"].startswith("observer_failed\nTraceback") and "ValueError: boom" in fields["MESSAGE"]
    assert fallback.getvalue() == ""


def test_a_record_journald_cannot_take_is_written_to_the_stream(tmp_path: Path):
    fallback = io.StringIO()
    logs.setup("info", output="journal", journal_socket=str(tmp_path / "nobody-listens"), stream=fallback)
    try:
        structlog.get_logger("test").info("listening", port=8002)
    finally:
        structlog.reset_defaults()
    assert fallback.getvalue() == "listening port=8002\n"


def test_journal_stream_detection(tmp_path: Path):
    with open(tmp_path / "out", "w") as f:
        st = os.fstat(f.fileno())
        assert logs.journal_stream_is(f, environ={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not logs.journal_stream_is(f, environ={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not logs.journal_stream_is(f, environ={})
        assert not logs.journal_stream_is(f, environ={"JOURNAL_STREAM": "garbage"})


def test_auto_picks_json_lines_for_a_file_and_readable_lines_for_a_terminal(tmp_path: Path):
    out = io.StringIO()
    try:
        assert logs.setup("info", stream=out) == "json"
        structlog.get_logger("test").info("listening", model="qwen")
        entry = json.loads(out.getvalue())
        assert (entry["event"], entry["model"], entry["level"]) == ("listening", "qwen", "info")

        class Tty(io.StringIO):
            def isatty(self) -> bool:
                return True

        tty = Tty()
        assert logs.setup("info", stream=tty) == "console"
        structlog.get_logger("test").info("listening", model="qwen")
        line = tty.getvalue()
        assert "listening" in line and "model=qwen" in line and not line.startswith("{")
    finally:
        structlog.reset_defaults()
