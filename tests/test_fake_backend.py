"""The fake engine itself (tests/fake_backend.py), run as a plain subprocess: no systemd, no router."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from sandbox import FAKE_BACKEND, PYTHON, chat_body, free_port, stream_request, wait_until

pytestmark = pytest.mark.timeout(30)


class Fake:
    def __init__(self, proc: subprocess.Popen[str], port: int) -> None:
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"

    def wait_listening(self, timeout: float = 10.0) -> None:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fake exited {self.proc.returncode}: {self.proc.communicate()}")
            try:
                httpx.get(self.url + "/health", timeout=0.5)
                return True
            except httpx.TransportError:
                return False

        wait_until(up, timeout=timeout, what="fake listening")


@pytest.fixture
def fake() -> Iterator[Callable[..., Fake]]:
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str, wait: bool = True) -> Fake:
        port = free_port()
        proc = subprocess.Popen([PYTHON, FAKE_BACKEND, "--port", str(port), *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        f = Fake(proc, port)
        if wait:
            f.wait_listening()
        return f

    yield start
    for p in procs:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def test_health_models_and_non_streaming_answer(fake: Callable[..., Fake]) -> None:
    f = fake("--model-id", "alpha", "--tokens", "5")
    assert httpx.get(f.url + "/health").json()["status"] == "ok"
    assert [m["id"] for m in httpx.get(f.url + "/v1/models").json()["data"]] == ["alpha"]
    r = httpx.post(f.url + "/v1/chat/completions", json=chat_body("whatever", "one two three"))
    body = r.json()
    assert r.status_code == 200
    assert body["object"] == "chat.completion"
    assert body["model"] == "whatever"  # echoes the requested name, like real engines
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "I am alpha. token1 token2 token3 token4"}
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    r = httpx.post(f.url + "/v1/completions", json={"model": "x", "prompt": "hi", "max_tokens": 2})
    assert r.json()["choices"][0]["text"] == "I am alpha. token1"
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_streaming_shape_with_and_without_include_usage(fake: Callable[..., Fake]) -> None:
    f = fake("--model-id", "beta", "--tokens", "4")
    with httpx.Client() as c:
        res = stream_request(c, f.url + "/v1/chat/completions",
                             chat_body("m", stream=True, stream_options={"include_usage": True}))
        assert res.status == 200 and res.done
        chunks = res.chunks
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert len({c["id"] for c in chunks}) == 1
        assert res.content == "I am beta. token1 token2 token3"
        finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == "stop"
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
        assert len(res.usage_chunks) == 1

        res = stream_request(c, f.url + "/v1/chat/completions", chat_body("m", stream=True))
        assert res.done and not res.usage_chunks

        res = stream_request(c, f.url + "/v1/completions", {"model": "m", "prompt": "p", "stream": True})
        assert res.done and res.chunks[0]["object"] == "text_completion"
        assert res.content == "I am beta. token1 token2 token3"


def test_no_usage_and_token_rate(fake: Callable[..., Fake]) -> None:
    f = fake("--model-id", "g", "--tokens", "5", "--token-rate", "50", "--no-usage")
    with httpx.Client() as c:
        t0 = time.monotonic()
        res = stream_request(c, f.url + "/v1/chat/completions",
                             chat_body("m", stream=True, stream_options={"include_usage": True}))
        took = time.monotonic() - t0
    assert res.done and not res.usage_chunks
    assert 0.08 <= took < 5, took  # 5 tokens at 50/s = 0.1 s
    assert "usage" not in httpx.post(f.url + "/v1/chat/completions", json=chat_body("m")).json()


def test_load_delay_then_healthy(fake: Callable[..., Fake]) -> None:
    f = fake("--model-id", "slow", "--load-delay", "3")
    assert httpx.get(f.url + "/health").status_code == 503
    assert httpx.post(f.url + "/v1/chat/completions", json=chat_body("m")).status_code == 503
    wait_until(lambda: httpx.get(f.url + "/health").status_code == 200, timeout=15, step=0.05)


def test_never_healthy(fake: Callable[..., Fake]) -> None:
    f = fake("--never-healthy")
    time.sleep(0.2)  # nothing to wait on: it must still say 503 after a while
    assert httpx.get(f.url + "/health").status_code == 503


def test_exit_code_at_once(fake: Callable[..., Fake]) -> None:
    f = fake("--model-id", "broken", "--exit-code", "7", wait=False)
    _, errs = f.proc.communicate(timeout=10)
    assert f.proc.returncode == 7
    assert "fake_backend: cannot load weights for broken" in errs


def test_exit_after(fake: Callable[..., Fake]) -> None:
    f = fake("--model-id", "dies", "--exit-after", "2", "--exit-code", "4")
    assert f.proc.wait(10) == 4


def test_crash_mid_stream(fake: Callable[..., Fake]) -> None:
    f = fake("--model-id", "crashy", "--crash-mid-stream", "2")
    with httpx.Client() as c, pytest.raises(httpx.HTTPError):
        stream_request(c, f.url + "/v1/chat/completions", chat_body("m", stream=True))
    assert f.proc.wait(10) == 3
    assert "crashing mid-stream after 2 chunks" in f.proc.communicate()[1]


def test_record_and_config_file(fake: Callable[..., Fake], tmp_path: Path) -> None:
    cfg = tmp_path / "tabby.yml"
    cfg.write_text("# TabbyAPI config\nnetwork:\n  port: 5000\nmodel:\n  # the model dir\n"
                   "  model_name: Mistral-exl2\n")
    rec = tmp_path / "rec.jsonl"
    f = fake("--config", str(cfg), "--record", str(rec))
    body = chat_body("up", "hi", tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    r = httpx.post(f.url + "/v1/chat/completions", json=body)
    assert r.json()["choices"][0]["message"]["content"].startswith("I am Mistral-exl2.")
    lines = [json.loads(x) for x in rec.read_text().splitlines()]
    assert lines == [{"path": "/v1/chat/completions", "model_id": "Mistral-exl2", "body": body}]


def test_bad_requests(fake: Callable[..., Fake]) -> None:
    f = fake()
    assert httpx.post(f.url + "/v1/chat/completions", content=b"{nope").status_code == 400
    assert httpx.post(f.url + "/v1/chat/completions", json={"model": "m"}).status_code == 400
    assert httpx.get(f.url + "/nowhere").status_code == 404


def test_ready_line_and_sigterm(fake: Callable[..., Fake]) -> None:
    f = fake("--model-id", "m1")
    f.proc.terminate()
    out, _ = f.proc.communicate(timeout=10)
    assert f.proc.returncode == 0
    assert "fake_backend: ready on http://127.0.0.1:" in out and "SIGTERM" in out


def test_vllm_sleep_refuses_completions_and_wakes(fake: Callable[..., Fake], tmp_path: Path) -> None:
    f = fake("--model-id", "v", "--vram-gb", "40", "--gpu", "1", "--gpu-memory-dir", str(tmp_path))
    mem = tmp_path / f"{f.proc.pid}.json"
    assert json.loads(mem.read_text()) == {"pid": f.proc.pid, "gpu": 1, "model_id": "v", "sleeping": False,
                                           "used_bytes": 40 * 2**30}
    assert httpx.get(f.url + "/is_sleeping").json() == {"is_sleeping": False}
    r = httpx.post(f.url + "/sleep?level=1")
    assert (r.status_code, r.content) == (200, b"")  # vLLM answers an empty 200
    assert httpx.get(f.url + "/is_sleeping").json() == {"is_sleeping": True}
    assert json.loads(mem.read_text())["used_bytes"] == 0
    assert httpx.get(f.url + "/health").status_code == 200  # vLLM's /health does not tell a sleeper
    for path, body in (("/v1/chat/completions", chat_body("m")), ("/v1/embeddings", {"model": "m", "input": "x"})):
        r = httpx.post(f.url + path, json=body)
        assert r.status_code == 503
        assert r.json()["error"]["message"] == "Engine is sleeping. Call /wake_up to resume."
    state = httpx.get(f.url + "/fake/state").json()
    assert (state["sleeping"], state["level"], state["gpu_memory_gb"], state["refused_while_asleep"]) == (True, 1, 0, 2)
    assert httpx.post(f.url + "/sleep?level=1").status_code == 200  # asleep already: a no-op
    assert httpx.post(f.url + "/wake_up").status_code == 200
    assert httpx.get(f.url + "/is_sleeping").json() == {"is_sleeping": False}
    assert httpx.post(f.url + "/v1/chat/completions", json=chat_body("m")).status_code == 200
    state = httpx.get(f.url + "/fake/state").json()
    assert (state["sleeps"], state["wakes"], state["gpu_memory_gb"]) == (1, 1, 40)
    assert httpx.get(f.url + "/sleep").status_code == 405
    f.proc.terminate()
    f.proc.wait(10)
    assert not mem.exists()  # removed at exit


def test_sglang_release_and_resume(fake: Callable[..., Fake]) -> None:
    f = fake("--model-id", "s")
    r = httpx.post(f.url + "/release_memory_occupation", json={})
    assert r.status_code == 200 and r.json()["success"] is True
    assert httpx.post(f.url + "/v1/completions", json={"model": "m", "prompt": "p"}).status_code == 503
    assert httpx.post(f.url + "/resume_memory_occupation", json={}).status_code == 200
    assert httpx.post(f.url + "/v1/completions", json={"model": "m", "prompt": "p"}).status_code == 200


def test_sleep_and_wake_take_their_time(fake: Callable[..., Fake]) -> None:
    f = fake("--sleep-time", "0.2", "--wake-time", "0.4")
    t0 = time.monotonic()
    httpx.post(f.url + "/sleep?level=1")
    took_sleep = time.monotonic() - t0
    t0 = time.monotonic()
    httpx.post(f.url + "/wake_up")
    took_wake = time.monotonic() - t0
    state = httpx.get(f.url + "/fake/state").json()
    assert took_sleep >= 0.2 and took_wake >= 0.4
    assert 0.2 <= state["last_sleep_seconds"] <= took_sleep and 0.4 <= state["last_wake_seconds"] <= took_wake


def test_a_failed_wake_leaves_it_asleep(fake: Callable[..., Fake], tmp_path: Path) -> None:
    flag = tmp_path / "fail"
    flag.touch()
    f = fake("--fail-wake-if", str(flag))
    httpx.post(f.url + "/sleep?level=1")
    r = httpx.post(f.url + "/wake_up")
    assert r.status_code == 500 and "out of memory" in r.json()["error"]["message"]
    assert httpx.get(f.url + "/is_sleeping").json() == {"is_sleeping": True}
    r = httpx.post(f.url + "/resume_memory_occupation", json={})
    assert r.status_code == 400 and r.json()["success"] is False
    flag.unlink()
    assert httpx.post(f.url + "/wake_up").status_code == 200
    assert httpx.get(f.url + "/fake/state").json()["failed_wakes"] == 2
    g = fake("--fail-wake")
    httpx.post(g.url + "/release_memory_occupation", json={})
    assert httpx.post(g.url + "/resume_memory_occupation", json={}).status_code == 400


def test_no_sleep_endpoints(fake: Callable[..., Fake]) -> None:
    f = fake("--no-sleep")
    assert httpx.post(f.url + "/sleep?level=1").status_code == 404
    assert httpx.get(f.url + "/is_sleeping").status_code == 404


def test_startup_seconds(fake: Callable[..., Fake]) -> None:
    state = httpx.get(fake().url + "/fake/state").json()
    assert 0 < state["startup_seconds"] < 20 and state["load_seconds"] == 0
