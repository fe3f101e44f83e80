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


def test_stats_line_carries_usage_and_timings_once_when_client_did_not_ask():
    tap = StreamTap(ChunkWriter("m"), stats=True, client_usage=False, rewrite_id=False, clock=Clock())
    evs = events(run(tap, [STREAM]))
    assert evs[-1] == "[DONE]"
    with_usage = [e for e in evs if isinstance(e, dict) and e.get("usage")]
    assert len(with_usage) == 1
    last = with_usage[0]
    assert last["choices"][0]["delta"]["content"] == "\n\n⚡ 20.0 tok/s (5 tokens in 0.2s)"
    assert last["timings"]["predicted_per_second"] == 20.0
    assert tap.summary == {"tokens": 5, "seconds": 0.25, "tok_per_s": 20.0}


def test_client_asking_for_usage_gets_the_engine_usage_chunk_after_the_stats_line():
    tap = StreamTap(ChunkWriter("m"), stats=True, client_usage=True, rewrite_id=False, clock=Clock())
    evs = events(run(tap, [STREAM]))
    assert [e for e in evs if isinstance(e, dict) and e.get("usage")] == [json.loads(USAGE[6:-2])]
    stats = evs[-3]
    assert isinstance(stats, dict) and "usage" not in stats and "⚡" in stats["choices"][0]["delta"]["content"]


def test_engine_without_usage_gets_a_counted_estimate():
    tap = StreamTap(ChunkWriter("m"), stats=True, client_usage=False, rewrite_id=False, clock=Clock())
    evs = events(run(tap, [ROLE, *TOKENS, FINISH, DONE]))
    stats = evs[-2]
    assert isinstance(stats, dict) and "(5 tokens in" in stats["choices"][0]["delta"]["content"]
    assert "usage" not in stats


def test_id_rewrite_gives_the_whole_response_one_id():
    writer = ChunkWriter("m")
    tap = StreamTap(writer, stats=True, client_usage=False, rewrite_id=True, clock=Clock())
    ids = {e["id"] for e in events(run(tap, [STREAM])) if isinstance(e, dict)}
    assert ids == {writer.id}


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
    answer = ("🔄 Switching to Big…\n⏳ Loading Big… 10s/180s\n✅ Big ready (took 12s)\n"
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
    assert "(5 tokens in" in evs[-1]["choices"][0]["delta"]["content"] and "usage" not in evs[-1]


def test_prompt_tokens_come_from_the_engines_usage_once_it_went_by():
    tap = StreamTap(ChunkWriter("m"), stats=True, client_usage=False, rewrite_id=False, clock=Clock())
    run(tap, [ROLE, *TOKENS, FINISH])
    assert tap.prompt_tokens is None
    run(tap, [USAGE, DONE])
    assert tap.prompt_tokens == 3 and tap.summary is not None and tap.summary["tokens"] == 5
