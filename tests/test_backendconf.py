"""Unit tests for router.backendconf: model.model_name rewritten in place, everything else kept byte for byte."""

from __future__ import annotations

import pytest
import yaml

from router.backendconf import read_model_name, set_model_name

TABBY = """\
# Sample YAML file for configuration.
# Comment and uncomment values as needed.

# Options for networking
network:
    # The IP to host on (default: 127.0.0.1).
    host: 127.0.0.1

    # The port to host on (default: 5000).
    port: 5000

# Options for model overrides and loading
model:
    # Overrides the directory to look for models (default: models).
    model_dir: /srv/models

    # An initial model to load.
    # Make sure the model is located in the model directory!
    model_name: Old-Model-exl2   # set by llm-router

    # Max sequence length (default: Empty).
    max_seq_len: 32768

draft_model:
    # model_name: not-this-one
    draft_model_name:
"""


def changed_lines(before: str, after: str) -> list[tuple[str, str]]:
    a, b = before.splitlines(keepends=True), after.splitlines(keepends=True)
    assert len(a) == len(b)
    return [(x, y) for x, y in zip(a, b, strict=True) if x != y]


def test_read_model_name() -> None:
    assert read_model_name(TABBY) == "Old-Model-exl2"
    assert read_model_name("model:\n  model_dir: x\n") is None
    assert read_model_name("network: {}\n") is None
    assert read_model_name("model: null\n") is None
    assert read_model_name("model:\n  model_name: 7\n") is None
    assert read_model_name("") is None
    assert read_model_name("model: [\n") is None  # not YAML: nothing to adopt
    assert read_model_name("- a\n") is None


def test_only_the_value_changes() -> None:
    result = set_model_name(TABBY, "Mistral-Large-Instruct-2411-exl2")
    assert changed_lines(TABBY, result) == [
        ("    model_name: Old-Model-exl2   # set by llm-router\n",
         "    model_name: Mistral-Large-Instruct-2411-exl2   # set by llm-router\n"),
    ]
    assert read_model_name(result) == "Mistral-Large-Instruct-2411-exl2"
    assert set_model_name(result, "Old-Model-exl2") == TABBY


def test_same_name_is_a_no_op() -> None:
    assert set_model_name(TABBY, "Old-Model-exl2") == TABBY


@pytest.mark.parametrize(
    ("name", "written"),
    [
        ("Qwen2.5-72B-exl2_4.0bpw", "Qwen2.5-72B-exl2_4.0bpw"),
        ("org/model", "org/model"),
        ("ünïcødé", "ünïcødé"),
        ("a: b", '"a: b"'),
        ("x #y", '"x #y"'),
        ("#x", '"#x"'),
        ("true", '"true"'),
        ("null", '"null"'),
        ("123", '"123"'),
        ("1.5", '"1.5"'),
        (" lead", '" lead"'),
        ("trail ", '"trail "'),
        ("*alias", '"*alias"'),
        ("&anchor", '"&anchor"'),
        ("'single'", "\"'single'\""),
        ("[x]", '"[x]"'),
        ("tab\tx", '"tab\\tx"'),
        ('say "x', 'say "x'),
        ("line\nbreak", '"line\\nbreak"'),
    ],
)
def test_quoting(name: str, written: str) -> None:
    result = set_model_name(TABBY, name)
    ((_, line),) = changed_lines(TABBY, result)
    assert line == f"    model_name: {written}   # set by llm-router\n"
    assert yaml.safe_load(result)["model"]["model_name"] == name
    assert read_model_name(result) == name


def test_quoted_and_empty_old_values() -> None:
    assert set_model_name('model:\n  model_name: "a b"  # c\n', "x") == "model:\n  model_name: x  # c\n"
    assert set_model_name("model:\n  model_name: 'a'\n", "x") == "model:\n  model_name: x\n"
    assert set_model_name("model:\n  model_name:\n  other: 1\n", "x") == "model:\n  model_name: x\n  other: 1\n"
    assert set_model_name("model:\n  model_name: ~ # none\n", "x") == "model:\n  model_name: x # none\n"


def test_key_inserted_as_first_line_of_the_block() -> None:
    text = "# top\nmodel:   # the model\n\n    # where models live\n    model_dir: /srv/models\nother: 1\n"
    assert set_model_name(text, "New") == (
        "# top\nmodel:   # the model\n    model_name: New\n\n    # where models live\n    model_dir: /srv/models\n"
        "other: 1\n"
    )


def test_section_appended_when_missing() -> None:
    assert set_model_name("network:\n    port: 5000\n", "New") == (
        "network:\n    port: 5000\nmodel:\n    model_name: New\n"
    )
    assert set_model_name("a: 1  # no newline at end", "New") == (
        "a: 1  # no newline at end\nmodel:\n  model_name: New\n"
    )
    assert set_model_name("", "New") == "model:\n  model_name: New\n"
    assert set_model_name("# only a comment\n", "New") == "# only a comment\nmodel:\n  model_name: New\n"


def test_empty_model_section_gets_the_key() -> None:
    assert set_model_name("model:\nother: 1\n", "N") == "model:\n  model_name: N\nother: 1\n"
    assert set_model_name("model:", "N") == "model:\n  model_name: N\n"
    assert set_model_name("model: ~  # later\n", "N") == "model:   # later\n  model_name: N\n"


def test_crlf_line_endings_kept() -> None:
    text = "network:\r\n  port: 5000\r\nmodel:\r\n  model_dir: x\r\n"
    assert set_model_name(text, "N") == "network:\r\n  port: 5000\r\nmodel:\r\n  model_name: N\r\n  model_dir: x\r\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- a\n- b\n", "not a YAML mapping"),
        ("just text\n", "not a YAML mapping"),
        ("model: [\n", "not valid YAML"),
        ("{model: {model_name: a}}\n", "flow style"),
        ("model: {model_name: a}\n", "flow style"),
        ("model: [a]\n", "model: in the file is not a mapping"),
        ("model: name\n", "model: in the file is not a mapping"),
        ("model:\n  model_name: a\n  model_name: b\n", "appears 2 times"),
        ("model:\n  model_name: |\n    a\n", "block scalar"),
        ("model:\n  model_name: [a]\n", "not a single value"),
        ("n: &n x\nmodel:\n  model_name: *n\n", "alias"),
        ("base: &b {model_dir: x}\nmodel:\n  <<: *b\n", "merge key"),
    ],
)
def test_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        set_model_name(text, "New")


def test_refuses_empty_name() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        set_model_name(TABBY, "")


BOMB = "a: &a {x0: 1, x1: 2}\n" + "".join(
    f"b{i}: &b{i} {{<<: [{', '.join(['*' + ('a' if i == 1 else f'b{i - 1}')] * 9)}], y{i}: 1}}\n"
    for i in range(1, 10)
) + "model: {<<: *b9}\n"
LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
) + "model:\n  model_name: old\n"


@pytest.mark.timeout(10)
@pytest.mark.parametrize("text", [BOMB, LAUGHS, "model: " + "[" * 5000 + "]" * 5000 + "\n"])
def test_yaml_bombs_and_deep_nesting_are_refused_not_expanded(text: str) -> None:
    assert read_model_name(text) is None
    with pytest.raises(ValueError, match="the file is not valid YAML, so it was not edited"):
        set_model_name(text, "new")
