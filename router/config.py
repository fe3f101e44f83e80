"""Configuration: load and validate config.yml and models.yml into immutable objects (no other I/O)."""

from __future__ import annotations

import difflib
import os
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import urlsplit

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from router import yamlsafe

DEFAULT_CONFIG_DIR = Path("/etc/llm-router")
STATUS_CHANNELS = ("event", "reasoning", "content", "none")
BUSES = ("system", "user")
CONFIG_FILE = "config.yml"
MODELS_FILE = "models.yml"
API_KEYS_FILE_ENV = "LLM_ROUTER_API_KEYS_FILE"  # more client keys, one a line, kept out of config.yml

# Characters systemd reads as ExecStart= prefixes (systemd.service(5), "Special executable prefixes").
EXEC_PREFIX_CHARS = "-@:+!"
# Characters that end a line for systemd's unit file reader (or end a C string): never allowed in a value.
LINE_BREAKS = ("\n", "\r", "\0")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# systemd unit names: [A-Za-z0-9:_.\-] plus at most one "@" (template instance), here only .service units.
SERVICE_UNIT_RE = re.compile(r"[A-Za-z0-9:_.\\-]+(@[A-Za-z0-9:_.\\-]*)?\.service\Z")

_NULL = "tag:yaml.org,2002:null"
_STR = "tag:yaml.org,2002:str"
_MERGE = "tag:yaml.org,2002:merge"


@dataclass(frozen=True)
class Listen:
    host: str = "127.0.0.1"
    port: int = 8002


@dataclass(frozen=True)
class SystemdSettings:
    bus: Literal["system", "user"] = "system"
    dropin_dir: Path = Path("/etc/systemd/system")  # resolved default, never None after loading


@dataclass(frozen=True)
class SwitchSettings:
    load_timeout: float = 180.0
    stop_timeout: float = 30.0
    status_every: float = 10.0
    status_channel: Literal["event", "reasoning", "content", "none"] = "event"
    keepalive_every: float = 2.0  # seconds between ": loading" SSE comments while a client waits
    health_interval: float = 0.25  # seconds between health polls while a unit loads
    max_wait: float = 60.0  # once a request has waited this long for another model, the loaded one takes no new ones
    linger: float = 2.0  # keep the loaded model this long after its last response for more requests for it
    failure_cooldown: float = 30.0  # a model whose load failed fails at once for this long
    max_queue: int = 256  # requests waiting for a model, past it: 429


@dataclass(frozen=True)
class Timeouts:
    """Upstream timeouts, seconds (`timeouts:` in config.yml)."""

    connect: float = 5.0  # TCP connect to the engine
    first_byte: float = 600.0  # request sent -> the engine's response headers
    idle: float = 120.0  # no byte from the engine while an answer streams


@dataclass(frozen=True)
class Limits:
    """What one client may send or hold (`limits:` in config.yml)."""

    max_body_bytes: int = 32 * 1024 * 1024  # request body, past it: 413
    max_header_bytes: int = 64 * 1024  # all request headers together, past it: 431
    idle_connection: float = 5.0  # seconds a keep-alive connection may sit without a request
    header_timeout: float = 10.0  # seconds a client has to send its request head (slowloris)
    max_connections: int = 4096  # open client connections; past it new ones wait/are refused


@dataclass(frozen=True)
class Endpoint:
    """One HTTP call of an engine's sleep protocol: a method and a path (with its query)."""

    method: str  # "POST" or "GET"
    path: str  # starts with "/"


@dataclass(frozen=True)
class SleepSpec:
    """How an engine is put to sleep (GPU memory freed, the process kept) and woken."""

    kind: Literal["vllm", "sglang", "custom"]
    enter: Endpoint
    leave: Endpoint
    check: Endpoint | None = None  # answers whether it sleeps (vLLM: {"is_sleeping": true})


SLEEP_KINDS: dict[str, SleepSpec] = {
    "vllm": SleepSpec("vllm", Endpoint("POST", "/sleep?level=1"), Endpoint("POST", "/wake_up"),
                      Endpoint("GET", "/is_sleeping")),
    "sglang": SleepSpec("sglang", Endpoint("POST", "/release_memory_occupation"),
                        Endpoint("POST", "/resume_memory_occupation")),
}


@dataclass(frozen=True)
class Backend:
    name: str
    unit: str  # a plain unit, or a template ("llamacpp@.service"): one instance per model
    url: str  # no trailing slash; a template's has "{port}", filled from each model's port
    health: str = "/health"
    config_file: Path | None = None
    warmup: float = 0.0
    sleep: SleepSpec | None = None  # the engine can sleep: evicting it sleeps instead of stopping

    @property
    def template(self) -> bool:
        """A systemd template unit: each model runs as its own instance, many at once."""
        return self.unit.endswith("@.service")


@dataclass(frozen=True)
class Gpu:
    index: int
    vram_gb: float  # the memory budget on this GPU


@dataclass(frozen=True)
class Residency:
    """config.yml `residency:`: how many models stay loaded, and for how long."""

    default_ttl: float | None = None  # seconds idle before a model leaves the GPU (None: never)
    sleep_ttl: float | None = None  # seconds asleep before a sleeping engine is stopped (None: never)
    max_loaded: int | None = None  # models on the GPU at once (None: as many as fit)
    host_ram_gb: float | None = None  # budget for sleeping engines' host RAM (None: 80 % of the host's RAM)
    memory_free_timeout: float = 30.0  # after a stop, wait this long at most for NVML to show the memory free


@dataclass(frozen=True)
class Model:
    id: str
    backend: str
    name: str | None = None
    command: tuple[str, ...] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    model_name: str | None = None
    upstream_model: str | None = None
    load_timeout: float | None = None
    warmup: float | None = None
    unit: str | None = None
    port: int | None = None  # on a template backend: fills the backend url's {port}
    vram_gb: float | None = None  # GPU memory it needs; None: measured after a load, else exclusive
    gpu: int = 0  # the GPU index it loads on
    ram_gb: float | None = None  # host RAM it holds while asleep (None: its vram_gb)
    persistent: bool = False  # never evicted to make room: only unload or its ttl removes it
    ttl: float | None = None  # seconds idle before it leaves the GPU (None: residency.default_ttl)
    no_ttl: bool = False  # `ttl: null`: never leaves for being idle, whatever residency.default_ttl says
    aliases: tuple[str, ...] = ()  # other names a request may use; listed under the id
    unlisted: bool = False  # loadable, but not in /v1/models
    max_concurrent: int | None = None  # responses at once; more wait in the queue
    params_set: Mapping[str, Any] = field(default_factory=dict)  # params: set: fields forced in each request
    params_strip: tuple[str, ...] = ()  # params: strip: fields removed from each request

    @property
    def display_name(self) -> str:
        return self.name or self.id


@dataclass(frozen=True)
class Config:
    config_dir: Path
    listen: Listen = field(default_factory=Listen)
    systemd: SystemdSettings = field(default_factory=SystemdSettings)
    switch: SwitchSettings = field(default_factory=SwitchSettings)
    stats: bool = True
    api_key: str | None = None
    api_keys: tuple[str, ...] = ()  # more client keys (config.yml api_keys, LLM_ROUTER_API_KEYS_FILE)
    admin_api_keys: tuple[str, ...] = ()  # when set, only these open /admin/*
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    backends: Mapping[str, Backend] = field(default_factory=dict)
    models: Mapping[str, Model] = field(default_factory=dict)
    gpus: tuple[Gpu, ...] = ()  # config.yml gpus: the budget per GPU (empty: from NVML, else none)
    residency: Residency = field(default_factory=Residency)
    preload: tuple[str, ...] = ()  # model ids loaded in order at start (and when a reload adds them)

    @property
    def client_keys(self) -> tuple[str, ...]:
        """Every key a client may send; empty: no key needed."""
        return ((self.api_key,) if self.api_key else ()) + self.api_keys

    def backend_of(self, model: Model) -> Backend:
        return self.backends[model.backend]

    def unit_of(self, model: Model) -> str:
        """The systemd unit that serves `model`: its own unit, its backend's, or its template instance."""
        if model.unit:
            return model.unit
        backend = self.backends[model.backend]
        if backend.template:
            return backend.unit[: -len("@.service")] + "@" + instance_name(model.id) + ".service"
        return backend.unit

    def url_of(self, model: Model) -> str:
        """The base URL of the engine that serves `model` (a template backend's with the model's port)."""
        backend = self.backends[model.backend]
        if backend.template and model.port is not None:
            return backend.url.replace("{port}", str(model.port))
        return backend.url

    def resolve(self, name: str) -> str | None:
        """The model id a request's `model` names: an id or an alias (None: no such model)."""
        if name in self.models:
            return name
        for model in self.models.values():
            if name in model.aliases:
                return model.id
        return None

    def ttl_of(self, model: Model) -> float | None:
        """Seconds idle before `model` leaves the GPU: its ttl, else residency.default_ttl (None: never)."""
        if model.no_ttl:
            return None
        return model.ttl if model.ttl is not None else self.residency.default_ttl

    def load_timeout_of(self, model: Model) -> float:
        return model.load_timeout if model.load_timeout is not None else self.switch.load_timeout

    def warmup_of(self, model: Model) -> float:
        return model.warmup if model.warmup is not None else self.backends[model.backend].warmup

    def systemctl(self, verb: str, unit: str) -> str:
        """The systemctl command line an operator runs for this unit on this bus (for messages)."""
        return f"systemctl {'--user ' if self.systemd.bus == 'user' else ''}{verb} {unit}"

    def journalctl(self, unit: str) -> str:
        """The journalctl command line that shows this unit's log on this bus (for messages)."""
        return f"journalctl --user-unit={unit}" if self.systemd.bus == "user" else f"journalctl -u {unit}"

    def managed_units(self) -> list[str]:
        """Every unit the router may start or stop, in a stable order (template instances, not templates)."""
        units = [b.unit for b in self.backends.values() if not b.template]
        units += [self.unit_of(m) for m in self.models.values()]
        return list(dict.fromkeys(units))


def instance_name(text: str) -> str:
    """`text` escaped as a systemd unit instance name, as `systemd-escape` does."""
    out = []
    for i, ch in enumerate(text):
        if ch == "/":
            out.append("-")
        elif ch.isascii() and (ch.isalnum() or ch in ":_" or (ch == "." and i > 0)):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return "".join(out)


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a configuration file, with the 1-based line when known."""

    file: Path
    line: int | None
    message: str

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.file}: {self.message}"
        return f"{self.file}:{self.line}: {self.message}"


class ConfigError(Exception):
    """The configuration is invalid; `problems` lists every problem found, one per line in str()."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


def resolve_config_dir(cli_value: str | None) -> Path:
    """--config-dir, else $LLM_ROUTER_CONFIG_DIR, else /etc/llm-router."""
    if cli_value:
        return Path(cli_value)
    env = os.environ.get("LLM_ROUTER_CONFIG_DIR")
    return Path(env) if env else DEFAULT_CONFIG_DIR


def load_config(config_dir: Path, environ: Mapping[str, str] = os.environ) -> Config:
    """Read config_dir/config.yml and config_dir/models.yml and validate them; raise ConfigError."""
    texts: dict[str, str] = {}
    problems: list[Problem] = []
    hints = {
        CONFIG_FILE: "create it with at least a `backends:` section "
        "(every key is documented in the example shipped as etc/llm-router/config.yml)",
        MODELS_FILE: "create it with a `models:` mapping of model ids "
        "(see the example shipped as etc/llm-router/models.yml)",
    }
    for name in (CONFIG_FILE, MODELS_FILE):
        path = config_dir / name
        try:
            texts[name] = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            problems.append(Problem(path, None, f"file not found: {hints[name]}"))
        except IsADirectoryError:
            problems.append(Problem(path, None, "is a directory, expected a YAML file"))
        except UnicodeDecodeError as exc:
            problems.append(Problem(path, None, f"not valid UTF-8 ({exc.reason} at byte {exc.start})"))
        except OSError as exc:
            problems.append(Problem(path, None, f"cannot read: {exc.strerror or exc}"))
    keys_file: tuple[Path, str] | None = None
    if environ.get(API_KEYS_FILE_ENV):
        path = Path(environ[API_KEYS_FILE_ENV])
        try:
            keys_file = (path, path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            reason = (f"not valid UTF-8 ({exc.reason})" if isinstance(exc, UnicodeDecodeError)
                      else f"cannot read it: {exc.strerror or exc}")
            problems.append(Problem(path, None, f"the API keys file named by ${API_KEYS_FILE_ENV}: {reason}; "
                                                "fix it, or unset the variable"))
    if problems:
        raise ConfigError(problems)
    return parse_config(texts[CONFIG_FILE], texts[MODELS_FILE], config_dir, environ, keys_file=keys_file)


def parse_config(
    config_text: str, models_text: str, config_dir: Path, environ: Mapping[str, str] = os.environ,
    *, keys_file: tuple[Path, str] | None = None,
) -> Config:
    """Validate the two files' contents and build the Config; raise ConfigError listing every problem.

    `keys_file` is the path and text of $LLM_ROUTER_API_KEYS_FILE (read by load_config), if set.
    """
    config_file = config_dir / CONFIG_FILE
    models_file = config_dir / MODELS_FILE
    cchk = _Checker(config_file)
    mchk = _Checker(models_file)

    croot = cchk.compose(config_text)
    settings = _parse_config_yml(cchk, croot, environ)
    mroot = mchk.compose(models_text)
    models: dict[str, Model] = {}
    names = _ModelNames()
    if mroot is not _BROKEN:
        models = _parse_models_yml(mchk, cast("Node | None", mroot), settings, names)
    preload = _check_preload(cchk, settings.preload, names)

    file_keys: list[str] = []
    kproblems: list[Problem] = []
    if keys_file is not None:
        file_keys, kproblems = parse_keys_file(*keys_file)
    problems = sorted(cchk.problems, key=_line_key) + sorted(mchk.problems, key=_line_key) + kproblems
    if problems:
        raise ConfigError(problems)
    return Config(
        config_dir=config_dir,
        listen=settings.listen,
        systemd=settings.systemd,
        switch=settings.switch,
        stats=settings.stats,
        api_key=settings.api_key,
        api_keys=tuple(dict.fromkeys([*settings.api_keys, *file_keys])),
        admin_api_keys=settings.admin_api_keys,
        timeouts=settings.timeouts,
        limits=settings.limits,
        backends=settings.backends,
        models=models,
        gpus=tuple(settings.gpus),
        residency=settings.residency,
        preload=preload,
    )


def _check_preload(chk: _Checker, preload: list[tuple[str, Node]], names: _ModelNames) -> tuple[str, ...]:
    """config.yml `preload:` against models.yml: known ids (or aliases, taken as their id), each once."""
    ids: dict[str, int] = {}
    for i, (name, node) in enumerate(preload):
        mid = name if name in names.ids else names.aliases[name][0] if name in names.aliases else None
        if mid is None:
            if names.readable:
                near = difflib.get_close_matches(name, [*names.ids, *names.aliases], n=1)
                hint = f"did you mean {near[0]!r}? " if near else ""
                chk.problem(node, f"preload[{i}]: unknown model {name!r}; {hint}{_known_models(names)}")
            continue
        if mid in ids:
            chk.problem(node, f"preload[{i}]: model {mid!r} is already preloaded at preload[{ids[mid]}]; "
                              "list each model once")
            continue
        ids[mid] = i
    return tuple(ids)


def _known_models(names: _ModelNames, shown: int = 10) -> str:
    if not names.ids:
        return "models.yml defines no models"
    listed = list(names.ids)
    more = f" and {len(listed) - shown} more" if len(listed) > shown else ""
    return "known models: " + ", ".join(listed[:shown]) + more


def parse_keys_file(path: Path, text: str) -> tuple[list[str], list[Problem]]:
    """The keys of an API keys file (one a line; blank lines and `#` comments skipped) and its problems."""
    keys: list[str] = []
    problems: list[Problem] = []
    for number, line in enumerate(text.splitlines(), 1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        if not _control_free(key):
            problems.append(Problem(path, number, "an API key must not contain control characters"))
            continue
        keys.append(key)
    if not keys and not problems:
        problems.append(Problem(path, None, f"the API keys file named by ${API_KEYS_FILE_ENV} holds no key, "
                                            "so clients would need none: add keys (one a line), or unset "
                                            "the variable"))
    return keys, problems


def _line_key(problem: Problem) -> int:
    return problem.line or 0


# --- walking YAML nodes -------------------------------------------------------------------------------

_BROKEN = object()  # compose() failed: the file's syntax problem is already recorded


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _describe(node: Node) -> str:
    """How a node reads to a user in 'expected X, got Y' messages."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    value = cast("ScalarNode", node).value
    kind = {
        _NULL: "nothing (null)",
        "tag:yaml.org,2002:bool": "a boolean",
        "tag:yaml.org,2002:int": "an integer",
        "tag:yaml.org,2002:float": "a number",
        "tag:yaml.org,2002:timestamp": "a date",
    }.get(node.tag)
    if kind == "nothing (null)":
        return kind
    shown = value if len(value) <= 40 else value[:37] + "..."
    return f"{kind} {shown!r}" if kind else f"{shown!r}"


def _noncharacter(c: str) -> bool:
    """A Unicode noncharacter (systemd refuses them in unit files)."""
    o = ord(c)
    return 0xFDD0 <= o <= 0xFDEF or (o & 0xFFFE) == 0xFFFE


def _not_json(value: Any) -> str | None:
    """What in `value` JSON cannot carry, or None when all of it can."""
    if value is None or isinstance(value, (bool, int, str)):
        return None
    if isinstance(value, float):
        return None if value == value and value not in (float("inf"), float("-inf")) else f"{value!r}"
    if isinstance(value, list):
        return next((bad for v in value if (bad := _not_json(v)) is not None), None)
    if isinstance(value, dict):
        for key, v in value.items():
            if not isinstance(key, str):
                return f"the key {key!r} (not a string)"
            if (bad := _not_json(v)) is not None:
                return bad
        return None
    return f"a {type(value).__name__} value"


def _control_free(text: str) -> bool:
    return not any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


@dataclass
class _Item:
    key: str
    key_node: Node
    node: Node


class _Checker:
    """Collects problems for one file while typed values are read out of its YAML nodes."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.problems: list[Problem] = []
        self._ctor = yaml.constructor.SafeConstructor()

    def problem(self, node: Node | None, message: str) -> None:
        self.problems.append(Problem(self.file, _line(node) if node is not None else None, message))

    def compose(self, text: str) -> Node | object | None:
        try:
            return yamlsafe.compose(text)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            what = ": ".join(x for x in (exc.context, exc.problem) if x) or "syntax error"
            line = mark.line + 1 if mark is not None else None
            self.problems.append(Problem(self.file, line, f"invalid YAML: {what}"))
        except yaml.reader.ReaderError as exc:
            line = text.count("\n", 0, exc.position) + 1
            code = exc.character if isinstance(exc.character, int) else ord(exc.character)
            self.problems.append(Problem(self.file, line, f"invalid YAML: character U+{code:04X} is not "
                                                          "allowed in a YAML file; remove it"))
        except yaml.YAMLError as exc:
            self.problems.append(Problem(self.file, None, f"invalid YAML: {exc}"))
        except RecursionError:  # not expected past yamlsafe's depth bound; never a traceback
            self.problems.append(Problem(self.file, None, "invalid YAML: nested too deep; flatten the file"))
        return _BROKEN

    def value(self, node: ScalarNode, path: str) -> Any:
        try:
            return self._ctor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError) as exc:
            reason = getattr(exc, "problem", None) or str(exc)
            self.problem(node, f"{path}: cannot read this value ({reason}); remove the YAML tag or fix it")
            return _BROKEN

    def json_value(self, node: Node, path: str) -> Any:
        """Any YAML value that JSON can carry (no dates, binary or sets), or _BROKEN (problem recorded)."""
        value = self.value(cast("ScalarNode", node), path)
        if value is _BROKEN:
            return _BROKEN
        bad = _not_json(value)
        if bad is not None:
            self.problem(node, f"{path}: {bad} cannot go into a JSON request; write it as a string, number, "
                               "true/false, null, list or mapping")
            return _BROKEN
        return value

    # mappings

    def items(self, node: Node, path: str, *, what: str = "a mapping") -> list[_Item] | None:
        """The key/value pairs of a mapping node (merge keys applied, duplicates reported), or None."""
        if not isinstance(node, MappingNode):
            self.problem(node, f"{path or 'top level'}: expected {what}, got {_describe(node)}")
            return None
        return list(self._pairs(node, path, depth=0))

    def _pairs(self, node: MappingNode, path: str, depth: int) -> Iterator[_Item]:
        own: dict[str, _Item] = {}
        merged: dict[str, _Item] = {}
        order: list[str] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                for item in self._merge_sources(value_node, path, depth):
                    if item.key not in merged:
                        merged[item.key] = item
                        order.append(item.key)
                continue
            if not isinstance(key_node, ScalarNode) or key_node.tag == _NULL or key_node.value == "":
                self.problem(key_node, f"{_join(path, '?')}: keys must be non-empty names, "
                                       f"got {_describe(key_node)}")
                continue
            key = key_node.value
            if key in own:
                first = _line(own[key].key_node)
                self.problem(key_node, f"{_join(path, key)}: duplicate key (first defined on line {first}); "
                                       "YAML would silently keep only the last one: remove or rename one")
                continue
            own[key] = _Item(key, key_node, value_node)
            order.append(key)
        for key in dict.fromkeys(order):
            yield own.get(key) or merged[key]

    def _merge_sources(self, node: Node, path: str, depth: int) -> Iterator[_Item]:
        if depth > 20:
            self.problem(node, f"{path}: merge keys (<<) nest too deep or refer to themselves")
            return
        sources = node.value if isinstance(node, SequenceNode) else [node]
        for src in sources:
            if not isinstance(src, MappingNode):
                self.problem(src, f"{path}: a merge key (<<) needs a mapping or a list of mappings, "
                                  f"got {_describe(src)}")
                continue
            yield from self._pairs(src, path, depth + 1)

    def section(
        self, node: Node | None, path: str, allowed: tuple[str, ...], *, null_ok: bool = True
    ) -> dict[str, _Item]:
        """A mapping with a fixed set of keys; unknown keys are reported. An absent/null section is {}."""
        if node is None or (null_ok and isinstance(node, ScalarNode) and node.tag == _NULL):
            return {}
        items = self.items(node, path)
        if items is None:
            return {}
        result: dict[str, _Item] = {}
        for item in items:
            if item.key not in allowed:
                self.unknown_key(item, path, allowed)
                continue
            result[item.key] = item
        return result

    def unknown_key(self, item: _Item, path: str, allowed: tuple[str, ...]) -> None:
        near = difflib.get_close_matches(item.key, allowed, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        self.problem(item.key_node, f"{_join(path, item.key)}: unknown key; {hint}allowed keys: "
                                    f"{', '.join(allowed)}")

    # scalars

    def scalar(self, node: Node, path: str, expected: str) -> Any:
        """The constructed value of a scalar node, or _BROKEN (problem recorded) for lists/mappings."""
        if not isinstance(node, ScalarNode):
            self.problem(node, f"{path}: expected {expected}, got {_describe(node)}")
            return _BROKEN
        return self.value(node, path)

    def number(
        self, item: _Item | None, path: str, default: float, *, minimum: float = 0.0, strict: bool = True,
        noun: str = "a number of seconds", null_hint: str = "",
    ) -> float:
        if item is None:
            return default
        op = ">" if strict else ">="
        expected = f"{noun} {op} {minimum:g}{null_hint}"
        value = self.scalar(item.node, path, expected)
        if value is _BROKEN:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            self.problem(item.node, f"{path}: expected {expected}, got {_describe(item.node)}")
            return default
        if (value <= minimum) if strict else (value < minimum):
            self.problem(item.node, f"{path}: must be {op} {minimum:g}, got {value:g}")
            return default
        if value == float("inf"):
            self.problem(item.node, f"{path}: must be a finite {noun.removeprefix('a ')}")
            return default
        return float(value)

    def integer(self, item: _Item | None, path: str, default: int, *, minimum: int, what: str) -> int:
        """A whole number >= minimum (booleans and floats are not)."""
        if item is None:
            return default
        expected = f"{what}, a whole number >= {minimum}"
        value = self.scalar(item.node, path, expected)
        if value is _BROKEN:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(item.node, f"{path}: expected {expected}, got {_describe(item.node)}")
            return default
        if value < minimum:
            self.problem(item.node, f"{path}: must be >= {minimum}, got {value}")
            return default
        return value

    def keys(self, item: _Item | None, path: str) -> tuple[str, ...]:
        """A list of API keys (null or [] for none)."""
        if item is None or (isinstance(item.node, ScalarNode) and item.node.tag == _NULL):
            return ()
        if not isinstance(item.node, SequenceNode):
            self.problem(item.node, f"{path}: expected a list of keys like [key1, key2], got "
                                    f"{_describe(item.node)}")
            return ()
        keys: list[str] = []
        for i, node in enumerate(item.node.value):
            key = self.api_key(_Item(str(i), node, node), f"{path}[{i}]")
            if key is not None:
                keys.append(key)
        return tuple(dict.fromkeys(keys))

    def api_key(self, item: _Item, path: str, *, what: str = "a non-empty string (an API key)") -> str | None:
        """One API key: a non-empty string a client can send in a header (no control characters, no
        surrounding spaces, which HTTP strips)."""
        key = self.string(item, path, what=what)
        if key is None:
            return None
        if not _control_free(key):
            self.problem(item.node, f"{path}: an API key must not contain control characters")
            return None
        if key != key.strip():
            self.problem(item.node, f"{path}: an API key must not start or end with a space (HTTP drops them, "
                                    "so no client could send it)")
            return None
        return key

    def string(
        self, item: _Item | None, path: str, default: str | None = None, *, what: str = "a non-empty string"
    ) -> str | None:
        """A non-empty string without line breaks or NUL (numbers are not accepted as strings)."""
        if item is None:
            return default
        value = self.scalar(item.node, path, what)
        if value is _BROKEN:
            return default
        if not isinstance(value, str) or value == "":
            hint = ""
            if value is not None and not isinstance(value, str):
                hint = " (put it in quotes to use it as text)"
            self.problem(item.node, f"{path}: expected {what}, got {_describe(item.node)}{hint}")
            return default
        if any(c in value for c in LINE_BREAKS):
            self.problem(item.node, f"{path}: must not contain a line break or NUL character")
            return default
        return value

    def text(self, node: Node, path: str, expected: str) -> str | None:
        """A scalar taken as the text the user wrote (numbers and booleans kept as typed), or None."""
        if not isinstance(node, ScalarNode) or node.tag == _NULL:
            self.problem(node, f"{path}: expected {expected}, got {_describe(node)}")
            return None
        return node.value

    def choice(self, item: _Item | None, path: str, choices: tuple[str, ...], default: str) -> str:
        if item is None:
            return default
        value = self.scalar(item.node, path, f"one of {', '.join(choices)}")
        if value is _BROKEN:
            return default
        if value not in choices:
            self.problem(item.node, f"{path}: expected one of {', '.join(choices)}, "
                                    f"got {_describe(item.node)}")
            return default
        return cast("str", value)

    def boolean(self, item: _Item | None, path: str, default: bool) -> bool:
        if item is None:
            return default
        value = self.scalar(item.node, path, "true or false")
        if value is _BROKEN:
            return default
        if not isinstance(value, bool):
            self.problem(item.node, f"{path}: expected true or false, got {_describe(item.node)}")
            return default
        return value

    def unit(self, item: _Item | None, path: str, *, template_ok: bool = False) -> str | None:
        value = self.string(item, path, what="a systemd unit name like 'vllm.service'")
        if value is None or item is None:
            return None
        if "/" in value:
            self.problem(item.node, f"{path}: {value!r} is a path; give the unit's name only, "
                                    f"like {value.rsplit('/', 1)[-1]!r}")
        elif not value.endswith(".service"):
            self.problem(item.node, f"{path}: {value!r} must be a service unit name ending in '.service'")
        elif not SERVICE_UNIT_RE.match(value) or len(value) > MAX_UNIT_NAME:
            self.problem(item.node, f"{path}: {value!r} is not a valid unit name: use letters, digits, "
                                    "':', '_', '.', '-', '\\' and at most one '@'")
        elif value.endswith("@.service") and not template_ok:
            self.problem(item.node, f"{path}: {value!r} is a template; name an instance, "
                                    f"like {value[:-len('.service')]}NAME.service")
        else:
            return value
        return None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# --- config.yml -------------------------------------------------------------------------------------------

_TOP_KEYS = ("listen", "systemd", "switch", "timeouts", "limits", "stats", "api_key", "api_keys", "admin_api_keys",
             "backends", "gpus", "residency", "preload")
_LISTEN_KEYS = ("host", "port")
_SYSTEMD_KEYS = ("bus", "dropin_dir")
_SWITCH_KEYS = (
    "load_timeout", "stop_timeout", "status_every", "status_channel", "keepalive_every", "health_interval",
    "max_wait", "linger", "failure_cooldown", "max_queue",
)
_TIMEOUTS_KEYS = ("connect", "first_byte", "idle")
_LIMITS_KEYS = ("max_body_bytes", "max_header_bytes", "idle_connection", "header_timeout", "max_connections")
MIN_HEADER_BYTES = 1024  # below this no ordinary client gets a request through
_BACKEND_KEYS = ("unit", "url", "health", "config_file", "warmup", "sleep")
_GPU_KEYS = ("index", "vram_gb")
_RESIDENCY_KEYS = ("default_ttl", "sleep_ttl", "max_loaded", "host_ram_gb", "memory_free_timeout")
_SLEEP_KEYS = ("enter", "leave", "check")
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
PORT_PLACEHOLDER = "{port}"
MAX_UNIT_NAME = 255  # systemd's limit on a unit name (UNIT_NAME_MAX - 1)


@dataclass
class _Settings:
    """What config.yml yields, plus what models.yml validation needs to know about backends."""

    listen: Listen = field(default_factory=Listen)
    systemd: SystemdSettings = field(default_factory=SystemdSettings)
    switch: SwitchSettings = field(default_factory=SwitchSettings)
    stats: bool = True
    api_key: str | None = None
    api_keys: tuple[str, ...] = ()
    admin_api_keys: tuple[str, ...] = ()
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    backends: dict[str, Backend] = field(default_factory=dict)
    backend_names: list[str] = field(default_factory=list)  # every name written, valid or not
    backends_with_config_file: set[str] = field(default_factory=set)
    backends_readable: bool = True  # False when config.yml or its backends section could not be read
    backend_units: dict[str, str] = field(default_factory=dict)  # every backend whose unit: is valid
    gpus: list[Gpu] = field(default_factory=list)
    gpus_readable: bool = True  # False when gpus: has a problem (then models' gpu/vram_gb are not checked)
    residency: Residency = field(default_factory=Residency)
    preload: list[tuple[str, Node]] = field(default_factory=list)  # each id as written, with its node


def _parse_config_yml(chk: _Checker, root: Node | object | None, environ: Mapping[str, str]) -> _Settings:
    out = _Settings()
    if root is _BROKEN:
        out.backends_readable = False
        return out
    top = chk.section(cast("Node | None", root), "", _TOP_KEYS)

    listen = chk.section(_node(top.get("listen")), "listen", _LISTEN_KEYS)
    host = chk.string(listen.get("host"), "listen.host", Listen.host, what="a host name or IP address")
    port = Listen.port
    if (item := listen.get("port")) is not None:
        value = chk.scalar(item.node, "listen.port", "a port number 1..65535")
        if value is not _BROKEN:
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
                chk.problem(item.node, "listen.port: expected a port number 1..65535, "
                                       f"got {_describe(item.node)}")
            else:
                port = value
    out.listen = Listen(host=host or Listen.host, port=port)

    sysd = chk.section(_node(top.get("systemd")), "systemd", _SYSTEMD_KEYS)
    bus = chk.choice(sysd.get("bus"), "systemd.bus", BUSES, "system")
    out.systemd = SystemdSettings(bus=cast("Literal['system', 'user']", bus),
                                  dropin_dir=_dropin_dir(chk, sysd, bus, environ))

    sw = chk.section(_node(top.get("switch")), "switch", _SWITCH_KEYS)
    d = SwitchSettings()
    out.switch = SwitchSettings(
        load_timeout=chk.number(sw.get("load_timeout"), "switch.load_timeout", d.load_timeout),
        stop_timeout=chk.number(sw.get("stop_timeout"), "switch.stop_timeout", d.stop_timeout),
        status_every=chk.number(sw.get("status_every"), "switch.status_every", d.status_every),
        status_channel=cast(
            "Literal['event', 'reasoning', 'content', 'none']",
            chk.choice(sw.get("status_channel"), "switch.status_channel", STATUS_CHANNELS, d.status_channel),
        ),
        keepalive_every=chk.number(sw.get("keepalive_every"), "switch.keepalive_every", d.keepalive_every),
        health_interval=chk.number(sw.get("health_interval"), "switch.health_interval", d.health_interval),
        max_wait=chk.number(sw.get("max_wait"), "switch.max_wait", d.max_wait),
        linger=chk.number(sw.get("linger"), "switch.linger", d.linger, strict=False),
        failure_cooldown=chk.number(sw.get("failure_cooldown"), "switch.failure_cooldown", d.failure_cooldown,
                                    strict=False),
        max_queue=chk.integer(sw.get("max_queue"), "switch.max_queue", d.max_queue, minimum=1,
                              what="a number of requests"),
    )

    to = chk.section(_node(top.get("timeouts")), "timeouts", _TIMEOUTS_KEYS)
    t = Timeouts()
    out.timeouts = Timeouts(
        connect=chk.number(to.get("connect"), "timeouts.connect", t.connect),
        first_byte=chk.number(to.get("first_byte"), "timeouts.first_byte", t.first_byte),
        idle=chk.number(to.get("idle"), "timeouts.idle", t.idle),
    )

    li = chk.section(_node(top.get("limits")), "limits", _LIMITS_KEYS)
    lim = Limits()
    out.limits = Limits(
        max_body_bytes=chk.integer(li.get("max_body_bytes"), "limits.max_body_bytes", lim.max_body_bytes,
                                   minimum=1, what="a number of bytes"),
        max_header_bytes=chk.integer(li.get("max_header_bytes"), "limits.max_header_bytes", lim.max_header_bytes,
                                     minimum=MIN_HEADER_BYTES, what="a number of bytes"),
        idle_connection=chk.number(li.get("idle_connection"), "limits.idle_connection", lim.idle_connection),
        header_timeout=chk.number(li.get("header_timeout"), "limits.header_timeout", lim.header_timeout),
        max_connections=chk.integer(li.get("max_connections"), "limits.max_connections", lim.max_connections,
                                    minimum=1, what="a number of connections"),
    )

    out.stats = chk.boolean(top.get("stats"), "stats", True)
    if (item := top.get("api_key")) is not None and not (
        isinstance(item.node, ScalarNode) and item.node.tag == _NULL
    ):
        out.api_key = chk.api_key(item, "api_key", what="a non-empty string (or null for no key)")
    out.api_keys = chk.keys(top.get("api_keys"), "api_keys")
    out.admin_api_keys = chk.keys(top.get("admin_api_keys"), "admin_api_keys")

    _parse_backends(chk, top.get("backends"), out)
    _parse_gpus(chk, top.get("gpus"), out)
    out.residency = _parse_residency(chk, top.get("residency"))
    out.preload = _parse_preload(chk, top.get("preload"))
    return out


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _NULL


def _optional_number(chk: _Checker, item: _Item | None, path: str, *, noun: str = "a number of seconds",
                     null_means: str = "never") -> float | None:
    """A number > 0, or None when absent or null."""
    if item is None or _is_null(item.node):
        return None
    before = len(chk.problems)
    value = chk.number(item, path, 0.0, noun=noun, null_hint=f" (or null: {null_means})")
    return value if len(chk.problems) == before else None


def _parse_gpus(chk: _Checker, item: _Item | None, out: _Settings) -> None:
    if item is None or _is_null(item.node):
        return
    before = len(chk.problems)
    if not isinstance(item.node, SequenceNode):
        chk.problem(item.node, "gpus: expected a list of GPUs like [{index: 0, vram_gb: 80}], "
                               f"got {_describe(item.node)}")
    else:
        first: dict[int, Node] = {}
        for i, node in enumerate(item.node.value):
            path = f"gpus[{i}]"
            fields = chk.section(node, path, _GPU_KEYS, null_ok=False)
            if not isinstance(node, MappingNode):
                continue
            for required in _GPU_KEYS:
                if required not in fields:
                    chk.problem(node, f"{path}.{required}: missing; each GPU needs index and vram_gb "
                                      "(like {index: 0, vram_gb: 80})")
            at = len(chk.problems)
            index = chk.integer(fields.get("index"), f"{path}.index", 0, minimum=0,
                                what="the GPU's index (as nvidia-smi numbers it)")
            vram = chk.number(fields.get("vram_gb"), f"{path}.vram_gb", 0.0, noun="a number of GB")
            if len(chk.problems) != at or len(fields) != len(_GPU_KEYS):
                continue
            if index in first:
                chk.problem(fields["index"].node, f"{path}.index: GPU {index} is listed twice (first on line "
                                                  f"{_line(first[index])}); list each GPU once")
                continue
            first[index] = fields["index"].node
            out.gpus.append(Gpu(index=index, vram_gb=vram))
    out.gpus_readable = len(chk.problems) == before


def _parse_residency(chk: _Checker, item: _Item | None) -> Residency:
    res = chk.section(_node(item), "residency", _RESIDENCY_KEYS)
    d = Residency()
    max_loaded: int | None = None
    if (ml := res.get("max_loaded")) is not None and not _is_null(ml.node):
        before = len(chk.problems)
        value = chk.integer(ml, "residency.max_loaded", 0, minimum=1,
                            what="a number of models (or null: as many as fit)")
        max_loaded = value if len(chk.problems) == before else None
    return Residency(
        default_ttl=_optional_number(chk, res.get("default_ttl"), "residency.default_ttl"),
        sleep_ttl=_optional_number(chk, res.get("sleep_ttl"), "residency.sleep_ttl"),
        max_loaded=max_loaded,
        host_ram_gb=_optional_number(chk, res.get("host_ram_gb"), "residency.host_ram_gb",
                                     noun="a number of GB", null_means="80 % of the host's RAM"),
        memory_free_timeout=chk.number(res.get("memory_free_timeout"), "residency.memory_free_timeout",
                                       d.memory_free_timeout, strict=False),
    )


def _parse_preload(chk: _Checker, item: _Item | None) -> list[tuple[str, Node]]:
    """The model ids of `preload:` as written (checked against models.yml by parse_config)."""
    if item is None or _is_null(item.node):
        return []
    if not isinstance(item.node, SequenceNode):
        chk.problem(item.node, "preload: expected a list of model ids from models.yml, like [embed, qwen-7b], "
                               f"got {_describe(item.node)}")
        return []
    ids: list[tuple[str, Node]] = []
    for i, node in enumerate(item.node.value):
        mid = chk.string(_Item(str(i), node, node), f"preload[{i}]", what="a model id from models.yml")
        if mid is not None:
            ids.append((mid, node))
    return ids


def _node(item: _Item | None) -> Node | None:
    return item.node if item is not None else None


def _dropin_dir(chk: _Checker, sysd: dict[str, _Item], bus: str, environ: Mapping[str, str]) -> Path:
    item = sysd.get("dropin_dir")
    if item is not None and not (isinstance(item.node, ScalarNode) and item.node.tag == _NULL):
        value = chk.string(item, "systemd.dropin_dir", what="an absolute directory path")
        if value is not None:
            if os.path.isabs(value):
                return Path(value)
            chk.problem(item.node, f"systemd.dropin_dir: {value!r} must be an absolute path "
                                   "(like /etc/systemd/system)")
        return SystemdSettings.dropin_dir
    if bus == "system":
        return Path("/etc/systemd/system")
    xdg = environ.get("XDG_CONFIG_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "systemd" / "user"
    home = environ.get("HOME", "")
    if os.path.isabs(home):
        return Path(home) / ".config" / "systemd" / "user"
    where = sysd.get("bus")
    chk.problem(where.node if where else None, "systemd.dropin_dir: cannot work out the user manager's "
                "drop-in directory: neither XDG_CONFIG_HOME nor HOME is set; set systemd.dropin_dir")
    return SystemdSettings.dropin_dir


def _parse_backends(chk: _Checker, item: _Item | None, out: _Settings) -> None:
    if item is None or (isinstance(item.node, ScalarNode) and item.node.tag == _NULL):
        return
    entries = chk.items(item.node, "backends", what="a mapping of backend name -> settings")
    if entries is None:
        out.backends_readable = False
    for entry in entries or []:
        name = entry.key
        path = f"backends.{name}"
        out.backend_names.append(name)
        if not _control_free(name) or any(c.isspace() for c in name):
            chk.problem(entry.key_node, f"{path}: a backend name must not contain spaces or control "
                                        "characters")
            continue
        fields = chk.section(entry.node, path, _BACKEND_KEYS, null_ok=False)
        if "config_file" in fields:
            out.backends_with_config_file.add(name)
        before = len(chk.problems)
        for required in ("unit", "url"):
            if required not in fields and isinstance(entry.node, MappingNode):
                example = "llamacpp.service" if required == "unit" else "http://127.0.0.1:8080"
                chk.problem(entry.key_node, f"{path}.{required}: missing; every backend needs a {required} "
                                            f"(like {required}: {example})")
        unit = chk.unit(fields.get("unit"), f"{path}.unit", template_ok=True)
        if unit is not None:
            out.backend_units[name] = unit
        template = unit.endswith("@.service") if unit is not None else None
        url = _url(chk, fields.get("url"), f"{path}.url", template=template, unit=unit)
        health = "/health"
        h = chk.string(fields.get("health"), f"{path}.health", what="a URL path like /health")
        if h is not None:
            if not h.startswith("/") or any(c.isspace() for c in h):
                chk.problem(fields["health"].node, f"{path}.health: expected a URL path starting with '/' "
                                                   f"(like /health), got {h!r}")
            else:
                health = h
        config_file: Path | None = None
        if (cf := chk.string(fields.get("config_file"), f"{path}.config_file",
                             what="an absolute file path")) is not None:
            if os.path.isabs(cf):
                config_file = Path(cf)
            else:
                chk.problem(fields["config_file"].node,
                            f"{path}.config_file: {cf!r} must be an absolute path")
        if template and "config_file" in fields:
            chk.problem(fields["config_file"].key_node,
                        f"{path}.config_file: a template backend ({unit}) runs several models at once, which "
                        "cannot share one config file; give each model a `command` (with its model and port) "
                        "and remove config_file, or use a plain unit")
        warmup = chk.number(fields.get("warmup"), f"{path}.warmup", 0.0, strict=False)
        sleep = _sleep(chk, fields.get("sleep"), f"{path}.sleep")
        if len(chk.problems) == before and unit is not None and url is not None:
            out.backends[name] = Backend(name=name, unit=unit, url=url, health=health,
                                         config_file=config_file, warmup=warmup, sleep=sleep)


def _sleep(chk: _Checker, item: _Item | None, path: str) -> SleepSpec | None:
    """`sleep:` of a backend: vllm, sglang, or {enter: "POST /path", leave: "POST /path", check: "GET /path"}."""
    if item is None or _is_null(item.node):
        return None
    expected = ('vllm, sglang, or a mapping like {enter: "POST /sleep", leave: "POST /wake", '
                'check: "GET /is_sleeping"} (check optional)')
    node = item.node
    if isinstance(node, ScalarNode):
        value = chk.scalar(node, path, expected)
        if value is _BROKEN:
            return None
        if isinstance(value, str) and value in SLEEP_KINDS:
            return SLEEP_KINDS[value]
        if not isinstance(value, str):
            chk.problem(node, f"{path}: expected {expected}, got {_describe(node)}")
            return None
        near = difflib.get_close_matches(str(value), list(SLEEP_KINDS), n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        chk.problem(node, f"{path}: unknown sleep kind {_describe(node)}; {hint}expected {expected}")
        return None
    if not isinstance(node, MappingNode):
        chk.problem(node, f"{path}: expected {expected}, got {_describe(node)}")
        return None
    before = len(chk.problems)
    fields = chk.section(node, path, _SLEEP_KEYS, null_ok=False)
    for required in ("enter", "leave"):
        if required not in fields:
            chk.problem(item.key_node, f"{path}.{required}: missing; a custom sleep needs enter and leave "
                                       f"(like {required}: \"POST /{'sleep' if required == 'enter' else 'wake'}\")")
    enter = _endpoint(chk, fields.get("enter"), f"{path}.enter")
    leave = _endpoint(chk, fields.get("leave"), f"{path}.leave")
    check = _endpoint(chk, fields.get("check"), f"{path}.check")
    if len(chk.problems) != before or enter is None or leave is None:
        return None
    return SleepSpec("custom", enter, leave, check)


def _endpoint(chk: _Checker, item: _Item | None, path: str) -> Endpoint | None:
    """ "POST /path?query": an HTTP method and a path on the backend's url."""
    what = 'an HTTP method and a path, like "POST /sleep"'
    value = chk.string(item, path, what=what)
    if value is None or item is None:
        return None
    parts = value.split()
    if len(parts) != 2:
        chk.problem(item.node, f"{path}: expected {what}, got {value!r}")
        return None
    method, target = parts[0].upper(), parts[1]
    if method not in HTTP_METHODS:
        chk.problem(item.node, f"{path}: {parts[0]!r} is not an HTTP method; use one of {', '.join(HTTP_METHODS)}")
        return None
    if not target.startswith("/") or "#" in target or not _control_free(target):
        chk.problem(item.node, f"{path}: the path must start with '/' (and have no '#'), like \"{method} /sleep\", "
                               f"got {target!r}")
        return None
    return Endpoint(method, target)


def _url(chk: _Checker, item: _Item | None, path: str, *, template: bool | None = False,
         unit: str | None = None) -> str | None:
    """A backend's base URL; a template backend's has {port} where the port goes (template None: unknown,
    the unit itself is wrong: {port} is accepted, not required)."""
    value = chk.string(item, path, what="a URL like http://127.0.0.1:8000")
    if value is None or item is None:
        return None
    if PORT_PLACEHOLDER in value:
        if template is False:
            chk.problem(item.node, f"{path}: {value!r} has {PORT_PLACEHOLDER}, which only a template backend fills "
                                   f"(unit: NAME@.service, each model on its own port:); write the port, or make "
                                   f"the unit a template like {(unit or 'x.service')[:-len('.service')]}@.service")
            return None
        if value.count(PORT_PLACEHOLDER) != 1 or not urlsplit(value).netloc.endswith(":" + PORT_PLACEHOLDER):
            chk.problem(item.node, f"{path}: {PORT_PLACEHOLDER} must stand once for the URL's port, like "
                                   f"http://127.0.0.1:{PORT_PLACEHOLDER}, got {value!r}")
            return None
    elif template:
        chk.problem(item.node, f"{path}: backend unit {unit} is a template: each of its models runs as its own "
                               f"instance on its own port, so the url needs {PORT_PLACEHOLDER} where the port "
                               f"goes, like http://127.0.0.1:{PORT_PLACEHOLDER}; got {value!r}")
        return None
    try:
        parts = urlsplit(value.replace(PORT_PLACEHOLDER, "1"))
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError as exc:
        chk.problem(item.node, f"{path}: {value!r} is not a valid URL ({exc})")
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        chk.problem(item.node, f"{path}: expected an http:// or https:// URL with a host, "
                               f"like http://127.0.0.1:8000, got {value!r}")
        return None
    if parts.query or parts.fragment or any(c.isspace() for c in value):
        chk.problem(item.node, f"{path}: the URL must not contain a query, fragment or spaces: {value!r}")
        return None
    return value.rstrip("/")


# --- models.yml -------------------------------------------------------------------------------------------

_MODEL_KEYS = ("backend", "name", "command", "env", "model_name", "upstream_model", "load_timeout", "warmup",
               "unit", "port", "vram_gb", "gpu", "ram_gb", "persistent", "ttl", "aliases", "unlisted",
               "max_concurrent", "params")
_PARAMS_KEYS = ("set", "strip")
# Request fields the router itself reads or rewrites: `params` may neither force nor strip them.
ROUTER_FIELDS = ("model", "stream")


@dataclass
class _ModelNames:
    """What models.yml names, valid or not: for the checks across models and across the two files."""

    readable: bool = False  # the models: mapping could be read (else nothing is checked against it)
    ids: dict[str, Node] = field(default_factory=dict)  # every model id written -> its key node
    aliases: dict[str, tuple[str, Node]] = field(default_factory=dict)  # alias -> (model id, node)
    ports: dict[int, tuple[str, Node]] = field(default_factory=dict)  # template instance port -> (model id, node)


def _parse_models_yml(chk: _Checker, root: Node | None, settings: _Settings,
                      names: _ModelNames) -> dict[str, Model]:
    top = chk.section(root, "", ("models",))
    item = top.get("models")
    if item is None or (isinstance(item.node, ScalarNode) and item.node.tag == _NULL):
        chk.problem(item.key_node if item else None,
                    "no models defined in models.yml: add at least one under `models:`")
        return {}
    entries = chk.items(item.node, "models", what="a mapping of model id -> settings")
    if entries is None:
        return {}
    if not entries:
        chk.problem(item.node, "no models defined in models.yml: add at least one under `models:`")
        return {}
    names.readable = True
    for entry in entries:
        names.ids.setdefault(entry.key, entry.key_node)

    models: dict[str, Model] = {}
    on_backend_unit: dict[str, list[tuple[_Item, Model]]] = {}
    for entry in entries:
        model = _parse_model(chk, entry, settings, names)
        if model is None:
            continue
        models[model.id] = model
        spec = settings.backends.get(model.backend)
        if model.unit is None and not (spec is not None and spec.template):
            on_backend_unit.setdefault(model.backend, []).append((entry, model))

    # Several models started through one backend unit must differ in what the router writes.
    for backend, sharing in on_backend_unit.items():
        if len(sharing) < 2:
            continue
        others = ", ".join(m.id for _, m in sharing)
        for entry, model in sharing:
            if model.command is None and model.model_name is None and not model.env:
                chk.problem(entry.key_node, f"models.{model.id}: backend {backend!r} serves several "
                            f"models ({others}), so each needs its own `command` (or `model_name` with the "
                            "backend's config_file, or `env`, or a dedicated `unit`); otherwise the router "
                            "cannot tell which one runs")
    return models


def _parse_model(chk: _Checker, entry: _Item, settings: _Settings, names: _ModelNames) -> Model | None:
    mid = entry.key
    path = f"models.{mid}"
    before = len(chk.problems)
    if not _control_free(mid) or any(c.isspace() for c in mid):
        chk.problem(entry.key_node, f"{path}: a model id must not contain spaces or control characters")
        return None
    if isinstance(entry.node, ScalarNode) and entry.node.tag == _NULL:
        chk.problem(entry.key_node, f"{path}: no settings; give at least `backend:`")
        return None
    fields = chk.section(entry.node, path, _MODEL_KEYS, null_ok=False)
    if not isinstance(entry.node, MappingNode):
        return None

    backend = chk.string(fields.get("backend"), f"{path}.backend", what="a backend name from config.yml")
    if "backend" not in fields:
        chk.problem(entry.key_node, f"{path}.backend: missing; say which backend from config.yml serves "
                                    f"this model ({_known(settings)})")
    elif backend is not None and settings.backends_readable and backend not in settings.backend_names:
        chk.problem(fields["backend"].node,
                    f"{path}.backend: unknown backend {backend!r}; {_known(settings)}")
        backend = None

    name = chk.string(fields.get("name"), f"{path}.name", what="a display name")
    upstream = chk.string(fields.get("upstream_model"), f"{path}.upstream_model",
                          what="the model name the engine knows")
    model_name = chk.string(fields.get("model_name"), f"{path}.model_name",
                            what="the model name to write into the backend's config_file")
    if (model_name is not None and backend is not None and settings.backends_readable
            and backend not in settings.backends_with_config_file):
        chk.problem(fields["model_name"].node, f"{path}.model_name: backend {backend!r} has no config_file "
                    f"to write it into; set backends.{backend}.config_file in config.yml, or use `command`")
    load_timeout = (chk.number(fields["load_timeout"], f"{path}.load_timeout", 0.0)
                    if "load_timeout" in fields else None)
    warmup = chk.number(fields["warmup"], f"{path}.warmup", 0.0, strict=False) if "warmup" in fields else None
    unit = chk.unit(fields.get("unit"), f"{path}.unit")
    command = _command(chk, fields.get("command"), f"{path}.command")
    env = _env(chk, fields.get("env"), f"{path}.env")

    backend_unit = settings.backend_units.get(backend) if backend is not None else None
    template = backend_unit.endswith("@.service") if backend_unit is not None else None
    if "unit" in fields:
        clash = [k for k in ("command", "env", "model_name") if k in fields]
        if template and backend_unit is not None:
            chk.problem(fields["unit"].key_node, f"{path}.unit: backend {backend!r} is a template "
                        f"({backend_unit}): each of its models already runs as its own instance "
                        f"({backend_unit[:-len('@.service')]}@{instance_name(mid)}.service); remove unit, "
                        "or put the model on a backend with a plain unit")
        elif clash:
            chk.problem(fields["unit"].key_node, f"{path}.unit: a model with its own unit is only started "
                        f"and stopped, nothing is rewritten; remove {', '.join(clash)} or remove unit")

    if template and backend_unit is not None:
        instance = f"{backend_unit[:-len('@.service')]}@{instance_name(mid)}.service"
        if len(instance) > MAX_UNIT_NAME:
            chk.problem(entry.key_node, f"{path}: its instance unit {instance[:40]}... would be {len(instance)} "
                        f"characters long (the id escaped for systemd), more than systemd's {MAX_UNIT_NAME}; use a "
                        "shorter model id (an alias can keep the long name)")
    port = _model_port(chk, entry, fields, path, backend, backend_unit, settings, names)
    resources = _resources(chk, fields, path, settings)
    ttl_item = fields.get("ttl")
    ttl = _optional_number(chk, ttl_item, f"{path}.ttl", null_means="never, whatever residency.default_ttl says")
    aliases = _aliases(chk, fields.get("aliases"), path, mid, names)
    max_concurrent: int | None = None
    if (mc := fields.get("max_concurrent")) is not None and not _is_null(mc.node):
        at = len(chk.problems)
        value = chk.integer(mc, f"{path}.max_concurrent", 0, minimum=1,
                            what="a number of responses at once (or null: no limit)")
        max_concurrent = value if len(chk.problems) == at else None
    params_set, params_strip = _params(chk, fields.get("params"), f"{path}.params")
    no_ttl = ttl_item is not None and _is_null(ttl_item.node)
    persistent = chk.boolean(fields.get("persistent"), f"{path}.persistent", False)
    unlisted = chk.boolean(fields.get("unlisted"), f"{path}.unlisted", False)

    if len(chk.problems) != before or backend is None:
        return None
    return Model(id=mid, backend=backend, name=name, command=command, env=env, model_name=model_name,
                 upstream_model=upstream, load_timeout=load_timeout, warmup=warmup, unit=unit, port=port,
                 vram_gb=resources.vram_gb, gpu=resources.gpu, ram_gb=resources.ram_gb,
                 persistent=persistent, ttl=ttl, no_ttl=no_ttl, aliases=aliases,
                 unlisted=unlisted, max_concurrent=max_concurrent, params_set=params_set, params_strip=params_strip)


def _model_port(chk: _Checker, entry: _Item, fields: dict[str, _Item], path: str, backend: str | None,
                backend_unit: str | None, settings: _Settings, names: _ModelNames) -> int | None:
    """A model's `port:`: required on a template backend (unique, not the router's), refused elsewhere."""
    item = fields.get("port")
    port: int | None = None
    if item is not None:
        value = chk.scalar(item.node, f"{path}.port", "a port number 1..65535")
        if value is not _BROKEN:
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
                chk.problem(item.node, f"{path}.port: expected a port number 1..65535, got {_describe(item.node)}")
            else:
                port = value
    if backend_unit is None:  # no backend, or its unit is wrong: that problem is reported already
        return port
    if not backend_unit.endswith("@.service"):
        if item is not None:
            chk.problem(item.key_node, f"{path}.port: backend {backend!r} has the plain unit {backend_unit}, whose "
                        f"url fixes the port; remove port, or make the backend a template (unit: "
                        f"{backend_unit[:-len('.service')]}@.service, url: \"http://127.0.0.1:{{port}}\")")
        return None
    if item is None:
        chk.problem(entry.key_node, f"{path}.port: missing; backend {backend!r} is a template ({backend_unit}): "
                    "each of its models runs as its own instance on its own port; add port: (like port: 8101) "
                    "and make the model's command listen on it")
        return None
    if port is None:
        return None
    if port == settings.listen.port:
        chk.problem(item.node, f"{path}.port: {port} is the router's own port (listen.port in config.yml); "
                               "pick another")
        return None
    if port in names.ports:
        other, node = names.ports[port]
        chk.problem(item.node, f"{path}.port: {port} is already the port of model {other!r} (line {_line(node)}); "
                               "each model on a template backend needs a port of its own")
        return None
    names.ports[port] = (entry.key, item.node)
    mine = settings.backends.get(backend) if backend is not None else None
    host = urlsplit(mine.url).hostname if mine is not None else None
    for plain in settings.backends.values():
        if plain.template:
            continue
        parts = urlsplit(plain.url)
        if parts.hostname == host and (parts.port or (443 if parts.scheme == "https" else 80)) == port:
            chk.problem(item.node, f"{path}.port: {port} is where backend {plain.name!r} ({plain.unit}) listens "
                                   f"({plain.url}); pick another port")
            return None
    return port


@dataclass(frozen=True)
class _Resources:
    vram_gb: float | None
    gpu: int
    ram_gb: float | None


def _resources(chk: _Checker, fields: dict[str, _Item], path: str, settings: _Settings) -> _Resources:
    """vram_gb, gpu and ram_gb of a model, checked against config.yml's `gpus:` when it lists them."""
    vram_gb = None
    if (item := fields.get("vram_gb")) is not None and not _is_null(item.node):
        at = len(chk.problems)
        value = chk.number(item, f"{path}.vram_gb", 0.0, noun="a number of GB")
        vram_gb = value if len(chk.problems) == at else None
    gpu = chk.integer(fields.get("gpu"), f"{path}.gpu", 0, minimum=0, what="a GPU index")
    ram_gb = None
    if (item := fields.get("ram_gb")) is not None and not _is_null(item.node):
        at = len(chk.problems)
        value = chk.number(item, f"{path}.ram_gb", 0.0, strict=False, noun="a number of GB")
        ram_gb = value if len(chk.problems) == at else None
    budgets = {g.index: g.vram_gb for g in settings.gpus}
    if budgets and settings.gpus_readable:
        listed = ", ".join(str(i) for i in budgets)
        if gpu not in budgets:
            if "gpu" in fields:
                chk.problem(fields["gpu"].node, f"{path}.gpu: GPU {gpu} is not in config.yml `gpus:` (listed: "
                                                f"{listed}); use one of them, or add it there")
            elif vram_gb is not None:
                chk.problem(fields["vram_gb"].key_node, f"{path}.vram_gb: the model loads on GPU 0 (the default; "
                            f"set gpu:), which is not in config.yml `gpus:` (listed: {listed})")
        elif vram_gb is not None and vram_gb > budgets[gpu]:
            chk.problem(fields["vram_gb"].node, f"{path}.vram_gb: {vram_gb:g} GB is more than GPU {gpu}'s budget of "
                        f"{budgets[gpu]:g} GB (gpus in config.yml), so the model could never load; lower vram_gb, "
                        "raise the GPU's vram_gb, or set gpu: to a larger one")
    return _Resources(vram_gb=vram_gb, gpu=gpu, ram_gb=ram_gb)


def _aliases(chk: _Checker, item: _Item | None, path: str, mid: str, names: _ModelNames) -> tuple[str, ...]:
    """Other names of a model: unique across every model id and alias."""
    if item is None or _is_null(item.node):
        return ()
    if not isinstance(item.node, SequenceNode):
        chk.problem(item.node, f"{path}.aliases: expected a list of names like [gpt-4o, chat], "
                               f"got {_describe(item.node)}")
        return ()
    aliases: list[str] = []
    for i, node in enumerate(item.node.value):
        where = f"{path}.aliases[{i}]"
        alias = chk.string(_Item(str(i), node, node), where, what="a name clients may send as \"model\"")
        if alias is None:
            continue
        if not _control_free(alias) or any(c.isspace() for c in alias):
            chk.problem(node, f"{where}: an alias must not contain spaces or control characters")
        elif alias == mid:
            chk.problem(node, f"{where}: {alias!r} is this model's own id; remove it")
        elif alias in names.ids:
            chk.problem(node, f"{where}: {alias!r} is the id of another model (line {_line(names.ids[alias])}); "
                              "an alias must not be a model id: rename one of them")
        elif alias in names.aliases:
            owner, first = names.aliases[alias]
            whose = "this model" if owner == mid else f"model {owner!r}"
            chk.problem(node, f"{where}: {alias!r} is already an alias of {whose} (line {_line(first)}); "
                              "an alias names one model, once")
        else:
            names.aliases[alias] = (mid, node)
            aliases.append(alias)
    return tuple(aliases)


def _params(chk: _Checker, item: _Item | None, path: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    """`params: {set: {field: value}, strip: [field]}`: request fields forced or removed."""
    fields = chk.section(_node(item), path, _PARAMS_KEYS)
    forced: dict[str, Any] = {}
    set_item = fields.get("set")
    if set_item is not None and not _is_null(set_item.node):
        for entry in chk.items(set_item.node, f"{path}.set",
                               what="a mapping of request field -> value, like {temperature: 0.6}") or []:
            where = f"{path}.set.{entry.key}"
            if entry.key in ROUTER_FIELDS:
                chk.problem(entry.key_node, f"{where}: the router sets {entry.key!r} itself"
                            + (" (use upstream_model to rename the model)" if entry.key == "model" else "")
                            + "; remove it")
                continue
            value = chk.json_value(entry.node, where)
            if value is not _BROKEN:
                forced[entry.key] = value
    stripped: list[str] = []
    strip_item = fields.get("strip")
    if strip_item is not None and not _is_null(strip_item.node):
        if not isinstance(strip_item.node, SequenceNode):
            chk.problem(strip_item.node, f"{path}.strip: expected a list of request field names like "
                                         f"[logit_bias, seed], got {_describe(strip_item.node)}")
        else:
            for i, node in enumerate(strip_item.node.value):
                where = f"{path}.strip[{i}]"
                name = chk.string(_Item(str(i), node, node), where, what="a request field name")
                if name is None:
                    continue
                if name in ROUTER_FIELDS:
                    chk.problem(node, f"{where}: the router needs {name!r}; it cannot be stripped")
                elif name in forced:
                    chk.problem(node, f"{where}: {name!r} is also under params.set; keep it in one of them")
                elif name not in stripped:
                    stripped.append(name)
    return forced, tuple(stripped)


def _known(settings: _Settings) -> str:
    if not settings.backend_names:
        return "no backends are defined in config.yml: add one under `backends:`"
    return "known backends: " + ", ".join(settings.backend_names)


def _command(chk: _Checker, item: _Item | None, path: str) -> tuple[str, ...] | None:
    if item is None:
        return None
    node = item.node
    expected = "a command line string or a list of arguments"
    args: list[tuple[str, Node]] = []
    if isinstance(node, SequenceNode):
        for i, arg_node in enumerate(node.value):
            text = chk.text(arg_node, f"{path}[{i}]", "a string or number")
            if text is not None:
                args.append((text, arg_node))
        if len(args) != len(node.value):
            return None
    elif isinstance(node, ScalarNode) and node.tag == _STR:
        try:
            args = [(a, node) for a in shlex.split(node.value)]
        except ValueError as exc:
            chk.problem(node, f"{path}: cannot split into arguments the way a shell would ({exc}); "
                              "check the quotes, or give a list of arguments")
            return None
    else:
        chk.problem(node, f"{path}: expected {expected}, got {_describe(node)}")
        return None

    if not args:
        chk.problem(node, f"{path}: is empty; give the program to run and its arguments")
        return None
    ok = True
    for i, (arg, arg_node) in enumerate(args):
        if any(c in arg for c in LINE_BREAKS):
            chk.problem(arg_node, f"{path}: argument {i} ({arg!r}) contains a line break or NUL, which a "
                                  "systemd ExecStart= line cannot carry; remove it")
            ok = False
        elif any(_noncharacter(c) for c in arg):
            chk.problem(arg_node, f"{path}: argument {i} ({arg!r}) contains a Unicode noncharacter "
                                  "(U+FDD0..U+FDEF or U+xFFFE/U+xFFFF); systemd drops the whole ExecStart= "
                                  "line for it: remove it")
            ok = False
    program, program_node = args[0]
    if not _control_free(program) or any(c in program for c in "\"'\\"):
        chk.problem(program_node, f"{path}: the program {program!r} contains a control character, a quote or "
                                  "a backslash, which systemd does not accept in an executable path; rename "
                                  "it or run it through a symlink")
        ok = False
    elif program == "":
        chk.problem(program_node, f"{path}: the program (first argument) is empty")
        ok = False
    elif program[0] in EXEC_PREFIX_CHARS:
        chk.problem(program_node, f"{path}: the program {program!r} must not start with one of "
                                  f"{' '.join(EXEC_PREFIX_CHARS)} (systemd reads those as ExecStart= "
                                  "prefixes)")
        ok = False
    elif "$" in program:
        chk.problem(program_node, f"{path}: the program {program!r} must not contain '$': systemd runs the "
                                  "path as written but expands '$' in the program's own argv[0]; rename it "
                                  "or run it through a symlink")
        ok = False
    elif "/" in program and not program.startswith("/"):
        chk.problem(program_node, f"{path}: the program {program!r} must be an absolute path "
                                  "(like /usr/local/bin/llama-server) or a bare program name found in "
                                  "systemd's search path; relative paths are not allowed")
        ok = False
    return tuple(a for a, _ in args) if ok else None


def _env(chk: _Checker, item: _Item | None, path: str) -> dict[str, str]:
    if item is None or (isinstance(item.node, ScalarNode) and item.node.tag == _NULL):
        return {}
    entries = chk.items(item.node, path, what="a mapping of VARIABLE: value")
    env: dict[str, str] = {}
    for entry in entries or []:
        if not ENV_NAME_RE.match(entry.key):
            chk.problem(entry.key_node, f"{path}: {entry.key!r} is not a valid variable name "
                                        "(letters, digits and '_', not starting with a digit)")
            continue
        value = chk.text(entry.node, f"{path}.{entry.key}", 'a string or number (use "" for empty)')
        if value is None:
            continue
        if any(c in value for c in LINE_BREAKS):
            chk.problem(entry.node, f"{path}.{entry.key}: contains a line break or NUL, which a systemd "
                                    "Environment= line cannot carry; remove it")
            continue
        env[entry.key] = value
    return env

