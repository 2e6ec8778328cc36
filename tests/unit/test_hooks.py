"""Hooks and middleware without a broker: chain order, exceptions, async chains, the identity of a
route without middleware, setup and teardown that raise or hang past their bound, and the kind
rules ``check`` and the worker share."""

from __future__ import annotations

import asyncio
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from routemqd import context
from routemqd.context import WorkerContext, current, install, make_context
from routemqd.exitcodes import ExitCode
from routemqd.handlers import HandlerError
from routemqd.hooks import (
    HookRole,
    LoadedHook,
    kind_problem,
    load_hook,
    load_route_hooks,
    run_setup,
    run_teardown,
)
from routemqd.manifest import loads
from routemqd.message import Message
from routemqd.middleware import build_chain
from routemqd.plan import slots_for

BOUND = 5.0  # generous hang bound for waits on the watchdog thread


def ctx() -> WorkerContext:
    return WorkerContext(route="r", slot=0, pid=1, client_id="c", host_id="h", log=None)


def hook(func: Any, role: HookRole = HookRole.SETUP) -> LoadedHook:
    return LoadedHook(role=role, ref=f"t:{func.__name__}", func=func, is_async=False)


def ahook(func: Any, role: HookRole = HookRole.SETUP) -> LoadedHook:
    return LoadedHook(role=role, ref=f"t:{func.__name__}", func=func, is_async=True)


class FakeExit:
    """Stands in for os._exit: records the code and wakes the hung hook so the test can end."""

    def __init__(self, release: threading.Event) -> None:
        self.codes: list[int] = []
        self.release = release

    def __call__(self, code: int) -> None:
        self.codes.append(code)
        self.release.set()


# ---------------------------------------------------------------------------------- the chain


def test_no_middleware_returns_the_handler_itself() -> None:
    def handle(message: Any) -> None:
        pass

    assert build_chain(handle, [], is_async=False) is handle
    assert build_chain(handle, (), is_async=True) is handle


def test_chain_runs_outermost_first_and_unwinds_in_reverse() -> None:
    seen: list[str] = []

    def mw(name: str) -> Any:
        def layer(message: Any, call_next: Any) -> Any:
            seen.append(f"{name}>")
            result = call_next(message)
            seen.append(f"<{name}")
            return result

        return layer

    def handle(message: Any) -> str:
        seen.append(f"handler {message}")
        return "done"

    chain = build_chain(handle, [mw("outer"), mw("inner")], is_async=False)
    assert chain("m") == "done"
    assert seen == ["outer>", "inner>", "handler m", "<inner", "<outer"]


def test_middleware_may_replace_the_message_and_short_circuit() -> None:
    handled: list[Any] = []

    def upper(message: Any, call_next: Any) -> Any:
        return call_next(message.upper())

    def drop_x(message: Any, call_next: Any) -> Any:
        return None if message == "X" else call_next(message)

    chain = build_chain(handled.append, [upper, drop_x], is_async=False)
    chain("a")
    chain("x")
    assert handled == ["A"]


def test_exceptions_from_handler_and_middleware_reach_the_caller() -> None:
    def boom(message: Any) -> None:
        raise ValueError("handler says no")

    def passthrough(message: Any, call_next: Any) -> Any:
        return call_next(message)

    def failing(message: Any, call_next: Any) -> Any:
        raise KeyError("middleware says no")

    with pytest.raises(ValueError, match="handler says no"):
        build_chain(boom, [passthrough], is_async=False)("m")
    with pytest.raises(KeyError, match="middleware says no"):
        build_chain(boom, [passthrough, failing], is_async=False)("m")


def test_async_chain_awaits_every_layer_in_order() -> None:
    seen: list[str] = []

    def mw(name: str) -> Any:
        async def layer(message: Any, call_next: Any) -> Any:
            seen.append(f"{name}>")
            await asyncio.sleep(0)
            result = await call_next(message)
            seen.append(f"<{name}")
            return result

        return layer

    async def handle(message: Any) -> str:
        seen.append("handler")
        return message * 2

    chain = build_chain(handle, [mw("a"), mw("b")], is_async=True)
    assert asyncio.iscoroutinefunction(chain)
    assert asyncio.run(chain("x")) == "xx"
    assert seen == ["a>", "b>", "handler", "<b", "<a"]


def test_async_chain_propagates_exceptions() -> None:
    async def passthrough(message: Any, call_next: Any) -> Any:
        return await call_next(message)

    async def boom(message: Any) -> None:
        raise RuntimeError("async handler failed")

    with pytest.raises(RuntimeError, match="async handler failed"):
        asyncio.run(build_chain(boom, [passthrough], is_async=True)("m"))


# ----------------------------------------------------------------------------------- kinds


@pytest.mark.parametrize(
    ("role", "hook_async", "handler_async", "ok"),
    [
        ("middleware", False, False, True),
        ("middleware", True, True, True),
        ("middleware", False, True, False),
        ("middleware", True, False, False),
        ("setup", False, False, True),
        ("setup", False, True, True),
        ("setup", True, True, True),
        ("setup", True, False, False),
        ("teardown", False, True, True),
        ("teardown", True, False, False),
    ],
)
def test_kind_rules(role: str, hook_async: bool, handler_async: bool, ok: bool) -> None:
    assert (kind_problem(role, hook_async, handler_async) == "") is ok


# ---------------------------------------------------------------------------------- loading


@pytest.fixture
def hook_module(tmp_path: Path) -> Iterator[tuple[str, ...]]:
    (tmp_path / "rmq_hooks_mod.py").write_text(
        textwrap.dedent(
            """\
            def setup(ctx): pass
            async def asetup(ctx): pass
            def two(a, b): pass
            def mw(message, call_next): return call_next(message)
            async def amw(message, call_next): return await call_next(message)
            amw2 = amw
            NOT_CALLABLE = 1
            """
        ),
        encoding="utf-8",
    )
    yield (str(tmp_path),)
    sys.modules.pop("rmq_hooks_mod", None)


def test_load_hook_checks_signature_and_kind(hook_module: tuple[str, ...]) -> None:
    assert not load_hook("setup", "rmq_hooks_mod:setup", hook_module).is_async
    assert load_hook("setup", "rmq_hooks_mod:asetup", hook_module).is_async
    assert load_hook("middleware", "rmq_hooks_mod:amw", hook_module).is_async
    with pytest.raises(HandlerError, match="exactly one argument") as info:
        load_hook("teardown", "rmq_hooks_mod:two", hook_module)
    assert info.value.kind == "invalid"
    with pytest.raises(HandlerError, match=r"exactly two arguments \(message, call_next\)"):
        load_hook("middleware", "rmq_hooks_mod:setup", hook_module)
    with pytest.raises(HandlerError, match="int is not callable"):
        load_hook("setup", "rmq_hooks_mod:NOT_CALLABLE", hook_module)
    with pytest.raises(HandlerError, match="importing rmq_no_such_module failed") as info:
        load_hook("setup", "rmq_no_such_module:f", hook_module)
    assert info.value.kind == "import"


def test_load_route_hooks_names_the_manifest_field(hook_module: tuple[str, ...]) -> None:
    m = loads(
        "defaults:\n  setup: rmq_hooks_mod:setup\n"
        "routes:\n  - topic: a/b\n    handler: m:f\n"
        "    middleware: [rmq_hooks_mod:mw, rmq_hooks_mod:amw]\n"
    )
    route = m.routes[0]
    with pytest.raises(HandlerError, match=r"^routes\[0\]\.middleware\[1\]: .*must be one too"):
        load_route_hooks(route, hook_module, handler_is_async=False)
    with pytest.raises(HandlerError, match=r"^routes\[0\]\.middleware\[0\]: .*'async def'"):
        load_route_hooks(route, hook_module, handler_is_async=True)


def test_load_route_hooks_loads_in_manifest_order(hook_module: tuple[str, ...]) -> None:
    m = loads(
        "routes:\n  - topic: a/b\n    handler: m:f\n    setup: rmq_hooks_mod:asetup\n"
        "    teardown: rmq_hooks_mod:setup\n"
        "    middleware: [rmq_hooks_mod:amw, rmq_hooks_mod:amw2]\n"
    )
    hooks = load_route_hooks(m.routes[0], hook_module, handler_is_async=True)
    assert hooks.setup is not None and hooks.setup.ref == "rmq_hooks_mod:asetup"
    assert hooks.teardown is not None and hooks.teardown.role is HookRole.TEARDOWN
    assert [h.ref for h in hooks.middleware] == ["rmq_hooks_mod:amw", "rmq_hooks_mod:amw2"]


def test_route_without_hooks_loads_nothing() -> None:
    m = loads("routes:\n  - topic: a/b\n    handler: m:f\n")
    hooks = load_route_hooks(m.routes[0], (), handler_is_async=False)
    assert hooks.setup is None and hooks.teardown is None and hooks.middleware == ()


# ------------------------------------------------------------------------------ setup bounds


def test_setup_runs_once_with_the_context_on_the_calling_thread() -> None:
    calls: list[tuple[WorkerContext, str]] = []

    def setup(c: WorkerContext) -> None:
        calls.append((c, threading.current_thread().name))
        c.state.conn = "connection"

    c = ctx()
    assert run_setup(hook(setup), c, timeout=BOUND) is None
    assert calls == [(c, threading.current_thread().name)]
    assert c.state.conn == "connection"


def test_no_setup_is_no_failure() -> None:
    assert run_setup(None, ctx(), timeout=0.1) is None
    assert run_teardown(None, ctx(), timeout=0.1) is None


def test_setup_that_raises_is_a_setup_failure() -> None:
    def setup(c: WorkerContext) -> None:
        raise ConnectionRefusedError("database at 127.0.0.1:1 refused")

    failure = run_setup(hook(setup), ctx(), timeout=BOUND)
    assert failure is not None
    assert failure.code is ExitCode.SETUP_FAILED
    assert failure.code.is_boot_failure
    assert "setup t:setup raised ConnectionRefusedError: database at 127.0.0.1:1" in failure.reason
    assert "ConnectionRefusedError" in failure.detail


def test_setup_that_calls_sys_exit_is_a_setup_failure() -> None:
    def setup(c: WorkerContext) -> None:
        raise SystemExit(3)

    failure = run_setup(hook(setup), ctx(), timeout=BOUND)
    assert failure is not None and failure.code is ExitCode.SETUP_FAILED


def test_setup_that_hangs_reports_then_ends_the_process() -> None:
    release = threading.Event()
    fake_exit = FakeExit(release)
    reported: list[Any] = []

    def setup(c: WorkerContext) -> None:
        assert release.wait(BOUND), "the watchdog never fired"

    failure = run_setup(
        hook(setup), ctx(), timeout=0.05, on_timeout=reported.append, exit_fn=fake_exit
    )
    assert fake_exit.codes == [int(ExitCode.SETUP_FAILED)]
    assert failure is not None and failure.code is ExitCode.SETUP_FAILED
    assert reported == [failure]
    assert "did not finish within 0.05s" in failure.reason


def test_exit_follows_even_if_reporting_the_timeout_fails() -> None:
    release = threading.Event()
    fake_exit = FakeExit(release)

    def report(failure: Any) -> None:
        raise OSError("status pipe gone")

    def setup(c: WorkerContext) -> None:
        release.wait(BOUND)

    run_setup(hook(setup), ctx(), timeout=0.05, on_timeout=report, exit_fn=fake_exit)
    assert fake_exit.codes == [int(ExitCode.SETUP_FAILED)]


def test_a_quick_setup_never_trips_the_watchdog() -> None:
    exits: list[int] = []
    for _ in range(50):
        assert run_setup(hook(lambda c: None), ctx(), timeout=BOUND, exit_fn=exits.append) is None
    assert exits == []


def test_async_setup_runs_on_a_loop_that_is_not_running_yet() -> None:
    loop = asyncio.new_event_loop()
    try:

        async def setup(c: WorkerContext) -> None:
            c.state.loop = asyncio.get_running_loop()

        c = ctx()
        assert run_setup(ahook(setup), c, timeout=BOUND, loop=loop) is None
        assert c.state.loop is loop
    finally:
        loop.close()


def test_async_setup_runs_on_a_loop_running_in_another_thread() -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:

        async def setup(c: WorkerContext) -> None:
            c.state.thread = threading.current_thread()

        c = ctx()
        assert run_setup(ahook(setup), c, timeout=BOUND, loop=loop) is None
        assert c.state.thread is thread

        async def failing(c: WorkerContext) -> None:
            raise OSError("no route to database")

        failure = run_setup(ahook(failing), c, timeout=BOUND, loop=loop)
        assert failure is not None and "OSError: no route to database" in failure.reason
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(BOUND)
        loop.close()


def test_async_setup_without_a_loop_is_a_setup_failure() -> None:
    async def setup(c: WorkerContext) -> None:
        pass

    failure = run_setup(ahook(setup), ctx(), timeout=BOUND)
    assert failure is not None and "needs the route's event loop" in failure.reason


# ---------------------------------------------------------------------------- teardown bounds


def test_teardown_that_raises_is_logged_work_not_lost() -> None:
    def teardown(c: WorkerContext) -> None:
        raise RuntimeError("close failed")

    failure = run_teardown(hook(teardown, HookRole.TEARDOWN), ctx(), timeout=BOUND)
    assert failure is not None
    assert failure.code is ExitCode.OK
    assert "teardown t:teardown raised RuntimeError: close failed" in failure.reason


def test_teardown_that_hangs_ends_the_process_with_its_own_code() -> None:
    release = threading.Event()
    fake_exit = FakeExit(release)

    def teardown(c: WorkerContext) -> None:
        release.wait(BOUND)

    failure = run_teardown(
        hook(teardown, HookRole.TEARDOWN), ctx(), timeout=0.05, exit_fn=fake_exit
    )
    assert fake_exit.codes == [int(ExitCode.TEARDOWN_TIMEOUT)]
    assert failure is not None and failure.code is ExitCode.TEARDOWN_TIMEOUT
    assert not ExitCode.TEARDOWN_TIMEOUT.is_boot_failure


# ------------------------------------------------------------------------------- the context


def test_make_context_installs_the_process_context() -> None:
    spec = next(iter(slots_for(loads("routes:\n  - topic: a/b\n    handler: m:f\n")).values()))
    previous = context._current
    try:
        c = make_context(spec)
        assert current() is c
        assert (c.route, c.slot, c.client_id) == ("a-b", 0, spec.client_id)
        assert c.label == "a-b[0]"
        assert Message(topic="a/b", payload=b"").context is c
        with pytest.raises(AttributeError):
            c.route = "other"  # type: ignore[misc]
        c.state.anything = 1  # state belongs to user code
    finally:
        install(previous)


def test_no_context_outside_a_worker() -> None:
    previous = install(None)
    try:
        with pytest.raises(RuntimeError, match="not running in a routemqd worker"):
            current()
    finally:
        install(previous)
