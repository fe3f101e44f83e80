"""The shipped template units (units/*@.service) on a real systemd: one instance per model, run by the
router's drop-in in <dropin_dir>/<template>@<instance>.service.d/, named after the model in
`systemctl status` and in the journal; without a drop-in an instance fails saying where it belongs.

The unit names and drop-in paths come from router.config (Config.unit_of, instance_name) and the drop-in
text from router.execstart.render_dropin, so this checks the router's naming against systemd's own.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from sandbox import REPO, Sandbox, fake_argv, free_port, require_sandbox, running_sandbox, wait_until

from router.atomicfile import write_atomic
from router.config import Config, Model, parse_config
from router.execstart import DROPIN_NAME, render_dropin

pytestmark = pytest.mark.timeout(120)

TEMPLATES = ("llamacpp@.service", "vllm@.service", "sglang@.service", "tabbyapi@.service")


@pytest.fixture(scope="module")
def sbx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """A sandbox of this module's own: it installs the shipped template names, which others may use too."""
    require_sandbox()
    with running_sandbox(tmp_path_factory.mktemp("tsbx")) as sandbox:
        for name in TEMPLATES:
            shutil.copy(REPO / "units" / name, sandbox.unit_dir / name)
        sandbox.daemon_reload()
        yield sandbox


def config_for(sbx: Sandbox, models: dict[str, int]) -> Config:
    """A user-bus config with every shipped template as a backend and `models` (id -> port) on llamacpp."""
    backends = "".join(f"  {t.split('@')[0]}: {{unit: {t}, url: 'http://127.0.0.1:{{port}}'}}\n" for t in TEMPLATES)
    entries = "".join(f"  {mid}: {{backend: llamacpp, port: {port}}}\n" for mid, port in models.items())
    return parse_config(f"systemd: {{bus: user, dropin_dir: {sbx.unit_dir}}}\nbackends:\n{backends}",
                        f"models:\n{entries}", sbx.dir, {})


def write_dropin(cfg: Config, model: Model) -> Path:
    """What the router writes for a model on a template backend (its instance's own drop-in directory)."""
    path = cfg.systemd.dropin_dir / f"{cfg.unit_of(model)}.d" / DROPIN_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, render_dropin(model))
    return path


def ready_lines(sbx: Sandbox, unit: str, invocation: str) -> list[dict[str, Any]]:
    """The fake engine's "ready on" lines of this run of `unit`, as `journalctl --user-unit=UNIT` shows them."""
    return [e for e in sbx.journal(f"--user-unit={unit}")
            if "ready on" in str(e.get("MESSAGE")) and e.get("_SYSTEMD_INVOCATION_ID") == invocation]


def healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def test_two_instances_run_their_own_dropins_and_are_named_after_their_models(sbx: Sandbox) -> None:
    ids = {"qwen-7b/q4_k_m": free_port(), "embed": free_port()}
    cfg = config_for(sbx, ids)
    units = []
    try:
        for mid in ids:
            model = replace(cfg.models[mid], command=tuple(fake_argv(ids[mid], mid)), env={"PYTHONUNBUFFERED": "1"})
            write_dropin(cfg, model)
            units.append(cfg.unit_of(model))
        assert units == ["llamacpp@qwen\\x2d7b-q4_k_m.service", "llamacpp@embed.service"]
        sbx.daemon_reload()
        for unit in units:
            sbx.start_unit(unit)
        for mid in ids:
            wait_until(partial(healthy, cfg.url_of(cfg.models[mid])), timeout=20, what=f"{mid} healthy")
        for mid, unit in zip(ids, units, strict=True):
            st = sbx.unit_state(unit)
            assert (st["ActiveState"], st["SubState"]) == ("active", "running"), (unit, st)
            assert sbx.main_argv(unit)[1:] == fake_argv(ids[mid], mid)[1:]  # the drop-in's ExecStart ran
            assert sbx.show(unit, "Description")["Description"] == f"llama.cpp server for {mid} (started by llm-router)"
            status = sbx.systemctl("status", unit, check=False).stdout
            assert f"llama.cpp server for {mid}" in status, status
            answer = httpx.post(cfg.url_of(cfg.models[mid]) + "/v1/completions", trust_env=False, timeout=10,
                                json={"model": mid, "prompt": "hi"}).text
            assert f"I am {mid}." in answer
            # `journalctl --user-unit=llamacpp@<instance>.service` shows this model, tagged with its id
            entries = wait_until(partial(ready_lines, sbx, unit, st["InvocationID"]), timeout=30,
                                 what=f"{unit} journal")
            assert entries[0]["SYSLOG_IDENTIFIER"] == f"llamacpp@{mid}"
    finally:
        sbx.stop_units(units)
        for unit in units:
            shutil.rmtree(sbx.dropin_dir(unit), ignore_errors=True)
        sbx.daemon_reload()


@pytest.mark.parametrize("template", TEMPLATES)
def test_an_instance_without_a_dropin_fails_naming_its_dropin(sbx: Sandbox, template: str) -> None:
    unit = template.replace("@", "@org-my\\x2dmodel")
    sbx.systemctl("start", unit, check=False)
    try:
        st = sbx.wait_state(unit, "failed", timeout=15)
        assert st["Result"] == "exit-code", st
        assert sbx.show(unit, "Description")["Description"].endswith(" for org/my-model (started by llm-router)")
        # a process that exits within milliseconds loses its cgroup fields in journald: match its PID too
        pid = sbx.show(unit, "ExecMainPID")["ExecMainPID"]
        messages = wait_until(lambda: [m for match in (f"_SYSTEMD_INVOCATION_ID={st['InvocationID']}", f"_PID={pid}")
                                       for m in sbx.journal_messages(match) if "no command" in m],
                              timeout=30, what=f"{unit} message")
        assert messages[0] == (f"{unit}: no command for model org/my-model; llm-router writes ExecStart= into the "
                               f"drop-in {unit}.d/50-llm-router.conf")
    finally:
        sbx.stop_units([unit])
