"""Observability on the systemd sandbox: /logs/{model} reads the real journal of the model's unit (tail and
follow), /metrics reports real unit states, and the router keeps its history across a restart."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from sandbox import PYTHON, REPO, RouterHandle, Sandbox, Units, chat_body, exec_line, one_backend, wait_until

pytestmark = pytest.mark.timeout(90)

Router = Callable[..., RouterHandle]


def test_logs_and_metrics_from_the_real_journal_and_units(units: Units, router: Router) -> None:
    rt, u = one_backend(units, router)
    with rt.client() as c:
        assert c.post("/v1/chat/completions", json=chat_body("m-a")).status_code == 200

        def logged() -> list[str] | None:
            r = c.get("/logs/m-a", params={"lines": 50})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["unit"] == u.name
            return body["lines"] if any("loading weights for m-a" in ln for ln in body["lines"]) else None

        lines = wait_until(logged, timeout=15, what="the fake's lines in /logs/m-a")
        assert any("fake_backend" in ln and "loading weights for m-a" in ln for ln in lines), lines
        with c.stream("GET", "/logs/m-b", params={"follow": 1, "lines": 20}) as r:  # same unit
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: ") and "loading weights for m-a" in json.loads(line[6:])["line"]:
                    break
        metrics = c.get("/metrics").text.splitlines()
    assert f'llm_router_unit_state{{state="active",unit="{u.name}"}} 1.0' in metrics
    assert "llm_router_gpu_available 0.0" in metrics


def test_open_event_streams_end_when_the_router_stops_and_history_stays(units: Units, router: Router) -> None:
    rt, _ = one_backend(units, router)
    with rt.client() as c:
        first = c.get("/history").json()
        assert first["available"] is True and first["path"].endswith("history.sqlite3")
    with httpx.Client(base_url=rt.url, timeout=20) as c, c.stream("GET", "/events") as r:
        lines = r.iter_lines()
        assert next(lines) == ": connected"
        assert rt.stop(timeout=20) == 0  # not killed after the shutdown grace: the stream did not hold it up
        list(lines)  # and it ended cleanly (a cut connection would raise)
    rt.start()
    with rt.client() as c:
        assert c.get("/history").json()["path"] == first["path"]  # the same file, from STATE_DIRECTORY


LOGGING_PROGRAM = """
import structlog
from router import logs
chosen = logs.setup("info")
log = structlog.get_logger("test")
log.info("switch_started", model="qwen-x", unit="llamacpp.service", switch_id=3, request_id="req-1")
log.info("other_model", model="mistral-x")
log.warning("output", chosen=chosen)
"""


def test_under_systemd_the_log_has_journal_fields(sandbox: Sandbox, units: Units, tmp_path: Path) -> None:
    """The router's own logging, run as a unit: stdout is the journal, so records carry MODEL= and friends."""
    program = tmp_path / "log_something.py"
    program.write_text(LOGGING_PROGRAM)
    name = units.write(units.name("log"), "[Service]\nType=oneshot\n"
                       f"WorkingDirectory={REPO}\nExecStart={exec_line([PYTHON, str(program)])}\n")
    sandbox.systemctl("start", name, timeout=60)
    entries = wait_until(lambda: sandbox.journal(f"_SYSTEMD_USER_UNIT={name}", "MODEL=qwen-x"), timeout=15,
                         what="a journal entry with MODEL=qwen-x")
    (entry,) = entries
    assert (entry["MESSAGE"], entry["UNIT"], entry["SWITCH_ID"], entry["REQUEST_ID"], entry["SYSLOG_IDENTIFIER"],
            entry["PRIORITY"]) == ("switch_started model=qwen-x unit=llamacpp.service switch_id=3 request_id=req-1",
                                   "llamacpp.service", "3", "req-1", "llm-router", "6")
    assert sandbox.journal_messages(f"_SYSTEMD_USER_UNIT={name}", "PRIORITY=4") == ["output chosen=journal"]
