"""Journal tail of one unit invocation, read with journalctl (only used when something failed)."""

from __future__ import annotations

import asyncio
import json
import os


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
