"""The switcher's run loop with a fake systemd and probe: it cannot die, wedge or lose a switch's end."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from router.config import Backend, Config, Model, SwitchSettings
from router.scheduler import LoadFailure
from router.switcher import Failed, Granted, Switcher
from router.systemd import UnitState

pytestmark = pytest.mark.timeout(20)


class FakeSystemd:
    """Units that start and stop at once; `states_gate` can hold states() to simulate a slow bus."""

    def __init__(self) -> None:
        self.active: set[str] = set()
        self.on_unit_change = None
        self.states_gate: asyncio.Event | None = None
        self.starts: list[str] = []

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def watch(self, names: list[str]) -> None: ...
    async def reload(self) -> None: ...
    async def reset_failed(self, name: str) -> None: ...

    async def state(self, name: str) -> UnitState:
        await asyncio.sleep(0)
        return UnitState(name, "loaded", "active" if name in self.active else "inactive")

    async def states(self, names: list[str]) -> dict[str, UnitState]:
        if self.states_gate is not None:
            await self.states_gate.wait()
        return {n: await self.state(n) for n in names}

    async def exec_start(self, name: str) -> list[list[str]]:
        return []

    async def start(self, name: str, timeout: float) -> str:
        self.starts.append(name)
        self.active.add(name)
        return "done"

    async def stop(self, name: str, timeout: float) -> str:
        self.active.discard(name)
        return "done"


def make_config(tmp_path: Path) -> Config:
    backends = {"one": Backend("one", "one.service", "http://127.0.0.1:9")}
    models = {m: Model(m, "one", unit=f"{m}.service") for m in ("a", "b")}
    return Config(config_dir=tmp_path, backends=backends, models=models,
                  switch=SwitchSettings(linger=0, health_interval=0.01))


async def healthy(url: str, timeout: float) -> bool:
    return True


async def answer(switcher: Switcher, model: str | None) -> object:
    ticket = switcher.submit(model)
    while True:
        update = await asyncio.wait_for(switcher.next_update(ticket), 5)
        if isinstance(update, (Granted, Failed)) or update.__class__.__name__ == "Unloaded":
            switcher.done(ticket)
            return update


@pytest.fixture
async def switcher(tmp_path: Path):
    sw = Switcher(make_config(tmp_path), FakeSystemd(), healthy)
    await sw.start()
    yield sw
    await sw.close()


async def test_an_error_in_an_event_handler_fails_that_request_and_the_loop_goes_on(switcher: Switcher):
    original = switcher.scheduler.on_request

    def broken(ticket):
        if ticket.model == "b":
            raise KeyError("b")  # a bug in a handler
        original(ticket)

    switcher.scheduler.on_request = broken  # type: ignore[method-assign]
    switcher._post = lambda handler, *args: switcher._events.put_nowait(  # type: ignore[method-assign]
        (broken if handler == original else handler, args))
    failed = await answer(switcher, "b")
    assert isinstance(failed, Failed) and failed.error.code == "internal_error"
    assert switcher.alive and await switcher.heartbeat(1.0)
    assert isinstance(await answer(switcher, "a"), Granted)
    assert switcher.handler_errors == 1


async def test_the_loop_survives_an_exception_whose_logging_would_clash(switcher: Switcher):
    """The first bug: the safety net's own log call raised (a keyword named `event`)."""
    def boom() -> None:
        raise RuntimeError("handler bug")

    switcher._post(boom)
    assert await switcher.heartbeat(1.0)
    assert isinstance(await answer(switcher, "a"), Granted)


async def test_a_load_cut_short_after_it_finished_still_ends_the_switch(switcher: Switcher):
    """The second bug: the abort landed while the switch task read unit states after the load."""
    systemd: FakeSystemd = switcher.systemd  # type: ignore[assignment]
    systemd.states_gate = asyncio.Event()
    ticket = switcher.submit("a")
    await asyncio.sleep(0.05)  # the load of a is done; the task now waits in states()
    switcher.done(ticket)  # its only client leaves…
    other = switcher.submit("b")  # …and another model is asked for: the load of a is cut short
    await asyncio.sleep(0.05)
    systemd.states_gate.set()
    while True:
        update = await asyncio.wait_for(switcher.next_update(other), 5)
        if isinstance(update, (Granted, Failed)):
            break
    assert isinstance(update, Granted) and update.model.id == "b"
    assert switcher.scheduler.switch is None


async def test_heartbeat_fails_when_the_loop_does_not_turn(switcher: Switcher):
    assert await switcher.heartbeat(1.0)
    loop_task = switcher._loop_task
    assert loop_task is not None
    switcher._closing = True  # no restart: stand for a loop that stopped reading its queue
    loop_task.cancel()
    await asyncio.gather(loop_task, return_exceptions=True)
    switcher._loop_task = asyncio.create_task(asyncio.sleep(3600))  # alive, but never reads the queue
    assert not await switcher.heartbeat(0.1)
    switcher._loop_task.cancel()


async def test_a_run_loop_that_ends_is_restarted(switcher: Switcher):
    loop_task = switcher._loop_task
    assert loop_task is not None
    loop_task.cancel()
    await asyncio.gather(loop_task, return_exceptions=True)
    await asyncio.sleep(0)
    assert switcher.alive and switcher._loop_task is not loop_task
    assert isinstance(await answer(switcher, "a"), Granted)


async def test_a_removed_model_being_loaded_fails_its_requests_with_model_not_found(switcher: Switcher):
    ticket = switcher.submit("b")
    config = switcher.config
    switcher.reload(Config(config_dir=config.config_dir, backends=config.backends,
                           models={"a": config.models["a"]}, switch=config.switch))
    while True:
        update = await asyncio.wait_for(switcher.next_update(ticket), 5)
        if isinstance(update, (Granted, Failed)):
            break
    assert isinstance(update, Failed) and update.error.code == "model_not_found"
    assert switcher.alive and isinstance(await answer(switcher, "a"), Granted)


def test_load_failure_message_keeps_the_note_before_the_hint():
    e = LoadFailure("a", "u", "exited.", "Fix it.", note="(failed 1 s ago; next try in 29 s)")
    assert e.message() == "a (unit u): exited. (failed 1 s ago; next try in 29 s) Fix it."


async def test_a_stray_listener_on_the_backend_port_fails_the_switch_naming_it(tmp_path: Path):
    systemd = FakeSystemd()
    sw = Switcher(make_config(tmp_path), systemd, healthy,
                  port_check=lambda url: "127.0.0.1:9 is already in use by pid 4242 (python3 -m http.server 9)")
    await sw.start()
    try:
        failed = await answer(sw, "a")
        assert isinstance(failed, Failed) and failed.error.code == "port_in_use"
        assert "pid 4242 (python3 -m http.server 9)" in failed.message and systemd.starts == []
    finally:
        await sw.close()


async def test_a_unit_that_dies_once_its_health_check_passed_is_not_ready(tmp_path: Path):
    """A stray server answered the health check while the unit itself failed to bind and exited."""
    systemd = FakeSystemd()

    async def stray_answers(url: str, timeout: float) -> bool:
        systemd.active.discard("a.service")  # the unit exited (its port was taken)
        return True

    sw = Switcher(make_config(tmp_path), systemd, stray_answers)
    await sw.start()
    try:
        failed = await answer(sw, "a")
        assert isinstance(failed, Failed) and "(unit a.service)" in failed.message
    finally:
        await sw.close()


# --- errors that say what happened (issue 8, finding 11) ---------------------------------------------


def test_a_dbus_refusal_on_the_user_bus_does_not_suggest_root(tmp_path: Path):
    from dataclasses import replace

    from router.config import SystemdSettings
    from router.executor import systemd_failure
    from router.systemd import SystemdError, SystemdUnreachable

    user = replace(make_config(tmp_path), systemd=SystemdSettings(bus="user", dropin_dir=tmp_path))
    error = systemd_failure(user, "a", "a.service", SystemdError("StartUnit a.service: Unit a.service not found"))
    assert "root" not in error.message() and "systemctl --user status a.service" in error.message()
    assert "StartUnit a.service" in error.message() and "<lambda>" not in error.message()
    gone = systemd_failure(user, "a", "a.service", SystemdUnreachable("The connection is closed"))
    assert gone.code == "systemd_unreachable" and "not reachable over D-Bus" in gone.message()


def test_a_huge_argv_is_cut_in_messages():
    from router.executor import QUOTE_LIMIT, quote_argv

    text = quote_argv(["/bin/engine", "x" * 2_000_000])
    assert len(text) < QUOTE_LIMIT + 40 and "characters)" in text


async def test_a_unit_stopped_behind_the_routers_back_while_loading_says_so(tmp_path: Path):
    systemd = FakeSystemd()
    polls = 0

    async def slow_then_stopped(url: str, timeout: float) -> bool:
        nonlocal polls
        polls += 1
        if polls == 2:
            systemd.active.discard("a.service")  # `systemctl stop a.service` by an operator (result: success)
        return False

    sw = Switcher(make_config(tmp_path), systemd, slow_then_stopped)
    await sw.start()
    try:
        failed = await answer(sw, "a")
        assert isinstance(failed, Failed) and failed.error.code == "model_load_interrupted"
        assert "stopped while it loaded, not by the router" in failed.message
        assert "Fix the model's command" not in failed.message
    finally:
        await sw.close()


async def test_a_request_queued_behind_another_models_load_is_told_how_far_it_is(tmp_path: Path):
    """Not one silent "Switching…" for the whole wait: "⏳ Waiting for a (1 request ahead)…" lines while a
    loads for another chat, then "🔄 Switching to b…" once its own switch starts."""
    from router.switcher import Status

    ready = asyncio.Event()

    async def slow(url: str, timeout: float) -> bool:
        return ready.is_set()

    config = make_config(tmp_path)
    config = Config(config_dir=tmp_path, backends=config.backends, models=config.models,
                    switch=SwitchSettings(linger=0, health_interval=0.01, status_every=0.05))
    sw = Switcher(config, FakeSystemd(), slow)
    await sw.start()
    try:
        first = sw.submit("a")
        assert isinstance(await asyncio.wait_for(sw.next_update(first), 5), Status)  # Switching to a…
        second = sw.submit("b")
        lines = []
        while len(lines) < 3:
            update = await asyncio.wait_for(sw.next_update(second), 5)
            assert isinstance(update, Status)
            lines.append(update.text)
        assert lines == ["⏳ Waiting for a (1 request ahead)…"] * 3, lines
        ready.set()
        granted = await asyncio.wait_for(_until_granted(sw, first), 5)
        assert isinstance(granted, Granted)
        sw.done(first)
        update = await asyncio.wait_for(sw.next_update(second), 5)
        while isinstance(update, Status) and update.text.startswith("⏳ Waiting"):
            update = await asyncio.wait_for(sw.next_update(second), 5)
        assert isinstance(update, Status) and update.text == "🔄 Switching to b…"
        assert isinstance(await asyncio.wait_for(_until_granted(sw, second), 5), Granted)
        sw.done(second)
    finally:
        await sw.close()


async def _until_granted(sw: Switcher, ticket: object) -> object:
    while True:
        update = await sw.next_update(ticket)  # type: ignore[arg-type]
        if isinstance(update, (Granted, Failed)):
            return update


def test_a_failed_loads_message_leads_with_the_engines_own_line_then_the_journal_in_a_fence():
    journal = ("systemd: Started llamacpp.service - llama.cpp server.",
               "python3: loading weights",
               "python3: llama_server: model file not found: /models/x.gguf",
               "python3: main: exiting due to model loading error",
               "systemd: llamacpp.service: Main process exited, code=exited, status=2/INVALIDARGUMENT",
               "systemd: llamacpp.service: Failed with result 'exit-code'.")
    e = LoadFailure("tiny-a", "llamacpp.service", "exited while loading (exited with status 2).",
                    "Fix the model's command; `journalctl --user-unit=llamacpp.service` has the whole log.", journal)
    assert e.reason == "model file not found: /models/x.gguf"  # without the program's name
    head, _, tail = e.message("Tiny A").partition("\nLast journal lines:\n")
    assert head == ("Tiny A (unit llamacpp.service): model file not found: /models/x.gguf\n"
                    "It exited while loading (exited with status 2). Fix the model's command; "
                    "`journalctl --user-unit=llamacpp.service` has the whole log.")
    assert tail == "```\n" + "\n".join(journal) + "\n```"
    # only systemd's lines: what failed leads, as before
    manager_only = LoadFailure("a", "u", "exited while loading (killed by signal 9).", journal=journal[-2:])
    assert manager_only.reason == "exited while loading (killed by signal 9)"
    assert manager_only.message().startswith("a (unit u): exited while loading (killed by signal 9).\n")
    # the fence is longer than any backtick run in the lines
    quoted = LoadFailure("a", "u", "exited.", journal=("python3: error: bad ```block```",))
    assert quoted.message().endswith("````\npython3: error: bad ```block```\n````")
    assert quoted.reason == "error: bad ```block```"  # a log level is not a program's name
    python = LoadFailure("a", "u", "exited.", journal=("vllm: Traceback (most recent call last):",
                                                         "vllm: ValueError: max_model_len 8192 is too large",
                                                         "vllm: RuntimeError: see root cause above"))
    assert python.reason == "ValueError: max_model_len 8192 is too large"
