"""Read and rewrite `model.model_name` in a TabbyAPI-style YAML config, keeping every other byte."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode

from router import yamlsafe  # bounded: the file may come from a less trusted user

_NULL = "tag:yaml.org,2002:null"
_SECTION = "model"
_KEY = "model_name"


def read_model_name(text: str) -> str | None:
    """`model.model_name` of a YAML text, or None when it is absent, not a string, or the text is not YAML."""
    try:
        data = yamlsafe.safe_load(text)
    except yaml.YAMLError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get(_SECTION), dict):
        return None
    value = data[_SECTION].get(_KEY)
    return value if isinstance(value, str) else None


def set_model_name(text: str, name: str) -> str:
    """`text` with `model.model_name` set to `name` and nothing else changed; ValueError if that is unsafe."""
    if name == "" or any(c in name for c in "\0"):
        raise ValueError(f"cannot write model_name {name!r}: it must be a non-empty string without NUL")
    try:
        before = yamlsafe.safe_load(text)
        root = yamlsafe.compose(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"the file is not valid YAML, so it was not edited: {exc}") from exc
    if before is None:
        before = {}
    if not isinstance(before, dict) or (root is not None and not isinstance(root, MappingNode)):
        raise ValueError("the file is not a YAML mapping, so model.model_name cannot be set in it")

    newline = "\r\n" if "\r\n" in text else "\n"
    value = _scalar(name)
    if root is None or not root.value:
        result = _append_section(text, value, 2, newline)
    else:
        result = _edit(text, root, value, newline)

    expected = copy.deepcopy(before)
    expected[_SECTION] = {**(expected.get(_SECTION) or {}), _KEY: name}
    try:
        after = yamlsafe.safe_load(result)
    except yaml.YAMLError as exc:
        raise ValueError(f"setting model.model_name would break the file's YAML ({exc}); "
                         "edit it by hand") from exc
    if after != expected:
        raise ValueError("model.model_name could not be set without changing other values "
                         "(anchors, aliases, tags or an unusual layout); edit the file by hand")
    return result


def _edit(text: str, root: MappingNode, value: str, newline: str) -> str:
    if root.flow_style:
        raise ValueError("the file is written in YAML flow style ({...}); write it in block style to let "
                         "llm-router edit model.model_name")
    section = _only(root, _SECTION, "the top level")
    indent = _nested_indent(root)
    if section is None:
        return _append_section(text, value, indent, newline)
    key_node, node = section

    if isinstance(node, ScalarNode) and node.tag == _NULL:
        # `model:` with nothing (or `~`/`null`) after it: make it a block holding our key.
        if node.start_mark.index < key_node.end_mark.index:
            raise ValueError("model: refers to an alias; edit the file by hand")
        end = _line_end(text, node.end_mark.index)
        rest = _after_newline(text, end)
        line = " " * (key_node.start_mark.column + indent) + f"{_KEY}: {value}" + newline
        head = text[: node.start_mark.index] + text[node.end_mark.index : end]
        return head + (text[end:rest] or newline) + line + text[rest:]
    if not isinstance(node, MappingNode):
        raise ValueError("model: in the file is not a mapping, so model.model_name cannot be set in it")
    if node.flow_style:
        raise ValueError("model: is written in YAML flow style ({...}); write it as a block to let "
                         "llm-router edit model.model_name")
    if node.start_mark.index < key_node.end_mark.index:
        raise ValueError("model: refers to an alias (*name); edit the file by hand")

    entry = _only(node, _KEY, "model:")
    if entry is None:
        # Insert as the first line of the block, right under `model:`, with the block's indentation.
        first_key = node.value[0][0]
        at = _after_newline(text, _line_end(text, key_node.end_mark.index))
        line = " " * first_key.start_mark.column + f"{_KEY}: {value}"
        return text[:at] + line + newline + text[at:]

    name_key, old = entry
    if not isinstance(old, ScalarNode):
        raise ValueError("model.model_name in the file is not a single value; edit the file by hand")
    if old.style in ("|", ">"):
        raise ValueError("model.model_name is a block scalar (| or >); write it on one line to let "
                         "llm-router edit it")
    start, end = old.start_mark.index, old.end_mark.index
    if start < name_key.end_mark.index:
        raise ValueError("model.model_name refers to an alias (*name); edit the file by hand")
    if start == end:  # `model_name:` with an empty value
        return text[:start] + " " + value + text[end:]
    return text[:start] + value + text[end:]


def _only(mapping: MappingNode, key: str, where: str) -> tuple[Node, Node] | None:
    """The (key, value) nodes of `key` in `mapping`; ValueError if it is there twice."""
    found = [(k, v) for k, v in mapping.value if isinstance(k, ScalarNode) and k.value == key]
    if any(k.tag == "tag:yaml.org,2002:merge" for k, _ in mapping.value):
        raise ValueError(f"{where} uses a YAML merge key (<<); edit the file by hand")
    if len(found) > 1:
        lines = ", ".join(str(k.start_mark.line + 1) for k, _ in found)
        raise ValueError(f"{key}: appears {len(found)} times in {where} (lines {lines}); "
                         "remove the extra ones")
    return found[0] if found else None


def _nested_indent(root: MappingNode) -> int:
    """How far the file indents nested block mappings (2 when it has none)."""
    for key, value in root.value:
        if isinstance(value, MappingNode) and not value.flow_style and value.value:
            step = value.value[0][0].start_mark.column - key.start_mark.column
            if step > 0:
                return step
    return 2


def _append_section(text: str, value: str, indent: int, newline: str) -> str:
    sep = "" if text == "" or text.endswith(("\n", "\r")) else newline
    return f"{text}{sep}{_SECTION}:{newline}{' ' * indent}{_KEY}: {value}{newline}"


def _line_end(text: str, index: int) -> int:
    """Index of the line break ending the line that holds `index` (len(text) on the last line)."""
    match = re.compile(r"\r\n|\n|\r").search(text, index)
    return match.start() if match else len(text)


def _after_newline(text: str, line_end: int) -> int:
    if text.startswith("\r\n", line_end):
        return line_end + 2
    return min(line_end + 1, len(text))


def _scalar(name: str) -> str:
    """`name` as a YAML value: plain when that reads back as the same string, double-quoted otherwise."""
    if name.strip() == name and "\t" not in name and _reads_back(name, name):
        return name
    quoted = json.dumps(name, ensure_ascii=False)
    if _reads_back(quoted, name):
        return quoted
    return json.dumps(name, ensure_ascii=True)


def _reads_back(written: str, name: str) -> bool:
    try:
        data: Any = yamlsafe.safe_load(f"{_KEY}: {written}\n")
    except yaml.YAMLError:
        return False
    return isinstance(data, dict) and data.get(_KEY) == name
