"""Run llama.cpp's own HTTP server (llama-server's API) in the foreground, from the `xllamacpp` wheel.

A stand-in for the `llama-server` binary where none is installed (the demo, the tests): the same
endpoints (/health, /v1/models, /v1/chat/completions, /v1/completions, /metrics) and the same C++
code, on the CPU. Meant to be a systemd unit's ExecStart (Type=exec):

    python -m router.demo.llama_server -m MODEL.gguf [--host 127.0.0.1] [--port 8085] [--ctx-size 1024]
                                       [--threads N] [--parallel N] [--alias NAME] [--n-predict N]

Exits 2 at once with a message on stderr when the model file is missing (so a unit fails fast and
its journal says why); ends cleanly on SIGTERM/SIGINT. Needs the `demo` extra (xllamacpp).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m router.demo.llama_server",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", required=True, help="the .gguf model file")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8085)
    ap.add_argument("-c", "--ctx-size", type=int, default=1024)
    ap.add_argument("-t", "--threads", type=int, default=0, help="0 = llama.cpp's default")
    ap.add_argument("-np", "--parallel", type=int, default=1, help="parallel request slots")
    ap.add_argument("-a", "--alias", default=None,
                    help="the model id /v1/models reports (default: the file name without .gguf)")
    ap.add_argument("-n", "--n-predict", type=int, default=-1,
                    help="default answer length when a request sets no max_tokens "
                         "(-1 = until EOS or the end of the context)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if not os.path.isfile(a.model):
        print(f"llama_server: model file not found: {a.model}", file=sys.stderr, flush=True)
        return 2
    try:
        import xllamacpp  # after the cheap checks: importing it loads the C++ library
    except ImportError as exc:
        print(f"llama_server: cannot import xllamacpp ({exc}); install the demo extra: "
              "pip install 'llm-router[demo]'", file=sys.stderr, flush=True)
        return 2

    p = xllamacpp.CommonParams()
    p.model.path = a.model
    p.hostnames = [a.host]
    p.port = a.port
    p.n_ctx = a.ctx_size
    p.n_parallel = a.parallel
    p.n_predict = a.n_predict
    if a.threads:
        p.cpuparams.n_threads = a.threads
    p.model_alias = {a.alias or os.path.splitext(os.path.basename(a.model))[0]}

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    t0 = time.monotonic()
    try:
        server = xllamacpp.Server(p)  # loads the model, then serves HTTP on its own threads
    except Exception as exc:  # a model llama.cpp rejects, a port in use, ...
        print(f"llama_server: cannot serve {a.model} on {a.host}:{a.port}: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"llama_server: {a.model} ready on {server.listening_address} in {time.monotonic() - t0:.3f}s",
          flush=True)
    while not stop.wait(0.1):
        pass
    print("llama_server: signal received, exiting", flush=True)
    sys.stdout.flush()
    os._exit(0)  # the server's threads have nothing to flush; leave at once


if __name__ == "__main__":
    raise SystemExit(main())
