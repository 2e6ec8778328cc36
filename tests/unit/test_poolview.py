"""Tests for routemqd.poolview: the per-pool status rows and gauges (min, max, desired, actual)."""

from __future__ import annotations

import re

from routemqd.control import render_status
from routemqd.manifest import Scaling, ScalingKnobs
from routemqd.plan import PoolPlan
from routemqd.poolview import PoolView, pool_metric_lines, pool_views, render_pools
from routemqd.scaler import Decision, HostSample, PoolState, WorkerSample, tick

PLANS = {
    "sensors": PoolPlan("sensors", 1, 4, True),
    "events": PoolPlan("events", 1, 1, False),
    "echo": PoolPlan("echo", 3, 3, False),
}


def a_decision(desired: int = 3) -> Decision:
    scaling = Scaling(1, 4, ScalingKnobs())
    samples = tuple(WorkerSample(i, 10 + i, True, 1.0, 0.5, 10.0) for i in range(desired))
    _, decision = tick(PoolState(desired=desired), samples, HostSample(0.1), scaling, 1.0)
    return decision


def test_views_per_pool_in_manifest_order() -> None:
    views = pool_views(PLANS, {"sensors": 2, "events": 1}, {"sensors": a_decision(3)})
    assert [v.route for v in views] == ["sensors", "events", "echo"]
    sensors, events, echo = views
    assert sensors == PoolView("sensors", True, 1, 4, 3, 2, "measuring", None)
    assert events == PoolView("events", False, 1, 1, 1, 1)
    assert echo == PoolView("echo", False, 3, 3, 3, 0)  # no ready worker: actual 0


def test_an_autoscaled_pool_without_a_decision_wants_its_initial_size() -> None:
    (view, *_) = pool_views(PLANS, {}, {})
    assert (view.desired, view.reason) == (1, None)


def test_desired_is_held_inside_a_range_that_just_changed() -> None:
    plans = {"sensors": PoolPlan("sensors", 1, 2, True)}
    (view,) = pool_views(plans, {"sensors": 3}, {"sensors": a_decision(3)})
    assert view.desired == 2  # the retire target after max was lowered


def test_json_shape() -> None:
    (view, *_) = pool_views(PLANS, {"sensors": 1}, {})
    assert view.as_json() == {
        "route": "sensors",
        "autoscaled": True,
        "min": 1,
        "max": 4,
        "desired": 1,
        "actual": 1,
        "reason": None,
        "load": None,
        "retiring": 0,
    }


def test_slots_on_their_way_out_are_counted_apart() -> None:
    (view, *_) = pool_views(PLANS, {"sensors": 1}, {"sensors": a_decision(1)}, {"sensors": 2})
    assert (view.actual, view.retiring) == (1, 2)


def test_pool_table() -> None:
    pools = [
        PoolView("sensors", True, 1, 4, 3, 2, "saturated", 0.91, retiring=1).as_json(),
        PoolView("events", False, 1, 1, 1, 1).as_json(),
    ]
    lines = render_pools(pools)
    table = [re.split(r"\s{2,}", line.strip()) for line in lines]
    assert table[0] == [
        "POOL",
        "SIZE",
        "MIN",
        "MAX",
        "DESIRED",
        "ACTUAL",
        "RETIRING",
        "LOAD",
        "SCALER",
    ]
    assert table[1] == ["sensors", "auto", "1", "4", "3", "2", "1", "91%", "saturated"]
    assert table[2] == ["events", "fixed", "1", "1", "1", "1", "0", "-", "-"]
    col = lines[0].index("DESIRED")
    assert lines[1][col] == "3" and lines[2][col] == "1"
    assert render_pools([]) == []


def status_reply(**extra: object) -> dict[str, object]:
    return {
        "daemon": {
            "pid": 1,
            "uptime": 5.0,
            "manifest": "/etc/routemq.yaml",
            "host_id": "h",
            "shutting_down": False,
            "ready": 1,
            "startable": 1,
            "failed": 0,
            "last_reload": {"ok": True, "at": None},
        },
        "slots": [],
        **extra,
    }


def test_status_shows_the_pool_table_before_the_slots_when_the_daemon_sends_it() -> None:
    pools = [PoolView("sensors", True, 1, 4, 1, 1, "at_min", 0.1).as_json()]
    lines = render_status(status_reply(pools=pools)).splitlines()
    first = [i for i, x in enumerate(lines) if x.startswith(("POOL", "ROUTE"))]
    assert [lines[i].split()[0] for i in first] == ["POOL", "ROUTE"]
    assert any(x.startswith("sensors") and "at_min" in x for x in lines)
    assert not any(x.startswith("POOL") for x in render_status(status_reply()).splitlines())


def test_gauges() -> None:
    views = pool_views(PLANS, {}, {"sensors": a_decision(3)})
    lines = pool_metric_lines(views)
    assert "# TYPE routemqd_workers_desired gauge" in lines
    assert 'routemqd_workers_desired{route="sensors"} 3' in lines
    assert 'routemqd_workers_min{route="sensors"} 1' in lines
    assert 'routemqd_workers_max{route="sensors"} 4' in lines
    assert 'routemqd_workers_max{route="echo"} 3' in lines
    assert sum(1 for x in lines if x.startswith("routemqd_workers_")) == 9
