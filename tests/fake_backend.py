#!/usr/bin/env python3
"""A fake OpenAI-compatible inference engine that tests run as a systemd unit's ExecStart.

Standard library only (plus PyYAML for --config), so it starts in a few tens of milliseconds.
Every answer names the model the process was started with ("I am X. token1 token2 ..."), so a
test can prove which model answered. Besides the OpenAI chat, completions and embeddings it speaks,
minimally, Anthropic's /v1/messages (and count_tokens), the Responses API, rerank, audio
transcription and speech, image generation, and two engine extras for /upstream tests: GET /props
and /echo (any method). Knobs simulate slow loads, engines that never get healthy,
start-up failures, crashes mid-stream, slow token rates and engines that report no usage.

Sleep mode, as vLLM (POST /sleep?level=1, POST /wake_up, GET /is_sleeping) and SGLang (POST
/release_memory_occupation, POST /resume_memory_occupation) serve it: a sleeping engine keeps
answering /health (as vLLM does) but refuses completions and embeddings with 503 "Engine is
sleeping. Call /wake_up to resume." (vLLM's EngineSleepingError), so a request the router sends to a
sleeper is visible. It takes --sleep-time/--wake-time seconds; a wake fails (500, still asleep) with
--fail-wake or while the --fail-wake-if FILE exists. The "GPU memory" it holds (--vram-gb awake, 0
asleep) is in GET /fake/state, and in --gpu-memory-dir DIR/<pid>.json (written atomically, removed
at exit, or --release-delay S: marked to be freed S s later, like a driver slow to reclaim it) where
a fake NVML (tests/fake_nvml/pynvml.py) reads it as this process's usedGpuMemory.

Usage: fake_backend.py --port 8085 [--host 127.0.0.1] [--model-id X | --config tabby.yml]
       [--load-delay S] [--never-healthy] [--exit-code N] [--exit-after S]
       [--crash-mid-stream K] [--tokens N] [--token-rate R] [--record FILE] [--no-usage]
       [--note WORD]... [--flaky FILE]
       [--no-sleep] [--sleep-time S] [--wake-time S] [--fail-wake] [--fail-wake-if FILE]
       [--vram-gb G] [--gpu N] [--gpu-memory-dir DIR] [--release-delay S]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections import deque
from typing import Any

PROG = "fake_backend"


def log(msg: str) -> None:
    """One line on stdout, unbuffered (the journal sees it at once)."""
    print(f"{PROG}: {msg}", flush=True)


def err(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=PROG, description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8085)
    ap.add_argument("--model-id", default="fake-model", help="the model this process 'loaded'")
    ap.add_argument("--config", default=None,
                    help="TabbyAPI-style YAML file: the model id is its model.model_name")
    ap.add_argument("--load-delay", type=float, default=0.0, help="seconds of /health 503 after start")
    ap.add_argument("--never-healthy", action="store_true", help="/health stays 503 forever")
    ap.add_argument("--exit-code", type=int, default=None,
                    help="exit with this code: at once, or after --exit-after seconds")
    ap.add_argument("--exit-after", type=float, default=None,
                    help="serve, then exit after S seconds (code --exit-code, default 1)")
    ap.add_argument("--crash-mid-stream", type=int, default=None, metavar="K",
                    help="die abruptly after sending K token chunks of a streamed answer")
    ap.add_argument("--tokens", type=int, default=8, help="completion tokens per answer")
    ap.add_argument("--token-rate", type=float, default=0.0, help="tokens/s (0 = as fast as possible)")
    ap.add_argument("--record", default=None, help="append each request as one JSON line to FILE")
    ap.add_argument("--no-usage", action="store_true", help="never report usage")
    ap.add_argument("--flaky", default=None, metavar="FILE",
                    help="fail every other start: exit 1 when FILE is absent (creating it), else remove it and run")
    ap.add_argument("--note", action="append", default=[],
                    help="ignored; logged at start (tests put awkward argv words here)")
    ap.add_argument("--no-sleep", action="store_true",
                    help="no sleep endpoints (404), like vLLM without VLLM_SERVER_DEV_MODE=1")
    ap.add_argument("--sleep-time", type=float, default=0.0, help="seconds a sleep takes")
    ap.add_argument("--wake-time", type=float, default=0.0, help="seconds a wake takes")
    ap.add_argument("--fail-wake", action="store_true", help="every wake fails (HTTP 500, stays asleep)")
    ap.add_argument("--fail-wake-if", default=None, metavar="FILE", help="a wake fails while FILE exists")
    ap.add_argument("--vram-gb", type=float, default=1.0, help="GPU memory it reports while awake (GiB)")
    ap.add_argument("--gpu", type=int, default=0, help="the GPU index it reports its memory on")
    ap.add_argument("--gpu-memory-dir", default=None, metavar="DIR",
                    help="write DIR/<pid>.json with the GPU memory it holds (for a fake NVML)")
    ap.add_argument("--release-delay", type=float, default=0.0, metavar="S",
                    help="the driver frees its GPU memory S seconds after it exits (a fake NVML counts it till then)")
    return ap.parse_args(argv)


def seconds_since_exec() -> float | None:
    """How long ago this process started (/proc/self/stat, in clock ticks since boot); None off Linux."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def model_from_config(path: str) -> str:
    import yaml  # only needed for --config

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    name = (data.get("model") or {}).get("model_name")
    if not name:
        raise ValueError(f"{path}: no model.model_name")
    return str(name)


def answer_tokens(model_id: str, n: int) -> list[str]:
    """The n token strings of an answer; the first one names the model."""
    toks = [f"I am {model_id}."]
    toks += [f" token{i}" for i in range(1, max(n, 1))]
    return toks


def prompt_tokens(body: dict[str, Any]) -> int:
    """A rough word count of the prompt (it only has to be deterministic)."""
    text = ""
    if isinstance(body.get("messages"), list):
        for m in body["messages"]:
            c = m.get("content") if isinstance(m, dict) else None
            if isinstance(c, str):
                text += " " + c
            elif isinstance(c, list):
                text += " ".join(p.get("text", "") for p in c if isinstance(p, dict))
    elif isinstance(body.get("prompt"), str):
        text = body["prompt"]
    return max(1, len(text.split()))


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           413: "Payload Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}

SLEEPING = "Engine is sleeping. Call /wake_up to resume."  # vLLM's EngineSleepingError
SLEEP_PATHS = ("/sleep", "/wake_up", "/is_sleeping", "/release_memory_occupation", "/resume_memory_occupation")


class WakeFailed(Exception):
    """A wake the options make fail: the engine stays asleep."""


class SleepState:
    """Whether the engine sleeps, what its transitions took, and the GPU memory it holds."""

    def __init__(self, args: argparse.Namespace, model_id: str) -> None:
        self.args = args
        self.model_id = model_id
        self.sleeping = False
        self.level: int | None = None
        self.sleeps = 0
        self.wakes = 0
        self.failed_wakes = 0
        self.refused = 0  # requests refused because the engine slept
        self.last_sleep_seconds: float | None = None
        self.last_wake_seconds: float | None = None
        self.lock = asyncio.Lock()  # one transition at a time, like the engine core
        self.startup_seconds: float | None = None  # process start -> listening (interpreter, imports)
        self.listening_at: float | None = None  # time.time() when it began to listen

    def gpu_memory_gb(self) -> float:
        return 0.0 if self.sleeping else self.args.vram_gb

    def memory_file(self) -> str | None:
        d = self.args.gpu_memory_dir
        return os.path.join(d, f"{os.getpid()}.json") if d else None

    def write_memory(self, released_at: float | None = None) -> None:
        """DIR/<pid>.json: this process's GPU memory, for a fake NVML (atomic: temp file + rename)."""
        path = self.memory_file()
        if path is None:
            return
        data: dict[str, Any] = {"pid": os.getpid(), "gpu": self.args.gpu, "model_id": self.model_id,
                                "sleeping": self.sleeping, "used_bytes": int(self.gpu_memory_gb() * 2**30)}
        if released_at is not None:
            data["released_at"] = released_at
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, path)

    def remove_memory(self) -> None:
        """At exit: the memory is free at once, or (--release-delay) the file says when it will be."""
        path = self.memory_file()
        if path is None:
            return
        if self.args.release_delay > 0:
            self.write_memory(released_at=time.time() + self.args.release_delay)
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def wake_fails(self) -> bool:
        return self.args.fail_wake or bool(self.args.fail_wake_if and os.path.exists(self.args.fail_wake_if))

    async def sleep(self, level: int) -> None:
        async with self.lock:
            if self.sleeping:
                log(f"{self.model_id}: already sleeping")
                return
            t0 = time.monotonic()
            await asyncio.sleep(self.args.sleep_time)
            self.sleeping, self.level = True, level
            self.sleeps += 1
            self.last_sleep_seconds = time.monotonic() - t0
            self.write_memory()
            log(f"{self.model_id}: asleep (level {level}) after {self.last_sleep_seconds:.3f}s")

    async def wake(self) -> None:
        async with self.lock:
            if not self.sleeping:
                log(f"{self.model_id}: already awake")
                return
            t0 = time.monotonic()
            await asyncio.sleep(self.args.wake_time)
            if self.wake_fails():
                self.failed_wakes += 1
                err(f"{self.model_id}: wake failed, still asleep (--fail-wake/--fail-wake-if)")
                raise WakeFailed("CUDA error: out of memory while restoring the weights (fake: --fail-wake)")
            self.sleeping, self.level = False, None
            self.wakes += 1
            self.last_wake_seconds = time.monotonic() - t0
            self.write_memory()
            log(f"{self.model_id}: awake after {self.last_wake_seconds:.3f}s")

    def as_dict(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "pid": os.getpid(), "sleeping": self.sleeping, "level": self.level,
                "gpu": self.args.gpu, "gpu_memory_gb": self.gpu_memory_gb(), "load_seconds": self.args.load_delay,
                "startup_seconds": self.startup_seconds, "listening_at": self.listening_at,
                "sleeps": self.sleeps, "wakes": self.wakes, "failed_wakes": self.failed_wakes,
                "refused_while_asleep": self.refused, "last_sleep_seconds": self.last_sleep_seconds,
                "last_wake_seconds": self.last_wake_seconds}

OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
OTHER_PATHS = ("/v1/messages", "/v1/messages/count_tokens", "/v1/responses", "/v1/rerank", "/rerank",
               "/v1/audio/transcriptions", "/v1/audio/speech", "/v1/images/generations")


def sse_event(name: str, data: dict[str, Any]) -> bytes:
    """A named SSE event (Anthropic and the Responses API name every event)."""
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def form_fields(raw: bytes, content_type: str) -> dict[str, bytes]:
    """The parts of a multipart/form-data body by name (a test engine: the whole body is in memory)."""
    boundary = content_type.split("boundary=", 1)[-1].strip('"').encode()
    out: dict[str, bytes] = {}
    for part in raw.split(b"--" + boundary)[1:]:
        if part.startswith(b"--"):
            break
        head, _, value = part[2:].partition(b"\r\n\r\n")
        name = head.split(b'name="', 1)[-1].split(b'"', 1)[0].decode()
        out.setdefault(name, value[:-2] if value.endswith(b"\r\n") else value)
    return out


class FakeBackend:
    def __init__(self, args: argparse.Namespace, model_id: str) -> None:
        self.args = args
        self.model_id = model_id
        self.t0 = time.monotonic()
        self.requests = 0
        self.state = SleepState(args, model_id)
        self.headers: dict[str, str] = {}  # of the request being answered
        self.query = ""
        self.received: deque[tuple[str, str, dict[str, str], bytes]] = deque(maxlen=32)  # path, query, headers, body

    # --- state -------------------------------------------------------------------------------
    def healthy(self) -> bool:
        if self.args.never_healthy:
            return False
        return time.monotonic() - self.t0 >= self.args.load_delay

    def record(self, path: str, body: Any) -> None:
        if not self.args.record:
            return
        line = json.dumps({"path": path, "model_id": self.model_id, "body": body}, ensure_ascii=False)
        with open(self.args.record, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    # --- HTTP plumbing -----------------------------------------------------------------------
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                parts = lines[0].split(" ")
                if len(parts) != 3:
                    return
                method, target, version = parts
                headers: dict[str, str] = {}
                for h in lines[1:]:
                    if ":" in h:
                        k, v = h.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                raw = await self.read_body(reader, headers)
                keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
                path, _, query = target.partition("?")
                self.headers, self.query = headers, query
                self.received.append((path, query, headers, raw))
                await self.route(method, path, raw, writer, keep, query)
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            with contextlib.suppress(Exception):  # the peer may be gone already
                writer.close()

    async def read_body(self, reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass
                    return bytes(out)
                out += await reader.readexactly(size)
                await reader.readexactly(2)
        n = int(headers.get("content-length", "0") or "0")
        return await reader.readexactly(n) if n else b""

    @staticmethod
    async def send(writer: asyncio.StreamWriter, status: int, obj: Any, keep: bool,
                   content_type: str = "application/json") -> None:
        data = obj if isinstance(obj, bytes) else json.dumps(obj, ensure_ascii=False).encode()
        head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
                f"Content-Type: {content_type}\r\n"
                f"Content-Length: {len(data)}\r\n"
                f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n")
        writer.write(head.encode() + data)
        await writer.drain()

    @staticmethod
    async def send_empty(writer: asyncio.StreamWriter, status: int, keep: bool) -> None:
        """A response without a body (vLLM's /sleep and /wake_up answer 200 so)."""
        writer.write(f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\nContent-Length: 0\r\n"
                     f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n".encode())
        await writer.drain()

    @staticmethod
    async def start_stream(writer: asyncio.StreamWriter, content_type: str = "text/event-stream") -> None:
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nCache-Control: no-cache\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        await writer.drain()

    @staticmethod
    async def send_chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        await writer.drain()

    @staticmethod
    async def end_stream(writer: asyncio.StreamWriter) -> None:
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    @staticmethod
    def error_body(status: int, message: str) -> dict[str, Any]:
        kind = {503: "unavailable_error", 500: "internal_error"}.get(status, "invalid_request_error")
        return {"error": {"code": status, "message": message, "type": kind}}

    # --- endpoints ---------------------------------------------------------------------------
    async def route(self, method: str, path: str, raw: bytes, writer: asyncio.StreamWriter,
                    keep: bool, query: str = "") -> None:
        self.requests += 1
        if path == "/fake/state":
            await self.send(writer, 200, self.state.as_dict(), keep)
            return
        if path in SLEEP_PATHS and not self.args.no_sleep:
            await self.sleep_route(method, path, query, writer, keep)
            return
        if path == "/health":
            if self.healthy():
                await self.send(writer, 200, {"status": "ok", "model": self.model_id}, keep)
            else:
                await self.send(writer, 503, self.error_body(503, "Loading model"), keep)
            return
        if path == "/v1/models":
            await self.send(writer, 200, {"object": "list", "data": [
                {"id": self.model_id, "object": "model", "created": 0, "owned_by": PROG}]}, keep)
            return
        if path in ("/props", "/echo"):
            await self.extra(method, path, raw, writer, keep)
            return
        if path not in OPENAI_PATHS + OTHER_PATHS:
            await self.send(writer, 404, self.error_body(404, f"no route {path}"), keep)
            return
        if method != "POST":
            await self.send(writer, 405, self.error_body(405, "use POST"), keep)
            return
        if path == "/v1/audio/transcriptions":
            await self.transcribe(raw, writer, keep)
            return
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("body is not a JSON object")
        except ValueError as exc:
            await self.send(writer, 400, self.error_body(400, f"parse error: {exc}"), keep)
            return
        self.record(path, body)
        if not self.healthy():
            await self.send(writer, 503, self.error_body(503, "Loading model"), keep)
            return
        if self.state.sleeping:
            self.state.refused += 1
            err(f"{self.model_id}: refused {path}: {SLEEPING}")
            await self.send(writer, 503, self.error_body(503, SLEEPING), keep)
            return
        if path == "/v1/embeddings":
            await self.embed(writer, body, keep)
            return
        if path in OTHER_PATHS:
            await self.other(path, body, writer, keep)
            return
        chat = path == "/v1/chat/completions"
        if chat and not isinstance(body.get("messages"), list):
            await self.send(writer, 400, self.error_body(400, "'messages' is required"), keep)
            return
        if not chat and "prompt" not in body:
            await self.send(writer, 400, self.error_body(400, "'prompt' is required"), keep)
            return
        n = self.args.tokens
        if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 0:
            n = min(n, body["max_tokens"])
        finish = "length" if n < self.args.tokens else "stop"
        toks = answer_tokens(self.model_id, n)
        usage = {"prompt_tokens": prompt_tokens(body), "completion_tokens": len(toks),
                 "total_tokens": prompt_tokens(body) + len(toks)}
        if body.get("stream"):
            await self.stream(writer, body, chat, toks, usage, finish)
        else:
            await self.complete(writer, body, chat, toks, usage, finish, keep)

    async def sleep_route(self, method: str, path: str, query: str, writer: asyncio.StreamWriter,
                          keep: bool) -> None:
        """vLLM's /sleep, /wake_up, /is_sleeping and SGLang's release/resume_memory_occupation."""
        if path == "/is_sleeping":
            await self.send(writer, 200, {"is_sleeping": self.state.sleeping}, keep)
            return
        if method != "POST":
            await self.send(writer, 405, {"detail": "Method Not Allowed"}, keep)
            return
        vllm = path in ("/sleep", "/wake_up")
        if path in ("/sleep", "/release_memory_occupation"):
            level = 1
            for pair in query.split("&"):
                key, _, value = pair.partition("=")
                if key == "level" and value.isdigit():
                    level = int(value)
            await self.state.sleep(level)
            if vllm:
                await self.send_empty(writer, 200, keep)
            else:
                await self.send(writer, 200, {"success": True, "message": "released"}, keep)
            return
        try:
            await self.state.wake()
        except WakeFailed as exc:
            if vllm:
                await self.send(writer, 500, self.error_body(500, str(exc)), keep)
            else:
                await self.send(writer, 400, {"success": False, "message": str(exc)}, keep)
            return
        if vllm:
            await self.send_empty(writer, 200, keep)
        else:
            await self.send(writer, 200, {"success": True, "message": "resumed"}, keep)

    async def embed(self, writer: asyncio.StreamWriter, body: dict[str, Any], keep: bool) -> None:
        """/v1/embeddings: one small vector per input; `model` names the model this process loaded."""
        inputs = body.get("input")
        if not isinstance(inputs, (str, list)) or not inputs:
            await self.send(writer, 400, self.error_body(400, "'input' is required"), keep)
            return
        items = [inputs] if isinstance(inputs, str) else inputs
        data = [{"object": "embedding", "index": i, "embedding": [float(len(str(x))), float(i), 0.5]}
                for i, x in enumerate(items)]
        n = sum(len(str(x).split()) for x in items)
        await self.send(writer, 200, {"object": "list", "data": data, "model": self.model_id,
                                      "usage": {"prompt_tokens": n, "total_tokens": n}}, keep)

    async def extra(self, method: str, path: str, raw: bytes, writer: asyncio.StreamWriter, keep: bool) -> None:
        """Engine extras for /upstream: GET /props (llama.cpp's), /echo answers any method with what it got."""
        if path == "/props" and method != "GET":
            await self.send(writer, 405, self.error_body(405, "use GET"), keep)
            return
        await self.send(writer, 200, {"model": self.model_id, "method": method, "path": path, "query": self.query,
                                      "body_bytes": len(raw), "headers": self.headers}, keep)

    async def other(self, path: str, body: dict[str, Any], writer: asyncio.StreamWriter, keep: bool) -> None:
        toks = answer_tokens(self.model_id, self.args.tokens)
        if path == "/v1/messages":
            await self.messages(writer, body, toks, keep)
        elif path == "/v1/messages/count_tokens":
            await self.send(writer, 200, {"input_tokens": prompt_tokens(body)}, keep)
        elif path == "/v1/responses":
            await self.responses(writer, body, toks, keep)
        elif path in ("/v1/rerank", "/rerank"):
            docs = body.get("documents") or []
            results = [{"index": i, "relevance_score": 1.0 / (i + 1)} for i in range(len(docs))]
            await self.send(writer, 200, {"model": self.model_id, "object": "list", "results": results,
                                          "usage": {"prompt_tokens": len(docs), "total_tokens": len(docs)}}, keep)
        elif path == "/v1/audio/speech":
            await self.start_stream(writer, "audio/mpeg")
            for i in range(3):
                await self.pace()
                await self.send_chunk(writer, f"ID3 {self.model_id} audio frame {i}\n".encode())
            await self.end_stream(writer)
        else:  # /v1/images/generations
            await self.send(writer, 200, {"created": int(time.time()), "data": [
                {"b64_json": "aW1hZ2U=", "revised_prompt": f"I am {self.model_id}."}]}, keep)

    async def transcribe(self, raw: bytes, writer: asyncio.StreamWriter, keep: bool) -> None:
        fields = form_fields(raw, self.headers.get("content-type", ""))
        self.record("/v1/audio/transcriptions", {"model": fields.get("model", b"").decode(),
                                                 "file_bytes": len(fields.get("file", b""))})
        if "file" not in fields:
            await self.send(writer, 400, self.error_body(400, "'file' is required"), keep)
            return
        await self.send(writer, 200, {"text": f"I am {self.model_id}. I heard {len(fields['file'])} bytes."}, keep)

    async def messages(self, writer: asyncio.StreamWriter, body: dict[str, Any], toks: list[str], keep: bool) -> None:
        """Anthropic's Messages API as llama.cpp's server writes it: a thinking block first when asked for."""
        thinking = isinstance(body.get("thinking"), dict) and body["thinking"].get("type") in ("enabled", "adaptive")
        mid = f"msg_fake_{uuid.uuid4().hex[:12]}"
        usage = {"input_tokens": prompt_tokens(body), "output_tokens": len(toks)}
        if not body.get("stream"):
            content = ([{"type": "thinking", "thinking": "Hmm.", "signature": ""}] if thinking else [])
            content.append({"type": "text", "text": "".join(toks)})
            await self.send(writer, 200, {"id": mid, "type": "message", "role": "assistant", "content": content,
                                          "model": body.get("model"), "stop_reason": "end_turn",
                                          "stop_sequence": None, "usage": usage}, keep)
            return
        await self.start_stream(writer)
        await self.send_chunk(writer, sse_event("message_start", {"type": "message_start", "message": {
            "id": mid, "type": "message", "role": "assistant", "content": [], "model": body.get("model"),
            "stop_reason": None, "stop_sequence": None, "usage": {**usage, "output_tokens": 0}}}))
        index = 0
        if thinking:
            await self.send_chunk(writer, sse_event("content_block_start", {
                "type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}})
                + sse_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                    "delta": {"type": "thinking_delta", "thinking": "Hmm."}})
                + sse_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                    "delta": {"type": "signature_delta", "signature": ""}})
                + sse_event("content_block_stop", {"type": "content_block_stop", "index": 0}))
            index = 1
        await self.send_chunk(writer, sse_event("content_block_start", {
            "type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}))
        for i, tok in enumerate(toks):
            if self.args.crash_mid_stream is not None and i >= self.args.crash_mid_stream:
                err(f"crashing mid-stream after {i} chunks (--crash-mid-stream)")
                os._exit(3)
            await self.pace()
            await self.send_chunk(writer, sse_event("content_block_delta", {
                "type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": tok}}))
        await self.send_chunk(writer, sse_event("content_block_stop", {"type": "content_block_stop", "index": index})
                              + sse_event("message_delta", {"type": "message_delta", "delta": {
                                  "stop_reason": "end_turn", "stop_sequence": None},
                                  "usage": {"output_tokens": len(toks)}})
                              + sse_event("message_stop", {"type": "message_stop"}))
        await self.end_stream(writer)

    async def responses(self, writer: asyncio.StreamWriter, body: dict[str, Any], toks: list[str],
                        keep: bool) -> None:
        """The Responses API as llama.cpp's server writes it (every event numbered)."""
        rid, mid = f"resp_fake_{uuid.uuid4().hex[:12]}", f"msg_fake_{uuid.uuid4().hex[:12]}"
        text = "".join(toks)
        item = {"id": mid, "type": "message", "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}
        usage = {"input_tokens": prompt_tokens(body), "output_tokens": len(toks),
                 "total_tokens": prompt_tokens(body) + len(toks)}
        done = {"id": rid, "object": "response", "created_at": int(time.time()), "status": "completed",
                "model": body.get("model"), "output": [item], "usage": usage}
        if not body.get("stream"):
            await self.send(writer, 200, done, keep)
            return
        seq = iter(range(1_000_000))
        await self.start_stream(writer)
        started = {**done, "status": "in_progress", "output": []}
        started.pop("usage")
        await self.send_chunk(writer, sse_event("response.created", {
            "type": "response.created", "response": started, "sequence_number": next(seq)}))
        await self.send_chunk(writer, sse_event("response.output_item.added", {
            "type": "response.output_item.added", "output_index": 0, "sequence_number": next(seq),
            "item": {**item, "status": "in_progress", "content": []}})
            + sse_event("response.content_part.added", {
                "type": "response.content_part.added", "item_id": mid, "output_index": 0, "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": []}, "sequence_number": next(seq)}))
        for tok in toks:
            await self.pace()
            await self.send_chunk(writer, sse_event("response.output_text.delta", {
                "type": "response.output_text.delta", "item_id": mid, "output_index": 0, "content_index": 0,
                "delta": tok, "sequence_number": next(seq)}))
        await self.send_chunk(writer, sse_event("response.output_text.done", {
            "type": "response.output_text.done", "item_id": mid, "output_index": 0, "content_index": 0,
            "text": text, "sequence_number": next(seq)})
            + sse_event("response.content_part.done", {
                "type": "response.content_part.done", "item_id": mid, "output_index": 0, "content_index": 0,
                "part": item["content"][0], "sequence_number": next(seq)})
            + sse_event("response.output_item.done", {
                "type": "response.output_item.done", "output_index": 0, "item": item, "sequence_number": next(seq)})
            + sse_event("response.completed", {"type": "response.completed", "response": done,
                                               "sequence_number": next(seq)}))
        await self.end_stream(writer)

    async def pace(self) -> None:
        if self.args.token_rate > 0:
            await asyncio.sleep(1.0 / self.args.token_rate)

    async def complete(self, writer: asyncio.StreamWriter, body: dict[str, Any], chat: bool,
                       toks: list[str], usage: dict[str, int], finish: str, keep: bool) -> None:
        for _ in toks:
            await self.pace()
        text = "".join(toks)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-fake-{uuid.uuid4().hex[:12]}"
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        out: dict[str, Any] = {"id": rid, "object": "chat.completion" if chat else "text_completion",
                               "created": int(time.time()), "model": body.get("model", self.model_id),
                               "choices": [choice]}
        if not self.args.no_usage:
            out["usage"] = usage
        await self.send(writer, 200, out, keep)

    async def stream(self, writer: asyncio.StreamWriter, body: dict[str, Any], chat: bool,
                     toks: list[str], usage: dict[str, int], finish: str) -> None:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-fake-{uuid.uuid4().hex[:12]}"
        base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": body.get("model", self.model_id)}

        def event(choice: dict[str, Any] | None, **extra: Any) -> bytes:
            obj = dict(base, choices=[choice] if choice else [], **extra)
            return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"

        def token_choice(text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}

        await self.start_stream(writer)
        if chat:
            await self.send_chunk(writer, event(token_choice("", None, role=True)))
        for i, tok in enumerate(toks):
            if self.args.crash_mid_stream is not None and i >= self.args.crash_mid_stream:
                err(f"crashing mid-stream after {i} chunks (--crash-mid-stream)")
                os._exit(3)
            await self.pace()
            await self.send_chunk(writer, event(token_choice(tok, None)))
        await self.send_chunk(writer, event(token_choice(None if chat else "", finish)))
        opts = body.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage") and not self.args.no_usage:
            await self.send_chunk(writer, event(None, usage=usage))
        await self.send_chunk(writer, b"data: [DONE]\n\n")
        await self.end_stream(writer)


async def amain(args: argparse.Namespace, model_id: str) -> int:
    fake = FakeBackend(args, model_id)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int] = loop.create_future()

    def finish(code: int, why: str) -> None:
        if not done.done():
            log(why)
            done.set_result(code)

    loop.add_signal_handler(signal.SIGTERM, finish, 0, "SIGTERM, exiting")
    loop.add_signal_handler(signal.SIGINT, finish, 0, "SIGINT, exiting")
    try:
        server = await asyncio.start_server(fake.handle, args.host, args.port, reuse_address=True)
    except OSError as exc:
        err(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
        return 1
    fake.state.write_memory()
    fake.state.startup_seconds = seconds_since_exec()
    fake.state.listening_at = time.time()
    log(f"ready on http://{args.host}:{args.port} (model {model_id}, pid {os.getpid()})")
    if args.load_delay > 0 and not args.never_healthy:
        loop.call_later(args.load_delay, log, f"{model_id} loaded after {args.load_delay}s")
    if args.exit_after is not None:
        code = 1 if args.exit_code is None else args.exit_code
        loop.call_later(args.exit_after, lambda: (err(f"{model_id}: exiting with code {code} "
                                                      f"(--exit-after {args.exit_after})"),
                                                  finish(code, "exit")))
    code = await done
    server.close()
    fake.state.remove_memory()
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_id = args.model_id
    if args.config:
        try:
            model_id = model_from_config(args.config)
        except (OSError, ValueError) as exc:
            err(f"cannot read model from config: {exc}")
            return 2
    log(f"loading weights for {model_id}")
    for note in args.note:
        log(f"note: {note!r}")
    if args.flaky:
        if not os.path.exists(args.flaky):
            with open(args.flaky, "w", encoding="utf-8"):
                pass
            err(f"flaky start of {model_id}: failing this time (--flaky)")
            return 1
        os.unlink(args.flaky)
    if args.exit_code is not None and args.exit_after is None:
        err(f"cannot load weights for {model_id}")
        err(f"fatal: giving up (exit code {args.exit_code})")
        return args.exit_code
    code = asyncio.run(amain(args, model_id))
    sys.stdout.flush()
    os._exit(code)  # don't wait for open keep-alive connections


if __name__ == "__main__":
    sys.exit(main())
