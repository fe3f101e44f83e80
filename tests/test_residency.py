"""Residency: the pure eviction policy and the scheduler's resident set, as tables (no I/O, a fake clock)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from router.config import SLEEP_KINDS, Backend, Config, Gpu, Model, Residency, SwitchSettings
from router.residency import NoRoom, Resident, Room, View, expired, make_room
from router.scheduler import LoadFailure, Scheduler, SwitchOutcome, Ticket
from tests.test_scheduler import Clock, Recorder


def cfg(models: list[Model], *, budget: float | None = 100, host_ram: float | None = None,
        max_loaded: int | None = None, ttl: float | None = None, sleep_ttl: float | None = None,
        preload: tuple[str, ...] = (), **switch: float) -> Config:
    backends = {
        "tpl": Backend("tpl", "llamacpp@.service", "http://127.0.0.1:{port}"),
        "vllm": Backend("vllm", "vllm@.service", "http://127.0.0.1:{port}", sleep=SLEEP_KINDS["vllm"]),
        "plain": Backend("plain", "plain.service", "http://127.0.0.1:9000"),
    }
    return Config(config_dir=Path("/nonexistent"), backends=backends, models={m.id: m for m in models},
                  switch=SwitchSettings(**{"linger": 0.0, **switch}),  # type: ignore[arg-type]
                  gpus=(Gpu(0, budget),) if budget is not None else (),
                  residency=Residency(default_ttl=ttl, sleep_ttl=sleep_ttl, max_loaded=max_loaded,
                                      host_ram_gb=host_ram),
                  preload=preload)


def m(model_id: str, gb: float | None = 40, backend: str = "tpl", port: int | None = None, **kw: object) -> Model:
    return Model(model_id, backend, command=(f"/bin/{model_id}",), vram_gb=gb,
                 port=port if port is not None else 9000 + sum(map(ord, model_id)) % 900, **kw)  # type: ignore[arg-type]


def view(config: Config, loaded: dict[str, float], sleeping: dict[str, float] | None = None,
         busy: set[str] = frozenset(), measured: dict[str, float] | None = None) -> View:  # type: ignore[assignment]
    resident = {k: Resident(k, "loaded", t, t) for k, t in loaded.items()}
    resident |= {k: Resident(k, "sleeping", t, t) for k, t in (sleeping or {}).items()}
    running = {config.unit_of(config.models[k]) for k in resident}
    budget = {g.index: g.vram_gb for g in config.gpus}
    host = config.residency.host_ram_gb
    return View(config, resident, frozenset(busy), frozenset(running), measured or {}, budget, host)


# --- the policy -----------------------------------------------------------------------------------


def test_a_model_that_fits_evicts_nothing():
    c = cfg([m("x"), m("y")])
    room = make_room(view(c, {"x": 1}), "y")
    assert isinstance(room, Room) and room.evicts == () and room.stop_units == ()


def test_the_least_recently_used_idle_model_leaves_first():
    c = cfg([m("x"), m("y"), m("z")])
    room = make_room(view(c, {"x": 5, "y": 3}), "z")
    assert isinstance(room, Room) and room.stop == ("y",) and room.stop_units == ("llamacpp@y.service",)


def test_an_idle_model_leaves_before_a_busy_one_even_if_used_later():
    c = cfg([m("x"), m("y"), m("z")])
    room = make_room(view(c, {"x": 5, "y": 3}, busy={"y"}), "z")
    assert isinstance(room, Room) and room.stop == ("x",) and room.blocked_by == ()


def test_a_busy_victim_blocks_the_switch_until_its_responses_end():
    c = cfg([m("x", 60), m("y", 60)])
    room = make_room(view(c, {"x": 1}, busy={"x"}), "y")
    assert isinstance(room, Room) and room.stop == ("x",) and room.blocked_by == ("x",)


def test_a_persistent_model_is_never_evicted():
    c = cfg([m("e", 10, persistent=True), m("x", 45), m("y", 45), m("z", 45)])
    room = make_room(view(c, {"e": 0, "x": 5, "y": 6}), "z")
    assert isinstance(room, Room) and room.stop == ("x",)
    room = make_room(view(c, {"e": 0}), "z")
    assert isinstance(room, Room) and room.evicts == ()


def test_no_room_when_persistent_models_fill_the_gpu():
    c = cfg([m("e", 70, persistent=True), m("z", 40)])
    room = make_room(view(c, {"e": 0}), "z")
    assert isinstance(room, NoRoom) and "persistent" in room.what and "e" in room.what


def test_a_model_larger_than_its_gpu_never_fits():
    c = cfg([m("huge", 150)])
    room = make_room(view(c, {}), "huge")
    assert isinstance(room, NoRoom) and "150 GB" in room.what and "100 GB" in room.what


def test_a_model_without_vram_gb_is_exclusive_and_stops_everything_on_its_gpu():
    c = cfg([m("x", 10), m("y", 10), m("big", None), m("other", 10, gpu=1)])
    c = replace(c, gpus=(Gpu(0, 100), Gpu(1, 100)))
    room = make_room(view(c, {"x": 1, "y": 2, "other": 3}), "big")
    assert isinstance(room, Room) and sorted(room.stop) == ["x", "y"]  # not the model on GPU 1


def test_a_measured_size_replaces_a_missing_vram_gb():
    c = cfg([m("x", None), m("y", None)])
    room = make_room(view(c, {"x": 1}, measured={"x": 30, "y": 30}), "y")
    assert isinstance(room, Room) and room.evicts == ()


def test_without_a_budget_every_model_is_exclusive():
    c = cfg([m("x", 10), m("y", 10)], budget=None)
    room = make_room(view(c, {"x": 1}), "y")
    assert isinstance(room, Room) and room.stop == ("x",)


def test_a_plain_unit_runs_one_model_at_a_time():
    c = cfg([m("p1", 10, backend="plain", port=None), m("p2", 10, backend="plain")])
    c = replace(c, models={k: replace(v, port=None) for k, v in c.models.items()})
    room = make_room(view(c, {"p1": 1}), "p2")
    assert isinstance(room, Room) and room.stop == ("p1",) and room.stop_units == ("plain.service",)


def test_max_loaded_caps_the_count():
    c = cfg([m("x", 1), m("y", 1), m("z", 1)], max_loaded=2)
    room = make_room(view(c, {"x": 5, "y": 3}), "z")
    assert isinstance(room, Room) and room.stop == ("y",)


def test_an_evicted_engine_that_can_sleep_sleeps():
    c = cfg([m("v1", 60, backend="vllm"), m("v2", 60, backend="vllm")], host_ram=200)
    room = make_room(view(c, {"v1": 1}), "v2")
    assert isinstance(room, Room) and room.sleep == ("v1",) and room.stop == () and room.stop_units == ()


def test_waking_a_sleeper_evicts_what_it_needs_room_from():
    c = cfg([m("v1", 60, backend="vllm"), m("v2", 60, backend="vllm")], host_ram=200)
    room = make_room(view(c, {"v2": 5}, sleeping={"v1": 1}), "v1")
    assert isinstance(room, Room) and room.wake and room.sleep == ("v2",)


def test_host_ram_pressure_stops_the_longest_asleep():
    c = cfg([m("v1", 60, backend="vllm"), m("v2", 60, backend="vllm"), m("v3", 60, backend="vllm")],
            host_ram=130)
    room = make_room(view(c, {"v3": 9}, sleeping={"v1": 1, "v2": 2}), "v1")  # v1 wakes: v2 is the sleeper left
    assert isinstance(room, Room) and room.wake and room.sleep == ("v3",) and room.stop == ()
    room = make_room(view(replace(c, residency=Residency(host_ram_gb=100)), {"v3": 9}, sleeping={"v1": 1}), "v2")
    assert isinstance(room, Room) and room.sleep == ("v3",) and room.stop == ("v1",)
    assert room.stop_units == ("vllm@v1.service",)


def test_a_sleeper_larger_than_the_host_budget_is_stopped():
    c = cfg([m("v1", 60, backend="vllm", ram_gb=500), m("v2", 60, backend="vllm")], host_ram=100)
    room = make_room(view(c, {"v1": 1}), "v2")
    assert isinstance(room, Room) and room.sleep == () and room.stop == ("v1",)


def test_ttls_expire_idle_models_and_old_sleepers():
    c = cfg([m("x", 10, ttl=60), m("y", 10), m("v", 10, backend="vllm")], ttl=None, sleep_ttl=100)
    v = view(c, {"x": 0, "y": 0}, sleeping={"v": 0})
    assert expired(v, 30, set()) == ([], [], 60)
    assert expired(v, 61, set()) == (["x"], [], 100)
    assert expired(v, 101, {"x"}) == ([], ["v"], None)  # busy models never expire


# --- the scheduler with a resident set --------------------------------------------------------------


def make(config: Config) -> tuple[Scheduler, Recorder, Clock]:
    rec, clock = Recorder(), Clock()
    return Scheduler(config, rec, clock), rec, clock


def ask(s: Scheduler, model: str | None, **kw: object) -> Ticket:
    t = Ticket(model, **kw)  # type: ignore[arg-type]
    s.on_request(t)
    return t


def done(s: Scheduler, error: LoadFailure | None = None, slept: frozenset[str] = frozenset()) -> None:
    assert s.switch is not None
    plan = s.switch.plan
    running = set(s.running) - set(plan.stop)
    if plan.target is not None and error is None:
        running.add(s.config.unit_of(s.config.models[plan.target]))
    s.on_switch_done(s.switch.id, error, running, SwitchOutcome(slept))


def load(s: Scheduler, model: str) -> Ticket:
    t = ask(s, model)
    done(s, slept=frozenset(s.switch.plan.sleep) if s.switch else frozenset())
    assert t.granted
    return t


def test_requests_for_a_kept_model_are_served_while_another_one_loads():
    s, _rec, _ = make(cfg([m("embed", 5, persistent=True), m("x", 60), m("y", 60)]))
    s.on_done(load(s, "embed"))
    s.on_done(load(s, "x"))
    ask(s, "y")
    assert s.switch is not None and s.switch.plan.evicts == ("x",)
    e = ask(s, "embed")
    assert e.granted  # the embedding model answers during the switch
    late_x = ask(s, "x")
    assert not late_x.granted  # x is being evicted
    done(s)
    assert s.state_of("x") is None and s.state_of("embed") == "loaded" and s.state_of("y") == "loaded"


def test_three_models_on_a_budget_for_two_evict_the_least_recently_used(tmp_path: Path):
    s, _rec, clock = make(cfg([m("a"), m("b"), m("c")]))
    for model in ("a", "b"):
        s.on_done(load(s, model))
        clock.now += 1
    s.on_done(ask(s, "a"))  # a is used again: b is now the least recently used
    clock.now += 1
    ask(s, "c")
    assert s.switch is not None and s.switch.plan.stop == ("llamacpp@b.service",)


def test_a_switch_waits_for_the_responses_of_its_victims_only():
    s, _rec, _ = make(cfg([m("x", 60), m("y", 60), m("small", 10)]))
    s.on_done(load(s, "small"))
    x = load(s, "x")  # streaming
    small = ask(s, "small")
    assert small.granted
    ask(s, "y")
    assert s.switch is None  # waits for x, not for small
    s.on_done(x)
    assert s.switch is not None and s.switch.plan.evicts == ("x",)


def test_max_concurrent_queues_the_rest_and_serves_them_in_order():
    s, _rec, _ = make(cfg([m("x", 10, max_concurrent=2)]))
    first = load(s, "x")
    second, third, fourth = ask(s, "x"), ask(s, "x"), ask(s, "x")
    assert second.granted and not third.granted and not fourth.granted
    s.on_done(first)
    assert third.granted and not fourth.granted
    s.on_done(second)
    assert fourth.granted


def test_unloading_one_model_keeps_the_others():
    s, _rec, _ = make(cfg([m("x", 10), m("y", 10)]))
    s.on_done(load(s, "x"))
    s.on_done(load(s, "y"))
    u = ask(s, "x", unload=True)
    assert s.switch is not None and s.switch.plan.stop == ("llamacpp@x.service",) and s.switch.plan.target is None
    done(s)
    assert u.granted and s.state_of("x") is None and s.state_of("y") == "loaded"


def test_unloading_a_busy_model_waits_and_takes_no_new_requests_for_it():
    s, _rec, _ = make(cfg([m("x", 10)]))
    x = load(s, "x")
    ask(s, "x", unload=True)
    late = ask(s, "x")
    assert s.switch is None and not late.granted
    s.on_done(x)
    assert s.switch is not None and s.switch.plan.reason == "unload"


def test_a_persistent_model_that_blocks_a_load_fails_it_with_what_to_do():
    s, rec, _ = make(cfg([m("e", 70, persistent=True), m("z", 40)]))
    s.on_done(load(s, "e"))
    z = ask(s, "z")
    assert z.ended and not z.granted and rec.take("fail") == [z.id]
    assert s.state_of("e") == "loaded"


def test_switching_away_puts_a_sleeping_engine_to_sleep_and_back_wakes_it():
    s, _rec, _ = make(cfg([m("v1", 60, backend="vllm"), m("v2", 60, backend="vllm")], host_ram=200))
    s.on_done(load(s, "v1"))
    ask(s, "v2")
    assert s.switch is not None and s.switch.plan.sleep == ("v1",) and s.switch.plan.stop == ()
    done(s, slept=frozenset({"v1"}))
    assert s.state_of("v1") == "sleeping" and s.state_of("v2") == "loaded"
    s.serving.clear()  # the request for v2 ended
    back = ask(s, "v1")
    assert s.switch is not None and s.switch.plan.wake and s.switch.plan.sleep == ("v2",)
    done(s, slept=frozenset({"v2"}))
    assert back.granted and s.state_of("v1") == "loaded" and s.state_of("v2") == "sleeping"


def test_a_sleep_that_failed_leaves_the_model_stopped():
    s, _rec, _ = make(cfg([m("v1", 60, backend="vllm"), m("v2", 60, backend="vllm")], host_ram=200))
    s.on_done(load(s, "v1"))
    ask(s, "v2")
    assert s.switch is not None
    plan = s.switch.plan
    running = {s.config.unit_of(s.config.models["v2"])}  # v1's unit was stopped instead
    s.on_switch_done(s.switch.id, None, running, SwitchOutcome())
    assert plan.sleep == ("v1",) and s.state_of("v1") is None


def test_ttl_unloads_an_idle_model_and_a_sleeper_is_stopped_after_sleep_ttl():
    s, rec, clock = make(cfg([m("x", 10, ttl=30), m("v", 10, backend="vllm", ttl=30)], sleep_ttl=60,
                             host_ram=100))
    s.on_done(load(s, "x"))
    s.on_done(load(s, "v"))
    assert rec.take("wake")[-1] == clock.now + 30
    clock.now += 31
    s.on_tick()
    assert s.switch is not None and s.switch.plan.reason == "ttl"
    assert s.switch.plan.sleep == ("v",) and s.switch.plan.stop == ("llamacpp@x.service",)
    done(s, slept=frozenset({"v"}))
    assert s.state_of("x") is None and s.state_of("v") == "sleeping"
    clock.now += 61
    s.on_tick()
    assert s.switch is not None and s.switch.plan.stop == ("vllm@v.service",)
    done(s)
    assert s.resident == {}


def test_preload_loads_in_order_after_waiting_requests():
    s, _rec, _ = make(cfg([m("a", 10), m("b", 10), m("c", 10)], preload=("a", "b")))
    s.on_startup(set(), [])
    assert s.switch is not None and s.switch.target == "a" and s.switch.plan.reason == "preload"
    c = ask(s, "c")
    done(s)
    assert s.switch is not None and s.switch.target == "c"  # a waiting request goes before the next preload
    done(s)
    assert c.granted
    s.on_done(c)
    assert s.switch is not None and s.switch.target == "b"
    done(s)
    assert {k for k, r in s.resident.items() if r.state == "loaded"} == {"a", "b", "c"}


def test_every_running_model_is_adopted_at_start():
    c = cfg([m("a", 10), m("b", 10)])
    s, _rec, _ = make(c)
    s.on_startup({"llamacpp@a.service", "llamacpp@b.service"}, ["a", "b"])
    assert s.switch is not None and s.switch.plan.adopt
    done(s)
    assert s.switch is not None and s.switch.plan.adopt
    done(s)
    assert s.state_of("a") == s.state_of("b") == "loaded" and s.switches_started == 0


def test_a_failed_load_of_one_model_leaves_the_others_loaded():
    s, rec, _ = make(cfg([m("x", 10), m("y", 10)]))
    s.on_done(load(s, "x"))
    y = ask(s, "y")
    done(s, LoadFailure("y", "llamacpp@y.service", "exited"))
    assert rec.take("fail") == [y.id] and s.state_of("x") == "loaded"


@pytest.mark.parametrize("state", ["inactive", "failed"])
def test_an_instance_that_goes_away_leaves_only_its_model(state: str):
    s, _rec, _ = make(cfg([m("x", 10), m("y", 10)]))
    s.on_done(load(s, "x"))
    s.on_done(load(s, "y"))
    s.on_unit_state("llamacpp@x.service", state)
    assert s.state_of("x") is None and s.state_of("y") == "loaded"
