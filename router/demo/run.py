"""The Python half of `./install.sh --demo`: demo config, free ports, and a first look at a switch.

    python -m router.demo.run free-port [--start 8085]          first free TCP port from --start
    python -m router.demo.run port-free PORT                    exit 0 if nothing listens on PORT
    python -m router.demo.run check-port PORT [--demo-config D] exit 0 if PORT is free; else say who holds
                                           it (PID and command) and exit 1, or 3 when the holder is
                                           the demo router serving config directory D
    python -m router.demo.run write-config --dir D --port P --backend-port Q --unit U --dropin-dir X
                                           --python PY --models-dir M
    python -m router.demo.run try --url URL [--model tiny-a --model tiny-b]
                                           stream one short chat per model and print what the
                                           client sees: the status lines of the switch, the answer

The demo runs two tiny generated models (router.demo.tiny_gguf) as two llm-router models on one
llama.cpp unit (router.demo.llama_server), so every switch rewrites that unit's drop-in. Each gets
DEMO_CONTEXT tokens of context: enough for a real chat in Open WebUI (its title, tags and follow-up
requests resend the whole conversation).

Standard library only (and router.ports): install.sh runs `check-port` with the system's Python
before the demo's venv exists.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

DEMO_MODELS = {"tiny-a": 1, "tiny-b": 2}  # model id -> generator seed
DEMO_CONTEXT = 8192  # tokens of context per model (llama-server --ctx-size; the models are trained for as many)
CHECK_FREE, CHECK_TAKEN, CHECK_DEMO = 0, 1, 3  # check-port's exit codes


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(start: int) -> int:
    for port in range(start, min(start + 1000, 65536)):
        if port_free(port):
            return port
    raise SystemExit(f"no free TCP port in {start}..{start + 999}")


def check_port(port: int, demo_config: str | None = None, host: str = "127.0.0.1") -> tuple[int, str]:
    """(CHECK_FREE, "") when nothing listens on host:port; (CHECK_DEMO, "pid N") when the router of the
    demo whose config directory is `demo_config` does; else (CHECK_TAKEN, who does, in words)."""
    from router.ports import in_use, listener

    holder = listener(host, port)
    if holder is None:
        return (CHECK_FREE, "") if port_free(port, host) else (CHECK_TAKEN, f"{host}:{port} is already in use")
    if demo_config and holder.pid is not None:
        try:
            argv = Path(f"/proc/{holder.pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            argv = []
        if b"router" in argv and b"serve" in argv and demo_config.encode() in argv:
            return CHECK_DEMO, f"pid {holder.pid}"
    return CHECK_TAKEN, in_use(host, port, holder)


def config_text(port: int, backend_port: int, unit: str, dropin_dir: str) -> str:
    return f"""# llm-router demo configuration, written by ./install.sh --demo (removed by --demo --stop).
# The production defaults, with every key explained, are in etc/llm-router/config.yml.
listen: {{host: 127.0.0.1, port: {port}}}
systemd:
  bus: user                     # the demo's units live in a systemd user manager
  dropin_dir: {json.dumps(dropin_dir)}
switch:
  load_timeout: 60
  status_every: 2               # tiny models load in a blink; show the lines anyway
  status_channel: event         # Open WebUI draws these as a grey status line above the answer
stats: true
backends:
  llamacpp:
    unit: {unit}
    url: http://127.0.0.1:{backend_port}
    health: /health
"""


def models_text(python: str, models_dir: str, backend_port: int) -> str:
    out = ["# llm-router demo models: two tiny generated GGUF models (random weights: their answers are",
           "# random English words) on one llama.cpp unit; asking for the other one switches the unit.",
           "models:"]
    for mid, seed in DEMO_MODELS.items():
        gguf = str(Path(models_dir) / f"{mid}.gguf")
        argv = [python, "-m", "router.demo.llama_server", "-m", gguf, "--host", "127.0.0.1",
                "--port", str(backend_port), "--alias", mid, "--n-predict", "64", "--ctx-size", str(DEMO_CONTEXT)]
        out += [f"  {mid}:",
                "    backend: llamacpp",
                f"    name: Tiny {mid[-1].upper()} (demo, seed {seed})",
                f"    command: {json.dumps(argv)}",
                "    load_timeout: 30"]
    return "\n".join(out) + "\n"


def write_config(a: argparse.Namespace) -> None:
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.yml").write_text(config_text(a.port, a.backend_port, a.unit, a.dropin_dir), encoding="utf-8")
    (d / "models.yml").write_text(models_text(a.python, a.models_dir, a.backend_port), encoding="utf-8")


def _status_line(chunk: dict) -> str | None:
    ev = chunk.get("event")
    if isinstance(ev, dict) and isinstance(ev.get("data"), dict):
        return str(ev["data"].get("description", ""))
    for ch in chunk.get("choices") or []:
        delta = ch.get("delta") or {}
        if delta.get("reasoning_content"):
            return str(delta["reasoning_content"]).rstrip("\n")
    return None


def ask(url: str, model: str, prompt: str, timeout: float = 60.0, api_key: str | None = None) -> tuple[bool, str]:
    """Stream one chat request and print status lines and the answer as they arrive."""
    body = json.dumps({"model": model, "stream": True, "max_tokens": 24,
                       "messages": [{"role": "user", "content": prompt}]}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url.rstrip("/") + "/v1/chat/completions", data=body, headers=headers)
    t0 = time.monotonic()
    answer: list[str] = []
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            for raw in r:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                if chunk.get("error"):
                    msg = chunk["error"].get("message", chunk["error"])
                    print(f"   error: {msg}", flush=True)
                    return False, ""
                status = _status_line(chunk)
                if status:
                    print(f"   [{time.monotonic() - t0:5.2f}s] {status}", flush=True)
                    continue
                for ch in chunk.get("choices") or []:
                    text = (ch.get("delta") or {}).get("content")
                    if text:
                        answer.append(text)
    except urllib.error.HTTPError as e:
        print(f"   HTTP {e.code}: {e.read(500).decode('utf-8', 'replace')}", flush=True)
        return False, ""
    except (OSError, ValueError) as e:
        print(f"   request failed: {e}", flush=True)
        return False, ""
    text = "".join(answer).strip()
    print(f"   [{time.monotonic() - t0:5.2f}s] answer: {text}", flush=True)
    return True, text


def try_models(a: argparse.Namespace) -> int:
    ok = True
    for model in a.model or list(DEMO_MODELS):
        print(f"-> asking {model} (stream: true):", flush=True)
        good, _ = ask(a.url, model, "Say hello to the demo.", api_key=a.api_key)
        ok = ok and good
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m router.demo.run", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("free-port")
    p.add_argument("--start", type=int, default=8085)
    p = sub.add_parser("port-free")
    p.add_argument("port", type=int)
    p = sub.add_parser("check-port")
    p.add_argument("port", type=int)
    p.add_argument("--demo-config", help="the demo's config directory: exit 3 when its router holds the port")
    p = sub.add_parser("write-config")
    p.add_argument("--dir", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--backend-port", type=int, required=True)
    p.add_argument("--unit", required=True)
    p.add_argument("--dropin-dir", required=True)
    p.add_argument("--python", required=True)
    p.add_argument("--models-dir", required=True)
    p = sub.add_parser("try")
    p.add_argument("--url", required=True)
    p.add_argument("--model", action="append")
    p.add_argument("--api-key")
    a = ap.parse_args(argv)
    if a.cmd == "free-port":
        print(free_port(a.start))
    elif a.cmd == "port-free":
        return 0 if port_free(a.port) else 1
    elif a.cmd == "check-port":
        code, text = check_port(a.port, a.demo_config)
        if text:
            print(text)
        return code
    elif a.cmd == "write-config":
        write_config(a)
    elif a.cmd == "try":
        return try_models(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
