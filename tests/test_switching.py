"""Integration tests of model switching through a running router on a real systemd user manager.

Covers the first load, drop-in rewrites, switches across backends, config-file rewrites, adoption at
start, concurrency, the Open WebUI request pattern, SIGHUP/SIGTERM and the router-added switch time."""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sandbox import (
    FAKE_BACKEND,
    PYTHON,
    TEST_SWITCH,
    RouterHandle,
    Sandbox,
    Units,
    chat_body,
    fake_argv,
    free_port,
    one_backend,
    status_lines,
    stream_request,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)

Router = Callable[..., RouterHandle]
DROPIN = "50-llm-router.conf"  # the file name the router owns inside <unit>.d/


def answer(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def test_first_load(sandbox: Sandbox, units: Units, router: Router) -> None:
    rt, u = one_backend(units, router)
    assert rt.get("/health").json()["active_model"] is None
    assert {m: d["state"] for m, d in rt.models().items()} == {"m-a": "unloaded", "m-b": "unloaded"}
    assert sandbox.active_state(u.name) == "inactive"

    with rt.client() as c:
        text = answer(c.post("/v1/chat/completions", json=chat_body("m-a")))
    assert text.startswith("I am m-a.")

    st = rt.status()
    assert st["active_model"] == "m-a"
    assert st["switches"] == 1
    assert st["switch"] is None
    assert st["units"][u.name]["active_state"] == "active"
    assert st["last_switch"]["target"] == "m-a" and st["last_switch"]["ok"] is True
    assert st["gpu"]["available"] is False and st["gpu"]["reason"]  # no GPU here: degraded, not an error
    assert rt.models()["m-a"]["state"] == "loaded" and rt.models()["m-b"]["state"] == "unloaded"
    health = rt.get("/health").json()
    assert health == {"status": "ok", "active_model": "m-a", "backend_healthy": True}
    assert sandbox.active_state(u.name) == "active"
    assert sandbox.exec_start_argv(u.name) == [u.command("m-a")]


def _dropin_text(sandbox: Sandbox, unit: str) -> str:
    return (sandbox.dropin_dir(unit) / DROPIN).read_text(encoding="utf-8")


def test_switch_a_b_a_on_one_unit_rewrites_the_dropin(sandbox: Sandbox, units: Units, router: Router) -> None:
    # awkward words: the unit must run exactly this argv (quotes, backslash, %, $, spaces, empty)
    awkward = ["100% sure", "$HOME and ${PATH}", 'say "hi"', "back\\slash", "", "tab\there"]
    notes = [w for a in awkward for w in ("--note", a)]
    rt, u = one_backend(units, router, per_model={
        "m-a": {"args": notes, "env": {"FAKE_ENV": "value with spaces", "PCT": "50%"}},
        "m-b": {"env": {"ONLY_B": "1"}},
    })
    client = rt.openai()
    pids = []
    for model in ("m-a", "m-b", "m-a"):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content.startswith(f"I am {model}.")
        text = _dropin_text(sandbox, u.name)
        want = u.command(model, *(notes if model == "m-a" else ()))
        lines = text.splitlines()
        assert f"# llm-router-model: {model}" in lines, text
        i = lines.index("ExecStart=")  # reset first, then the new command
        assert lines[i + 1].startswith("ExecStart=") and lines[i + 1] != "ExecStart=", text
        # what really runs, exactly; then what the manager parsed (D-Bus shows `$` still escaped as
        # `$$`: systemd expands variables only when it execs) and what `systemctl show` prints
        assert sandbox.main_argv(u.name) == want
        assert sandbox.exec_start_argv(u.name) == [[w.replace("$", "$$") for w in want]]
        shown = sandbox.show(u.name, "ExecStart", "Environment", "MainPID", "ActiveState", "DropInPaths")
        assert f"path={want[0]} ;" in shown["ExecStart"], shown
        assert shown["ActiveState"] == "active"
        assert str(sandbox.dropin_dir(u.name) / DROPIN) in shown["DropInPaths"].split()
        env = sandbox.environment(u.name)
        if model == "m-a":
            assert env == ["PYTHONUNBUFFERED=1", "FAKE_ENV=value with spaces", "PCT=50%"], env
        else:
            assert env == ["PYTHONUNBUFFERED=1", "ONLY_B=1"], env
        pids.append(shown["MainPID"])
    assert len(set(pids)) == 3, pids  # a new process for every switch
    # the fake logged every awkward word back exactly as given
    inv = sandbox.unit_state(u.name)["InvocationID"]
    msgs = sandbox.journal_messages(f"_SYSTEMD_INVOCATION_ID={inv}")
    for word in awkward:
        assert f"fake_backend: note: {word!r}" in msgs, (word, msgs)
    assert rt.status()["switches"] == 3


def test_switch_across_backends_stops_the_other_unit(sandbox: Sandbox, units: Units, router: Router) -> None:
    x, y = units.fake("x"), units.fake("y")
    rt = router({"bx": x.backend(), "by": y.backend()}, {
        "on-x": {"backend": "bx", "command": x.command("on-x")},
        "on-y": {"backend": "by", "command": y.command("on-y")},
    })
    with rt.client() as c:
        assert answer(c.post("/v1/chat/completions", json=chat_body("on-x"))).startswith("I am on-x.")
        assert sandbox.active_state(x.name) == "active" and sandbox.active_state(y.name) == "inactive"
        assert answer(c.post("/v1/chat/completions", json=chat_body("on-y"))).startswith("I am on-y.")
        assert sandbox.active_state(x.name) == "inactive" and sandbox.active_state(y.name) == "active"
        st = rt.status()["units"]
        assert st[x.name]["active_state"] == "inactive" and st[y.name]["active_state"] == "active"
        assert answer(c.post("/v1/chat/completions", json=chat_body("on-x"))).startswith("I am on-x.")
        assert sandbox.active_state(x.name) == "active" and sandbox.active_state(y.name) == "inactive"
    assert rt.status()["switches"] == 3


TABBY_CONFIG = """\
# TabbyAPI configuration (hand-written; the router must keep every comment and line)
network:
  host: 127.0.0.1   # loopback only
  port: {port}

model:
  # Directory with the models
  model_dir: /opt/models
  model_name: {initial}    # the router rewrites only this value
  # max_seq_len: 32768
  cache_mode: Q4

logging:
  prompt: false
"""


def test_tabby_style_config_file_rewrite_keeps_comments(sandbox: Sandbox, units: Units, router: Router,
                                                        tmp_path: Path) -> None:
    cfg = tmp_path / "tabby" / "config.yml"
    cfg.parent.mkdir()
    u = units.fake("tabby", args=("--config", str(cfg)))  # the unit itself reads the model from the file
    cfg.write_text(TABBY_CONFIG.format(port=u.port, initial="Nothing-Yet"))
    original = cfg.read_text()
    rt = router({"tabby": u.backend(config_file=str(cfg))}, {
        "mistral-exl2": {"backend": "tabby", "model_name": "Mistral-Large-exl2"},
        "qwen-exl2": {"backend": "tabby", "model_name": "Qwen2.5-72B-exl2", "name": "Qwen 72B"},
    })
    with rt.client() as c:
        for model, name in (("mistral-exl2", "Mistral-Large-exl2"), ("qwen-exl2", "Qwen2.5-72B-exl2"),
                            ("mistral-exl2", "Mistral-Large-exl2")):
            assert answer(c.post("/v1/chat/completions", json=chat_body(model))).startswith(f"I am {name}.")
            text = cfg.read_text()
            want = original.replace("model_name: Nothing-Yet", f"model_name: {name}")
            assert text == want, f"expected only model_name changed:\n{text}"
    assert not (sandbox.dropin_dir(u.name) / DROPIN).exists()  # nothing to rewrite in the unit
    assert rt.status()["switches"] == 3


def test_adopts_a_running_unit_at_start(sandbox: Sandbox, units: Units, router: Router) -> None:
    rt, u = one_backend(units, router)
    with rt.client() as c:
        answer(c.post("/v1/chat/completions", json=chat_body("m-b")))
    before = sandbox.unit_state(u.name)
    rt.stop()  # SIGTERM: the backend keeps running (the exit code is test_sigterm_is_a_clean_exit's job)
    assert sandbox.unit_state(u.name) == before

    rt2 = router({"fake": u.backend()}, {m: {"backend": "fake", "command": u.command(m)}
                                        for m in ("m-a", "m-b")})
    st = rt2.status()
    assert st["active_model"] == "m-b" and st["switches"] == 0 and st["switch"] is None
    assert rt2.models()["m-b"]["state"] == "loaded"
    with rt2.client() as c:
        assert answer(c.post("/v1/chat/completions", json=chat_body("m-b"))).startswith("I am m-b.")
    after = sandbox.unit_state(u.name)
    assert (after["MainPID"], after["InvocationID"]) == (before["MainPID"], before["InvocationID"])
    assert rt2.status()["switches"] == 0


def test_sigterm_is_a_clean_exit(sandbox: Sandbox, units: Units, router: Router) -> None:
    rt, u = one_backend(units, router)
    with rt.client() as c:
        answer(c.post("/v1/chat/completions", json=chat_body("m-a")))
    code = rt.stop()
    assert sandbox.active_state(u.name) == "active"  # backends are left running
    assert '"stopped"' in rt.log_text(), rt.log_text()[-2000:]
    assert code == 0, f"exit code {code} after SIGTERM"


def test_adopts_a_unit_started_by_hand_from_its_dropin(sandbox: Sandbox, units: Units, router: Router) -> None:
    """A unit someone started with the router's drop-in in place (e.g. after a router crash)."""
    u = units.fake("manual")
    d = sandbox.dropin_dir(u.name)
    d.mkdir()
    argv = u.command("m-a")
    (d / DROPIN).write_text("# llm-router-model: m-a\n[Service]\nExecStart=\nExecStart=" + " ".join(argv) + "\n")
    sandbox.daemon_reload()
    sandbox.start_unit(u.name)
    before = sandbox.unit_state(u.name)
    rt = router({"fake": u.backend()}, {m: {"backend": "fake", "command": u.command(m)} for m in ("m-a", "m-b")})
    assert rt.status()["active_model"] == "m-a"
    with rt.client() as c:
        assert answer(c.post("/v1/chat/completions", json=chat_body("m-a"))).startswith("I am m-a.")
    assert sandbox.unit_state(u.name)["InvocationID"] == before["InvocationID"]
    assert rt.status()["switches"] == 0


@pytest.mark.timeout(120)
async def test_many_concurrent_requests_for_two_models(sandbox: Sandbox, units: Units, router: Router) -> None:
    rt, _u = one_backend(units, router, args=("--token-rate", "200", "--load-delay", "0.3"))
    n_per_model = 15

    async def one(c: httpx.AsyncClient, i: int) -> tuple[str, str]:
        model = ("m-a", "m-b")[i % 2]
        body = chat_body(model, f"request {i}", stream=(i % 3 == 0))
        if body["stream"]:
            text = ""
            async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        for ch in json.loads(line[6:]).get("choices") or []:
                            text += (ch.get("delta") or {}).get("content") or ""
            return model, text
        r = await c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return model, r.json()["choices"][0]["message"]["content"]

    async with httpx.AsyncClient(base_url=rt.url, timeout=60,
                                 limits=httpx.Limits(max_connections=100)) as c:
        results = await asyncio.wait_for(asyncio.gather(*(one(c, i) for i in range(2 * n_per_model))), 80)
    assert len(results) == 2 * n_per_model
    for model, text in results:
        assert f"I am {model}." in text, (model, text)
    st = rt.status()
    # requests queue per model: a handful of switches, not one per request
    assert 1 <= st["switches"] <= 4, st
    assert not st["queued"] or not any(st["queued"].values()), st


def test_no_switch_away_while_a_stream_is_running(sandbox: Sandbox, units: Units, router: Router) -> None:
    rt, _u = one_backend(units, router, per_model={"m-a": {"args": ["--token-rate", "10", "--tokens", "15"]}})
    with rt.client() as c:
        answer(c.post("/v1/chat/completions", json=chat_body("m-a")))  # load m-a first
    started = threading.Event()
    got: dict[str, Any] = {}

    def slow_stream() -> None:
        with httpx.Client(base_url=rt.url) as c:
            got["a"] = stream_request(c, "/v1/chat/completions", chat_body("m-a", stream=True),
                                      on_event=lambda e: started.set())
            got["a_end"] = time.monotonic()

    t = threading.Thread(target=slow_stream)
    t.start()
    assert started.wait(10)
    with rt.client() as c:
        text = answer(c.post("/v1/chat/completions", json=chat_body("m-b")))
        t_b = time.monotonic()
    t.join(30)
    assert not t.is_alive()
    res = got["a"]
    assert res.done and "I am m-a." in res.content and "token14" in res.content, res.content
    assert text.startswith("I am m-b.")
    assert t_b > got["a_end"], "m-b was answered before the m-a stream had finished"


def test_models_list_answers_during_a_switch(sandbox: Sandbox, units: Units, router: Router) -> None:
    rt, _u = one_backend(units, router, per_model={"m-a": {"args": ["--load-delay", "2.5"]}})
    result: dict[str, Any] = {}

    def request() -> None:
        with httpx.Client(base_url=rt.url, timeout=30) as c:
            result["r"] = c.post("/v1/chat/completions", json=chat_body("m-a"))

    t = threading.Thread(target=request)
    t.start()
    try:
        wait_until(lambda: rt.status()["switch"] is not None, timeout=5, step=0.02, what="switch in flight")
        seen_loading = 0
        while t.is_alive() and rt.status()["switch"] is not None:
            t0 = time.monotonic()
            r = httpx.get(rt.url + "/v1/models", timeout=3)
            took = time.monotonic() - t0
            assert r.status_code == 200 and took < 2.0, took  # not held up by the 2.5 s load
            states = {m["id"]: m["state"] for m in r.json()["data"]}
            if states["m-a"] == "loading":
                seen_loading += 1
                assert states["m-b"] == "unloaded"
                sw = rt.status()["switch"]
                if sw is not None:
                    assert sw["target"] == "m-a" and sw["elapsed"] >= 0 and sw["load_timeout"] > 0
                    assert isinstance(sw["phase"], str) and sw["phase"]
            time.sleep(0.1)  # pacing the poll loop, not waiting on a condition
        assert seen_loading >= 3, seen_loading
    finally:
        t.join(30)
    assert answer(result["r"]).startswith("I am m-a.")
    assert rt.models()["m-a"]["state"] == "loaded"


TOOLS = [{"type": "function", "function": {
    "name": f"tool_{i}", "description": f"Tool number {i} with a long description " + "x" * 40,
    "parameters": {"type": "object", "properties": {"q": {"type": "string", "description": "query"},
                                                    "n": {"type": "integer"}}, "required": ["q"]}}}
    for i in range(28)]


def test_open_webui_sequence_causes_exactly_one_switch(sandbox: Sandbox, units: Units, router: Router,
                                                       tmp_path: Path) -> None:
    rec = tmp_path / "record.jsonl"
    rt, _u = one_backend(units, router, args=("--record", str(rec), "--load-delay", "1"),
                        per_model={"m-a": {"upstream_model": "engine-name-a"}})
    with rt.client() as c:
        answer(c.post("/v1/chat/completions", json=chat_body("m-b")))  # something else is loaded
    switches0 = rt.status()["switches"]
    history = [{"role": "user", "content": "What is the capital of France?"}]
    results: dict[str, Any] = {}

    def title() -> None:
        with httpx.Client(base_url=rt.url, timeout=30) as c:
            results["title"] = c.post("/v1/chat/completions", json={
                "model": "m-a", "stream": False, "max_tokens": 50,
                "messages": [{"role": "user", "content": "### Task:\nGenerate a concise title ...\n" +
                              json.dumps(history)}]})

    t = threading.Thread(target=title)
    t.start()
    time.sleep(0.05)  # Open WebUI sends the chat ~50 ms after the title request (timing, not a wait)
    with rt.client() as c:
        chat = stream_request(c, "/v1/chat/completions", {
            "model": "m-a", "stream": True, "messages": history, "tools": TOOLS,
            "stream_options": {"include_usage": True}})
        t.join(30)
        assert chat.status == 200 and chat.done
        assert "I am m-a." in chat.content
        assert answer(results["title"]).startswith("I am m-a.")
        follow = c.post("/v1/chat/completions", json={"model": "m-a", "stream": False,
                        "messages": [{"role": "user", "content": "### Task:\nSuggest 3 follow-ups"}]})
        tags = c.post("/v1/chat/completions", json={"model": "m-a", "stream": False,
                      "messages": [{"role": "user", "content": "### Task:\nGenerate 1-3 tags"}]})
    assert answer(follow).startswith("I am m-a.") and answer(tags).startswith("I am m-a.")
    assert rt.status()["switches"] == switches0 + 1
    assert len(status_lines(chat, "event")) >= 2  # the stream saw the switch it joined (or started)

    bodies = [json.loads(line) for line in rec.read_text().splitlines()]
    upstream = [b["body"] for b in bodies if b["model_id"] == "m-a"]
    assert len(upstream) == 4, upstream
    assert all(b["model"] == "engine-name-a" for b in upstream)  # upstream_model rewrite
    streamed = [b for b in upstream if b.get("stream")]
    assert len(streamed) == 1
    assert streamed[0]["tools"] == TOOLS  # passed through untouched
    assert streamed[0]["stream_options"]["include_usage"] is True


def test_sighup_reloads_the_model_list(sandbox: Sandbox, units: Units, router: Router) -> None:
    rt, u = one_backend(units, router)
    with rt.client() as c:
        answer(c.post("/v1/chat/completions", json=chat_body("m-a")))
    models = {m: {"backend": "fake", "command": u.command(m)} for m in ("m-a", "m-b", "m-c")}
    rt.write_config({"fake": u.backend()}, models)
    rt.reload()
    wait_until(lambda: "m-c" in rt.models(), timeout=10, step=0.05, what="m-c listed after SIGHUP")
    assert rt.status()["active_model"] == "m-a"  # unchanged model stays loaded
    with rt.client() as c:
        assert answer(c.post("/v1/chat/completions", json=chat_body("m-c"))).startswith("I am m-c.")


def test_fake_argv_helper_matches_unit_paths() -> None:
    argv = fake_argv(1234, "x")
    assert Path(argv[0]).name.startswith("python") and argv[1].endswith("tests/fake_backend.py")


def test_switch_overhead_beyond_backend_startup(sandbox: Sandbox, units: Units, router: Router) -> None:
    """The issue's second number: router-added time in a switch beyond the engine's own start-up."""
    alone = []
    for _ in range(3):  # the engine by itself: process start to first healthy answer
        port = free_port()
        t0 = time.monotonic()
        p = subprocess.Popen([PYTHON, FAKE_BACKEND, "--port", str(port)], stdout=subprocess.DEVNULL)
        try:
            def healthy(port: int = port) -> bool:
                try:
                    return httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(healthy, timeout=10, step=0.005)
            alone.append(time.monotonic() - t0)
        finally:
            p.terminate()
            p.wait(5)
    rt, _ = one_backend(units, router)
    took, wall = [], []
    with rt.client() as c:
        for model in ("m-a", "m-b", "m-a", "m-b", "m-a"):
            t0 = time.monotonic()
            answer(c.post("/v1/chat/completions", json=chat_body(model)))
            wall.append(time.monotonic() - t0)
            took.append(float(rt.status()["last_switch"]["took"]))
    engine = statistics.median(alone)
    print(f"\nengine alone to healthy: median {engine:.3f}s {[round(x, 3) for x in alone]}"
          f"\nrouter switch took:      median {statistics.median(took):.3f}s {[round(x, 3) for x in took]}"
          f"\nrequest wall time:       median {statistics.median(wall):.3f}s"
          f"\nrouter-added (median):   {statistics.median(took) - engine:.3f}s "
          f"(the router polls health every {TEST_SWITCH['health_interval']}s in tests)")
    assert statistics.median(took) - engine < 1.0


def test_two_open_webui_users_on_two_models_cost_at_most_two_switches(sandbox: Sandbox, units: Units,
                                                                      router: Router) -> None:
    """Each user: title + streamed chat together, then follow-up and tags one after the other (what Open
    WebUI sends for one typed message). With linger, the follow-ups find their model still loaded."""
    rt, _u = one_backend(units, router, args=("--token-rate", "100", "--tokens", "20", "--load-delay", "0.3"),
                        switch={"linger": None, "max_wait": None})  # the router's defaults: 2 s and 60 s
    errors: list[str] = []

    def user(model: str) -> None:
        try:
            with httpx.Client(base_url=rt.url, timeout=60) as c:
                out: dict[str, Any] = {}

                def title() -> None:
                    out["title"] = httpx.post(rt.url + "/v1/chat/completions", timeout=60, json={
                        "model": model, "messages": [{"role": "user", "content": "### Task:\nGenerate a title"}]})

                t = threading.Thread(target=title)
                t.start()
                chat = stream_request(c, "/v1/chat/completions", chat_body(model, "hello", stream=True))
                t.join(60)
                assert chat.done and f"I am {model}." in chat.content, chat.content
                assert answer(out["title"]).startswith(f"I am {model}.")
                for task in ("Suggest 3 follow-ups", "Generate 1-3 tags"):
                    r = c.post("/v1/chat/completions", json={
                        "model": model, "messages": [{"role": "user", "content": f"### Task:\n{task}"}]})
                    assert answer(r).startswith(f"I am {model}.")
        except Exception as e:  # reported below, with the other user's outcome
            errors.append(f"{model}: {e!r}")

    threads = [threading.Thread(target=user, args=(m,)) for m in ("m-a", "m-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(80)
    assert not errors, errors
    assert rt.status()["switches"] <= 2, rt.status()
