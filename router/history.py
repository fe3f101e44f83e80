"""Per-model history kept across restarts: requests, tokens, typical tok/s and TTFT, load times (SQLite).

The database lives in the router's state directory (`StateDirectory=llm-router` in the unit, i.e.
$STATE_DIRECTORY; elsewhere $XDG_STATE_HOME/llm-router or ~/.local/state/llm-router). `observe` is an
EventBus observer: it updates the in-memory figures at once (a few dict updates) and queues the row;
one writer thread writes queued rows in batches, so neither the event loop nor a request ever waits
for the disk. Reads (`summary`, `typical_load_seconds`) are answered from memory.
"""

from __future__ import annotations

import os
import queue
import sqlite3
import statistics
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from router.events import Event, RequestEnded, SwitchEnded

log = structlog.get_logger("router.history")

SAMPLES_KEPT = 100  # per model and kind: "typical" is the median of the last SAMPLES_KEPT
KINDS = ("tok_per_s", "ttft", "load")
FILENAME = "history.sqlite3"
SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    model TEXT PRIMARY KEY,
    requests INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    loads INTEGER NOT NULL DEFAULT 0,
    load_failures INTEGER NOT NULL DEFAULT 0,
    last_used REAL
);
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY,
    model TEXT NOT NULL,
    kind TEXT NOT NULL,
    value REAL NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_by_model ON samples (model, kind, id);
"""
COUNTERS = ("requests", "failed", "prompt_tokens", "completion_tokens", "loads", "load_failures")


def state_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """Where the router keeps state: systemd's StateDirectory=, else the XDG state directory."""
    if environ.get("STATE_DIRECTORY"):
        return Path(environ["STATE_DIRECTORY"].split(":")[0])
    xdg = environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path(environ.get("HOME") or Path.home()) / ".local" / "state"
    return base / "llm-router"


@dataclass
class ModelHistory:
    """What one model has done, over every run of the router."""

    requests: int = 0
    failed: int = 0  # requests whose outcome was not ok
    prompt_tokens: int = 0
    completion_tokens: int = 0
    loads: int = 0
    load_failures: int = 0
    last_used: float | None = None  # unix time of the last request
    samples: dict[str, deque[float]] = field(
        default_factory=lambda: {k: deque(maxlen=SAMPLES_KEPT) for k in KINDS})

    def typical(self, kind: str) -> float | None:
        values = self.samples[kind]
        return statistics.median(values) if values else None

    def as_dict(self) -> dict[str, Any]:
        def rounded(kind: str, digits: int) -> float | None:
            value = self.typical(kind)
            return None if value is None else round(value, digits)

        return {"requests": self.requests, "failed": self.failed, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "loads": self.loads,
                "load_failures": self.load_failures, "last_used": self.last_used,
                "tok_per_s": rounded("tok_per_s", 1), "ttft": rounded("ttft", 3),
                "load_seconds": rounded("load", 1)}


@dataclass(frozen=True)
class _Row:
    """One change for the writer: counters to add and samples to append for one model."""

    model: str
    at: float
    counts: dict[str, int]
    samples: tuple[tuple[str, float], ...]


_STOP = object()


class History:
    """The per-model history: in memory for reads, in SQLite for the next start."""

    def __init__(self, path: Path, batch_wait: float = 0.5, clock: Any = time.time) -> None:
        """Open (or create) the database and read it; raises sqlite3.Error/OSError if it cannot."""
        self.path = path
        self.batch_wait = batch_wait
        self._clock = clock
        self.models: dict[str, ModelHistory] = {}
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._write_error: str | None = None
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.is_symlink():
            raise OSError(f"{path} is a symbolic link; the router writes its history only to a regular file")
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._load()
        except BaseException:
            self._db.close()
            raise
        self._writer = threading.Thread(target=self._write_loop, name="history-writer", daemon=True)
        self._writer.start()

    @classmethod
    def open(cls, path: Path | None = None) -> History | None:
        """The history in `path` (default: the state directory); None, after saying why, if it cannot be."""
        path = path or state_dir() / FILENAME
        try:
            history = cls(path)
        except (sqlite3.Error, OSError) as e:
            log.error("history_unavailable", path=str(path), error=str(e),
                      hint="per-model history is not kept this run; check the state directory "
                           "(StateDirectory=llm-router in the unit) or move the file aside")
            return None
        log.info("history_opened", path=str(path), models=len(history.models))
        return history

    def _load(self) -> None:
        for row in self._db.execute(f"SELECT model, {', '.join(COUNTERS)}, last_used FROM models"):
            self.models[row[0]] = ModelHistory(*row[1:])
        rows = self._db.execute(
            "SELECT model, kind, value FROM (SELECT model, kind, value, id, ROW_NUMBER() OVER "
            "(PARTITION BY model, kind ORDER BY id DESC) AS n FROM samples) WHERE n <= ? ORDER BY id",
            (SAMPLES_KEPT,))
        for model, kind, value in rows:
            if kind in KINDS:
                m = self.models.setdefault(model, ModelHistory())
                m.samples[kind].append(value)

    # --- the observer (on the event loop) ------------------------------------------------------

    def observe(self, event: Event) -> None:
        if isinstance(event, RequestEnded):
            counts = {"requests": 1, "failed": 0 if event.outcome == "ok" else 1,
                      "prompt_tokens": event.prompt_tokens or 0, "completion_tokens": event.completion_tokens or 0}
            samples: list[tuple[str, float]] = []
            if event.outcome == "ok" and event.tok_per_s is not None:
                samples.append(("tok_per_s", event.tok_per_s))
            if event.ttft is not None and event.outcome == "ok":
                samples.append(("ttft", event.ttft))
            self._record(_Row(event.model, self._clock(), counts, tuple(samples)), last_used=True)
        elif isinstance(event, SwitchEnded) and event.target is not None and event.outcome != "aborted":
            ok = event.outcome == "ok"
            if ok and event.load_seconds is None:
                return  # nothing was started (an adopted or already running model)
            load = (("load", event.load_seconds),) if ok and event.load_seconds is not None else ()
            self._record(_Row(event.target, self._clock(), {"loads" if ok else "load_failures": 1}, load))

    def _record(self, row: _Row, last_used: bool = False) -> None:
        m = self.models.get(row.model)
        if m is None:
            m = self.models[row.model] = ModelHistory()
        for key, n in row.counts.items():
            setattr(m, key, getattr(m, key) + n)
        for kind, value in row.samples:
            m.samples[kind].append(value)
        if last_used:
            m.last_used = row.at
        self._queue.put(row)

    # --- reads ---------------------------------------------------------------------------------

    def typical_load_seconds(self, model: str) -> float | None:
        """The median of `model`'s recent load times (unit start to healthy); None if it never loaded."""
        m = self.models.get(model)
        return None if m is None else m.typical("load")

    def summary(self) -> dict[str, dict[str, Any]]:
        return {model: m.as_dict() for model, m in self.models.items()}

    # --- the writer thread ---------------------------------------------------------------------

    def _write_loop(self) -> None:
        stop = False
        while not stop:
            batch = [self._queue.get()]
            deadline = time.monotonic() + self.batch_wait
            while batch[-1] is not _STOP and len(batch) < 1000:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    batch.append(self._queue.get(timeout=remaining))
                except queue.Empty:
                    break
            stop = batch[-1] is _STOP
            rows = [r for r in batch if isinstance(r, _Row)]
            if rows:
                self._write(rows)
            for marker in batch:
                if isinstance(marker, _Flushed):
                    marker.done.set()
        self._db.close()

    def _write(self, rows: list[_Row]) -> None:
        totals: dict[str, dict[str, Any]] = {}
        samples: list[tuple[str, str, float, float]] = []
        for r in rows:
            t = totals.setdefault(r.model, dict.fromkeys(COUNTERS, 0) | {"last_used": None})
            for key, n in r.counts.items():
                t[key] += n
            if "requests" in r.counts:
                t["last_used"] = r.at
            samples += [(r.model, kind, value, r.at) for kind, value in r.samples]
        columns = ", ".join(COUNTERS)
        updates = ", ".join(f"{c} = {c} + excluded.{c}" for c in COUNTERS)
        try:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany(
                    f"INSERT INTO models (model, {columns}, last_used) VALUES (?, {', '.join('?' * len(COUNTERS))}, ?) "
                    f"ON CONFLICT (model) DO UPDATE SET {updates}, "
                    "last_used = COALESCE(excluded.last_used, last_used)",
                    [(model, *(t[c] for c in COUNTERS), t["last_used"]) for model, t in totals.items()])
                self._db.executemany("INSERT INTO samples (model, kind, value, at) VALUES (?, ?, ?, ?)", samples)
                for model, kind in {(s[0], s[1]) for s in samples}:
                    self._db.execute(
                        "DELETE FROM samples WHERE model = ? AND kind = ? AND id <= (SELECT id FROM samples "
                        "WHERE model = ? AND kind = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                        (model, kind, model, kind, SAMPLES_KEPT))
        except sqlite3.Error as e:
            if str(e) != self._write_error:  # say each distinct problem once, not once per batch
                log.error("history_write_failed", path=str(self.path), error=str(e), rows=len(rows),
                          hint="these figures are kept in memory only; check the disk and the state directory")
            self._write_error = str(e)
        else:
            self._write_error = None

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued row is written (tests, shutdown); False if it took too long."""
        done = threading.Event()
        self._queue.put(_Flushed(done))
        return done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued and close the database (bounded: a stuck disk does not block shutdown)."""
        if self._writer.is_alive():
            self._queue.put(_STOP)
            self._writer.join(timeout)


@dataclass(frozen=True)
class _Flushed:
    """A marker: the writer sets `done` once it has written every row queued before it."""

    done: threading.Event
