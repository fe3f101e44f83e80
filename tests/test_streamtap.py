"""Stream tap and chunk formatting: bytes pass through untouched; stats and usage appear once."""

from __future__ import annotations

import json

from router.chunks import ChunkWriter, strip_history, strip_own_lines
from router.streamtap import StreamTap


def chunk(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


ROLE = chunk({"id": "up-1", "object": "chat.completion.chunk", "choices": [
    {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
TOKENS = [chunk({"id": "up-1", "object": "chat.completion.chunk", "choices": [
    {"index": 0, "delta": {"content": f" w{i}"}, "finish_reason": None}], "usage": None}) for i in range(5)]
FINISH = chunk({"id": "up-1", "object": "chat.completion.chunk", "choices": [
    {"index": 0, "delta": {}, "finish_reason": "stop"}]})
USAGE = chunk({"id": "up-1", "object": "chat.completion.chunk", "choices": [],
               "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
               "timings": {"predicted_n": 5, "predicted_ms": 250.0, "predicted_per_second": 20.0}})
DONE = b"data: [DONE]\n\n"
STREAM = ROLE + b"".join(TOKENS) + FINISH + USAGE + DONE


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        self.t += 0.1
        return self.t


def run(tap: StreamTap, pieces: list[bytes]) -> bytes:
    out = b"".join(tap.feed(p) for p in pieces)
    return out + tap.finish()


def events(raw: bytes) -> list[dict | str]:
    out: list[dict | str] = []
    for block in raw.split(b"\n\n"):
        if block.startswith(b"data: "):
            data = block[6:].decode()
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_without_stats_bytes_pass_through_unchanged_whatever_the_cut():
    for size in (1, 7, 64, len(STREAM)):
        tap = StreamTap(ChunkWriter("m"), stats=False, client_usage=False, rewrite_id=False)
        pieces = [STREAM[i:i + size] for i in range(0, len(STREAM), size)]
        assert run(tap, pieces) == STREAM


def test_token_chunks_are_forwarded_byte_for_byte_with_stats_on():
    tap = StreamTap(ChunkWriter("m"), stats=True, client_usage=False, rewrite_id=False, clock=Clock())
    out = run(tap, [ROLE, *TOKENS, FINISH, USAGE, DONE])
    assert out.startswith(ROLE + b"".join(TOKENS) + FINISH)


def data(evs: list[dict | str]) -> list[dict]:
    return [e for e in evs if isinstance(e, dict)]


def after_finish(evs: list[dict | str]) -> list[dict]:
    """The chunks after the first one that finished a choice."""
    chunks = data(evs)
    first = next(i for i, e in enumerate(chunks) if any(c.get("finish_reason") for c in e.get("choices") or []))
    return chunks[first + 1:]


def texts(evs: list[dict | str]) -> str:
    return "".join((c.get("delta") or {}).get("content") or "" for e in data(evs) for c in e.get("choices") or [])


def test_stats_are_the_final_status_event_with_usage_and_timings_not_content():
    tap = StreamTap(ChunkWriter("m"), stats=True, client_usage=False, rewrite_id=False, clock=Clock(),
                    display="Tiny A")
    evs = events(run(tap, [STREAM]))
    assert evs[-1] == "[DONE]"
    assert "⚡" not in texts(evs) and texts(evs) == " w0 w1 w2 w3 w4"
    last = evs[-2]
    assert isinstance(last, dict) and last["choices"] == []
    assert last["event"] == {"type": "status", "data": {
        "description": "✅ Tiny A · ⚡ 20.0 tok/s · 5 tokens in 0.2 s", "done": True}}
    assert last["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert last["timings"]["predicted_per_second"] == 20.0
    assert [e for e in data(evs) if e.get("usage")] == [last]  # usage once (Open WebUI adds up every usage)
    assert [e for e in data(evs) if e.get("timings")] == [last]  # timings too: it counts them as usage
    assert tap.summary == {"tokens": 5, "seconds": 0.25, "tok_per_s": 20.0}


def test_nothing_with_a_null_finish_reason_follows_the_finishing_chunk():
    for channel in ("event", "content"):
        for client_usage in (False, True):
            tap = StreamTap(ChunkWriter("m"), stats=True, client_usage=client_usage, rewrite_id=False,
                            clock=Clock(), stats_channel=channel)
            rest = after_finish(events(run(tap, [STREAM])))
            assert all(e["choices"] == [] for e in rest), (channel, client_usage, rest)


def test_a_wait_for_the_model_folds_into_the_final_status():
    tap = StreamTap(ChunkWriter("m"), stats=True, client_usage=False, rewrite_id=True, clock=Clock(),
                    display="Tiny A", took=41.3)
    last = data(events(run(tap, [STREAM])))[-1]
    assert last["event"]["data"]["description"] == "✅ Tiny A ready (took 41 s) · ⚡ 20.0 tok/s · 5 tokens in 0.2 s"


def test_client_asking_for_usage_gets_it_once_on_the_last_chunk():
    tap = StreamTap(ChunkWriter("m"), stats=True, client_usage=True, rewrite_id=False, clock=Clock())
    evs = events(run(tap, [STREAM]))
    engine_usage = json.loads(USAGE[6:-2])
    [last] = [e for e in data(evs) if e.get("usage")]
    assert last is data(evs)[-1] and last["choices"] == [] and last["event"]["data"]["done"] is True
    assert {k: v for k, v in last.items() if k != "event"} == engine_usage  # the engine's own chunk, plus the event


def test_an_engine_with_usage_but_no_timings_gets_llama_cpp_style_timings():
    vllm_usage = chunk({"id": "up-1", "object": "chat.completion.chunk", "choices": [],
                        "usage": {"prompt_tokens": 30, "completion_tokens": 5, "total_tokens": 35}})
    clock = Clock()
    tap = StreamTap(ChunkWriter("m"), stats=True, client_usage=False, rewrite_id=False, clock=clock,
                    sent_at=99.9)  # the request went out 0.2 s before the first piece (clock 100.1)
    last = data(events(run(tap, [ROLE, *TOKENS, FINISH, vllm_usage, DONE])))[-1]
    timings = last["timings"]
    assert list(timings) == ["prompt_n", "prompt_ms", "prompt_per_token_ms", "prompt_per_second", "predicted_n",
                             "predicted_ms", "predicted_per_token_ms", "predicted_per_second"]
    assert timings["prompt_n"] == 30 and timings["predicted_n"] == 5
    assert abs(timings["prompt_ms"] - 200) < 1 and abs(timings["prompt_per_second"] - 150) < 1
    assert timings["predicted_per_second"] == round(5 / (timings["predicted_ms"] / 1000), 3)
    assert last["usage"]["completion_tokens"] == 5


def test_engine_without_usage_gets_a_counted_estimate_and_no_usage():
    tap = StreamTap(ChunkWriter("m"), stats=True, client_usage=False, rewrite_id=False, clock=Clock())
    evs = events(run(tap, [ROLE, *TOKENS, FINISH, DONE]))
    last = evs[-2]
    assert isinstance(last, dict) and "· 5 tokens in" in last["event"]["data"]["description"]
    assert "usage" not in last and "timings" not in last


def test_stats_content_puts_the_line_into_the_finishing_chunk():
    tap = StreamTap(ChunkWriter("m"), stats=True, client_usage=False, rewrite_id=False, clock=Clock(),
                    stats_channel="content")
    out = run(tap, [ROLE, *TOKENS, FINISH, USAGE, DONE])
    assert out.startswith(ROLE + b"".join(TOKENS))  # the tokens byte for byte
    evs = events(out)
    finishing = data(evs)[-1]
    assert finishing["choices"][0]["finish_reason"] == "stop"
    assert finishing["choices"][0]["delta"]["content"] == "\n\n⚡ 20.0 tok/s (5 tokens in 0.2s)"
    assert finishing["usage"]["completion_tokens"] == 5 and finishing["timings"]["predicted_n"] == 5
    assert sum(1 for e in data(evs) if e.get("usage")) == 1 and not any("event" in e for e in data(evs))


def test_stats_content_keeps_the_last_token_of_a_finishing_chunk_before_the_line():
    last_token = chunk({"id": "up-1", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"content": "."}, "finish_reason": "stop"}]})
    for client_usage in (False, True):
        tap = StreamTap(ChunkWriter("m"), stats=True, client_usage=client_usage, rewrite_id=False, clock=Clock(),
                        stats_channel="content")
        evs = events(run(tap, [ROLE, *TOKENS, last_token, USAGE, DONE]))
        assert texts(evs) == " w0 w1 w2 w3 w4.\n\n⚡ 20.0 tok/s (5 tokens in 0.2s)"
        usage = [e for e in data(evs) if e.get("usage")]
        assert len(usage) == 1 and (usage[0]["choices"] == []) == client_usage  # the engine's own when asked


def test_id_rewrite_gives_the_whole_response_one_id():
    writer = ChunkWriter("m")
    tap = StreamTap(writer, stats=True, client_usage=False, rewrite_id=True, clock=Clock())
    ids = {e["id"] for e in events(run(tap, [STREAM])) if isinstance(e, dict)}
    assert ids == {writer.id}


def test_text_completion_chunks_made_by_the_router_keep_the_cmpl_prefix():
    text = ChunkWriter("m", completions=True)
    assert text.id.startswith("cmpl-") and ChunkWriter("m").id.startswith("chatcmpl-")
    for raw in (text.status("z"), text.error("x", "backend_error")):
        obj = json.loads(raw[6:])
        assert obj["id"] == text.id and obj["object"] == "text_completion"


def test_status_chunks_per_channel():
    ev = json.loads(ChunkWriter("m", "event").status("hello", done=True)[6:])
    assert ev["choices"] == [] and ev["event"] == {"type": "status", "data": {"description": "hello", "done": True}}
    writer = ChunkWriter("m", "reasoning")
    first, second = (json.loads(writer.status(t)[6:]) for t in ("x", "y"))
    assert first["choices"][0]["delta"] == {"role": "assistant", "reasoning_content": "x\n"}
    assert second["choices"][0]["delta"] == {"reasoning_content": "y\n"} and first["id"] == second["id"]
    assert json.loads(ChunkWriter("m", "content").status("z")[6:])["choices"][0]["delta"]["content"] == "z\n"
    assert ChunkWriter("m", "none").status("z") == b""
    text = json.loads(ChunkWriter("m", "content", completions=True).status("z")[6:])
    assert text["object"] == "text_completion" and text["choices"] == [] and text["event"]["data"]["description"] == "z"


def test_own_lines_are_stripped_from_history_and_nothing_else():
    answer = ("🔄 Switching to Big…\n⏰ Waking Big…\n⏰ Waking Big… 3s\n"
              "⏳ Loading Big… 10s/180s\n✅ Big ready (took 12s)\n"
              "⏳ Waiting for Small (2 requests ahead)…\n⏳ Waiting for Small (1 request ahead)…\n"
              "✅ Big ready (took 41 s)\n"
              "The answer is 42.\n⏳ not ours\n\n⚡ 41.2 tok/s (512 tokens in 12.4s)")
    assert strip_own_lines(answer) == "The answer is 42.\n⏳ not ours"
    messages = [{"role": "user", "content": "🔄 Switching to Big…"},
                {"role": "assistant", "content": answer},
                {"role": "assistant", "content": [{"type": "text", "text": "❌ Big failed to load: x\nok"}]}]
    assert strip_history(messages) is True
    assert messages[0]["content"] == "🔄 Switching to Big…"  # users' own text is never touched
    assert messages[1]["content"] == "The answer is 42.\n⏳ not ours"
    assert messages[2]["content"][0]["text"] == "ok"
    assert strip_history(messages) is False


def test_direct_stream_stats_chunk_takes_the_engine_id():
    tap = StreamTap(ChunkWriter("m"), stats=True, client_usage=False, rewrite_id=False, clock=Clock())
    assert {e["id"] for e in events(run(tap, [STREAM])) if isinstance(e, dict)} == {"up-1"}


def test_role_is_dropped_from_the_engine_when_the_router_already_sent_it():
    tap = StreamTap(ChunkWriter("m"), stats=False, client_usage=False, rewrite_id=True, drop_role=True)
    evs = [e for e in events(run(tap, [STREAM[:40], STREAM[40:]])) if isinstance(e, dict)]
    assert evs[0]["choices"][0]["delta"] == {"content": ""}
    assert sum("role" in json.dumps(e) for e in evs) == 0 and len(evs) == 8


def test_usage_riding_on_a_content_chunk_is_not_reported_again():
    finish_with_usage = chunk({"id": "up-1", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}})
    tap = StreamTap(ChunkWriter("m"), stats=True, client_usage=False, rewrite_id=False, clock=Clock())
    evs = [e for e in events(run(tap, [ROLE, *TOKENS, finish_with_usage, DONE])) if isinstance(e, dict)]
    assert sum(1 for e in evs if e.get("usage")) == 1
    assert "· 5 tokens in" in evs[-1]["event"]["data"]["description"]
    assert "usage" not in evs[-1] and "timings" not in evs[-1]


def test_prompt_tokens_come_from_the_engines_usage_once_it_went_by():
    tap = StreamTap(ChunkWriter("m"), stats=True, client_usage=False, rewrite_id=False, clock=Clock())
    run(tap, [ROLE, *TOKENS, FINISH])
    assert tap.prompt_tokens is None
    run(tap, [USAGE, DONE])
    assert tap.prompt_tokens == 3 and tap.summary is not None and tap.summary["tokens"] == 5
