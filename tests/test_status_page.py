"""The status page (GET / for browsers, router/static/status.html): what the router serves, in process, and
what the page shows in headless Chromium (Debian's `chromium`, over the DevTools protocol) while a real
router on the sandbox's systemd switches fake engines: models and their state, the switch's lines, the
request rows, an engine's failure with its journal tail, and the buttons behind the admin key.

The Chromium test skips, saying so, where no chromium is installed (tests/run.sh installs it on Debian).
Its screenshots go to $LLM_ROUTER_TEST_ARTIFACTS (default build/test-artifacts/) as status-page-*.png.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cdp import Browser, chromium_path
from sandbox import REPO, one_backend

from router.app import create_app
from router.config import SLEEP_KINDS, Backend, Config, Model, SystemdSettings
from router.statuspage import page, wants_html
from router.switcher import Switcher
from router.systemd import UnitState
from router.upstream import Upstream

ARTIFACTS = Path(os.environ.get("LLM_ROUTER_TEST_ARTIFACTS", REPO / "build" / "test-artifacts"))
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
KEY, ADMIN_KEY = "k-client", "k-admin"


# --- what the router serves (in process) ------------------------------------------------------------


class StubSystemd:
    async def states(self, names: list[str]) -> dict[str, UnitState]:
        return {n: UnitState(n, "loaded", "inactive") for n in names}


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    config = Config(config_dir=tmp_path, systemd=SystemdSettings(bus="user"),
                    backends={"llamacpp": Backend("llamacpp", "llamacpp.service", "http://127.0.0.1:9"),
                              "vllm": Backend("vllm", "vllm.service", "http://127.0.0.1:10",
                                              sleep=SLEEP_KINDS["vllm"])},
                    models={"qwen": Model("qwen", "llamacpp", name="Qwen", vram_gb=20.0),
                            "big": Model("big", "vllm", vram_gb=70.0, ram_gb=80.0, gpu=1)})

    async def probe(url: str, timeout: float) -> bool:
        return True

    app = create_app(Switcher(config, StubSystemd(), probe), Upstream())  # no session until a request is relayed
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as c:
        yield c


async def test_a_browser_gets_the_page(client: httpx.AsyncClient) -> None:
    r = await client.get("/", headers={"accept": BROWSER_ACCEPT})
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert "<title>llm-router status</title>" in r.text
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'sha256-" in csp and "connect-src 'self'" in csp
    assert "http://" not in r.text and "https://" not in r.text and "//cdn" not in r.text  # nothing from elsewhere
    assert ".innerHTML" not in r.text and "insertAdjacentHTML" not in r.text  # text goes in as text nodes
    head = await client.head("/", headers={"accept": "text/html"})
    assert head.status_code == 200


async def test_api_clients_get_what_they_got_before(client: httpx.AsyncClient) -> None:
    for accept in (None, "*/*", "application/json", "application/json, text/html;q=0.5"):
        r = await client.get("/", headers={"accept": accept} if accept else {})
        assert r.status_code == 404, accept
        assert r.json()["error"]["code"] == "not_found", accept


def test_wants_html() -> None:
    assert wants_html(BROWSER_ACCEPT)
    assert wants_html("text/html")
    assert wants_html("application/json, text/html")  # equal preference: a browser-like client
    assert not wants_html(None) and not wants_html("") and not wants_html("*/*")
    assert not wants_html("application/json")
    assert not wants_html("text/html;q=0, */*")
    assert not wants_html("text/html;q=0.4, application/json")
    assert not wants_html("text/html;q=bad")


async def test_status_lists_each_model_with_its_memory(client: httpx.AsyncClient) -> None:
    models = (await client.get("/status")).json()["models"]
    assert models["qwen"] == {"name": "Qwen", "state": "unloaded", "backend": "llamacpp", "unit": "llamacpp.service",
                              "gpu": 0, "vram_gb": 20.0, "ram_gb": None, "persistent": False, "can_sleep": False,
                              "unlisted": False, "measured_gb": None, "serving": 0, "idle_for": None}
    assert models["big"]["can_sleep"] is True and models["big"]["ram_gb"] == 80.0 and models["big"]["gpu"] == 1


def test_the_page_ships_in_the_package() -> None:
    """The page is package data (a pip install without -e has it; test_install's venv test fetches it)."""
    body, _ = page()
    assert body.startswith(b"<!doctype html>")
    assert 'router = ["demo/*.sh", "static/*"]' in (REPO / "pyproject.toml").read_text()


# --- the page in headless Chromium, against a router on real systemd ------------------------------------

ROWS = "document.querySelectorAll('#requests tbody tr')"


def state_of(model: str) -> str:
    return f"document.querySelector('#models tr[data-model=\"{model}\"] .state')?.dataset.state"


@pytest.mark.skipif(chromium_path() is None, reason="no chromium on PATH (Debian: apt-get install chromium; "
                    "tests/run.sh installs it when run as root)")
@pytest.mark.timeout(150)
async def test_the_page_follows_a_switch_in_chromium(units: Any, router: Any, tmp_path: Path) -> None:
    per_model: dict[str, dict[str, Any]] = {"m-a": {"name": "Model A", "args": ["--load-delay", "2.2", "--tokens", "12",
                                                                   "--token-rate", "200"]},
                 "m-b": {"name": "<b>B</b> & <img src=x onerror=alert(1)>"},  # shown as text, never as HTML
                 "m-bad": {"name": "Broken", "args": ["--exit-code", "3"], "load_timeout": 10}}
    h, _ = one_backend(units, router, models=("m-a", "m-b", "m-bad"), per_model=per_model,
                       api_key=KEY, admin_api_keys=[ADMIN_KEY])
    async with Browser.launch(h.url + "/", tmp_path / "chromium") as page:
        # no key yet: the page says what it needs
        await page.wait_for("document.getElementById('message').textContent.includes('API key')",
                            what="the page asking for the API key")
        await page.evaluate("document.getElementById('key').value = 'k-client';"
                            "document.getElementById('admin-key').value = 'k-admin';"
                            "document.querySelector('#keys button').click()")
        await page.wait_for("document.getElementById('conn').textContent === 'live'", what="the event stream")
        await page.wait_for(f"{state_of('m-a')} === 'unloaded' && {state_of('m-bad')} === 'unloaded'",
                            what="the models, unloaded")
        name_b = await page.evaluate("document.querySelector('#models tr[data-model=\"m-b\"] td').firstChild.data")
        assert name_b == per_model["m-b"]["name"]
        assert await page.evaluate("document.querySelectorAll('#models b, #models img').length") == 0

        # a chat request switches to m-a: the page shows the load's lines, then the model loaded and the request
        async with httpx.AsyncClient(base_url=h.url, headers={"authorization": f"Bearer {KEY}"}, timeout=30) as c:
            r = await c.post("/v1/chat/completions", json={"model": "m-a", "stream": True,
                                                           "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200 and "[DONE]" in r.text
        await page.wait_for(f"{state_of('m-a')} === 'loaded'", what="m-a loaded")
        lines = await page.wait_for("[...document.querySelectorAll('#switch li')].map(li => li.textContent)"
                                    ".filter(t => t.includes('Model A')).join('\\n')", what="the switch's lines")
        assert ": loading Model A" in lines and "⏳ Loading Model A…" in lines and "✅ Model A: ok after" in lines
        row = await page.wait_for(f"{ROWS}.length && [...{ROWS}[0].cells].map(c => c.textContent)",
                                  what="a request row")
        assert row[1] == "Model A" and row[2] == "/v1/chat/completions" and row[3] == "200 ok", row
        assert row[4] != "—" and row[5].endswith(" s") and row[6] == "12", row  # tok/s, TTFT, tokens
        # the re-read after a request: its figures in the models table, nothing left serving
        await page.wait_for("document.querySelector('#models tr[data-model=\"m-a\"]').cells[7].textContent === '1'",
                            what="m-a's request counted in the models table")
        assert await page.evaluate("document.querySelector('#queues tr[data-model=\"m-a\"]')") is None
        await page.screenshot(ARTIFACTS / "status-page-switch.png")

        # the buttons, with the admin key: Unload unloads; Load of an engine that exits fails with its journal tail
        await page.evaluate("document.querySelector('#models tr[data-model=\"m-a\"] [data-action=unload]').click()")
        await page.wait_for(f"{state_of('m-a')} === 'unloaded'", what="m-a unloaded by the button")
        await page.wait_for("document.getElementById('message').textContent === 'unload Model A: done'",
                            what="the Unload button's answer")
        await page.evaluate("document.querySelector('#models tr[data-model=\"m-bad\"] [data-action=load]').click()")
        await page.wait_for(f"{state_of('m-bad')} === 'failed'", timeout=30, what="m-bad failed")
        error = await page.wait_for("document.querySelector('#errors .error[data-model=\"m-bad\"]')?.innerText",
                                    what="the failure in the errors")
        journal = await page.evaluate("document.querySelector('#errors .error[data-model=\"m-bad\"] pre')?.textContent")
        assert "Broken" in error and journal and "giving up (exit code 3)" in journal, (error, journal)
        await page.wait_for("document.getElementById('message').textContent.startsWith('load Broken: ')",
                            what="the Load button's answer")
        await page.screenshot(ARTIFACTS / "status-page-after.png")
        assert not [m for m in page.console if m.startswith("exception")], page.console

        # a wrong admin key: the router's 401 is shown, nothing changes
        await page.evaluate("document.getElementById('admin-key').value = 'wrong';"
                            "document.querySelector('#keys button').click()")
        await page.evaluate("document.querySelector('#models tr[data-model=\"m-b\"] [data-action=load]').click()")
        message = await page.wait_for("document.getElementById('message').className === 'bad' && "
                                      "document.getElementById('message').textContent", what="the 401")
        assert "HTTP 401" in message and "admin_api_keys" in message, message
