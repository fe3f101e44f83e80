"""End-to-end test with a real engine: llama.cpp's server switched between two tiny GGUF models.

The models are generated into a tmp dir at test time; one systemd unit serves them (xllamacpp)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from sandbox import PYTHON, RouterHandle, Sandbox, Units, exec_line, free_port, stream_request

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(importlib.util.find_spec("xllamacpp") is None or importlib.util.find_spec("gguf") is None,
                       reason="needs the demo extra (xllamacpp, gguf, numpy): pip install -e '.[demo]'"),
]

Router = Callable[..., RouterHandle]


def test_switch_between_two_tiny_llama_models(sandbox: Sandbox, units: Units, router: Router,
                                              tmp_path: Path) -> None:
    from router.demo.tiny_gguf import make_tiny_gguf

    a, b = tmp_path / "tiny-a.gguf", tmp_path / "tiny-b.gguf"
    make_tiny_gguf(a, seed=1)
    make_tiny_gguf(b, seed=2)
    port = free_port()

    def command(model: Path, alias: str) -> list[str]:
        return [PYTHON, "-m", "router.demo.llama_server", "-m", str(model), "--host", "127.0.0.1",
                "--port", str(port), "--alias", alias, "--ctx-size", "512", "--n-predict", "16"]

    unit = units.name("llama")
    units.write(unit, "[Unit]\nDescription=llama.cpp test engine\n[Service]\nType=exec\n"
                f"ExecStart={exec_line(command(a, 'placeholder'))}\nWorkingDirectory={tmp_path}\n"
                "TimeoutStopSec=5\n")
    rt = router({"llamacpp": {"unit": unit, "url": f"http://127.0.0.1:{port}", "health": "/health"}}, {
        "tiny-a": {"backend": "llamacpp", "command": command(a, "tiny-a")},
        "tiny-b": {"backend": "llamacpp", "command": command(b, "tiny-b"), "name": "Tiny B"},
    }, stats=True)

    def ask(model: str) -> tuple[str, dict[str, object]]:
        with httpx.Client(base_url=rt.url, timeout=60) as c:
            res = stream_request(c, "/v1/chat/completions", {
                "model": model, "stream": True, "max_tokens": 12, "temperature": 0, "seed": 1,
                "messages": [{"role": "user", "content": "Say something."}],
                "stream_options": {"include_usage": True}}, timeout=60)
        assert res.status == 200 and res.done, res.body
        assert len(res.usage_chunks) == 1, res.usage_chunks
        answer = "".join(
            (ch.get("delta") or {}).get("content") or ""
            for c in res.chunks if "event" not in c for ch in c.get("choices") or [])
        return answer, res.usage_chunks[0]["usage"]

    first_a, usage = ask("tiny-a")
    assert usage["completion_tokens"] > 0  # type: ignore[operator]
    assert rt.status()["active_model"] == "tiny-a"
    first_b, _ = ask("tiny-b")
    assert rt.status()["active_model"] == "tiny-b"
    assert sandbox.main_argv(unit) == command(b, "tiny-b")
    again_a, _ = ask("tiny-a")
    assert rt.status()["switches"] == 3

    def words(text: str) -> str:  # the model's words, without the router's ⚡ stats line
        return "\n".join(ln for ln in text.split("\n") if not ln.startswith("⚡")).strip()

    assert words(first_a) and words(first_b)
    assert words(first_a) == words(again_a), (first_a, again_a)  # greedy: same model, same answer
    assert words(first_a) != words(first_b), (first_a, first_b)  # different seeds, different "models"
    models = httpx.get(rt.url + "/v1/models", timeout=5).json()["data"]
    assert {m["id"]: m["state"] for m in models} == {"tiny-a": "loaded", "tiny-b": "unloaded"}
    r = httpx.post(rt.url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny-a", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
