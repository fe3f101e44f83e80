#!/usr/bin/env python3
"""D-Bus healing benchmark: how long after the bus daemon dies a waiting job fails and the client is
back (prints figures).

Runs a private systemd user manager (router/demo/systemd-sandbox.sh, root), starts a oneshot unit
whose start job runs for a minute, SIGKILLs the sandbox's dbus-daemon while router.systemd waits for
that job, and times (a) until the job's await raises SystemdUnreachable, (b) until on_reconnect
(new connection, Subscribe()d; the client's own connect attempt socket-activates a new daemon).
Not a test: it asserts nothing, it prints numbers.

    sudo .venv/bin/python tests/bench_reconnect.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from sandbox import Sandbox  # noqa: E402

from router.systemd import Systemd, SystemdUnreachable  # noqa: E402

UNIT = "bench-reconnect.service"


async def measure(sbx: Sandbox, rounds: int) -> tuple[list[float], list[float]]:
    failed, back = [], []
    sd = Systemd(sbx.outside_bus, set)
    reconnected = asyncio.Event()
    sd.on_reconnect = reconnected.set
    await sd.open()
    try:
        for _ in range(rounds):
            reconnected.clear()
            job = asyncio.create_task(sd.start(UNIT, 60))
            while sbx.active_state(UNIT) != "activating":
                if job.done():
                    job.result()  # the start failed: say why
                await asyncio.sleep(0.02)
            # dbus.service starts again on each kill: keep it below its start rate limit (5 per 10 s)
            sbx.systemctl("reset-failed", "dbus.service", check=False)
            t0 = time.monotonic()
            os.kill(sbx.bus_pid(), signal.SIGKILL)
            try:
                await job
            except SystemdUnreachable:
                failed.append(time.monotonic() - t0)
            await asyncio.wait_for(reconnected.wait(), 30)
            back.append(time.monotonic() - t0)
            await sd.stop(UNIT, 20)
    finally:
        await sd.close()
    return failed, back


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-reconnect-") as tmp:
        sbx = Sandbox(Path(tmp))
        sbx.start()
        try:
            sbx.write_unit(UNIT, "[Unit]\nStartLimitIntervalSec=0\n[Service]\nType=oneshot\nExecStart=/bin/sleep 60\n")
            sbx.daemon_reload()
            failed, back = asyncio.run(measure(sbx, args.rounds))
        finally:
            sbx.stop()
    for what, xs in (("job failed after", failed), ("reconnected after", back)):
        ms = [x * 1000 for x in xs]
        print(f"{what:18} median {statistics.median(ms):7.1f} ms   max {max(ms):7.1f} ms   ({len(ms)} rounds)")


if __name__ == "__main__":
    main()
