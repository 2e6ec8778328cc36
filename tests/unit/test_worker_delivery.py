"""The acknowledger's decisions, with a fake link: when a message is acked, parked, given up."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from routemqd import manifest as manifest_mod
from routemqd import plan
from routemqd.board import InflightBoard, fingerprint
from routemqd.worker.delivery import Acknowledger
from routemqd.worker.stats import RunnerState
from tests.support import manifests


class Info:
    def __init__(self, state: bool | None = None) -> None:
        self.state = state  # True published, None waiting, False failed

    def is_published(self) -> bool:
        if self.state is False:
            raise RuntimeError("message publish failed: not connected")
        return bool(self.state)


class FakeLink:
    def __init__(self, spec: Any, on_socket_thread: bool = True) -> None:
        self.spec = spec
        self.lock = threading.RLock()
        self.connected = True
        self.acked: list[tuple[int, int]] = []
        self.published: list[tuple[str, bytes | str, dict[str, Any] | None]] = []
        self.woken = 0
        self._socket_thread = on_socket_thread
        self.next_info = Info(True)

    def on_socket_thread(self) -> bool:
        return self._socket_thread

    def wake(self) -> None:
        self.woken += 1

    def ack(self, mid: int, qos: int) -> None:
        self.acked.append((mid, qos))

    def publish(self, topic: str, payload: Any, qos: int, retain: bool, props: Any) -> Info:
        self.published.append((topic, payload, props))
        return self.next_info

    @contextmanager
    def unlocked(self) -> Any:
        yield


class Raw:
    def __init__(self, mid: int, payload: bytes = b"p", qos: int = 1, dup: bool = False) -> None:
        self.topic = "t/x"
        self.payload = payload
        self.qos = qos
        self.retain = False
        self.dup = dup
        self.mid = mid
        self.properties = None


def make_spec(tmp_path: Path, protocol: int | str = 5, **route: Any) -> Any:
    m = manifests.write(
        tmp_path / "m.yaml", 1883, [manifests.route("r", "t/{n}", **route)], protocol=protocol
    )
    return plan.slots_for(manifest_mod.load(m))[("r", 0)]


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def error(self, event: str, **kw: Any) -> None:
        self.events.append((event, kw))


@pytest.fixture
def spec(tmp_path: Path) -> Any:
    return make_spec(tmp_path)


def run_one(acks: Acknowledger, raw: Raw, publish: Info | None = None, fail: bool = False) -> Any:
    state = RunnerState()
    d = acks.begin(state, raw)
    assert d is not None
    assert state.busy_since is not None
    if publish is not None:
        d.message.pending.append(publish)
    acks.finish(d, RuntimeError("boom") if fail else None)
    return state


def test_acked_as_soon_as_the_handler_returns(spec: Any) -> None:
    link = FakeLink(spec)
    acks = Acknowledger(link, spec.route, Log())  # type: ignore[arg-type]
    state = run_one(acks, Raw(7))
    assert link.acked == [(7, 1)]
    assert state.handled == 1 and state.busy_since is None and acks.idle()


def test_qos0_is_never_acked(spec: Any) -> None:
    link = FakeLink(spec)
    acks = Acknowledger(link, spec.route, Log())  # type: ignore[arg-type]
    run_one(acks, Raw(0, qos=0))
    assert link.acked == []


def test_parked_until_what_the_handler_published_is_confirmed(spec: Any) -> None:
    link = FakeLink(spec)
    acks = Acknowledger(link, spec.route, Log())  # type: ignore[arg-type]
    info = Info(None)
    run_one(acks, Raw(3), publish=info)
    assert link.acked == [] and not acks.idle()
    acks.settle()
    assert link.acked == []
    info.state = True
    acks.settle()
    assert link.acked == [(3, 1)] and acks.idle()


def test_unconfirmed_publish_leaves_the_message_unacked(spec: Any) -> None:
    link = FakeLink(spec)
    acks = Acknowledger(link, spec.route, Log())  # type: ignore[arg-type]
    run_one(acks, Raw(4), publish=Info(False))
    assert link.acked == [] and acks.idle()


def test_connection_lost_forgets_what_waits(spec: Any) -> None:
    link = FakeLink(spec)
    acks = Acknowledger(link, spec.route, Log())  # type: ignore[arg-type]
    acks.unacked = 1
    run_one(acks, Raw(5), publish=Info(None))
    acks.connection_lost()
    link.connected = False
    acks.settle()
    assert link.acked == [] and acks.idle() and acks.unacked == 0


def test_pool_runner_finish_is_settled_by_the_socket_thread(spec: Any) -> None:
    link = FakeLink(spec, on_socket_thread=False)
    acks = Acknowledger(link, spec.route, Log())  # type: ignore[arg-type]
    run_one(acks, Raw(9))
    assert link.acked == [] and link.woken == 1
    acks.settle()
    assert link.acked == [(9, 1)]


def test_failure_is_dead_lettered_and_acked_after_the_letter(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, dead_letter_topic="dlq/r")
    link = FakeLink(spec)
    link.next_info = Info(None)
    log = Log()
    acks = Acknowledger(link, spec.route, log)  # type: ignore[arg-type]
    state = run_one(acks, Raw(11), fail=True)
    assert state.failed == 1 and state.dead_lettered == 1
    assert state.last_error == "RuntimeError: boom"
    topic, payload, props = link.published[0]
    assert topic == "dlq/r" and payload == b"p"
    assert ("error", "RuntimeError: boom") in props["user_properties"]  # type: ignore[index]
    assert link.acked == []
    link.next_info.state = True
    acks.settle()
    assert link.acked == [(11, 1)]
    assert log.events[0][0] == "handler_failed"


def test_poison_message_is_given_up_without_running(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, dead_letter_topic="dlq/r", max_attempts=2)
    link = FakeLink(spec)
    board = InflightBoard(1)
    digest = fingerprint("t/x", b"bad")
    acks = Acknowledger(link, spec.route, Log(), board, {digest: 2})  # type: ignore[arg-type]
    state = RunnerState()
    assert acks.begin(state, Raw(12, payload=b"bad", dup=True)) is None
    assert link.published and link.acked == [(12, 1)]
    assert state.resolved == [digest] and state.failed == 1
    assert board.inflight() == []


def test_board_marks_the_message_only_while_its_handler_runs(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    link = FakeLink(spec)
    board = InflightBoard(1)
    digest = fingerprint("t/x", b"once")
    acks = Acknowledger(link, spec.route, Log(), board, {digest: 1})  # type: ignore[arg-type]
    state = RunnerState()
    d = acks.begin(state, Raw(13, payload=b"once", dup=True))
    assert d is not None and d.message.attempt == 2
    assert board.inflight() == [digest]
    acks.finish(d, None)
    assert board.inflight() == [] and state.resolved == [digest]
