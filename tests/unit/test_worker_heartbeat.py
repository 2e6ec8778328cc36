"""When a worker heartbeats: its cadence against the master's frozen-worker rule, and the beats
out of turn that keep `status` true to the link."""

from __future__ import annotations

import os
import selectors
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from routemqd import log as logsetup
from routemqd.protocol import Event, LineReader, StopMode
from routemqd.worker.lifecycle import (
    BEATS_PER_TIMEOUT,
    HEARTBEAT_INTERVAL,
    Worker,
    beat_interval,
    until_next_beat,
)
from tests.unit.test_worker_delivery import make_spec


def test_default_timeout_beats_once_a_second() -> None:
    assert beat_interval(60.0) == HEARTBEAT_INTERVAL


@pytest.mark.parametrize("timeout", [1.0, 1.5, 2.0, 3.9, 4.0, 10.0, 60.0])
def test_a_healthy_worker_beats_several_times_within_its_timeout(timeout: float) -> None:
    """The master kills after ``heartbeat_timeout`` of silence: with one beat per timeout (the
    manifest's minimum is 1 s), any scheduling delay would get a healthy worker killed."""
    assert timeout / beat_interval(timeout) >= BEATS_PER_TIMEOUT


@pytest.mark.parametrize("interval", [0.25, 0.5, 1.0])
def test_next_tick_is_within_one_interval(interval: float) -> None:
    for _ in range(100):
        assert 0.0 < until_next_beat(interval) <= interval


# ------------------------------------------------------------- beats out of turn (a real Worker)


class FakeLink:
    def __init__(self) -> None:
        self.connected = False
        self.problem = ""

    def keep_alive_if_starved(self, now: float) -> bool:
        return False


class FakeConsumer:
    """What the main loop reads of a consumer; ``script`` plays one link change per loop pass
    and stops the worker when it runs out."""

    def __init__(self, worker: Worker, script: list[Callable[[FakeConsumer], None]]) -> None:
        self.worker = worker
        self.script = script
        self.link = FakeLink()
        self.received = self.dropped = self.redelivered = 0
        self.last_message_at = 0.0
        self.runner = None
        self.acks = None
        self.states: list[Any] = []
        self.subscribed = False

    def step(self) -> None:
        if self.script:
            self.script.pop(0)(self)
            self.worker.wake()  # what the link does when its problem changes
        else:
            self.worker.stop_mode = StopMode.KEEP


def _play(tmp_path: Path, script: list[Callable[[FakeConsumer], None]]) -> list[dict[str, Any]]:
    """Run the worker's main loop over ``script`` and return what it told the master."""
    r, w = os.pipe()
    worker = Worker(make_spec(tmp_path), w)
    consumer = FakeConsumer(worker, script)
    worker.consumer = consumer  # type: ignore[assignment]
    # one scripted change per pass: the change is made, then the loop looks at it
    real_select = selectors.DefaultSelector.select

    def select(self: Any, timeout: float | None = None) -> Any:
        consumer.step()
        return real_select(self, 0)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(selectors.DefaultSelector, "select", select)
        # the first tick beats at once, the next is an hour away: every later beat is out of turn
        mp.setattr(worker, "_until_next_beat", lambda: 3600.0)
        try:
            worker._serve()
        finally:
            logsetup.set_process_fields()  # a Worker names its slot in every event of the process
    os.close(w)
    reader = LineReader(r)
    os.set_blocking(r, False)
    events = list(reader.read())
    os.close(r)
    return events


def test_a_ready_worker_beats_connected_before_it_says_ready(tmp_path: Path) -> None:
    """The master shows a slot's link from its last heartbeat: the one before READY must not be
    one from before the CONNACK."""

    def connect(c: FakeConsumer) -> None:
        c.link.connected = True
        c.subscribed = True

    events = _play(tmp_path, [lambda c: None, connect])
    kinds = [e["t"] for e in events]
    ready = kinds.index(Event.READY)
    assert events[0]["t"] == Event.HEARTBEAT and events[0]["connected"] is False
    assert events[ready - 1]["t"] == Event.HEARTBEAT
    assert events[ready - 1]["connected"] is True


def test_a_changed_broker_problem_is_reported_at_once(tmp_path: Path) -> None:
    problem = "broker 127.0.0.1:1 unreachable: [Errno 111] Connection refused"

    def fail(c: FakeConsumer) -> None:
        c.link.problem = problem

    events = _play(tmp_path, [lambda c: None, fail, lambda c: None])
    beats = [e for e in events if e["t"] == Event.HEARTBEAT]
    # the first tick's beat had no problem yet; the only other beat, out of turn, has it
    assert [b["broker_problem"] for b in beats] == ["", problem]


class SlowRetire(FakeConsumer):
    """A retire that lasts until the master has heard three heartbeats from the stopping worker
    (bounded), then ends the session: it waits on what it needs, not on a clock."""

    accepting = True
    stopping = False
    reader: LineReader
    seen: list[dict[str, Any]]

    def retire(self, deadline: float) -> bool:
        limit = time.monotonic() + 10
        while time.monotonic() < limit:
            self.seen += self.reader.read()
            if sum(e["t"] == Event.HEARTBEAT for e in self.seen) >= 3:
                return True
            time.sleep(0.01)
        return True

    def drain(self, deadline: float) -> None:
        pass

    def close(self, end_session: bool, deadline: float) -> bool:
        return end_session


def test_a_stopping_worker_beats_until_it_has_ended_its_session(tmp_path: Path) -> None:
    """The master kills a stopping worker that falls silent: the shutdown path beats on."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    worker = Worker(make_spec(tmp_path), w)
    consumer = SlowRetire(worker, [])
    consumer.reader, consumer.seen = LineReader(r), []
    worker.consumer = consumer  # type: ignore[assignment]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(worker, "_until_next_beat", lambda: 0.05)
        try:
            assert worker._shutdown(StopMode.RETIRE) == 0
        finally:
            logsetup.set_process_fields()
    os.close(w)
    events = consumer.seen + list(consumer.reader.read())
    os.close(r)
    kinds = [e["t"] for e in events]
    assert kinds.count(Event.HEARTBEAT) >= 3, kinds
    assert Event.SESSION_ENDED in kinds
