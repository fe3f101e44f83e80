"""Integration tests of failures and refusals through a running router.

Covers units that fail or never get healthy, crashes mid-stream, bad requests (400/404), the API key
and the admin endpoints."""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from collections.abc import Callable

import httpx
import openai
import pytest
from sandbox import (
    FAILED_RE,
    RouterHandle,
    Sandbox,
    Units,
    chat_body,
    one_backend,
    status_lines,
    stream_request,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

Router = Callable[..., RouterHandle]


def error_of(r: httpx.Response) -> dict[str, str]:
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err.get("message"), str) and err["message"], err
    assert "type" in err and "code" in err, err
    return dict(err)


def test_unit_that_fails_at_start_non_streaming(sandbox: Sandbox, units: Units, router: Router) -> None:
    rt, u = one_backend(units, router, per_model={"m-bad": {"args": ["--exit-code", "3"]}},
                        models=("m-ok", "m-bad"))
    with rt.client() as c:
        t0 = time.monotonic()
        r = c.post("/v1/chat/completions", json=chat_body("m-bad"))
        took = time.monotonic() - t0
    assert r.status_code == 503, r.text
    assert took < 5, f"failure reported after {took:.1f}s (load_timeout is 20 s: it must not wait it out)"
    err = error_of(r)
    assert err["code"] == "model_load_failed"
    msg = err["message"]
    assert "m-bad" in msg and u.name in msg, msg
    assert "cannot load weights for m-bad" in msg, f"no journal tail in: {msg}"
    assert "exit" in msg.lower(), msg  # the unit's Result (exit-code) or status
    # the engine's own line leads; the tail ends the message in a fenced block, systemd's lines last
    assert msg.startswith(f"m-bad (unit {u.name}): cannot load weights for m-bad\nIt exited while loading"), msg
    tail = msg[msg.index("```\n") + 4:msg.rindex("\n```")].splitlines()
    assert any("cannot load weights for m-bad" in ln for ln in tail) and "Failed with result" in tail[-1], tail
    # the journal command it suggests works where the router runs (here: the private manager's journal)
    command = next(part for part in msg.split("`")[1::2] if part.startswith("journalctl"))
    shown = subprocess.run([*shlex.split(command), "--no-pager"], capture_output=True, text=True, timeout=30)
    assert "cannot load weights for m-bad" in shown.stdout, (command, shown.stdout, shown.stderr)
    assert sandbox.active_state(u.name) in ("failed", "inactive")
    st = rt.status()
    assert st["last_switch"]["ok"] is False and st["last_switch"]["target"] == "m-bad"
    assert st["active_model"] is None
    # the router recovers: the next switch works
    with rt.client() as c:
        r = c.post("/v1/chat/completions", json=chat_body("m-ok"))
    assert r.status_code == 200 and "I am m-ok." in r.text


def test_unit_that_fails_at_start_streaming(sandbox: Sandbox, units: Units, router: Router) -> None:
    rt, _u = one_backend(units, router, per_model={"m-bad": {"args": ["--exit-code", "4"]}},
                        models=("m-bad",), switch={"status_channel": "content"})
    with rt.client() as c:
        res = stream_request(c, "/v1/chat/completions", chat_body("m-bad", stream=True))
    assert res.status == 200 and res.done, res.events
    assert res.chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    lines = status_lines(res, "content")
    failed = [ln for ln in res.content.split("\n") if ln.startswith("❌")]
    assert lines and failed, res.content
    m = FAILED_RE.match(res.content[res.content.index("❌"):].strip())
    assert m and m["model"] == "m-bad", res.content
    assert m["reason"].startswith("cannot load weights for m-bad"), res.content  # the engine's own words
    errors = res.error_chunks
    assert len(errors) == 1, res.chunks
    # Open WebUI ignores an `error` in a chunk that has choices
    assert errors[0]["choices"] == [] and errors[0]["error"]["code"] == "model_load_failed"
    assert "cannot load weights for m-bad" in errors[0]["error"]["message"]
    assert res.chunks[-1] is errors[0]  # then only [DONE]
    assert res.events[-1].t < 5


def test_failed_switch_in_event_channel(sandbox: Sandbox, units: Units, router: Router) -> None:
    rt, _ = one_backend(units, router, per_model={"m-bad": {"args": ["--exit-code", "5"]}}, models=("m-bad",))
    with rt.client() as c:
        res = stream_request(c, "/v1/chat/completions", chat_body("m-bad", stream=True))
    assert res.status == 200 and res.done
    events = res.status_events
    assert events and FAILED_RE.match(events[-1]["data"]["description"]), events
    assert events[-1]["data"]["done"] is True
    assert len(res.error_chunks) == 1 and res.error_chunks[0]["choices"] == []
    assert res.chunks[-1] is res.error_chunks[0]


def test_openai_client_sees_the_failed_load(sandbox: Sandbox, units: Units, router: Router) -> None:
    rt, _ = one_backend(units, router, per_model={"m-bad": {"args": ["--exit-code", "6"]}}, models=("m-bad",))
    with pytest.raises(openai.APIStatusError) as exc:
        rt.openai().chat.completions.create(model="m-bad", messages=[{"role": "user", "content": "x"}])
    assert exc.value.status_code == 503
    assert "cannot load weights for m-bad" in str(exc.value.message)


def test_backend_that_never_becomes_healthy_times_out(sandbox: Sandbox, units: Units, router: Router) -> None:
    rt, u = one_backend(units, router, models=("m-hang",),
                        per_model={"m-hang": {"args": ["--never-healthy"], "load_timeout": 2}})
    with rt.client() as c:
        t0 = time.monotonic()
        r = c.post("/v1/chat/completions", json=chat_body("m-hang"))
        took = time.monotonic() - t0
    assert r.status_code == 503, r.text
    assert 1.8 <= took < 8, took
    err = error_of(r)
    assert err["code"] == "model_load_failed"
    assert "m-hang" in err["message"] and ("timeout" in err["message"].lower()
                                           or "timed out" in err["message"].lower()), err
    # the unit is stopped afterwards
    wait_until(lambda: sandbox.active_state(u.name) in ("inactive", "failed"), timeout=10, step=0.05,
               what="hung unit stopped")
    assert rt.status()["active_model"] is None


def test_timeout_in_a_stream_ends_with_an_error_chunk(sandbox: Sandbox, units: Units, router: Router) -> None:
    rt, u = one_backend(units, router, models=("m-hang",),
                        per_model={"m-hang": {"args": ["--never-healthy"], "load_timeout": 2}})
    with rt.client() as c:
        res = stream_request(c, "/v1/chat/completions", chat_body("m-hang", stream=True))
    assert res.done and len(res.error_chunks) == 1
    assert res.status_events[-1]["data"]["description"].startswith("❌")
    assert sum(1 for e in res.status_events if e["data"]["description"].startswith("⏳")) >= 1
    wait_until(lambda: sandbox.active_state(u.name) in ("inactive", "failed"), timeout=10, step=0.05)


def test_unit_that_dies_after_becoming_healthy(sandbox: Sandbox, units: Units, router: Router) -> None:
    """The engine answers /health, then exits (e.g. out of memory on the first batch)."""
    rt, u = one_backend(units, router, models=("m-a", "m-short"),
                        per_model={"m-short": {"args": ["--exit-after", "1.0", "--exit-code", "9"]}})
    with rt.client() as c:
        assert c.post("/v1/chat/completions", json=chat_body("m-short")).status_code == 200
        wait_until(lambda: sandbox.active_state(u.name) == "failed", timeout=10, step=0.05)
        wait_until(lambda: rt.status()["units"][u.name]["active_state"] == "failed", timeout=5, step=0.05,
                   what="router sees the unit failed")
        r = c.post("/v1/chat/completions", json=chat_body("m-a"))  # a switch away still works
    assert r.status_code == 200 and "I am m-a." in r.text


def test_crash_mid_stream_ends_the_stream_cleanly(sandbox: Sandbox, units: Units, router: Router) -> None:
    rt, _u = one_backend(units, router, models=("m-crash", "m-b"),
                        per_model={"m-crash": {"args": ["--crash-mid-stream", "3", "--token-rate", "20"]}})
    with rt.client() as c:
        res = stream_request(c, "/v1/chat/completions", chat_body("m-crash", stream=True), timeout=20)
    assert res.status == 200
    assert "I am m-crash." in res.content
    assert res.done, "the router must end a broken stream with [DONE]"
    assert len(res.error_chunks) == 1 and res.error_chunks[0]["choices"] == [], res.chunks[-3:]
    assert rt.get("/health").status_code == 200
    with rt.client() as c:
        r = c.post("/v1/chat/completions", json=chat_body("m-b"))
    assert r.status_code == 200 and "I am m-b." in r.text


def test_bad_requests_400_and_unknown_model_404(sandbox: Sandbox, units: Units, router: Router) -> None:
    rt, u = one_backend(units, router)
    with rt.client() as c:
        for path in ("/v1/chat/completions", "/v1/completions"):
            r = c.post(path, content=b'{"model": "m-a", "messages": [', headers={"content-type": "application/json"})
            assert r.status_code == 400 and error_of(r)["code"] == "invalid_json", r.text
            r = c.post(path, content=b"[1, 2]")
            assert r.status_code == 400 and error_of(r)["code"] == "invalid_json", r.text
            r = c.post(path, json={"messages": [{"role": "user", "content": "x"}], "prompt": "x"})
            assert r.status_code == 400 and error_of(r)["code"] == "missing_field", r.text
        r = c.post("/v1/chat/completions", json={"model": "m-a"})
        assert r.status_code == 400 and error_of(r)["code"] == "missing_field", r.text
        r = c.post("/v1/completions", json={"model": "m-a"})
        assert r.status_code == 400 and error_of(r)["code"] == "missing_field", r.text
        r = c.post("/v1/chat/completions", json={"model": 123, "messages": []})
        assert r.status_code == 400 and error_of(r)["code"] == "invalid_field" and "string" in error_of(r)["message"]
        r = c.get("/v1/chat/completions")
        assert r.status_code == 405 and "GET is not allowed" in error_of(r)["message"], r.text
        r = c.post("/v1/nope", json={})
        assert r.status_code == 404 and "/v1/nope" in error_of(r)["message"], r.text
        for path, body in (("/v1/chat/completions", chat_body("nope")),
                           ("/v1/chat/completions", chat_body("nope", stream=True)),
                           ("/v1/completions", {"model": "nope", "prompt": "x"})):
            r = c.post(path, json=body)
            assert r.status_code == 404, r.text
            err = error_of(r)
            assert err["code"] == "model_not_found" and err["type"] == "invalid_request_error"
            assert "m-a" in err["message"] and "m-b" in err["message"], err
    with pytest.raises(openai.NotFoundError):
        rt.openai().chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    st = rt.status()
    assert st["switches"] == 0 and sandbox.active_state(u.name) == "inactive"  # nothing was started
    assert "Traceback" not in rt.log_text()


def test_api_key(sandbox: Sandbox, units: Units, router: Router) -> None:
    rt, _ = one_backend(units, router, api_key="s3cret")
    assert rt.get("/health").status_code == 200
    for path in ("/v1/models", "/status"):
        r = rt.get(path)
        assert r.status_code == 401, (path, r.text)
        assert httpx.get(rt.url + path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    r = httpx.post(rt.url + "/v1/chat/completions", json=chat_body("m-a"),
                   headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    client = openai.OpenAI(base_url=rt.url + "/v1", api_key="s3cret", max_retries=0, timeout=30)
    r2 = client.chat.completions.create(model="m-a", messages=[{"role": "user", "content": "x"}])
    assert r2.choices[0].message.content.startswith("I am m-a.")


def test_admin_load_and_unload(sandbox: Sandbox, units: Units, router: Router) -> None:
    rt, u = one_backend(units, router, per_model={"m-b": {"args": ["--load-delay", "1.2"]}})
    with httpx.Client(base_url=rt.url, timeout=30) as c:
        with c.stream("POST", "/admin/load", json={"model": "m-b"}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("application/x-ndjson")
            lines = [json.loads(x) for x in r.iter_lines() if x.strip()]
        assert any("status" in x for x in lines), lines
        assert lines[-1].get("done") is True and lines[-1]["model"] == "m-b", lines
        assert rt.status()["active_model"] == "m-b"
        r2 = c.post("/admin/unload")
        assert r2.status_code == 200 and r2.json()["unloaded"] == [u.name]
    wait_until(lambda: sandbox.active_state(u.name) == "inactive", timeout=10, step=0.05)
    assert rt.status()["active_model"] is None


def _abandon(url: str, body: dict, wait_for_first_byte: bool) -> None:
    """Send a request and hang up: at once, or as soon as the first byte of the answer arrives."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    payload = json.dumps(body).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode()
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as s:
        s.sendall(head + payload)
        if wait_for_first_byte:
            s.recv(1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close


def test_clients_that_hang_up_never_hold_the_model(sandbox: Sandbox, units: Units, router: Router) -> None:
    """Clients that vanish before, at or after the first byte must not leave the model 'serving'
    (else the router could never switch away from it again)."""
    rt, _ = one_backend(units, router, args=("--token-rate", "50", "--tokens", "40"))
    with rt.client() as c:
        assert c.post("/v1/chat/completions", json=chat_body("m-a")).status_code == 200
    for stream in (True, False):
        for first_byte in (False, True):
            for _ in range(5):
                _abandon(rt.url, chat_body("m-a", stream=stream), first_byte)
    for stream in (True, False):  # the same while a switch is in flight: waiting tickets are forgotten
        _abandon(rt.url, chat_body("m-b", stream=stream), wait_for_first_byte=stream)
    wait_until(lambda: rt.status()["serving"] == {} and rt.status()["switch"] is None, timeout=20, step=0.05,
               what="no request left serving after the clients hung up")
    with rt.client() as c:
        r = c.post("/v1/chat/completions", json=chat_body("m-a"))
        assert r.status_code == 200 and "I am m-a." in r.json()["choices"][0]["message"]["content"]
        r = c.post("/v1/chat/completions", json=chat_body("m-b"))  # a switch away is still possible
    assert r.status_code == 200 and "I am m-b." in r.json()["choices"][0]["message"]["content"]
    assert rt.status()["serving"] == {}


def test_an_abandoned_non_streaming_request_releases_its_model(sandbox: Sandbox, units: Units,
                                                                router: Router) -> None:
    """A client that gives up on a slow non-streamed answer must not hold the model until the engine
    finishes: the router drops the upstream request and a switch to another model goes ahead."""
    rt, _ = one_backend(units, router, args=("--token-rate", "2", "--tokens", "200"))  # ~100 s per answer
    with rt.client() as c:
        assert c.post("/v1/chat/completions", json=chat_body("m-a", max_tokens=1)).status_code == 200
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/chat/completions", json=chat_body("m-a"), timeout=1.0)
    wait_until(lambda: rt.status()["serving"] == {}, timeout=10, step=0.05,
               what="the abandoned request to be released")
    assert '"status": 499' in rt.log_text()
    with rt.client() as c:
        r = c.post("/v1/chat/completions", json=chat_body("m-b", max_tokens=2), timeout=30)
    assert r.status_code == 200 and "I am m-b." in r.json()["choices"][0]["message"]["content"]


def test_a_load_whose_clients_left_is_cut_short_for_another_model(sandbox: Sandbox, units: Units,
                                                                   router: Router) -> None:
    """Picking the wrong model and then the right one must not cost the wrong one's load_timeout."""
    rt, u = one_backend(units, router, per_model={"m-a": {"args": ["--never-healthy"], "load_timeout": 120}})
    with httpx.Client(base_url=rt.url, timeout=30) as c:
        with c.stream("POST", "/v1/chat/completions", json=chat_body("m-a", stream=True)) as r:
            for line in r.iter_lines():
                if "Loading" in line:
                    break  # m-a's unit runs and will never be healthy: hang up
        wait_until(lambda: rt.status()["switch"] is not None and rt.status()["switch"]["phase"] == "loading",
                   timeout=10, what="m-a loading")
        r = c.post("/v1/chat/completions", json=chat_body("m-b"))  # the client's own timeout is 30 s < 120 s
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].startswith("I am m-b.")
    assert "switch_abandoned" in rt.log_text()
    st = rt.status()
    assert st["active_model"] == "m-b" and st["last_switch"]["target"] == "m-b"
    assert sandbox.unit_state(u.name)["ActiveState"] == "active"
