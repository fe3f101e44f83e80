"""Fault suite on real systemd: many clients and random switches through a router while engines and
the system around them misbehave; prints its figures.

Runs in its own sandbox (a private systemd user manager: the session bus is killed in here). Traffic:
LLM_ROUTER_FAULT_REQUESTS (default 320) requests from 16 clients over 3 models (plus a flaky and a
broken one), streamed or not, some clients hanging up at random points, while a chaos thread
SIGKILLs and SIGSTOPs engines mid-stream, stops the unit with systemctl behind the router's back and
reloads a configuration that removes the model being loaded. Separate tests: the router SIGKILLed
mid-switch and restarted, the session bus killed and restarted, a stray listener on a backend port.

Asserted: none lost (a full answer from the model named, or a clear error), none answered by the wrong
model, nothing stuck afterwards, no unit running that should not be, router RSS bounded. Checks of
issue-8 features not merged yet (PENDING) are printed, not enforced; LLM_ROUTER_FAULT_STRICT=1
enforces them.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sandbox import (
    FAKE_BACKEND,
    PYTHON,
    RouterHandle,
    Sandbox,
    Units,
    chat_body,
    print_figures,
    require_sandbox,
    running_sandbox,
    stream_request,
    wait_until,
)

pytestmark = pytest.mark.timeout(300)

Router = Callable[..., RouterHandle]
REQUESTS = int(os.environ.get("LLM_ROUTER_FAULT_REQUESTS", "320"))
CLIENTS = 16
MODELS = ("m-a", "m-b", "m-c")
STRICT = os.environ.get("LLM_ROUTER_FAULT_STRICT") == "1"
PENDING: dict[str, str] = {}  # every check is enforced (issue 8 is merged)
CLIENT_TIMEOUT = 45.0  # a request taking longer is lost
WEDGED_AFTER = 40.0  # no request ended for this long: the router is wedged, the clients stop
FIGURES: dict[str, Any] = {}
VIOLATIONS: list[str] = []


def pending_check(feature: str, ok: bool, message: str) -> None:
    if ok:
        return
    if STRICT or feature not in PENDING:
        raise AssertionError(f"[{feature}] {message}")
    VIOLATIONS.append(f"[{feature}, pending: {PENDING[feature]}] {message}")
    print(f"\nPENDING CHECK FAILED [{feature}]: {message}")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """This module's own systemd sandbox: its session bus gets killed, other tests must not share it."""
    require_sandbox()
    with running_sandbox(tmp_path_factory.mktemp("faultsbx")) as sbx:
        yield sbx


@pytest.fixture(scope="module", autouse=True)
def _print_figures(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    print_figures(request.config, "fault suite figures",
                  [f"{k}: {v}" for k, v in FIGURES.items()] + VIOLATIONS)


# --- helpers --------------------------------------------------------------------------------------


def supported_switch_keys(keys: dict[str, Any]) -> dict[str, Any]:
    """The `switch:` keys of issue 8 this router's config parser knows (older ones refuse unknown keys)."""
    from router.config import ConfigError, parse_config

    ok = {}
    for k, v in keys.items():
        text = yaml.safe_dump({"switch": {k: v}, "backends": {"b": {"unit": "b.service", "url": "http://127.0.0.1:9"}}})
        try:
            parse_config(text, yaml.safe_dump({"models": {"m": {"backend": "b"}}}), Path("/nonexistent"),
                         environ={"HOME": "/root"})
        except ConfigError:
            continue
        ok[k] = v
    return ok


def router_pid(rt: RouterHandle) -> int:
    assert rt.proc is not None
    return rt.proc.pid  # systemd-sandbox.sh exec ends in `exec python -m router`: the same PID


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main_pid(sandbox: Sandbox, unit: str) -> int:
    try:
        return int(sandbox.unit_state(unit).get("MainPID") or 0)
    except subprocess.SubprocessError:
        return 0


@dataclass
class Outcome:
    model: str
    stream: bool
    kind: str  # ok | error:<code> | hung_up | wrong_model | lost:<why>
    wait: float  # seconds until the answer started (or the error came)
    detail: str = ""


def classify_json(model: str, r: httpx.Response) -> tuple[str, str]:
    try:
        body = r.json()
    except ValueError:
        return f"lost:http{r.status_code}-not-json", r.text[:200]
    if r.status_code == 200:
        text = str(body["choices"][0]["message"]["content"])
        if text.startswith(f"I am {model}."):
            return "ok", ""
        return "wrong_model", text[:80]
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict) and err.get("message"):
        return f"error:{err.get('code')}", str(err["message"])[:200]
    return f"lost:http{r.status_code}-no-error", r.text[:200]


def one_request(url: str, model: str, stream: bool, timeout: float = CLIENT_TIMEOUT) -> Outcome:
    t0 = time.monotonic()
    try:
        with httpx.Client(base_url=url, timeout=httpx.Timeout(timeout, connect=5)) as c:
            if not stream:
                r = c.post("/v1/chat/completions", json=chat_body(model, max_tokens=12))
                kind, detail = classify_json(model, r)
                return Outcome(model, stream, kind, time.monotonic() - t0, detail)
            res = stream_request(c, "/v1/chat/completions", chat_body(model, stream=True), timeout=timeout)
    except httpx.TimeoutException as e:
        return Outcome(model, stream, "lost:client-timeout", time.monotonic() - t0, repr(e))
    except (httpx.HTTPError, TimeoutError) as e:
        return Outcome(model, stream, "lost:connection", time.monotonic() - t0, repr(e))
    first = res.first_time(lambda e: e.kind == "data" and bool(e.data.get("choices"))
                           and bool((e.data["choices"][0].get("delta") or {}).get("content")))
    wait = first if first is not None else time.monotonic() - t0
    if res.status != 200:
        try:
            err = json.loads(res.body)["error"]
            return Outcome(model, stream, f"error:{err.get('code')}", wait, str(err.get("message"))[:200])
        except (ValueError, KeyError, TypeError):
            return Outcome(model, stream, f"lost:http{res.status}", wait, res.body[:200].decode("utf-8", "replace"))
    answers = res.content.split("I am ")[1:]
    if answers and not all(a.startswith(f"{model}.") for a in answers):
        return Outcome(model, stream, "wrong_model", wait, res.content[:80])
    if not res.done:
        return Outcome(model, stream, "lost:no-[DONE]", wait, res.content[-80:])
    if res.error_chunks:
        err = res.error_chunks[-1]["error"]
        return Outcome(model, stream, f"error:{err.get('code')}", wait, str(err.get("message"))[:200])
    if not res.content.startswith(f"I am {model}.") and f"I am {model}." not in res.content:
        return Outcome(model, stream, "lost:no-answer", wait, res.content[:80])
    return Outcome(model, stream, "ok", wait)


def hang_up(url: str, model: str, stream: bool, after_first_byte: bool) -> Outcome:
    """Send a request and hang up (RST): at once, or as soon as the first byte of the answer arrives."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    payload = json.dumps(chat_body(model, stream=stream)).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode()
    t0 = time.monotonic()
    with contextlib.suppress(OSError), socket.create_connection((parts.hostname, parts.port), timeout=30) as s:
        s.sendall(head + payload)
        if after_first_byte:
            s.recv(1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    return Outcome(model, stream, "hung_up", time.monotonic() - t0)


def write_models(rt: RouterHandle, models: dict[str, Any]) -> None:
    path = rt.config_dir / "models.yml"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"models": models}, sort_keys=False), encoding="utf-8")
    tmp.replace(path)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


# --- the traffic test -----------------------------------------------------------------------------


@dataclass
class Chaos:
    sandbox: Sandbox
    rt: RouterHandle
    unit: str
    models: dict[str, Any]
    stop: threading.Event = field(default_factory=threading.Event)
    events: Counter[str] = field(default_factory=Counter)
    log: list[str] = field(default_factory=list)
    rng: random.Random = field(default_factory=lambda: random.Random(8))

    def run(self) -> None:
        actions: list[Callable[[], None]] = [self.kill9, self.sigstop, self.external_stop]
        if STRICT or "reload_abort" not in PENDING:  # today it wedges the router: see test_reload_removes_...
            actions.append(self.reload_removing_loading)
        while not self.stop.wait(self.rng.uniform(1.0, 2.5)):
            action = self.rng.choice(actions)
            try:
                action()
            except (subprocess.SubprocessError, OSError, httpx.HTTPError, TimeoutError) as e:
                self.log.append(f"{action.__name__}: {e!r}")

    def kill9(self) -> None:
        pid = main_pid(self.sandbox, self.unit)
        if pid > 0:
            os.kill(pid, signal.SIGKILL)
            self.events["engine SIGKILL"] += 1

    def sigstop(self) -> None:
        pid = main_pid(self.sandbox, self.unit)
        if pid > 0:
            os.kill(pid, signal.SIGSTOP)
            time.sleep(self.rng.uniform(0.3, 1.5))
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            self.events["engine SIGSTOP"] += 1

    def external_stop(self) -> None:
        self.sandbox.systemctl("stop", "--no-block", self.unit, check=False)
        self.events["systemctl stop behind the router"] += 1

    def reload_removing_loading(self) -> None:
        """Wait (briefly) for a load, then reload without that model; put it back a moment later."""
        deadline = time.monotonic() + 3
        target = None
        while time.monotonic() < deadline and target is None:
            sw = self.rt.status().get("switch")
            if sw and sw.get("target") in MODELS:
                target = sw["target"]
            else:
                time.sleep(0.02)
        if target is None:
            return
        write_models(self.rt, {k: v for k, v in self.models.items() if k != target})
        self.rt.reload()
        time.sleep(self.rng.uniform(0.3, 1.0))
        write_models(self.rt, self.models)
        self.rt.reload()
        self.events["reload removing the model being loaded"] += 1


def fault_models(u: Any, tmp: Path) -> dict[str, Any]:
    stream_args = ["--tokens", "12", "--token-rate", "80"]
    models: dict[str, Any] = {m: {"backend": "fake", "command": u.command(m, *stream_args)} for m in MODELS}
    models["m-flaky"] = {"backend": "fake", "command": u.command("m-flaky", "--flaky", str(tmp / "flaky.state"))}
    models["m-bad"] = {"backend": "fake", "command": u.command("m-bad", "--exit-code", "3")}
    return models


def test_traffic_with_faults(sandbox: Sandbox, units: Units, router: Router, tmp_path: Path) -> None:
    u = units.fake("faults")
    models = fault_models(u, tmp_path)
    batching = supported_switch_keys({"max_wait": 5.0, "linger": 0.5})
    rt = router({"fake": u.backend()}, models, switch={"load_timeout": 15, **batching})
    with rt.client() as c:
        assert c.post("/v1/chat/completions", json=chat_body("m-a")).status_code == 200
    pid = router_pid(rt)
    rss_before = rss_kib(pid)

    rng = random.Random(2024)
    specs: list[tuple[str, bool, str]] = []  # model, stream, how (full | hang-up-now | hang-up-later)
    for _ in range(REQUESTS):
        r = rng.random()
        model = "m-bad" if r < 0.02 else "m-flaky" if r < 0.06 else rng.choice(MODELS)
        how = rng.choices(["full", "hang-up-now", "hang-up-later"], [0.88, 0.06, 0.06])[0]
        specs.append((model, rng.random() < 0.6, how))
    todo = list(reversed(specs))
    lock = threading.Lock()
    outcomes: list[Outcome] = []
    last_end = [time.monotonic()]
    wedged = threading.Event()

    def client() -> None:
        while True:
            with lock:
                if not todo or wedged.is_set():
                    return
                model, stream, how = todo.pop()
            if how == "full":
                o = one_request(rt.url, model, stream)
            else:
                o = hang_up(rt.url, model, stream, after_first_byte=how == "hang-up-later")
            with lock:
                outcomes.append(o)
                last_end[0] = time.monotonic()

    chaos = Chaos(sandbox, rt, u.name, models)
    chaos_thread = threading.Thread(target=chaos.run, name="chaos", daemon=True)
    t0 = time.monotonic()
    threads = [threading.Thread(target=client, name=f"client-{i}", daemon=True) for i in range(CLIENTS)]
    for t in [*threads, chaos_thread]:
        t.start()
    while any(t.is_alive() for t in threads) and time.monotonic() - t0 < 200:
        if time.monotonic() - last_end[0] > WEDGED_AFTER:
            wedged.set()  # nothing ended for WEDGED_AFTER seconds: stop sending, report it
        time.sleep(0.2)
    for t in threads:
        t.join(CLIENT_TIMEOUT + 10)
    chaos.stop.set()
    chaos_thread.join(30)
    took = time.monotonic() - t0
    assert not any(t.is_alive() for t in threads), "clients still running after 200 s"

    # nothing stuck: the router ends up idle
    def idle() -> bool:
        st = rt.status()
        return st["serving"] == {} and st["switch"] is None and st["queued"] == {}

    stuck = None
    try:
        wait_until(idle, timeout=30, step=0.1, what="router idle after the traffic")
    except TimeoutError as e:
        stuck = f"{e}: {rt.status()}"
    st = rt.status()
    rss_after = rss_kib(pid)

    kinds = Counter(o.kind for o in outcomes)
    waits = [o.wait for o in outcomes if o.kind == "ok"]
    FIGURES["traffic: requests"] = f"{len(outcomes)} from {CLIENTS} clients in {took:.1f}s"
    FIGURES["traffic: outcomes"] = dict(sorted(kinds.items()))
    FIGURES["traffic: switches"] = st["switches"]
    FIGURES["traffic: wait to first answer byte p50/p99/max (s)"] = (
        f"{percentile(waits, 0.5):.3f} / {percentile(waits, 0.99):.3f} / {max(waits, default=0):.3f}")
    FIGURES["traffic: chaos"] = dict(chaos.events)
    FIGURES["traffic: router RSS before/after (MiB)"] = f"{rss_before / 1024:.1f} / {rss_after / 1024:.1f}"
    if chaos.log:
        FIGURES["traffic: chaos errors"] = chaos.log[:5]
    for o in outcomes:
        if o.kind.startswith("lost") or o.kind == "wrong_model":
            print(f"  {o.kind} {o.model} stream={o.stream} after {o.wait:.2f}s: {o.detail}")

    assert not wedged.is_set(), (f"the router wedged: no request ended for {WEDGED_AFTER:.0f}s "
                                 f"({len(specs) - len(outcomes)} requests not sent); status {st}")
    assert len(outcomes) == len(specs), f"{len(specs) - len(outcomes)} requests never ended"
    assert kinds["wrong_model"] == 0, "answered by the wrong model"
    lost = {k: n for k, n in kinds.items() if k.startswith("lost")}
    assert not lost, f"requests lost (neither a full answer nor a clear error): {lost}"
    assert stuck is None, stuck
    # no unit left running that should not be: the unit runs only when the router says a model is loaded
    state = sandbox.active_state(u.name)
    assert state != "active" or st["active_model"] is not None, f"{u.name} is {state} with no model loaded"
    assert "Traceback" not in rt.log_text(), rt.log_text()[-3000:]
    assert rss_after - rss_before < 64 * 1024, f"router RSS grew from {rss_before} to {rss_after} KiB"

    # batching: with max_wait 5 s, the router switches at most about once per max_wait per model, plus
    # the loads that the chaos forced (a killed or stopped engine is reloaded) and failed loads
    forced = sum(chaos.events.values()) + kinds["error:model_load_failed"] + kinds["error:model_not_found"]
    bound = 3 * (int(took / 5.0) + 1) + 2 * forced
    FIGURES["traffic: switches allowed by batching (bound)"] = bound
    pending_check("batching", bool(batching) and st["switches"] <= bound,
                  f"{st['switches']} switches, the batching policy allows about {bound}"
                  + ("" if batching else " (this router does not know switch.max_wait yet)"))


# --- a reload that removes the model being loaded -------------------------------------------------


def test_reload_removes_the_model_being_loaded(sandbox: Sandbox, units: Units, router: Router) -> None:
    u = units.fake("rmload")
    models = {m: {"backend": "fake", "command": u.command(m, "--load-delay", "2")} for m in MODELS}
    rt = router({"fake": u.backend()}, models)
    got: list[Outcome] = []
    t = threading.Thread(target=lambda: got.append(one_request(rt.url, "m-b", True, timeout=15)), daemon=True)
    t.start()
    wait_until(lambda: (rt.status().get("switch") or {}).get("target") == "m-b", timeout=10, step=0.02,
               what="m-b loading")
    t0 = time.monotonic()
    write_models(rt, {k: v for k, v in models.items() if k != "m-b"})
    rt.reload()
    t.join(20)
    ended = time.monotonic() - t0
    with rt.client(timeout=10) as c:
        try:
            r = c.post("/v1/chat/completions", json=chat_body("m-a"))
            after = f"HTTP {r.status_code} {r.text[:80]}"
            served = r.status_code == 200 and "I am m-a." in r.text
        except httpx.TimeoutException:
            after, served = "no answer within 10 s", False
    outcome = got[0] if got else Outcome("m-b", True, "lost:never-ended", ended)
    FIGURES["reload removing the model being loaded"] = (f"its request: {outcome.kind} after {ended:.1f}s; "
                                                         f"then m-a: {after}")
    assert not outcome.kind.startswith("lost") or not served, outcome
    pending_check("reload_abort", outcome.kind == "error:model_not_found" and ended < 5,
                  f"the request for the removed model ended {outcome.kind} after {ended:.1f}s")
    pending_check("reload_abort", served, f"after the reload the router does not serve m-a: {after}")


# --- the router killed mid-switch -----------------------------------------------------------------


def test_router_killed_mid_switch_and_restarted(sandbox: Sandbox, units: Units, router: Router) -> None:
    u = units.fake("rkill")
    models = {m: {"backend": "fake", "command": u.command(m, "--load-delay", "1.5")} for m in MODELS}
    rt = router({"fake": u.backend()}, models)
    with rt.client() as c:
        assert c.post("/v1/chat/completions", json=chat_body("m-a")).status_code == 200
    got: list[Outcome] = []
    t = threading.Thread(target=lambda: got.append(one_request(rt.url, "m-b", True)), daemon=True)
    t.start()
    wait_until(lambda: (rt.status().get("switch") or {}).get("phase") == "loading", timeout=10, step=0.02,
               what="m-b loading")
    assert rt.proc is not None
    rt.proc.kill()  # SIGKILL mid-switch
    rt.proc.wait(10)
    t.join(30)
    rt.start()
    with rt.client() as c:
        for m in ("m-b", "m-c", "m-a"):
            r = c.post("/v1/chat/completions", json=chat_body(m))
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].startswith(f"I am {m}."), (
                m, r.text)
    st = rt.status()
    assert st["serving"] == {} and st["active_model"] == "m-a"
    FIGURES["router SIGKILL mid-switch"] = f"client in flight got {got[0].kind if got else '?'}; after restart " \
                                           "m-b, m-c, m-a answered"


# --- the session bus killed and restarted ---------------------------------------------------------


def test_session_bus_killed_and_restarted(sandbox: Sandbox, units: Units, router: Router) -> None:
    u = units.fake("bus")
    models = {m: {"backend": "fake", "command": u.command(m)} for m in MODELS}
    rt = router({"fake": u.backend()}, models)
    with rt.client() as c:
        assert c.post("/v1/chat/completions", json=chat_body("m-a")).status_code == 200
    sandbox.systemctl("kill", "--signal=SIGKILL", "dbus.service", check=False)
    time.sleep(0.5)
    with rt.client() as c:
        t0 = time.monotonic()
        during = c.post("/v1/chat/completions", json=chat_body("m-b"), timeout=30)
        first = time.monotonic() - t0
        health = rt.get("/health")
        # the bus comes back on its socket; the router must reconnect and switch again
        ok_after = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            r = c.post("/v1/chat/completions", json=chat_body("m-c"), timeout=30)
            if r.status_code == 200 and "I am m-c." in r.text:
                ok_after = time.monotonic() - t0
                break
            time.sleep(0.5)
    FIGURES["session bus restart"] = (f"first switch after the kill: HTTP {during.status_code} after {first:.2f}s; "
                                      f"/health {health.status_code}; a switch worked again after "
                                      f"{'never (20 s)' if ok_after is None else f'{ok_after:.1f}s'}")
    assert during.status_code in (200, 503), during.text  # an answer or a clear error, never a hang
    if during.status_code == 503:
        pending_check("bus_restart", "not reachable over D-Bus" in during.text,
                      f"the error while the bus is down does not say so: {during.text[:300]}")
    pending_check("bus_restart", ok_after is not None, "no switch succeeded within 20 s after the bus restarted")


# --- a stray listener on the backend's port -------------------------------------------------------


def test_stray_listener_on_the_backend_port(sandbox: Sandbox, units: Units, router: Router) -> None:
    u = units.fake("stray")
    models = {m: {"backend": "fake", "command": u.command(m)} for m in ("m-a", "m-b")}
    rt = router({"fake": u.backend()}, models)
    stray = subprocess.Popen([PYTHON, FAKE_BACKEND, "--port", str(u.port), "--model-id", "stray"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _healthy(u.url), timeout=10, what="stray listener up")
        with rt.client() as c:
            r = c.post("/v1/chat/completions", json=chat_body("m-a"))
    finally:
        stray.kill()
        stray.wait(5)
    FIGURES["stray listener"] = f"HTTP {r.status_code}: {r.text[:160]}"
    pending_check("stray_listener", "I am stray." not in r.text, "the stray listener answered for m-a (wrong model)")
    pending_check("stray_listener", r.status_code == 503 and str(u.port) in r.text and str(stray.pid) in r.text,
                  f"the switch should fail naming port {u.port} and PID {stray.pid}: HTTP {r.status_code} "
                  f"{r.text[:300]}")


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
