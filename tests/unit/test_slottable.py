"""The slot table on a fake clock and a fake process table: restarts, parking, poison messages,
the rolling replace, reloads, retiring and stopping, without a broker and without fork()."""

from __future__ import annotations

import signal

import pytest
from structlog.testing import capture_logs

from routemqd.exitcodes import ExitCode
from routemqd.plan import diff, slots_for
from routemqd.protocol import StopMode
from routemqd.slots import Slot, State
from tests.unit.fakes import SIGKILLED, Harness, exited, manifest

POISON = b"p" * 16


def test_a_new_slot_starts_and_becomes_ready() -> None:
    h = Harness()
    assert h.slot().state is State.STARTING
    proc = h.start_ready()
    assert h.slot().state is State.READY
    assert h.table.counts() == (1, 1, 0)
    assert proc.ready_at == h.now
    h.ready(proc)  # a second ready report changes nothing
    assert h.slot().state is State.READY


def test_first_crash_restarts_at_once_then_backs_off_then_parks() -> None:
    h = Harness()
    states = []
    with capture_logs() as logs:
        for _ in range(5):
            proc = h.start_ready()
            h.clock.advance(0.5)
            h.exit(proc, exited(1))
            states.append(h.slot().state)
            h.clock.advance(h.slot().next_start_at - h.now)
    assert states == [State.STARTING, *[State.BACKOFF] * 3, State.FAILED]
    assert [e["event"] for e in logs].count("slot_failed") == 1
    backoffs = [e["delay_s"] for e in logs if e["event"] == "slot_backoff"]
    assert backoffs == sorted(backoffs) and len(backoffs) == 3
    assert h.slot().restart_reasons == {"crash": 5}
    assert h.table.counts() == (0, 0, 1)


def test_a_parked_slot_waits_out_its_cooldown() -> None:
    h = Harness(manifest(failure_limit=1, failed_cooldown=30))
    h.exit(h.start_ready(), exited(1))
    assert h.slot().state is State.FAILED
    h.clock.advance(29)
    h.reconcile()
    assert h.slot().proc is None and len(h.procs.spawned) == 1
    h.clock.advance(1)
    h.reconcile()
    assert h.slot().state is State.STARTING and len(h.procs.spawned) == 2


def test_boot_failure_parks_at_once() -> None:
    h = Harness()
    h.reconcile()
    proc = h.slot().proc
    h.event(proc, "boot_error", reason="cannot import m")
    with capture_logs() as logs:
        h.exit(proc, exited(int(ExitCode.HANDLER_IMPORT_FAILED)))
    assert h.slot().state is State.FAILED
    (failed,) = [e for e in logs if e["event"] == "slot_failed"]
    assert failed["reason"] == "cannot import m" and failed["why"] == "boot failure"
    assert h.slot().restart_reasons == {"boot_failure": 1}


def test_a_poison_message_with_default_limits_never_parks_the_slot() -> None:
    """max_attempts (5) deaths charged to one message: no backoff, no failure window, and the
    sixth worker is handed the count that makes it give the message up."""
    h = Harness()
    with capture_logs() as logs:
        for attempt in range(1, 6):
            proc = h.start_ready()
            h.crash_holding(proc, POISON)
            assert h.slot().state is State.STARTING, attempt
            assert h.slot().next_start_at <= h.now
            h.clock.advance(0.05)
    assert not [e for e in logs if e["event"] in ("slot_backoff", "slot_failed")]
    assert [e["attempts"] for e in logs if e["event"] == "message_attempt_failed"] == [
        1,
        2,
        3,
        4,
        5,
    ]
    assert not h.slot().failures and h.slot().consecutive_failures == 0
    h.reconcile()
    assert h.procs.attempts_given[-1] == {POISON: 5}
    assert h.procs.attempts_given[0] == {}


def test_a_resolved_message_is_forgotten() -> None:
    h = Harness()
    h.crash_holding(h.start_ready(), POISON)
    proc = h.start_ready()
    h.event(proc, "hb", resolved=[POISON.hex()], handled=1)
    h.clock.advance(1)
    h.exit(proc, exited(1))
    h.reconcile()
    assert h.procs.attempts_given[-1] == {}


def test_deaths_with_nothing_in_flight_still_count_against_the_slot() -> None:
    h = Harness(manifest(failure_limit=2))
    h.exit(h.start_ready(), SIGKILLED)
    h.exit(h.start_ready(), SIGKILLED)
    assert h.slot().state is State.FAILED


def test_with_max_attempts_above_the_failure_limit_the_slot_protects_itself() -> None:
    routes = [{"name": "r", "topic": "r/{n}", "handler": "m:f", "max_attempts": 1000}]
    h = Harness(manifest(routes, failure_limit=3))
    for _ in range(3):
        h.crash_holding(h.start_ready(), POISON)
        h.clock.advance(h.slot().next_start_at - h.now)
    assert h.slot().state is State.FAILED


def test_a_healthy_run_clears_the_failure_window() -> None:
    h = Harness(manifest(failure_limit=2, healthy_after=10))
    h.exit(h.start_ready(), exited(1))
    proc = h.start_ready()
    h.clock.advance(11)
    h.exit(proc, exited(1))
    assert h.slot().state is State.STARTING
    assert len(h.slot().failures) == 1


def test_fork_failure_backs_off_and_retries() -> None:
    h = Harness()
    h.procs.fail_fork = True
    h.reconcile()
    assert h.slot().state is State.BACKOFF and h.slot().proc is None
    h.procs.fail_fork = False
    h.reconcile()
    assert len(h.procs.spawned) == 0  # not before the retry delay
    h.clock.advance(1)
    h.reconcile()
    assert h.slot().state is State.STARTING and h.slot().proc is not None


def test_a_stuck_worker_is_killed_at_once_and_its_message_charged() -> None:
    routes = [{"name": "r", "topic": "r/{n}", "handler": "m:f", "heartbeat_timeout": 2}]
    h = Harness(manifest(routes))
    proc = h.start_ready()
    h.event(proc, "hb", busy_for=3.0, busy_topic="r/1")
    proc.ps = _AlivePs()  # sample() sees a live process
    assert proc.board is not None
    proc.board.set(0, POISON)
    with capture_logs() as logs:
        h.table.check_health(h.now)
    assert h.procs.killed == [proc.pid]
    assert h.slot().state is State.STOPPING
    assert [e["event"] for e in logs] == ["worker_unhealthy", "slot_state"]
    h.exit(proc, SIGKILLED)
    assert h.slot().state is State.STARTING
    assert h.slot().restart_reasons == {"stuck": 1}
    h.reconcile()
    assert h.procs.attempts_given[-1] == {POISON: 1}


def test_a_stopping_worker_that_falls_silent_is_killed_without_waiting_for_its_deadline() -> None:
    """A frozen worker cannot drain: during a retire (or any stop) it is killed after
    heartbeat_timeout, not graceful_timeout. One that still beats is left to finish, however
    long its handler is busy: its stop deadline rules that."""
    routes = [{"name": "r", "topic": "r/{n}", "handler": "m:f", "heartbeat_timeout": 2}]
    h = Harness(manifest(routes))
    proc = h.start_ready()
    removed(h)
    h.reconcile()
    proc.ps = _AlivePs()
    h.clock.advance(1.5)
    h.event(proc, "hb", busy_for=5.0, busy_topic="r/1")  # busy, but beating while it stops
    h.clock.advance(1.5)
    h.table.check_health(h.now)
    assert h.procs.killed == []
    h.clock.advance(1.0)  # 2.5 s of silence
    with capture_logs() as logs:
        h.table.check_health(h.now)
    assert h.procs.killed == [proc.pid]
    assert [e["event"] for e in logs] == ["worker_unhealthy"]
    h.table.check_health(h.now)
    assert h.procs.killed == [proc.pid], "killed once"
    h.exit(proc, SIGKILLED)
    assert list(h.slot().drain) == [proc.spec.client_id], "its session is resumed and retired"


# ------------------------------------------------------------------------------ replace


def test_replace_keeping_the_session_warms_drains_then_connects() -> None:
    h = Harness()
    old = h.start_ready()
    h.table.restart({"r"})
    assert h.table.replacing()
    h.reconcile()
    slot = h.slot()
    assert slot.state is State.WARMING and slot.shown == "ready"
    new = slot.incoming
    assert new is not None and new.held
    h.reconcile()
    assert slot.state is State.WARMING  # not warm yet: the old worker keeps serving
    h.event(new, "warm")
    h.reconcile()
    assert slot.state is State.DRAINING and slot.shown == "stopping"
    assert h.procs.sent(old) == [("stop", {"mode": StopMode.KEEP})]
    assert h.procs.sent(new) == []  # never two live clients on one client id
    h.exit(old, exited(0))
    assert slot.state is State.CONNECTING and slot.proc is new
    assert h.procs.sent(new) == [("connect", {})]
    h.ready(new)
    assert slot.state is State.READY and not h.table.replacing()
    assert slot.restart_reasons == {"restart": 1}


def test_replace_with_a_new_subscription_subscribes_first() -> None:
    h = Harness()
    old = h.start_ready()
    routes = [{"name": "r", "topic": "r/{n}/x", "handler": "m:f"}]
    h.manifest = manifest(routes)
    changes = diff(h.table.current_specs(), slots_for(h.manifest))
    h.table.apply(changes, h.now)
    h.reconcile()
    slot = h.slot()
    assert slot.state is State.SUBSCRIBING
    new = slot.incoming
    assert new is not None and not new.held
    h.ready(new)
    h.reconcile()
    assert slot.state is State.DRAINING
    assert h.procs.sent(old) == [("stop", {"mode": StopMode.RETIRE})]
    h.exit(old, exited(0))
    assert slot.state is State.READY and slot.proc is new
    assert slot.restart_reasons == {"reload": 1}


def test_a_failed_replacement_keeps_the_old_worker() -> None:
    h = Harness()
    old = h.start_ready()
    h.table.restart({"r"})
    h.reconcile()
    new = h.slot().incoming
    h.exit(new, exited(int(ExitCode.HANDLER_IMPORT_FAILED)))
    assert h.slot().state is State.READY and h.slot().proc is old
    assert not h.table.last_reload["ok"]
    assert "replacement failed" in h.table.last_reload["error"]


def test_one_slot_of_a_pool_is_replaced_at_a_time() -> None:
    routes = [{"name": "r", "topic": "r/{n}", "handler": "m:f", "shared": True, "workers": 2}]
    h = Harness(manifest(routes))
    h.start_ready("r", 0)
    h.ready(h.slot("r", 1).proc)
    h.table.restart({"r"})
    h.reconcile()
    assert [h.slot("r", i).state for i in (0, 1)] == [State.WARMING, State.READY]


def test_the_old_worker_dying_mid_handoff_promotes_the_replacement() -> None:
    h = Harness()
    old = h.start_ready()
    h.table.restart({"r"})
    h.reconcile()
    new = h.slot().incoming
    h.exit(old, SIGKILLED)
    assert h.slot().state is State.CONNECTING and h.slot().proc is new


# ------------------------------------------------------------------ reload and retire


def test_a_removed_route_retires_then_leaves_the_table() -> None:
    h = Harness()
    proc = h.start_ready()
    h.manifest = manifest([{"name": "other", "topic": "o/{n}", "handler": "m:f"}])
    h.table.apply(diff(h.table.current_specs(), slots_for(h.manifest)), h.now)
    h.reconcile()
    assert h.slot().state is State.RETIRING
    assert h.procs.sent(proc) == [("stop", {"mode": StopMode.RETIRE})]
    with capture_logs() as logs:
        h.retired(proc)
    assert ("r", 0) not in h.table.slots
    assert "slot_retired" in [e["event"] for e in logs]
    assert h.table.slots[("other", 0)].state is State.STARTING


def due(h: Harness, slot: Slot) -> None:
    """The fake clock to the moment the slot's next worker is due."""
    h.clock.advance(max(0.0, slot.next_start_at - h.now))


def removed(h: Harness) -> None:
    """A reload that removes route r."""
    h.manifest = manifest([{"name": "other", "topic": "o/{n}", "handler": "m:f"}])
    h.table.apply(diff(h.table.current_specs(), slots_for(h.manifest)), h.now)


def test_a_retiring_worker_killed_mid_drain_has_its_session_resumed_and_ended() -> None:
    h = Harness()
    proc = h.start_ready()
    client_id = proc.spec.client_id
    removed(h)
    h.reconcile()
    proc.board.set(0, POISON)  # type: ignore[union-attr]
    h.exit(proc, SIGKILLED)  # killed from outside while it drained
    slot = h.slot()
    assert slot.state is State.RETIRING and list(slot.drain) == [client_id]
    assert h.table.attempts["r"].snapshot() == {POISON: 1}, "the message it held is charged"
    due(h, slot)
    with capture_logs() as logs:
        h.reconcile()
    drainer = slot.proc
    assert drainer is not None and drainer.spec.client_id == client_id
    assert h.procs.sent(drainer) == [("stop", {"mode": StopMode.RETIRE})]
    assert [e["event"] for e in logs] == ["retire_resumed"]
    h.retired(drainer)
    assert ("r", 0) not in h.table.slots and slot.state is State.GONE


def test_a_retiring_worker_killed_at_its_deadline_is_charged_for_the_message_it_held() -> None:
    h = Harness()
    proc = h.start_ready()
    removed(h)
    h.reconcile()
    h.clock.advance(proc.stop_deadline - h.now)  # type: ignore[operator]
    h.table.enforce_stop_deadlines(h.now)
    assert h.procs.killed == [proc.pid]
    h.crash_holding(proc, POISON, SIGKILLED)
    assert h.table.attempts["r"].snapshot() == {POISON: 1}
    assert list(h.slot().drain) == [proc.spec.client_id]


def test_a_retire_that_could_not_end_its_session_is_retried_with_backoff() -> None:
    h = Harness()
    proc = h.start_ready()
    removed(h)
    h.reconcile()
    h.exit(proc, 0)  # the broker was away: it kept the session (retire_incomplete)
    slot = h.slot()
    assert slot.state is State.RETIRING and slot.drains == 1
    assert slot.next_start_at in h.table.next_wake(h.now)
    h.reconcile()
    assert slot.proc is None, "not before the backoff"
    due(h, slot)
    h.reconcile()
    assert slot.proc is not None
    h.exit(slot.proc, 0)
    # the backoff doubles (0.1 s, then 0.2 s, each with the restart policy's +/-20 % jitter)
    assert 0.2 * 0.8 <= slot.next_start_at - h.now <= 0.2 * 1.2, "the backoff doubles"
    due(h, slot)
    h.reconcile()
    h.retired(slot.proc)
    assert slot.state is State.GONE


def test_a_drain_worker_that_cannot_boot_gives_up_loudly() -> None:
    h = Harness()
    proc = h.start_ready()
    removed(h)
    h.reconcile()
    h.exit(proc, SIGKILLED)
    due(h, h.slot())
    h.reconcile()
    with capture_logs() as logs:
        h.exit(h.slot().proc, exited(int(ExitCode.HANDLER_IMPORT_FAILED)))
    assert "retire_abandoned" in [e["event"] for e in logs]
    assert ("r", 0) not in h.table.slots


def test_a_parked_slot_that_is_removed_gets_a_worker_to_end_its_session() -> None:
    h = parked()
    removed(h)
    h.reconcile()
    slot = h.slot()
    assert slot.state is State.RETIRING and slot.proc is not None
    assert h.procs.sent(slot.proc) == [("stop", {"mode": StopMode.RETIRE})]
    h.retired(slot.proc)
    assert ("r", 0) not in h.table.slots


def test_a_session_that_a_returning_slot_takes_over_is_not_drained() -> None:
    h = Harness(
        manifest([{"name": "r", "topic": "r/{n}", "handler": "m:f", "shared": True, "workers": 2}])
    )
    h.start_ready("r", 0)
    proc = h.start_ready("r", 1)
    h.manifest = manifest([{"name": "r", "topic": "r/{n}", "handler": "m:f", "shared": True}])
    h.table.apply(diff(h.table.current_specs(), slots_for(h.manifest)), h.now)
    h.reconcile()
    old = h.slot("r", 1)
    assert old.state is State.RETIRING
    h.manifest = manifest(
        [{"name": "r", "topic": "r/{n}", "handler": "m:f", "shared": True, "workers": 2}]
    )
    h.table.apply(diff(h.table.current_specs(), slots_for(h.manifest)), h.now)
    h.exit(proc, SIGKILLED)  # the retiring worker dies; slot 1 is back with the same client id
    h.clock.advance(1.0)
    h.reconcile()
    assert old.state is State.GONE, "the returning slot resumes that session itself"
    new = h.slot("r", 1)
    assert new is not old and new.proc is not None
    assert new.proc.spec.client_id == proc.spec.client_id


def test_a_held_replacement_that_never_connected_leaves_no_session_to_drain() -> None:
    h = Harness()
    proc = h.start_ready()
    h.table.restart({"r"})
    h.reconcile()  # the rolling replace warms a held replacement
    incoming = h.slot().incoming
    assert incoming is not None and incoming.held
    removed(h)
    h.reconcile()
    h.exit(incoming, 0)
    assert h.slot().drain == {}
    h.retired(proc)
    assert ("r", 0) not in h.table.slots


def parked() -> Harness:
    h = Harness(manifest(failure_limit=1))
    h.exit(h.start_ready(), exited(1))
    assert h.slot().state is State.FAILED
    return h


def test_a_parked_slot_gets_a_new_spec_at_once() -> None:
    h = parked()
    h.manifest = manifest([{"name": "r", "topic": "r/{n}", "handler": "m:g"}], failure_limit=1)
    h.table.apply(diff(h.table.current_specs(), slots_for(h.manifest)), h.now)
    h.reconcile()
    assert h.slot().state is State.STARTING
    assert h.slot().proc is not None and h.slot().proc.spec.route.handler == "m:g"


def test_restart_of_a_parked_slot_starts_it_now() -> None:
    h = parked()
    h.table.restart({"r"})
    h.reconcile()
    assert h.slot().state is State.STARTING


def test_drain_all_starts_every_slot_straight_into_retiring() -> None:
    h = Harness()
    h.table.drain_all(h.now)
    assert h.slot().state is State.RETIRING
    h.reconcile()
    (proc,) = h.procs.spawned
    assert h.procs.sent(proc) == [("stop", {"mode": StopMode.RETIRE})]


# -------------------------------------------------------------------------- stopping


def test_shutdown_stops_everything_and_restarts_nothing() -> None:
    h = Harness()
    proc = h.start_ready()
    h.table.stop_all(StopMode.KEEP, 30.0, h.now)
    assert h.slot().state is State.STOPPING
    assert h.procs.sent(proc) == [("stop", {"mode": StopMode.KEEP})]
    h.table.hurry(h.now, 1.0)
    assert proc.stop_deadline == h.now + 1.0
    h.clock.advance(1.0)
    h.table.enforce_stop_deadlines(h.now)
    assert h.procs.killed == [proc.pid]
    h.exit(proc, SIGKILLED)
    h.reconcile()
    assert len(h.procs.spawned) == 1


def test_a_worker_without_a_command_pipe_is_signalled() -> None:
    h = Harness()
    proc = h.start_ready()
    h.procs.pipe_closed.add(proc.pid)
    h.table.stop(proc, StopMode.RETIRE, "retired", 5.0, h.now)
    assert h.procs.signals == [(proc.pid, signal.SIGUSR2)]


def test_kill_all_kills_every_worker() -> None:
    h = Harness()
    proc = h.start_ready()
    h.table.kill_all()
    assert h.procs.killed == [proc.pid] and h.table.stopping


class _AlivePs:
    def oneshot(self) -> _AlivePs:
        return self

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None

    def status(self) -> str:
        return "running"

    def memory_info(self) -> object:
        return type("M", (), {"rss": 1})()

    def cpu_percent(self, interval: object) -> float:
        return 0.0


@pytest.mark.parametrize("state", [State.BACKOFF, State.FAILED])
def test_next_wake_includes_parked_slots(state: State) -> None:
    h = Harness(manifest(failure_limit=1 if state is State.FAILED else 5))
    h.exit(h.start_ready(), exited(1))
    if state is State.BACKOFF:
        h.exit(h.start_ready(), exited(1))
    assert h.slot().state is state
    assert h.slot().next_start_at in h.table.next_wake(h.now)
