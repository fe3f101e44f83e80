"""Per-model history: figures from events, kept in SQLite across restarts, written off the event loop."""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import pytest

from router.events import EventBus, RequestEnded, SwitchEnded
from router.history import FILENAME, SAMPLES_KEPT, History, state_dir

pytestmark = pytest.mark.timeout(30)


def ended(model: str = "qwen", outcome: str = "ok", **kw: object) -> RequestEnded:
    base: dict[str, object] = {"model": model, "endpoint": "/v1/chat/completions", "status": 200,
                               "outcome": outcome, "stream": True, "duration": 2.0, "waited": 0.0}
    return RequestEnded(**{**base, **kw})  # type: ignore[arg-type]


def test_figures_survive_a_restart(tmp_path: Path):
    path = tmp_path / "state" / FILENAME
    h = History(path, batch_wait=0.01)
    bus = EventBus()
    bus.subscribe(h.observe)
    bus.emit(SwitchEnded(1, None, "qwen", "ok", 46.0, load_seconds=44.0))
    bus.emit(SwitchEnded(2, "qwen", "mistral", "failed", 20.0, error="exit 1"))
    bus.emit(SwitchEnded(3, "mistral", "qwen", "ok", 42.0, load_seconds=40.0))
    bus.emit(SwitchEnded(4, "qwen", "mistral", "aborted", 2.0))  # neither a load nor a failure
    bus.emit(ended(ttft=0.2, prompt_tokens=10, completion_tokens=100, tok_per_s=50.0))
    bus.emit(ended(ttft=0.4, prompt_tokens=20, completion_tokens=50, tok_per_s=30.0))
    bus.emit(ended(ttft=9.0, prompt_tokens=20, completion_tokens=50, tok_per_s=3.0, outcome="upstream_error"))
    before = h.summary()
    assert before["qwen"] | {"last_used": None} == {
        "requests": 3, "failed": 1, "prompt_tokens": 50, "completion_tokens": 200, "loads": 2, "load_failures": 0,
        "last_used": None, "tok_per_s": 40.0, "ttft": 0.3, "load_seconds": 42.0}
    assert before["mistral"]["load_failures"] == 1 and before["mistral"]["loads"] == 0
    assert h.typical_load_seconds("qwen") == 42.0 and h.typical_load_seconds("mistral") is None
    h.close()

    again = History(path)
    assert again.summary() == before
    assert again.typical_load_seconds("qwen") == 42.0
    again.observe(ended(prompt_tokens=1, completion_tokens=1))
    again.close()
    assert History(path).summary()["qwen"]["requests"] == 4


def test_typical_is_the_median_of_the_last_samples(tmp_path: Path):
    path = tmp_path / FILENAME
    h = History(path, batch_wait=0.01)
    for i in range(SAMPLES_KEPT + 50):  # the first 50 (slow ones) fall out
        h.observe(SwitchEnded(i, None, "qwen", "ok", 1.0, load_seconds=1000.0 if i < 50 else 10.0 + i % 3))
    assert h.typical_load_seconds("qwen") == 11.0
    h.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM samples").fetchone()[0] == SAMPLES_KEPT  # pruned on disk too
    assert History(path).typical_load_seconds("qwen") == 11.0


def test_observe_never_touches_the_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    h = History(tmp_path / FILENAME, batch_wait=0.01)
    written = threading.Event()
    threads: set[str] = set()
    real_write = h._write

    def write(rows):  # type: ignore[no-untyped-def]
        threads.add(threading.current_thread().name)
        real_write(rows)
        written.set()

    monkeypatch.setattr(h, "_write", write)
    h.observe(ended())
    assert written.wait(5)
    assert threads == {"history-writer"}
    h.close()


def test_rows_are_written_in_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    h = History(tmp_path / FILENAME, batch_wait=0.3)
    batches: list[int] = []
    real_write = h._write

    def write(rows):  # type: ignore[no-untyped-def]
        batches.append(len(rows))
        real_write(rows)

    monkeypatch.setattr(h, "_write", write)
    for _ in range(200):
        h.observe(ended(completion_tokens=1))
    assert h.flush(5)
    assert sum(batches) == 200 and len(batches) <= 3, batches
    h.close()
    assert History(tmp_path / FILENAME).summary()["qwen"]["completion_tokens"] == 200


def test_a_broken_database_means_no_history_not_a_crash(tmp_path: Path):
    bad = tmp_path / FILENAME
    bad.write_bytes(b"this is not a database" * 100)
    assert History.open(bad) is None
    link = tmp_path / "link" / FILENAME
    link.parent.mkdir()
    link.symlink_to(tmp_path / "elsewhere.sqlite3")
    assert History.open(link) is None
    assert not (tmp_path / "elsewhere.sqlite3").exists()


def test_the_state_directory(tmp_path: Path):
    assert state_dir({"STATE_DIRECTORY": "/var/lib/llm-router:/var/lib/other"}) == Path("/var/lib/llm-router")
    assert state_dir({"XDG_STATE_HOME": "/home/u/.st", "HOME": "/home/u"}) == Path("/home/u/.st/llm-router")
    assert state_dir({"HOME": "/home/u"}) == Path("/home/u/.local/state/llm-router")
    h = History.open(tmp_path / "new" / "dir" / FILENAME)
    assert h is not None
    assert os.stat(tmp_path / "new" / "dir").st_mode & 0o777 == 0o700
    h.close()
