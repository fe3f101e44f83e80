#!/usr/bin/env python3
"""Observer benchmark: what one finished request costs the event loop in metrics, /events and history.

Emits RequestEnded events on an EventBus with the router's observers subscribed, in these setups:
metrics alone; + history (SQLite writer thread); + the /events hub with 0, 1 and 10 clients (one of
them never reading). Not a test: it asserts nothing, it prints µs per event (median and p99).

    .venv/bin/python tests/bench_observers.py [--events 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from router.events import EventBus, RequestEnded
from router.history import History
from router.hub import EventHub
from router.metrics import Metrics

EVENT = RequestEnded(model="qwen2.5-7b-instruct-q4", endpoint="/v1/chat/completions", status=200, outcome="ok",
                     stream=True, duration=12.4, waited=0.01, ttft=0.21, prompt_tokens=812, completion_tokens=512,
                     tok_per_s=41.2)


def measure(bus: EventBus, n: int) -> tuple[float, float]:
    took = []
    for _ in range(n):
        started = time.perf_counter()
        bus.emit(EVENT)
        took.append(time.perf_counter() - started)
    took.sort()
    return statistics.median(took) * 1e6, took[len(took) * 99 // 100] * 1e6


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--events", type=int, default=20000)
    n = p.parse_args().events
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        bus = EventBus()
        bus.subscribe(Metrics().observe)
        rows.append(("metrics", *measure(bus, n)))
        history = History(Path(tmp) / "history.sqlite3")
        bus.subscribe(history.observe)
        rows.append(("metrics + history", *measure(bus, n)))
        hub = EventHub(buffer=512)
        bus.subscribe(hub.observe)
        rows.append(("metrics + history + hub, no client", *measure(bus, n)))
        hub.subscribe()  # never reads
        rows.append(("... + 1 /events client (stuck)", *measure(bus, n)))
        for _ in range(9):
            hub.subscribe()
        rows.append(("... + 10 /events clients (stuck)", *measure(bus, n)))
        history.close()
    print(f"{'observers':40} {'median µs':>10} {'p99 µs':>10}   ({n} RequestEnded events each)")
    for name, median, p99 in rows:
        print(f"{name:40} {median:10.1f} {p99:10.1f}")


if __name__ == "__main__":
    asyncio.run(main())
