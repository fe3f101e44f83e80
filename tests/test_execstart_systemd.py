"""Property test of ExecStart=/Environment= quoting against a real systemd (the sandbox's user manager).

Random argv (spaces, quotes, backslashes, %, $, ;, unicode, control characters, empty strings) and
random environment values go through the router's own drop-in writer (render_dropin + write_atomic,
as router/switcher.py writes them), the manager is reloaded and the unit's ExecStart=/Environment=
are read back over D-Bus. Then the unit runs: the process dumps
the argv it received (/proc/self/cmdline, the interpreter path included) and its environment, and
both must be exactly what models.yml said.

LLM_ROUTER_EXECSTART_EXAMPLES sets the number of examples (default 40: each costs one daemon-reload
and one unit start, ~0.3 s).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from sandbox import Sandbox, print_figures

from router.atomicfile import write_atomic
from router.config import Model
from router.execstart import DROPIN_NAME, render_dropin
from router.systemd import MANAGER_IF, SD, SERVICE_IF

pytestmark = pytest.mark.timeout(240)

EXAMPLES = int(os.environ.get("LLM_ROUTER_EXECSTART_EXAMPLES", "40"))
INTERPRETER = "/usr/bin/python3"  # stdlib only: the dump script needs no venv

DUMP_SCRIPT = """\
import json, os, sys
out = sys.argv[1]
raw = open("/proc/self/cmdline", "rb").read()
argv = [w.decode("utf-8", "surrogateescape") for w in raw.split(b"\\0")[:-1]]
env = {k: v for k, v in os.environ.items() if k.startswith("LLMR_")}
with open(out + ".tmp", "w", encoding="utf-8", errors="surrogateescape") as f:
    json.dump({"argv": argv, "env": env}, f)
os.replace(out + ".tmp", out)
"""

# Characters that quoting must get right, plus words that mean something to systemd's parser.
AWKWARD = [*' \t"\'\\%$;{}=-@:+!~#*?[]&|<>()`^', "\x01", "\x07", "\x1b", "\x7f", "\x85", "\u00a0",
           "\u2028", "\ufeff", "é", "ß", "中", "🚀"]
SPECIAL_WORDS = ["", ";", "\\;", "%", "%%", "%h", "%n", "%%h", "$", "$$", "$HOME", "${HOME}", "$$HOME",
                 "\\", "\\\\", '"', "'", '""', "\\x41", "\\n", "\\t", " ", "a b", "-", "--", "@x", "+x",
                 "!x", ":x", "\\\"", "%$", "$%", "${", "}"]

# systemd refuses a whole assignment holding a Unicode noncharacter ("String is not UTF-8 clean":
# U+FDD0..U+FDEF and U+xFFFE/U+xFFFF, systemd's unichar_is_valid()); config.py lets them through.
NONCHARACTERS = "".join(chr(c) for c in range(0xFDD0, 0xFDF0)) + "".join(
    chr(p * 0x10000 + 0xFFFE) + chr(p * 0x10000 + 0xFFFF) for p in range(17))


def systemd_clean(text: str) -> bool:
    return not any(c in NONCHARACTERS for c in text)


char = st.one_of(st.sampled_from(AWKWARD),
                 st.characters(exclude_categories=["Cs"], exclude_characters="\n\r\0" + NONCHARACTERS))
word = st.one_of(st.sampled_from(SPECIAL_WORDS), st.text(char, max_size=12))
# systemd refuses a program path with a control character, a quote or a backslash ("Executable name
# contains special characters", systemd's string_is_safe()) and drops the whole ExecStart= line.
SYSTEMD_REFUSES_IN_PROGRAM = "\"'\\" + "".join(map(chr, range(1, 32))) + "\x7f"
# The program: a symlink to python with an awkward name (config.py refuses '$' and a leading prefix
# character; '/' is the directory separator).
program_name = st.text(st.one_of(st.sampled_from([c for c in AWKWARD if c not in "$/" + SYSTEMD_REFUSES_IN_PROGRAM]),
                                 st.characters(exclude_categories=["Cs"],
                                               exclude_characters="\n\r\0/$" + SYSTEMD_REFUSES_IN_PROGRAM
                                               + NONCHARACTERS)),
                       min_size=1, max_size=10).filter(
    lambda s: s not in (".", "..") and len(s.encode()) < 200 and s[0] not in "-@:+!")
env_names = st.sampled_from(["LLMR_A", "LLMR_B", "LLMR_PATHY", "LLMR_x9", "LLMR_"])
env_values = st.dictionaries(env_names, word, max_size=3)


@dataclass
class Rig:
    sandbox: Sandbox
    unit: str
    workdir: Path
    dump: Path
    bus: Any  # a pydbus connection to the sandbox's user manager
    manager: Any


@pytest.fixture(scope="module")
def rig(sandbox: Sandbox, request: pytest.FixtureRequest) -> Iterator[Rig]:
    """One oneshot unit whose ExecStart the router's drop-in replaces, and a D-Bus connection to its manager."""
    import pydbus

    unit = f"t-execstart-prop-{uuid.uuid4().hex[:6]}.service"
    workdir = sandbox.dir / f"execprop-{uuid.uuid4().hex[:6]}"
    (workdir / "progs").mkdir(parents=True)
    dump = workdir / "dump.py"
    dump.write_text(DUMP_SCRIPT, encoding="utf-8")
    sandbox.write_unit(unit, "[Unit]\nDescription=llm-router ExecStart property test\nStartLimitIntervalSec=0\n"
                             "[Service]\nType=oneshot\nExecStart=/bin/false\n")
    sandbox.daemon_reload()
    bus = pydbus.connect(sandbox.outside_bus)
    try:
        yield Rig(sandbox, unit, workdir, dump, bus, bus.get(SD)[MANAGER_IF])
    finally:
        print_figures(request.config, "ExecStart property test",
                      [f"{len(RUNS)} argv/environment examples run through systemd (max_examples {EXAMPLES})"])
        bus.con.close_sync(None)
        sandbox.stop_units([unit])
        sandbox.remove_unit(unit)
        sandbox.daemon_reload()
        shutil.rmtree(workdir, ignore_errors=True)


RUNS: list[int] = []  # one entry per example run (hypothesis' own count is not exposed to the test)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(program=program_name, args=st.lists(word, max_size=6), env=env_values)
def test_argv_and_environment_survive_systemd(rig: Rig, program: str, args: list[str], env: dict[str, str]) -> None:
    RUNS.append(1)
    prog = rig.workdir / "progs" / program
    if not prog.is_symlink():
        prog.symlink_to(INTERPRETER)
    out = rig.workdir / f"out-{len(RUNS)}.json"
    command = (str(prog), str(rig.dump), str(out), *args)
    model = Model(id=f"prop/{len(RUNS)}", backend="b", command=command, env=env)
    text = render_dropin(model)
    note(f"drop-in:\n{text}")
    write_atomic(rig.sandbox.unit_dir / f"{rig.unit}.d" / DROPIN_NAME, text)

    rig.manager.Reload()  # the reply comes once the reload is complete
    service = rig.bus.get(SD, rig.manager.LoadUnit(rig.unit))[SERVICE_IF]
    parsed = [list(entry[1]) for entry in service.ExecStart]
    # over D-Bus systemd shows the argv as parsed, "$$" still doubled (it becomes "$" when it runs)
    assert parsed == [[a.replace("$", "$$") for a in command]], (parsed, command)
    assert list(service.Environment) == [f"{k}={v}" for k, v in env.items()]
    run = rig.sandbox.systemctl("start", rig.unit, check=False)  # oneshot: returns once the process exited
    assert run.returncode == 0, f"the unit did not run: {run.stderr} {rig.sandbox.unit_state(rig.unit)}"
    got = json.loads(out.read_text(encoding="utf-8", errors="surrogateescape"))
    out.unlink()
    # what the process really received: argv[0] as written, then every argument exactly
    assert got["argv"] == list(command), (got["argv"], command)
    assert got["env"] == env, (got["env"], env)


def test_systemd_drops_an_exec_start_with_a_noncharacter(rig: Rig) -> None:
    """What the config check below guards against: systemd ignores the whole ExecStart= line."""
    command = (INTERPRETER, str(rig.dump), str(rig.workdir / "never.json"), "x\ufdd0y")
    write_atomic(rig.sandbox.unit_dir / f"{rig.unit}.d" / DROPIN_NAME,
                 render_dropin(Model(id="nonchar", backend="b", command=command)))
    rig.manager.Reload()
    service = rig.bus.get(SD, rig.manager.LoadUnit(rig.unit))[SERVICE_IF]
    assert [list(entry[1]) for entry in service.ExecStart] == []


@pytest.mark.parametrize("command", [["/opt/bin/run\x1f"], ["/opt/it's/run"], ['/opt/say"hi"/run'],
                                     ["/opt/back\\slash/run"], ["/opt/run\ufffe"], ["/opt/run", "a\ufdd0"]])
def test_config_refuses_a_command_systemd_cannot_run(tmp_path: Path, command: list[str]) -> None:
    """A command systemd would refuse must be refused when models.yml is read, naming the model."""
    import yaml

    from router.config import ConfigError, parse_config

    config = yaml.safe_dump({"backends": {"b": {"unit": "b.service", "url": "http://127.0.0.1:9"}}})
    models = yaml.safe_dump({"models": {"m": {"backend": "b", "command": command}}})
    with pytest.raises(ConfigError, match=r"models\.m\.command"):
        parse_config(config, models, tmp_path, environ={"HOME": str(tmp_path)})
