"""Scheduler and eviction rules, fed events with a recording Effects (no event loop, no I/O)."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.config import Backend, Config, Model
from router.plan import Plan, make_plan, units_to_stop
from router.scheduler import LoadFailure, Scheduler, Switch, Ticket


def make_config() -> Config:
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
    return Config(config_dir=Path("/nonexistent"), backends=backends, models=models)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def start_switch(self, plan: Plan) -> None:
        self.calls.append(("switch", plan.target))

    def grant(self, ticket: Ticket) -> None:
        self.calls.append(("grant", ticket.id))

    def fail(self, ticket: Ticket, error: LoadFailure) -> None:
        self.calls.append(("fail", ticket.id))

    def waiting(self, ticket: Ticket, switch: Switch | None) -> None:
        self.calls.append(("wait", ticket.id))

    def abort_switch(self) -> None:
        self.calls.append(("abort", None))

    def take(self, kind: str) -> list[object]:
        return [x for k, x in self.calls if k == kind]


@pytest.fixture
def sched() -> tuple[Scheduler, Recorder]:
    rec = Recorder()
    return Scheduler(make_config(), rec), rec


def request(s: Scheduler, model: str | None) -> Ticket:
    t = Ticket(model)
    s.on_request(t)
    return t


def test_first_request_starts_one_switch_and_is_granted_when_it_ends(sched):
    s, rec = sched
    t = request(s, "a")
    assert rec.take("switch") == ["a"] and rec.take("grant") == []
    assert rec.take("wait") == [t.id, t.id]  # queued, then attached to the switch
    s.on_switch_done(None, {"one.service"})
    assert rec.take("grant") == [t.id] and s.active == "a" and s.serving["a"] == 1


def test_requests_for_the_model_being_loaded_join_that_switch(sched):
    s, rec = sched
    first = request(s, "a")
    others = [request(s, "a") for _ in range(5)]
    assert rec.take("switch") == ["a"]  # never a second switch
    s.on_switch_done(None, {"one.service"})
    assert rec.take("grant") == [first.id] + [t.id for t in others]


def test_request_for_active_model_goes_straight_through(sched):
    s, rec = sched
    request(s, "a")
    s.on_switch_done(None, {"one.service"})
    t = request(s, "a")
    assert rec.calls[-1] == ("grant", t.id)


def test_no_switch_away_while_a_response_streams_then_batches_by_model(sched):
    s, rec = sched
    a1 = request(s, "a")
    s.on_switch_done(None, {"one.service"})
    b1, a2, b2 = request(s, "b"), request(s, "a"), request(s, "b")
    assert rec.take("switch") == ["a"]  # b waits: a1 and a2 are streaming
    assert ("grant", a2.id) in rec.calls
    s.on_done(a1)
    assert rec.take("switch") == ["a"]
    s.on_done(a2)
    assert rec.take("switch") == ["a", "b"]
    s.on_switch_done(None, {"one.service"})
    assert rec.take("grant")[-2:] == [b1.id, b2.id]  # A B A B -> A A B B


def test_failed_switch_fails_its_waiters_and_the_next_model_loads(sched):
    s, rec = sched
    a = request(s, "a")
    c = request(s, "c")
    s.on_switch_done(LoadFailure("a", "one.service", "exited"), set())
    assert rec.take("fail") == [a.id] and s.active is None
    assert rec.take("switch") == ["a", "c"]
    s.on_switch_done(None, {"two.service"})
    assert rec.take("grant") == [c.id]


def test_cancelled_waiter_is_forgotten(sched):
    s, rec = sched
    request(s, "a")
    b = request(s, "b")
    s.on_done(b)
    s.on_switch_done(None, {"one.service"})
    assert rec.take("switch") == ["a"] and s.queue == []


def test_unit_going_away_on_its_own_unloads_the_model(sched):
    s, rec = sched
    t = request(s, "a")
    s.on_switch_done(None, {"one.service"})
    s.on_done(t)
    s.on_unit_state("one.service", "failed")
    assert s.active is None and s.running == set()
    request(s, "a")
    assert rec.take("switch") == ["a", "a"]


def test_unload_waits_for_streams_then_stops_everything(sched):
    s, rec = sched
    t = request(s, "a")
    s.on_switch_done(None, {"one.service"})
    u = request(s, None)
    assert rec.take("switch") == ["a"]
    s.on_done(t)
    assert rec.take("switch") == ["a", None]
    s.on_switch_done(None, set())
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
    s.on_switch_done(None, {"two.service"})
    assert rec.take("grant") == [t.id] and s.active == "c"


def test_config_reload_keeps_an_unchanged_active_model_and_drops_a_changed_one(sched):
    s, _ = sched
    t = request(s, "a")
    s.on_switch_done(None, {"one.service"})
    s.on_done(t)
    s.on_config(make_config())
    assert s.active == "a"
    changed = make_config()
    models = dict(changed.models)
    models["a"] = Model("a", "one", command=("/bin/a", "--new"))
    s.on_config(Config(config_dir=changed.config_dir, backends=changed.backends, models=models))
    assert s.active is None


def test_config_reload_fails_queued_requests_for_removed_models(sched):
    s, rec = sched
    request(s, "a")
    b = request(s, "b")
    cfg = make_config()
    models = {k: v for k, v in cfg.models.items() if k != "b"}
    s.on_config(Config(config_dir=cfg.config_dir, backends=cfg.backends, models=models))
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
    s.on_switch_done(None, {"one.service"})  # a granted (serving 1) while its client is leaving
    s.on_done(a)
    assert s.serving == {} and rec.take("switch") == ["a", "b"]
    s.on_switch_done(None, {"one.service"})
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
    s.on_switch_done(LoadFailure("a", "one.service", "abandoned"), set())
    assert rec.take("fail") == [] and rec.take("switch") == ["a", "b"]
    s.on_switch_done(None, {"one.service"})
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
