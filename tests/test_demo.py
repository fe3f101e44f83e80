"""The demo's own pieces, without a systemd manager: its models' 8,192-token context (a real llama.cpp
server from the demo's models.yml answers a 3,000-token chat), and install.sh --demo's checks before it
builds anything: the port in use (naming who holds it), a demo that already runs, a second install.sh at
work on the same demo directory. The whole demo on systemd is tests/test_install.py's."""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from sandbox import REPO, free_port, wait_until

from router.demo import run

INSTALL = REPO / "install.sh"
DEV_VENV = Path(sys.prefix)


def words(n: int) -> str:
    """n words of English: the tiny models' tokenizer spends ~8 tokens on each (no merges, so mostly bytes)."""
    vocab = ["the", "water", "river", "model", "router", "token", "mountain", "music"]
    return " ".join(vocab[i % len(vocab)] for i in range(n))


def healthy(url: str, proc: subprocess.Popen[str]) -> bool:
    if proc.poll() is not None:
        raise RuntimeError(f"llama_server exited with {proc.returncode}: {proc.communicate()[0][-2000:]}")
    try:
        return httpx.get(f"{url}/health", trust_env=False, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_demo_models_chat_past_1024_tokens(tmp_path: Path) -> None:
    """The demo's models.yml serves each model with --ctx-size 8192, and the generated models are
    trained for that much: a 3,000-token conversation gets an answer (with 1,024 it was an HTTP 400)."""
    pytest.importorskip("xllamacpp")
    from gguf import GGUFReader

    from router.demo.tiny_gguf import make_tiny_gguf

    backend_port = free_port()
    run.main(["write-config", "--dir", str(tmp_path / "config"), "--port", str(free_port()),
              "--backend-port", str(backend_port), "--unit", "x.service", "--dropin-dir", str(tmp_path),
              "--python", sys.executable, "--models-dir", str(tmp_path / "models")])
    models = yaml.safe_load((tmp_path / "config" / "models.yml").read_text())["models"]
    for mid in run.DEMO_MODELS:
        argv = models[mid]["command"]
        assert argv[argv.index("--ctx-size") + 1] == "8192", argv
    gguf = make_tiny_gguf(tmp_path / "models" / "tiny-a.gguf", seed=1)
    assert "tiny-a.gguf" in gguf
    field = GGUFReader(str(tmp_path / "models" / "tiny-a.gguf")).fields["llama.context_length"]
    assert int(field.parts[field.data[0]][0]) == run.DEMO_CONTEXT == 8192  # n_ctx_train

    proc = subprocess.Popen(models["tiny-a"]["command"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{backend_port}"
        wait_until(lambda: healthy(url, proc), timeout=60, step=0.1, what="llama_server healthy")
        history = [{"role": "user" if i % 2 == 0 else "assistant", "content": words(60)} for i in range(6)]
        r = httpx.post(f"{url}/v1/chat/completions", trust_env=False, timeout=120,
                       json={"model": "tiny-a", "max_tokens": 8,
                             "messages": [*history, {"role": "user", "content": "And now?"}]})
        assert r.status_code == 200, r.text
        assert 2500 < r.json()["usage"]["prompt_tokens"] < 8000, r.json()["usage"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# --- install.sh --demo: the checks before anything is built ---------------------------------------------


@pytest.fixture
def listener() -> Iterator[tuple[int, subprocess.Popen[str], list[str]]]:
    """A process listening on a free port (its argv may be made to look like a demo router's)."""
    procs: list[subprocess.Popen[str]] = []

    def start(*argv: str) -> tuple[int, subprocess.Popen[str]]:
        port = free_port()
        code = textwrap.dedent(f"""
            import socket, sys, time
            s = socket.socket(); s.bind(("127.0.0.1", {port})); s.listen(); print("ok", flush=True); time.sleep(120)
        """)
        p = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout is not None and p.stdout.readline().strip() == "ok"
        return port, p

    yield start  # type: ignore[misc]
    for p in procs:
        p.kill()
        p.wait(timeout=10)


def demo(demo_dir: Path, port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(INSTALL), "--demo", "--venv", str(DEV_VENV), "--demo-dir", str(demo_dir),
                           "--port", str(port)], cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=60)


def test_check_port_names_the_holder(listener) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    assert run.check_port(port) == (run.CHECK_FREE, "")
    port, proc = listener()
    code, text = run.check_port(port)
    assert code == run.CHECK_TAKEN and f"127.0.0.1:{port} is already in use by pid {proc.pid} (" in text, text
    assert run.check_port(port, "/some/demo/config")[0] == run.CHECK_TAKEN  # not that demo's router
    port, proc = listener("router", "serve", "--config-dir", "/some/demo/config")
    assert run.check_port(port, "/some/demo/config") == (run.CHECK_DEMO, f"pid {proc.pid}")
    assert run.check_port(port, "/other/config")[0] == run.CHECK_TAKEN


def test_demo_refuses_a_port_in_use_before_building_anything(tmp_path: Path, listener) -> None:  # type: ignore[no-untyped-def]
    port, proc = listener()
    p = demo(tmp_path / "demo", port)
    assert p.returncode == 1, p.stdout + p.stderr
    assert f"the demo's port is taken: 127.0.0.1:{port} is already in use by pid {proc.pid} (" in p.stderr
    assert "--port" in p.stderr
    assert not (tmp_path / "demo").exists()  # no venv, no models, no units
    assert "Generating" not in p.stdout and "Installing" not in p.stdout


def test_a_second_demo_while_one_runs_says_so(tmp_path: Path, listener) -> None:  # type: ignore[no-untyped-def]
    """The demo's state names its port; its router holds it: the second run leaves it alone."""
    demo_dir = tmp_path / "demo"
    port, router = listener("-m", "router", "serve", "--config-dir", str(demo_dir / "config"))
    demo_dir.mkdir()
    state = f"DEMO_MANAGER=sandbox\nDEMO_UNIT_DIR=''\nDEMO_VENV_EXTERNAL=1\nDEMO_PORT={port}\n"
    (demo_dir / "demo.env").write_text(state)
    p = demo(demo_dir, free_port())
    assert p.returncode == 1, p.stdout + p.stderr
    assert (f"a demo is already running in {demo_dir}: its router (pid {router.pid}) answers on "
            f"http://127.0.0.1:{port}. Use it, or stop it first: ") in p.stderr
    assert f"--demo --stop --demo-dir {demo_dir}" in p.stderr
    assert (demo_dir / "demo.env").read_text() == state and router.poll() is None  # untouched


def test_one_install_sh_at_a_time_per_demo_directory(tmp_path: Path) -> None:
    demo_dir = tmp_path / "demo"
    lock_dir = Path("/run/lock") if os.access("/run/lock", os.W_OK) else Path(os.environ.get("TMPDIR", "/tmp"))
    lock = lock_dir / f"llm-router-demo.{hashlib.sha256(str(demo_dir).encode()).hexdigest()[:16]}.lock"
    with open(lock, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write("4242\n")
        f.flush()
        for argv in ([], ["--stop"]):
            p = subprocess.run([str(INSTALL), "--demo", *argv, "--demo-dir", str(demo_dir)], cwd=REPO,
                               stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
            assert p.returncode == 1, p.stdout + p.stderr
            assert f"another ./install.sh --demo is working on {demo_dir} right now (pid 4242)" in p.stderr
    assert not demo_dir.exists()
