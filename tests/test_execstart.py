"""Unit tests for router.execstart: systemd ExecStart=/Environment= quoting and the router's drop-in."""

from __future__ import annotations

import pytest

from router.config import Model
from router.execstart import (
    DROPIN_NAME,
    dropin_model_id,
    format_exec,
    needs_dropin,
    quote_env,
    quote_exec_arg,
    render_dropin,
)

# The expected values follow systemd.service(5)/systemd.syntax(7): inside double quotes a backslash
# escapes (C-style), "%%" is a literal "%" and, in ExecStart= only, "$$" is a literal "$". The same
# table was checked against systemd 252: a unit running a script that dumps /proc/self/cmdline got
# exactly these arguments back.
EXEC_CASES = [
    ("plain", '"plain"'),
    ("", '""'),
    ("two words", '"two words"'),
    ("100%", '"100%%"'),
    ("%h", '"%%h"'),
    ("%%", '"%%%%"'),
    ("$HOME", '"$$HOME"'),
    ("${HOME}", '"$${HOME}"'),
    ("$$", '"$$$$"'),
    ("a\\b", '"a\\\\b"'),
    ("\\n", '"\\\\n"'),
    ('say "hi"', '"say \\"hi\\""'),
    ("it's", "\"it's\""),
    (";", '";"'),
    ("\\;", '"\\\\;"'),
    ("tab\there", '"tab\\there"'),
    ("bell\x07", '"bell\\x07"'),
    ("ünïcødé 🚀", '"ünïcødé 🚀"'),
    ("-", '"-"'),
    ("--port=8085", '"--port=8085"'),
    ('mix %a $b \\c "d"', '"mix %%a $$b \\\\c \\"d\\""'),
]


@pytest.mark.parametrize(("arg", "quoted"), EXEC_CASES)
def test_quote_exec_arg(arg: str, quoted: str) -> None:
    assert quote_exec_arg(arg) == quoted


@pytest.mark.parametrize("arg", ["a\nb", "a\rb", "a\0b", "\n"])
def test_quote_exec_arg_refuses_line_breaks_and_nul(arg: str) -> None:
    with pytest.raises(ValueError, match="line break or NUL"):
        quote_exec_arg(arg)


def test_format_exec_joins_quoted_args() -> None:
    argv = ["/usr/local/bin/llama-server", "-m", "/models/my model.gguf", "--port", "8085", "--tag", "50%"]
    assert format_exec(argv) == (
        '"/usr/local/bin/llama-server" "-m" "/models/my model.gguf" "--port" "8085" "--tag" "50%%"'
    )


def test_format_exec_refuses_empty_and_dollar_in_program() -> None:
    with pytest.raises(ValueError, match="at least the program"):
        format_exec([])
    # systemd runs the path literally but expands $ in argv[0]: no quoting would give both.
    with pytest.raises(ValueError, match=r"contains '\$'"):
        format_exec(["/opt/a$b/run", "x"])
    assert format_exec(["/opt/50%/run"]) == '"/opt/50%%/run"'


ENV_CASES = [
    ("A", "1", '"A=1"'),
    ("EMPTY", "", '"EMPTY="'),
    ("SPACES", "a b  c", '"SPACES=a b  c"'),
    ("DOLLAR", "$HOME ${X} $$", '"DOLLAR=$HOME ${X} $$"'),  # Environment= never expands $
    ("PCT", "50% %h", '"PCT=50%% %%h"'),
    ("QUOTES", "say \"hi\" 'x'", '"QUOTES=say \\"hi\\" \'x\'"'),
    ("BACKSLASH", "C:\\x\\n", '"BACKSLASH=C:\\\\x\\\\n"'),
    ("EQ", "a=b;c", '"EQ=a=b;c"'),
    ("UNI", "ünï 🚀", '"UNI=ünï 🚀"'),
    ("_x9", "tab\t", '"_x9=tab\\t"'),
]


@pytest.mark.parametrize(("name", "value", "quoted"), ENV_CASES)
def test_quote_env(name: str, value: str, quoted: str) -> None:
    assert quote_env(name, value) == quoted


@pytest.mark.parametrize(("name", "value"), [("1A", "x"), ("A-B", "x"), ("", "x"), ("A B", "x"),
                                             ("A", "x\ny"), ("A", "\0")])
def test_quote_env_refuses(name: str, value: str) -> None:
    with pytest.raises(ValueError):
        quote_env(name, value)


def test_render_dropin_with_command_and_env() -> None:
    model = Model(id="org/qwen-7b", backend="llamacpp",
                  command=("/usr/local/bin/llama-server", "-m", "/models/q 7b.gguf", "--port", "8085"),
                  env={"CUDA_VISIBLE_DEVICES": "0", "LLAMA_ARG": "$x 5%"})
    text = render_dropin(model)
    assert text == (
        "# Written by llm-router. It rewrites this file on every model switch: edits here are lost.\n"
        "# Change the model's command and environment in the router's models.yml instead.\n"
        "# llm-router-model: org/qwen-7b\n"
        "\n"
        "[Service]\n"
        "ExecStart=\n"
        'ExecStart="/usr/local/bin/llama-server" "-m" "/models/q 7b.gguf" "--port" "8085"\n'
        'Environment="CUDA_VISIBLE_DEVICES=0"\n'
        'Environment="LLAMA_ARG=$x 5%%"\n'
    )
    assert DROPIN_NAME == "50-llm-router.conf"


def test_render_dropin_env_only_keeps_the_units_exec_start() -> None:
    text = render_dropin(Model(id="m", backend="b", env={"MODEL": "b"}))
    assert "ExecStart" not in text
    assert text.endswith('[Service]\nEnvironment="MODEL=b"\n')


def test_marker_round_trip() -> None:
    for model_id in ("tiny", "org/model-1.5", "ünï", "a#b:c"):
        assert dropin_model_id(render_dropin(Model(id=model_id, backend="b", command=("/bin/x",)))) == model_id


@pytest.mark.parametrize("text", ["", "[Service]\nExecStart=/bin/x\n", "# llm-router-model:\n[Service]\n",
                                  "#llm-router-model: x\n"])
def test_dropin_model_id_none_without_marker(text: str) -> None:
    assert dropin_model_id(text) is None


def test_needs_dropin() -> None:
    assert needs_dropin(Model(id="a", backend="b", command=("/bin/x",)))
    assert needs_dropin(Model(id="a", backend="b", env={"A": "1"}))
    assert not needs_dropin(Model(id="a", backend="b"))
    assert not needs_dropin(Model(id="a", backend="b", model_name="X"))
