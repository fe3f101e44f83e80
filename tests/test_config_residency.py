"""Unit tests for the residency keys of router.config: gpus, residency, preload, backend sleep, template
backends and the per-model port/vram_gb/gpu/ram_gb/persistent/ttl/aliases/unlisted/max_concurrent/params."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.config import (
    SLEEP_KINDS,
    Config,
    ConfigError,
    Endpoint,
    Gpu,
    Problem,
    Residency,
    SleepSpec,
    parse_config,
)

DIR = Path("/etc/llm-router")
CFG = DIR / "config.yml"
MODELS = DIR / "models.yml"
ENV = {"HOME": "/home/ann"}
REPO = Path(__file__).resolve().parent.parent

TEMPLATE_CONFIG = """\
backends:
  llamacpp: {unit: llamacpp@.service, url: "http://127.0.0.1:{port}"}
"""
TEMPLATE_MODELS = """\
models:
  tiny:
    backend: llamacpp
    port: 8101
"""

FULL_CONFIG = """\
listen: {port: 8002}
gpus:
  - {index: 0, vram_gb: 141}
  - {index: 1, vram_gb: 80.5}
residency:
  default_ttl: 600
  sleep_ttl: 3600
  max_loaded: 4
  host_ram_gb: 512
  memory_free_timeout: 0
preload: [embed, chat]
backends:
  llamacpp: {unit: llamacpp@.service, url: "http://127.0.0.1:{port}/"}
  vllm: {unit: vllm@.service, url: "http://127.0.0.1:{port}", sleep: vllm}
  sglang: {unit: sglang.service, url: "http://127.0.0.1:30000", sleep: sglang}
  custom:
    unit: custom.service
    url: http://127.0.0.1:9000
    sleep: {enter: "post /pause?deep=1", leave: "POST /resume", check: "GET /paused"}
  plain: {unit: plain.service, url: "http://127.0.0.1:8085"}
"""
FULL_MODELS = """\
models:
  embed:
    backend: llamacpp
    command: [llama-server, -m, /m/embed.gguf, --port, "8101", --embedding]
    port: 8101
    vram_gb: 2
    persistent: true
    ttl: null
    unlisted: true
  llama-70b:
    backend: vllm
    command: vllm serve meta/llama-70b --port 8201 --enable-sleep-mode
    env: {VLLM_SERVER_DEV_MODE: "1"}
    port: 8201
    vram_gb: 70
    gpu: 1
    ram_gb: 0
    ttl: 120.5
    aliases: [chat, gpt-4o]
    max_concurrent: 8
    params:
      set: {temperature: 0.6, chat_template_kwargs: {enable_thinking: false}, stop: ["</s>"], seed: null}
      strip: [logit_bias, top_k]
  qwen:
    backend: sglang
    vram_gb: 40
  a: {backend: plain, command: /bin/a}
  b: {backend: plain, command: /bin/b}
"""


def parse(config: str, models: str) -> Config:
    return parse_config(config, models, DIR, ENV)


def problems(config: str, models: str) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        parse(config, models)
    return info.value.problems


def only(config: str, models: str) -> Problem:
    found = problems(config, models)
    assert len(found) == 1, "\n".join(map(str, found))
    return found[0]


# --- valid files -------------------------------------------------------------------------------------------


def test_every_residency_key_read() -> None:
    cfg = parse(FULL_CONFIG, FULL_MODELS)
    assert cfg.gpus == (Gpu(0, 141.0), Gpu(1, 80.5))
    assert cfg.residency == Residency(default_ttl=600.0, sleep_ttl=3600.0, max_loaded=4, host_ram_gb=512.0,
                                      memory_free_timeout=0.0)
    assert cfg.preload == ("embed", "llama-70b")  # an alias in preload is taken as its model's id
    b = cfg.backends
    assert b["llamacpp"].template and b["llamacpp"].url == "http://127.0.0.1:{port}" and b["llamacpp"].sleep is None
    assert b["vllm"].sleep is SLEEP_KINDS["vllm"] and b["sglang"].sleep is SLEEP_KINDS["sglang"]
    assert b["custom"].sleep == SleepSpec("custom", Endpoint("POST", "/pause?deep=1"), Endpoint("POST", "/resume"),
                                          Endpoint("GET", "/paused"))
    assert not b["plain"].template

    embed, big, qwen = cfg.models["embed"], cfg.models["llama-70b"], cfg.models["qwen"]
    assert (embed.port, embed.vram_gb, embed.gpu, embed.persistent, embed.unlisted) == (8101, 2.0, 0, True, True)
    assert (embed.ttl, embed.no_ttl, cfg.ttl_of(embed)) == (None, True, None)
    assert cfg.unit_of(embed) == "llamacpp@embed.service"
    assert cfg.url_of(embed) == "http://127.0.0.1:8101"
    assert (big.port, big.vram_gb, big.gpu, big.ram_gb, big.ttl, cfg.ttl_of(big)) == (8201, 70.0, 1, 0.0, 120.5, 120.5)
    assert big.aliases == ("chat", "gpt-4o") and big.max_concurrent == 8
    assert big.params_set == {"temperature": 0.6, "chat_template_kwargs": {"enable_thinking": False},
                              "stop": ["</s>"], "seed": None}
    assert big.params_strip == ("logit_bias", "top_k")
    assert cfg.unit_of(big) == "vllm@llama\\x2d70b.service"
    assert (cfg.resolve("chat"), cfg.resolve("gpt-4o"), cfg.resolve("llama-70b"), cfg.resolve("x")) == (
        "llama-70b", "llama-70b", "llama-70b", None)
    # defaults of a model that sets none of the new keys
    assert (qwen.port, qwen.gpu, qwen.ram_gb, qwen.persistent, qwen.ttl, qwen.no_ttl, qwen.aliases, qwen.unlisted,
            qwen.max_concurrent, dict(qwen.params_set), qwen.params_strip) == (
        None, 0, None, False, None, False, (), False, None, {}, ())
    assert cfg.ttl_of(qwen) == 600.0  # residency.default_ttl
    assert cfg.url_of(qwen) == "http://127.0.0.1:30000"
    assert cfg.managed_units() == ["sglang.service", "custom.service", "plain.service", "llamacpp@embed.service",
                                   "vllm@llama\\x2d70b.service"]


def test_defaults_without_residency_keys() -> None:
    cfg = parse("backends:\n  l: {unit: l.service, url: 'http://h:1'}\n", "models:\n  m: {backend: l}\n")
    assert (cfg.gpus, cfg.residency, cfg.preload) == ((), Residency(), ())
    assert cfg.residency.memory_free_timeout == 30.0
    assert cfg.ttl_of(cfg.models["m"]) is None
    assert cfg.backends["l"].sleep is None


def test_null_residency_values_mean_the_defaults() -> None:
    cfg = parse("residency: {default_ttl: null, sleep_ttl: ~, max_loaded: null, host_ram_gb: null}\n"
                "gpus: []\npreload: null\n" + TEMPLATE_CONFIG, TEMPLATE_MODELS)
    assert (cfg.gpus, cfg.residency, cfg.preload) == ((), Residency(), ())


def test_many_models_on_one_template_need_no_distinct_command() -> None:
    cfg = parse(TEMPLATE_CONFIG, "models:\n  a: {backend: llamacpp, port: 9001}\n  b: {backend: llamacpp, port: 9002}\n"
                                 "  org/c.gguf: {backend: llamacpp, port: 9003}\n")
    assert [cfg.unit_of(m) for m in cfg.models.values()] == [
        "llamacpp@a.service", "llamacpp@b.service", "llamacpp@org-c.gguf.service"]
    assert [cfg.url_of(m) for m in cfg.models.values()] == [
        "http://127.0.0.1:9001", "http://127.0.0.1:9002", "http://127.0.0.1:9003"]


def test_ports_on_other_hosts_do_not_clash() -> None:
    cfg = parse("backends:\n  t: {unit: t@.service, url: 'http://127.0.0.1:{port}'}\n"
                "  remote: {unit: r.service, url: 'http://gpu-box:9001'}\n",
                "models:\n  a: {backend: t, port: 9001}\n  r: {backend: remote}\n")
    assert cfg.models["a"].port == 9001


# --- errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("gpus: {index: 0}", "gpus: expected a list of GPUs like [{index: 0, vram_gb: 80}], got a mapping"),
        ("gpus: [{index: 0}]", "gpus[0].vram_gb: missing; each GPU needs index and vram_gb"),
        ("gpus: [{vram_gb: 80}]", "gpus[0].index: missing; each GPU needs index and vram_gb"),
        ("gpus: [{index: -1, vram_gb: 80}]", "gpus[0].index: must be >= 0, got -1"),
        ("gpus: [{index: 0, vram_gb: 0}]", "gpus[0].vram_gb: must be > 0, got 0"),
        ("gpus: [{index: 0, vram_gb: 80GB}]", "gpus[0].vram_gb: expected a number of GB > 0, got '80GB'"),
        ("gpus: [{index: 0, vram_gb: 80, name: h200}]", "gpus[0].name: unknown key; allowed keys: index, vram_gb"),
        ("gpus: [0]", "gpus[0]: expected a mapping, got an integer '0'"),
        ("gpus: [{index: 0, vram_gb: 80},\n       {index: 0, vram_gb: 40}]",
         "gpus[1].index: GPU 0 is listed twice (first on line 1); list each GPU once"),
        ("residency: {default_ttl: 0}", "residency.default_ttl: must be > 0, got 0"),
        ("residency: {sleep_ttl: soon}", "residency.sleep_ttl: expected a number of seconds > 0 (or null: never), "
                                         "got 'soon'"),
        ("residency: {max_loaded: 0}", "residency.max_loaded: must be >= 1, got 0"),
        ("residency: {max_loaded: 1.5}", "residency.max_loaded: expected a number of models (or null: as many as "
                                         "fit), a whole number >= 1, got a number '1.5'"),
        ("residency: {host_ram_gb: -1}", "residency.host_ram_gb: must be > 0, got -1"),
        ("residency: {host_ram_gb: .inf}", "residency.host_ram_gb: must be a finite number of GB"),
        ("residency: {memory_free_timeout: -1}", "residency.memory_free_timeout: must be >= 0, got -1"),
        ("residency: {default_tl: 5}", "residency.default_tl: unknown key; did you mean 'default_ttl'? allowed keys: "
                                      "default_ttl, sleep_ttl, max_loaded, host_ram_gb, memory_free_timeout"),
        ("residency: 5", "residency: expected a mapping, got an integer '5'"),
        ("preload: tiny", "preload: expected a list of model ids from models.yml, like [embed, qwen-7b], got 'tiny'"),
        ("preload: [tiny, 5]", "preload[1]: expected a model id from models.yml, got an integer '5'"),
        ("preload: [tiyn]", "preload[0]: unknown model 'tiyn'; did you mean 'tiny'? known models: tiny"),
        ("preload: [other]", "preload[0]: unknown model 'other'; known models: tiny"),
        ("preload: [tiny, tiny]", "preload[1]: model 'tiny' is already preloaded at preload[0]; list each model once"),
        ("colour: blue", "colour: unknown key; allowed keys: listen, systemd, switch, timeouts, limits, stats, "
                         "api_key, api_keys, admin_api_keys, backends, gpus, residency, preload"),
    ],
)
def test_bad_residency_settings(text: str, message: str) -> None:
    p = only(text + "\n" + TEMPLATE_CONFIG, TEMPLATE_MODELS)
    assert (p.file, p.line) == (CFG, text.count("\n") + 1)
    assert p.message.startswith(message), p.message


def test_preload_checks_are_skipped_when_models_yml_is_unreadable() -> None:
    found = problems("preload: [anything]\n" + TEMPLATE_CONFIG, "models: [\n")
    assert [(p.file, p.message.split(":")[0]) for p in found] == [(MODELS, "invalid YAML")]


def test_preload_of_a_model_with_a_problem_is_not_reported_unknown() -> None:
    found = problems("preload: [tiny]\n" + TEMPLATE_CONFIG, "models:\n  tiny: {backend: llamacpp, port: 0}\n")
    assert [str(p) for p in found] == [
        f"{MODELS}:2: models.tiny.port: expected a port number 1..65535, got an integer '0'"]


@pytest.mark.parametrize(
    ("backend", "message"),
    [
        ("{unit: x@.service, url: 'http://h:1'}",
         "backends.b.url: backend unit x@.service is a template: each of its models runs as its own instance on its "
         "own port, so the url needs {port} where the port goes, like http://127.0.0.1:{port}; got 'http://h:1'"),
        ("{unit: x.service, url: 'http://h:{port}'}",
         "backends.b.url: 'http://h:{port}' has {port}, which only a template backend fills (unit: NAME@.service, "
         "each model on its own port:); write the port, or make the unit a template like x@.service"),
        ("{unit: x@.service, url: 'http://h:{port}/v{port}'}",
         "backends.b.url: {port} must stand once for the URL's port, like http://127.0.0.1:{port}"),
        ("{unit: x@.service, url: 'http://h/{port}'}", "backends.b.url: {port} must stand once for the URL's port"),
        ("{unit: x@.service, url: 'http://h:{port}?a=1'}", "backends.b.url: the URL must not contain a query"),
        ("{unit: x@.service, url: 'http://h:{port}', config_file: /opt/t.yml}",
         "backends.b.config_file: a template backend (x@.service) runs several models at once, which cannot share "
         "one config file"),
        ("{unit: x.service, url: 'http://h:1', sleep: vlm}",
         "backends.b.sleep: unknown sleep kind 'vlm'; did you mean 'vllm'? expected vllm, sglang, or a mapping like "
         '{enter: "POST /sleep", leave: "POST /wake", check: "GET /is_sleeping"} (check optional)'),
        ("{unit: x.service, url: 'http://h:1', sleep: true}", "backends.b.sleep: expected vllm, sglang, or a "
                                                             "mapping like {enter: \"POST /sleep\""),
        ("{unit: x.service, url: 'http://h:1', sleep: [vllm]}", "backends.b.sleep: expected vllm, sglang, or a "
                                                               "mapping"),
        ("{unit: x.service, url: 'http://h:1', sleep: {enter: POST /s}}",
         'backends.b.sleep.leave: missing; a custom sleep needs enter and leave (like leave: "POST /wake")'),
        ("{unit: x.service, url: 'http://h:1', sleep: {enter: FETCH /s, leave: POST /w}}",
         "backends.b.sleep.enter: 'FETCH' is not an HTTP method; use one of GET, POST, PUT, PATCH, DELETE"),
        ("{unit: x.service, url: 'http://h:1', sleep: {enter: POST s, leave: POST /w}}",
         "backends.b.sleep.enter: the path must start with '/' (and have no '#'), like \"POST /sleep\", got 's'"),
        ("{unit: x.service, url: 'http://h:1', sleep: {enter: POST, leave: POST /w}}",
         "backends.b.sleep.enter: expected an HTTP method and a path, like \"POST /sleep\", got 'POST'"),
        ("{unit: x.service, url: 'http://h:1', sleep: {enter: POST /s, leave: POST /w, check: 1}}",
         "backends.b.sleep.check: expected an HTTP method and a path, like \"POST /sleep\", got an integer '1'"),
        ("{unit: x.service, url: 'http://h:1', sleep: {enter: POST /s, leave: POST /w, wake: GET /x}}",
         "backends.b.sleep.wake: unknown key; allowed keys: enter, leave, check"),
    ],
)
def test_bad_backends(backend: str, message: str) -> None:
    port = ", port: 9000" if "@" in backend else ""
    p = only(f"backends:\n  b: {backend}\n", f"models:\n  tiny: {{backend: b{port}}}\n")
    assert (p.file, p.line) == (CFG, 2)
    assert p.message.startswith(message), p.message


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("{backend: llamacpp}", "models.tiny.port: missing; backend 'llamacpp' is a template (llamacpp@.service): "
                                "each of its models runs as its own instance on its own port; add port: "
                                "(like port: 8101) and make the model's command listen on it"),
        ("{backend: llamacpp, port: 8101, unit: own.service}",
         "models.tiny.unit: backend 'llamacpp' is a template (llamacpp@.service): each of its models already runs "
         "as its own instance (llamacpp@tiny.service); remove unit, or put the model on a backend with a plain unit"),
        ("{backend: plain, port: 8101}",
         "models.tiny.port: backend 'plain' has the plain unit plain.service, whose url fixes the port; remove "
         'port, or make the backend a template (unit: plain@.service, url: "http://127.0.0.1:{port}")'),
        ("{backend: llamacpp, port: 0}", "models.tiny.port: expected a port number 1..65535, got an integer '0'"),
        ("{backend: llamacpp, port: '8101'}", "models.tiny.port: expected a port number 1..65535, got '8101'"),
        ("{backend: llamacpp, port: 8002}", "models.tiny.port: 8002 is the router's own port (listen.port in "
                                            "config.yml); pick another"),
        ("{backend: llamacpp, port: 8085}", "models.tiny.port: 8085 is where backend 'plain' (plain.service) listens "
                                            "(http://127.0.0.1:8085); pick another port"),
        ("{backend: plain, vram_gb: 0}", "models.tiny.vram_gb: must be > 0, got 0"),
        ("{backend: plain, vram_gb: lots}", "models.tiny.vram_gb: expected a number of GB > 0, got 'lots'"),
        ("{backend: plain, gpu: -1}", "models.tiny.gpu: must be >= 0, got -1"),
        ("{backend: plain, gpu: 0.5}", "models.tiny.gpu: expected a GPU index, a whole number >= 0"),
        ("{backend: plain, ram_gb: -1}", "models.tiny.ram_gb: must be >= 0, got -1"),
        ("{backend: plain, persistent: 1}", "models.tiny.persistent: expected true or false, got an integer '1'"),
        ("{backend: plain, unlisted: hidden}", "models.tiny.unlisted: expected true or false, got 'hidden'"),
        ("{backend: plain, ttl: 0}", "models.tiny.ttl: must be > 0, got 0"),
        ("{backend: plain, ttl: 5m}", "models.tiny.ttl: expected a number of seconds > 0 (or null: never, whatever "
                                      "residency.default_ttl says), got '5m'"),
        ("{backend: plain, max_concurrent: 0}", "models.tiny.max_concurrent: must be >= 1, got 0"),
        ("{backend: plain, aliases: chat}", "models.tiny.aliases: expected a list of names like [gpt-4o, chat], "
                                            "got 'chat'"),
        ("{backend: plain, aliases: [tiny]}", "models.tiny.aliases[0]: 'tiny' is this model's own id; remove it"),
        ("{backend: plain, aliases: [a, a]}", "models.tiny.aliases[1]: 'a' is already an alias of this model "
                                              "(line 2); an alias names one model, once"),
        ("{backend: plain, aliases: ['a b']}", "models.tiny.aliases[0]: an alias must not contain spaces or control"),
        ("{backend: plain, aliases: [3]}", "models.tiny.aliases[0]: expected a name clients may send as \"model\", "
                                           "got an integer '3'"),
        ("{backend: plain, params: [temperature]}", "models.tiny.params: expected a mapping, got a list"),
        ("{backend: plain, params: {drop: [x]}}", "models.tiny.params.drop: unknown key; allowed keys: set, strip"),
        ("{backend: plain, params: {set: [x]}}", "models.tiny.params.set: expected a mapping of request field -> "
                                                 "value, like {temperature: 0.6}, got a list"),
        ("{backend: plain, params: {set: {model: x}}}", "models.tiny.params.set.model: the router sets 'model' itself "
                                                        "(use upstream_model to rename the model); remove it"),
        ("{backend: plain, params: {set: {stream: false}}}", "models.tiny.params.set.stream: the router sets "
                                                             "'stream' itself; remove it"),
        ("{backend: plain, params: {set: {seed: 2024-01-01}}}", "models.tiny.params.set.seed: a date value cannot go "
                                                                "into a JSON request"),
        ("{backend: plain, params: {set: {t: .nan}}}", "models.tiny.params.set.t: nan cannot go into a JSON request"),
        ("{backend: plain, params: {set: {t: {1: x}}}}", "models.tiny.params.set.t: the key 1 (not a string) cannot "
                                                         "go into a JSON request"),
        ("{backend: plain, params: {set: {t: !!binary aGk=}}}", "models.tiny.params.set.t: a bytes value cannot go"),
        ("{backend: plain, params: {strip: seed}}", "models.tiny.params.strip: expected a list of request field "
                                                    "names like [logit_bias, seed], got 'seed'"),
        ("{backend: plain, params: {strip: [stream]}}", "models.tiny.params.strip[0]: the router needs 'stream'; it "
                                                        "cannot be stripped"),
        ("{backend: plain, params: {set: {seed: 1}, strip: [seed]}}", "models.tiny.params.strip[0]: 'seed' is also "
                                                                      "under params.set; keep it in one of them"),
    ],
)
def test_bad_models(model: str, message: str) -> None:
    config = TEMPLATE_CONFIG + "  plain: {unit: plain.service, url: 'http://127.0.0.1:8085'}\n"
    p = only(config, f"models:\n  tiny: {model}\n")
    assert (p.file, p.line) == (MODELS, 2)
    assert p.message.startswith(message), p.message


def test_a_model_id_too_long_for_its_instance_unit_name() -> None:
    cfg = parse(TEMPLATE_CONFIG, "models:\n  " + "a" * 238 + ": {backend: llamacpp, port: 9001}\n")
    assert len(cfg.unit_of(next(iter(cfg.models.values())))) == 255
    p = only(TEMPLATE_CONFIG, "models:\n  " + "é" * 30 + ": {backend: llamacpp, port: 9001}\n")
    assert (p.file, p.line) == (MODELS, 2)
    assert p.message.startswith(f"models.{'é' * 30}: its instance unit llamacpp@\\xc3\\xa9\\xc3\\xa9")
    assert p.message.endswith("... would be 257 characters long (the id escaped for systemd), more than systemd's 255; "
                              "use a shorter model id (an alias can keep the long name)")


def test_duplicate_ports_on_templates_name_the_first_model() -> None:
    config = TEMPLATE_CONFIG + "  vllm: {unit: vllm@.service, url: 'http://127.0.0.1:{port}'}\n"
    p = only(config, "models:\n  a: {backend: llamacpp, port: 9001}\n  b: {backend: vllm, port: 9001}\n")
    assert str(p) == (f"{MODELS}:3: models.b.port: 9001 is already the port of model 'a' (line 2); each model on a "
                      "template backend needs a port of its own")


def test_aliases_collide_with_ids_and_other_aliases() -> None:
    found = problems(TEMPLATE_CONFIG, """\
models:
  a: {backend: llamacpp, port: 9001, aliases: [chat, b]}
  b: {backend: llamacpp, port: 9002, aliases: [chat]}
""")
    assert [str(p) for p in found] == [
        f"{MODELS}:2: models.a.aliases[1]: 'b' is the id of another model (line 3); an alias must not be a model "
        "id: rename one of them",
        f"{MODELS}:3: models.b.aliases[0]: 'chat' is already an alias of model 'a' (line 2); an alias names one "
        "model, once",
    ]


def test_gpu_and_vram_checked_against_the_listed_gpus() -> None:
    config = "gpus: [{index: 0, vram_gb: 80}, {index: 2, vram_gb: 24}]\n" + TEMPLATE_CONFIG
    found = problems(config, """\
models:
  big: {backend: llamacpp, port: 9001, vram_gb: 81}
  small: {backend: llamacpp, port: 9002, gpu: 2, vram_gb: 24.5}
  lost: {backend: llamacpp, port: 9003, gpu: 1}
  fits: {backend: llamacpp, port: 9004, gpu: 2, vram_gb: 24}
""")
    assert [str(p) for p in found] == [
        f"{MODELS}:2: models.big.vram_gb: 81 GB is more than GPU 0's budget of 80 GB (gpus in config.yml), so the "
        "model could never load; lower vram_gb, raise the GPU's vram_gb, or set gpu: to a larger one",
        f"{MODELS}:3: models.small.vram_gb: 24.5 GB is more than GPU 2's budget of 24 GB (gpus in config.yml), so "
        "the model could never load; lower vram_gb, raise the GPU's vram_gb, or set gpu: to a larger one",
        f"{MODELS}:4: models.lost.gpu: GPU 1 is not in config.yml `gpus:` (listed: 0, 2); use one of them, or add "
        "it there",
    ]
    p = only("gpus: [{index: 1, vram_gb: 80}]\n" + TEMPLATE_CONFIG,
             "models:\n  m: {backend: llamacpp, port: 9001, vram_gb: 8}\n")
    assert str(p) == (f"{MODELS}:2: models.m.vram_gb: the model loads on GPU 0 (the default; set gpu:), which is "
                      "not in config.yml `gpus:` (listed: 1)")
    # without `gpus:` any index goes (the budget then comes from NVML), and a broken gpus: is reported once
    assert parse(TEMPLATE_CONFIG, "models:\n  m: {backend: llamacpp, port: 9001, gpu: 3, vram_gb: 500}\n")
    found = problems("gpus: [{index: 0, vram_gb: -1}]\n" + TEMPLATE_CONFIG,
                     "models:\n  m: {backend: llamacpp, port: 9001, vram_gb: 8}\n")
    assert [p.message.split(":")[0] for p in found] == ["gpus[0].vram_gb"]


def test_several_new_problems_reported_together_in_file_and_line_order() -> None:
    found = problems("""\
preload: [nope]
residency: {max_loaded: 0}
backends:
  t: {unit: t@.service, url: "http://127.0.0.1:8000"}
  v: {unit: v.service, url: "http://127.0.0.1:8001", sleep: deep}
""", """\
models:
  a: {backend: v, port: 1234}
  b: {backend: v, vram_gb: -3, aliases: [a]}
""")
    assert [(p.file.name, p.line, p.message.split(":")[0]) for p in found] == [
        ("config.yml", 1, "preload[0]"),
        ("config.yml", 2, "residency.max_loaded"),
        ("config.yml", 4, "backends.t.url"),
        ("config.yml", 5, "backends.v.sleep"),
        ("models.yml", 2, "models.a.port"),
        ("models.yml", 3, "models.b.vram_gb"),
        ("models.yml", 3, "models.b.aliases[0]"),
    ]


# --- the commented examples in the shipped files -----------------------------------------------------------


def _commented_block(text: str, first: str, prefix: str = "# ") -> list[str]:
    """The commented YAML block that starts at the line `first`, uncommented: the lines after it that
    start with `prefix` and are indented deeper (or, for an indented first line, as deep: siblings)."""
    lines = text.splitlines()
    start = lines.index(first)
    depth = len(first) - len(first[len(prefix):].lstrip()) - len(prefix)
    block = [first[len(prefix):]]
    for line in lines[start + 1:]:
        rest = line[len(prefix):]
        indent = len(rest) - len(rest.lstrip())
        if not line.startswith(prefix) or indent < depth or (indent == depth == 0):
            break
        block.append(rest)
    return block


def test_shipped_residency_examples_parse_once_uncommented() -> None:
    config_text = (REPO / "etc/llm-router/config.yml").read_text()
    models_text = (REPO / "etc/llm-router/models.yml").read_text()
    settings = [*_commented_block(config_text, "# gpus:"), *_commented_block(config_text, "# residency:"),
                *_commented_block(config_text, "# preload: [bge-m3]")]
    backends = _commented_block(config_text, "#   llamacpp-many:")
    models = _commented_block(models_text, "#   bge-m3:")
    config = config_text.replace("\nbackends:\n", "\n" + "\n".join(settings) + "\nbackends:\n" + "\n".join(backends)
                                 + "\n")
    models_yml = models_text.replace("\nmodels:\n", "\nmodels:\n" + "\n".join(models) + "\n")
    assert any("memory_free_timeout" in line for line in settings) and "    sleep: vllm" in backends
    assert any("params:" in line for line in models)
    cfg = parse_config(config, models_yml, DIR, {})
    assert cfg.gpus == (Gpu(0, 141.0),) and cfg.residency == Residency() and cfg.preload == ("bge-m3",)
    assert cfg.backends["vllm-many"].sleep is SLEEP_KINDS["vllm"]
    embed, big = cfg.models["bge-m3"], cfg.models["llama-3.3-70b-fp8"]
    assert (cfg.unit_of(embed), cfg.url_of(embed), embed.persistent, embed.unlisted) == (
        "llamacpp@bge\\x2dm3.service", "http://127.0.0.1:8101", True, True)
    assert big.command is not None and big.command[-1] == "--enable-sleep-mode"
    assert (cfg.url_of(big), big.aliases, big.ttl, big.max_concurrent, dict(big.params_set), big.params_strip) == (
        "http://127.0.0.1:8201", ("chat",), 1800.0, 16, {"temperature": 0.6}, ("logit_bias",))
