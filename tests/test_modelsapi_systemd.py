"""The llama.cpp router-mode model API on a real systemd user manager: Open WebUI's load, marker and Eject.

POST /models/load starts the unit and answers at once; GET /v1/models then shows `status.value`
"loaded" (what Open WebUI's "llama.cpp" connection marks as loaded); POST /models/unload answers once
systemd reports the unit inactive. The API's shapes and their sources: tests/test_modelsapi.py."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from sandbox import RouterHandle, Sandbox, Units, one_backend, wait_until

pytestmark = pytest.mark.timeout(90)


def test_load_mark_and_eject_through_the_llama_cpp_api(sandbox: Sandbox, units: Units,
                                                       router: Callable[..., RouterHandle]) -> None:
    rt, u = one_backend(units, router)
    with httpx.Client(base_url=rt.url, timeout=30) as c:
        def status(model: str) -> str:
            return str({m["id"]: m for m in c.get("/v1/models").json()["data"]}[model]["status"]["value"])

        assert status("m-a") == "unloaded" and sandbox.active_state(u.name) == "inactive"
        r = c.post("/models/load", json={"model": "m-a"})
        assert r.status_code == 200 and r.json() == {"success": True}
        wait_until(lambda: status("m-a") == "loaded", timeout=30, what="m-a loaded")
        assert sandbox.active_state(u.name) == "active"
        assert status("m-b") == "unloaded"

        r = c.post("/models/unload", json={"model": "m-a"})
        assert r.status_code == 200 and r.json() == {"success": True}
        assert sandbox.active_state(u.name) == "inactive"  # stopped by the time the answer came
        assert status("m-a") == "unloaded"
        r = c.post("/models/unload", json={"model": "m-a"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
