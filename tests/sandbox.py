"""Test helpers: drive a private systemd user manager (router/demo/systemd-sandbox.sh) and read SSE streams.

Pytest runs outside the sandbox's mount namespace. Commands that must see the sandbox's /run
(systemctl --user, journalctl, the router itself) go through `systemd-sandbox.sh exec DIR -- ...`;
unit files are written directly into DIR/config/systemd/user, which is the same path inside.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "router" / "demo" / "systemd-sandbox.sh"
PYTHON = sys.executable
FAKE_BACKEND = str(Path(__file__).resolve().with_name("fake_backend.py"))


def cgroup2_mount() -> str | None:
    """Where the cgroup2 hierarchy is mounted on this host, or None."""
    try:
        with open("/proc/self/mounts", encoding="utf-8") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return None
    points = [m[1] for m in mounts if len(m) > 2 and m[2] == "cgroup2"]
    for preferred in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if preferred in points:
            return preferred
    return points[0] if points else None


def sandbox_unavailable() -> str | None:
    """Why the systemd sandbox cannot run here (a skip reason), or None when it can."""
    if os.geteuid() != 0:
        return "integration tests need root (the systemd sandbox uses mount namespaces and cgroups)"
    if cgroup2_mount() is None:
        return "integration tests need a cgroup2 hierarchy (/sys/fs/cgroup or /sys/fs/cgroup/unified)"
    for binary in ("/lib/systemd/systemd", "/lib/systemd/systemd-journald"):
        if not os.access(binary, os.X_OK):
            return f"integration tests need systemd ({binary} is missing: apt-get install systemd)"
    for tool in ("nsenter", "unshare", "systemctl", "journalctl", "busctl"):
        if shutil.which(tool) is None:
            return f"integration tests need `{tool}` on PATH"
    if not any(Path(p).exists() for p in ("/usr/lib/systemd/user/dbus.socket", "/lib/systemd/user/dbus.socket")):
        return "integration tests need the user D-Bus (apt-get install dbus-user-session)"
    return None


def require_sandbox() -> None:
    """Skip the test (fail it with LLM_ROUTER_REQUIRE_SANDBOX set) when the sandbox cannot run here."""
    import pytest

    reason = sandbox_unavailable()
    if reason:
        if os.environ.get("LLM_ROUTER_REQUIRE_SANDBOX"):
            pytest.fail(f"LLM_ROUTER_REQUIRE_SANDBOX is set but {reason}")
        pytest.skip(reason)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(pred: Callable[[], Any], timeout: float = 10.0, step: float = 0.02, what: str = "condition") -> Any:
    """Poll pred() until it returns something truthy (returned); TimeoutError after `timeout` seconds."""
    end = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= end:
            raise TimeoutError(f"{what} not met within {timeout}s")
        time.sleep(step)


def fake_argv(port: int, model_id: str = "placeholder", *extra: str) -> list[str]:
    """The argv that runs tests/fake_backend.py with this venv's Python."""
    return [PYTHON, FAKE_BACKEND, "--port", str(port), "--model-id", model_id, *extra]


def exec_line(argv: Iterable[str]) -> str:
    """An ExecStart= value for simple argv (tests control it: no quotes, %, $ or spaces inside)."""
    words = list(argv)
    for w in words:
        if any(c in w for c in " \t\"'\\%$\n"):
            raise ValueError(f"exec_line only takes plain words, not {w!r}")
    return " ".join(words)


class Sandbox:
    """One running private systemd user manager (+ its D-Bus and journald) in a mount namespace."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.unit_dir = self.dir / "config" / "systemd" / "user"
        self.env: dict[str, str] = {}
        self.outside_bus = ""

    def start(self, timeout: float = 60.0) -> None:
        out = subprocess.run([str(SCRIPT), "start", str(self.dir)], check=True, capture_output=True,
                             text=True, timeout=timeout).stdout
        for line in out.splitlines():
            if line.startswith("export "):
                k, v = line[len("export "):].split("=", 1)
                self.env[k] = v.strip("'")
        self.outside_bus = self.env["SBX_OUTSIDE_BUS_ADDRESS"]

    def stop(self, timeout: float = 60.0) -> None:
        subprocess.run([str(SCRIPT), "stop", str(self.dir)], check=False, capture_output=True, timeout=timeout)

    # --- running things inside ---------------------------------------------------------------
    def exec_argv(self, *cmd: str) -> list[str]:
        """The argv that runs cmd inside the namespace (for Popen)."""
        return [str(SCRIPT), "exec", str(self.dir), "--", *cmd]

    def run(self, *cmd: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run cmd inside the namespace and wait for it."""
        return subprocess.run(self.exec_argv(*cmd), check=check, capture_output=True, text=True,
                              timeout=timeout, cwd=REPO)

    def systemctl(self, *args: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--user", "--no-pager", *args, check=check, timeout=timeout)

    def daemon_reload(self) -> None:
        self.systemctl("daemon-reload")

    # --- units -------------------------------------------------------------------------------
    def write_unit(self, name: str, text: str, dropins: dict[str, str] | None = None) -> Path:
        path = self.unit_dir / name
        path.write_text(text, encoding="utf-8")
        for fname, body in (dropins or {}).items():
            d = self.unit_dir / f"{name}.d"
            d.mkdir(exist_ok=True)
            (d / fname).write_text(body, encoding="utf-8")
        return path

    def remove_unit(self, name: str) -> None:
        (self.unit_dir / name).unlink(missing_ok=True)
        shutil.rmtree(self.unit_dir / f"{name}.d", ignore_errors=True)

    def dropin_dir(self, name: str) -> Path:
        return self.unit_dir / f"{name}.d"

    def show(self, name: str, *props: str) -> dict[str, str]:
        """`systemctl --user show -p A,B NAME` as a dict."""
        args = ["show", name] + (["-p", ",".join(props)] if props else [])
        out = self.systemctl(*args).stdout
        result: dict[str, str] = {}
        for line in out.splitlines():
            if "=" in line:
                k, v = line.split("=", 1)
                result[k] = v
        return result

    def unit_state(self, name: str) -> dict[str, str]:
        """ActiveState, SubState, Result, MainPID, InvocationID, ExecMainStatus of a unit."""
        return self.show(name, "ActiveState", "SubState", "Result", "MainPID", "InvocationID",
                         "ExecMainStatus", "LoadState")

    def active_state(self, name: str) -> str:
        return self.unit_state(name).get("ActiveState", "")

    def exec_start_argv(self, name: str) -> list[list[str]]:
        """Every ExecStart= command of the unit as the manager has it (exact argv lists, over D-Bus)."""
        import pydbus

        bus = pydbus.connect(self.outside_bus)
        try:
            mgr = bus.get("org.freedesktop.systemd1")["org.freedesktop.systemd1.Manager"]
            unit = bus.get("org.freedesktop.systemd1", mgr.LoadUnit(name))
            return [list(entry[1]) for entry in unit["org.freedesktop.systemd1.Service"].ExecStart]
        finally:
            bus.con.close_sync(None)

    def main_argv(self, name: str) -> list[str]:
        """The argv the unit's main process really runs (/proc/MainPID/cmdline; same PID namespace)."""
        pid = int(self.unit_state(name).get("MainPID") or 0)
        if pid <= 0:
            raise AssertionError(f"{name} has no main process")
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        return [w.decode() for w in raw.split(b"\0")[:-1]]

    def environment(self, name: str) -> list[str]:
        """The unit's Environment= assignments as the manager has them (exact strings, over D-Bus)."""
        import pydbus

        bus = pydbus.connect(self.outside_bus)
        try:
            mgr = bus.get("org.freedesktop.systemd1")["org.freedesktop.systemd1.Manager"]
            unit = bus.get("org.freedesktop.systemd1", mgr.LoadUnit(name))
            return list(unit["org.freedesktop.systemd1.Service"].Environment)
        finally:
            bus.con.close_sync(None)

    def wait_state(self, name: str, states: str | Iterable[str], timeout: float = 10.0) -> dict[str, str]:
        want = {states} if isinstance(states, str) else set(states)
        result: dict[str, str] = {}

        def check() -> bool:
            nonlocal result
            result = self.unit_state(name)
            return result.get("ActiveState") in want

        try:
            wait_until(check, timeout=timeout, step=0.05, what=f"{name} in {sorted(want)}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; last state {result}") from None
        return result

    def start_unit(self, name: str, timeout: float = 30.0) -> None:
        self.systemctl("start", name, timeout=timeout)

    def stop_units(self, names: Iterable[str], timeout: float = 30.0) -> None:
        names = list(names)
        if names:
            self.systemctl("stop", *names, check=False, timeout=timeout)
            self.systemctl("reset-failed", *names, check=False, timeout=timeout)

    # --- the sandbox's D-Bus daemon (dbus.service, socket-activated by dbus.socket) --------------
    # systemctl --user reaches the manager over its private socket, so these work without the bus.
    # The manager itself reconnects to the bus whenever dbus.service starts again. Tests that use
    # them should run on a sandbox of their own: every other bus client loses its connection too.
    def bus_pid(self) -> int:
        """The PID of the running dbus-daemon (0: none)."""
        return int(self.systemctl("show", "-p", "MainPID", "--value", "dbus.service").stdout.strip() or 0)

    def kill_bus(self) -> int:
        """SIGKILL the dbus-daemon (returns its PID). dbus.socket keeps listening: the next client
        that connects starts a new daemon. dbus.service may start 5 times in 10 s: its failure count is
        reset first, else repeated kills leave the bus down (dbus.socket: service-start-limit-hit)."""
        self.systemctl("reset-failed", "dbus.service", check=False)
        pid = self.bus_pid()
        if pid <= 0:
            raise AssertionError("dbus.service has no main process")
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: self.systemctl("is-active", "dbus.service", check=False).stdout.strip() != "active",
                   timeout=10, what="dbus.service down after SIGKILL")
        return pid

    def stop_bus(self) -> None:
        """Stop dbus.socket and dbus.service: connecting to the bus fails until start_bus()."""
        self.systemctl("stop", "dbus.socket", "dbus.service")
        self.systemctl("reset-failed", "dbus.service", check=False)

    def start_bus(self, timeout: float = 10.0) -> None:
        """Listen on the bus socket again and wait until the manager is back on the bus."""
        self.systemctl("start", "dbus.socket")

        def systemd_on_bus() -> bool:
            out = self.run("busctl", "--user", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
                           "org.freedesktop.DBus", "NameHasOwner", "s", "org.freedesktop.systemd1", check=False)
            return out.stdout.strip() == "b true"

        wait_until(systemd_on_bus, timeout=timeout, step=0.05, what="org.freedesktop.systemd1 back on the bus")

    # --- journal -----------------------------------------------------------------------------
    def journal(self, *match: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Synced journal entries (dicts) matching journalctl match arguments."""
        out = subprocess.run([str(SCRIPT), "journal", str(self.dir), "-o", "json", *match], check=True,
                             capture_output=True, text=True, timeout=timeout).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def journal_messages(self, *match: str) -> list[str]:
        msgs = []
        for e in self.journal(*match):
            m = e.get("MESSAGE")
            if isinstance(m, list):  # journald stores non-UTF-8 messages as byte arrays
                m = bytes(m).decode("utf-8", "replace")
            msgs.append(str(m))
        return msgs


# Switch settings for tests: short enough to keep the suite fast, long enough for a loaded CI box.
TEST_SWITCH = {
    "load_timeout": 20,
    "stop_timeout": 5,
    "status_every": 1,
    "keepalive_every": 0.5,
    "health_interval": 0.1,
    "status_channel": "event",
    "linger": 0,  # tests switch on purpose; the two-users test sets the router's default back
}


@contextlib.contextmanager
def running_sandbox(directory: Path) -> Iterator[Sandbox]:
    """A started sandbox, stopped on leaving; a failed start fails the test with the script's words."""
    import pytest

    sbx = Sandbox(directory)
    try:
        sbx.start()
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"systemd sandbox did not start: {exc.stderr}")
    try:
        yield sbx
    finally:
        sbx.stop()


def _slug(text: str, limit: int = 28) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text)[:limit].strip("-") or "t"


class Units:
    """The units one test creates; all are stopped and removed when the test ends."""

    def __init__(self, sandbox: Sandbox, test_name: str) -> None:
        self.sandbox = sandbox
        self.test = _slug(test_name)
        self.names: list[str] = []

    def name(self, tag: str = "u") -> str:
        """A unit name unique to this test and this run."""
        return f"t-{self.test}-{_slug(tag, 12)}-{uuid.uuid4().hex[:6]}.service"

    def write(self, name: str, text: str, dropins: dict[str, str] | None = None) -> str:
        self.sandbox.write_unit(name, text, dropins)
        if name not in self.names:
            self.names.append(name)
        return name

    def fake(self, tag: str = "backend", port: int | None = None, model_id: str = "placeholder",
             args: tuple[str, ...] = (), unit_extra: str = "", service_extra: str = "") -> FakeUnit:
        """Write a Type=exec unit whose ExecStart runs tests/fake_backend.py (the router's drop-in
        replaces that ExecStart per model). Start-rate limiting is off: tests switch often."""
        port = port or free_port()
        name = self.name(tag)
        text = (
            "[Unit]\n"
            f"Description=llm-router test backend {tag}\n"
            "StartLimitIntervalSec=0\n"
            f"{unit_extra}"
            "[Service]\n"
            "Type=exec\n"
            f"ExecStart={exec_line(fake_argv(port, model_id, *args))}\n"
            "Environment=PYTHONUNBUFFERED=1\n"
            "TimeoutStopSec=5\n"
            f"{service_extra}"
        )
        self.write(name, text)
        return FakeUnit(name=name, port=port, url=f"http://127.0.0.1:{port}")

    def cleanup(self) -> None:
        if not self.names:
            return
        self.sandbox.stop_units(self.names)
        for n in self.names:
            self.sandbox.remove_unit(n)
        self.sandbox.daemon_reload()


@dataclass
class FakeUnit:
    name: str
    port: int
    url: str

    def backend(self, **extra: Any) -> dict[str, Any]:
        """This unit as a `backends:` entry of config.yml."""
        return {"unit": self.name, "url": self.url, "health": "/health", **extra}

    def command(self, model_id: str, *args: str) -> list[str]:
        """A models.yml `command` that runs the fake on this unit's port as model `model_id`."""
        return fake_argv(self.port, model_id, *args)


@dataclass
class RouterHandle:
    """One `python -m router serve` process running inside the sandbox's namespace."""

    sandbox: Sandbox
    config_dir: Path
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    _clients: list[httpx.Client] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, wait: bool = True, timeout: float = 20.0) -> None:
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                self.sandbox.exec_argv(PYTHON, "-m", "router", "serve", "--config-dir", str(self.config_dir)),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1",  # history in the test's directory, kept across restarts
                     "STATE_DIRECTORY": str(self.config_dir.with_name(self.config_dir.name + ".state"))},
            )
        finally:
            log.close()
        if wait:
            self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 20.0) -> None:
        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"router exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            try:
                return httpx.get(self.url + "/health", timeout=1.0).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_until(up, timeout=timeout, step=0.05, what="router /health")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.log_text()[-4000:]}") from None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        for c in self._clients:
            c.close()
        self._clients.clear()
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            return None

    def reload(self) -> None:
        """SIGHUP: the router re-reads its configuration."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    # --- clients ---------------------------------------------------------------------------------
    def client(self, timeout: float = 30.0) -> httpx.Client:
        c = httpx.Client(base_url=self.url, timeout=timeout)
        self._clients.append(c)
        return c

    def openai(self, timeout: float = 30.0) -> Any:
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="test", max_retries=0, timeout=timeout)

    def get(self, path: str, timeout: float = 5.0) -> httpx.Response:
        return httpx.get(self.url + path, timeout=timeout)

    def status(self) -> dict[str, Any]:
        r = self.get("/status")
        r.raise_for_status()
        return dict(r.json())

    def models(self) -> dict[str, dict[str, Any]]:
        r = self.get("/v1/models")
        r.raise_for_status()
        return {m["id"]: m for m in r.json()["data"]}

    def write_config(self, backends: dict[str, Any], models: dict[str, Any], **config: Any) -> None:
        cfg: dict[str, Any] = {
            "listen": {"host": "127.0.0.1", "port": self.port},
            "systemd": {"bus": "user", "dropin_dir": str(self.sandbox.unit_dir)},
            "switch": dict(TEST_SWITCH),
            "stats": True,
        }
        for key, value in (config.pop("switch", None) or {}).items():
            if value is None:  # None: leave the key out, so the router's default applies
                cfg["switch"].pop(key, None)
            else:
                cfg["switch"][key] = value
        cfg.update(config)
        cfg["backends"] = backends
        (self.config_dir / "config.yml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        (self.config_dir / "models.yml").write_text(yaml.safe_dump({"models": models}, sort_keys=False),
                                                    encoding="utf-8")


# --- SSE -------------------------------------------------------------------------------------


@dataclass
class SSEEvent:
    kind: str  # "data" | "comment" | "done"
    t: float  # seconds since the request was sent
    raw: str
    data: Any = None


@dataclass
class StreamResult:
    """A whole streamed response, as received."""

    status: int
    headers: dict[str, str]
    events: list[SSEEvent] = field(default_factory=list)
    body: bytes = b""  # the raw body when the answer was not an event stream

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return [e.data for e in self.events if e.kind == "data"]

    @property
    def comments(self) -> list[SSEEvent]:
        return [e for e in self.events if e.kind == "comment"]

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1].kind == "done"

    def deltas(self, key: str = "content") -> list[str]:
        out = []
        for c in self.chunks:
            for ch in c.get("choices") or []:
                v = (ch.get("delta") or {}).get(key) if "delta" in ch else (ch.get("text") if key == "content"
                                                                           else None)
                if isinstance(v, str):
                    out.append(v)
        return out

    @property
    def content(self) -> str:
        return "".join(self.deltas("content"))

    @property
    def reasoning(self) -> str:
        return "".join(self.deltas("reasoning_content"))

    @property
    def status_events(self) -> list[dict[str, Any]]:
        return [c["event"] for c in self.chunks if isinstance(c.get("event"), dict)]

    @property
    def usage_chunks(self) -> list[dict[str, Any]]:
        return [c for c in self.chunks if c.get("usage")]

    @property
    def error_chunks(self) -> list[dict[str, Any]]:
        return [c for c in self.chunks if c.get("error")]

    def first_time(self, pred: Callable[[SSEEvent], bool]) -> float | None:
        for e in self.events:
            if pred(e):
                return e.t
        return None


def parse_sse_lines(lines: Iterable[tuple[float, str]]) -> Iterator[SSEEvent]:
    """SSE events from (time, line) pairs: `data:` payloads (JSON-decoded), `:` comments, [DONE]."""
    data: list[str] = []
    t_first = 0.0
    for t, line in lines:
        if line == "":
            if data:
                payload = "\n".join(data)
                if payload.strip() == "[DONE]":
                    yield SSEEvent("done", t_first, payload)
                else:
                    yield SSEEvent("data", t_first, payload, json.loads(payload))
                data = []
            continue
        if line.startswith(":"):
            yield SSEEvent("comment", t, line[1:].strip())
            continue
        if line.startswith("data:"):
            if not data:
                t_first = t
            data.append(line[5:].lstrip(" ") if line.startswith("data: ") else line[5:])
        # other fields (event:, id:, retry:) are not used by OpenAI streams
    if data:  # a last event without its blank line
        payload = "\n".join(data)
        yield SSEEvent("data" if payload.strip() != "[DONE]" else "done", t_first, payload,
                       None if payload.strip() == "[DONE]" else json.loads(payload))


def stream_request(client: httpx.Client, url: str, body: dict[str, Any], timeout: float = 30.0,
                   headers: dict[str, str] | None = None,
                   on_event: Callable[[SSEEvent], None] | None = None) -> StreamResult:
    """POST body (streaming) and read the whole SSE answer, timing each line; bounded by `timeout`."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    with client.stream("POST", url, json=body, headers=headers,
                       timeout=httpx.Timeout(timeout, connect=5.0)) as resp:
        result = StreamResult(resp.status_code, dict(resp.headers))
        if "text/event-stream" not in resp.headers.get("content-type", ""):
            result.body = resp.read()
            return result

        def timed_lines() -> Iterator[tuple[float, str]]:
            for line in resp.iter_lines():
                now = time.monotonic()
                if now > deadline:
                    raise TimeoutError(f"stream not finished within {timeout}s")
                yield now - t0, line

        for ev in parse_sse_lines(timed_lines()):
            result.events.append(ev)
            if on_event is not None:
                on_event(ev)
    return result


async def astream_request(client: httpx.AsyncClient, url: str, body: dict[str, Any],
                          timeout: float = 30.0) -> StreamResult:
    """The async twin of stream_request."""
    t0 = time.monotonic()
    async with client.stream("POST", url, json=body, timeout=httpx.Timeout(timeout, connect=5.0)) as resp:
        result = StreamResult(resp.status_code, dict(resp.headers))
        if "text/event-stream" not in resp.headers.get("content-type", ""):
            result.body = await resp.aread()
            return result
        lines = []
        async for line in resp.aiter_lines():
            lines.append((time.monotonic() - t0, line))
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"stream not finished within {timeout}s")
        result.events = list(parse_sse_lines(lines))
    return result


# --- small shared helpers --------------------------------------------------------------------


def chat_body(model: str, text: str = "hello", stream: bool = False, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": text}], "stream": stream}
    body.update(extra)
    return body


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.monotonic()
    value = fn()
    return value, time.monotonic() - t0


@contextlib.contextmanager
def deadline(seconds: float, what: str = "block") -> Iterator[None]:
    """Assert the block finishes within `seconds` (it must itself be bounded, e.g. by client timeouts)."""
    t0 = time.monotonic()
    yield
    took = time.monotonic() - t0
    assert took <= seconds, f"{what} took {took:.2f}s, expected at most {seconds}s"


# --- the router's own lines (contract: "Status lines (exact prefixes)") ------------------------

SWITCHING_RE = re.compile(r"^🔄 Switching to (?P<model>.+)…$")
LOADING_RE = re.compile(r"^⏳ Loading (?P<model>.+)… (?P<n>\d+)s/(?P<timeout>\d+)s$")
READY_RE = re.compile(r"^✅ (?P<model>.+) ready \(took (?P<n>\d+) s\)$")
WAITING_RE = re.compile(r"^⏳ Waiting for (?P<model>.+) \((?P<n>\d+) requests? ahead\)…$")
FINAL_RE = re.compile(r"^✅ (?P<model>.+?)(?: ready \(took (?P<took>\d+) s\))? · ⚡ (?P<rate>\d+(?:\.\d)?) tok/s · "
                      r"(?P<tokens>\d+) tokens in (?P<secs>\d+(?:\.\d)?) s$")
FAILED_RE = re.compile(r"^❌ (?P<model>.+?) failed to load: (?P<reason>.+)$", re.S)
STATS_RE = re.compile(r"^⚡ (?P<rate>\d+(?:\.\d)?) tok/s \((?P<tokens>\d+) tokens in (?P<secs>\d+(?:\.\d)?)s\)$",
                      re.M)
OWN_LINE_RES = (SWITCHING_RE, LOADING_RE, WAITING_RE, READY_RE, FAILED_RE)


def is_status_line(line: str) -> bool:
    return any(r.match(line) for r in OWN_LINE_RES)


def status_lines(res: StreamResult, channel: str) -> list[str]:
    """The router's status lines in a streamed answer, read from `channel` (event|reasoning|content)."""
    if channel == "event":
        return [str(e["data"]["description"]) for e in res.status_events]
    text = res.reasoning if channel == "reasoning" else res.content
    return [ln for ln in text.split("\n") if is_status_line(ln)]


def stats_lines(text: str) -> list[re.Match[str]]:
    return list(STATS_RE.finditer(text))


def one_backend(units: Units, router: Callable[..., RouterHandle], models: Iterable[str] = ("m-a", "m-b"),
                args: Iterable[str] = (), per_model: dict[str, dict[str, Any]] | None = None,
                start: bool = True, **config: Any) -> tuple[RouterHandle, FakeUnit]:
    """A router with one fake backend unit that serves every model in `models` (one at a time).

    `args` go to every model's fake_backend command; per_model[id] may add "args" (a list) and any
    models.yml keys (env, upstream_model, load_timeout, ...)."""
    u = units.fake("one")
    entries: dict[str, Any] = {}
    for mid in models:
        extra = dict((per_model or {}).get(mid, {}))
        margs = list(args) + list(extra.pop("args", []))
        entries[mid] = {"backend": "fake", "command": u.command(mid, *margs), **extra}
    return router({"fake": u.backend()}, entries, start=start, **config), u


# --- figures printed by the fault suite and the property tests (also under pytest's capture) ---------


FIGURES_DIR = REPO / "build" / "test-artifacts" / "figures"


def print_figures(config: Any, title: str, lines: Iterable[str]) -> None:
    """Keep a block of figures for the end of the run: conftest's terminal summary prints every block,
    whichever process measured it (pytest-xdist workers' own output never reaches the terminal)."""
    text = "\n".join(["", f"===== {title} =====", *(f"  {line}" for line in lines)])
    FIGURES_DIR.mkdir(parents=True, exist_ok=True)
    with open(FIGURES_DIR / f"{os.getpid()}.txt", "a", encoding="utf-8") as f:
        f.write(text + "\n")
