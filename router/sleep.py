"""Drive an engine's sleep protocol over HTTP: put it to sleep, wake it, ask whether it sleeps.

The calls are the backend's `sleep:` spec (router/config.py SleepSpec): vLLM's POST
/sleep?level=1, POST /wake_up and GET /is_sleeping ({"is_sleeping": bool}); SGLang's POST
/release_memory_occupation and POST /resume_memory_occupation; or custom endpoints. A POST carries an
empty JSON object (SGLang reads its options from the body). Any failure raises `SleepError` naming
the call, the URL, the HTTP status and the engine's own words, cut to a few hundred characters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from router.config import Endpoint, SleepSpec

ERROR_TEXT_LIMIT = 300  # characters of the engine's answer kept in an error
CHECK_POLL = 0.05  # seconds between checks while a woken engine still says it sleeps


class SleepError(Exception):
    """A sleep, wake or check that failed; the message says which call, where, and what the engine said."""


async def enter(url: str, spec: SleepSpec, timeout: float, session: aiohttp.ClientSession | None = None) -> None:
    """Put the engine at `url` to sleep (its GPU memory freed, the process kept)."""
    async with _session(session) as s:
        await _call(s, url, spec, spec.enter, timeout)


async def leave(url: str, spec: SleepSpec, timeout: float, session: aiohttp.ClientSession | None = None) -> None:
    """Wake the engine at `url`; with a check in the spec, return only once it says it is awake."""
    deadline = time.monotonic() + timeout
    async with _session(session) as s:
        await _call(s, url, spec, spec.leave, timeout)
        if spec.check is None:
            return
        while await _sleeping(s, url, spec, spec.check, max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() >= deadline:
                raise SleepError(f"{_where(url, spec.leave)} answered, but {_where(url, spec.check)} still says "
                                 f"the engine sleeps after {timeout:g}s: the wake did not take; see the engine's log")
            await asyncio.sleep(CHECK_POLL)


async def is_sleeping(url: str, spec: SleepSpec, timeout: float,
                      session: aiohttp.ClientSession | None = None) -> bool | None:
    """Whether the engine at `url` sleeps; None when the spec has no check."""
    if spec.check is None:
        return None
    async with _session(session) as s:
        return await _sleeping(s, url, spec, spec.check, timeout)


@contextlib.asynccontextmanager
async def _session(session: aiohttp.ClientSession | None) -> AsyncIterator[aiohttp.ClientSession]:
    """The caller's session, or a short-lived one of our own."""
    if session is not None:
        yield session
        return
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as own:
        yield own


def _where(url: str, ep: Endpoint) -> str:
    return f"{ep.method} {url}{ep.path}"


async def _call(s: aiohttp.ClientSession, url: str, spec: SleepSpec, ep: Endpoint, timeout: float) -> bytes:
    """One call; its body when the engine answered 2xx, else SleepError."""
    where = _where(url, ep)
    body: dict[str, Any] | None = {} if ep.method == "POST" else None
    try:
        async with s.request(ep.method, url + ep.path, json=body,
                             timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            data = await resp.read()
            if 200 <= resp.status < 300:
                return data
            raise SleepError(f"{where} failed: HTTP {resp.status} {resp.reason or ''}".rstrip()
                             + f": {_cut(data) or '(no body)'}{_hint(spec, resp.status)}")
    except asyncio.TimeoutError:
        raise SleepError(f"{where}: no answer within {timeout:g}s; is the engine stuck? see its log") from None
    except (aiohttp.ClientError, OSError) as e:
        raise SleepError(f"{where}: could not reach the engine: {str(e) or type(e).__name__}; is its unit "
                         "running?") from e


async def _sleeping(s: aiohttp.ClientSession, url: str, spec: SleepSpec, ep: Endpoint, timeout: float) -> bool:
    data = await _call(s, url, spec, ep, timeout)
    try:
        answer: Any = json.loads(data)
    except ValueError:
        answer = None
    if isinstance(answer, dict):
        answer = answer.get("is_sleeping", answer.get("sleeping"))
    if not isinstance(answer, bool):
        raise SleepError(f"{_where(url, ep)} answered {_cut(data) or '(no body)'}, not "
                         '{"is_sleeping": true|false}; fix the check endpoint in the backend\'s sleep: spec')
    return answer


def _cut(data: bytes) -> str:
    text = data.decode("utf-8", "replace").strip()
    return text if len(text) <= ERROR_TEXT_LIMIT else text[:ERROR_TEXT_LIMIT] + "…"


def _hint(spec: SleepSpec, status: int) -> str:
    """What to do about the common failure: an engine that does not serve the endpoint."""
    if status not in (404, 405):
        return ""
    if spec.kind == "vllm":
        return " (run vLLM with --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1 in its environment)"
    if spec.kind == "sglang":
        return " (run SGLang with --enable-memory-saver)"
    return " (check the paths of the backend's sleep: spec)"
