"""The production path where systemd is PID 1, and both README commands on a minimal Debian 12.

tests/pid1/machine.sh boots a minimal Debian 12 (systemd, dbus, libpam-systemd, python3, curl: no
compilers, no python3-venv; built once with debootstrap and cached) with systemd as its PID 1, sharing
this host's network, with a copy of this checkout in /root/llm-router. On that machine, as a new user
would, in order:

1. `./install.sh --yes`: the router active under the real system manager, `Type=notify`, its hardening in
   force (read-only /, the capability bounding set, no new privileges, seccomp, ProtectKernelLogs= kept
   although the machine has no /dev/kmsg, the offline security score the README states), /health;
2. two real switches on the `llamacpp` unit under the system manager (the project's fake engine as the
   models' commands): the exact argv runs, the drop-in is 0644 in a 0755 directory and a non-root
   `systemctl cat llamacpp` shows it;
3. `systemctl reload` with a broken models.yml fails, the old configuration serves, /status and
   `llm-router status` show the rejection; a good reload clears it;
4. `systemctl restart llm-router`: the running model is adopted, its unit not restarted;
5. `./install.sh --uninstall --purge` leaves nothing behind;
6. `./install.sh --demo` as root without a login session (as with sudo: the demo lingers root for its
   lifetime and uses root's user manager), then with root's user manager from a login shell
   (`loginctl enable-linger root`, `su -l`), each followed by `--demo --stop`;
7. on a second machine, booted pristine at the start and run meanwhile: `tests/run.sh` itself — its
   OS-package step and a quick subset of the suite (llama.cpp, the systemd sandbox), so that a package
   missing from its list shows here first.

Skipped, with the reason, where the machine cannot run (not root, no systemd-nspawn/debootstrap, no
cgroup2); LLM_ROUTER_REQUIRE_PID1=1 turns that skip into a failure. The transcript of every command
(with its time) goes to $LLM_ROUTER_TEST_ARTIFACTS/pid1-transcript.txt (default build/test-artifacts/).
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
from sandbox import REPO, free_port, wait_until

MACHINE = REPO / "tests" / "pid1" / "machine.sh"
ARTIFACTS = Path(os.environ.get("LLM_ROUTER_TEST_ARTIFACTS", REPO / "build" / "test-artifacts"))
TRANSCRIPT = ARTIFACTS / "pid1-transcript.txt"
SRC = "/root/llm-router"  # the checkout inside the machine
VENV = "/opt/llm-router/venv"
FAKE = [f"{SRC}/tests/fake_backend.py"]  # run by the machine's /usr/bin/python3: standard library only
# an argv word systemd would mangle without the router's quoting
AWKWARD = '50% off $HOME "quoted" back\\slash'
QUICK_SUBSET = ["tests/test_llama_e2e.py", "tests/test_sandbox_units.py", "tests/test_reload.py"]


class Machine:
    """A booted machine: run shell scripts in it as root, each logged with its time to the transcript."""

    def __init__(self, state: Path, image: str, name: str) -> None:
        self.state = state
        self.image = image
        self.name = name
        self.steps: list[tuple[str, float, int]] = []

    def boot(self) -> None:
        t0 = time.monotonic()
        p = subprocess.run([str(MACHINE), "boot", str(self.state), self.image], capture_output=True, text=True,
                           timeout=120)
        self._log("boot", p.stdout + p.stderr, p.returncode, time.monotonic() - t0)
        if p.returncode != 0:
            pytest.fail(f"the machine did not boot:\n{p.stdout}{p.stderr}")
        # this checkout, as a clone would have it (no venvs, caches or demo state)
        excludes = [".git", ".venv", ".demo", "build", "__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info"]
        tar = subprocess.Popen(["tar", "-c", "-C", str(REPO), *[f"--exclude={e}" for e in excludes], "."],
                               stdout=subprocess.PIPE)
        p = subprocess.run([str(MACHINE), "run", str(self.state), "bash", "-c",
                            f"rm -rf {SRC} && mkdir -p {SRC} && tar -x -C {SRC}"],
                           stdin=tar.stdout, capture_output=True, text=True, timeout=120)
        assert tar.stdout is not None
        tar.stdout.close()
        tar.wait(timeout=60)
        assert p.returncode == 0 and tar.returncode == 0, p.stderr

    def poweroff(self) -> None:
        t0 = time.monotonic()
        p = subprocess.run([str(MACHINE), "poweroff", str(self.state)], capture_output=True, text=True, timeout=120)
        self._log("poweroff", p.stdout + p.stderr, p.returncode, time.monotonic() - t0)

    def sh(self, script: str, *, check: bool = True, timeout: float = 300, login: bool = False,
           what: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a bash script inside as root (login: in a login shell, `su -l root`); stdout+stderr together."""
        inner = ["su", "-l", "root", "-c", script] if login else ["bash", "-c", script]
        t0 = time.monotonic()
        try:
            p = subprocess.run([str(MACHINE), "run", str(self.state), *inner], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            self._log(what or script, out + f"\n[timed out after {timeout}s]", -1, time.monotonic() - t0)
            raise
        self._log(what or script, p.stdout, p.returncode, time.monotonic() - t0)
        if check and p.returncode != 0:
            pytest.fail(f"inside the machine, `{script}` exited {p.returncode}:\n{p.stdout[-6000:]}")
        return p

    def out(self, script: str) -> str:
        return self.sh(script).stdout.strip()

    def start(self, script: str) -> Job:
        """Run a bash script inside in the background; Job.wait() logs and returns its outcome."""
        out = open(self.state / f"job-{len(self.steps)}.out", "w+", encoding="utf-8")
        proc = subprocess.Popen([str(MACHINE), "run", str(self.state), "bash", "-c", script],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, text=True)
        return Job(self, script, proc, out, time.monotonic())

    def _log(self, what: str, output: str, rc: int, seconds: float) -> None:
        self.steps.append((what.splitlines()[0][:100], seconds, rc))
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        with TRANSCRIPT.open("a", encoding="utf-8") as f:
            f.write(f"\n### [{self.name}] $ {what}\n{output.rstrip()}\n[exit {rc}, {seconds:.1f} s]\n")

    def summary(self) -> str:
        return "\n".join(f"{s:7.1f} s  exit {rc:3}  [{self.name}] {what}" for what, s, rc in self.steps)


class Job:
    """A script running inside a machine in the background."""

    def __init__(self, machine: Machine, script: str, proc: subprocess.Popen[str], out: IO[str],
                 started: float) -> None:
        self.machine, self.script, self.proc, self.out, self.started = machine, script, proc, out, started

    def wait(self, timeout: float) -> subprocess.CompletedProcess[str]:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(timeout=30)
        self.out.seek(0)
        output = self.out.read()
        self.out.close()
        self.machine._log(self.script, output, rc, time.monotonic() - self.started)
        return subprocess.CompletedProcess(self.proc.args, rc, output)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def image() -> str:
    p = subprocess.run([str(MACHINE), "check"], capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        reason = f"cannot boot a machine with systemd as PID 1 here: {p.stdout.strip() or p.stderr.strip()}"
        if os.environ.get("LLM_ROUTER_REQUIRE_PID1"):
            pytest.fail(f"LLM_ROUTER_REQUIRE_PID1 is set but {reason}")
        pytest.skip(reason)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    TRANSCRIPT.write_text(f"# tests/test_pid1.py, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n", encoding="utf-8")
    t0 = time.monotonic()
    p = subprocess.run([str(MACHINE), "image"], capture_output=True, text=True, timeout=900)
    with TRANSCRIPT.open("a", encoding="utf-8") as f:
        f.write(f"\n### machine.sh image\n{p.stderr}{p.stdout}[exit {p.returncode}, {time.monotonic() - t0:.1f} s]\n")
    if p.returncode != 0:
        pytest.fail(f"building the image failed:\n{p.stderr[-4000:]}")
    return p.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def pristine(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Machine, Job]]:
    """A second machine, booted first: the test command's own set-up runs there while the other machine
    goes through install.sh (they share only the network: see quiet_port)."""
    m = Machine(tmp_path_factory.mktemp("pid1-pristine"), image, "run.sh")
    job: Job | None = None
    try:
        m.boot()
        installed = m.out("dpkg-query -W -f='${Status}\\n' python3-venv libgomp1 2>/dev/null | grep -c 'ok installed'"
                          " || true")
        assert installed == "0", "the image is not pristine (python3-venv or libgomp1 installed)"
        job = m.start(f"cd {SRC} && LLM_ROUTER_REQUIRE_SANDBOX=1 bash tests/run.sh -p no:cacheprovider "
                      + " ".join(QUICK_SUBSET))
        yield m, job
    finally:
        if job is not None:
            job.stop()
        m.poweroff()


@pytest.fixture(scope="module")
def machine(image: str, pristine: tuple[Machine, Job], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    m = Machine(tmp_path_factory.mktemp("pid1"), image, "install")
    started = time.monotonic()
    try:
        m.boot()
        yield m
    finally:
        m.poweroff()
        with TRANSCRIPT.open("a", encoding="utf-8") as f:
            f.write(f"\n### summary: {time.monotonic() - started:.0f} s from the first boot to the last power-off"
                    f"\n{pristine[0].summary()}\n{m.summary()}\n")


def quiet_port() -> int:
    """A free port below the kernel's ephemeral range, so that the other machine's tests, which take
    ephemeral ports (free_port), cannot pick it between now and its use."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    return free_port()


class Ports:
    def __init__(self) -> None:
        self.router, self.backend, self.demo = quiet_port(), quiet_port(), quiet_port()
        self.url = f"http://127.0.0.1:{self.router}"


@pytest.fixture(scope="module")
def ports() -> Ports:
    return Ports()


def get(url: str, timeout: float = 10) -> Any:
    r = httpx.get(url, timeout=timeout, trust_env=False)
    r.raise_for_status()
    return r.json()


def chat(url: str, model: str, timeout: float = 60) -> str:
    r = httpx.post(f"{url}/v1/chat/completions", trust_env=False, timeout=timeout,
                   json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def show(m: Machine, unit: str, *props: str) -> dict[str, str]:
    out = m.out(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def fake_model(port: int, model_id: str) -> list[str]:
    return ["/usr/bin/python3", *FAKE, "--port", str(port), "--model-id", model_id, "--note", AWKWARD]


# --- 1. install -----------------------------------------------------------------------------------------


@pytest.mark.timeout(900)
def test_install_yes_on_a_minimal_debian(machine: Machine, ports: Ports) -> None:
    machine.sh("find /etc/systemd/system | sort > /root/before-install.txt; ls /opt > /root/opt-before.txt",
               what="snapshot /etc/systemd/system and /opt")
    p = machine.sh(f"cd {SRC} && ./install.sh --yes --port {ports.router} --backends llamacpp:{ports.backend}",
                   timeout=600)
    assert "llm-router is running" in p.stdout
    assert get(f"{ports.url}/health")["status"] == "ok"


def test_router_runs_under_the_system_manager_with_its_hardening(machine: Machine) -> None:
    assert machine.out("cat /proc/1/comm") == "systemd"
    props = show(machine, "llm-router", "Type", "ActiveState", "MainPID", "ProtectSystem", "ProtectKernelLogs",
                 "NoNewPrivileges", "CapabilityBoundingSet", "UMask", "ExecReload")
    assert props["Type"] == "notify" and props["ActiveState"] == "active", props
    assert props["ProtectSystem"] == "strict" and props["ProtectKernelLogs"] == "yes", props
    assert "reload --config-dir /etc/llm-router --pid $MAINPID" in props["ExecReload"], props["ExecReload"]
    pid = props["MainPID"]
    # in force on the process itself
    status = machine.out(f"cat /proc/{pid}/status")
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    assert fields["NoNewPrivs"].strip() == "1" and fields["Seccomp"].strip() == "2", status
    caps = int(fields["CapBnd"].strip(), 16)
    chown_dac_override_dac_read_search_fowner = 0b1111
    assert caps == chown_dac_override_dac_read_search_fowner, f"CapBnd {caps:#x}"
    mounts = machine.out(f"nsenter -t {pid} -m findmnt -no OPTIONS /")
    assert mounts.split(",")[0] == "ro", mounts
    assert not machine.sh("test -e /dev/kmsg", check=False).returncode == 0, "this machine has /dev/kmsg after all"
    score = machine.out("systemd-analyze security --offline=true --no-pager /etc/systemd/system/llm-router.service"
                        " | sed -n 's/.*Overall exposure level for .*: \\([0-9.]*\\).*/\\1/p'")
    readme = (REPO / "README.md").read_text()
    assert f"**{score} OK**" in readme, f"the installed unit scores {score}, the README says otherwise"


# --- 2. two switches under the system manager -------------------------------------------------------------


@pytest.mark.timeout(180)
def test_two_switches_on_the_llamacpp_unit(machine: Machine, ports: Ports) -> None:
    models = {"fake-a": fake_model(ports.backend, "fake-a"), "fake-b": fake_model(ports.backend, "fake-b")}
    text = "models:\n" + "".join(f"  {k}:\n    backend: llamacpp\n    command: {json.dumps(v)}\n"
                                 for k, v in models.items())
    machine.sh(f"cp /etc/llm-router/models.yml /root/models.yml.orig && printf %s {shlex.quote(text)} "
               "> /etc/llm-router/models.yml && systemctl reload llm-router", what="models.yml: fake-a, fake-b; reload")
    for model in ("fake-a", "fake-b"):
        assert chat(ports.url, model).startswith(f"I am {model}.")
        pid = show(machine, "llamacpp", "MainPID")["MainPID"]
        argv = machine.out(f"tr '\\0' '\\n' < /proc/{pid}/cmdline").split("\n")
        assert argv == models[model], f"{model}: ran {argv}"
    assert get(f"{ports.url}/status")["active_model"] == "fake-b"
    # the drop-in: readable by everyone, in a directory everyone can list
    modes = machine.out("stat -c '%a %n' /etc/systemd/system/llamacpp.service.d "
                        "/etc/systemd/system/llamacpp.service.d/50-llm-router.conf")
    assert modes.splitlines() == ["755 /etc/systemd/system/llamacpp.service.d",
                                  "644 /etc/systemd/system/llamacpp.service.d/50-llm-router.conf"], modes
    cat = machine.out("setpriv --reuid=nobody --regid=nogroup --clear-groups systemctl cat llamacpp.service")
    assert "50-llm-router.conf" in cat and "fake-b" in cat, cat


# --- 3. a rejected reload -------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_broken_reload_fails_the_old_config_serves_and_status_shows_it(machine: Machine, ports: Ports) -> None:
    pid = show(machine, "llm-router", "MainPID")["MainPID"]
    machine.sh("cp /etc/llm-router/models.yml /root/models.good && "
               "printf '  fake-c:\\n    backend: no-such-backend\\n' >> /etc/llm-router/models.yml",
               what="break models.yml")
    r = machine.sh("systemctl reload llm-router", check=False)
    assert r.returncode != 0
    journal = machine.out("journalctl -u llm-router --no-pager -n 30")
    assert "no-such-backend" in journal and "REJECTED" in journal, journal
    assert show(machine, "llm-router", "ActiveState", "MainPID") == {"ActiveState": "active", "MainPID": pid}
    assert chat(ports.url, "fake-a").startswith("I am fake-a.")  # the old config serves
    rejected = get(f"{ports.url}/status")["config"]["reload_error"]
    assert rejected and "no-such-backend" in rejected[0], rejected
    cli = machine.sh(f"{VENV}/bin/llm-router status")  # finds the daemon although the files are invalid
    assert "last reload REJECTED" in cli.stdout and "no-such-backend" in cli.stdout, cli.stdout
    machine.sh("cp /root/models.good /etc/llm-router/models.yml && systemctl reload llm-router",
               what="restore models.yml; reload")
    assert get(f"{ports.url}/status")["config"]["reload_error"] is None


# --- 4. restart: adoption ---------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_restart_adopts_the_running_model(machine: Machine, ports: Ports) -> None:
    active = get(f"{ports.url}/status")["active_model"]
    assert active in ("fake-a", "fake-b")
    before = show(machine, "llamacpp", "InvocationID", "MainPID")
    router_pid = show(machine, "llm-router", "MainPID")["MainPID"]
    machine.sh("systemctl restart llm-router")
    assert show(machine, "llm-router", "MainPID")["MainPID"] != router_pid
    wait_until(lambda: get(f"{ports.url}/health"), timeout=30, what="/health after the restart")
    assert get(f"{ports.url}/status")["active_model"] == active
    assert chat(ports.url, active).startswith(f"I am {active}.")
    assert show(machine, "llamacpp", "InvocationID", "MainPID") == before, "the backend was restarted"


# --- 5. uninstall ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_uninstall_purge_leaves_nothing(machine: Machine) -> None:
    machine.sh(f"cd {SRC} && ./install.sh --uninstall --purge")
    machine.sh("find /etc/systemd/system | sort > /root/after-uninstall.txt; ls /opt > /root/opt-after.txt")
    diff = machine.sh("diff /root/before-install.txt /root/after-uninstall.txt && "
                      "diff /root/opt-before.txt /root/opt-after.txt", check=False)
    assert diff.returncode == 0, f"left behind:\n{diff.stdout}"
    assert machine.sh("test -e /etc/llm-router", check=False).returncode != 0
    units = machine.out("systemctl list-units --all --no-legend --plain 'llm-router*' 'llamacpp*'")
    assert units == "", units


# --- 6. the demo, with root's user manager -------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_demo_as_root_without_a_session_uses_roots_user_manager(machine: Machine, ports: Ports) -> None:
    """`sudo ./install.sh --demo`: no login session, so no user manager for root; systemd is PID 1, so no
    private manager either (its cgroup would sit outside systemd's tree): root's own, lingering meanwhile."""
    p = machine.sh(f"cd {SRC} && ./install.sh --demo --port {ports.demo}", timeout=500)
    assert "(root's systemd user manager, user@0.service)" in p.stdout, p.stdout[:2000]
    assert "The llm-router demo is running" in p.stdout
    assert machine.out("loginctl show-user root -p Linger --value") == "yes"
    assert machine.out("XDG_RUNTIME_DIR=/run/user/0 systemctl --user is-active llm-router-demo.service") == "active"
    assert get(f"http://127.0.0.1:{ports.demo}/health")["active_model"] == "tiny-b"
    stop = machine.sh(f"cd {SRC} && ./install.sh --demo --stop")
    assert "disable-linger root" in stop.stdout
    assert machine.sh("test -e /var/lib/systemd/linger/root", check=False).returncode != 0
    assert machine.sh(f"test -e {SRC}/.demo", check=False).returncode != 0



@pytest.mark.timeout(600)
def test_demo_with_roots_user_manager(machine: Machine, ports: Ports) -> None:
    machine.sh("loginctl enable-linger root")
    p = machine.sh(f"cd {SRC} && ./install.sh --demo --port {ports.demo}", login=True, timeout=500)
    assert "(your systemd user manager)" in p.stdout, p.stdout[:2000]
    assert "Switching to Tiny B" in p.stdout and "The llm-router demo is running" in p.stdout
    assert get(f"http://127.0.0.1:{ports.demo}/health")["active_model"] == "tiny-b"
    machine.sh(f"cd {SRC} && ./install.sh --demo --stop", login=True)
    assert machine.sh(f"test -e {SRC}/.demo", check=False).returncode != 0
    machine.sh("loginctl disable-linger root")
    # the private manager is for hosts without systemd: here its cgroup would sit beside system.slice
    forced = machine.sh(f"cd {SRC} && ./install.sh --demo --sandbox --port {ports.demo}", check=False)
    assert forced.returncode != 0 and "--sandbox is for hosts where systemd is not PID 1" in forced.stdout
    assert machine.out("ls /sys/fs/cgroup | grep -c '^sbx-' || true") == "0"


# --- 7. the test command's own set-up, on a pristine machine ------------------------------------------------


@pytest.mark.timeout(900)
def test_the_test_command_sets_up_a_minimal_debian(pristine: tuple[Machine, Job]) -> None:
    """tests/run.sh on the other machine (booted pristine at the start): its OS-package step, then a quick
    subset (llama.cpp, the systemd sandbox) that fails if a package it loads is missing from its list."""
    _, job = pristine
    p = job.wait(timeout=800)
    assert p.returncode == 0, p.stdout[-6000:]
    assert "installing missing Debian packages" in p.stdout
    summary = [line for line in p.stdout.splitlines() if re.search(r"\b\d+ passed\b", line)]
    assert summary and "skipped" not in summary[-1] and "failed" not in summary[-1], p.stdout[-3000:]
