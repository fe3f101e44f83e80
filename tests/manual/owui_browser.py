"""Drive a real Open WebUI page in headless Chromium (Playwright): llama.cpp provider, loaded marker, Eject.

Run by tests/manual/owui_check.py with a Python that has `playwright` (Debian's chromium, nothing
downloaded): python owui_browser.py OWUI_URL ROUTER_URL KEY OUT_DIR. Prints one JSON line per check and
exits non-zero when one fails. Not part of the test suite.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import Page, sync_playwright

CHROMIUM = "/usr/bin/chromium"
SELECTOR = 'button[aria-haspopup="listbox"][id^="model-selector-"]'  # the chat's model selector


def say(check: str, ok: bool, **detail: Any) -> bool:
    print(json.dumps({"check": check, "ok": ok, **detail}), flush=True)
    return ok


def router_status(router: str, key: str, model: str) -> str:
    r = httpx.get(f"{router}/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=10)
    return str({m["id"]: m for m in r.json()["data"]}[model]["status"]["value"])


def dismiss_popups(page: Page) -> None:
    for _ in range(3):
        page.keyboard.press("Escape")
        page.wait_for_timeout(200)


def navigate(page: Page, path: str) -> None:
    """Go to `path` inside the running app (a client-side navigation, as a click on a link)."""
    page.evaluate("""(path) => { const a = document.createElement('a'); a.href = path;
                                 document.body.appendChild(a); a.click(); a.remove(); }""", path)
    page.wait_for_timeout(1500)


def open_selector(page: Page, owui: str) -> None:
    page.goto(owui + "/")
    page.wait_for_load_state("load")
    page.locator(SELECTOR).first.wait_for(timeout=30000)
    dismiss_popups(page)
    page.locator(SELECTOR).first.click()
    page.locator('[aria-label="Available models"]').wait_for(timeout=15000)
    page.wait_for_timeout(500)


def marker_of(page: Page, name: str) -> bool:
    """The green loaded dot in the selector's row for this model."""
    row = page.locator(f'[aria-label="Select {name} model"]')
    return row.locator(".animate-ping").count() > 0


def main() -> int:
    owui, router, key, out = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        try:
            return 0 if checks(page, owui, router, key, out) else 1
        except Exception:
            page.screenshot(path=str(out / "error.png"))
            (out / "error.html").write_text(page.content(), encoding="utf-8")
            raise
        finally:
            browser.close()


def set_provider_in_the_ui(page: Page, owui: str, out: Path) -> bool:
    """The connection's provider, through the admin UI: Configure -> Provider -> llama.cpp -> Save."""
    navigate(page, "/admin/settings/connections")  # a full load of an admin page lands on / (sign-in)
    page.locator('button[aria-label="Configure"]').first.wait_for(timeout=30000)
    dismiss_popups(page)
    page.locator('button[aria-label="Configure"]').first.click()
    page.get_by_text("Edit Connection").wait_for(timeout=10000)
    page.locator("#provider-select").select_option("llama.cpp")
    page.screenshot(path=str(out / "1-edit-connection.png"))
    page.get_by_role("button", name="Save").last.click()
    page.wait_for_timeout(1500)
    token = page.evaluate("localStorage.token")
    config = httpx.get(f"{owui}/openai/config", headers={"authorization": f"Bearer {token}"}, timeout=10).json()
    provider = (config.get("OPENAI_API_CONFIGS") or {}).get("0", {}).get("provider")
    return say("provider set to llama.cpp in the Edit Connection dialog", provider == "llama.cpp",
              provider=provider)


def checks(page: Page, owui: str, router: str, key: str, out: Path) -> bool:
    ok = True
    page.goto(owui + "/")
    page.wait_for_load_state("load")
    page.locator(SELECTOR).first.wait_for(timeout=60000)
    page.wait_for_timeout(1000)
    dismiss_popups(page)
    page.screenshot(path=str(out / "0-home.png"))

    token = page.evaluate("localStorage.token")
    config = httpx.get(f"{owui}/openai/config", headers={"authorization": f"Bearer {token}"}, timeout=10).json()
    if (config.get("OPENAI_API_CONFIGS") or {}).get("0", {}).get("provider") == "llama.cpp":
        say("provider llama.cpp set from OPENAI_API_CONFIGS (the Edit Connection dialog not driven)", True)
    else:
        ok &= set_provider_in_the_ui(page, owui, out)
    # 2. the selector marks the loaded model (tiny-a, loaded before Open WebUI started), not the other
    open_selector(page, owui)
    page.screenshot(path=str(out / "2-selector-loaded.png"))
    a, b = marker_of(page, "tiny-a"), marker_of(page, "tiny-b")
    ok &= say("loaded marker on tiny-a only", a and not b, tiny_a=a, tiny_b=b,
              router_tiny_a=router_status(router, key, "tiny-a"))

    # 3. Eject: hover the row, click the Eject button; the router unloads tiny-a
    row = page.locator('[aria-label="Select tiny-a model"]')
    row.hover()
    eject = row.locator('[aria-label="Eject model"]')
    ok &= say("Eject button shown for the loaded model", eject.count() == 1)
    eject.click()
    toast = page.get_by_text("Model unloaded successfully")
    toast.wait_for(timeout=30000)
    page.screenshot(path=str(out / "3-after-eject.png"))
    state = router_status(router, key, "tiny-a")
    ok &= say("Eject unloaded tiny-a in the router", state == "unloaded", router_tiny_a=state)
    open_selector(page, owui)
    page.screenshot(path=str(out / "4-selector-after-eject.png"))
    ok &= say("no loaded marker after Eject", not marker_of(page, "tiny-a") and not marker_of(page, "tiny-b"))

    # 4. a chat with tiny-b loads it; the selector marks it after the models are read again
    page.locator('[aria-label="Select tiny-b model"]').click()
    page.locator("#chat-input").click()
    page.keyboard.type("hello")
    page.keyboard.press("Enter")
    deadline = time.monotonic() + 60
    while router_status(router, key, "tiny-b") != "loaded" and time.monotonic() < deadline:
        time.sleep(0.5)
    page.wait_for_timeout(3000)
    page.screenshot(path=str(out / "5-chat-tiny-b.png"))
    open_selector(page, owui)
    page.screenshot(path=str(out / "6-selector-tiny-b.png"))
    ok &= say("a chat loads tiny-b and the marker follows", marker_of(page, "tiny-b")
              and not marker_of(page, "tiny-a"), router_tiny_b=router_status(router, key, "tiny-b"))
    return ok


if __name__ == "__main__":
    sys.exit(main())
