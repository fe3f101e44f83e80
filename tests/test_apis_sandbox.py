"""Anthropic's /v1/messages through a running router on real systemd: a request for an unloaded model
switches the unit and streams, the status as a thinking block (asked for) or pings (not asked for)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sandbox import RouterHandle, Sandbox, Units, chat_body, one_backend, stream_request

pytestmark = pytest.mark.timeout(90)

Router = Callable[..., RouterHandle]


def messages(model: str, thinking: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": 64, "stream": True,
                            "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]}
    if thinking:
        body["thinking"] = {"type": "enabled", "budget_tokens": 512}
    return body


def blocks(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The content blocks a client builds from the events (content[index], in order)."""
    out: list[dict[str, Any]] = []
    for c in chunks:
        if c["type"] == "content_block_start":
            assert c["index"] == len(out), (c, out)
            out.append(dict(c["content_block"]))
        elif c["type"] == "content_block_delta":
            delta, block = c["delta"], out[c["index"]]
            for key in ("text", "thinking", "signature"):
                if key in delta:
                    block[key] = block.get(key, "") + delta[key]
    return out


def test_a_messages_request_for_an_unloaded_model_switches_and_streams(sandbox: Sandbox, units: Units,
                                                                      router: Router) -> None:
    rt, _ = one_backend(units, router, per_model={"m-b": {"args": ["--load-delay", "1.2"], "name": "Model B"}},
                        switch={"status_every": 1, "keepalive_every": 0.3})
    with rt.client() as c:
        assert c.post("/v1/chat/completions", json=chat_body("m-a")).status_code == 200  # m-a is loaded
        res = stream_request(c, "/v1/messages", messages("m-b", thinking=True))
        assert res.status == 200, res.body
        types = [ch["type"] for ch in res.chunks]
        assert types[0] == "message_start" and types.count("message_start") == 1 and types[-1] == "message_stop"
        status, engine_thinking, text = blocks(res.chunks)
        lines = status["thinking"].splitlines()
        assert lines[0] == "🔄 Switching to Model B…" and lines[-1].startswith("✅ Model B ready")
        assert any(line.startswith("⏳ Loading Model B…") for line in lines), lines
        assert status["signature"] == "llm-router-status" and engine_thinking["type"] == "thinking"
        assert text["text"].startswith("I am m-b.")
        assert rt.models()["m-b"]["state"] == "loaded"

        back = stream_request(c, "/v1/messages", messages("m-a", thinking=False))  # switch back, no thinking
        types = [ch["type"] for ch in back.chunks]
        first = types.index("message_start")
        assert first >= 1 and set(types[:first]) == {"ping"}, types
        [only] = blocks(back.chunks)
        assert only["text"].startswith("I am m-a.")
