"""Integration tests of the daemon's lifecycle with a stream in flight: SIGHUP with a valid and an invalid
configuration, SIGTERM (drain, exit 0, backend left running, adopted by the next router), and a reload
that changes the active model's command.

Each stream comes from a fake engine that sends 20 tokens at 10 tokens/s (about 2 s), so the signal
always lands mid-stream; the tests check that it did."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sandbox import (
    RouterHandle,
    Sandbox,
    SSEEvent,
    StreamResult,
    Units,
    chat_body,
    one_backend,
    stream_request,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)

Router = Callable[..., RouterHandle]
DROPIN = "50-llm-router.conf"
TOKENS = 20
SLOW = ["--tokens", str(TOKENS), "--token-rate", "10"]


def full_answer(model: str) -> str:
    """The fake engine's whole answer for `model` with TOKENS tokens (see fake_backend.answer_tokens)."""
    return f"I am {model}." + "".join(f" token{i}" for i in range(1, TOKENS))


def answer(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


class Stream:
    """A streamed chat request on its own thread and its own connection (not one of the handle's
    clients, which RouterHandle.stop() closes)."""

    def __init__(self, url: str, model: str) -> None:
        self.url = url
        self.model = model
        self.first_token = threading.Event()
        self.result: StreamResult | None = None
        self.error: BaseException | None = None
        self.ended_at = 0.0
        self._thread = threading.Thread(target=self._run, name=f"stream-{model}", daemon=True)

    def _on_event(self, ev: SSEEvent) -> None:
        if ev.kind == "data" and any((ch.get("delta") or {}).get("content")
                                     for ch in ev.data.get("choices") or []):
            self.first_token.set()

    def _run(self) -> None:
        try:
            with httpx.Client(base_url=self.url) as c:
                self.result = stream_request(c, "/v1/chat/completions", chat_body(self.model, stream=True),
                                             timeout=30, on_event=self._on_event)
        except BaseException as exc:  # reported by finish()
            self.error = exc
        finally:
            self.ended_at = time.monotonic()
            self.first_token.set()

    def start(self) -> Stream:
        self._thread.start()
        assert self.first_token.wait(15), "the stream sent no token within 15 s"
        assert self.error is None, self.error
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def finish(self, timeout: float = 30.0) -> StreamResult:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the stream did not end within {timeout}s"
        assert self.error is None, f"the stream failed: {self.error!r}"
        assert self.result is not None
        return self.result


def assert_complete(res: StreamResult, model: str) -> None:
    """Every token of the fake's answer arrived, in order, then [DONE]."""
    assert res.status == 200, res.body
    assert full_answer(model) in res.content, f"tokens missing:\n{res.content!r}"
    assert res.done, f"no [DONE] at the end: {res.events[-3:]}"
    assert not res.error_chunks, res.error_chunks


def log_events(rt: RouterHandle, event: str) -> list[dict[str, Any]]:
    out = []
    for line in rt.log_text().splitlines():
        if line.startswith("{"):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event") == event:
                out.append(entry)
    return out


def refused(url: str) -> bool:
    """True when a new connection to url is refused (nothing listens)."""
    try:
        httpx.get(url + "/health", timeout=1.0)
    except httpx.ConnectError:
        return True
    except httpx.HTTPError:
        return False
    return False


# --- SIGHUP ----------------------------------------------------------------------------------------------


def test_stream_survives_a_reload_and_the_next_request_sees_the_new_config(
        sandbox: Sandbox, units: Units, router: Router) -> None:
    rt, u = one_backend(units, router, args=SLOW)
    with rt.client() as c:
        answer(c.post("/v1/chat/completions", json=chat_body("m-a", max_tokens=1)))  # load m-a
    before = sandbox.unit_state(u.name)
    assert before["ActiveState"] == "active"

    stream = Stream(rt.url, "m-a").start()
    # models.yml changes (a new model, m-a and m-b as they were); config.yml is rewritten unchanged
    models = {m: {"backend": "fake", "command": u.command(m, *SLOW)} for m in ("m-a", "m-b", "m-c")}
    rt.write_config({"fake": u.backend()}, models)
    rt.reload()
    wait_until(lambda: "m-c" in rt.models(), timeout=10, what="m-c listed after SIGHUP")
    reloaded_at = time.monotonic()
    assert stream.running, "the stream had already ended before the reload applied: the test proves nothing"
    assert log_events(rt, "reloaded"), rt.log_text()[-2000:]

    res = stream.finish()
    assert_complete(res, "m-a")
    assert stream.ended_at > reloaded_at

    # the active model's definition did not change: still loaded, same process, no switch
    st = rt.status()
    assert st["active_model"] == "m-a" and st["switches"] == 1, st
    after = sandbox.unit_state(u.name)
    assert (after["MainPID"], after["InvocationID"]) == (before["MainPID"], before["InvocationID"])
    with rt.client() as c:
        assert answer(c.post("/v1/chat/completions", json=chat_body("m-a", max_tokens=1))) == "I am m-a."
        assert rt.status()["switches"] == 1
        # the next request sees the new config: m-c exists and loads
        assert answer(c.post("/v1/chat/completions", json=chat_body("m-c", max_tokens=1))) == "I am m-c."
    assert rt.status()["active_model"] == "m-c"


def test_invalid_reload_is_rejected_and_the_old_config_keeps_serving(
        sandbox: Sandbox, units: Units, router: Router) -> None:
    rt, u = one_backend(units, router, args=SLOW)
    with rt.client() as c:
        answer(c.post("/v1/chat/completions", json=chat_body("m-a", max_tokens=1)))
    pid = sandbox.unit_state(u.name)["MainPID"]

    stream = Stream(rt.url, "m-a").start()
    models_file = rt.config_dir / "models.yml"
    cmd = {m: json.dumps(u.command(m, *SLOW)) for m in ("m-a", "m-b")}
    models_file.write_text(
        "models:\n"
        f"  m-a: {{backend: fake, command: {cmd['m-a']}}}\n"
        f"  m-b: {{backend: fake, command: {cmd['m-b']}}}\n"
        "  m-x: {backend: nope, command: [/bin/true]}\n",
        encoding="utf-8")
    rt.reload()
    rejected = wait_until(lambda: log_events(rt, "reload_rejected"), timeout=10, what="reload_rejected logged")
    assert stream.running, "the stream had already ended before the reload was handled: the test proves nothing"
    assert rejected[0]["problems"] == [f"{models_file}:4: models.m-x.backend: unknown backend 'nope'; "
                                       "known backends: fake"], rejected
    assert rejected[0]["level"] == "error"
    assert not log_events(rt, "reloaded")

    assert_complete(stream.finish(), "m-a")
    # the old configuration keeps serving: same model list, m-a still loaded in the same process
    assert sorted(rt.models()) == ["m-a", "m-b"]
    assert rt.status()["active_model"] == "m-a"
    assert rt.status()["config"]["reload_error"] == rejected[0]["problems"]  # /status says so too
    assert sandbox.unit_state(u.name)["MainPID"] == pid
    with rt.client() as c:
        assert answer(c.post("/v1/chat/completions", json=chat_body("m-b", max_tokens=1))) == "I am m-b."
        r = c.post("/v1/chat/completions", json=chat_body("m-x", max_tokens=1))
    assert r.status_code == 404, r.text


# --- SIGTERM ---------------------------------------------------------------------------------------------


def test_sigterm_drains_the_stream_leaves_the_backend_and_the_next_router_adopts_it(
        sandbox: Sandbox, units: Units, router: Router) -> None:
    rt, u = one_backend(units, router, args=SLOW)
    with rt.client() as c:
        answer(c.post("/v1/chat/completions", json=chat_body("m-a", max_tokens=1)))
    before = sandbox.unit_state(u.name)
    assert before["ActiveState"] == "active"

    stream = Stream(rt.url, "m-a").start()
    assert rt.proc is not None
    rt.proc.send_signal(signal.SIGTERM)
    # it stops accepting at once, while the stream is still being relayed
    wait_until(lambda: refused(rt.url), timeout=5, what="new connections refused after SIGTERM")
    assert stream.running, "the stream ended before the listener closed: the test proves nothing"
    assert rt.proc.poll() is None, "the router exited with a stream in flight"

    res = stream.finish()
    assert_complete(res, "m-a")
    code = rt.proc.wait(15)
    assert code == 0, f"exit code {code} after SIGTERM\n{rt.log_text()[-3000:]}"
    assert refused(rt.url)
    assert log_events(rt, "stopping") and log_events(rt, "stopped")

    # the backend was left running, untouched
    left = sandbox.unit_state(u.name)
    assert left["ActiveState"] == "active", left
    assert (left["MainPID"], left["InvocationID"]) == (before["MainPID"], before["InvocationID"])

    # a new router on the same configuration files adopts it without restarting anything
    rt2 = router({"fake": u.backend()}, {}, start=False)
    rt2.config_dir, rt2.port = rt.config_dir, rt.port
    rt2.start()
    st = rt2.status()
    assert st["active_model"] == "m-a" and st["switches"] == 0 and st["switch"] is None, st
    assert rt2.models()["m-a"]["state"] == "loaded"
    with rt2.client() as c:
        res2 = stream_request(c, "/v1/chat/completions", chat_body("m-a", stream=True), timeout=30)
    assert_complete(res2, "m-a")
    after = sandbox.unit_state(u.name)
    assert (after["MainPID"], after["InvocationID"]) == (before["MainPID"], before["InvocationID"])
    assert rt2.status()["switches"] == 0


# --- a reload that changes the active model ---------------------------------------------------------------


def test_reload_changing_the_active_models_command_restarts_it_at_the_next_request(
        sandbox: Sandbox, units: Units, router: Router) -> None:
    rt, u = one_backend(units, router)
    with rt.client() as c:
        assert answer(c.post("/v1/chat/completions", json=chat_body("m-a"))).startswith("I am m-a.")
    before = sandbox.unit_state(u.name)
    dropin: Path = sandbox.dropin_dir(u.name) / DROPIN
    old_text = dropin.read_text(encoding="utf-8")
    assert "--note" not in old_text

    new_command = u.command("m-a", "--note", "second-version")
    rt.write_config({"fake": u.backend()}, {"m-a": {"backend": "fake", "command": new_command},
                                            "m-b": {"backend": "fake", "command": u.command("m-b")}})
    rt.reload()
    wait_until(lambda: log_events(rt, "reloaded"), timeout=10, what="reloaded logged")

    with rt.client() as c:
        assert answer(c.post("/v1/chat/completions", json=chat_body("m-a"))).startswith("I am m-a.")
    after = sandbox.unit_state(u.name)
    assert after["ActiveState"] == "active"
    assert after["MainPID"] != before["MainPID"], "the unit was not restarted with the new command"
    assert after["InvocationID"] != before["InvocationID"]
    new_text = dropin.read_text(encoding="utf-8")
    assert new_text != old_text and "second-version" in new_text, new_text
    assert sandbox.exec_start_argv(u.name) == [new_command]
    assert sandbox.main_argv(u.name) == new_command
    st = rt.status()
    assert st["active_model"] == "m-a" and st["switches"] == 2, st
    # and it stays loaded for the request after that
    with rt.client() as c:
        answer(c.post("/v1/chat/completions", json=chat_body("m-a")))
    assert sandbox.unit_state(u.name)["MainPID"] == after["MainPID"]

