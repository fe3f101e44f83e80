#!/usr/bin/env python3
"""The engines' own switch time, without the router: stop one unit, start the other, poll its /health.

Runs inside the sandbox (it talks to the same systemd user manager over D-Bus, with the router's own
`Systemd` class, so both sides pay the same D-Bus costs) and polls /health every millisecond, so
what it prints is the floor any router's switch has: stop + start + the engine's start-up.

    python bench/engine_switch.py UNIT_A URL_A UNIT_B URL_B ROUNDS   -> one JSON line
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import sys
import time

from router.systemd import Systemd, bus_address


def healthy(url: str) -> bool:
    host, port = url.split("//", 1)[1].split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=0.5) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


async def switch(systemd: Systemd, stop: str | None, start: str, url: str) -> float:
    t0 = time.perf_counter()
    if stop is not None:
        await systemd.stop(stop, 30)
    await systemd.start(start, 30)
    while not healthy(url):
        await asyncio.sleep(0.001)
    return time.perf_counter() - t0


async def main(unit_a: str, url_a: str, unit_b: str, url_b: str, rounds: int) -> None:
    systemd = Systemd(bus_address("user"), lambda: set())
    await systemd.open()
    try:
        times = []
        await switch(systemd, None, unit_a, url_a)
        for i in range(rounds):
            if i % 2 == 0:
                times.append(await switch(systemd, unit_a, unit_b, url_b))
            else:
                times.append(await switch(systemd, unit_b, unit_a, url_a))
        for unit in (unit_a, unit_b):
            await systemd.stop(unit, 30)
    finally:
        await systemd.close()
    print(json.dumps({"switch_median_s": statistics.median(times), "switches": times}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])))
