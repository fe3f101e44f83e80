"""The daemon's reload (router/daemon.py, no systemd needed): systemd never stays in `reloading`, even when
loading the configuration raises something unexpected, and quick successive requests apply in order,
so that the newest files always win."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from router import daemon, notify
from router.config import Config, load_config

CONFIG = """\
listen: {host: 127.0.0.1, port: 8002}
systemd: {bus: user}
backends:
  llamacpp: {unit: llamacpp.service, url: "http://127.0.0.1:8085"}
"""


def models_yml(*ids: str) -> str:
    return "models:\n" + "".join(f"  {i}:\n    backend: llamacpp\n    command: [/bin/true, {i}]\n" for i in ids)


class FakeSwitcher:
    """What reload() touches of the Switcher: the current config, reload(config), reload_error."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.reload_error: list[str] | None = None
        self.applied: list[list[str]] = []

    def reload(self, config: Config) -> None:
        self.config, self.reload_error = config, None
        self.applied.append(sorted(config.models))


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    (tmp_path / "config.yml").write_text(CONFIG)
    (tmp_path / "models.yml").write_text(models_yml("m-old"))
    return tmp_path


@pytest.fixture
def notified(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    sent: list[str] = []

    def fake_notify(state: str) -> bool:
        sent.append(state)
        return True

    monkeypatch.setattr(notify, "notify", fake_notify)
    return sent


@pytest.mark.timeout(10)
async def test_an_unexpected_error_while_loading_still_ends_the_reload_and_is_shown(
        config_dir: Path, notified: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    switcher = FakeSwitcher(load_config(config_dir))

    def broken_load(path: Path) -> Config:
        raise RuntimeError("the disk caught fire")

    monkeypatch.setattr(daemon, "load_config", broken_load)
    await asyncio.wait_for(daemon.Reloader(switcher, config_dir).request(), 5)  # type: ignore[arg-type]
    assert notified == ["RELOADING=1", "READY=1"], "systemd would stay in 'reloading'"
    assert switcher.applied == []
    assert switcher.reload_error and "the disk caught fire" in switcher.reload_error[0], switcher.reload_error


@pytest.mark.timeout(10)
async def test_two_quick_reloads_apply_in_order_and_the_newest_file_wins(
        config_dir: Path, notified: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    switcher = FakeSwitcher(load_config(config_dir))
    models = config_dir / "models.yml"
    first_read = threading.Event()
    real_load = load_config

    def slow_first_load(path: Path) -> Config:
        config = real_load(path)
        if not first_read.is_set():  # the first request read the older file, and is slow to finish
            first_read.set()
            time.sleep(0.5)
        return config

    monkeypatch.setattr(daemon, "load_config", slow_first_load)
    reloader = daemon.Reloader(switcher, config_dir)  # type: ignore[arg-type]
    models.write_text(models_yml("m-first"))
    first = reloader.request()
    await asyncio.to_thread(first_read.wait, 5)
    models.write_text(models_yml("m-second"))
    second = reloader.request()
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert sorted(switcher.config.models) == ["m-second"], f"applied in this order: {switcher.applied}"
    assert switcher.applied[-1] == ["m-second"]
    assert notified[-1] == "READY=1"


@pytest.mark.timeout(10)
async def test_requests_during_a_reload_share_the_next_one(
        config_dir: Path, notified: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    switcher = FakeSwitcher(load_config(config_dir))
    calls: list[float] = []
    real_load = load_config

    def slow_load(path: Path) -> Config:
        calls.append(time.monotonic())
        time.sleep(0.2)
        return real_load(path)

    monkeypatch.setattr(daemon, "load_config", slow_load)
    reloader = daemon.Reloader(switcher, config_dir)  # type: ignore[arg-type]
    (config_dir / "models.yml").write_text(models_yml("m-new"))
    futures: list[Any] = [reloader.request()]
    await asyncio.sleep(0.05)  # the first load is under way: the next three wait for one more load
    futures += [reloader.request() for _ in range(3)]
    await asyncio.wait_for(asyncio.gather(*futures), 5)
    assert len(calls) == 2, f"{len(calls)} loads for 4 requests, 3 of them during the first load"
    assert switcher.applied == [["m-new"], ["m-new"]]


# --- `llm-router reload`: the daemon answers on its control socket ------------------------------------------


@pytest.mark.timeout(20)
async def test_llm_router_reload_gets_the_daemons_verdict(
        config_dir: Path, notified: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from router import cli, control

    switcher = FakeSwitcher(load_config(config_dir))
    reloader = daemon.Reloader(switcher, config_dir)  # type: ignore[arg-type]
    server = control.ControlServer(config_dir, reloader.answer)
    assert await server.start()
    try:
        (config_dir / "models.yml").write_text(models_yml("m-good"))
        rc = await asyncio.to_thread(cli.main, ["reload", "--config-dir", str(config_dir), "--pid", str(os.getpid())])
        out = capsys.readouterr()
        assert rc == 0, out.err
        assert "reloaded, 1 model on 1 backend" in out.out
        assert sorted(switcher.config.models) == ["m-good"]

        (config_dir / "models.yml").write_text(models_yml("m-good") + "  m-bad:\n    backend: nowhere\n")
        rc = await asyncio.to_thread(cli.main, ["reload", "--config-dir", str(config_dir)])
        out = capsys.readouterr()
        assert rc == 1
        assert "REJECTED" in out.err and "models.yml" in out.err and "nowhere" in out.err, out.err
        assert sorted(switcher.config.models) == ["m-good"]  # the old config serves
        assert switcher.reload_error and any("nowhere" in p for p in switcher.reload_error)  # /status shows it

        # only the expected process is asked (and no other is signalled)
        other = await asyncio.create_subprocess_exec("sleep", "30")
        try:
            rc = await asyncio.to_thread(cli.main, ["reload", "--config-dir", str(config_dir), "--pid", str(other.pid)])
            assert rc == 1 and f"not to {other.pid}" in capsys.readouterr().err
            assert other.returncode is None
        finally:
            other.kill()
            await other.wait()
    finally:
        await server.close()


@pytest.mark.timeout(10)
def test_llm_router_reload_without_a_daemon_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from router import cli

    assert cli.main(["reload", "--config-dir", str(tmp_path)]) == 3
    assert "no router serving" in capsys.readouterr().err


def test_the_cli_finds_the_daemon_while_the_files_on_disk_are_invalid(config_dir: Path) -> None:
    """After a rejected reload the files are invalid, and that is exactly when an operator runs
    `llm-router status`: it must still reach the daemon at config.yml's listen address, with its key."""
    import argparse

    from router import cli

    (config_dir / "config.yml").write_text(CONFIG.replace("8002", "18123") + 'api_key: "k-1"\n')
    (config_dir / "models.yml").write_text(models_yml("m") + "  m-bad:\n    backend: nowhere\n")
    args = argparse.Namespace(config_dir=str(config_dir), url=None, api_key=None)
    assert cli._daemon_url(args) == ("http://127.0.0.1:18123", "k-1")


@pytest.mark.timeout(20)
def test_a_socket_held_by_another_user_is_not_trusted_and_reload_falls_back_to_sighup(
        config_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Another user who takes the socket's name first gets nothing: `llm-router reload --pid` checks the files
    itself and signals the process systemd vouches for."""
    import shutil
    import signal
    import subprocess
    import sys

    from router import cli, control

    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to act as another user")
    squatter = subprocess.Popen(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c",
         "import socket, sys, time; s = socket.socket(socket.AF_UNIX); s.bind(b'\\0' + sys.argv[1].encode()); "
         "s.listen(); print('ready', flush=True); time.sleep(30)", control.address(config_dir)[1:].decode()],
        stdout=subprocess.PIPE, text=True)
    daemon_stand_in = subprocess.Popen(["sleep", "30"])
    try:
        assert squatter.stdout is not None and squatter.stdout.readline().strip() == "ready"
        with pytest.raises(control.Squatted):
            control.request(config_dir, "reload")
        rc = cli.main(["reload", "--config-dir", str(config_dir), "--pid", str(daemon_stand_in.pid)])
        assert rc == 0, capsys.readouterr().err
        assert "sending SIGHUP" in capsys.readouterr().err
        assert daemon_stand_in.wait(timeout=5) == -signal.SIGHUP
    finally:
        for p in (squatter, daemon_stand_in):
            p.kill()
            p.wait(timeout=5)
