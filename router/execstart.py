"""Render the systemd drop-in the router owns: ExecStart=/Environment= quoting and the model marker."""

from __future__ import annotations

import re
from collections.abc import Sequence

from router.config import Model

DROPIN_NAME = "50-llm-router.conf"
MARKER = "# llm-router-model:"

_REFUSED = ("\n", "\r", "\0")  # a unit file line cannot carry these (systemd ends lines at \n and \r)
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# Other control characters are written as C escapes, which systemd decodes inside quoted words.
_CONTROL_RE = re.compile(r"[\x01-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _escape(value: str, what: str) -> str:
    """Backslash-escape `\\` and `"`, double `%` (specifiers), C-escape control characters."""
    if any(c in value for c in _REFUSED):
        raise ValueError(f"{what} {value!r} contains a line break or NUL, which a unit file cannot carry")
    value = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    if "\t" in value:
        value = value.replace("\t", "\\t")
    return _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", value)


def quote_exec_arg(arg: str) -> str:
    """One ExecStart= word that systemd turns back into exactly `arg` (no specifiers, no $ expansion)."""
    return '"' + _escape(arg, "argument").replace("$", "$$") + '"'


def format_exec(argv: Sequence[str]) -> str:
    """The ExecStart= value that makes systemd run exactly `argv`."""
    if not argv:
        raise ValueError("an ExecStart= command needs at least the program to run")
    if "$" in argv[0]:
        # systemd takes the program path literally but expands $ in argv[0]: no quoting serves both.
        raise ValueError(f"the program {argv[0]!r} contains '$', which systemd cannot run verbatim")
    return " ".join(quote_exec_arg(arg) for arg in argv)


def quote_env(name: str, value: str) -> str:
    """One Environment= word, "NAME=value" (Environment= expands specifiers but never `$`)."""
    if not _ENV_NAME_RE.match(name):
        raise ValueError(f"{name!r} is not a valid environment variable name")
    return '"' + name + "=" + _escape(value, f"the value of {name}") + '"'


def needs_dropin(model: Model) -> bool:
    """Whether switching to `model` writes a drop-in (it sets a command or environment)."""
    return model.command is not None or bool(model.env)


def render_dropin(model: Model) -> str:
    """The whole text of <unit>.d/50-llm-router.conf for `model`."""
    lines = [
        "# Written by llm-router. It rewrites this file on every model switch: edits here are lost.",
        "# Change the model's command and environment in the router's models.yml instead.",
        f"{MARKER} {model.id}",
        "",
        "[Service]",
    ]
    if model.command is not None:
        lines += ["ExecStart=", f"ExecStart={format_exec(model.command)}"]
    lines += [f"Environment={quote_env(name, value)}" for name, value in model.env.items()]
    return "\n".join(lines) + "\n"


def dropin_model_id(text: str) -> str | None:
    """The model id recorded by render_dropin in a drop-in's text, or None if it has no marker."""
    for line in text.splitlines():
        if line.startswith(MARKER):
            model_id = line[len(MARKER):].strip()
            return model_id or None
    return None
