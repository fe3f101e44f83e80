"""The `llm-router` command: `check` on broken and valid config directories (no daemon needed), and
`models`, `status`, `switch`, `unload` against a running router on the systemd sandbox.

Every command runs as a real subprocess (`python -m router ...`), the way an operator runs it, and is
judged by its exit code, stdout and stderr."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from sandbox import REPO, RouterHandle, Sandbox, Units, chat_body, free_port, one_backend

pytestmark = pytest.mark.timeout(60)

Router = Callable[..., RouterHandle]

CONFIG = """\
listen: {host: 127.0.0.1, port: 8002}
backends:
  llamacpp: {unit: llamacpp.service, url: "http://127.0.0.1:8085"}
"""
MODELS = """\
models:
  tiny-a:
    backend: llamacpp
    command: [/usr/local/bin/llama-server, -m, /models/a.gguf, --port, "8085"]
  tiny-b:
    backend: llamacpp
    command: [/usr/local/bin/llama-server, -m, /models/b.gguf, --port, "8085"]
"""


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run `llm-router ARGS` (this venv's `python -m router`) outside the sandbox, with a clean environment:
    no LLM_ROUTER_* variables from the caller unless `env` sets them."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("LLM_ROUTER_")}
    return subprocess.run([sys.executable, "-m", "router", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**base, **(env or {})})


def write_dir(directory: Path, config: str = CONFIG, models: str = MODELS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.yml").write_text(config, encoding="utf-8")
    (directory / "models.yml").write_text(models, encoding="utf-8")
    return directory


PROBLEM_RE = re.compile(r"^(?P<file>/\S+\.yml):(?P<line>\d+): (?P<message>.+)$")


def check_fails(directory: Path) -> list[tuple[str, int, str]]:
    """`llm-router check --config-dir DIR` on a broken directory: exit 1, nothing on stdout, and every
    stderr line is `DIR/FILE:LINE: message`; returns them as (file name, line, message)."""
    r = cli("check", "--config-dir", str(directory))
    assert r.returncode == 1, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    assert r.stdout == "", r.stdout
    lines = r.stderr.splitlines()
    assert lines, "no problem reported on stderr"
    found = []
    for line in lines:
        m = PROBLEM_RE.match(line)
        assert m, f"not a `FILE:LINE: problem` line: {line!r}\nstderr: {r.stderr}"
        assert Path(m["file"]).parent == directory, line
        found.append((Path(m["file"]).name, int(m["line"]), m["message"]))
    return found


def only_problem(directory: Path) -> tuple[str, int, str]:
    found = check_fails(directory)
    assert len(found) == 1, found
    return found[0]


# --- check -------------------------------------------------------------------------------------------


def test_check_valid_pair_exits_0_with_a_summary(tmp_path: Path) -> None:
    d = write_dir(tmp_path / "etc", models=MODELS.replace("/usr/local/bin/llama-server", sys.executable))
    r = cli("check", "--config-dir", str(d))
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert r.stdout.strip() == (f"{d}: OK, 2 models on 1 backend (llamacpp), listening on 127.0.0.1:8002")


def test_check_shipped_defaults_pass() -> None:
    r = cli("check", "--config-dir", str(REPO / "etc" / "llm-router"))
    assert r.returncode == 0, r.stderr
    assert ": OK, " in r.stdout


def test_check_bad_yaml(tmp_path: Path) -> None:
    d = write_dir(tmp_path, config="listen:\n  port: 8002\n  host: 127.0.0.1: x\n" + CONFIG.split("\n", 1)[1])
    assert only_problem(d) == ("config.yml", 3, "invalid YAML: mapping values are not allowed here")


def test_check_bad_yaml_in_models(tmp_path: Path) -> None:
    d = write_dir(tmp_path, models="models:\n  tiny-a:\n    backend: llamacpp\n\tcommand: /bin/a\n")
    assert only_problem(d) == ("models.yml", 4, "invalid YAML: while scanning for the next token: found "
                                                "character '\\t' that cannot start any token")


def test_check_unknown_key_in_config(tmp_path: Path) -> None:
    d = write_dir(tmp_path, config="listen: {host: 127.0.0.1, port: 8002}\nswtich:\n  load_timeout: 10\n"
                  + CONFIG.split("\n", 1)[1])
    name, line, message = only_problem(d)
    assert (name, line) == ("config.yml", 2)
    assert message.startswith("swtich: unknown key; did you mean 'switch'?"), message


def test_check_unknown_key_in_a_model(tmp_path: Path) -> None:
    d = write_dir(tmp_path, models="models:\n  tiny-a:\n    backend: llamacpp\n    comand: /bin/a\n")
    name, line, message = only_problem(d)
    assert (name, line) == ("models.yml", 4)
    assert message.startswith("models.tiny-a.comand: unknown key; did you mean 'command'?"), message


def test_check_unknown_backend(tmp_path: Path) -> None:
    d = write_dir(tmp_path, models="models:\n  tiny-a:\n    command: /bin/a\n    backend: llama\n")
    assert only_problem(d) == ("models.yml", 4,
                               "models.tiny-a.backend: unknown backend 'llama'; known backends: llamacpp")


def test_check_missing_command_on_a_backend_shared_by_two_models(tmp_path: Path) -> None:
    d = write_dir(tmp_path, models="models:\n  tiny-a: {backend: llamacpp, command: /bin/a}\n"
                                   "  tiny-b: {backend: llamacpp}\n")
    name, line, message = only_problem(d)
    assert (name, line) == ("models.yml", 3)
    assert message.startswith("models.tiny-b: backend 'llamacpp' serves several models (tiny-a, tiny-b), so "
                              "each needs its own `command`"), message


def test_check_duplicate_model_id(tmp_path: Path) -> None:
    d = write_dir(tmp_path, models="models:\n  tiny-a: {backend: llamacpp, command: /bin/a}\n"
                                   "  tiny-b: {backend: llamacpp, command: /bin/b}\n"
                                   "  tiny-a: {backend: llamacpp, command: /bin/c}\n")
    name, line, message = only_problem(d)
    assert (name, line) == ("models.yml", 4)
    assert message.startswith("models.tiny-a: duplicate key (first defined on line 2)"), message


def test_check_newline_in_a_command_argument(tmp_path: Path) -> None:
    d = write_dir(tmp_path, models='models:\n  tiny-a:\n    backend: llamacpp\n'
                                   '    command: [/bin/x, --flag, "a\\nb"]\n')
    name, line, message = only_problem(d)
    assert (name, line) == ("models.yml", 4)
    assert message.startswith("models.tiny-a.command: argument 2 ('a\\nb') contains a line break"), message


def test_check_reports_several_problems_together_in_file_and_line_order(tmp_path: Path) -> None:
    d = write_dir(
        tmp_path,
        config="listen: {host: 127.0.0.1, port: 8002}\nswtich: {}\n"
               "backends:\n  llamacpp: {unit: llamacpp.service, url: \"http://127.0.0.1:8085\"}\n",
        models="models:\n"
               "  tiny-a: {backend: llamacpp, command: [/bin/a, \"x\\ny\"]}\n"
               "  tiny-b: {backend: nope, command: /bin/b}\n"
               "  tiny-c: {backend: llamacpp, comand: /bin/c}\n"
               "  tiny-b: {backend: llamacpp, command: /bin/d}\n",
    )
    found = check_fails(d)
    assert [(f, n, m.split(":")[0]) for f, n, m in found] == [
        ("config.yml", 2, "swtich"),
        ("models.yml", 2, "models.tiny-a.command"),
        ("models.yml", 3, "models.tiny-b.backend"),
        ("models.yml", 4, "models.tiny-c.comand"),
        ("models.yml", 5, "models.tiny-b"),
    ], found


def test_check_honours_the_config_dir_variable(tmp_path: Path) -> None:
    good = write_dir(tmp_path / "good")
    bad = write_dir(tmp_path / "bad", models="models:\n  tiny-a: {backend: llama, command: /bin/a}\n")
    r = cli("check", env={"LLM_ROUTER_CONFIG_DIR": str(good)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{good}: OK, "), r.stdout
    r = cli("check", env={"LLM_ROUTER_CONFIG_DIR": str(bad)})
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.splitlines() == [f"{bad}/models.yml:2: models.tiny-a.backend: unknown backend 'llama'; "
                                     "known backends: llamacpp"], r.stderr
    # --config-dir wins over the variable
    r = cli("check", "--config-dir", str(good), env={"LLM_ROUTER_CONFIG_DIR": str(bad)})
    assert r.returncode == 0 and r.stdout.startswith(f"{good}: OK, "), (r.stdout, r.stderr)


def test_check_missing_directory_names_both_files(tmp_path: Path) -> None:
    d = tmp_path / "nowhere"
    r = cli("check", "--config-dir", str(d))
    assert r.returncode == 1
    assert f"{d}/config.yml: file not found" in r.stderr and f"{d}/models.yml: file not found" in r.stderr


# --- the daemon commands -----------------------------------------------------------------------------


def rows(table: str) -> list[list[str]]:
    return [line.split() for line in table.strip().splitlines()]


def test_models_prints_a_table(sandbox: Sandbox, units: Units, router: Router) -> None:
    rt, u = one_backend(units, router)
    r = cli("models", "--config-dir", str(rt.config_dir))
    assert r.returncode == 0, r.stderr
    assert rows(r.stdout) == [["MODEL", "BACKEND", "UNIT", "STATE", "REQUESTS", "FAILED", "TOKENS_IN/OUT", "TOK/S",
                               "TTFT", "LOAD"],
                              ["m-a", "fake", u.name, "unloaded", *["-"] * 6],
                              ["m-b", "fake", u.name, "unloaded", *["-"] * 6]], r.stdout
    with rt.client() as c:
        assert c.post("/v1/chat/completions", json=chat_body("m-b")).status_code == 200
    r = cli("models", "--url", rt.url)
    assert r.returncode == 0, r.stderr
    assert [row[:4] for row in rows(r.stdout)[1:]] == [["m-a", "fake", u.name, "unloaded"],
                                                       ["m-b", "fake", u.name, "loaded"]]


def test_switch_prints_progress_and_loads_the_model(sandbox: Sandbox, units: Units, router: Router) -> None:
    rt, u = one_backend(units, router, per_model={"m-b": {"args": ["--load-delay", "2.5"]}})
    r = cli("switch", "m-b", "--config-dir", str(rt.config_dir))
    assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    lines = r.stdout.splitlines()
    assert lines[0] == "🔄 Switching to m-b…", lines
    loading = [ln for ln in lines if ln.startswith("⏳ ")]
    assert loading and all(re.fullmatch(r"⏳ Loading m-b… \d+s/20s", ln) for ln in loading), lines
    assert re.fullmatch(r"✅ m-b is loaded \(took \d+\.\ds\)", lines[-1]), lines
    st = rt.status()
    assert st["active_model"] == "m-b" and st["switch"] is None
    assert sandbox.active_state(u.name) == "active"
    # again: nothing to do
    r = cli("switch", "m-b", "--url", rt.url)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["✅ m-b is loaded (already)"]
    assert rt.status()["switches"] == 1


def test_switch_unknown_model_names_the_known_ones(sandbox: Sandbox, units: Units, router: Router) -> None:
    rt, _ = one_backend(units, router)
    r = cli("switch", "nope", "--config-dir", str(rt.config_dir))
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "nope" in r.stderr and "m-a, m-b" in r.stderr, r.stderr
    assert rt.status()["switches"] == 0


def test_switch_to_a_failing_model_shows_the_journal_tail(sandbox: Sandbox, units: Units, router: Router) -> None:
    rt, u = one_backend(units, router, models=("m-ok", "m-bad"), per_model={"m-bad": {"args": ["--exit-code", "3"]}})
    r = cli("switch", "m-bad", "--config-dir", str(rt.config_dir))
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stdout.splitlines()[0] == "🔄 Switching to m-bad…", r.stdout
    assert "✅" not in r.stdout
    assert r.stderr.startswith("❌ "), r.stderr
    assert "m-bad" in r.stderr and u.name in r.stderr, r.stderr
    assert "cannot load weights for m-bad" in r.stderr, f"no journal tail in: {r.stderr}"
    assert rt.status()["active_model"] is None


def test_status_text_and_json(sandbox: Sandbox, units: Units, router: Router) -> None:
    rt, u = one_backend(units, router)
    r = cli("status", "--config-dir", str(rt.config_dir))
    assert r.returncode == 0, r.stderr
    assert "loaded:   (none)" in r.stdout.splitlines(), r.stdout
    assert f"unit {u.name}: inactive (dead)" in r.stdout, r.stdout

    assert cli("switch", "m-a", "--url", rt.url).returncode == 0
    r = cli("status", "--config-dir", str(rt.config_dir))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "loaded:   m-a", lines
    assert f"unit {u.name}: active (running)" in lines, lines
    assert any(re.fullmatch(r"last switch: m-a in \d+\.\ds, ok", ln) for ln in lines), lines
    assert any(ln.startswith("gpu: ") for ln in lines), lines

    r = cli("status", "--json", "--config-dir", str(rt.config_dir))
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["active_model"] == "m-a" and st["switches"] == 1
    assert st["units"][u.name]["active_state"] == "active"


def test_unload_stops_the_unit(sandbox: Sandbox, units: Units, router: Router) -> None:
    rt, u = one_backend(units, router)
    r = cli("unload", "--config-dir", str(rt.config_dir))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "nothing was loaded"

    assert cli("switch", "m-a", "--url", rt.url).returncode == 0
    assert sandbox.systemctl("is-active", u.name, check=False).stdout.strip() == "active"
    r = cli("unload", "--config-dir", str(rt.config_dir))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"stopped {u.name}"
    assert sandbox.systemctl("is-active", u.name, check=False).stdout.strip() == "inactive"
    assert rt.status()["active_model"] is None


def test_api_key_from_the_config_dir(sandbox: Sandbox, units: Units, router: Router) -> None:
    rt, u = one_backend(units, router, api_key="s3cret-key")
    r = cli("models", "--config-dir", str(rt.config_dir))
    assert r.returncode == 0, r.stderr
    assert rows(r.stdout)[1][:4] == ["m-a", "fake", u.name, "unloaded"]
    r = cli("switch", "m-a", "--config-dir", str(rt.config_dir))
    assert r.returncode == 0, r.stderr
    # without the config dir the CLI has no key: the daemon refuses, and the CLI says so
    r = cli("status", "--url", rt.url)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.startswith("llm-router: Missing or wrong API key"), r.stderr
    # the key from the environment or the flag
    assert cli("status", "--url", rt.url, env={"LLM_ROUTER_API_KEY": "s3cret-key"}).returncode == 0
    r = cli("status", "--json", "--url", rt.url, "--api-key", "s3cret-key")
    assert r.returncode == 0 and json.loads(r.stdout)["active_model"] == "m-a", r.stderr


@pytest.mark.parametrize("command", [["models"], ["status"], ["status", "--json"], ["switch", "m-a"], ["unload"]],
                         ids=" ".join)
def test_unreachable_daemon_exits_3(tmp_path: Path, command: list[str]) -> None:
    port = free_port()  # nothing listens there
    d = write_dir(tmp_path, config=CONFIG.replace("port: 8002", f"port: {port}"))
    r = cli(*command, "--config-dir", str(d))
    assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    assert f"cannot reach the daemon at http://127.0.0.1:{port}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = cli(*command, "--url", f"http://127.0.0.1:{port}")
    assert r.returncode == 3 and f"cannot reach the daemon at http://127.0.0.1:{port}" in r.stderr, r.stderr


def test_error_text_of_an_answer_that_is_not_json() -> None:
    """A proxy in front of the daemon may answer HTML: the CLI says so instead of a traceback."""
    import httpx

    from router.cli import _error_text

    assert _error_text(httpx.Response(502, text="<html>Bad Gateway</html>")) == "HTTP 502: <html>Bad Gateway</html>"
    assert _error_text(httpx.Response(404, json={"error": {"message": "no such model"}})) == "no such model"


def test_check_warns_about_a_program_that_is_not_there(tmp_path: Path) -> None:
    d = tmp_path / "etc"
    d.mkdir()
    (d / "config.yml").write_text("backends:\n  b: {unit: b.service, url: 'http://127.0.0.1:1'}\n")
    (d / "models.yml").write_text("models:\n  m: {backend: b, command: [/nonexistent/llama-server, -m, x]}\n")
    r = cli("check", "--config-dir", str(d))
    assert r.returncode == 0, r.stderr  # a warning: the file may appear before the model is asked for
    assert "warning: models.m.command: /nonexistent/llama-server is not an executable file" in r.stderr
