"""The worker's side of hooks: failure reports, heartbeats during a hook, the chain a runner
calls (bare without middleware)."""

from __future__ import annotations

import threading
from typing import Any

from routemqd.exitcodes import ExitCode
from routemqd.handlers import LoadedHandler
from routemqd.hooks import HookFailure
from routemqd.worker import hookrun
from routemqd.worker.runners import build_handler, call


class FakeLog:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def error(self, event: str, **kw: Any) -> None:
        self.events.append((event, kw))


def test_a_setup_failure_is_logged_and_reported_as_boot_error() -> None:
    log, emitted = FakeLog(), []
    failure = HookFailure(ExitCode.SETUP_FAILED, "setup m:f raised OSError: no", "Traceback ...")
    hookrun.report(failure, log, emitted.append)
    assert emitted == [{"t": "boot_error", "code": 11, "reason": "setup m:f raised OSError: no"}]
    assert log.events == [
        ("setup_failed", {"reason": "setup m:f raised OSError: no", "detail": "Traceback ..."})
    ]


def test_teardown_failures_are_logged_only() -> None:
    log, emitted = FakeLog(), []
    hookrun.report(HookFailure(ExitCode.OK, "teardown m:t raised X"), log, emitted.append)
    hookrun.report(HookFailure(ExitCode.TEARDOWN_TIMEOUT, "did not finish"), log, emitted.append)
    assert emitted == []
    assert [e for e, _ in log.events] == ["teardown_failed", "teardown_timeout"]


def test_beating_heartbeats_while_the_block_runs_and_stops_after() -> None:
    beats: list[float] = []
    three = threading.Event()

    def heartbeat(now: float) -> None:
        beats.append(now)
        if len(beats) >= 3:
            three.set()

    with hookrun.beating(heartbeat, lambda: 0.01):
        assert three.wait(5), beats
    after = len(beats)
    assert not threading.Event().wait(0.05)
    assert len(beats) == after


def _loaded(func: Any, is_async: bool = False) -> LoadedHandler:
    return LoadedHandler(ref="m:f", func=func, is_async=is_async)


def test_without_middleware_runners_call_the_handler_itself() -> None:
    def handle(message: Any) -> None:
        pass

    assert build_handler(_loaded(handle)) is handle
    assert build_handler(_loaded(handle), []) is handle


def test_a_middleware_exception_fails_the_message_like_the_handler_own() -> None:
    seen: list[str] = []

    def handle(message: Any) -> None:
        seen.append(message)

    def refuse(message: Any, call_next: Any) -> Any:
        raise ValueError("refused")

    def passthrough(message: Any, call_next: Any) -> Any:
        return call_next(message)

    assert call(build_handler(_loaded(handle), [passthrough]), "a") is None
    error = call(build_handler(_loaded(handle), [passthrough, refuse]), "b")
    assert isinstance(error, ValueError) and seen == ["a"]
