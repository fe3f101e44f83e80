"""Manual check against the real Open WebUI (PyPI `open-webui`), not part of the test suite.

A private systemd user manager (tests/sandbox.py) runs one fake llama.cpp-like unit that serves
`tiny-a` and `tiny-b`, the router in front of it (tiny-a loaded through POST /models/load), and Open
WebUI offline with the router as an OpenAI connection. tests/manual/owui_browser.py then drives the
page in Debian's headless Chromium: sets the connection's Provider to llama.cpp in the Edit Connection
dialog, checks the loaded marker in the model selector, clicks Eject, checks that the router unloaded
the model and the unit stopped, and chats with tiny-b. Screenshots go to build/owui-check/.

    sudo .venv/bin/python tests/manual/owui_check.py --provider-from-env \
        --open-webui /opt/owui/bin/open-webui --playwright-python /opt/owui-check/bin/python

(/opt/owui: `python3 -m venv /opt/owui && /opt/owui/bin/pip install open-webui`, with the CPU build of
torch installed first so that pip does not bring CUDA's; /opt/owui-check: a venv with `playwright httpx`.)
`--provider-from-env` sets the provider with OPENAI_API_CONFIGS instead of the Edit Connection dialog:
driving the dialog (a client-side navigation to /admin/settings/connections) did not work yet, the page
stayed on the chat. Open WebUI takes 2-3 minutes to start on a busy 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from sandbox import RouterHandle, Units, free_port, running_sandbox, wait_until  # noqa: E402

KEY = "owui-check-key"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--open-webui", default="/opt/owui/bin/open-webui")
    parser.add_argument("--playwright-python", default="/opt/owui-check/bin/python")
    parser.add_argument("--out", default=str(REPO / "build" / "owui-check"))
    parser.add_argument("--provider-from-env", action="store_true",
                        help="set the connection's provider with OPENAI_API_CONFIGS instead of the admin UI")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="owui-check-") as tmp_name:
        tmp = Path(tmp_name)
        with running_sandbox(tmp / "sbx") as sbx:
            units = Units(sbx, "owui-check")
            try:
                return check(sbx, units, tmp, out, args)
            finally:
                units.cleanup()


def check(sbx: object, units: Units, tmp: Path, out: Path, args: argparse.Namespace) -> int:
    u = units.fake("one")
    cdir = tmp / "router"
    cdir.mkdir()
    rt = RouterHandle(sbx, cdir, free_port(), out / "router.log")  # type: ignore[arg-type]
    rt.write_config({"fake": u.backend()}, {m: {"backend": "fake", "command": u.command(m)}
                                            for m in ("tiny-a", "tiny-b")}, api_key=KEY)
    rt.start()
    owui_port = free_port()
    owui_url = f"http://127.0.0.1:{owui_port}"
    owui_log = open(out / "open-webui.log", "wb")
    env = {**os.environ, "DATA_DIR": str(tmp / "owui-data"), "WEBUI_AUTH": "False", "OFFLINE_MODE": "true",
           "HF_HUB_OFFLINE": "1", "ENABLE_OLLAMA_API": "False", "ENABLE_OPENAI_API": "True",
           "OPENAI_API_BASE_URLS": rt.url + "/v1", "OPENAI_API_KEYS": KEY,
           **({"OPENAI_API_CONFIGS": '{"0": {"provider": "llama.cpp"}}'} if args.provider_from_env else {}),
           "RAG_EMBEDDING_MODEL_AUTO_UPDATE": "False", "RAG_RERANKING_MODEL_AUTO_UPDATE": "False",
           "RAG_EMBEDDING_ENGINE": "openai", "ENABLE_VERSION_UPDATE_CHECK": "False", "ENABLE_WEB_SEARCH": "False",
           "ENABLE_TITLE_GENERATION": "False", "ENABLE_FOLLOW_UP_GENERATION": "False",
           "ENABLE_TAGS_GENERATION": "False", "ENABLE_AUTOCOMPLETE_GENERATION": "False"}
    owui = subprocess.Popen([args.open_webui, "serve", "--host", "127.0.0.1", "--port", str(owui_port)],
                            stdout=owui_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            cwd=tmp)
    try:
        admin = {"authorization": f"Bearer {KEY}"}
        r = httpx.post(rt.url + "/models/load", json={"model": "tiny-a"}, headers=admin, timeout=30)
        print("router POST /models/load tiny-a:", r.status_code, r.text, flush=True)
        wait_until(lambda: httpx.get(rt.url + "/v1/models", headers=admin).json()["data"][0]["status"]["value"]
                   == "loaded", timeout=30, what="tiny-a loaded")

        def owui_up() -> bool:
            if owui.poll() is not None:
                raise RuntimeError(f"open-webui exited with {owui.returncode}; see {out / 'open-webui.log'}")
            try:
                return httpx.get(owui_url + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        started = time.monotonic()
        wait_until(owui_up, timeout=600, step=1, what="Open WebUI /health")
        print(f"open-webui up after {time.monotonic() - started:.0f} s", flush=True)
        browser = subprocess.run([args.playwright_python, str(Path(__file__).with_name("owui_browser.py")),
                                  owui_url, rt.url, KEY, str(out)], timeout=600)
        unit_state = sbx.active_state(u.name)  # type: ignore[attr-defined]
        print(f"unit {u.name} after the browser checks: {unit_state} (tiny-b chat leaves it active)", flush=True)
        return browser.returncode
    finally:
        owui.terminate()
        try:
            owui.wait(30)
        except subprocess.TimeoutExpired:
            owui.kill()
        owui_log.close()
        rt.stop()


if __name__ == "__main__":
    sys.exit(main())
