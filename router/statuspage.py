"""The status page: GET / for browsers (one static HTML file shipped in the package), and the models block of /status.

The page is router/static/status.html: HTML, CSS and JavaScript in one file, no build step, nothing
fetched from elsewhere. It reads GET /status and /history once, then follows GET /events; its
buttons call /admin/load, /admin/unload and /admin/sleep with the key the user typed into it. The
HTML itself holds no data and no secret, so it is served without a key; everything it reads is
behind the usual API-key guard. Clients that do not ask for HTML get what they got before at `/`.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from importlib import resources
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from router.switcher import Switcher

PAGE = "static/status.html"
_INLINE = re.compile(rb"<(script|style)>(.*?)</\1>", re.S)


@functools.cache
def page() -> tuple[bytes, dict[str, str]]:
    """The page's bytes and its response headers (a CSP that allows only its own inline script and style)."""
    body = resources.files("router").joinpath(PAGE).read_bytes()
    hashes: dict[bytes, list[str]] = {b"script": [], b"style": []}
    for kind, text in _INLINE.findall(body):
        hashes[kind].append("'sha256-" + base64.b64encode(hashlib.sha256(text).digest()).decode() + "'")
    csp = (f"default-src 'none'; script-src {' '.join(hashes[b'script'])}; style-src {' '.join(hashes[b'style'])}; "
           "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return body, {"content-security-policy": csp, "cache-control": "no-cache", "x-content-type-options": "nosniff",
                  "referrer-policy": "no-referrer"}


def wants_html(accept: str | None) -> bool:
    """True when the Accept header asks for text/html at least as much as for JSON (a browser, not an API client)."""
    quality: dict[str, float] = {}
    for part in (accept or "").split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        quality[media.lower()] = max(q, quality.get(media.lower(), 0.0))
    html = quality.get("text/html", 0.0)
    return html > 0 and html >= quality.get("application/json", 0.0)


async def index(request: Request) -> Response:
    """GET /: the status page for a browser; for anyone else the same 404 as before the page existed."""
    if not wants_html(request.headers.get("accept")):
        raise HTTPException(404)
    body, headers = page()
    return Response(body, media_type="text/html; charset=utf-8", headers=headers)


def models_overview(switcher: Switcher) -> dict[str, dict[str, Any]]:
    """Each configured model as the page shows it: name, state, where it runs and the memory it is budgeted."""
    config = switcher.config
    sched = switcher.scheduler
    now = switcher.clock()
    out: dict[str, dict[str, Any]] = {}
    for model in config.models.values():
        backend = config.backend_of(model)
        resident = sched.resident.get(model.id)
        serving = sched.serving.get(model.id, 0)
        out[model.id] = {"name": model.display_name, "state": switcher.model_state(model.id),
                         "backend": model.backend, "unit": config.unit_of(model), "gpu": model.gpu,
                         "vram_gb": model.vram_gb, "ram_gb": model.ram_gb, "persistent": model.persistent,
                         "can_sleep": backend.sleep is not None, "unlisted": model.unlisted,
                         "measured_gb": sched.measured.get(model.id), "serving": serving,
                         "idle_for": round(now - resident.last_used, 1) if resident is not None and not serving
                         else None}
    return out
