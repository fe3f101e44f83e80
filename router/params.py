"""Per-model request settings: models.yml `params: {set: {...}, strip: [...]}` applied to a JSON request body.

`set` overrides or inserts top-level fields (e.g. cap `max_tokens`, pin `temperature`), `strip`
removes them (a field an engine rejects). Only JSON bodies are touched; a model without params
leaves the client's bytes as they came (the caller checks `has_params` before parsing anything).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import orjson

from router.config import Model


def has_params(model: Model) -> bool:
    return bool(model.params_set or model.params_strip)


def apply_params(body: dict[str, Any], model: Model) -> bool:
    """Strip, then set, the model's top-level fields in `body` (in place); True if anything changed."""
    changed = False
    for name in model.params_strip:
        if name in body:
            del body[name]
            changed = True
    for name, value in model.params_set.items():
        if name not in body or body[name] != value:
            body[name] = copy.deepcopy(value)  # the config's own value must never be shared with a request
            changed = True
    return changed


def encode_json(obj: dict[str, Any]) -> bytes:
    """A request body as compact JSON bytes (the standard library for what orjson refuses, e.g. huge ints)."""
    try:
        return orjson.dumps(obj)
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(obj, ensure_ascii=False).encode()
