"""Scheduler and eviction rules, fed events with a recording Effects (no event loop, no I/O)."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.config import Backend, Config, Model, SwitchSettings
from router.plan import Plan, make_plan, units_to_stop
from router.scheduler import LoadFailure, Scheduler, Switch, Ticket


class Clock:
    """A fake clock the tests move by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_config(**switch: float) -> Config:
    backends = {
        "one": Backend("one", "one.service", "http://127.0.0.1:1"),
        "two": Backend("two", "two.service", "http://127.0.0.1:2"),
    }
    models = {
        "a": Model("a", "one", command=("/bin/a",)),
        "b": Model("b", "one", command=("/bin/b",)),
        "c": Model("c", "two", command=("/bin/c",)),
        "d": Model("d", "one", unit="d.service"),
    }
    settings = SwitchSettings(**{"linger": 0.0, **switch})  # type: ignore[arg-type]
    return Config(config_dir=Path("/nonexistent"), backends=backends, models=models, switch=settings)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def start_switch(self, switch: Switch) -> None:
        self.calls.append(("switch", switch.target))

    def grant(self, ticket: Ticket) -> None:
        self.calls.append(("grant", ticket.id))

    def fail(self, ticket: Ticket, error: LoadFailure) -> None:
        self.calls.append(("fail", ticket.id))

    def waiting(self, ticket: Ticket, switch: Switch | None) -> None:
        self.calls.append(("wait", ticket.id))

    def abort_switch(self) -> None:
        self.calls.append(("abort", None))

    def wake_at(self, when: float) -> None:
        self.calls.append(("wake", when))

    def take(self, kind: str) -> list[object]:
        return [x for k, x in self.calls if k == kind]


@pytest.fixture
def sched() -> tuple[Scheduler, Recorder]:
    rec = Recorder()
    return Scheduler(make_config(), rec, Clock()), rec


def switch_done(s: Scheduler, error: LoadFailure | None, running: set[str]) -> None:
    assert s.switch is not None
    s.on_switch_done(s.switch.id, error, running)


def request(s: Scheduler, model: str | None) -> Ticket:
    t = Ticket(model)
    s.on_request(t)
    return t


def test_first_request_starts_one_switch_and_is_granted_when_it_ends(sched):
    s, rec = sched
    t = request(s, "a")
    assert rec.take("switch") == ["a"] and rec.take("grant") == []
    assert rec.take("wait") == [t.id, t.id]  # queued, then attached to the switch
    switch_done(s, None, {"one.service"})
    assert rec.take("grant") == [t.id] and s.active == "a" and s.serving["a"] == 1


def test_requests_for_the_model_being_loaded_join_that_switch(sched):
    s, rec = sched
    first = request(s, "a")
    others = [request(s, "a") for _ in range(5)]
    assert rec.take("switch") == ["a"]  # never a second switch
    switch_done(s, None, {"one.service"})
    assert rec.take("grant") == [first.id] + [t.id for t in others]


def test_request_for_active_model_goes_straight_through(sched):
    s, rec = sched
    request(s, "a")
    switch_done(s, None, {"one.service"})
    t = request(s, "a")
    assert rec.calls[-1] == ("grant", t.id)


def test_no_switch_away_while_a_response_streams_then_batches_by_model(sched):
    s, rec = sched
    a1 = request(s, "a")
    switch_done(s, None, {"one.service"})
    b1, a2, b2 = request(s, "b"), request(s, "a"), request(s, "b")
    assert rec.take("switch") == ["a"]  # b waits: a1 and a2 are streaming
    assert ("grant", a2.id) in rec.calls
    s.on_done(a1)
    assert rec.take("switch") == ["a"]
    s.on_done(a2)
    assert rec.take("switch") == ["a", "b"]
    switch_done(s, None, {"one.service"})
    assert rec.take("grant")[-2:] == [b1.id, b2.id]  # A B A B -> A A B B


def test_failed_switch_fails_its_waiters_and_the_next_model_loads(sched):
    s, rec = sched
    a = request(s, "a")
    c = request(s, "c")
    switch_done(s, LoadFailure("a", "one.service", "exited"), set())
    assert rec.take("fail") == [a.id] and s.active is None
    assert rec.take("switch") == ["a", "c"]
    switch_done(s, None, {"two.service"})
    assert rec.take("grant") == [c.id]


def test_cancelled_waiter_is_forgotten(sched):
    s, rec = sched
    request(s, "a")
    b = request(s, "b")
    s.on_done(b)
    switch_done(s, None, {"one.service"})
    assert rec.take("switch") == ["a"] and s.queue == []


def test_unit_going_away_on_its_own_unloads_the_model(sched):
    s, rec = sched
    t = request(s, "a")
    switch_done(s, None, {"one.service"})
    s.on_done(t)
    s.on_unit_state("one.service", "failed")
    assert s.active is None and s.running == set()
    request(s, "a")
    assert rec.take("switch") == ["a", "a"]


def test_unload_waits_for_streams_then_stops_everything(sched):
    s, rec = sched
    t = request(s, "a")
    switch_done(s, None, {"one.service"})
    u = request(s, None)
    assert rec.take("switch") == ["a"]
    s.on_done(t)
    assert rec.take("switch") == ["a", None]
    switch_done(s, None, set())
    assert rec.calls[-1] == ("grant", u.id) and s.active is None
    assert s.switches_started == 1  # the unload is not counted as a switch


def test_unload_with_nothing_running_is_granted_at_once(sched):
    s, rec = sched
    u = request(s, None)
    assert rec.take("switch") == [] and rec.calls[-1] == ("grant", u.id)


def test_adoption_loads_without_counting_as_a_switch(sched):
    s, rec = sched
    s.on_startup({"two.service"}, "c")
    t = request(s, "c")
    assert s.switches_started == 0 and rec.take("switch") == ["c"]
    switch_done(s, None, {"two.service"})
    assert rec.take("grant") == [t.id] and s.active == "c"


def test_config_reload_keeps_an_unchanged_active_model_and_drops_a_changed_one(sched):
    s, _ = sched
    t = request(s, "a")
    switch_done(s, None, {"one.service"})
    s.on_done(t)
    s.on_config(make_config())
    assert s.active == "a"
    changed = make_config()
    models = dict(changed.models)
    models["a"] = Model("a", "one", command=("/bin/a", "--new"))
    s.on_config(Config(config_dir=changed.config_dir, backends=changed.backends, models=models,
                       switch=changed.switch))
    assert s.active is None


def test_config_reload_fails_queued_requests_for_removed_models(sched):
    s, rec = sched
    request(s, "a")
    b = request(s, "b")
    cfg = make_config()
    models = {k: v for k, v in cfg.models.items() if k != "b"}
    s.on_config(Config(config_dir=cfg.config_dir, backends=cfg.backends, models=models, switch=cfg.switch))
    assert rec.take("fail") == [b.id]


def test_eviction_stops_every_running_managed_unit():
    cfg = make_config()
    assert units_to_stop(cfg, "c", {"one.service", "d.service", "other.service"}) == ["one.service", "d.service"]
    plan = make_plan(cfg, "b", {"one.service"})
    assert plan == Plan(target="b", stop=("one.service",), start="one.service", dropin="one.service")
    dedicated = make_plan(cfg, "d", {"one.service"})
    assert dedicated.start == "d.service" and dedicated.dropin is None


def test_a_grant_that_raced_a_client_leaving_is_still_released(sched):
    """The handler may be cancelled after the scheduler granted it but before it read the grant."""
    s, rec = sched
    a = request(s, "a")
    b = request(s, "b")
    switch_done(s, None, {"one.service"})  # a granted (serving 1) while its client is leaving
    s.on_done(a)
    assert s.serving == {} and rec.take("switch") == ["a", "b"]
    switch_done(s, None, {"one.service"})
    assert rec.calls[-1] == ("grant", b.id)


def test_a_load_nobody_waits_for_is_cut_short_when_another_model_is_asked_for(sched):
    s, rec = sched
    a = request(s, "a")
    b = request(s, "b")
    s.on_done(a)  # the only client of the load of a leaves, b waits
    assert b in s.queue
    assert rec.take("abort") == [None] and s.switch is not None and s.switch.aborting
    late = request(s, "a")  # a request for a while the load is being cut short queues for a new load
    assert s.switch.waiters == []
    switch_done(s, LoadFailure("a", "one.service", "abandoned", code="model_load_abandoned", cooldown=False), set())
    assert rec.take("fail") == [] and rec.take("switch") == ["a", "b"]
    switch_done(s, None, {"one.service"})
    assert rec.take("switch") == ["a", "b"]  # b is serving: a waits for it to finish
    assert late in s.queue


def test_a_load_nobody_waits_for_goes_on_when_nothing_else_waits(sched):
    s, rec = sched
    a = request(s, "a")
    s.on_done(a)
    assert rec.take("abort") == []
    b = request(s, "b")  # then someone wants another model: now it is cut short
    assert rec.take("abort") == [None] and b in s.queue


def test_adoption_and_loads_with_waiters_are_never_cut_short(sched):
    s, rec = sched
    s.on_startup({"two.service"}, "c")
    request(s, "a")
    request(s, "c")
    assert rec.take("abort") == []


# --- fairness, cooldown, queue limits, priority, reloads (issue 8) ------------------------------------


def make(**switch: float) -> tuple[Scheduler, Recorder, Clock]:
    rec, clock = Recorder(), Clock()
    return Scheduler(make_config(**switch), rec, clock), rec, clock


def loaded(s: Scheduler, model: str, unit: str = "one.service") -> Ticket:
    t = request(s, model)
    switch_done(s, None, {unit})
    return t


def test_a_steady_stream_for_the_loaded_model_cannot_starve_another_past_max_wait():
    s, _rec, clock = make(max_wait=60)
    streams = [loaded(s, "a")]
    b = request(s, "b")
    for _ in range(100):  # four clients looping on a: always something streaming
        clock.now += 1
        streams.append(request(s, "a"))
        s.on_done(streams.pop(0))
        if s.switch is not None:
            break
    assert s.switch is not None and s.switch.target == "b", "b waited forever"
    assert clock.now - b.arrived <= 61  # max_wait + the longest response in flight (1 s here)
    late = [t for t in s.queue if t.model == "a"]
    assert late and all(not t.granted for t in late)  # new a requests queued behind b


def test_before_max_wait_the_loaded_model_keeps_serving_its_requests():
    s, _rec, clock = make(max_wait=60)
    a1 = loaded(s, "a")
    request(s, "b")
    clock.now += 10
    a2 = request(s, "a")
    assert a2.granted and s.switch is None
    s.on_done(a1)
    s.on_done(a2)
    assert s.switch is not None and s.switch.target == "b"


def test_unload_is_not_starved_by_the_loaded_model():
    s, _rec, clock = make(max_wait=5)
    a = loaded(s, "a")
    u = request(s, None)
    clock.now += 6
    late = request(s, "a")
    assert not late.granted
    s.on_done(a)
    assert s.switch is not None and s.switch.target is None and u in s.switch.waiters


def test_linger_keeps_the_model_for_follow_up_requests_then_switches():
    """Two Open WebUI users: after user 1's answer its follow-up and tags requests still find model a."""
    s, rec, clock = make(linger=2, max_wait=60)
    chat = loaded(s, "a")
    title = request(s, "a")
    other = request(s, "b")  # user 2, on another model, waits
    s.on_done(title)
    clock.now += 5
    s.on_done(chat)  # the answer is over: a lingers
    assert s.switch is None and rec.take("wake")[-1] == clock.now + 2
    clock.now += 0.3
    follow_up = request(s, "a")
    assert follow_up.granted
    clock.now += 1
    s.on_done(follow_up)
    clock.now += 0.2
    tags = request(s, "a")
    assert tags.granted
    clock.now += 0.5
    s.on_done(tags)
    clock.now += 2.1
    s.on_tick()
    assert s.switch is not None and s.switch.target == "b" and other in s.switch.waiters
    assert s.switches_started == 2  # a (the first load) and b: no ping-pong


def test_linger_never_holds_a_request_past_max_wait():
    s, _rec, clock = make(linger=30, max_wait=10)
    a = loaded(s, "a")
    b = request(s, "b")
    s.on_done(a)
    assert s.switch is None
    clock.now += 10
    s.on_tick()
    assert s.switch is not None and b in s.switch.waiters


def test_a_failed_load_fails_later_requests_at_once_during_the_cooldown():
    s, rec, clock = make(failure_cooldown=30)
    first = request(s, "a")
    switch_done(s, LoadFailure("a", "one.service", "exited with status 1.", code="model_load_failed"), set())
    assert rec.take("fail") == [first.id]
    clock.now += 12
    again = request(s, "a")
    assert rec.take("fail") == [first.id, again.id] and s.switch is None
    assert s.switches_started == 1
    clock.now += 19
    request(s, "a")
    assert s.switch is not None and s.switches_started == 2


def test_the_cooldown_message_says_when_it_failed_and_when_it_is_tried_again():
    rec = Recorder()
    errors: list[LoadFailure] = []
    rec.fail = lambda ticket, error: errors.append(error)  # type: ignore[method-assign]
    clock = Clock()
    s = Scheduler(make_config(failure_cooldown=30), rec, clock)
    request(s, "a")
    switch_done(s, LoadFailure("a", "one.service", "exited with status 1."), set())
    clock.now += 12
    request(s, "a")
    message = errors[-1].message()
    assert "exited with status 1." in message and "(failed 12 s ago; next try in 18 s)" in message


def test_a_reload_that_changes_the_failed_model_ends_its_cooldown():
    s, _rec, _clock = make(failure_cooldown=30)
    request(s, "a")
    switch_done(s, LoadFailure("a", "one.service", "exited"), set())
    cfg = make_config(failure_cooldown=30)
    models = dict(cfg.models)
    models["a"] = Model("a", "one", command=("/bin/a", "--fixed"))
    s.on_config(Config(config_dir=cfg.config_dir, backends=cfg.backends, models=models, switch=cfg.switch))
    request(s, "a")
    assert s.switch is not None and s.switch.target == "a"


def test_a_transient_failure_is_retried_once_for_the_requests_batched_on_it():
    s, rec, _clock = make()
    t = request(s, "a")
    switch_done(s, LoadFailure("a", "one.service", "exited", transient=True), set())
    assert rec.take("fail") == [] and s.switch is not None and t in s.switch.waiters
    switch_done(s, LoadFailure("a", "one.service", "exited", transient=True), set())
    assert rec.take("fail") == [t.id] and s.switch is None


def test_past_max_queue_requests_are_refused_but_the_loaded_model_still_serves():
    s, rec, _clock = make(max_queue=3)
    loaded(s, "a")
    waiting = [request(s, "b") for _ in range(3)]
    refused = request(s, "c")
    assert rec.take("fail") == [refused.id] and all(t in s.queue for t in waiting)
    assert request(s, "a").granted


def test_priority_orders_the_queue_and_the_next_model():
    s, _rec, _clock = make()
    a = loaded(s, "a")
    low = request(s, "b")
    low.priority = 2  # (set before the scheduler sees it in real use)
    s.queue.remove(low)
    s._enqueue(low)
    high = Ticket("c", priority=0)
    s.on_request(high)
    assert s.queue[0] is high
    s.on_done(a)
    assert s.switch is not None and s.switch.target == "c"


def test_a_request_validated_before_a_reload_removed_its_model_fails_cleanly():
    s, rec, _clock = make()
    cfg = make_config()
    models = {k: v for k, v in cfg.models.items() if k != "b"}
    s.on_config(Config(config_dir=cfg.config_dir, backends=cfg.backends, models=models, switch=cfg.switch))
    late = Ticket("b")
    s.on_request(late)  # the handler checked b against the old configuration
    assert rec.take("fail") == [late.id] and s.switch is None and not s.queue


def test_a_reload_that_removes_the_model_being_loaded_aborts_the_load():
    s, rec, _clock = make()
    t = request(s, "b")
    cfg = make_config()
    models = {k: v for k, v in cfg.models.items() if k != "b"}
    s.on_config(Config(config_dir=cfg.config_dir, backends=cfg.backends, models=models, switch=cfg.switch))
    assert rec.take("abort") == [None] and rec.take("fail") == [t.id]
    switch_done(s, None, {"one.service"})  # even if the load got through, b is not made active
    assert s.active is None


def test_a_reload_that_drops_a_backend_stops_its_unit_once_nothing_streams():
    s, _rec, _clock = make()
    c = loaded(s, "c", "two.service")
    cfg = make_config()
    backends = {k: v for k, v in cfg.backends.items() if k != "two"}
    models = {k: v for k, v in cfg.models.items() if k != "c"}
    s.on_config(Config(config_dir=cfg.config_dir, backends=backends, models=models, switch=cfg.switch),
                {"two.service"})
    assert s.switch is None  # c still streams
    s.on_done(c)
    assert s.switch is not None and s.switch.plan.stop == ("two.service",) and s.switch.target is None
    switch_done(s, None, set())
    assert s.orphans == set() and s.switch is None


def test_deactivating_counts_as_running():
    s, _rec, _clock = make()
    s.on_unit_state("one.service", "deactivating")
    assert "one.service" in s.running
