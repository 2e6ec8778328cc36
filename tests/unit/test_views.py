"""Status rows and the summary line: what an operator reads when workers are not serving."""

from __future__ import annotations

from routemqd import views
from tests.unit.fakes import Harness, manifest

PROBLEM = "broker 127.0.0.1:1 unreachable: [Errno 111] Connection refused"


def test_a_ready_worker_is_connected_before_its_first_heartbeat() -> None:
    h = Harness()
    proc = h.start_ready()
    assert proc.stats == {}
    assert views.slot_view(h.slot(), h.now)["connected"] is True
    h.event(proc, "hb", connected=False, broker_problem=PROBLEM)
    row = views.slot_view(h.slot(), h.now)
    assert row["connected"] is False and row["broker_problem"] == PROBLEM


def test_a_worker_that_is_not_up_yet_is_not_connected() -> None:
    h = Harness()
    h.reconcile()
    assert views.slot_view(h.slot(), h.now)["connected"] is False


def test_the_summary_says_what_unready_workers_wait_for() -> None:
    h = Harness(
        manifest([{"name": "r", "topic": "r/{n}", "handler": "m:f", "workers": 2, "shared": True}])
    )
    h.reconcile()
    slots = list(h.table.slots.values())
    assert views.waiting_for(slots) == ""
    h.event(slots[1].proc, "hb", connected=False, broker_problem=PROBLEM)
    assert views.waiting_for(slots) == PROBLEM
    line = views.summary_line(0, 2, 0, True, views.waiting_for(slots))
    assert line == f"0/2 workers ready, 0 failed; {PROBLEM}"
    # once everything serves, a stale reason is not shown
    assert views.summary_line(2, 2, 0, True, PROBLEM) == "2/2 workers ready, 0 failed"
    assert views.summary_line(1, 2, 0, False) == "1/2 workers ready, 0 failed, last reload failed"


def test_a_serving_slot_is_not_a_reason_to_wait() -> None:
    h = Harness()
    proc = h.start_ready()
    h.event(proc, "hb", connected=True, broker_problem="")
    assert views.waiting_for(h.table.slots.values()) == ""
