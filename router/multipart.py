"""multipart/form-data without parsing the file: find (and replace) one small text field in the raw body.

An audio upload is held once, as the bytes the client sent; the router needs only its `model`
(and `stream`) field to route it, and forwards the same bytes. Parts are found by searching for
the boundary (C speed over the file's bytes), never copied out, and a file part's content is
never decoded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_BOUNDARY = re.compile(r'boundary=(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)
_NAME = re.compile(rb'(?:^|;)\s*name="([^"]*)"', re.IGNORECASE)
_MAX_HEAD = 16 * 1024  # a part's headers longer than this: not a form we can route


@dataclass(frozen=True)
class Field:
    """One text field of a form: its value and where that value sits in the body."""

    value: bytes
    start: int
    end: int


def boundary_of(content_type: str | None) -> str | None:
    """The boundary of a `multipart/form-data` content type, or None if it is not one."""
    if not content_type or not content_type.lower().startswith("multipart/form-data"):
        return None
    m = _BOUNDARY.search(content_type)
    if m is None:
        return None
    return m.group(1) or m.group(2)


def find_fields(body: bytes, boundary: str, names: tuple[str, ...]) -> dict[str, Field] | None:
    """The fields among `names` that the form holds (the first of each); None if it is not well-formed."""
    delimiter = b"--" + boundary.encode("latin-1")
    pos = body.find(delimiter)
    if pos < 0:
        return None
    wanted = {n.encode("utf-8") for n in names}
    found: dict[str, Field] = {}
    while True:
        pos += len(delimiter)
        if body.startswith(b"--", pos):
            return found  # the closing delimiter
        if not body.startswith(b"\r\n", pos):
            return None
        head_end = body.find(b"\r\n\r\n", pos + 2, pos + 2 + _MAX_HEAD)
        if head_end < 0:
            return None
        start = head_end + 4
        end = body.find(b"\r\n" + delimiter, start)
        if end < 0:
            return None
        name = _field_name(body[pos + 2: head_end])
        if name is not None and name in wanted and name.decode("utf-8") not in found:
            found[name.decode("utf-8")] = Field(body[start:end], start, end)
            if len(found) == len(wanted):
                return found
        pos = end + 2


def _field_name(head: bytes) -> bytes | None:
    for line in head.split(b"\r\n"):
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-disposition":
            m = _NAME.search(value)
            return m.group(1) if m else None
    return None


def replace_field(body: bytes, field: Field, value: bytes) -> bytes:
    """The body with one field's value replaced (a new body: one copy, only when a value must change)."""
    return body[: field.start] + value + body[field.end:]
