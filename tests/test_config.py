"""Unit tests for router.config: defaults, the issue's example, and every kind of error with file and line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from router.config import (
    Backend,
    Config,
    ConfigError,
    Limits,
    Listen,
    Model,
    Problem,
    SwitchSettings,
    Timeouts,
    load_config,
    parse_config,
)

DIR = Path("/etc/llm-router")
CFG = DIR / "config.yml"
MODELS = DIR / "models.yml"
REPO = Path(__file__).resolve().parent.parent
ENV = {"HOME": "/home/ann"}

MIN_CONFIG = """\
backends:
  llamacpp: {unit: llamacpp.service, url: "http://127.0.0.1:8085"}
"""
MIN_MODELS = """\
models:
  tiny:
    backend: llamacpp
"""

ISSUE_CONFIG = """\
listen: {host: 127.0.0.1, port: 8002}
systemd:
  bus: system          # system | user  (user = the manager that `systemctl --user` talks to, found
                       # through DBUS_SESSION_BUS_ADDRESS)
  dropin_dir: null     # where unit drop-ins go; default /etc/systemd/system for the system bus,
                       # $XDG_CONFIG_HOME/systemd/user (~/.config/systemd/user) for the user bus
switch:
  load_timeout: 180    # seconds from unit start to healthy
  stop_timeout: 30
  status_every: 10     # seconds between "Loading… Ns/180s" chunks
  status_channel: event      # event | reasoning | content | none, see "The API"
stats: true            # append "⚡ 41.2 tok/s (512 tokens in 12.4s)" to each chat response
backends:              # one entry per inference engine; each is one systemd unit
  sglang:   {unit: sglang.service,   url: "http://127.0.0.1:30000", health: /health}
  tabby:    {unit: tabbyapi.service, url: "http://127.0.0.1:5000",  health: /health,
             config_file: /opt/tabbyAPI/config.yml, warmup: 5}
  llamacpp: {unit: llamacpp.service, url: "http://127.0.0.1:8085",  health: /health}
  vllm:     {unit: vllm.service,     url: "http://127.0.0.1:8000",  health: /health}
"""
ISSUE_MODELS = """\
models:
  mistral-large-2411-awq:            # the id clients send as "model"
    backend: sglang
    command: /opt/llm/start-mistral-awq.sh          # becomes the unit's ExecStart
  qwen2.5-7b-instruct-q4:
    backend: llamacpp
    command: [/usr/local/bin/llama-server, -m, /models/qwen2.5-7b-q4_k_m.gguf,
              --port, "8085", -ngl, "999"]
    env: {CUDA_VISIBLE_DEVICES: "0"}               # Environment= lines in the same drop-in
  mistral-large-exl2:
    backend: tabby
    model_name: Mistral-Large-Instruct-2411-exl2    # written into the backend's config_file
"""


def parse(config: str = MIN_CONFIG, models: str = MIN_MODELS, environ: dict[str, str] | None = None) -> Config:
    return parse_config(config, models, DIR, ENV if environ is None else environ)


def problems(config: str = MIN_CONFIG, models: str = MIN_MODELS, environ: dict[str, str] | None = None
             ) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        parse(config, models, environ)
    return info.value.problems


def only(config: str = MIN_CONFIG, models: str = MIN_MODELS) -> Problem:
    found = problems(config, models)
    assert len(found) == 1, "\n".join(map(str, found))
    return found[0]


# --- valid files -------------------------------------------------------------------------------------------


def test_defaults() -> None:
    cfg = parse()
    assert cfg.config_dir == DIR
    assert cfg.listen == Listen("127.0.0.1", 8002)
    assert cfg.systemd.bus == "system"
    assert cfg.systemd.dropin_dir == Path("/etc/systemd/system")
    assert cfg.switch == SwitchSettings(load_timeout=180.0, stop_timeout=30.0, status_every=10.0,
                                        status_channel="event", keepalive_every=2.0, health_interval=0.25)
    assert cfg.stats is True
    assert cfg.api_key is None
    assert cfg.backends == {"llamacpp": Backend("llamacpp", "llamacpp.service", "http://127.0.0.1:8085")}
    assert cfg.models == {"tiny": Model(id="tiny", backend="llamacpp")}
    model = cfg.models["tiny"]
    assert cfg.unit_of(model) == "llamacpp.service"
    assert cfg.load_timeout_of(model) == 180.0
    assert cfg.warmup_of(model) == 0.0


def test_empty_config_file_is_all_defaults_but_models_then_need_a_backend() -> None:
    found = problems("", MIN_MODELS)
    assert [str(p) for p in found] == [
        f"{MODELS}:3: models.tiny.backend: unknown backend 'llamacpp'; no backends are defined in config.yml: "
        "add one under `backends:`"
    ]


def test_issue_example_parses() -> None:
    cfg = parse(ISSUE_CONFIG, ISSUE_MODELS)
    assert list(cfg.backends) == ["sglang", "tabby", "llamacpp", "vllm"]
    assert cfg.backends["tabby"] == Backend("tabby", "tabbyapi.service", "http://127.0.0.1:5000", "/health",
                                            Path("/opt/tabbyAPI/config.yml"), 5.0)
    assert list(cfg.models) == ["mistral-large-2411-awq", "qwen2.5-7b-instruct-q4", "mistral-large-exl2"]
    assert cfg.models["mistral-large-2411-awq"].command == ("/opt/llm/start-mistral-awq.sh",)
    qwen = cfg.models["qwen2.5-7b-instruct-q4"]
    assert qwen.command == ("/usr/local/bin/llama-server", "-m", "/models/qwen2.5-7b-q4_k_m.gguf",
                            "--port", "8085", "-ngl", "999")
    assert qwen.env == {"CUDA_VISIBLE_DEVICES": "0"}
    exl2 = cfg.models["mistral-large-exl2"]
    assert exl2.model_name == "Mistral-Large-Instruct-2411-exl2"
    assert cfg.warmup_of(exl2) == 5.0
    assert cfg.managed_units() == ["sglang.service", "tabbyapi.service", "llamacpp.service", "vllm.service"]


def test_every_setting_read() -> None:
    cfg = parse(
        """\
listen: {host: 0.0.0.0, port: 9000}
systemd: {bus: user, dropin_dir: /srv/dropins}
switch: {load_timeout: 60, stop_timeout: 5.5, status_every: 3, status_channel: reasoning,
         keepalive_every: 1, health_interval: 0.1}
stats: false
api_key: sk-local
backends:
  tabby: {unit: tabby@gpu0.service, url: "https://gpu-box:5000/", health: /v1/health,
          config_file: /opt/tabbyAPI/config.yml, warmup: 0}
""",
        """\
models:
  org/model-x:
    backend: tabby
    name: Model X
    model_name: X-exl2
    upstream_model: x
    load_timeout: 600
    warmup: 2.5
  own:
    backend: tabby
    unit: own-model.service
""",
    )
    assert cfg.listen == Listen("0.0.0.0", 9000)
    assert (cfg.systemd.bus, cfg.systemd.dropin_dir) == ("user", Path("/srv/dropins"))
    assert cfg.switch == SwitchSettings(60.0, 5.5, 3.0, "reasoning", 1.0, 0.1)
    assert (cfg.stats, cfg.api_key) == (False, "sk-local")
    assert cfg.backends["tabby"].url == "https://gpu-box:5000"
    assert cfg.backends["tabby"].health == "/v1/health"
    m = cfg.models["org/model-x"]
    assert (m.display_name, m.model_name, m.upstream_model, m.load_timeout, m.warmup) == (
        "Model X", "X-exl2", "x", 600.0, 2.5)
    assert cfg.unit_of(cfg.models["own"]) == "own-model.service"
    assert cfg.managed_units() == ["tabby@gpu0.service", "own-model.service"]


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"XDG_CONFIG_HOME": "/x/cfg", "HOME": "/home/ann"}, "/x/cfg/systemd/user"),
        ({"HOME": "/home/ann"}, "/home/ann/.config/systemd/user"),
        ({"XDG_CONFIG_HOME": "relative", "HOME": "/home/ann"}, "/home/ann/.config/systemd/user"),
    ],
)
def test_user_bus_dropin_dir_default(environ: dict[str, str], expected: str) -> None:
    cfg = parse("systemd: {bus: user}\n" + MIN_CONFIG, environ=environ)
    assert cfg.systemd.dropin_dir == Path(expected)


def test_user_bus_without_home_needs_dropin_dir() -> None:
    found = problems("systemd: {bus: user}\n" + MIN_CONFIG, environ={})
    assert [str(p) for p in found] == [
        f"{CFG}:1: systemd.dropin_dir: cannot work out the user manager's drop-in directory: neither "
        "XDG_CONFIG_HOME nor HOME is set; set systemd.dropin_dir"
    ]


def test_command_forms() -> None:
    cfg = parse(
        MIN_CONFIG,
        """\
models:
  a:
    backend: llamacpp
    command: llama-server -m '/models/my model.gguf' --alias "a b" -c 4096
    env: {N: 1, F: 0.5, B: yes, S: "", T: text}
  b:
    backend: llamacpp
    command: [/usr/bin/llama-server, --port, 8085, -ngl, 999, --temp, 0.7, --flag, true, 0x1F]
""",
    )
    assert cfg.models["a"].command == ("llama-server", "-m", "/models/my model.gguf", "--alias", "a b",
                                       "-c", "4096")
    # Scalars are kept as typed: YAML 1.1 would read `yes` as True and 0x1F as 31.
    assert cfg.models["a"].env == {"N": "1", "F": "0.5", "B": "yes", "S": "", "T": "text"}
    assert cfg.models["b"].command == ("/usr/bin/llama-server", "--port", "8085", "-ngl", "999",
                                       "--temp", "0.7", "--flag", "true", "0x1F")


def test_models_sharing_a_backend_each_with_a_command_and_one_alone_without() -> None:
    cfg = parse(
        MIN_CONFIG + "  vllm: {unit: vllm.service, url: 'http://127.0.0.1:8000'}\n",
        """\
models:
  a: {backend: llamacpp, command: /bin/a}
  b: {backend: llamacpp, env: {MODEL: b}}
  c: {backend: llamacpp, unit: c.service}
  d: {backend: vllm}
""",
    )
    assert list(cfg.models) == ["a", "b", "c", "d"]


def test_yaml_anchors_and_merge_keys() -> None:
    cfg = parse(
        MIN_CONFIG,
        """\
models:
  a: &llama
    backend: llamacpp
    command: [/bin/llama, -m, a.gguf]
    env: {THREADS: 8}
  b:
    <<: *llama
    command: [/bin/llama, -m, b.gguf]
""",
    )
    assert cfg.models["a"].command == ("/bin/llama", "-m", "a.gguf")
    assert cfg.models["b"].backend == "llamacpp"
    assert cfg.models["b"].command == ("/bin/llama", "-m", "b.gguf")
    assert cfg.models["b"].env == {"THREADS": "8"}


def test_hardening_settings_read() -> None:
    cfg = parse("""\
switch: {max_wait: 30, linger: 0, failure_cooldown: 0, max_queue: 10}
timeouts: {connect: 1.5, first_byte: 60, idle: 20}
limits: {max_body_bytes: 1_048_576, max_header_bytes: 8192, idle_connection: 2, header_timeout: 3,
         max_connections: 100}
api_key: main
api_keys: [k1, k2, k1]
admin_api_keys: [adm]
""" + MIN_CONFIG)
    assert (cfg.switch.max_wait, cfg.switch.linger, cfg.switch.failure_cooldown, cfg.switch.max_queue) == (
        30.0, 0.0, 0.0, 10)
    assert cfg.timeouts == Timeouts(connect=1.5, first_byte=60.0, idle=20.0)
    assert cfg.limits == Limits(max_body_bytes=1048576, max_header_bytes=8192, idle_connection=2.0,
                                header_timeout=3.0, max_connections=100)
    assert cfg.api_keys == ("k1", "k2")
    assert cfg.client_keys == ("main", "k1", "k2")
    assert cfg.admin_api_keys == ("adm",)


def test_hardening_defaults() -> None:
    cfg = parse()
    assert (cfg.timeouts, cfg.limits) == (Timeouts(), Limits())
    assert cfg.limits.max_body_bytes == 32 * 1024 * 1024
    assert (cfg.api_keys, cfg.admin_api_keys, cfg.client_keys) == ((), (), ())
    assert parse("api_keys: null\nadmin_api_keys: []\n" + MIN_CONFIG).client_keys == ()


def _files(tmp_path: Path, config: str = MIN_CONFIG) -> Path:
    (tmp_path / "config.yml").write_text(config)
    (tmp_path / "models.yml").write_text(MIN_MODELS)
    return tmp_path


def test_api_keys_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# clients\n\n  alice-key  \nbob-key\n# old: carol\n")
    cfg = load_config(_files(tmp_path, "api_keys: [cfg-key]\n" + MIN_CONFIG),
                      {"LLM_ROUTER_API_KEYS_FILE": str(keys)})
    assert cfg.client_keys == ("cfg-key", "alice-key", "bob-key")


def test_api_keys_file_missing_or_empty_is_a_problem(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    with pytest.raises(ConfigError) as info:
        load_config(_files(tmp_path), {"LLM_ROUTER_API_KEYS_FILE": str(keys)})
    assert str(info.value) == (f"{keys}: the API keys file named by $LLM_ROUTER_API_KEYS_FILE: cannot read it: "
                               "No such file or directory; fix it, or unset the variable")
    keys.write_text("# nobody yet\n\n")
    with pytest.raises(ConfigError, match=r"keys: the API keys file named by \$LLM_ROUTER_API_KEYS_FILE holds no "
                                          "key, so clients would need none"):
        load_config(tmp_path, {"LLM_ROUTER_API_KEYS_FILE": str(keys)})
    keys.write_text("good\nbad\x01key\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, {"LLM_ROUTER_API_KEYS_FILE": str(keys)})
    assert str(info.value) == f"{keys}:2: an API key must not contain control characters"


# --- YAML bombs and deep nesting: a file:line problem, fast, never a traceback ------------------------------

MERGE_BOMB = "a: &a {x0: 1, x1: 2}\n" + "".join(
    f"b{i}: &b{i} {{<<: [{', '.join(['*' + ('a' if i == 1 else f'b{i - 1}')] * 9)}], y{i}: 1}}\n"
    for i in range(1, 10)
) + "switch: {<<: *b9}\n"
LAUGHS = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
) + "api_keys: *i\n"


def test_merge_key_bomb_is_refused_with_its_line() -> None:
    assert len(MERGE_BOMB.splitlines()) == 11
    p = only(MERGE_BOMB + MIN_CONFIG)
    assert (p.file, p.line) == (CFG, 6)  # b5, the first mapping that expands past the bound
    assert p.message.startswith("invalid YAML: aliases (*name) and merge keys (<<) here expand to more than")


def test_billion_laughs_is_refused() -> None:
    p = only(LAUGHS + MIN_CONFIG)
    assert p.file == CFG and p.line is not None
    assert "expand to more than 100000 values" in p.message


@pytest.mark.parametrize("text", [
    "backends: " + "[" * 5000 + "]" * 5000,
    "backends:" + "".join("\n" + " " * i + "-" for i in range(200)) + " x",
    "backends: " + "{a: " * 3000 + "1" + "}" * 3000,
])
def test_deep_nesting_is_a_problem_not_a_recursion_error(text: str) -> None:
    p = only(text + "\n", MIN_MODELS)
    assert p.file == CFG and p.line is not None
    assert p.message.startswith("invalid YAML: nested more than 64 levels deep")


def test_alias_expanding_too_deep_and_self_reference() -> None:
    chain = "a0: &a0 [" + "[" * 40 + "]" * 40 + "]\n" + "".join(
        f"a{i}: &a{i} [" + "[" * 40 + f"*a{i - 1}" + "]" * 40 + "]\n" for i in range(1, 4))
    p = problems(chain + MIN_CONFIG)[0]
    assert p.message.startswith("invalid YAML: nested more than 64 levels deep once aliases")
    p = only("stats: &s [*s]\n" + MIN_CONFIG)
    assert (p.line, p.message) == (1, "invalid YAML: an alias (*name) refers to the value that contains it")


def test_load_config_reads_both_files(tmp_path: Path) -> None:
    (tmp_path / "config.yml").write_text(MIN_CONFIG)
    (tmp_path / "models.yml").write_text(MIN_MODELS)
    cfg = load_config(tmp_path, {})
    assert cfg.config_dir == tmp_path
    assert list(cfg.models) == ["tiny"]


def test_load_config_missing_files_say_what_to_create(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, {})
    lines = str(info.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{tmp_path / 'config.yml'}: file not found: create it with at least a `backends:`")
    assert lines[1].startswith(f"{tmp_path / 'models.yml'}: file not found: create it with a `models:` mapping")


def test_load_config_invalid_utf8(tmp_path: Path) -> None:
    (tmp_path / "config.yml").write_bytes(b"listen: {host: \xff}\n")
    (tmp_path / "models.yml").write_text(MIN_MODELS)
    with pytest.raises(ConfigError, match=r"config\.yml: not valid UTF-8"):
        load_config(tmp_path, {})


# --- shipped example files ---------------------------------------------------------------------------------


def _uncomment_examples(text: str, section: str) -> str:
    """Uncomment the commented example blocks (`  # key:` and `  #   ...` lines) below `section:`."""
    head, sep, tail = text.partition(f"\n{section}:\n")
    assert sep, f"no {section}: section"
    tail = re.sub(r"(?m)^  # ([^\s:]+:)$", r"  \1", tail)
    tail = re.sub(r"(?m)^  #   ", "    ", tail)
    return head + sep + tail


def test_shipped_files_parse() -> None:
    config_text = (REPO / "etc/llm-router/config.yml").read_text()
    models_text = (REPO / "etc/llm-router/models.yml").read_text()
    cfg = parse_config(config_text, models_text, DIR, {})
    assert cfg.listen == Listen()
    assert cfg.switch == SwitchSettings()
    assert (cfg.timeouts, cfg.limits) == (Timeouts(), Limits())  # the file shows the defaults
    assert (cfg.api_key, cfg.api_keys, cfg.admin_api_keys) == (None, (), ())
    assert list(cfg.backends) == ["llamacpp"]
    assert [m.backend for m in cfg.models.values()] == ["llamacpp"]


def test_shipped_commented_examples_parse_once_uncommented() -> None:
    config_text = _uncomment_examples((REPO / "etc/llm-router/config.yml").read_text(), "backends")
    models_text = _uncomment_examples((REPO / "etc/llm-router/models.yml").read_text(), "models")
    cfg = parse_config(config_text, models_text, DIR, {})
    assert set(cfg.backends) == {"llamacpp", "vllm", "sglang", "tabby"}
    assert sorted(m.backend for m in cfg.models.values()) == ["llamacpp", "sglang", "tabby", "vllm"]


# --- errors ------------------------------------------------------------------------------------------------


def test_problem_and_error_formatting() -> None:
    assert str(Problem(CFG, 3, "x: bad")) == f"{CFG}:3: x: bad"
    assert str(Problem(CFG, None, "x: bad")) == f"{CFG}: x: bad"
    err = ConfigError([Problem(CFG, 1, "a"), Problem(MODELS, None, "b")])
    assert str(err) == f"{CFG}:1: a\n{MODELS}: b"


def test_bad_yaml_syntax_has_the_line() -> None:
    p = only("listen:\n  host: 127.0.0.1\n  port: [8002\nstats: true\n")
    assert p.file == CFG
    assert p.line is not None and p.line >= 3
    assert p.message.startswith("invalid YAML: ")


def test_control_character_in_file() -> None:
    p = only(MIN_CONFIG + "stats: tr\x07ue\n")
    assert str(p) == f"{CFG}:3: invalid YAML: character U+0007 is not allowed in a YAML file; remove it"


def test_unknown_yaml_tag() -> None:
    p = only("switch: {load_timeout: !seconds 3}\n" + MIN_CONFIG)
    assert (p.line, p.message.split(":")[0]) == (1, "switch.load_timeout")
    assert "cannot read this value" in p.message


def test_bad_yaml_in_models_does_not_cascade() -> None:
    p = only(MIN_CONFIG, "models:\n  a: {backend: llamacpp\n")
    assert (p.file, p.message.startswith("invalid YAML")) == (MODELS, True)


def test_broken_config_yml_does_not_report_every_model_backend_as_unknown() -> None:
    p = only("backends: [\n", MIN_MODELS)
    assert p.file == CFG


def test_unknown_key_lists_allowed_keys() -> None:
    p = only("switch:\n  load_timout: 10\n" + MIN_CONFIG)
    assert str(p) == (f"{CFG}:2: switch.load_timout: unknown key; did you mean 'load_timeout'? allowed keys: "
                      "load_timeout, stop_timeout, status_every, status_channel, keepalive_every, health_interval, "
                      "max_wait, linger, failure_cooldown, max_queue")


def test_unknown_model_key() -> None:
    p = only(MIN_CONFIG, "models:\n  tiny:\n    backend: llamacpp\n    commands: /bin/x\n")
    assert (p.file, p.line) == (MODELS, 4)
    assert p.message.startswith("models.tiny.commands: unknown key; did you mean 'command'? allowed keys: backend,")


def test_unknown_backend_names_the_known_ones() -> None:
    p = only(MIN_CONFIG + "  vllm: {unit: vllm.service, url: 'http://h:1'}\n",
             "models:\n  tiny:\n    backend: llama\n")
    assert str(p) == f"{MODELS}:3: models.tiny.backend: unknown backend 'llama'; known backends: llamacpp, vllm"


def test_missing_backend_key() -> None:
    p = only(MIN_CONFIG, "models:\n  tiny:\n    name: Tiny\n")
    assert str(p) == (f"{MODELS}:2: models.tiny.backend: missing; say which backend from config.yml serves this "
                      "model (known backends: llamacpp)")


def test_missing_command_on_a_shared_backend() -> None:
    found = problems(MIN_CONFIG, """\
models:
  a: {backend: llamacpp, command: /bin/a}
  b: {backend: llamacpp}
""")
    assert [(p.file, p.line) for p in found] == [(MODELS, 3)]
    assert found[0].message.startswith("models.b: backend 'llamacpp' serves several models (a, b), so each "
                                       "needs its own `command`")
    assert "cannot tell" in found[0].message


def test_duplicate_model_id() -> None:
    p = only(MIN_CONFIG, """\
models:
  tiny: {backend: llamacpp, command: /bin/a}
  other: {backend: llamacpp, command: /bin/b}
  tiny: {backend: llamacpp, command: /bin/c}
""")
    assert str(p) == (f"{MODELS}:4: models.tiny: duplicate key (first defined on line 2); YAML would silently "
                      "keep only the last one: remove or rename one")


def test_duplicate_key_in_config() -> None:
    p = only("listen:\n  port: 1\n  port: 2\n" + MIN_CONFIG)
    assert (p.line, p.message.split(":")[0]) == (3, "listen.port")


def test_newline_in_an_argument() -> None:
    p = only(MIN_CONFIG, 'models:\n  tiny:\n    backend: llamacpp\n    command: [/bin/x, "a\\nb"]\n')
    assert p.line == 4
    assert p.message == ("models.tiny.command: argument 1 ('a\\nb') contains a line break or NUL, which a systemd "
                         "ExecStart= line cannot carry; remove it")


def test_newline_in_an_env_value() -> None:
    p = only(MIN_CONFIG, 'models:\n  tiny:\n    backend: llamacpp\n    env:\n      A: "x\\ry"\n')
    assert (p.line, p.message) == (5, "models.tiny.env.A: contains a line break or NUL, which a systemd "
                                      "Environment= line cannot carry; remove it")


def test_model_name_needs_a_config_file() -> None:
    p = only(MIN_CONFIG, "models:\n  tiny:\n    backend: llamacpp\n    model_name: Tiny-exl2\n")
    assert str(p) == (f"{MODELS}:4: models.tiny.model_name: backend 'llamacpp' has no config_file to write it "
                      "into; set backends.llamacpp.config_file in config.yml, or use `command`")


def test_no_models() -> None:
    for text in ("", "models:\n", "models: {}\n"):
        p = only(MIN_CONFIG, text)
        assert p.file == MODELS
        assert "no models defined in models.yml: add at least one" in p.message


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("-/bin/x", "the program '-/bin/x' must not start with one of - @ : + !"),
        ("'@x'", "the program '@x' must not start with one of"),
        ("bin/x --a", "the program 'bin/x' must be an absolute path"),
        ("./x", "the program './x' must be an absolute path"),
        ("'/opt/$x/run'", "the program '/opt/$x/run' must not contain '$'"),
        ("'/bin/x \"a'", "cannot split into arguments the way a shell would (No closing quotation)"),
        ("''", "is empty; give the program to run"),
        ("[]", "is empty; give the program to run"),
        ('[""]', "the program (first argument) is empty"),
        ("[/bin/x, [a]]", "models.tiny.command[1]: expected a string or number, got a list"),
        ("[/bin/x, ~]", "models.tiny.command[1]: expected a string or number, got nothing (null)"),
        ("{a: 1}", "expected a command line string or a list of arguments, got a mapping"),
        ("42", "expected a command line string or a list of arguments, got an integer '42'"),
    ],
)
def test_bad_commands(command: str, message: str) -> None:
    p = only(MIN_CONFIG, f"models:\n  tiny:\n    backend: llamacpp\n    command: {command}\n")
    assert (p.file, p.line) == (MODELS, 4)
    assert message in p.message
    assert p.message.startswith("models.tiny.command")


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("listen: {port: 0}", 1, "listen.port: expected a port number 1..65535, got an integer '0'"),
        ("listen: {port: '80'}", 1, "listen.port: expected a port number 1..65535, got '80'"),
        ("listen: {host: 7}", 1, "listen.host: expected a host name or IP address, got an integer '7' "
                                 "(put it in quotes to use it as text)"),
        ("listen: 8002", 1, "listen: expected a mapping, got an integer '8002'"),
        ("systemd: {bus: session}", 1, "systemd.bus: expected one of system, user, got 'session'"),
        ("systemd: {dropin_dir: etc/systemd}", 1, "systemd.dropin_dir: 'etc/systemd' must be an absolute path"),
        ("switch: {load_timeout: 0}", 1, "switch.load_timeout: must be > 0, got 0"),
        ("switch: {stop_timeout: -1}", 1, "switch.stop_timeout: must be > 0, got -1"),
        ("switch: {status_every: soon}", 1, "switch.status_every: expected a number of seconds > 0, got 'soon'"),
        ("switch: {keepalive_every: true}", 1, "switch.keepalive_every: expected a number of seconds > 0, "
                                               "got a boolean 'true'"),
        ("switch: {health_interval: .nan}", 1, "switch.health_interval: expected a number of seconds > 0"),
        ("switch: {status_channel: chat}", 1, "switch.status_channel: expected one of event, reasoning, "
                                              "content, none, got 'chat'"),
        ("stats: 1", 1, "stats: expected true or false, got an integer '1'"),
        ("api_key: ''", 1, "api_key: expected a non-empty string (or null for no key), got ''"),
        ("colour: blue", 1, "colour: unknown key; allowed keys: listen, systemd, switch, timeouts, limits, "
                            "stats, api_key, api_keys, admin_api_keys, backends"),
        ("switch: {max_wait: 0}", 1, "switch.max_wait: must be > 0, got 0"),
        ("switch: {linger: -1}", 1, "switch.linger: must be >= 0, got -1"),
        ("switch: {failure_cooldown: x}", 1, "switch.failure_cooldown: expected a number of seconds >= 0"),
        ("switch: {max_queue: 0}", 1, "switch.max_queue: must be >= 1, got 0"),
        ("switch: {max_queue: 2.5}", 1, "switch.max_queue: expected a number of requests, a whole number >= 1, "
                                        "got a number '2.5'"),
        ("timeouts: {connect: 0}", 1, "timeouts.connect: must be > 0, got 0"),
        ("timeouts: {first_byte: .inf}", 1, "timeouts.first_byte: must be a finite number of seconds"),
        ("timeouts: {idle: null}", 1, "timeouts.idle: expected a number of seconds > 0, got nothing (null)"),
        ("timeouts: {read: 3}", 1, "timeouts.read: unknown key; allowed keys: connect, first_byte, idle"),
        ("limits: {max_body_bytes: 0}", 1, "limits.max_body_bytes: must be >= 1, got 0"),
        ("limits: {max_body_bytes: 32MiB}", 1, "limits.max_body_bytes: expected a number of bytes, a whole "
                                               "number >= 1, got '32MiB'"),
        ("limits: {max_header_bytes: 100}", 1, "limits.max_header_bytes: must be >= 1024, got 100"),
        ("limits: {idle_connection: 0}", 1, "limits.idle_connection: must be > 0, got 0"),
        ("limits: {header_timeout: -1}", 1, "limits.header_timeout: must be > 0, got -1"),
        ("limits: {max_connections: true}", 1, "limits.max_connections: expected a number of connections"),
        ("limits: 5", 1, "limits: expected a mapping, got an integer '5'"),
        ("api_keys: k1", 1, "api_keys: expected a list of keys like [key1, key2], got 'k1'"),
        ("api_keys: [k1, '']", 1, "api_keys[1]: expected a non-empty string (an API key), got ''"),
        ("api_keys: [k1, 12]", 1, "api_keys[1]: expected a non-empty string (an API key), got an integer '12'"),
        ("admin_api_keys: [' k']", 1, "admin_api_keys[0]: an API key must not start or end with a space"),
        ('admin_api_keys: ["a\\tb"]', 1, "admin_api_keys[0]: an API key must not contain control characters"),
        ("api_key: 'k '", 1, "api_key: an API key must not start or end with a space"),
    ],
)
def test_bad_settings(text: str, line: int, message: str) -> None:
    p = only(text + "\n" + MIN_CONFIG)
    assert (p.file, p.line) == (CFG, line)
    assert p.message.startswith(message), p.message


@pytest.mark.parametrize(
    ("backend", "message"),
    [
        ("{unit: llamacpp, url: 'http://h:1'}", "backends.b.unit: 'llamacpp' must be a service unit name ending "
                                                "in '.service'"),
        ("{unit: /etc/systemd/system/x.service, url: 'http://h:1'}",
         "backends.b.unit: '/etc/systemd/system/x.service' is a path; give the unit's name only, like 'x.service'"),
        ("{unit: x.service, url: 'http://h:{port}'}", "backends.b.url: 'http://h:{port}' has {port}, which only a "
                                                      "template backend fills"),
        ("{unit: 'a b.service', url: 'http://h:1'}", "backends.b.unit: 'a b.service' is not a valid unit name"),
        ("{unit: x.service, url: 'localhost:8000'}", "backends.b.url: expected an http:// or https:// URL"),
        ("{unit: x.service, url: 'http://h:99999'}", "backends.b.url: 'http://h:99999' is not a valid URL"),
        ("{unit: x.service, url: 'http://h:1', health: health}", "backends.b.health: expected a URL path "
                                                                 "starting with '/'"),
        ("{unit: x.service, url: 'http://h:1', config_file: tabby.yml}", "backends.b.config_file: 'tabby.yml' "
                                                                         "must be an absolute path"),
        ("{unit: x.service, url: 'http://h:1', warmup: -1}", "backends.b.warmup: must be >= 0, got -1"),
        ("{url: 'http://h:1'}", "backends.b.unit: missing; every backend needs a unit"),
        ("{unit: x.service}", "backends.b.url: missing; every backend needs a url"),
        ("{unit: x.service, url: 'http://h:1', port: 1}", "backends.b.port: unknown key; allowed keys: unit, url,"),
        ("", "backends.b: expected a mapping, got nothing (null)"),
    ],
)
def test_bad_backends(backend: str, message: str) -> None:
    p = only(f"backends:\n  b: {backend}\n", "models:\n  tiny: {backend: b}\n")
    assert (p.file, p.line) == (CFG, 2)
    assert p.message.startswith(message), p.message


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("{backend: llamacpp, env: {1X: a}}", "models.tiny.env: '1X' is not a valid variable name"),
        ("{backend: llamacpp, env: {A-B: a}}", "models.tiny.env: 'A-B' is not a valid variable name"),
        ("{backend: llamacpp, env: {A: ~}}", "models.tiny.env.A: expected a string or number (use \"\" for empty)"),
        ("{backend: llamacpp, env: [A=1]}", "models.tiny.env: expected a mapping of VARIABLE: value, got a list"),
        ("{backend: llamacpp, load_timeout: 0}", "models.tiny.load_timeout: must be > 0, got 0"),
        ("{backend: llamacpp, warmup: -2}", "models.tiny.warmup: must be >= 0, got -2"),
        ("{backend: llamacpp, unit: x}", "models.tiny.unit: 'x' must be a service unit name ending in '.service'"),
        ("{backend: llamacpp, unit: x.service, command: /bin/x}", "models.tiny.unit: a model with its own unit is "
                                                                  "only started and stopped"),
        ("{backend: llamacpp, name: ''}", "models.tiny.name: expected a display name, got ''"),
        ("{backend: 5}", "models.tiny.backend: expected a backend name from config.yml, got an integer '5'"),
        ("[llamacpp]", "models.tiny: expected a mapping, got a list"),
        ("", "models.tiny: no settings; give at least `backend:`"),
    ],
)
def test_bad_models(model: str, message: str) -> None:
    p = only(MIN_CONFIG, f"models:\n  tiny: {model}\n")
    assert (p.file, p.line) == (MODELS, 2)
    assert p.message.startswith(message), p.message


@pytest.mark.parametrize("model_id", ['"a b"', '"tab\\tid"', '"x\\ny"'])
def test_bad_model_ids(model_id: str) -> None:
    p = only(MIN_CONFIG, f"models:\n  {model_id}: {{backend: llamacpp}}\n")
    assert p.line == 2
    assert "a model id must not contain spaces or control characters" in p.message


def test_model_ids_may_contain_slashes_and_dots() -> None:
    cfg = parse(MIN_CONFIG, "models:\n  meta-llama/Llama-3.1-8B:\n    backend: llamacpp\n")
    assert list(cfg.models) == ["meta-llama/Llama-3.1-8B"]


def test_several_problems_reported_together_in_file_and_line_order() -> None:
    found = problems(
        """\
listen: {port: 70000}
switch:
  status_channel: loud
backends:
  llamacpp: {unit: llamacpp.service, url: "http://127.0.0.1:8085"}
  bad: {unit: bad, url: "http://h:1"}
""",
        """\
models:
  a: {backend: llamacpp, command: [/bin/a, "x\\ny"]}
  a: {backend: llamacpp}
  b: {backend: nope}
  c: {backend: llamacpp, model_name: C}
""",
    )
    assert [(p.file.name, p.line, p.message.split(":")[0]) for p in found] == [
        ("config.yml", 1, "listen.port"),
        ("config.yml", 3, "switch.status_channel"),
        ("config.yml", 6, "backends.bad.unit"),
        ("models.yml", 2, "models.a.command"),
        ("models.yml", 3, "models.a"),
        ("models.yml", 4, "models.b.backend"),
        ("models.yml", 5, "models.c.model_name"),
    ]


@pytest.mark.parametrize("bad", [MERGE_BOMB, "backends: " + "[" * 100_000 + "\n"])
def test_check_and_reload_report_bombs_as_file_line(tmp_path: Path, bad: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import asyncio
    from types import SimpleNamespace

    from router import cli, daemon

    (tmp_path / "config.yml").write_text(bad + MIN_CONFIG)
    (tmp_path / "models.yml").write_text(MIN_MODELS)
    assert cli.main(["check", "--config-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert re.match(rf"{re.escape(str(tmp_path / 'config.yml'))}:\d+: invalid YAML: ", err), err
    assert "Traceback" not in err
    switcher = SimpleNamespace(reload_error=None)
    asyncio.run(daemon.reload(switcher, tmp_path))  # type: ignore[arg-type]
    assert switcher.reload_error is not None and "invalid YAML" in switcher.reload_error[0]


def test_check_warns_about_a_symlinked_config_file_or_dropin_dir(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from router import cli

    real = tmp_path / "real.yml"
    real.write_text("model: {model_name: x}\n")
    link = tmp_path / "tabby.yml"
    link.symlink_to(real)
    dropins = tmp_path / "dropins"
    dropins.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (dropins / "tabbyapi.service.d").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "config.yml").write_text(f"systemd: {{dropin_dir: {dropins}}}\nbackends:\n  tabby: {{unit: "
                                         f"tabbyapi.service, url: 'http://h:1', config_file: {link}}}\n")
    (tmp_path / "models.yml").write_text("models:\n  m: {backend: tabby, model_name: M}\n")
    assert cli.main(["check", "--config-dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"warning: backends.tabby.config_file: {link} is a symbolic link (to {real}); the router never writes "
        "through a symlink, so loading a model that sets model_name will fail: set config_file to the real path",
        f"warning: {dropins / 'tabbyapi.service.d'} is a symbolic link (to {tmp_path / 'elsewhere'}); the router "
        "never writes drop-ins through a symlink, so loading a model with a command or env on "
        "tabbyapi.service will fail: replace the link with a directory",
    ]
