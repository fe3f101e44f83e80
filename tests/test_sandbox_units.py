"""The test fixtures themselves: fake backends as real units in the systemd sandbox, without the router."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from sandbox import FakeUnit, Sandbox, Units, fake_argv, wait_until

pytestmark = pytest.mark.timeout(60)


def test_fake_unit_runs_and_logs_to_the_journal(sandbox: Sandbox, fake_unit: Callable[..., FakeUnit]) -> None:
    u = fake_unit("plain", model_id="unit-model")
    sandbox.daemon_reload()
    sandbox.start_unit(u.name)  # Type=exec: returns once the process was exec'd
    wait_until(lambda: _healthy(u.url), timeout=10, what="fake unit healthy")
    st = sandbox.unit_state(u.name)
    assert st["ActiveState"] == "active" and int(st["MainPID"]) > 0
    assert sandbox.exec_start_argv(u.name) == [fake_argv(u.port, "unit-model")]
    assert "I am unit-model." in httpx.post(u.url + "/v1/chat/completions", json={
        "model": "x", "messages": [{"role": "user", "content": "hi"}]}).text
    msgs = wait_until(lambda: [m for m in sandbox.journal_messages(
        f"_SYSTEMD_INVOCATION_ID={st['InvocationID']}") if "ready on" in m], timeout=5)
    assert "fake_backend: ready on http://127.0.0.1:" in msgs[0]


def test_failing_unit_reports_result_and_stderr(sandbox: Sandbox, fake_unit: Callable[..., FakeUnit]) -> None:
    u = fake_unit("fails", model_id="broken", args=("--exit-code", "3"))
    sandbox.daemon_reload()
    sandbox.systemctl("start", u.name, check=False)
    st = sandbox.wait_state(u.name, "failed", timeout=10)
    assert st["Result"] == "exit-code" and st["ExecMainStatus"] == "3"
    msgs = sandbox.journal_messages(f"_SYSTEMD_INVOCATION_ID={st['InvocationID']}")
    assert any("cannot load weights for broken" in m for m in msgs), msgs


def test_dropin_replaces_execstart(sandbox: Sandbox, units: Units) -> None:
    u = units.fake("dropin")
    d = sandbox.dropin_dir(u.name)
    d.mkdir()
    argv = fake_argv(u.port, "from-dropin")
    (d / "50-test.conf").write_text("[Service]\nExecStart=\nExecStart=" + " ".join(argv) + "\n")
    sandbox.daemon_reload()
    assert sandbox.exec_start_argv(u.name) == [argv]
    shown = sandbox.show(u.name, "ExecStart")["ExecStart"]
    assert "argv[]=" + " ".join(argv) in shown
    sandbox.start_unit(u.name)
    wait_until(lambda: _healthy(u.url), timeout=10)
    assert "I am from-dropin." in httpx.post(u.url + "/v1/completions", json={"model": "x", "prompt": "p"}).text


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
