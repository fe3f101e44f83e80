"""The benchmark runs (smoke mode): engines, router, minimal relay and load generator start, and it prints
every table. No timing is asserted here: the figures are bench/run.py's to print, not a test's to judge."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sandbox import sandbox_unavailable

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_bench_smoke_prints_every_table() -> None:
    reason = sandbox_unavailable()
    if reason is not None:
        pytest.skip(reason)
    out = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--smoke"], cwd=REPO, capture_output=True,
                         text=True, timeout=280, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    for heading in ("A. Engine at full speed", "B. Paced engine", "| direct |", "| relay |", "| router |",
                    "Switch: engines alone", "Router RSS:", "Router CPU per request:", "Machine:"):
        assert heading in out.stdout, out.stdout
    assert "Errors (failed requests, streams without all tokens or without [DONE]): 0" in out.stdout, out.stdout
