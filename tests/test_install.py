"""install.sh, driven as a user would: --help and its early errors, a --user install into a private
systemd user manager (active, answers, reload with a good and a bad config, an idempotent re-run,
--uninstall), and the demo (./install.sh --demo, a switch between its two tiny models, --demo --stop).

Speed: install.sh --venv PATH reuses a venv that already has llm-router (this checkout's
development venv, sys.prefix) and installs nothing into it, so these tests don't pip-install;
test_user_install_builds_its_own_venv is the one that runs the real `python -m venv` + `pip install`
path (a few seconds with a warm pip cache).

The transcripts (stdout+stderr of each install.sh run) are saved under $LLM_ROUTER_TEST_ARTIFACTS
(default build/test-artifacts/) as install-*.txt and demo-*.txt.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sandbox import (
    REPO,
    Sandbox,
    fake_argv,
    free_port,
    running_sandbox,
    sandbox_unavailable,
    stream_request,
    wait_until,
)

from router import installer

INSTALL = REPO / "install.sh"
DEV_VENV = Path(sys.prefix)  # the venv running pytest: it has llm-router (editable) and the demo extra
ARTIFACTS = Path(os.environ.get("LLM_ROUTER_TEST_ARTIFACTS", REPO / "build" / "test-artifacts"))
INSTALL_TIMEOUT = 180



def save(name: str, text: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    path.write_text(text, encoding="utf-8")
    return path


def run_install(argv: list[str], name: str | None = None, env: dict[str, str] | None = None,
                timeout: float = INSTALL_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run install.sh (argv may be wrapped, e.g. by the sandbox's exec); stdout and stderr together."""
    p = subprocess.run(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if name:
        save(name, f"$ {' '.join(argv)}\n{p.stdout}\n[exit {p.returncode}]\n")
    if check and p.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {p.returncode}:\n{p.stdout}")
    return p


def run_interactive(argv: list[str], answers: list[tuple[str, str]], name: str,
                    timeout: float = INSTALL_TIMEOUT) -> str:
    """Run install.sh on a pseudo-terminal, answering each prompt (a regex) in turn; the transcript."""
    import pty
    import select

    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, cwd=REPO, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    buf, since = b"", 0
    pending = list(answers)
    end = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > end:
                raise TimeoutError(f"install.sh did not finish within {timeout}s:\n{buf.decode(errors='replace')}")
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the other side is closed
                    data = b""
                if not data:
                    break
                buf += data
            if pending and re.search(pending[0][0], buf[since:].decode(errors="replace")):
                os.write(master, pending.pop(0)[1].encode() + b"\n")
                since = len(buf)
            if not ready and proc.poll() is not None:
                break
        rc = proc.wait(timeout=30)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    text = buf.decode(errors="replace").replace("\r\n", "\n")
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    save(name, f"$ {' '.join(argv)}   (on a terminal)\n{text}\n[exit {rc}]\n")
    assert not pending, f"prompts not seen: {pending}\n{text}"
    assert rc == 0, text
    return text


def need_sandbox() -> None:
    reason = sandbox_unavailable()
    if reason:
        if os.environ.get("LLM_ROUTER_REQUIRE_SANDBOX"):
            pytest.fail(f"LLM_ROUTER_REQUIRE_SANDBOX is set but {reason}")
        pytest.skip(reason)


# what other tools on a developer's PATH may drop into $HOME while pip runs (rustup's shims write
# ~/.rustup/settings.toml when something probes rustc): not install.sh's files
FOREIGN = (".rustup", ".cargo", ".cache")


def tree(*roots: Path) -> set[str]:
    """Every path under the roots (the roots included when they exist), but FOREIGN tools' files."""
    out: set[str] = set()
    for root in roots:
        if root.exists():
            out.add(str(root))
            out.update(str(p) for p in root.rglob("*") if p.relative_to(root).parts[0] not in FOREIGN)
    return out


def get_json(url: str, timeout: float = 5.0) -> Any:
    r = httpx.get(url, timeout=timeout, trust_env=False)
    r.raise_for_status()
    return r.json()


def port_closed(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) != 0


def model_ids(base: str) -> list[str]:
    return [m["id"] for m in get_json(f"{base}/v1/models")["data"]]


# --- no systemd needed ---------------------------------------------------------------------------


def install_flags() -> list[str]:
    """Every option install.sh's argument parser accepts."""
    text = INSTALL.read_text()
    block = text[text.index('while [ $# -gt 0 ]; do'):text.index('if [ "$STOP" = 1 ]')]
    return sorted(set(re.findall(r"^\s+(?:-\w\|)?(--[a-z][a-z-]*)\)", block, re.M)))


def test_help_documents_every_flag() -> None:
    p = run_install([str(INSTALL), "--help"], name="install-help.txt")
    flags = install_flags()
    assert {"--user", "--yes", "--port", "--listen", "--prefix", "--config-dir", "--backends", "--api-key",
            "--demo", "--stop", "--uninstall", "--purge", "--help", "--venv"} <= set(flags)
    for flag in flags:
        assert re.search(rf"^\s+(?:-\w, )?{flag}\b", p.stdout, re.M), f"--help does not document {flag}"
    assert "sudo ./install.sh" in p.stdout and "./install.sh --demo" in p.stdout


def test_unknown_option_and_bad_values_fail_early() -> None:
    for argv, needle in ((["--frobnicate"], "unknown option: --frobnicate"),
                         (["--port", "http"], "not a port number"),
                         (["--port", "70000"], "not in 1..65535"),
                         (["--purge"], "--purge only goes with --uninstall"),
                         (["--port"], "--port needs a value")):
        p = run_install([str(INSTALL), *argv], check=False)
        assert p.returncode != 0 and needle in p.stdout, (argv, p.stdout)


def _as_nobody() -> list[str]:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run install.sh as another user")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]


def test_error_not_root_without_user() -> None:
    p = run_install([*_as_nobody(), str(INSTALL), "--yes"], check=False, name="install-error-not-root.txt")
    assert p.returncode == 1
    assert "needs root" in p.stdout and "sudo ./install.sh" in p.stdout and "--user" in p.stdout
    assert "Installing" not in p.stdout


def _with_systemd_view(booted: bool) -> list[str]:
    """Run install.sh in a private mount namespace whose /run/systemd says systemd is (not) PID 1."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to fake the host's systemd state")
    mk = "mkdir -p /run/systemd/system; " if booted else ""
    script = (f"mkdir -p /run/systemd && mount -n -t tmpfs none /run/systemd && {mk}"
              'exec "$0" "$@"')
    return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script]


def test_error_no_systemd() -> None:
    p = run_install([*_with_systemd_view(False), str(INSTALL), "--yes"], check=False,
                    name="install-error-no-systemd.txt")
    assert p.returncode == 1
    assert "systemd is not running on this host" in p.stdout and "./install.sh --demo" in p.stdout


def test_error_user_without_user_manager() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "DBUS_SESSION_BUS_ADDRESS")}
    p = run_install([str(INSTALL), "--user", "--yes"], env=env, check=False)
    assert p.returncode == 1 and "no systemd user manager is reachable" in p.stdout


def _fake_python(tmp_path: Path, version: str, can_import: bool) -> Path:
    py = tmp_path / "fakepython"
    py.write_text("#!/bin/sh\n"
                  f'case "$*" in *version_info*) echo {version}; exit 0 ;; esac\n'
                  f"exit {0 if can_import else 1}\n")
    py.chmod(0o755)
    return py


def test_error_python_too_old(tmp_path: Path) -> None:
    py = _fake_python(tmp_path, "3.8", True)
    p = run_install([*_with_systemd_view(True), str(INSTALL), "--yes", "--python", str(py)], check=False,
                    name="install-error-old-python.txt")
    assert p.returncode == 1 and "Python 3.8" in p.stdout and "3.10 or newer" in p.stdout


def test_error_missing_packages_without_apt(tmp_path: Path) -> None:
    """No apt-get: name the packages to install by hand (the PATH here has everything but apt)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for d in ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            if name.startswith("apt") or (bindir / name).exists():
                continue
            (bindir / name).symlink_to(os.path.join(d, name))
    py = _fake_python(tmp_path, "3.11", False)
    env = {**os.environ, "PATH": str(bindir)}
    p = run_install([*_with_systemd_view(True), str(INSTALL), "--yes", "--python", str(py)], env=env,
                    check=False, name="install-error-no-apt.txt")
    assert p.returncode == 1
    assert "no apt-get" in p.stdout and "python3-venv" in p.stdout and "python3-gi" in p.stdout
    assert "Installing" not in p.stdout


def test_render_config_choices(tmp_path: Path) -> None:
    """The questions' answers land in the shipped templates with every comment kept, and validate."""
    tdir = REPO / "etc" / "llm-router"
    cfg, mdl = installer.render_config(tdir, host="0.0.0.0", port=9002, bus="user", api_key="k 1",
                                       backends="vllm:8100,llamacpp:9085")
    data = yaml.safe_load(cfg)
    assert data["listen"] == {"host": "0.0.0.0", "port": 9002}
    assert data["systemd"]["bus"] == "user" and data["api_key"] == "k 1"
    assert set(data["backends"]) == {"vllm", "llamacpp"}
    assert data["backends"]["vllm"]["url"].endswith(":8100")
    assert data["backends"]["llamacpp"]["url"].endswith(":9085")
    models = yaml.safe_load(mdl)["models"]
    assert {m["backend"] for m in models.values()} == {"vllm", "llamacpp"}
    assert all("9085" in str(m["command"]) for m in models.values() if m["backend"] == "llamacpp")
    # comments survive: every comment line of the template is still there (some now one level deeper)
    original = (tdir / "config.yml").read_text()
    for line in original.splitlines():
        if line.startswith("#"):
            assert line in cfg
    installer.verify(cfg, mdl, tmp_path, {"port": 9002, "bus": "user", "backends": ["vllm", "llamacpp"]})
    # no choices: the templates as they are
    assert installer.render_config(tdir) == ((tdir / "config.yml").read_text(), (tdir / "models.yml").read_text())
    with pytest.raises(installer.RenderError, match="unknown backend"):
        installer.render_config(tdir, backends="nope")


def test_backend_units_include_each_engines_template() -> None:
    shipped = {f.name for f in (REPO / "units").glob("*.service")}
    assert {"llamacpp@.service", "vllm@.service", "sglang@.service", "tabbyapi@.service"} <= shipped
    assert installer.backend_unit_files(["llamacpp.service", "vllm@.service", "tabbyapi.service", "own.service"],
                                        shipped) == ["llamacpp.service", "llamacpp@.service", "vllm@.service",
                                                     "tabbyapi.service", "tabbyapi@.service"]


def test_router_unit_rendering() -> None:
    template = (REPO / "units" / "llm-router.service").read_text()
    system = installer.render_router_unit(template, mode="system", venv="/opt/x y/venv", config_dir="/etc/llm-router",
                                          rw_paths=["/etc/systemd/system", "/etc/llm-router", "-/srv/tabby"])
    assert 'ExecStart="/opt/x y/venv/bin/llm-router" serve --config-dir /etc/llm-router' in system
    assert "ReadWritePaths=/etc/systemd/system /etc/llm-router -/srv/tabby -/opt/tabbyAPI\n" in system
    # install.sh passes "-DIR" values as --rw-path=-DIR (argparse would take "-/x" for an option)
    out = subprocess.run([sys.executable, "-m", "router.installer", "render-unit", "--template",
                          str(REPO / "units" / "llm-router.service"), "--rw-path=/a", "--rw-path=-/b"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    assert "ReadWritePaths=/a -/b -/opt/tabbyAPI\n" in out
    assert "\nProtectSystem=strict" in system and "WantedBy=multi-user.target" in system
    user = installer.render_router_unit(template, mode="user", venv="/home/u/v", config_dir="/home/u/c",
                                        rw_paths=["/home/u/.config/systemd/user"], manager_is_root=False)
    assert "\n#ProtectSystem=strict" in user and "\n#CapabilityBoundingSet=" in user
    assert "\nNoNewPrivileges=yes" in user and "\nSystemCallFilter=@system-service" in user
    assert "WantedBy=default.target" in user and "network-online" not in user
    assert "Environment=DBUS_SESSION_BUS_ADDRESS=unix:path=%t/bus" in user
    in_tmp = installer.render_router_unit(template, mode="user", venv="/v", config_dir="/tmp/c", rw_paths=["/tmp/u"])
    assert "\nPrivateTmp=" not in in_tmp and "\nProtectSystem=strict" in in_tmp


def test_router_unit_reload_asks_the_daemon_itself() -> None:
    """ExecReload= is `llm-router reload --pid $MAINPID`: the daemon validates, and systemctl reload gets
    its verdict (one command; `$MAINPID` is the only `$` systemd must expand)."""
    template = (REPO / "units" / "llm-router.service").read_text()
    system = installer.render_router_unit(template, mode="system", venv="/opt/x y/venv", config_dir="/etc/llm-router",
                                          rw_paths=[])
    reloads = [ln for ln in system.splitlines() if ln.startswith("ExecReload=")]
    assert reloads == ['ExecReload="/opt/x y/venv/bin/llm-router" reload --config-dir /etc/llm-router --pid $MAINPID']
    demo = installer.render_router_unit(template, mode="user", venv="/v", config_dir="/d/c$x", rw_paths=[],
                                        exec_python=["/v/bin/python"])
    assert [ln for ln in demo.splitlines() if ln.startswith("ExecReload=")] == [
        'ExecReload=/v/bin/python -m router reload --config-dir "/d/c$$x" --pid $MAINPID']


def test_router_unit_keeps_protect_kernel_logs_without_dev_kmsg(monkeypatch: pytest.MonkeyPatch) -> None:
    """ProtectKernelLogs= works where /dev/kmsg is missing (a container; verified under PID-1 systemd, a user
    manager and the test sandbox): it stays, and the unit keeps its security score."""
    real_exists = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: False if str(p) == "/dev/kmsg" else real_exists(p))
    template = (REPO / "units" / "llm-router.service").read_text()
    for mode in ("system", "user"):
        unit = installer.render_router_unit(template, mode=mode, venv="/v", config_dir="/c", rw_paths=[])
        assert "\nProtectKernelLogs=yes\n" in unit, mode


def security_score(unit: Path) -> float | None:
    try:
        p = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
                           capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", p.stdout)
    return float(m.group(1)) if m else None


def test_router_unit_security_score_and_units_verify() -> None:
    unit = REPO / "units" / "llm-router.service"
    score = security_score(unit)
    if score is None:
        pytest.skip("systemd-analyze security --offline is not available here")
    readme = (REPO / "README.md").read_text()
    m = re.search(r"systemd-analyze security.{0,200}?\*\*(\d+\.\d+) \w+\*\*", readme, re.S)
    assert m, "the README should state the router unit's systemd-analyze security score"
    assert score <= 3.0, f"exposure {score}: the hardening of units/llm-router.service regressed"
    assert float(m.group(1)) == score, f"README says {m.group(1)}, systemd-analyze says {score}"
    for u in sorted((REPO / "units").glob("*.service")):
        p = subprocess.run(["systemd-analyze", "verify", "--man=no", str(u)], capture_output=True, text=True,
                           timeout=60)
        problems = [ln for ln in p.stderr.splitlines()
                    if ln.strip() and "is not executable" not in ln and "not found" not in ln.lower()
                    and "ignoring" not in ln.lower()]
        assert not problems, f"{u.name}: {problems}"


# --- the --user install into a private systemd user manager -----------------------------------------


class UserInstall:
    def __init__(self, sbx: Sandbox, home: Path, port: int, backend_port: int) -> None:
        self.sbx = sbx
        self.home = home
        self.port = port
        self.backend_port = backend_port
        self.url = f"http://127.0.0.1:{port}"
        self.config_dir = sbx.dir / "config" / "llm-router"
        self.data_dir = sbx.dir / "data" / "llm-router"
        self.unit_dir = sbx.unit_dir
        self.before: set[str] = set()

    def argv(self, *args: str) -> list[str]:
        return self.sbx.exec_argv("env", f"HOME={self.home}", str(INSTALL), *args)

    def install_interactive(self, answers: list[tuple[str, str]], name: str) -> str:
        return run_interactive(self.argv("--user", "--venv", str(DEV_VENV)), answers, name)

    def install(self, *args: str, name: str, venv: Path | None = DEV_VENV,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        extra = ["--venv", str(venv)] if venv else []
        return run_install(self.argv("--user", "--yes", *extra, *args), name=name, check=check)

    def main_pid(self) -> str:
        return self.sbx.show("llm-router.service", "MainPID")["MainPID"]

    def roots(self) -> tuple[Path, ...]:
        return (self.sbx.dir / "config", self.sbx.dir / "data", self.sbx.dir / "state", self.home)


@pytest.fixture(scope="module")
def user_sbx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """A private systemd user manager of this module's own (so 'nothing left behind' is exact)."""
    need_sandbox()
    with running_sandbox(tmp_path_factory.mktemp("isbx")) as sbx:
        yield sbx


@pytest.fixture(scope="module")
def installed(user_sbx: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> UserInstall:
    home = tmp_path_factory.mktemp("home")
    inst = UserInstall(user_sbx, home, free_port(), free_port())
    inst.before = tree(*inst.roots())
    # the first install answers install.sh's questions on a terminal (the others use flags)
    out = inst.install_interactive([(r"Port the router listens on \[8002\]: ", str(inst.port)),
                                    (r"Listen address .*\[127\.0\.0\.1\]: ", ""),
                                    (r"Backends in use \(llamacpp, vllm, sglang, tabby\).*\[llamacpp\]: ", ""),
                                    (r"Port of llamacpp \[8085\]: ", str(inst.backend_port)),
                                    (r"API key clients must send .*\[none\]: ", "")],
                                   name="install-user.txt")
    assert "llm-router is running" in out, out
    assert f"URL: http://127.0.0.1:{inst.port}/v1" in out
    return inst


@pytest.mark.timeout(240)
def test_user_install_is_active_and_answers(installed: UserInstall) -> None:
    st = installed.sbx.unit_state("llm-router.service")
    assert st["ActiveState"] == "active" and st["SubState"] == "running", st
    assert installed.sbx.show("llm-router.service", "UnitFileState")["UnitFileState"] == "enabled"
    assert get_json(f"{installed.url}/health")["status"] == "ok"
    assert model_ids(installed.url) == list(yaml.safe_load((installed.config_dir / "models.yml").read_text())["models"])
    cfg = yaml.safe_load((installed.config_dir / "config.yml").read_text())
    assert cfg["systemd"]["bus"] == "user" and cfg["listen"]["port"] == installed.port
    assert cfg["backends"]["llamacpp"]["url"] == f"http://127.0.0.1:{installed.backend_port}"
    unit = (installed.unit_dir / "llm-router.service").read_text()
    assert f"ExecStart={DEV_VENV}/bin/llm-router serve --config-dir {installed.config_dir}" in unit
    assert "\nProtectSystem=strict" in unit and "\nReadWritePaths=" in unit  # hardened: root manager
    assert (installed.unit_dir / "llamacpp.service").exists()
    assert (installed.unit_dir / "llamacpp@.service").exists()  # the engine's template, installed, not started
    # the CLI from the venv talks to it
    cli = subprocess.run([str(DEV_VENV / "bin" / "llm-router"), "models", "--url", installed.url],
                         capture_output=True, text=True, timeout=30)
    assert cli.returncode == 0 and "llamacpp.service" in cli.stdout, cli.stdout + cli.stderr


@pytest.mark.timeout(120)
def test_reload_with_a_good_config_applies_it_without_restart(installed: UserInstall) -> None:
    pid = installed.main_pid()
    models = installed.config_dir / "models.yml"
    text = models.read_text()
    argv = fake_argv(installed.backend_port, "fake-model")
    # (it lingers a moment: journald cannot attribute a line to its unit when the process is gone already)
    broken = ["/bin/sh", "-c", "echo this model is broken >&2; sleep 0.3; exit 3"]
    models.write_text(text + "\n  fake-model:\n    backend: llamacpp\n"
                      f"    command: {json.dumps(argv)}\n"
                      f"  broken-model:\n    backend: llamacpp\n    command: {json.dumps(broken)}\n")
    installed.sbx.systemctl("reload", "llm-router.service")
    wait_until(lambda: "fake-model" in model_ids(installed.url), timeout=10, what="reloaded model list")
    assert installed.main_pid() == pid
    # the new model works through the hardened unit: drop-in written under ProtectSystem=strict
    with httpx.Client(trust_env=False) as c:
        res = stream_request(c, f"{installed.url}/v1/chat/completions",
                             {"model": "fake-model", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
                             timeout=60)
    assert res.status == 200 and "I am fake-model" in res.content, res.content
    dropin = installed.unit_dir / "llamacpp.service.d" / "50-llm-router.conf"
    assert "fake-model" in dropin.read_text()
    assert installed.sbx.active_state("llamacpp.service") == "active"
    # a load that fails: the hardened router still reads the unit's journal (journalctl) for the error
    r = httpx.post(f"{installed.url}/v1/chat/completions", trust_env=False, timeout=60,
                   json={"model": "broken-model", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_load_failed", r.text
    assert "this model is broken" in r.json()["error"]["message"]


@pytest.mark.timeout(120)
def test_reload_with_a_bad_config_keeps_the_old_one(installed: UserInstall) -> None:
    pid = installed.main_pid()
    models = installed.config_dir / "models.yml"
    good = models.read_text()
    before = model_ids(installed.url)
    try:
        models.write_text(good + "\n  bad-model:\n    backend: no-such-backend\n    command: /bin/true\n")
        # ExecReload= asks the daemon, which refuses: the reload itself fails, and says why
        r = installed.sbx.systemctl("reload", "llm-router.service", check=False)
        assert r.returncode != 0, r.stdout + r.stderr
        msgs = installed.sbx.journal_messages("--user-unit=llm-router.service")
        assert any("models.yml:" in m and "no-such-backend" in m for m in msgs), msgs[-10:]
        # ... and the daemon itself says so where operators look
        rejected = get_json(f"{installed.url}/status")["config"]["reload_error"]
        assert rejected and any("no-such-backend" in p for p in rejected), rejected
        assert installed.main_pid() == pid
        assert installed.sbx.active_state("llm-router.service") == "active"
        assert model_ids(installed.url) == before
        assert get_json(f"{installed.url}/health")["status"] == "ok"
    finally:
        models.write_text(good)
        installed.sbx.systemctl("reload", "llm-router.service")


@pytest.mark.timeout(240)
def test_rerun_is_idempotent_and_keeps_user_edits(installed: UserInstall) -> None:
    models = installed.config_dir / "models.yml"
    config = installed.config_dir / "config.yml"
    models_text, config_text = models.read_text(), config.read_text()
    unit_text = (installed.unit_dir / "llm-router.service").read_text()
    pid = installed.main_pid()
    p = installed.install(name="install-user-rerun.txt")
    assert models.read_text() == models_text and config.read_text() == config_text
    assert (installed.config_dir / "models.yml.dist").exists()  # models.yml was edited by the tests above
    assert (installed.config_dir / "config.yml.dist").exists()  # the defaults (port 8002) differ from it
    assert (installed.unit_dir / "llm-router.service").read_text() == unit_text
    assert "unchanged" in p.stdout and "kept your" in p.stdout
    wait_until(lambda: installed.main_pid() not in ("0", pid), timeout=20, what="router restarted")
    assert installed.sbx.active_state("llm-router.service") == "active"
    assert "fake-model" in model_ids(installed.url)
    # a third run with nothing changed in between changes nothing either
    installed.install(name="install-user-rerun2.txt")
    assert models.read_text() == models_text and config.read_text() == config_text


@pytest.mark.timeout(240)
def test_uninstall_then_purge_leaves_nothing_behind(installed: UserInstall) -> None:
    sbx = installed.sbx
    # a running instance of the installed template, from a router drop-in: uninstall stops it too
    instance = "llamacpp@tmpl.service"
    (installed.unit_dir / f"{instance}.d").mkdir()
    (installed.unit_dir / f"{instance}.d" / "50-llm-router.conf").write_text(
        "[Service]\nExecStart=\nExecStart=" + " ".join(fake_argv(free_port(), "tmpl")) + "\n")
    sbx.daemon_reload()
    sbx.start_unit(instance)
    p = run_install(installed.argv("--user", "--uninstall"), name="install-user-uninstall.txt")
    assert "uninstalled" in p.stdout
    assert port_closed(installed.port)
    for unit in ("llm-router.service", "llamacpp.service", instance):
        st = sbx.unit_state(unit)
        assert st.get("LoadState") == "not-found" and st.get("ActiveState") == "inactive", (unit, st)
    assert not (installed.unit_dir / "llamacpp.service.d").exists()  # the router's drop-in is gone
    assert not (installed.unit_dir / f"{instance}.d").exists()
    # config kept (and the history: systemd 252 puts a user unit's StateDirectory= in $XDG_CONFIG_HOME)
    kept = sorted(f for f in os.listdir(installed.config_dir) if not f.startswith("history.sqlite3"))
    assert kept == ["config.yml", "models.yml"]
    assert not installed.data_dir.exists()
    assert DEV_VENV.exists()  # --venv: not ours to remove
    run_install(installed.argv("--user", "--uninstall", "--purge"), name="install-user-purge.txt")
    left = tree(*installed.roots()) - installed.before
    assert not left, f"left behind: {sorted(left)}"


@pytest.mark.timeout(420)
def test_user_install_builds_its_own_venv(user_sbx: Sandbox, tmp_path: Path) -> None:
    """The path users take: python -m venv --system-site-packages + pip install of this checkout."""
    inst = UserInstall(user_sbx, tmp_path / "home", free_port(), free_port())
    inst.home.mkdir()
    before = tree(*inst.roots())
    venv = inst.data_dir / "venv"
    try:
        tabby_port = free_port()
        p = inst.install("--port", str(inst.port), "--backends", f"llamacpp:{inst.backend_port},tabby:{tabby_port}",
                         "--api-key", "k-123", venv=None, name="install-user-venv.txt")
        assert "Creating the venv" in p.stdout and "Key: k-123" in p.stdout
        assert oct((inst.config_dir / "config.yml").stat().st_mode & 0o777) == "0o600"  # it holds the key
        assert httpx.get(f"{inst.url}/v1/models", trust_env=False).status_code == 401
        assert httpx.get(f"{inst.url}/v1/models", headers={"Authorization": "Bearer k-123"},
                         trust_env=False).status_code == 200
        assert (venv / "bin" / "llm-router").exists()
        assert "include-system-site-packages = true" in (venv / "pyvenv.cfg").read_text()
        assert get_json(f"{inst.url}/health")["status"] == "ok"
        unit = (inst.unit_dir / "llm-router.service").read_text()
        assert f"ExecStart={venv}/bin/llm-router serve" in unit
        # TabbyAPI's config_file directory is writable for the router; its unit template is installed
        assert re.search(r"^ReadWritePaths=.* -/opt/tabbyAPI$", unit, re.M), unit
        assert (inst.unit_dir / "tabbyapi.service").exists()
        cfg = yaml.safe_load((inst.config_dir / "config.yml").read_text())
        assert cfg["backends"]["tabby"]["url"] == f"http://127.0.0.1:{tabby_port}"
        p = inst.install(venv=None, name="install-user-venv-rerun.txt")
        assert "Updating llm-router" in p.stdout
        assert get_json(f"{inst.url}/health")["status"] == "ok"
    finally:
        run_install(inst.argv("--user", "--uninstall", "--purge"), name="install-user-venv-purge.txt",
                    check=False)
    assert not venv.exists()
    assert tree(*inst.roots()) == before


# --- the demo -------------------------------------------------------------------------------------


def _switch_between_demo_models(url: str) -> list[str]:
    """Ask tiny-a then tiny-b (streamed; the demo's own first look leaves tiny-b loaded): each answer
    comes after the switch's status lines."""
    seen: list[str] = []
    with httpx.Client(trust_env=False) as c:
        for model in ("tiny-a", "tiny-b"):
            res = stream_request(c, f"{url}/v1/chat/completions",
                                 {"model": model, "stream": True, "max_tokens": 8,
                                  "messages": [{"role": "user", "content": "hello"}]}, timeout=60)
            assert res.status == 200 and res.done, res.body
            lines = [str(e["data"]["description"]) for e in res.status_events]
            assert any(ln.startswith("🔄 Switching to Tiny") for ln in lines), lines
            assert any("ready (took" in ln for ln in lines), lines
            assert res.content.strip(), "no answer text"
            assert get_json(f"{url}/status")["active_model"] == model
            seen.append(model)
    return seen


@pytest.mark.timeout(240)
def test_demo_with_its_private_systemd_manager(tmp_path: Path) -> None:
    """Where no user manager is reachable (this CI box: PID 1 is not systemd) the demo brings one."""
    need_sandbox()
    demo = tmp_path / "demo"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "DBUS_SESSION_BUS_ADDRESS")}
    argv = [str(INSTALL), "--demo", "--venv", str(DEV_VENV), "--demo-dir", str(demo), "--port", str(port)]
    try:
        p = run_install(argv, env=env, name="demo.txt")
        out = p.stdout
        assert "private systemd user manager" in out
        for needle in ("asking tiny-a", "🔄 Switching to Tiny A", "✅ Tiny A (demo, seed 1) ready",
                       "asking tiny-b", "🔄 Switching to Tiny B", "answer:", f"curl -sN http://127.0.0.1:{port}",
                       f"URL: http://127.0.0.1:{port}/v1"):
            assert needle in out, needle
        sbx_env = (demo / "sandbox" / "sbx.env").read_text()
        holder = int(re.search(r"SBX_HOLDER_PID=(\d+)", sbx_env).group(1))  # type: ignore[union-attr]
        cgroup = re.search(r"SBX_CGROUP=(\S+)", sbx_env).group(1)  # type: ignore[union-attr]
        url = f"http://127.0.0.1:{port}"
        assert _switch_between_demo_models(url) == ["tiny-a", "tiny-b"]
        dropin = demo / "sandbox" / "config" / "systemd" / "user" / "llm-router-demo-llamacpp.service.d"
        assert "tiny-b.gguf" in (dropin / "50-llm-router.conf").read_text()
        # a second --demo replaces the first one (same port, fresh state)
        run_install([*argv, "--sandbox"], env=env, name="demo-again.txt")
        assert get_json(f"{url}/health")["status"] == "ok"
        assert not Path(cgroup).exists()  # the first demo's private manager is gone
        sbx_env = (demo / "sandbox" / "sbx.env").read_text()
        holder = int(re.search(r"SBX_HOLDER_PID=(\d+)", sbx_env).group(1))  # type: ignore[union-attr]
        cgroup = re.search(r"SBX_CGROUP=(\S+)", sbx_env).group(1)  # type: ignore[union-attr]
    finally:
        stop = run_install([str(INSTALL), "--demo", "--stop", "--demo-dir", str(demo)], env=env,
                           name="demo-stop.txt", check=False)
    assert stop.returncode == 0, stop.stdout
    assert "Demo stopped" in stop.stdout
    assert not demo.exists()
    assert port_closed(port)
    wait_until(lambda: not Path(cgroup).exists(), timeout=10, what="the sandbox's cgroup removed")
    wait_until(lambda: not Path(f"/proc/{holder}").exists()
               or "Z" in Path(f"/proc/{holder}/stat").read_text().split(") ")[-1][:1],
               timeout=10, what="the sandbox's holder process gone")
    # stopping again is harmless
    again = run_install([str(INSTALL), "--demo", "--stop", "--demo-dir", str(demo)], env=env, check=False)
    assert again.returncode == 0 and "No demo to stop" in again.stdout


@pytest.mark.timeout(240)
def test_demo_in_a_running_user_manager(user_sbx: Sandbox, tmp_path: Path) -> None:
    """With a user manager at hand (here: the module's sandbox) the demo's units go into it."""
    demo = tmp_path / "demo"
    port = free_port()
    unit_dir = user_sbx.unit_dir
    before = tree(unit_dir)
    argv = user_sbx.exec_argv(str(INSTALL), "--demo", "--venv", str(DEV_VENV), "--demo-dir", str(demo),
                              "--port", str(port))
    try:
        p = run_install(argv, name="demo-user-manager.txt")
        assert "your systemd user manager" in p.stdout
        assert (unit_dir / "llm-router-demo.service").exists()
        assert user_sbx.active_state("llm-router-demo.service") == "active"
        assert _switch_between_demo_models(f"http://127.0.0.1:{port}") == ["tiny-a", "tiny-b"]
    finally:
        stop = run_install(user_sbx.exec_argv(str(INSTALL), "--demo", "--stop", "--demo-dir", str(demo)),
                           name="demo-user-manager-stop.txt", check=False)
    assert stop.returncode == 0, stop.stdout
    assert not demo.exists() and port_closed(port)
    for unit in ("llm-router-demo.service", "llm-router-demo-llamacpp.service"):
        assert user_sbx.unit_state(unit).get("LoadState") == "not-found"
    assert tree(unit_dir) == before


def test_tiny_models_and_llama_server(tmp_path: Path) -> None:
    """The project's own generator and server: deterministic models, a real llama.cpp answer."""
    pytest.importorskip("xllamacpp")
    from router.demo.tiny_gguf import make_tiny_gguf

    a, a2, b = tmp_path / "a.gguf", tmp_path / "a2.gguf", tmp_path / "b.gguf"
    make_tiny_gguf(a, seed=1)
    make_tiny_gguf(a2, seed=1)
    make_tiny_gguf(b, seed=2)
    assert a.read_bytes() == a2.read_bytes() != b.read_bytes()
    missing = subprocess.run([sys.executable, "-m", "router.demo.llama_server", "-m", str(tmp_path / "nope.gguf")],
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode == 2 and "model file not found" in missing.stderr
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "router.demo.llama_server", "-m", str(a), "--port", str(port),
                             "--alias", "tiny-a", "--n-predict", "8"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: not port_closed(port), timeout=20, what="llama_server listening")
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/health", trust_env=False).status_code == 200,
                   timeout=20, what="llama_server healthy")
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", trust_env=False, timeout=30,
                       json={"model": "x", "messages": [{"role": "user", "content": "hi"}]})
        body = r.json()
        assert body["model"] == "tiny-a" and body["usage"]["completion_tokens"] == 8
        assert body["choices"][0]["message"]["content"].strip()
        t0 = time.monotonic()
        proc.terminate()
        assert proc.wait(timeout=10) == 0 and time.monotonic() - t0 < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
