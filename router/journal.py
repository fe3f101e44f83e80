"""Reading the journal with journalctl: one invocation's tail (a failed load), a unit's log (GET /logs)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import structlog

log = structlog.get_logger("router.journal")


def journal_command(invocation_id: str, lines: int, pid: int = 0, since_us: int = 0) -> list[str]:
    """journalctl arguments for the unit's own output and the manager's lines about this invocation.

    A process that prints and exits within milliseconds may be gone before journald reads its
    cgroup, so its lines lack _SYSTEMD_INVOCATION_ID: they are matched by its PID since its start.
    """
    cmd = ["journalctl", "--no-pager", "-o", "json", "-n", str(lines)]
    if pid and since_us:
        cmd.append(f"--since=@{since_us // 1_000_000}")
    cmd += [f"_SYSTEMD_INVOCATION_ID={invocation_id}", "+", f"INVOCATION_ID={invocation_id}", "+",
            f"USER_INVOCATION_ID={invocation_id}"]
    if pid and since_us:
        cmd += ["+", f"_PID={pid}"]
    return cmd


def format_entries(output: str) -> list[str]:
    """One readable line per journal entry (journalctl -o json output)."""
    lines = []
    for raw in output.splitlines():
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        message = entry.get("MESSAGE", "")
        if isinstance(message, list):  # journald stores non-UTF-8 messages as byte arrays
            message = bytes(message).decode("utf-8", "replace")
        ident = entry.get("SYSLOG_IDENTIFIER") or entry.get("_COMM") or ""
        lines.append(f"{ident}: {message}" if ident else str(message))
    return lines


# What systemd itself says about a unit (its lines lead nothing: the engine's own say why)
_MANAGER_IDENTS = ("systemd", "systemd-coredump")
_MANAGER_LINE = re.compile(
    r"(?:^|: )(?:Main process exited|Failed with result|Control process exited|Consumed |Deactivated successfully"
    r"|Scheduled restart job|Start request repeated|Unit entered failed state|Killing process|Succeeded\.)"
    r"|^(?:Started|Starting|Stopping|Stopped|Failed to start|Reloading|Reloaded) ")
# What an engine says when it fails, and what it says as it exits (which says less than the line before)
_PROBLEM = re.compile(r"error|fail|fatal|cannot|can't|could not|couldn't|unable|not found|no such|denied|refused"
                      r"|invalid|exception|out of memory|oom|traceback|abort|panic|missing", re.I)
_PROGRAM = re.compile(r"([a-z][a-z0-9_.-]*): ")  # a program's name before its message (not `ValueError: `)
_LEVELS = {"error", "warning", "warn", "fatal", "critical", "info", "debug", "panic", "note", "notice"}
_EXITING = re.compile(r"exiting|giving up|shutting down|cleaning up|terminat|see root cause|exit code", re.I)


def split_line(line: str) -> tuple[str, str]:
    """A formatted journal line (`ident: message`, as `format_entries` makes them) as (ident, message)."""
    ident, sep, message = line.partition(": ")
    if not sep or " " in ident or not ident:
        return "", line
    return ident, message


def is_manager_line(line: str) -> bool:
    """systemd's own line about the unit ("Failed with result …", "Main process exited …", "Started …")."""
    ident, message = split_line(line)
    return ident in _MANAGER_IDENTS or bool(_MANAGER_LINE.search(message))


def engine_lead(lines: Sequence[str]) -> str | None:
    """The engine's own last meaningful line in a journal tail: its last line that names a problem (and
    is not only "exiting…"), else its last line; without the journal's `ident: ` prefix. None if the
    tail has only systemd's lines."""
    own = [split_line(line)[1].strip() for line in lines if not is_manager_line(line)]
    own = [text for text in own if text]
    if not own:
        return None
    problems = [text for text in own if _PROBLEM.search(text)]
    telling = [text for text in problems if not _EXITING.search(text)]
    lead = (telling or problems or own)[-1]
    m = _PROGRAM.match(lead)  # "llama_server: model file not found: …" says "model file not found: …"
    return lead[m.end():] if m is not None and m.group(1) not in _LEVELS and lead[m.end():] else lead


def fenced(lines: Sequence[str]) -> str:
    """Lines as a Markdown fenced code block (the fence longer than any backtick run in them)."""
    longest = max((len(run) for line in lines for run in re.findall(r"`+", line)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n" + "\n".join(lines) + f"\n{fence}"


async def _run(cmd: list[str], timeout: float) -> str:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return ""
    return out.decode("utf-8", "replace")


async def tail(invocation_id: str, lines: int = 15, timeout: float = 5.0, pid: int = 0,
               since_us: int = 0) -> list[str]:
    """The last `lines` journal lines of one invocation; [] when the journal cannot be read."""
    if not invocation_id:
        return []
    try:
        if os.geteuid() == 0:  # make journald write out what it has queued (needs privileges)
            await _run(["journalctl", "--sync"], timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0
        while True:
            entries = format_entries(await _run(journal_command(invocation_id, lines, pid, since_us), timeout))
            if entries or loop.time() > deadline:
                return entries
            await asyncio.sleep(0.1)  # unprivileged: journald writes out on its own, soon
    except OSError:  # no journalctl on this host
        return []


# --- a unit's whole journal, for GET /logs/{model} -----------------------------------------------

MAX_LINES = 10_000  # the most lines /logs returns or replays


def unit_command(unit: str, user_bus: bool, lines: int, follow: bool = False) -> list[str]:
    """journalctl arguments for the last `lines` entries of a unit (system or user manager), as JSON."""
    cmd = ["journalctl", "--no-pager", "-o", "json", "-n", str(lines)]
    if follow:
        cmd.append("--follow")
    cmd.append(f"--user-unit={unit}" if user_bus else f"--unit={unit}")
    return cmd


def log_line(raw: str) -> str | None:
    """One journalctl -o json entry as `2026-11-29T18:33:34.123Z ident[pid]: message`; None if unreadable."""
    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(entry, dict):
        return None
    message = entry.get("MESSAGE", "")
    if isinstance(message, list):  # journald stores non-UTF-8 messages as byte arrays
        message = bytes(message).decode("utf-8", "replace")
    ident = entry.get("SYSLOG_IDENTIFIER") or entry.get("_COMM") or ""
    pid = entry.get("_PID")
    prefix = f"{ident}[{pid}]: " if ident and pid else f"{ident}: " if ident else ""
    stamp = ""
    try:
        us = int(entry["__REALTIME_TIMESTAMP"])
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(us // 1_000_000)) + f".{us // 1000 % 1000:03d}Z "
    except (KeyError, ValueError, TypeError):
        pass
    return f"{stamp}{prefix}{message}"


class JournalUnavailable(Exception):
    """journalctl is missing or refused to read the journal; the message says why."""


async def unit_tail(unit: str, user_bus: bool, lines: int, timeout: float = 10.0) -> list[str]:
    """The unit's last `lines` journal lines; JournalUnavailable if the journal cannot be read."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *unit_command(unit, user_bus, lines), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            limit=2**22)
    except OSError as e:
        raise JournalUnavailable(f"cannot run journalctl: {e}") from e
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise JournalUnavailable(f"journalctl took longer than {timeout:g}s") from None
    if proc.returncode != 0 and not out:
        raise JournalUnavailable(f"journalctl failed (exit {proc.returncode}): "
                                 f"{err.decode('utf-8', 'replace').strip()[:500]}")
    return [line for raw in out.decode("utf-8", "replace").splitlines() if (line := log_line(raw)) is not None]


async def unit_follow(unit: str, user_bus: bool, lines: int, stop: asyncio.Event | None = None,
                      ) -> AsyncIterator[str]:
    """The unit's last `lines` journal lines, then each new one as it comes (journalctl --follow).

    journalctl runs while the caller iterates: it is killed when the iteration ends, whatever the
    reason (the client left, `stop` was set, the caller was cancelled). Ends with JournalUnavailable
    if journalctl cannot run or exits.
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            *unit_command(unit, user_bus, lines, follow=True), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, limit=2**22)
    except OSError as e:
        raise JournalUnavailable(f"cannot run journalctl: {e}") from e
    assert proc.stdout is not None and proc.stderr is not None
    stopping = asyncio.create_task(stop.wait()) if stop is not None else None
    try:
        while True:
            reading = asyncio.ensure_future(proc.stdout.readline())
            waits: set[asyncio.Future[Any]] = {reading} | ({stopping} if stopping else set())
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if not reading.done():
                reading.cancel()
                return
            raw = reading.result()
            if not raw:
                err = (await proc.stderr.read()).decode("utf-8", "replace").strip()
                code = await proc.wait()
                raise JournalUnavailable(f"journalctl ended (exit {code})" + (f": {err[:500]}" if err else ""))
            line = log_line(raw.decode("utf-8", "replace"))
            if line is not None:
                yield line
    finally:
        if stopping is not None:
            stopping.cancel()
        if proc.returncode is None:
            proc.kill()
            try:
                await asyncio.wait_for(proc.wait(), 5.0)
            except asyncio.TimeoutError:
                log.warning("journalctl_not_reaped", unit=unit, pid=proc.pid)
